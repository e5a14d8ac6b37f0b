"""Where KV cache tensors live: the compute device, host memory, or disk (llama.cpp's KV offload).

Three tiers, each a small allocator with the same interface (:class:`Tier`):

``device``
    The compute device itself: CPU memory when computing on CPU, GPU memory on CUDA.
``host``
    CPU memory. When the compute device is CUDA the memory is page-locked (pinned), so copies
    to and from the GPU can be asynchronous. On a CPU compute device it is plain CPU memory,
    i.e. the same thing as ``device``.
``disk``
    A file-backed *shared* memory mapping (``MAP_SHARED``) of a file under ``disk_dir``.
    Writes through the tensor land in the page cache of that file (not in a private
    copy-on-write copy), so the kernel can write cold pages back to disk and drop them
    under memory pressure instead of swapping.

:func:`tier_of_layer` maps a layer index to a tier name from the ``cache.offload`` /
``cache.offload_layers`` options; :func:`make_tier` builds a tier by name.

Disk tier: how nothing is left behind, even after SIGKILL
---------------------------------------------------------
Every allocation gets its own file, and **no file ever keeps a name in the file system**
once :meth:`DiskTier.empty` returns. There is no per-run directory at all: a directory
would need an ``rmdir`` after the fact, which a killed process never gets to run.

* Preferred (Linux >= 3.11 on ext4, xfs, btrfs, tmpfs, ...): the file is created with
  ``O_TMPFILE`` inside ``disk_dir``. Such a file is anonymous from its first instant: it is
  never linked into the directory, so there is no window at all in which a crash could leave
  something behind. It is mapped through its ``/proc/self/fd/N`` link with
  ``torch.UntypedStorage.from_file(..., shared=True, nbytes=n)``, after which the
  descriptor is closed. The mapping keeps the inode alive; the kernel frees its blocks when
  the last tensor using it is freed, or when the process exits, however it exits.
* Fallback (no ``O_TMPFILE`` support in the OS or file system, or no ``/proc``): a uniquely
  named file (``kvbench-kv-<pid>-<random>.bin``) is created with ``O_EXCL``, mapped, and
  unlinked immediately. The only window in which a name exists is between those calls (a few
  microseconds per allocation, none while the benchmark runs). Where unlinking a mapped file
  fails (Windows), the path is remembered and removed by :meth:`DiskTier.close`, or at
  interpreter exit by a ``weakref.finalize`` hook.

``/proc/self/maps`` shows these mappings as ``rw-s ... <disk_dir>/... (deleted)``.

The file is pre-allocated with ``posix_fallocate`` (where available), so that a full disk is
reported as :class:`~engine.errors.MemoryFullError` when the cache is created instead of as a
``SIGBUS`` in the middle of a run when a page of a sparse file cannot be backed. Freshly
allocated file blocks read as zeros, so tensors need no explicit zero-fill.

:meth:`Tier.close` does not invalidate tensors handed out earlier: their memory is released
when they are garbage-collected (for the disk tier, the mapping and with it the file's
blocks go away with the last reference to the storage).
"""

from __future__ import annotations

import errno
import math
import operator
import os
import secrets
import tempfile
import weakref
from pathlib import Path

import torch

from engine.errors import ConfigError, DeviceError, KvbenchError, MemoryFullError

TIER_NAMES = ("device", "host", "disk")

OFFLOAD_DIR_ENV = "KVBENCH_OFFLOAD_DIR"

# Module-level so tests can force the named-file fallback.
_O_TMPFILE: int | None = getattr(os, "O_TMPFILE", None)
_PROC_FD = "/proc/self/fd"
# errno values meaning "this OS / file system does not do O_TMPFILE" (not "you may not write here").
_NO_TMPFILE_ERRNOS = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
# errno values meaning "this file system cannot fallocate": fall back to a sparse file.
_NO_FALLOCATE_ERRNOS = {errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
_NAME_PREFIX = "kvbench-kv-"


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


class Tier:
    """Base of the storage tiers: creates zero-filled tensors and counts what it created."""

    name: str = ""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.n_allocs = 0
        self.bytes_allocated = 0
        self.closed = False

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A new zero-filled tensor of ``shape`` and ``dtype`` on this tier."""
        if self.closed:
            raise KvbenchError(f"the {self.name!r} KV cache tier is closed; create a new one with make_tier()")
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ConfigError(f"cannot allocate a KV tensor of negative shape {shape} on the {self.name!r} tier")
        t = self._alloc(shape, dtype)
        self.n_allocs += 1
        self.bytes_allocated += t.numel() * t.element_size()
        return t

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the tier holds itself (idempotent). Tensors handed out stay valid."""
        self.closed = True

    def __enter__(self) -> Tier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(device={self.device}, n_allocs={self.n_allocs}, "
            f"bytes_allocated={self.bytes_allocated}{', closed' if self.closed else ''})"
        )


def _check_device(device: torch.device, tier: str) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"the {tier!r} KV cache tier was asked for compute device {device}, but CUDA is not "
            "available; use device=cpu or run on a machine with a CUDA GPU"
        )


