"""SCALE's training objective: endpoint, reconstruction and distributional terms, per set.

    endpoint       ‖Ẑ1 − sg(Z1)‖²             latent endpoint supervision (matched cells)
    gene           ‖X̂1 − X1‖²                 the same endpoint, decoded, in gene space
    pseudobulk     ‖mean(X̂1) − mean(X1)‖²     the population response, free of cell-level noise
    reconstruction ½‖dec(Z0) − X0‖² + ½‖dec(Z1) − X1‖²
    distribution   ED(X̂1, X1) or MMD²          set-level: substates and partial responders

All terms are returned per set ([B]) so the loss reduction can weight microbatches and
data-parallel ranks by the number of sets they hold.
"""

from __future__ import annotations

import torch

from bionemo_scale.config import FlowConfig
from bionemo_scale.flow.losses import energy_distance, rbf_mmd
from bionemo_scale.model.scale_model import ScaleOutput


def _per_set_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).square().mean(dim=(-1, -2))


def loss_terms(out: ScaleOutput, ctrl: torch.Tensor, pert: torch.Tensor, flow: FlowConfig) -> dict[str, torch.Tensor]:
    """Every term per set ([B]) plus their weighted sum under 'loss'."""
    target = out.z1.detach() if flow.stop_grad_target else out.z1
    terms = {
        "endpoint": _per_set_mse(out.z1_hat, target),
        "gene": _per_set_mse(out.x1_hat, pert),
        "pseudobulk": (out.x1_hat.float().mean(dim=1) - pert.float().mean(dim=1)).square().mean(dim=-1),
    }
    if out.x0_rec is not None and out.x1_rec is not None:
        terms["reconstruction"] = 0.5 * (_per_set_mse(out.x0_rec, ctrl) + _per_set_mse(out.x1_rec, pert))
    else:
        terms["reconstruction"] = torch.zeros_like(terms["endpoint"])
    if flow.distribution_weight > 0:
        dist = energy_distance if flow.distribution_loss == "energy" else rbf_mmd
        terms["distribution"] = dist(out.x1_hat.float(), pert.float())
    else:
        terms["distribution"] = torch.zeros_like(terms["endpoint"])
    terms["loss"] = (
        flow.endpoint_weight * terms["endpoint"]
        + flow.gene_mse_weight * terms["gene"]
        + flow.pseudobulk_weight * terms["pseudobulk"]
        + flow.reconstruction_weight * terms["reconstruction"]
        + flow.distribution_weight * terms["distribution"]
    )
    return terms
