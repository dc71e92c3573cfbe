"""Reference predictors that every report shows beside the model.

Simple baselines are hard to beat (Ahlmann-Eltze et al., Nat Methods 2025; VCC 2025), so they
are first-class predictors with the same interface and the same control cells as SCALE:

- control:      the control cells themselves (no effect);
- additive:     control cells + the perturbation's mean delta over the training contexts; a
                combination never seen in training gets the sum of its parts' deltas (each taken
                in the target context when trained there, else averaged over contexts);
- context-mean: control cells + the mean delta of all training perturbations in the target
                context (the same shift for every perturbation).

Deltas are differences of pseudobulk means of log1p expression over training pairs only; the
additive shift is `bionemo_scale.data.prior.AdditivePrior`, the same vector SCALE builds on.

With `center=True` each control set is first moved onto its pool's mean (the conditions carry
`control_mean`), as `model.center_controls` does for SCALE: the centred additive baseline's
predicted mean is then the pool mean plus the shift, the pseudobulk additive model of the
literature, free of the sampled cells' mean deviation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from bionemo_scale.data.control_means import center_sets
from bionemo_scale.data.prior import AdditivePrior
from bionemo_scale.data.store import ProcessedDataset
from bionemo_scale.errors import ScaleError

BaselineMethod = Literal["control", "additive", "context-mean"]
METHODS: tuple[str, ...] = ("control", "additive", "context-mean")


def make_baseline(
    method: str,
    data: ProcessedDataset,
    split_labels: np.ndarray,
    prior_rank: int | str | None = None,
    center: bool = False,
) -> Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]:
    """A predictor (ctrl [B,S,G], conditions) -> [B,S,G] for one baseline method.

    `prior_rank` denoises the additive shift as `model.prior_rank` does for SCALE: the ablation
    that tells how much of a model's gain over additive is the denoised prior alone.
    """
    if method not in METHODS:
        raise ScaleError(f"unknown baseline method '{method}'", f"use one of {list(METHODS)}")
    prior = AdditivePrior.from_data(data, split_labels).with_rank(prior_rank)
    contexts, perts = data.index.contexts, data.index.perturbations
    cache: dict[tuple[int, int], torch.Tensor] = {}

    def shift_for(context: int, pert: int) -> torch.Tensor:
        key = (context, pert)
        if key not in cache:
            if method == "control":
                d = np.zeros(data.n_genes)
            elif method == "additive":
                d = prior.vector(contexts[context], perts[pert])
            else:
                d = prior.context_mean(contexts[context])
            cache[key] = torch.from_numpy(np.asarray(d, dtype=np.float32))
        return cache[key]

    def predict(ctrl: torch.Tensor, conditions: dict[str, torch.Tensor]) -> torch.Tensor:
        pairs = zip(conditions["context_id"].tolist(), conditions["pert_id"].tolist(), strict=True)
        shifts = torch.stack([shift_for(int(c), int(p)) for c, p in pairs])
        if center:
            if "control_mean" not in conditions:
                raise ScaleError("a centred baseline needs each set's pool mean", "pass control_means to run_predictor")
            ctrl = center_sets(ctrl, conditions["control_mean"])
        return (ctrl + shifts[:, None, :]).clamp_min(0.0)

    return predict