class DeviceTier(Tier):
    """Tensors on the compute device (CPU memory on CPU, GPU memory on CUDA)."""

    name = "device"

    def __init__(self, compute_device: torch.device | str = "cpu") -> None:
        device = torch.device(compute_device)
        _check_device(device, self.name)
        super().__init__(device)

    def _alloc(self, shape, dtype):
        return torch.zeros(shape, dtype=dtype, device=self.device)


class HostTier(Tier):
    """CPU memory, page-locked when the compute device is CUDA (async host<->GPU copies)."""

    name = "host"

    def __init__(self, compute_device: torch.device | str = "cpu") -> None:
        compute = torch.device(compute_device)
        _check_device(compute, self.name)
        super().__init__(torch.device("cpu"))
        self.compute_device = compute
        self.pinned = compute.type == "cuda"

    def _alloc(self, shape, dtype):
        return torch.zeros(shape, dtype=dtype, pin_memory=self.pinned)


def default_disk_dir() -> str:
    """``$KVBENCH_OFFLOAD_DIR`` if set (and not empty), else the system temp directory."""
    return os.environ.get(OFFLOAD_DIR_ENV) or tempfile.gettempdir()


def _remove_paths(paths: list[str]) -> None:
    while paths:
        p = paths.pop()
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError:  # still mapped on an OS that forbids it; nothing more we can do
            pass


