"""Put predicted cells back on the count lattice of the measurement.

A real cell's log1p-normalised value of a gene is either 0 or at least log1p(target_sum /
library size): the value of one count. A model (or a mean-shift baseline) that predicts
continuous values gives most silent genes a tiny positive value: the clamp at 0 keeps the
positive half of the decoder's noise, and a prior shift of 0.001 lifts every cell alike. No
real cell looks like that, and a differential-expression test sees it as a uniform increase of
hundreds of genes that no control expresses (log2 fold change = inf, at the top of every DE
ranking): on Norman19 the real DE genes fell from the top to rank ~380 of ~440 "significant"
genes (benchmarks/RESULTS_LOG.md, "Seventh round").

`sample_sub_count` moves every value strictly between 0 and one count to 0 or to one count,
with the probability that keeps its expected linear expression, so pseudobulk means are
unbiased while each cell becomes a cell the assay could have measured. Values at or above one
count are left alone.

One count's level in a cell is read off the cell itself: its smallest nonzero value (with
hundreds of genes, some gene has exactly one count). A predicted cell takes the level of the
control cell it was predicted from, i.e. the control's library size.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp

LATTICE_STREAM = 0x1A7  # the random stream of the lattice draws, apart from the control-cell draws


def one_count_level(cells: np.ndarray | sp.spmatrix) -> np.ndarray:
    """[n, G] log1p-normalised cells (dense or sparse) -> [n] the value of one count in each: its smallest nonzero value.

    A cell with no nonzero value gets the median level of the others; with no nonzero value
    anywhere the level is NaN: no lattice is known, and `sample_sub_count` leaves such cells alone.
    """
    if sp.issparse(cells):
        m = sp.csr_matrix(cells)
        values = np.where(m.data > 0, m.data, np.inf).astype(np.float64)
        level = np.full(m.shape[0], np.inf)
        stored = np.diff(m.indptr) > 0
        if values.size:
            level[stored] = np.minimum.reduceat(values, m.indptr[:-1][stored])
    else:
        x = np.asarray(cells)
        level = np.where(x > 0, x, np.inf).min(axis=1).astype(np.float64) if x.shape[1] else np.full(x.shape[0], np.inf)
    known = np.isfinite(level)
    fill = float(np.median(level[known])) if known.any() else np.nan
    return np.where(known, level, fill)


def sample_sub_count(x: np.ndarray, level: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Values in (0, level) become `level` with probability expm1(x) / expm1(level), else 0.

    `x` [n, G] predicted log1p values (≥ 0), `level` [n] one count per cell. The expectation of
    expm1(value), the linear expression, is unchanged; values ≥ level and zeros are untouched.
    """
    x = np.asarray(x)
    level = np.asarray(level, dtype=np.float64)
    if x.ndim != 2 or level.shape != (x.shape[0],):
        raise ValueError(f"sample_sub_count needs x [n, G] and level [n]; got {x.shape} and {level.shape}")
    lv = level[:, None]
    sub = (x > 0) & (x < lv) & np.isfinite(lv)
    rows, cols = np.nonzero(sub)  # draws only where needed: [n, G] temporaries would not fit at 20k genes
    out = x.copy()
    if rows.size:
        one = level[rows]
        p_one = np.expm1(x[rows, cols].astype(np.float64)) / np.expm1(one)
        out[rows, cols] = np.where(rng.random(rows.size) < p_one, one, 0.0).astype(x.dtype)
    return out


def lattice_rng(seed: int, group: int) -> np.random.Generator:
    """The generator of one held-out group's lattice draws: fixed by (seed, group) alone, so a
    prediction does not depend on which other groups were predicted or in what order."""
    return np.random.default_rng([seed, group, LATTICE_STREAM])


def put_on_lattice(pred: np.ndarray, ctrl: np.ndarray, seed: int, group: int) -> np.ndarray:
    """Predicted cells [n, G] of one group onto the lattice of their control cells [n, G]."""
    return sample_sub_count(pred, one_count_level(ctrl), lattice_rng(seed, group))


def lattice_of_file(pred: ad.AnnData, seed: int) -> sp.csr_matrix:
    """The X of a PRED.h5ad (predicted cells first, then real controls) with its predicted cells'
    sub-count values on the lattice: for files whose values are not (an ensemble's mean, or
    another model's predictions). Each predicted cell takes the level of its source control
    cell, which the file holds among its real controls (obs `source_row`).
    """
    is_pred = np.asarray(pred.obs["is_prediction"]).astype(bool)
    n_pred = int(is_pred.sum())
    if not is_pred[:n_pred].all():
        raise ValueError("the predicted cells of a PRED.h5ad must come first")
    rows = np.asarray(pred.obs["source_row"]).astype(np.int64)
    X = sp.csr_matrix(pred.X)
    ctrl_level = dict(zip(rows[n_pred:].tolist(), one_count_level(X[n_pred:]).tolist(), strict=True))
    level = np.array([ctrl_level.get(r, np.nan) for r in rows[:n_pred].tolist()])
    sampled = sample_sub_count(X[:n_pred].toarray(), level, np.random.default_rng([seed, LATTICE_STREAM]))
    return sp.vstack([sp.csr_matrix(sampled), X[n_pred:]], format="csr", dtype=np.float32)
