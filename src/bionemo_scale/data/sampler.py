"""Set pairs (control set X0, perturbed set X1) drawn from a processed dataset.

Sample `k` of the stream is a pure function of (seed, epoch, position): the epoch's group
order is a seeded permutation and each set's cells come from an RNG keyed by
(seed, epoch, position). So a sample is the same whichever rank or worker draws it, shards
are disjoint by construction, and resuming from a consumed-samples count replays nothing and
skips nothing.

A batch of B pairs is ONE vectorised gather of 2·B·S rows from the SCDL memmap.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from bionemo_scale.config import SamplerConfig
from bionemo_scale.data.store import ProcessedDataset
from bionemo_scale.errors import ScaleError


@dataclass(frozen=True)
class ControlPool:
    """Concatenated row ranges of the control groups a perturbed group draws from."""

    starts: np.ndarray  # row start of each control group
    offsets: np.ndarray  # cumulative sizes, offsets[0] = 0
    matched_batch: bool

    @property
    def size(self) -> int:
        return int(self.offsets[-1])

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """Map positions in [0, size) to SCDL rows."""
        which = np.searchsorted(self.offsets, positions, side="right") - 1
        return self.starts[which] + (positions - self.offsets[which])


def draw_positions(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """`size` distinct positions from range(n), or with replacement when n < size."""
    if n >= size:
        return rng.choice(n, size=size, replace=False)
    return rng.integers(0, n, size=size)


class SetPairDataset(Dataset):
    """Map-style dataset over an endless, deterministic stream of set pairs.

    `len()` is `epoch_length * num_epochs`; samplers (ours or Megatron's) walk indices in
    order, so the consumed-samples count is the resume state.
    """

    def __init__(self, data: ProcessedDataset, groups: np.ndarray, cfg: SamplerConfig, num_epochs: int = 1000) -> None:
        if cfg.set_size < 1:
            raise ScaleError(f"set size must be >= 1 (got {cfg.set_size})", "set sampler.set_size to a positive value")
        groups = np.asarray(groups, dtype=np.int64)
        if groups.size == 0:
            raise ScaleError(
                "no perturbed groups in this split", "check the split: it selects no (context, perturbation) pair"
            )
        index = data.index
        if index.is_control[groups].any():
            raise ValueError("control groups cannot be targets of a set pair")
        self.data = data
        self.cfg = cfg
        self.groups = groups
        self.num_epochs = num_epochs
        ga = index.group_arrays
        self._start, self._end = ga["start"], ga["end"]
        self._context, self._batch, self._pert, self._dose = ga["context_id"], ga["batch_id"], ga["pert_id"], ga["dose"]
        self._parts = index.parts_matrix()
        sizes = self._end[groups] - self._start[groups]
        repeats = np.maximum(1, np.rint(sizes / cfg.set_size)).astype(np.int64) if cfg.epoch_mode == "cells" else 1
        self.slots = np.repeat(groups, repeats)
        self._pools = {int(g): self._pool_for(int(g)) for g in np.unique(groups)}

    # -- structure ----------------------------------------------------------------------------
    def _pool_for(self, g: int) -> ControlPool:
        index = self.data.index
        ctx, bat = int(self._context[g]), int(self._batch[g])
        by_cb = index.control_groups_by_context_batch
        matched = self.cfg.control_matching == "batch" and (ctx, bat) in by_cb
        gids = by_cb[(ctx, bat)] if matched else index.control_groups_by_context.get(ctx)
        if gids is None or len(gids) == 0:
            raise ScaleError(
                f"context '{index.contexts[ctx]}' has no control cells", "preprocess data that has controls per context"
            )
        sizes = self._end[gids] - self._start[gids]
        return ControlPool(self._start[gids].astype(np.int64), np.concatenate([[0], np.cumsum(sizes)]), matched)

    def control_pool(self, group: int) -> ControlPool:
        """The control cells a perturbed group is paired with."""
        return self._pools[int(group)]

    @property
    def epoch_length(self) -> int:
        return int(self.slots.size)

    def __len__(self) -> int:
        return self.epoch_length * self.num_epochs

    def fallback_groups(self) -> list[int]:
        """Groups whose controls come from the whole context because their batch has none."""
        return [g for g, p in self._pools.items() if self.cfg.control_matching == "batch" and not p.matched_batch]

    @lru_cache(maxsize=4)  # noqa: B019 - a handful of epochs, owned by this dataset
    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed, epoch, 0x5E7]).permutation(self.epoch_length)

    def pair_rows(self, k: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(group, control rows, perturbed rows) of sample k — no expression is read."""
        if not 0 <= k < len(self):
            raise IndexError(k)
        epoch, pos = divmod(k, self.epoch_length)
        g = int(self.slots[self._epoch_order(epoch)[pos]])
        rng = np.random.default_rng([self.cfg.seed, epoch, pos])
        s = self.cfg.set_size
        n = int(self._end[g] - self._start[g])
        pert_rows = self._start[g] + draw_positions(rng, n, s)
        pool = self._pools[g]
        ctrl_rows = pool.rows(draw_positions(rng, pool.size, s))
        return g, ctrl_rows.astype(np.int64), pert_rows.astype(np.int64)

    # -- reading ------------------------------------------------------------------------------
    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([k])[0]

    def __getitems__(self, ks: list[int]) -> list[dict[str, torch.Tensor]]:
        """All pairs of a batch with one gather (torch's DataLoader calls this when present)."""
        specs = [self.pair_rows(int(k)) for k in ks]
        s = self.cfg.set_size
        rows = np.concatenate([np.concatenate([c, p]) for _, c, p in specs])
        expr = torch.from_numpy(self.data.gather(rows)).view(len(specs), 2, s, -1)
        out = []
        for i, (k, (g, ctrl_rows, pert_rows)) in enumerate(zip(ks, specs, strict=True)):
            out.append(
                {
                    "index": torch.tensor(int(k), dtype=torch.long),
                    "ctrl": expr[i, 0],
                    "pert": expr[i, 1],
                    "pert_id": torch.tensor(self._pert[g], dtype=torch.long),
                    "context_id": torch.tensor(self._context[g], dtype=torch.long),
                    "batch_id": torch.tensor(self._batch[g], dtype=torch.long),
                    "dose": torch.tensor(self._dose[g], dtype=torch.float32),
                    "parts": torch.from_numpy(self._parts[self._pert[g]]),
                    "group_id": torch.tensor(g, dtype=torch.long),
                    "ctrl_rows": torch.from_numpy(ctrl_rows),
                    "pert_rows": torch.from_numpy(pert_rows),
                }
            )
        return out


class ShardedSetSampler(Sampler[int]):
    """Indices for one data-parallel rank, in Megatron's blocked layout, from a resume point.

    Each global step takes `micro_batch_size * world_size` consecutive indices; rank r gets
    the r-th block of `micro_batch_size`. This matches Megatron's pretraining sampler, so a
    run draws the same pairs with or without NeMo.
    """

    def __init__(
        self, total: int, rank: int = 0, world_size: int = 1, micro_batch_size: int = 1, consumed_samples: int = 0
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        step = micro_batch_size * world_size
        if consumed_samples % step:
            raise ScaleError(
                f"consumed_samples={consumed_samples} is not a multiple of micro_batch_size × world_size = {step}",
                "resume with the same batch size and data-parallel size as the original run",
            )
        self.total, self.rank, self.world, self.mbs, self.consumed = (
            total,
            rank,
            world_size,
            micro_batch_size,
            consumed_samples,
        )

    def __iter__(self) -> Iterator[int]:
        step = self.mbs * self.world
        for base in range(self.consumed, self.total - step + 1, step):
            lo = base + self.rank * self.mbs
            yield from range(lo, lo + self.mbs)

    def __len__(self) -> int:
        return ((self.total - self.consumed) // (self.mbs * self.world)) * self.mbs
