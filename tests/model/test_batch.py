"""Flow-batch preparation: randomness keyed by sample index, and the condition dropouts."""

from __future__ import annotations

import torch

from bionemo_scale.config import FlowConfig
from bionemo_scale.model.batch import prepare_flow_batch


def _batch(n: int = 400, s: int = 4, g: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    parts = torch.randint(0, 5, (n, 2), generator=gen)
    parts[::2, 1] = -1  # singles are padded with -1
    return {
        "index": torch.arange(n),
        "ctrl": torch.rand(n, s, g, generator=gen),
        "pert": torch.rand(n, s, g, generator=gen),
        "parts": parts,
        "context_id": torch.randint(0, 3, (n,), generator=gen),
    }


def test_same_sample_index_gives_same_time_whatever_the_batch_order() -> None:
    batch = _batch()
    out = prepare_flow_batch(batch, FlowConfig(), seed=3)
    order = torch.randperm(400)
    shuffled = prepare_flow_batch({k: v[order] for k, v in batch.items()}, FlowConfig(), seed=3)
    torch.testing.assert_close(shuffled["t"], out["t"][order])
    other_seed = prepare_flow_batch(batch, FlowConfig(), seed=4)
    assert not torch.equal(other_seed["t"], out["t"])


def test_pert_dropout_replaces_parts_but_keeps_padding() -> None:
    batch = _batch()
    out = prepare_flow_batch(batch, FlowConfig(), seed=0, pert_dropout=0.5, unknown_part=5)
    dropped = (out["parts"] == 5).any(dim=1)
    assert 0.35 < dropped.float().mean() < 0.65
    # a dropped sample loses every present part, and its padding stays padding
    assert torch.equal(out["parts"][dropped] == -1, batch["parts"][dropped] == -1)
    assert (out["parts"][dropped][batch["parts"][dropped] >= 0] == 5).all()
    assert torch.equal(out["parts"][~dropped], batch["parts"][~dropped])
    assert torch.equal(out["context_id"], batch["context_id"])  # contexts untouched


def test_dropouts_are_off_by_default_and_independent() -> None:
    batch = _batch()
    plain = prepare_flow_batch(batch, FlowConfig(), seed=0)
    assert torch.equal(plain["parts"], batch["parts"])
    both = prepare_flow_batch(
        batch, FlowConfig(), seed=0, context_dropout=0.5, unknown_context=3, pert_dropout=0.5, unknown_part=5
    )
    ctx_drop = both["context_id"] == 3
    pert_drop = (both["parts"] == 5).any(dim=1)
    # separate random streams: the two masks are not the same draw
    assert not torch.equal(ctx_drop, pert_drop)
