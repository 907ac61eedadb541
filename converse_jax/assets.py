"""Location of the shared assets (released weights, goldens, test images).

``CONVERSE_ASSETS`` points at the folder; by default it is ``../shared`` beside the
repository checkout. Nothing in the library requires these files: tests skip when they
are absent and commands say which file to put where.
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def assets_dir() -> Path:
    """The assets folder: ``$CONVERSE_ASSETS`` or ``<repo>/../shared``."""
    env = os.environ.get("CONVERSE_ASSETS")
    if env:
        return Path(env).expanduser()
    return _REPO_ROOT.parent / "shared"


def asset(*parts: str) -> Path:
    """A path inside the assets folder (it may not exist)."""
    return assets_dir().joinpath(*parts)
