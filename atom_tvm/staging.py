"""Write an output directory all at once: build it in a temporary sibling, then rename it into place.

Used by every command that writes a directory (GGUF conversion, package builds), so a failed or
interrupted run leaves nothing half written, and `--force` keeps the old directory until the new
one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from atom_tvm.errors import UserError


def umask() -> int:
    """The process umask (reading it means setting it, so put it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an output path we would clobber, before any slow work is done."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory; choose another -o")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"output directory {out} already exists and is not empty; "
                        "pass --force to replace it or choose another -o")


def _publish_permissions(tmp: Path) -> None:
    # mkdtemp makes a 0700 directory and temp files are 0600: give the result the permissions an
    # ordinary mkdir/open would, so the user who serves a package can read what another built.
    mask = umask()
    os.chmod(tmp, 0o777 & ~mask)
    for f in tmp.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() or os.access(f, os.X_OK) else 0o666) & ~mask)


@contextlib.contextmanager
def staged_output_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `out` when the block completes without error."""
    out = Path(out)
    created_parent = not out.parent.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _publish_permissions(tmp)
        old = None
        if out.is_dir():  # moved aside, not deleted, so a failed rename can put it back
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rmdir(old)
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            if old is not None:
                os.rename(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_parent:
            with contextlib.suppress(OSError):
                out.parent.rmdir()
        raise


@contextlib.contextmanager
def atomic_output(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it vanishes.

    A reader never sees a half-written file, and an interrupted run leaves the old one alone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600; give it the mode open() would
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
