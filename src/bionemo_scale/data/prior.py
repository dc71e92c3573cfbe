"""The additive prior: what the additive baseline knows, as a per-(context, perturbation) vector.

For a perturbation p in context c it is the mean pseudobulk delta (perturbed minus control, in
log1p space) of p over the *other* training contexts; a combination A+B never seen elsewhere
gets the sum of its singles' deltas (each from context c when trained there, else averaged
over contexts). This is exactly the additive baseline's shift, and SCALE predicts *on top of*
it: the flow only has to learn how this context deviates from the cross-context average.

Leaving the target context out matters: a training pair must not see its own answer in its
input, or the model learns to copy it and fails on held-out pairs where nothing is there to copy.
Everything is keyed by labels, so a prior travels with a release to other datasets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bionemo_scale.data.index import split_combination
from bionemo_scale.errors import ScaleError

PRIOR_CHUNK_ROWS = 4096  # rows per read while summing groups: bounds AdditivePrior.from_data's memory


@dataclass
class AdditivePrior:
    """Training-pair deltas by (context label, perturbation label)."""

    deltas: dict[tuple[str, str], np.ndarray]
    combo_sep: str = "+"

    @property
    def n_genes(self) -> int:
        return len(next(iter(self.deltas.values())))

    def _mean(self, pert: str, exclude_context: str | None) -> np.ndarray | None:
        rows = [d for (c, p), d in self.deltas.items() if p == pert and c != exclude_context]
        return np.mean(rows, axis=0) if rows else None

    def _single(self, part: str) -> list[str]:
        """Labels of the single-part perturbation whose only part is `part`."""
        return [p for (_, p) in self.deltas if split_combination(p, self.combo_sep) == [part]]

    def vector(self, context: str, pert: str) -> np.ndarray:
        """The additive prior for `pert` in `context` (target context always left out)."""
        return self.composition(context, pert)[0]

    def composition(self, context: str, pert: str) -> tuple[np.ndarray, tuple[str, ...]]:
        """The prior, and the parts whose *in-context* single delta it already contains.

        Those "covered" parts matter to the model: a combination A+B whose singles were trained
        in this context gets δA + δB here, and the part embeddings of A and B (trained on the
        singles, whose own prior is empty when no other context has them) would add their shift
        a second time. With `model.prior_cover` the model drops covered parts from its tokens
        (off by default: it did not raise validation PDCorr on Norman, benchmarks/RESULTS_LOG.md).
        """
        seen = self._mean(pert, exclude_context=context)
        if seen is not None:
            return seen, ()
        parts = split_combination(pert, self.combo_sep)
        shift = np.zeros(self.n_genes)
        covered: list[str] = []
        if len(parts) > 1:
            for part in parts:
                for single in sorted(set(self._single(part)))[:1]:
                    in_context = self.deltas.get((context, single))
                    if in_context is not None:
                        covered.append(part)
                    shift += in_context if in_context is not None else self._mean(single, exclude_context=None)
        return shift, tuple(covered)

    def own(self, context: str, pert: str) -> np.ndarray | None:
        """The pair's own training delta (None for pairs not trained): the self-cover target."""
        return self.deltas.get((context, pert))

    def context_mean(self, context: str) -> np.ndarray:
        """Mean delta of all training perturbations in `context` (the context-mean baseline)."""
        rows = [d for (c, _), d in self.deltas.items() if c == context]
        return np.mean(rows, axis=0) if rows else np.mean(list(self.deltas.values()), axis=0)

    # -- building and persistence --------------------------------------------------------------
    @classmethod
    def from_data(cls, data, split_labels: np.ndarray) -> AdditivePrior:
        """Cell-weighted pseudobulk deltas of every training (context, perturbation) pair."""
        idx = data.index
        g = idx.groups
        ctx, pert = g["context_id"].to_numpy(), g["pert_id"].to_numpy()
        sizes = (g["end"] - g["start"]).to_numpy()

        starts, ends = g["start"].to_numpy(), g["end"].to_numpy()

        def pooled_mean(gids: np.ndarray) -> np.ndarray:
            # Column sums in bounded row chunks: a whole group at once (a control pool can hold
            # millions of cells) costs ~30 bytes of temporaries per stored value, so peak memory
            # would grow with the dataset instead of staying flat.
            total = np.zeros(data.n_genes, dtype=np.float64)
            for i in gids:
                for a in range(int(starts[i]), int(ends[i]), PRIOR_CHUNK_ROWS):
                    rows = np.arange(a, min(a + PRIOR_CHUNK_ROWS, int(ends[i])))
                    total += data.gather_csr(rows).sum(axis=0, dtype=np.float64).A1
            return total / sizes[gids].sum()

        train = np.flatnonzero((split_labels == "train") & ~idx.is_control)
        ctrl = np.flatnonzero(idx.is_control)
        ctrl_mean = {int(c): pooled_mean(ctrl[ctx[ctrl] == c]) for c in np.unique(ctx[ctrl])}
        deltas: dict[tuple[str, str], np.ndarray] = {}
        for c, p in sorted({(int(a), int(b)) for a, b in zip(ctx[train], pert[train], strict=True)}):
            gids = train[(ctx[train] == c) & (pert[train] == p)]
            deltas[(idx.contexts[c], idx.perturbations[p])] = pooled_mean(gids) - ctrl_mean[c]
        if not deltas:
            raise ScaleError("the split has no training pairs to build the additive prior from", "check --split")
        return cls(deltas=deltas, combo_sep=idx.combo_sep)

    def save(self, path: str | Path) -> None:
        keys = list(self.deltas)
        matrix = torch.from_numpy(np.stack([self.deltas[k] for k in keys]).astype(np.float32))
        meta = {"pairs": json.dumps([list(k) for k in keys]), "combo_sep": self.combo_sep}
        save_file({"delta": matrix}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> AdditivePrior:
        path = Path(path)
        if not path.exists():
            raise ScaleError(
                f"{path} does not exist", "the checkpoint was trained with an additive prior: keep prior.safetensors"
            )
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        matrix = load_file(str(path))["delta"].numpy().astype(np.float64)
        pairs = [tuple(p) for p in json.loads(meta["pairs"])]
        return cls(deltas={p: matrix[i] for i, p in enumerate(pairs)}, combo_sep=meta.get("combo_sep", "+"))


class GroupPriors:
    """Prior vectors per group of a dataset, computed once (the sampler's hot path reads them).

    With `cover=True` the parts already inside a group's prior (see `AdditivePrior.composition`)
    are removed from its part ids, at training and prediction alike.
    """

    def __init__(self, prior: AdditivePrior, data, cover: bool = False) -> None:
        self.prior = prior
        self.data = data
        self.cover = cover
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._part_id = {p: i for i, p in enumerate(data.index.parts)}

    def _labels(self, group: int) -> tuple[str, str]:
        idx, g = self.data.index, self.data.index.groups
        return idx.contexts[int(g.at[group, "context_id"])], idx.perturbations[int(g.at[group, "pert_id"])]

    def _entry(self, group: int) -> tuple[np.ndarray, np.ndarray]:
        """(prior vector, covered part ids) of a group, cached: the hot path reads it every step."""
        if group not in self._cache:
            vec, covered = self.prior.composition(*self._labels(group))
            ids = np.array([self._part_id[p] for p in covered if p in self._part_id], dtype=np.int64)
            self._cache[group] = (vec.astype(np.float32), ids)
        return self._cache[group]

    def __call__(self, group: int) -> np.ndarray:
        return self._entry(group)[0]

    def batch(self, groups: torch.Tensor) -> torch.Tensor:
        """[B, G] priors for a batch's `group_id` tensor."""
        return torch.from_numpy(np.stack([self(int(g)) for g in groups.tolist()]))

    def uncover(self, groups: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
        """`parts` ([B, P], padded -1) with each group's covered parts set to -1 (no-op without cover)."""
        if not self.cover:
            return parts
        out = parts.clone()
        for row, g in enumerate(groups.tolist()):
            ids = self._entry(int(g))[1]
            if ids.size:
                out[row][torch.isin(out[row], torch.from_numpy(ids))] = -1
        return out

    def own_batch(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, G] each group's own training delta (zeros when none), [B] whether it has one)."""
        # not cached: a second [groups, G] table would double the cache for an option that is off by default
        owns = [self.prior.own(*self._labels(int(g))) for g in groups.tolist()]
        has = torch.tensor([o is not None for o in owns])
        zeros = np.zeros(self.prior.n_genes, dtype=np.float32)
        own = np.stack([zeros if o is None else o.astype(np.float32) for o in owns])
        return torch.from_numpy(own), has
