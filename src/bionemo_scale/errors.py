"""One exception type for problems the user can fix.

The CLI turns a `ScaleError` into a single line on stderr and a non-zero exit, so every
message must name the problem *and* the fix. Anything else that escapes is a bug and keeps
its traceback.
"""

from __future__ import annotations


class ScaleError(ValueError):
    """A user-facing error: bad input, bad configuration, or a missing resource."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem.rstrip(". ")
        self.fix = fix.rstrip(". ") if fix else None
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.problem if self.fix is None else f"{self.problem}. Fix: {self.fix}"
        text = " ".join(text.split())
        return text if text.endswith(("?", "!")) else text + "."


def read_user_text(path: object, what: str) -> str:
    """The text of a user-supplied file (split, config, gene map), or one clear ScaleError.

    A folder, a binary file (e.g. an .h5ad passed by mistake) or an unreadable file would
    otherwise surface as a Python traceback.
    """
    from pathlib import Path

    p = Path(str(path))
    if not p.exists():
        raise ScaleError(f"{what} {p} does not exist", "check the path")
    if p.is_dir():
        raise ScaleError(f"{what} {p} is a folder, not a file", "pass the file itself")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ScaleError(
            f"{what} {p} is not a UTF-8 text file", "pass the text file (TOML/YAML/TSV) it should be"
        ) from None
    except OSError as exc:
        raise ScaleError(f"cannot read {what} {p} ({exc.strerror or exc})", "check the file's permissions") from None
