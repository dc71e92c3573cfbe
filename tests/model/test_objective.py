"""The training objective: each term against its formula, and the loss as their weighted sum."""

from __future__ import annotations

import pytest
import torch

from bionemo_scale.config import FlowConfig
from bionemo_scale.flow.losses import energy_distance, rbf_mmd
from bionemo_scale.model.objective import loss_terms
from bionemo_scale.model.scale_model import ScaleOutput

B, S, H, G = 3, 5, 4, 6


def _output(seed: int = 0) -> tuple[ScaleOutput, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    out = ScaleOutput(z1_hat=r(B, S, H), z1=r(B, S, H), z0=r(B, S, H), x1_hat=r(B, S, G), x0_rec=r(B, S, G),
                      x1_rec=r(B, S, G))  # fmt: skip
    return out, r(B, S, G), r(B, S, G)


@pytest.mark.parametrize("distribution", ["energy", "mmd"])
def test_each_term_and_the_weighted_sum(distribution: str) -> None:
    out, ctrl, pert = _output()
    # distinct weights, so that a term dropped or weighted by another's weight is noticed
    flow = FlowConfig(endpoint_weight=1.5, gene_mse_weight=0.7, pseudobulk_weight=10.0, reconstruction_weight=0.3,
                      distribution_weight=0.2, distribution_loss=distribution)  # fmt: skip
    terms = loss_terms(out, ctrl, pert, flow)
    per_set = lambda a, b: ((a - b) ** 2).mean(dim=(1, 2))  # noqa: E731
    expected = {
        "endpoint": per_set(out.z1_hat, out.z1),
        "gene": per_set(out.x1_hat, pert),
        "pseudobulk": ((out.x1_hat.mean(1) - pert.mean(1)) ** 2).mean(-1),
        "reconstruction": 0.5 * per_set(out.x0_rec, ctrl) + 0.5 * per_set(out.x1_rec, pert),
        "distribution": (energy_distance if distribution == "energy" else rbf_mmd)(out.x1_hat, pert),
    }
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value, msg=name)
    weights = {"endpoint": 1.5, "gene": 0.7, "pseudobulk": 10.0, "reconstruction": 0.3, "distribution": 0.2}
    torch.testing.assert_close(terms["loss"], sum(w * expected[k] for k, w in weights.items()))


def test_the_latent_target_carries_no_gradient_unless_asked() -> None:
    out, ctrl, pert = _output(1)
    out.z1.requires_grad_(True)
    out.z1_hat.requires_grad_(True)
    loss_terms(out, ctrl, pert, FlowConfig())["endpoint"].sum().backward()
    assert out.z1.grad is None  # stop_grad_target (default): the encoder is not pulled towards Ẑ1
    out.z1.grad = None
    loss_terms(out, ctrl, pert, FlowConfig(stop_grad_target=False))["endpoint"].sum().backward()
    assert out.z1.grad is not None and out.z1.grad.abs().sum() > 0


def test_without_reconstructions_or_distribution_weight_those_terms_are_zero() -> None:
    out, ctrl, pert = _output(2)
    out.x0_rec = out.x1_rec = None  # inference-style output
    terms = loss_terms(out, ctrl, pert, FlowConfig(distribution_weight=0.0))
    assert torch.equal(terms["reconstruction"], torch.zeros(B)) and torch.equal(terms["distribution"], torch.zeros(B))
