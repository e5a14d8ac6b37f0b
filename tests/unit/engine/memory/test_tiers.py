"""KV cache storage tiers: device / host / disk allocation, layer-to-tier mapping, and the
disk tier's guarantee that nothing is left in the offload directory (also after SIGKILL)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine.errors import ConfigError, KvbenchError
from engine.memory import tiers
from engine.memory.tiers import (
    TIER_NAMES,
    DeviceTier,
    DiskTier,
    HostTier,
    Tier,
    make_tier,
    tier_of_layer,
)

REPO = Path(__file__).resolve().parents[4]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8]


@pytest.fixture(params=[True, False], ids=["tmpfile", "named"])
def disk_mode(request, monkeypatch):
    """Run disk tests with anonymous O_TMPFILE files and with the named-file fallback."""
    if request.param:
        if tiers._O_TMPFILE is None:
            pytest.skip("no O_TMPFILE on this platform")
    else:
        monkeypatch.setattr(tiers, "_O_TMPFILE", None)
    return request.param


@pytest.fixture
def make(tmp_path, disk_mode):
    """make(name) -> a tier on CPU, disk files in tmp_path; closed after the test."""
    made = []

    def _make(name):
        t = make_tier(name, "cpu", disk_dir=tmp_path)
        made.append(t)
        return t

    yield _make
    for t in made:
        t.close()


def _leftovers(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def _mapping_of(t: torch.Tensor) -> str | None:
    """The /proc/self/maps line whose address range holds t's data, if any."""
    ptr = t.untyped_storage().data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= ptr < hi:
                return line.rstrip("\n")
    return None


# -- every tier ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", TIER_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_is_zeroed_and_round_trips(make, name, dtype):
    tier = make(name)
    assert isinstance(tier, Tier) and tier.name == name
    assert tier.device == torch.device("cpu")
    shape = (3, 5, 7)
    t = tier.empty(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.device == tier.device
    assert t.is_contiguous()
    assert t.untyped_storage().nbytes() == 3 * 5 * 7 * dtype.itemsize
    assert torch.count_nonzero(t) == 0

    src = (torch.arange(t.numel()) % 251).reshape(shape).to(dtype)
    t.copy_(src)
    assert torch.equal(t, src)
    t[1, 2, 3] = 42
    assert t[1, 2, 3].item() == 42
    # a second tensor is independent storage
    u = tier.empty(shape, dtype)
    assert torch.count_nonzero(u) == 0
    assert torch.equal(t.flatten()[:10], src.flatten()[:10])


@pytest.mark.parametrize("name", TIER_NAMES)
def test_counters(make, name):
    tier = make(name)
    assert (tier.n_allocs, tier.bytes_allocated) == (0, 0)
    tier.empty((4, 8), torch.float32)
    tier.empty((2, 3, 5), torch.float16)
    tier.empty((7,), torch.uint8)
    tier.empty((0, 16), torch.bfloat16)
    assert tier.n_allocs == 4
    assert tier.bytes_allocated == 4 * 8 * 4 + 2 * 3 * 5 * 2 + 7
    tier.close()
    tier.close()  # idempotent
    with pytest.raises(KvbenchError, match="closed"):
        tier.empty((1,), torch.float32)


def test_host_tier_on_cpu_is_not_pinned():
    # Pinned (page-locked) host memory needs CUDA; with a CUDA compute device HostTier
    # allocates with pin_memory=True. That path cannot be exercised on a CPU-only machine,
    # so only the CPU behaviour is checked here.
    tier = make_tier("host", "cpu")
    assert isinstance(tier, HostTier) and not tier.pinned
    t = tier.empty((2, 2), torch.float32)
    assert t.device.type == "cpu" and not t.is_pinned()


def test_make_tier_classes_and_unknown_name(tmp_path):
    assert isinstance(make_tier("device"), DeviceTier)
    assert isinstance(make_tier("host", torch.device("cpu")), HostTier)
    assert isinstance(make_tier("disk", disk_dir=tmp_path), DiskTier)
    with pytest.raises(ConfigError, match="cache.offload"):
        make_tier("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
@pytest.mark.parametrize("name", ["device", "host"])
def test_cuda_tier_without_cuda_is_a_clear_error(name):
    with pytest.raises(KvbenchError, match="CUDA is not available"):
        make_tier(name, "cuda")


# -- tier_of_layer ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "offload, offload_layers, expected",
    [
        ("device", 0, ["device"] * 4),
        ("device", 2, ["device"] * 4),
        ("host", 0, ["host"] * 4),
        ("host", 1, ["device", "host", "host", "host"]),
        ("disk", 3, ["device", "device", "device", "disk"]),
        ("disk", 4, ["device"] * 4),
        ("disk", 99, ["device"] * 4),
    ],
)
def test_tier_of_layer(offload, offload_layers, expected):
    assert [tier_of_layer(il, offload, offload_layers) for il in range(4)] == expected


@pytest.mark.parametrize(
    "offload, offload_layers, key",
    [
        ("gpu", 0, "cache.offload="),
        ("", 0, "cache.offload="),
        ("host", -1, "cache.offload_layers"),
        ("device", -1, "cache.offload_layers"),
        ("disk", 1.5, "cache.offload_layers"),
        ("disk", True, "cache.offload_layers"),
    ],
)
def test_tier_of_layer_errors(offload, offload_layers, key):
    with pytest.raises(ConfigError, match=key):
        tier_of_layer(0, offload, offload_layers)


# -- disk tier ----------------------------------------------------------------------------


def test_disk_tensor_is_a_shared_mapping_of_a_deleted_file(tmp_path, disk_mode):
    tier = DiskTier(tmp_path)
    assert tier.unnamed_files is disk_mode
    t = tier.empty((1024, 8), torch.float32)
    line = _mapping_of(t)
    assert line is not None, "tensor data is not in any mapping"
    perms, path = line.split()[1], line.split(maxsplit=5)[5]
    assert perms == "rw-s", line  # MAP_SHARED, writable: writes go to the file, not a private copy
    assert path.startswith(str(tmp_path) + "/") and path.endswith("(deleted)"), line
    assert _leftovers(tmp_path) == []  # never visible in the directory once empty() returned

    # Read the file back through the kernel's map_files link: what was written is in the file.
    t.fill_(1.25)
    t[3, 4] = -7.5
    rng = line.split()[0]
    try:
        with open(f"/proc/self/map_files/{rng}", "rb") as f:
            data = f.read(t.numel() * 4)
    except OSError as e:  # needs CAP_SYS_ADMIN on some kernels
        pytest.skip(f"cannot read /proc/self/map_files: {e}")
    from_file = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(t.shape)
    assert torch.equal(from_file, t)

    del t
    tier.close()
    assert _leftovers(tmp_path) == []


def test_disk_nothing_left_after_close(tmp_path, disk_mode):
    tier = make_tier("disk", disk_dir=tmp_path)
    kept = [tier.empty((64, 32), dt) for dt in DTYPES]
    tier.close()
    assert _leftovers(tmp_path) == []
    kept[0].fill_(3.0)  # tensors handed out stay valid after close()
    assert kept[0].sum().item() == 3.0 * 64 * 32


def test_disk_dir_defaults_to_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_OFFLOAD_DIR", str(tmp_path))
    tier = make_tier("disk")
    assert tier.disk_dir == str(tmp_path)
    t = tier.empty((16,), torch.float32)
    assert str(tmp_path) in _mapping_of(t)


def test_disk_dir_missing_or_not_a_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"nope.*does not exist.*KVBENCH_OFFLOAD_DIR"):
        make_tier("disk", disk_dir=missing)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        make_tier("disk", disk_dir=afile)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write to a 0o500 directory")
