"""Put predicted cells back on the count lattice of the measurement.

A real cell's log1p-normalised value of a gene is either 0 or at least log1p(target_sum /
library size): the value of one count. A model (or a mean-shift baseline) that predicts
continuous values gives most silent genes a tiny positive value: the clamp at 0 keeps the
positive half of the decoder's noise, and a prior shift of 0.001 lifts every cell alike. No
real cell looks like that, and a differential-expression test sees it as a uniform increase of
hundreds of genes that no control expresses (log2 fold change = inf, at the top of every DE
ranking): on Norman19 the real DE genes fell from the top to rank ~380 of ~440 "significant"
genes (benchmarks/RESULTS_LOG.md, "Seventh round").

`sample_sub_count` moves every value x strictly between 0 and one count L to L with
probability expm1(x) / expm1(L), else to 0: the expected *linear* expression (the expected
count) is unchanged. Values at or above one count are left alone. The expected log1p value of
a sub-count x drops, from x to L·expm1(x)/expm1(L) (about 30% less at x = 0.05, L = log 2): a
shrinkage of values below one count, which are mostly the decoder's noise. Keeping the log1p
expectation instead (probability x / L) was tried and did worse on the validation pairs of case
a (RESULTS_LOG.md, seventh round).

One count's level in a cell is read off the cell itself: its smallest nonzero value (with
hundreds of genes, some gene has exactly one count; on a subset of genes, such as HVGs, it
can be a coarser step, which keeps the expectation and only coarsens the lattice). A
predicted cell takes the level of the control cell it was predicted from.

The uniform draws are positional ([n, G] per group, from a generator fixed by (seed, group)),
so a float difference in one value (another device, another precision) changes that value's
outcome only, never the draws of the values after it.
"""

from __future__ import annotations

import logging
import zlib

import anndata as ad
import numpy as np
import scipy.sparse as sp

logger = logging.getLogger(__name__)

LATTICE_STREAM = 0x1A7  # the random stream of the lattice draws, apart from the control-cell draws


def one_count_level(cells: np.ndarray | sp.spmatrix) -> np.ndarray:
    """[n, G] log1p-normalised cells (dense or sparse) -> [n] one count's value in each (its smallest nonzero value).

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

    `x` [n, G] predicted log1p values (≥ 0), `level` [n] one count per cell (NaN: leave the
    cell alone). The expectation of expm1(value), the linear expression, is kept; zeros and
    values at or above one count are untouched.
    """
    x = np.asarray(x)
    level = np.asarray(level, dtype=np.float64)
    if x.ndim != 2 or level.shape != (x.shape[0],):
        raise ValueError(f"sample_sub_count needs x [n, G] and level [n]; got {x.shape} and {level.shape}")
    uniform = rng.random(x.shape, dtype=np.float32)  # positional: one draw per value, used or not
    lv = level[:, None]
    sub = (x > 0) & (x < lv) & np.isfinite(lv)
    # Whole-array arithmetic (faster than gathering the sub-count values by index, and the same
    # float64 operations per value, so the same outcomes); only `sub` positions are used.
    with np.errstate(invalid="ignore", over="ignore"):
        up = uniform < np.expm1(x.astype(np.float64)) / np.expm1(lv)
    return np.where(sub, np.where(up, lv, 0.0).astype(x.dtype), x)


def lattice_rng(seed: int, group: int) -> np.random.Generator:
    """The generator of one held-out group's lattice draws: fixed by (seed, group) alone, so a
    prediction does not depend on which other groups were predicted or in what order."""
    return np.random.default_rng([seed, group, LATTICE_STREAM])


def put_on_lattice(pred: np.ndarray, ctrl: np.ndarray, seed: int, group: int) -> np.ndarray:
    """Predicted cells [n, G] of one group onto the lattice of their control cells [n, G]."""
    return sample_sub_count(pred, one_count_level(ctrl), lattice_rng(seed, group))


GROUP_COLUMNS = ("context", "batch", "perturbation")


def source_levels(pred: ad.AnnData) -> np.ndarray:
    """[n_pred] the one-count level of each predicted cell of a PRED.h5ad: its source control cell's.

    The file holds the predicted cells first, then the real controls, and each predicted cell
    names its control in obs `source_row`. A cell whose control is not in the file takes the
    controls' median level, with a warning.
    """
    is_pred = np.asarray(pred.obs["is_prediction"]).astype(bool)
    n_pred = int(is_pred.sum())
    if not is_pred[:n_pred].all():
        raise ValueError("the predicted cells of a PRED.h5ad must come first")
    rows = np.asarray(pred.obs["source_row"]).astype(np.int64)
    ctrl_levels = one_count_level(sp.csr_matrix(pred.X)[n_pred:])
    level_of = dict(zip(rows[n_pred:].tolist(), ctrl_levels.tolist(), strict=True))
    level = np.array([level_of.get(r, np.nan) for r in rows[:n_pred].tolist()])
    if np.isnan(level).any() and np.isfinite(ctrl_levels).any():
        logger.warning(
            "%d predicted cells have no source control cell in the file: they take the controls' median one-count level",
            int(np.isnan(level).sum()),
        )
        level = np.where(np.isnan(level), float(np.nanmedian(ctrl_levels)), level)
    return level


def lattice_of_file(pred: ad.AnnData, seed: int) -> sp.csr_matrix:
    """The X of a PRED.h5ad (predicted cells first, then real controls) with its predicted cells
    put on the lattice: for files whose values are not (an ensemble's mean, another model's
    predictions).

    Each predicted cell takes the level of its source control cell (`source_levels`). Draws are
    made group by group (context, batch,
    perturbation), each from a generator fixed by the seed and the group's labels, and only one
    group's cells are ever dense.
    """
    level = source_levels(pred)
    n_pred = level.size
    X = sp.csr_matrix(pred.X)
    columns = [c for c in GROUP_COLUMNS if c in pred.obs]
    labels = pred.obs.iloc[:n_pred][columns].astype(str).agg("\t".join, axis=1).to_numpy() if columns else None
    order, blocks = [], []
    for key in np.unique(labels) if labels is not None else [""]:
        cells = np.flatnonzero(labels == key) if labels is not None else np.arange(n_pred)
        rng = np.random.default_rng([seed, LATTICE_STREAM, zlib.crc32(str(key).encode())])
        blocks.append(sp.csr_matrix(sample_sub_count(X[cells].toarray(), level[cells], rng)))
        order.append(cells)
    if not blocks:
        return X.astype(np.float32)
    sampled = sp.vstack(blocks, format="csr")[np.argsort(np.concatenate(order))]
    return sp.vstack([sampled, X[n_pred:]], format="csr", dtype=np.float32)
