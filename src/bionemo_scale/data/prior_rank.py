"""Low-rank denoising of the additive prior: project it onto the main directions of the training deltas.

A held-out pair's additive prior is an average of a few noisy pseudobulk deltas (the same
perturbation in the other contexts). Perturbation responses share a few programs, so the training
deltas span a low-dimensional subspace and most of what lies outside it is sampling noise.
Projecting the prior onto the top-k right singular vectors of the training delta matrix keeps the
shared programs and drops that noise.

k is a model choice, not a free parameter tuned on test pairs: `choose_rank` picks it by K-fold
cross-validation over the *training* pairs (each fold's basis is built without that fold's
deltas, and each pair is scored by the Pearson correlation of its projected leave-context-out
prior with its own delta, which is what PDCorr measures on held-out pairs).

A training pair's prior is projected onto a basis built *without its own delta*
(`leave_one_out_basis`): a held-out pair's own delta is never in the basis, so a basis that
contained the training pair's would make training priors look better than held-out ones, and
the model would learn to trust its prior more than it should.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

RANK_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
CV_FOLDS = 5
CV_SEED = 0
# Directions kept beyond the rank for the leave-one-out bases: with 2k + 64 the downdate is exact
# whenever the training deltas have at most that many non-zero singular values (every bundled
# case), and beyond it ignores only the pair's component along weak directions.
SPECTRUM_MARGIN = 64
ZERO_EIGENVALUE = 1e-10  # relative to the largest: directions below it are numerically absent


def spectrum_size(rank: int) -> int:
    """How many directions to keep for leave-one-out bases of rank `rank`."""
    return 2 * rank + SPECTRUM_MARGIN


def top_spectrum(deltas: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(values [m], vectors [m, G]): the top-`count` eigenpairs of DᵀD for `deltas` D [pairs, G].

    The vectors are D's top right singular vectors and the values its squared singular values.
    Not centred: the mean response direction (e.g. a shared stress program) is signal too.
    Directions with a (numerically) zero value are dropped, so m ≤ rank of D.
    """
    if deltas.ndim != 2 or deltas.shape[0] == 0:
        raise ValueError(f"deltas must be a non-empty [pairs, genes] matrix, got shape {deltas.shape}")
    deltas = np.asarray(deltas, dtype=np.float64)
    if deltas.shape[0] > deltas.shape[1]:  # more pairs than genes (Tahoe scale): the G x G Gram is cheaper
        values, vectors = np.linalg.eigh(deltas.T @ deltas)
        order = np.argsort(values)[::-1]
        values, vectors = values[order], vectors[:, order].T
    else:
        _, s, vectors = np.linalg.svd(deltas, full_matrices=False)
        values = s**2
    keep = values > ZERO_EIGENVALUE * max(float(values[0]), 1e-300)
    return values[keep][:count], vectors[keep][:count]


def low_rank_basis(deltas: np.ndarray, rank: int) -> np.ndarray:
    """[k, G] orthonormal rows: the top-`rank` right singular vectors of `deltas` [pairs, G]."""
    return top_spectrum(deltas, rank)[1]


def top_directions(gram: np.ndarray, rank: int) -> np.ndarray:
    """[k, G]: the top eigenvectors of a Gram matrix DᵀD, i.e. the top right singular vectors of D.

    Directions with a (numerically) zero eigenvalue are not returned, so k ≤ rank of D, as
    with the SVD.
    """
    values, vectors = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1]
    order = order[values[order] > ZERO_EIGENVALUE * max(float(values[order[0]]), 1e-300)][:rank]
    return vectors[:, order].T


