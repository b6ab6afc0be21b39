"""Build hooks for the docs site (run by mkdocs, not part of the pages).

- The tutorials train small models on a CPU, where one thread is faster than several fighting
  over a shared machine and makes the timings they print comparable between builds; figures are
  drawn off-screen.
- markdown-exec reports a code block that raises as a *warning*. ``mkdocs build --strict`` fails
  on it, but ``-q`` or a build without ``--strict`` would not; so the failures are collected here
  and abort every build, whatever its flags.
"""

from __future__ import annotations

import logging
import os

from mkdocs.exceptions import PluginError

_failures: list[str] = []
_current_page = ["?"]


class _Collect(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            _failures.append(f"{_current_page[0]}: {record.getMessage().splitlines()[0]}")


def on_startup(command: str, dirty: bool) -> None:
    """Configure torch and matplotlib once, and start collecting code-block failures."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import torch

    torch.set_num_threads(1)
    logger = logging.getLogger("mkdocs.plugins.markdown_exec")
    logger.setLevel(logging.WARNING)  # even under `mkdocs build -q`
    if not any(isinstance(h, _Collect) for h in logger.handlers):
        logger.addHandler(_Collect())


def on_pre_build(config: object) -> None:
    """Forget failures of a previous build (``mkdocs serve`` rebuilds in one process)."""
    _failures.clear()


def on_page_markdown(markdown: str, page: object, **kwargs: object) -> str:
    """Remember which page is being rendered, to name it in the failure report."""
    _current_page[0] = page.file.src_uri  # type: ignore[attr-defined]
    return markdown


def on_post_build(config: object) -> None:
    """Abort the build if any executed code block raised."""
    if _failures:
        raise PluginError(
            f"{len(_failures)} executed code block(s) failed (tracebacks above):\n  "
            + "\n  ".join(_failures)
        )
