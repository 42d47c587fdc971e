"""Named errors for everything a user can cause.

Every error subclasses `click.ClickException`, so the CLI prints its one-line message and exits
non-zero without a traceback. Messages say what was expected, what was found and what to do.
Internal invariants use `assert` instead.
"""
from __future__ import annotations

import errno

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


class DistributedError(SoupError):
    """A rank of a distributed run did not arrive in time, or the ranks disagree."""


def user_error(exc: OSError | UnicodeDecodeError) -> str:
    """One line for a file a command could not read or write: what, where, and what to do (the
    commands' error boundary prints it instead of a traceback)."""
    if isinstance(exc, UnicodeDecodeError):
        return (f"a text file is not UTF-8 ({exc.reason} at byte {exc.start}); convert it to UTF-8 "
                "(e.g. iconv -t utf-8) or leave it out")
    where = f": {exc.filename}" if exc.filename else ""
    todo = {errno.ENOSPC: "free disk space or choose another --out",
            errno.EDQUOT: "free disk space or choose another --out",
            errno.EROFS: "choose an --out on a writable file system",
            errno.EACCES: "fix the permissions of that path (or choose another --out, if it is the output)",
            errno.EPERM: "fix the permissions of that path (or choose another --out, if it is the output)",
            errno.ENOENT: "check the path", errno.ENOTDIR: "a part of that path is a file, not a directory",
            errno.EISDIR: "pass a file, not a directory"}.get(exc.errno, "check that path")
    return f"{exc.strerror or exc}{where}; {todo}. Nothing half-written was left."