def leave_one_out_basis(values: np.ndarray, vectors: np.ndarray, delta: np.ndarray, rank: int) -> np.ndarray:
    """[k, G]: the top-`rank` basis of the deltas *without* `delta`, from their spectrum.

    Removing a row d from D changes the Gram matrix to DᵀD − ddᵀ. In the coordinates of the kept
    directions that is diag(values) − ssᵀ with s = vectors·d, an m x m problem however many pairs
    and genes there are. Exact when `vectors` span every non-zero direction of D (d lies in that
    span); otherwise the part of d outside it, along directions weaker than the kept ones, is
    ignored.
    """
    coords = vectors @ delta
    down_values, rotation = np.linalg.eigh(np.diag(values) - np.outer(coords, coords))
    order = np.argsort(down_values)[::-1]
    order = order[down_values[order] > ZERO_EIGENVALUE * max(float(down_values[order[0]]), 1e-300)][:rank]
    return rotation[:, order].T @ vectors


def project(vector: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """`vector` restricted to the span of the rows of `basis`."""
    return basis.T @ (basis @ vector)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a @ a) * (b @ b)))
    return float(a @ b) / denom if denom > 0 else float("nan")


def rank_scores(
    deltas: np.ndarray,
    priors: np.ndarray,
    ranks: Sequence[int],
    folds: int = CV_FOLDS,
    seed: int = CV_SEED,
) -> dict[int | None, float]:
    """Mean cross-validated Pearson(projected prior, own delta) per rank; key None = no projection.

    `deltas[i]` is training pair i's observed delta, `priors[i]` its leave-context-out prior.
    Pairs whose prior is all zero (nothing known elsewhere) carry no information and are skipped.
    """
    deltas = np.asarray(deltas, dtype=np.float64)
    usable = np.flatnonzero(np.abs(priors).sum(axis=1) > 0)
    fold_of = np.random.default_rng(seed).permutation(usable.size) % folds
    scores: dict[int | None, list[float]] = {r: [] for r in ranks} | {None: []}
    # Many pairs: downdate one Gram matrix per fold instead of copying [pairs, G] for an SVD.
    gram = deltas.T @ deltas if deltas.shape[0] > deltas.shape[1] else None
    for f in range(folds):
        held = usable[fold_of == f]
        if held.size == 0:
            continue
        keep = np.setdiff1d(np.arange(deltas.shape[0]), held)
        if keep.size == 0:
            continue
        if gram is not None:
            vt = top_directions(gram - deltas[held].T @ deltas[held], max(ranks))
        else:
            vt = low_rank_basis(deltas[keep], max(ranks))
        for i in held:
            scores[None].append(_pearson(priors[i], deltas[i]))
            for r in ranks:
                scores[r].append(_pearson(project(priors[i], vt[:r]), deltas[i]))
    return {r: _nanmean(v) for r, v in scores.items()}


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def choose_rank(
    deltas: np.ndarray, priors: np.ndarray, grid: Sequence[int] = RANK_GRID
) -> tuple[int | None, dict[int | None, float]]:
    """(best rank by cross-validation, or None when no projection beats the raw prior; all scores)."""
    n_keep = deltas.shape[0] - -(-deltas.shape[0] // CV_FOLDS)
    ranks = [r for r in grid if r < min(n_keep, deltas.shape[1])]
    if not ranks or int((np.abs(priors).sum(axis=1) > 0).sum()) < CV_FOLDS:
        return None, {}
    scores = rank_scores(deltas, priors, ranks)
    best = max(scores, key=lambda r: -np.inf if np.isnan(scores[r]) else scores[r])
    logger.info(
        "prior rank by %d-fold CV on training pairs: %s (%s)",
        CV_FOLDS,
        best if best is not None else "none",
        ", ".join(f"{'full' if r is None else r}: {s:.3f}" for r, s in scores.items()),
    )
    return best, scores


def resolve_rank(rank: int | str | None, deltas: np.ndarray, priors_of: Callable[[], np.ndarray]) -> int | None:
    """The rank to use for a config value: None/0 = off, an int as given, "auto" = `choose_rank`."""
    if rank is None or rank == 0:
        return None
    if rank == "auto":
        return choose_rank(deltas, priors_of())[0]
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"prior rank must be a positive integer, 'auto' or None, not {rank!r}")
    return rank
