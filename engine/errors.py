"""One exception family for everything a user can get wrong.

Every message says what was wrong, where (file, key, tensor, config path) and what to do.
The CLI prints ``str(err)`` on one line and exits non-zero; it never shows a traceback for
a ``KvbenchError``.
"""

from __future__ import annotations


class KvbenchError(Exception):
    """Base of every error kvbench raises on purpose."""

    exit_code = 2


class ModelFileError(KvbenchError):
    """A model file is unreadable, malformed or inconsistent with its own metadata."""


class UnsupportedError(KvbenchError):
    """Valid input that kvbench does not implement (architecture, tensor type, rope scaling...)."""


class ConfigError(KvbenchError):
    """An invalid option or configuration value."""


class MemoryFullError(KvbenchError):
    """The KV / recurrent memory cannot hold what was asked of it."""


class StateFileError(KvbenchError):
    """A saved memory state is truncated, corrupted or does not match this memory."""


class DeviceError(KvbenchError):
    """A requested compute device is not available."""
