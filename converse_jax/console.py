"""Where progress goes: a terminal, a notebook, or a pipe (plain lines)."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["in_notebook", "interactive"]


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (ipykernel merely imported, e.g. by a notebook runner, is not)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def interactive(stream: Any = None) -> bool:
    """A progress bar can be drawn: ``stream`` (default stderr) is a terminal, or this is a notebook kernel
    (its streams are no tty, but tqdm.auto draws a widget there)."""
    if in_notebook():
        return True
    isatty = getattr(sys.stderr if stream is None else stream, "isatty", None)
    return bool(isatty and isatty())
