"""User-facing errors: each names the problem in one line; the CLI prints them without a traceback."""
from __future__ import annotations


class CttaError(Exception):
    """Base of every error that is the user's input rather than a bug; printed as one line by the CLI."""


class UnknownNameError(CttaError, KeyError):
    """A stream, strategy, backbone or corruption name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(CttaError, ValueError):
    """A malformed config file, override or argument value."""


class DataNotFoundError(CttaError, FileNotFoundError):
    """A dataset that is not where it was asked for; the message says how to get it."""


class CheckpointError(CttaError, ValueError):
    """A checkpoint that cannot be read or does not fit the backbone."""


class UnsupportedError(CttaError, ValueError):
    """A strategy asked to run a stream (step kind or setting) it does not support."""


class RunFolderError(ConfigError):
    """A run folder that holds another run (finished, unfinished, or of another config) than the one asked for."""


class RunFolderLockedError(RunFolderError):
    """A run folder another process is writing right now; the message names that process."""


class DivergedError(CttaError, RuntimeError):
    """A model whose outputs became non-finite (NaN / infinity) during a run (``run.on_diverge: stop``); ``result``
    is what the run wrote up to the segment that diverged (so a comparison can still show it, marked)."""

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class NonFiniteInputError(CttaError, ValueError):
    """A stream segment whose images hold NaN or infinite pixel values; the message names segment and stream."""
