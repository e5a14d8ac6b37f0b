"""The binding behind an import guard, llama.cpp's log, and the K/V types llama.cpp offers.

llama-cpp-python is an optional extra: it is an sdist that compiles llama.cpp (~12 min on 2 cores),
so the torch backend must work without it. Everything that touches the binding calls ``binding()``,
which raises one ``ConfigError`` naming the install command when it is missing.
"""

from __future__ import annotations

import ctypes
import re
import threading
from functools import cache

from gguf import GGMLQuantizationType as T

from engine.errors import ConfigError, UnsupportedError

# ggml's AMX kernels fault on some VMs whose CPUs advertise AMX: the build turns them off (docs/llamacpp.md).
_AMX_OFF = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
INSTALL = (f"CMAKE_ARGS=\"-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF "
           f"-DCMAKE_C_FLAGS='{_AMX_OFF}' -DCMAKE_CXX_FLAGS='{_AMX_OFF}'\" "
           "pip install -c constraints.txt llama-cpp-python (what bash scripts/install.sh test,llamacpp runs)")

# K/V cache types llama.cpp's CPU backend stores (llama-context.cpp accepts any ggml type; these are the
# ones llama.cpp's tools offer for -ctk/-ctv). Quantized V needs flash attention, which kvbench turns on.
CACHE_TYPES: dict[str, T] = {
    "f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1,
    "q5_0": T.Q5_0, "q5_1": T.Q5_1, "iq4_nl": T.IQ4_NL,
}


# what a llama.cpp point's memory is called where kvbench's name its allocator (records, reports, plots)
MEMORY_KINDS = ("llamacpp.unified", "llamacpp.streams")


def available() -> bool:
    try:
        binding()
    except ConfigError:
        return False
    return True


@cache
def binding():
    """The ``llama_cpp`` module, its backend initialised once and its log captured."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ConfigError(f"backend=llamacpp needs llama-cpp-python ({e}); install the extra: {INSTALL}") from None
    global _CALLBACK
    _CALLBACK = llama_cpp.llama_log_callback(_log)
    llama_cpp.llama_log_set(_CALLBACK, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    return llama_cpp


class LogCapture:
    """llama.cpp's log lines while a model or context is created: the KV buffer sizes it prints are
    llama.cpp's own account of its memory (there is no API that returns them)."""

    lines: list[str] = []
    lock = threading.Lock()

    def __enter__(self) -> LogCapture:
        self.lock.acquire()
        LogCapture.lines = []
        return self

    def __exit__(self, *exc) -> None:
        self.lines = LogCapture.lines
        LogCapture.lines = []
        self.lock.release()

    def text(self) -> str:
        return "".join(self.lines)


_CALLBACK = None  # the ctypes callback llama.cpp holds: kept alive for the process


def _log(level: int, text: bytes, user) -> None:
    LogCapture.lines.append(text.decode("utf-8", errors="replace"))


_KV_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers, +(\d+)/(\d+) seqs\), "
                      r"K \((\w+)\): +([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB")
_BUF_LINE = re.compile(r"llama_kv_cache: +(\S+) KV buffer size = +([\d.]+) MiB")


def parse_kv_log(text: str) -> dict:
    """llama.cpp's KV cache report: cells per stream, streams, types, and buffer sizes in MiB (2 decimals)."""
    caches = list(_KV_LINE.finditer(text))
    if len(caches) > 1:  # llama.cpp's iswa memory: a full cache and a sliding-window one, each its own cells
        raise UnsupportedError(f"llama.cpp made {len(caches)} KV caches for this model (sliding-window layers); the "
                               "llamacpp backend measures models with one KV cache")
    m = caches[0] if caches else None
    if m is None:
        raise ConfigError("llama.cpp did not report a KV cache (no 'llama_kv_cache: size' line); the model may "
                          "have no attention layers, which the llamacpp backend does not measure yet")
    bufs = [float(b.group(2)) for b in _BUF_LINE.finditer(text)]
    return {"cells_per_stream": int(m.group(2)), "n_layer": int(m.group(3)), "n_stream": int(m.group(5)),
            "n_seq": int(m.group(4)), "type_k": m.group(6), "type_v": m.group(8),
            "size_mib": float(m.group(1)), "k_mib": float(m.group(7)), "v_mib": float(m.group(9)),
            "buffer_mib": sum(bufs), "n_buffers": len(bufs)}
