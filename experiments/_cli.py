"""What every command-line entry point shares: one-line errors and exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def one_line(exc: BaseException) -> str:
    """An exception's message folded onto one line (its type's name when it has no message)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def run_main(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Call ``run(args)``: bad input (ValueError, OSError) -> one ``error:`` line and exit 2; Ctrl-C -> 130."""
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
