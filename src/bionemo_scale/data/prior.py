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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bionemo_scale.data.index import split_combination
from bionemo_scale.data.prior_rank import leave_one_out_basis, project, resolve_rank, spectrum_size, top_spectrum
from bionemo_scale.data.store import mean_of_row_ranges
from bionemo_scale.errors import ScaleError


@dataclass
class AdditivePrior:
    """Training-pair deltas by (context label, perturbation label).

    With a `basis` ([k, G], orthonormal rows) every prior vector is projected onto its span: the
    low-rank denoising of `bionemo_scale.data.prior_rank` (`model.prior_rank`). A training pair's
    prior is projected onto the basis rebuilt without its own delta, from `spectrum` (the deltas'
    top (values, directions)), as a held-out pair's basis never holds its own delta; a prior
    without a spectrum (saved before it existed) projects every pair onto `basis`.
    """

    deltas: dict[tuple[str, str], np.ndarray]
    combo_sep: str = "+"
    basis: np.ndarray | None = None
    spectrum: tuple[np.ndarray, np.ndarray] | None = None
    # lookups by perturbation and by single part, built on first use: a scan of every delta per
    # query would make building the priors of all groups quadratic in the number of pairs
    _by_pert: dict[str, list[tuple[str, np.ndarray]]] | None = field(default=None, init=False, repr=False)
    _singles: dict[str, list[str]] | None = field(default=None, init=False, repr=False)

    @property
    def n_genes(self) -> int:
        return len(next(iter(self.deltas.values())))

    def _index(self) -> None:
        by_pert: dict[str, list[tuple[str, np.ndarray]]] = {}
        singles: dict[str, list[str]] = {}
        for (c, p), d in self.deltas.items():
            by_pert.setdefault(p, []).append((c, d))
            parts = split_combination(p, self.combo_sep)
            if len(parts) == 1:
                singles.setdefault(parts[0], []).append(p)
        self._by_pert, self._singles = by_pert, singles

    def _mean(self, pert: str, exclude_context: str | None) -> np.ndarray | None:
        if self._by_pert is None:
            self._index()
        rows = [d for c, d in self._by_pert.get(pert, ()) if c != exclude_context]  # type: ignore[union-attr]
        return np.mean(rows, axis=0) if rows else None

    def _single(self, part: str) -> list[str]:
        """Labels of the single-part perturbation whose only part is `part` (one per training pair)."""
        if self._singles is None:
            self._index()
        return list(self._singles.get(part, ()))  # type: ignore[union-attr]

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
        shift, covered = self._raw_composition(context, pert)
        basis = self.basis_for(context, pert)
        return (shift if basis is None else project(shift, basis)), covered

    def basis_for(self, context: str, pert: str) -> np.ndarray | None:
        """The basis a pair's prior is projected on: without the pair's own delta when it is a training pair."""
        own = self.deltas.get((context, pert))
        if self.basis is None or own is None or self.spectrum is None:
            return self.basis
        return leave_one_out_basis(*self.spectrum, own, self.basis.shape[0])

    def _raw_composition(self, context: str, pert: str) -> tuple[np.ndarray, tuple[str, ...]]:
        """`composition` before the low-rank projection (what the rank CV scores projections of)."""
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

    # -- low-rank denoising ----------------------------------------------------------------------
    def with_rank(self, rank: int | str | None, leave_one_out: bool = True) -> AdditivePrior:
        """This prior projected onto the top-`rank` directions of its deltas ("auto": chosen by CV).

        Returns `self` unchanged when `rank` is off (None/0) or "auto" finds no rank that beats
        the raw prior on held-out training pairs. `leave_one_out=False` projects training pairs
        onto the full basis too (their own delta is in it; held-out pairs are unaffected).
        """
        keys = sorted(self.deltas)
        matrix = np.stack([self.deltas[k] for k in keys])
        chosen = resolve_rank(rank, matrix, lambda: np.stack([self._raw_composition(*k)[0] for k in keys]))
        if chosen is None:
            return self
        values, vectors = top_spectrum(matrix, spectrum_size(chosen))
        spectrum = (values, vectors) if leave_one_out else None
        return AdditivePrior(self.deltas, self.combo_sep, basis=vectors[:chosen], spectrum=spectrum)

    @property
    def rank(self) -> int | None:
        """Rank of the projection (None: the raw prior)."""
        return None if self.basis is None else int(self.basis.shape[0])

    # -- building and persistence --------------------------------------------------------------
    @classmethod
    def from_data(cls, data, split_labels: np.ndarray) -> AdditivePrior:
        """Cell-weighted pseudobulk deltas of every training (context, perturbation) pair."""
        idx = data.index
        g = idx.groups
        ctx, pert = g["context_id"].to_numpy(), g["pert_id"].to_numpy()

        starts, ends = g["start"].to_numpy(), g["end"].to_numpy()

        def pooled_mean(gids: np.ndarray) -> np.ndarray:
            return mean_of_row_ranges(data, starts[gids], ends[gids])

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
        tensors = {"delta": matrix}
        if self.basis is not None:
            tensors["basis"] = torch.from_numpy(self.basis.astype(np.float32))
        if self.spectrum is not None:
            tensors["spectrum_values"] = torch.from_numpy(self.spectrum[0].astype(np.float64))
            tensors["spectrum_vectors"] = torch.from_numpy(self.spectrum[1].astype(np.float64))
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> AdditivePrior:
        path = Path(path)
        if not path.exists():
            raise ScaleError(
                f"{path} does not exist", "the checkpoint was trained with an additive prior: keep prior.safetensors"
            )
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            tensors = load_file(str(path))
            matrix = tensors["delta"].numpy().astype(np.float64)
            basis = tensors["basis"].numpy().astype(np.float64) if "basis" in tensors else None
            spectrum = (
                (tensors["spectrum_values"].numpy(), tensors["spectrum_vectors"].numpy())
                if "spectrum_values" in tensors
                else None
            )
            pairs = [tuple(p) for p in json.loads(meta["pairs"])]
        except Exception as exc:  # truncated file, foreign safetensors, or missing keys
            raise ScaleError(
                f"{path} is not a readable additive prior ({type(exc).__name__})",
                "restore prior.safetensors from the run or release it came with",
            ) from None
        return cls(
            deltas={p: matrix[i] for i, p in enumerate(pairs)},
            combo_sep=meta.get("combo_sep", "+"),
            basis=basis,
            spectrum=spectrum,
        )


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
