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


def test_prior_self_cover_swaps_the_prior_and_drops_every_part() -> None:
    batch = _batch()
    n, g = batch["ctrl"].shape[0], batch["ctrl"].shape[2]
    batch["prior"] = torch.zeros(n, g)
    batch["prior_self"] = torch.arange(n, dtype=torch.float32)[:, None].expand(n, g).clone()
    batch["prior_self_ok"] = torch.arange(n) % 4 != 0  # a quarter of the sets have no own shift
    out = prepare_flow_batch(batch, FlowConfig(), seed=0, prior_self_rate=0.5)
    swapped = out["prior"].abs().sum(dim=1) > 0
    assert 0.25 < swapped.float().mean() < 0.5
    assert not swapped[~batch["prior_self_ok"]].any()  # never without an own shift
    torch.testing.assert_close(out["prior"][swapped], batch["prior_self"][swapped])
    assert (out["parts"][swapped] == -1).all()
    assert torch.equal(out["parts"][~swapped], batch["parts"][~swapped])
    assert "prior_self" not in out and "prior_self_ok" not in out  # not model inputs
    # off by default, and at prediction the batch keeps its prior
    plain = prepare_flow_batch(batch, FlowConfig(), seed=0)
    assert torch.equal(plain["prior"], batch["prior"]) and torch.equal(plain["parts"], batch["parts"])


def test_training_couples_each_perturbed_set_to_its_control_set() -> None:
    # OT coupling: within each set, the perturbed cells are reordered (a permutation of the same
    # cells) so that the total squared distance to the control cells is minimal; identity leaves them
    import itertools

    batch = _batch(n=6, s=4, g=3)
    out = prepare_flow_batch(batch, FlowConfig(coupling="ot"), seed=0)
    for i in range(6):
        ctrl, pert, paired = batch["ctrl"][i], batch["pert"][i], out["pert"][i]
        rows = [int(torch.nonzero((pert == row).all(dim=1))[0]) for row in paired]
        assert sorted(rows) == list(range(4))  # the same cells, reordered
        costs = {order: float(((ctrl - pert[list(order)]) ** 2).sum()) for order in itertools.permutations(range(4))}
        assert costs[tuple(rows)] == min(costs.values())
    assert not torch.equal(out["pert"], batch["pert"])  # some set was reordered
    same = prepare_flow_batch(batch, FlowConfig(coupling="identity"), seed=0)
    torch.testing.assert_close(same["pert"], batch["pert"])
    # at evaluation time nothing is reordered
    torch.testing.assert_close(prepare_flow_batch(batch, FlowConfig(), seed=0, training=False)["pert"], batch["pert"])
