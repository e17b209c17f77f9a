"""Atomic output: write beside the target, then rename, so a failure leaves nothing at `path`."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from peftc.errors import ExportError


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on success it replaces `path`, on failure it is removed.

    The temporary file is created first, so an unwritable target fails before any slow work.
    """
    if path.is_dir():
        raise ExportError(f"output path {str(path)!r} is a directory; pass a file path such as {str(path / 'model.onnx')!r}")
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise ExportError(f"cannot write to {str(path)!r}: {err.strerror or err}; "
                          "choose an existing, writable folder") from err
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file private (0600); give it the target's mode, or the usual 0644
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
