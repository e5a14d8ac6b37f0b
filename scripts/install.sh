#!/usr/bin/env bash
# Create .venv and install kvbench with the exact versions of constraints.txt.
#   bash scripts/install.sh                  # kvbench (the README's main job)
#   bash scripts/install.sh test,llamacpp    # plus the test tools (and Debian's Chromium, as root) and the llama.cpp
#                                            # backend (the README's tests, CI)
# Order matters: torch first, because kvbench's C++ kernels (engine/kernels/qmm.cpp) compile against it without
# build isolation; llama-cpp-python (an sdist that compiles llama.cpp, ~12 min on 2 cores the first time, then
# pip's wheel cache) with build isolation and ggml's AMX kernels off: they fault on VMs whose CPUs advertise AMX
# (docs/llamacpp.md).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
. .venv/bin/activate
pip install -q -c constraints.txt torch setuptools
if [[ ",$extras," == *,llamacpp,* ]]; then
  amx_off="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  CMAKE_ARGS="-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DCMAKE_C_FLAGS='$amx_off' -DCMAKE_CXX_FLAGS='$amx_off'" \
    pip install -q -c constraints.txt llama-cpp-python
fi
pip install -q --no-build-isolation -c constraints.txt -e ".${extras:+[$extras]}"
# The report's browser test (tests/integration/harness/test_report_browser.py) opens report.html in Debian's
# Chromium, headless; it fails, naming this, where Chromium is missing.
if [[ ",$extras," == *,test,* ]] && ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >/dev/null
  else
    echo "install.sh: the report's browser test needs Chromium: sudo apt-get install chromium" >&2
  fi
fi
