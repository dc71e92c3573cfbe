"""Atomic outputs: write to a hidden temporary sibling, then rename into place.

A crash or a bad-input error therefore never leaves a half-written file or directory at the
path the user asked for.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bionemo_scale.errors import ScaleError


def check_output_free(path: Path, overwrite: bool, kind: tuple[str, str] | None = None) -> None:
    """Fail early, before any work, when `path` exists and may not be replaced, or cannot be made.

    `kind` = (a file every output of this command has, its description). `--overwrite` then only
    replaces a folder that holds that file: a folder of anything else (the command's own inputs,
    a run, notes) is never deleted by a typo in the output path.
    """
    path = Path(path)
    try:
        if path.is_symlink():  # replacing it would swap the link for a real file or folder, not write the target
            raise ScaleError(
                f"output {path} is a symbolic link (to {os.readlink(path)})",
                "pass the link's target as the output, or remove the link",
            )
        exists = path.exists()
        ancestor = path.parent.absolute()
        while not ancestor.exists():  # the nearest existing folder is where the new ones will be made
            ancestor = ancestor.parent
    except OSError as exc:  # e.g. a parent folder this user may not enter
        raise ScaleError(
            f"cannot check output {path} ({exc.strerror or exc})", "choose an accessible location"
        ) from None
    foreign = exists and kind is not None and path.is_dir() and any(path.iterdir()) and not (path / kind[0]).exists()
    if exists and not overwrite:
        fix = "choose another path" if foreign else "choose another path or pass --overwrite"
        raise ScaleError(f"output {path} already exists", fix)
    if foreign:
        assert kind is not None
        raise ScaleError(
            f"output {path} is a folder that is not a previous {kind[1]} (it has no {kind[0]})",
            "choose another path (--overwrite only replaces a previous output of this command)",
        )
    if not ancestor.is_dir():
        raise ScaleError(f"cannot create output {path}: {ancestor} is a file, not a folder", "choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ScaleError(f"cannot create output {path}: {ancestor} is not writable", "choose a writable location")


# The signal that asked this process to stop (set by the CLI's SIGTERM handler). The handler
# also raises SystemExit, but an exception raised from a signal handler can be swallowed (when it
# fires inside a finaliser or a C callback, Python only prints "Exception ignored"); the flag makes
# sure an interrupted command still never renames its temporary output into place.
_termination: int | None = None


def request_termination(signum: int | None) -> None:
    """Record (or, with None, clear) a termination request: atomic outputs will not be committed."""
    global _termination
    _termination = signum


def termination_requested() -> int | None:
    return _termination


def _stop_if_terminated() -> None:
    if _termination is not None:
        raise SystemExit(128 + _termination)


DATASET = ("manifest.json", "processed dataset")
RELEASE = ("model.safetensors", "release")
EVALUATION = ("agg_results.csv", "evaluation")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike[str], overwrite: bool = False, kind: tuple[str, str] | None = None
) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only if the block succeeds (`kind`: see
    `check_output_free`)."""
    final = Path(path)
    check_output_free(final, overwrite, kind)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any mkdir
    try:
        yield tmp
        _stop_if_terminated()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        tmp.rename(final)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file path in the same directory; renamed onto `path` on success."""
    final = Path(path)
    check_output_free(final, overwrite)
    if final.is_dir():
        raise ScaleError(f"output {final} is a folder, and a file is written there", "give a file path")
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", suffix=final.suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())
    try:
        yield tmp
        _stop_if_terminated()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
