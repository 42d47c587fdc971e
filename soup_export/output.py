"""Export outputs are all or nothing: staged in a temporary directory beside the target and renamed
into place only when every stage succeeded (a replaced output is kept until then)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from soup_export import stopping
from soup_export.errors import OutputExistsError, OutputWriteError
from soup_train.staging import staged


def check_output_path(out: Path, force: bool) -> Path:
    """The absolute output path, refusing what --force must never delete."""
    target = Path(out).resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents or target.parent == target:
        raise OutputExistsError(f"--out {out} is the current directory or one of its parents; "
                                "give a new directory name, e.g. --out exports/acme")
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"--out {out} exists and is a file; choose a directory name")
    if target.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it or choose another --out")
    parent = next(p for p in target.parents if p.exists())  # where the staging directory will be made
    if not parent.is_dir():
        raise OutputWriteError(f"--out {out}: {parent} is a file, not a directory; choose an --out whose parent "
                               "is a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputWriteError(f"--out {out}: {parent} is not writable by this user; choose another --out "
                               "or fix its permissions")
    return target


@contextmanager
def staged_output(out: Path, force: bool):
    """Yield a temporary directory beside `out`; only if the body succeeds (and no stop was asked
    for: `stopping.check`), move any old `out` aside, rename the new one in, then delete the old one
    (never a half-replaced output; see `soup_train.staging`)."""
    with staged(check_output_path(out, force), stopping.check) as tmp:
        yield tmp
