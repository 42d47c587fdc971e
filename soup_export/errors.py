"""Named errors of the export half (all `click.ClickException`s: one line, non-zero exit)."""
from __future__ import annotations

from soup_train.errors import SoupError


class MixError(SoupError):
    """Domain weights are malformed, name unknown domains, or cannot be estimated."""


class OutputExistsError(SoupError):
    """The output directory exists and --force was not given."""


class OutputWriteError(SoupError):
    """The output cannot be written: no permission, a read-only file system, or a full disk."""


class QuantError(SoupError):
    """An unknown quantizer or an invalid quantizer parameter."""


class BudgetError(SoupError):
    """No tier fits the size budget, or the written files exceed it."""


class ParityError(SoupError):
    """A parity stage failed its tolerance; the report has the numbers."""


class ExportInputError(SoupError):
    """An export stage was given a directory that is not what it expects."""
