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