def test_disk_dir_not_writable_chmod(tmp_path, disk_mode):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        with pytest.raises(KvbenchError, match=r"cannot create KV cache files in offload directory .*ro"):
            make_tier("disk", disk_dir=ro)
    finally:
        ro.chmod(0o700)


def test_disk_dir_not_writable(tmp_path, monkeypatch, disk_mode):
    # Root ignores permission bits, so simulate EACCES for file creation in this directory.
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(ro)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    with pytest.raises(KvbenchError, match=r"cannot create KV cache files in offload directory .*ro.*writable"):
        make_tier("disk", disk_dir=ro)


def test_disk_full_is_memory_full_error(tmp_path, monkeypatch, disk_mode):
    from engine.errors import MemoryFullError

    tier = make_tier("disk", disk_dir=tmp_path)

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
    with pytest.raises(MemoryFullError, match="free space"):
        tier.empty((1024,), torch.float32)
    assert tier.n_allocs == 0
    assert _leftovers(tmp_path) == []


_CHILD = textwrap.dedent(
    """
    import os, signal, sys, torch
    from engine.memory import tiers
    if sys.argv[2] == "named":
        tiers._O_TMPFILE = None
    tier = tiers.make_tier("disk", "cpu", disk_dir=sys.argv[1])
    k = tier.empty((256, 64), torch.float16)
    v = tier.empty((256, 64), torch.float16)
    k.fill_(1.5)
    v[7] = 2.0
    assert k.sum().item() == 1.5 * 256 * 64
    maps = [l for l in open("/proc/self/maps") if sys.argv[1] in l]
    print("maps", len(maps), maps[0].split()[1] if maps else "-", flush=True)
    print("ready", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("mode", ["tmpfile", "named"])
def test_disk_nothing_left_after_sigkill(tmp_path, mode):
    if mode == "tmpfile" and tiers._O_TMPFILE is None:
        pytest.skip("no O_TMPFILE on this platform")
    d = tmp_path / "offload"
    d.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, str(d), mode],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "ready" in r.stdout, r.stderr
    assert "maps 2 rw-s" in r.stdout, r.stdout  # both tensors were shared mappings in d
    assert _leftovers(d) == []
