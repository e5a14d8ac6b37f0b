"""Reports of a sweep directory: frames (records -> pandas), the Markdown/HTML page, plots, sections for
recurrent state and the seed article's claims. ``write_report`` is the entry point."""

from harness.report.write import write_report

__all__ = ["write_report"]