class DiskTier(Tier):
    """CPU tensors backed by shared mappings of unlinked (or never-linked) files in ``disk_dir``.

    See the module docstring for why nothing remains in ``disk_dir``, even after SIGKILL.
    """

    name = "disk"

    def __init__(self, disk_dir: str | os.PathLike | None = None, *, preallocate: bool = True) -> None:
        super().__init__(torch.device("cpu"))
        self.disk_dir = str(Path(disk_dir if disk_dir is not None else default_disk_dir()).expanduser())
        self.preallocate = preallocate and hasattr(os, "posix_fallocate")
        self._leftovers: list[str] = []  # named files that could not be unlinked while mapped
        self._finalizer = weakref.finalize(self, _remove_paths, self._leftovers)
        self._finalizer.atexit = True
        self._check_dir()
        self.unnamed_files = self._probe_tmpfile()
        if not self.unnamed_files:
            self._probe_named()

    # -- setup ---------------------------------------------------------------------------

    def _where(self) -> str:
        return f"set {OFFLOAD_DIR_ENV} (or the tier's disk_dir) to an existing, writable directory"

    def _check_dir(self) -> None:
        d = self.disk_dir
        if not os.path.exists(d):
            raise ConfigError(f"KV cache offload directory {d!r} does not exist; create it, or {self._where()}")
        if not os.path.isdir(d):
            raise ConfigError(f"KV cache offload directory {d!r} is not a directory; {self._where()}")

    def _unwritable(self, e: OSError) -> ConfigError:
        return ConfigError(
            f"cannot create KV cache files in offload directory {self.disk_dir!r}: "
            f"{e.strerror or e}; make it writable, or {self._where()}"
        )

    def _probe_tmpfile(self) -> bool:
        """True when anonymous O_TMPFILE files can be created in disk_dir and mapped via /proc."""
        if _O_TMPFILE is None or not os.path.isdir(_PROC_FD):
            return False
        try:
            fd = os.open(self.disk_dir, _O_TMPFILE | os.O_RDWR, 0o600)
        except OSError as e:
            if e.errno in _NO_TMPFILE_ERRNOS:
                return False
            raise self._unwritable(e) from None
        os.close(fd)
        return True

    def _probe_named(self) -> None:
        try:
            fd, path = tempfile.mkstemp(prefix=_NAME_PREFIX + f"{os.getpid()}-", suffix=".probe", dir=self.disk_dir)
        except OSError as e:
            raise self._unwritable(e) from None
        os.close(fd)
        os.unlink(path)

    # -- allocation ----------------------------------------------------------------------

    def _reserve(self, fd: int, nbytes: int) -> None:
        try:
            if self.preallocate:
                try:
                    os.posix_fallocate(fd, 0, nbytes)
                    return
                except OSError as e:
                    if e.errno not in _NO_FALLOCATE_ERRNOS:
                        raise
            os.ftruncate(fd, nbytes)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise MemoryFullError(
                    f"cannot allocate {nbytes} bytes of KV cache on disk in {self.disk_dir!r}: {e.strerror}; "
                    f"free space there, use a smaller context, or {self._where()}"
                ) from None
            raise self._unwritable(e) from None

    def _map(self, path: str, nbytes: int) -> torch.UntypedStorage:
        try:
            return torch.UntypedStorage.from_file(path, shared=True, nbytes=nbytes)
        except RuntimeError as e:
            raise KvbenchError(
                f"cannot memory-map a {nbytes}-byte KV cache file in {self.disk_dir!r}: {e}; {self._where()}"
            ) from None

    def _storage(self, nbytes: int) -> torch.UntypedStorage:
        if self.unnamed_files:
            try:
                fd = os.open(self.disk_dir, _O_TMPFILE | os.O_RDWR, 0o600)
            except OSError as e:
                raise self._unwritable(e) from None
            try:
                self._reserve(fd, nbytes)
                return self._map(f"{_PROC_FD}/{fd}", nbytes)
            finally:
                os.close(fd)
        prefix = _NAME_PREFIX + f"{os.getpid()}-{secrets.token_hex(4)}-"
        try:
            fd, path = tempfile.mkstemp(prefix=prefix, suffix=".bin", dir=self.disk_dir)
        except OSError as e:
            raise self._unwritable(e) from None
        try:
            self._reserve(fd, nbytes)
            return self._map(path, nbytes)
        finally:
            os.close(fd)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError:
                self._leftovers.append(path)

    def _alloc(self, shape, dtype):
        nbytes = _nbytes(shape, dtype)
        if nbytes == 0:  # mmap cannot map 0 bytes; an empty tensor has no data anyway
            return torch.zeros(shape, dtype=dtype)
        storage = self._storage(nbytes)
        # set_ takes the offset and sizes in elements of the tensor's dtype; the storage is
        # exactly numel * element_size bytes, so the view covers it exactly.
        return torch.empty((0,), dtype=dtype).set_(storage, 0, shape)

    def close(self) -> None:
        super().close()
        _remove_paths(self._leftovers)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", disk_dir={self.disk_dir!r})"


def make_tier(
    name: str,
    compute_device: torch.device | str = "cpu",
    disk_dir: str | os.PathLike | None = None,
) -> Tier:
    """The tier called ``name`` ("device", "host" or "disk") for ``compute_device``.

    ``disk_dir`` is only used by the disk tier (default: ``$KVBENCH_OFFLOAD_DIR``, else the
    system temp directory).
    """
    if name == "device":
        return DeviceTier(compute_device)
    if name == "host":
        return HostTier(compute_device)
    if name == "disk":
        return DiskTier(disk_dir)  # CPU tensors whatever the compute device
    raise ConfigError(f"unknown KV cache tier {name!r} (cache.offload); expected one of {', '.join(TIER_NAMES)}")


def tier_of_layer(il: int, offload: str, offload_layers: int) -> str:
    """The tier name for layer ``il``.

    ``offload == "device"``: every layer stays on the device. ``offload`` "host" or "disk":
    the first ``offload_layers`` layers stay on the device, the rest go to ``offload``
    (``offload_layers = 0`` offloads every layer).
    """
    if offload not in TIER_NAMES:
        raise ConfigError(f"cache.offload={offload!r} is not a KV cache tier; expected one of {', '.join(TIER_NAMES)}")
    try:
        n = operator.index(offload_layers)
    except TypeError:
        n = -1
    if isinstance(offload_layers, bool) or n < 0:
        raise ConfigError(
            f"cache.offload_layers={offload_layers!r} must be an integer >= 0 "
            "(the number of leading layers kept on the device)"
        )
    if offload == "device" or il < n:
        return "device"
    return offload
