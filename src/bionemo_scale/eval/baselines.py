"""Reference predictors that every report shows beside the model.

Simple baselines are hard to beat (Ahlmann-Eltze et al., Nat Methods 2025; VCC 2025), so they
are first-class predictors with the same interface and the same control cells as SCALE:

- control:      the control cells themselves (no effect);
- additive:     control cells + the perturbation's mean delta over the training contexts; a
                combination never seen in training gets the sum of its parts' deltas (each taken
                in the target context when trained there, else averaged over contexts);
- context-mean: control cells + the mean delta of all training perturbations in the target
                context (the same shift for every perturbation).

Deltas are differences of pseudobulk means of log1p expression, training pairs only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from bionemo_scale.data.store import ProcessedDataset
from bionemo_scale.errors import ScaleError

BaselineMethod = Literal["control", "additive", "context-mean"]
METHODS: tuple[str, ...] = ("control", "additive", "context-mean")


@dataclass
class TrainingDeltas:
    """Pseudobulk deltas of training (context, perturbation) pairs against their context's controls."""

    delta: dict[tuple[int, int], np.ndarray]  # (context, pert) -> [G]
    context_mean_delta: dict[int, np.ndarray]  # context -> mean delta over its training perts
    global_mean_delta: np.ndarray

    def pert_mean(self, pert: int, exclude_context: int | None = None) -> np.ndarray | None:
        rows = [d for (c, p), d in self.delta.items() if p == pert and c != exclude_context]
        return np.mean(rows, axis=0) if rows else None


def _group_means(data: ProcessedDataset, groups: np.ndarray) -> dict[int, tuple[np.ndarray, int]]:
    out = {}
    for g in groups:
        rows = data.group_rows(int(g))
        out[int(g)] = (data.gather_csr(rows).mean(axis=0).A1.astype(np.float64), rows.size)
    return out


def training_deltas(data: ProcessedDataset, split_labels: np.ndarray) -> TrainingDeltas:
    """Cell-weighted pseudobulk means per (context, perturbation), minus the context's control mean."""
    idx = data.index
    g = idx.groups
    ctx, pert = g["context_id"].to_numpy(), g["pert_id"].to_numpy()
    train = np.flatnonzero((split_labels == "train") & ~idx.is_control)
    ctrl = np.flatnonzero(idx.is_control)
    means = _group_means(data, np.concatenate([train, ctrl]))

    def pooled(gids: np.ndarray) -> np.ndarray:
        w = np.array([means[int(i)][1] for i in gids], dtype=np.float64)
        return np.sum([means[int(i)][0] * wi for i, wi in zip(gids, w, strict=True)], axis=0) / w.sum()

    ctrl_mean = {int(c): pooled(ctrl[ctx[ctrl] == c]) for c in np.unique(ctx[ctrl])}
    delta: dict[tuple[int, int], np.ndarray] = {}
    for c, p in sorted({(int(a), int(b)) for a, b in zip(ctx[train], pert[train], strict=True)}):
        gids = train[(ctx[train] == c) & (pert[train] == p)]
        delta[(c, p)] = pooled(gids) - ctrl_mean[c]
    if not delta:
        raise ScaleError("the split has no training pairs to estimate baseline deltas from", "check --split")
    by_ctx: dict[int, list[np.ndarray]] = {}
    for (c, _), d in delta.items():
        by_ctx.setdefault(c, []).append(d)
    return TrainingDeltas(
        delta=delta,
        context_mean_delta={c: np.mean(v, axis=0) for c, v in by_ctx.items()},
        global_mean_delta=np.mean(list(delta.values()), axis=0),
    )


def additive_delta(deltas: TrainingDeltas, data: ProcessedDataset, context: int, pert: int) -> np.ndarray:
    """The additive baseline's shift for (context, pert)."""
    seen = deltas.pert_mean(pert, exclude_context=context)
    if seen is not None:
        return seen
    parts = data.index.pert_parts[pert]
    if len(parts) > 1:  # compose a combination from its single perturbations
        part_label = {tuple(data.index.pert_parts[p]): p for p in range(1, len(data.index.perturbations))}
        shift = np.zeros(data.n_genes)
        for part in parts:
            single = part_label.get((part,))
            if single is None:
                continue
            in_context = deltas.delta.get((context, single))
            other = deltas.pert_mean(single)
            if in_context is not None:
                shift += in_context
            elif other is not None:
                shift += other
        return shift
    return np.zeros(data.n_genes)


def make_baseline(method: str, data: ProcessedDataset, split_labels: np.ndarray):
    """A predictor (ctrl [B,S,G], conditions) -> [B,S,G] for one baseline method."""
    if method not in METHODS:
        raise ScaleError(f"unknown baseline method '{method}'", f"use one of {list(METHODS)}")
    deltas = training_deltas(data, split_labels)
    cache: dict[tuple[int, int], torch.Tensor] = {}

    def shift_for(context: int, pert: int) -> torch.Tensor:
        key = (context, pert)
        if key not in cache:
            if method == "control":
                d = np.zeros(data.n_genes)
            elif method == "additive":
                d = additive_delta(deltas, data, context, pert)
            else:
                d = deltas.context_mean_delta.get(context, deltas.global_mean_delta)
            cache[key] = torch.from_numpy(np.asarray(d, dtype=np.float32))
        return cache[key]

    def predict(ctrl: torch.Tensor, conditions: dict[str, torch.Tensor]) -> torch.Tensor:
        shifts = torch.stack(
            [
                shift_for(int(c), int(p))
                for c, p in zip(conditions["context_id"].tolist(), conditions["pert_id"].tolist(), strict=True)
            ]
        )
        return (ctrl + shifts[:, None, :]).clamp_min(0.0)

    return predict
