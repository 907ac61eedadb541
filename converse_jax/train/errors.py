"""Errors of the training library; the command line turns them into one-line messages."""

from __future__ import annotations


class TrainConfigError(ValueError):
    """A training setting is invalid (the message names the flag and what to do)."""


class IncompatibleWorkdirError(ValueError):
    """The working directory holds a run that cannot be resumed with this configuration."""


class NonFiniteLossError(RuntimeError):
    """The loss (or the updated parameters) became NaN or infinite; nothing after the last good
    checkpoint was saved."""

    def __init__(self, message: str, step: int, last_checkpoint: int | None) -> None:
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint
