"""Named errors for everything a user can cause.

Every error subclasses `click.ClickException`, so the CLI prints its one-line message and exits
non-zero without a traceback. Messages say what was expected, what was found and what to do.
Internal invariants use `assert` instead.
"""
from __future__ import annotations

import click


class SoupError(click.ClickException):
    """Base class of all user-facing errors of soup."""


class ConfigError(SoupError):
    """A configuration value, override or config file is invalid."""


class DataError(SoupError):
    """A data directory, corpus or text input is missing or malformed."""


class CheckpointError(SoupError):
    """A checkpoint is missing, corrupt or incompatible."""


class ResumeError(CheckpointError):
    """A run cannot be resumed with the configuration it was given."""
