"""The validation callback's failure protocol: a scoring error on the logging rank reaches every rank.

Every other rank waits in the broadcast of the logging rank's result; before, an exception while
scoring left them there until the collective timed out, with no message.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from bionemo_scale.eval import callback as cb


class _FakeGroups:
    @staticmethod
    def get_data_parallel_world_size() -> int:
        return 1


def _setup(
    monkeypatch: pytest.MonkeyPatch, logging_rank: bool, sent: dict | None = None
) -> cb.BiologicalMetricsCallback:
    monkeypatch.setattr(cb, "_ps", lambda: _FakeGroups)
    monkeypatch.setattr(cb, "is_logging_rank", lambda: logging_rank)

    def broadcast(box: list, src: int) -> None:  # what the logging rank sends arrives here
        if sent is not None:
            box[0] = sent
        _setup.last = box[0]

    monkeypatch.setattr(cb.torch.distributed, "broadcast_object_list", broadcast)
    callback = cb.BiologicalMetricsCallback(Path("unused"))
    callback._src = 0
    return callback


def test_the_logging_rank_reraises_after_telling_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    callback = _setup(monkeypatch, logging_rank=True)

    def broken(*args: object) -> None:
        raise ValueError("degenerate metric")

    monkeypatch.setattr(callback, "_score", broken)
    with pytest.raises(ValueError, match="degenerate metric"):
        callback._gather_and_score(SimpleNamespace(global_step=3), None, [], {})
    assert _setup.last == {"means": {}, "failure": "ValueError: degenerate metric"}  # what the others get


def test_the_other_ranks_raise_instead_of_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    callback = _setup(monkeypatch, logging_rank=False, sent={"means": {}, "failure": "ValueError: degenerate metric"})
    with pytest.raises(RuntimeError, match=r"failed on the logging rank \(ValueError: degenerate metric\)"):
        callback._gather_and_score(SimpleNamespace(global_step=3), None, [], {})
    ok = _setup(monkeypatch, logging_rank=False, sent={"means": {"pearson_delta": 0.5}, "failure": None})
    assert ok._gather_and_score(SimpleNamespace(global_step=3), None, [], {}) == {"pearson_delta": 0.5}
