"""The ``--out`` folder: checked before any training, so that a run is never lost at the end."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["prepare_out", "discard_out"]


def prepare_out(out: Path, files: list[str], overwrite: bool) -> bool:
    """Make sure ``out`` is a folder this process can write, holding none of ``files``.

    Creates the folder (and its parents) if needed and writes and removes one
    probe file in it: permissions, a read-only file system or a file in the
    way all show up here, before hours of training, and not at the end.

    Args:
        out: the results folder.
        files: the names the command will write there.
        overwrite: whether existing files of a previous run may be replaced.

    Returns:
        True if the folder was created here (so that a failed run can remove it).

    Raises:
        ValueError: ``out`` is a file or cannot be created or written, or it
            holds results of a previous run and ``overwrite`` is False.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"Expected --out to be a folder. Received: --out {out}, which is a file")
    existing = [name for name in files if (out / name).exists()]
    if existing and not overwrite:
        raise ValueError(
            f"Expected an --out folder without earlier results. Received: --out {out}, which "
            f"holds {', '.join(existing)}; pass --overwrite to replace them, or choose another --out"
        )
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".sparsecraft-probe-", dir=out)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise ValueError(
            f"Expected a folder that can be written for --out. Received: --out {out} "
            f"({err.strerror or err})"
        ) from None
    return created


def discard_out(out: Path, created: bool) -> None:
    """Remove ``out`` after a failed run if this run created it and left it empty."""
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()
