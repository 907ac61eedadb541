"""Where progress goes: a terminal, a notebook, or a pipe (plain lines)."""

from __future__ import annotations

import shutil
import sys
from typing import Any

from tqdm.auto import tqdm

__all__ = ["in_notebook", "interactive", "progress_bar"]


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


def progress_bar(total: int | None, *, desc: str, unit: str, stream: Any = None, **options: Any) -> Any:
    """A tqdm bar on ``stream`` (default stderr) at the terminal's width; a widget in a notebook.

    A bare pseudo-terminal (a container's, ``script``'s, an IDE's) reports 0 columns and 0 rows: tqdm
    then draws an empty bar (0 columns) or none at all (it hides bars beyond the screen's height, and
    0 rows leaves no room), so such a terminal gets a fixed 100 x 20. ``options`` go to tqdm."""
    size = shutil.get_terminal_size((0, 0))
    sized = size.columns > 0 and size.lines > 0
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr if stream is None else stream,
                dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 20, **options)
