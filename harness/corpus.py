"""Real text to measure quality on: Python's own documentation, present in every CPython.

``pydoc_data.topics`` holds the reference manual's topics (about 450 KB of English prose and code in
CPython 3.11). The default corpus is every topic, in sorted key order, separated by blank lines, so
the same interpreter always gives the same text. ``--text FILE`` replaces it with the user's own.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import ConfigError


def default_text() -> str:
    from pydoc_data.topics import (
        topics,  # a data module: imported when a corpus is needed
    )

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(path: str | Path | None) -> tuple[str, str]:
    """(text, where it came from): the file's UTF-8 text, or the default corpus when path is None."""
    if path is None:
        return default_text(), "pydoc_data.topics (Python's reference topics)"
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--text {p}: no such file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--text {p}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    except OSError as e:
        raise ConfigError(f"--text {p}: cannot read ({e.strerror})") from None
    if not text.strip():
        raise ConfigError(f"--text {p}: the file is empty")
    return text, str(p)
