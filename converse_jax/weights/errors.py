"""Errors raised while reading, converting and fetching weights.

All are ``ValueError`` or ``OSError`` subclasses so that callers who only know the builtin
types still catch them.
"""

from __future__ import annotations


class CheckpointFormatError(ValueError):
    """The file is not a readable checkpoint (wrong format, truncated, corrupt)."""


class UnsafeCheckpointError(CheckpointFormatError):
    """The checkpoint's pickle asks for something other than tensors and plain containers."""

    def __init__(self, message: str, global_name: str = "") -> None:
        super().__init__(message)
        self.global_name = global_name


class WeightMismatchError(ValueError):
    """A state dict does not fit a model: every missing, unexpected and mis-shaped entry.

    The message lists them all (on one line, with runs of numbered layers folded);
    ``missing``, ``unexpected`` and ``mismatched`` hold the full, unfolded lists.
    """

    def __init__(self, message: str, missing: list[str], unexpected: list[str],
                 mismatched: list[str]) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


class WeightsUnavailableError(OSError):
    """Released weights are neither cached nor downloadable; the message says where to put them."""


class ChecksumMismatchError(ValueError):
    """A downloaded or cached file does not have the published SHA-256."""
