"""The mean of each group's whole control pool: the anchor of population-centred prediction.

A predicted set is built from a random sample of the group's control cells, so its mean carries
that sample's deviation from the pool's mean, and the deviation lands in the predicted shift as
noise. With ~170 cells out of 1,200 on the synthetic screen, that noise costs about 0.07 PDCorr
on validation pairs (benchmarks/RESULTS_LOG.md, ninth round). The real perturbed cells are an
independent sample, so the best guess of their mean rests on the pool's mean, not the sample's:
`model.center_controls` and `baseline --center-controls` move each set onto it.
"""

from __future__ import annotations

import numpy as np
import torch

from bionemo_scale.config import SamplerConfig
from bionemo_scale.data.sampler import ControlPool, SetPairDataset
from bionemo_scale.data.store import ProcessedDataset, mean_of_row_ranges


def pool_mean(data: ProcessedDataset, pool: ControlPool) -> np.ndarray:
    """Mean log-expression of every cell of a control pool (float64 sums, bounded reads)."""
    return mean_of_row_ranges(data, pool.starts, pool.starts + np.diff(pool.offsets))


class GroupControlMeans:
    """[G] pool mean per perturbed group, for the pools the sampler and `predict` draw from.

    Pools are shared by every group of a (context, batch), so each is read once.
    """

    def __init__(self, data: ProcessedDataset, control_matching: str = "batch") -> None:
        self.data = data
        self.control_matching = control_matching
        self._pools: SetPairDataset | None = None  # built on first use, over every perturbed group
        self._by_pool: dict[tuple[int, ...], np.ndarray] = {}
        self._by_group: dict[int, np.ndarray] = {}

    def __call__(self, group: int) -> np.ndarray:
        group = int(group)
        if group not in self._by_group:
            if self._pools is None:
                groups = np.flatnonzero(~self.data.index.is_control)
                cfg = SamplerConfig(set_size=1, control_matching=self.control_matching)
                self._pools = SetPairDataset(self.data, groups, cfg, num_epochs=1)
            pool = self._pools.control_pool(group)
            key = (*pool.starts.tolist(), pool.size)
            if key not in self._by_pool:
                self._by_pool[key] = pool_mean(self.data, pool).astype(np.float32)
            self._by_group[group] = self._by_pool[key]
        return self._by_group[group]

    def batch(self, groups: torch.Tensor) -> torch.Tensor:
        """[B, G] pool means for a batch's `group_id` tensor."""
        return torch.from_numpy(np.stack([self(int(g)) for g in groups.tolist()]))


def center_sets(ctrl: torch.Tensor, control_mean: torch.Tensor) -> torch.Tensor:
    """Control sets [B, S, G] moved so that each set's mean is its pool's mean [B, G] (float32)."""
    ctrl = ctrl.float()
    return ctrl - ctrl.mean(dim=1, keepdim=True) + control_mean.float()[:, None, :]


def group_targets(ctrl: torch.Tensor, n: int, control_mean: torch.Tensor) -> torch.Tensor:
    """Per-set `control_mean` [n_sets, G] that moves a whole predicted group by one vector.

    A group of n cells is predicted as n_sets sets [n_sets, S, G], the last padded with repeats.
    Centring each set on its own mean would leave the returned cells of a padded set off centre;
    moving every set by (pool mean − mean of the group's n sampled cells) centres the group.
    """
    flat = ctrl.float().reshape(-1, ctrl.shape[-1])[:n]
    return control_mean.float() + ctrl.float().mean(dim=1) - flat.mean(dim=0)
