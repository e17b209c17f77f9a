"""Atomic writes: at every instant a target path holds its complete old content or its complete new one.

A file is written to a hidden temporary beside the target, flushed to disk, then renamed
over the target with `os.replace` — the way git updates a ref (write `ref.lock`, rename).
A rename within one folder is atomic, so a reader, a crash or a SIGKILL sees one version.

A folder (an adapter checkpoint) cannot be renamed over a non-empty folder, so the new
checkpoint is written to a hidden temporary folder beside the target and the two names are
swapped in one system call (Linux `renameat2(RENAME_EXCHANGE)`, macOS `renamex_np(RENAME_SWAP)`);
the old checkpoint, now at the temporary name, is deleted. The target stays a plain folder,
so `PeftModel.from_pretrained(dir)`, `cm.load_adapter(dir)`, `cp -r` and `zip` see an
ordinary directory. A symlink swapped with `os.replace` is atomic too, but a checkpoint that
is a symlink into a hidden store breaks when copied alone (`cp -r` copies the link) — the
exchange keeps the layout users expect. Where the OS has no exchange call (Windows, some
network filesystems) the old folder is renamed aside to `.NAME.peftc-old` first: a crash
between the two renames leaves the old checkpoint whole at that name, and the next save or
`recover_dir` puts it back.

Every temporary is named `.NAME.peftc-*` in the target's folder, so the next save of the same
target removes whatever an interrupted save left behind (one writer per target at a time).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

TEMP_TAG = ".peftc-"  # hidden temporaries: .NAME.peftc-XXXX.tmp
RENAME_EXCHANGE = 2  # linux/fs.h
RENAME_SWAP = 2  # macOS stdio.h


def temp_prefix(path: Path) -> str:
    return f".{path.name}{TEMP_TAG}"


def old_copy(path: Path) -> Path:
    """Where the old folder waits during a two-rename replace (platforms without an exchange call)."""
    return path.parent / f".{path.name}{TEMP_TAG}old"


def clean_leftovers(path: Path) -> None:
    """Remove the temporaries interrupted saves of `path` left in its folder."""
    recover_dir(path)
    if not path.parent.is_dir():
        return
    for entry in path.parent.glob(glob_escape(temp_prefix(path)) + "*"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def recover_dir(path: Path) -> None:
    """Put back an old checkpoint a two-rename replace left aside when it was interrupted."""
    old = old_copy(path)
    if old.is_dir() and not path.exists():
        os.rename(old, path)


@contextlib.contextmanager
def atomic_file(path, error: type[Exception] = ValueError) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed.

    The temporary is created first, so an unwritable target fails (with `error`) before any slow work.
    """
    path = Path(path)
    if path.is_dir():
        raise error(f"output path {str(path)!r} is a directory; pass a file path inside it, "
                    f"such as {str(path / 'out')!r}")
    _make_parent(path, error)
    clean_leftovers(path)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    except OSError as err:
        raise error(f"cannot write to {str(path)!r}: {err.strerror or err}; choose a writable folder") from err
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_file(tmp)
        # mkstemp makes the file private (0600); give it the target's mode, or the usual 0644
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text: str, error: type[Exception] = ValueError) -> Path:
    with atomic_file(path, error) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path, error: type[Exception] = ValueError) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` in one step."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise error(f"output path {str(path)!r} is a file; a checkpoint is a folder: pass a new folder path")
    _make_parent(path, error)
    clean_leftovers(path)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp"))
    except OSError as err:
        raise error(f"cannot write to {str(path)!r}: {err.strerror or err}; choose a writable folder") from err
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700)
        for f in tmp.iterdir():
            _fsync_file(f)
        _replace_dir(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # on success: the old checkpoint, swapped to this name


def _replace_dir(tmp: Path, path: Path) -> None:
    """Put folder `tmp` at `path`; an existing folder at `path` ends up at `tmp`."""
    if not path.exists():
        os.rename(tmp, path)
        return
    if exchange(tmp, path):
        return
    old = old_copy(path)
    os.rename(path, old)  # from here until the next line the old checkpoint is whole at `old`
    os.rename(tmp, path)
    os.rename(old, tmp)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where this OS or filesystem cannot."""
    libc = _libc()
    try:
        if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
            at_cwd = -100
            done = libc.renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), RENAME_EXCHANGE) == 0
        elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
            done = libc.renamex_np(os.fsencode(a), os.fsencode(b), RENAME_SWAP) == 0
        else:
            return False
    except (OSError, AttributeError):
        return False
    if not done and ctypes.get_errno() not in _UNSUPPORTED:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))
    return done


_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}  # no exchange here: fall back to two renames


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _make_parent(path: Path, error: type[Exception]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise error(f"cannot write to {str(path)!r}: {str(err.filename)!r} is a file, not a folder") from err
    except OSError as err:
        raise error(f"cannot write to {str(path)!r}: {err.strerror or err}; choose a writable folder") from err


def _fsync_file(path: Path) -> None:
    """Flush to disk, so a power cut after the rename cannot leave an empty file at the target."""
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
