"""Expression normalisation and highly-variable-gene selection, as pure chunk functions.

Every function here works on one CSR chunk (or on accumulated per-gene sums), so that
preprocessing a 100M-cell file needs memory proportional to the chunk, not the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from bionemo_scale.errors import ScaleError

InputKind = Literal["counts", "log1p"]

#: log1p(normalize_total(1e4)) cannot exceed log1p(1e4) ≈ 9.2; anything far above that is not log data.
MAX_PLAUSIBLE_LOG1P = 20.0


def check_finite_nonnegative(chunk: sp.csr_matrix, first_row: int, path_name: str) -> None:
    """Reject NaN, inf and negative values with the first offending cell named."""
    values = chunk.data
    bad = ~np.isfinite(values) | (values < 0)
    if not bad.any():
        return
    pos = int(np.flatnonzero(bad)[0])
    row = int(np.searchsorted(chunk.indptr, pos, side="right") - 1) + first_row
    value = values[pos]
    kind = "NaN" if np.isnan(value) else ("infinite" if np.isinf(value) else "negative")
    raise ScaleError(
        f"{path_name} has a {kind} expression value ({value}) in cell row {row}",
        "remove or repair such cells before preprocessing (expression must be finite and >= 0)",
    )


# Below this share of non-integer stored values, non-integer X is damaged counts, not log1p.
MIN_FRACTIONAL_SHARE = 0.5


def is_integer_valued(chunk: sp.csr_matrix) -> bool:
    values = chunk.data
    return bool(np.all(values == np.round(values)))


def detect_input_kind(chunk: sp.csr_matrix, path_name: str) -> InputKind:
    """Decide from a sample whether X holds raw counts or log-normalised values.

    Integer data is treated as counts. Non-integer data is accepted as log1p-normalised only
    when its range is plausible for log data; linear normalised data is rejected because
    log-transforming it silently would change what the user thinks they trained on.
    """
    if chunk.nnz == 0:
        raise ScaleError(f"{path_name}: the first cells have no expression at all", "check that X holds expression")
    if is_integer_valued(chunk):
        return "counts"
    fractional = chunk.data != np.round(chunk.data)
    if fractional.mean() < MIN_FRACTIONAL_SHARE:
        # log1p of normalised counts is almost never a whole number; counts with a few stray
        # fractions are damaged counts, and taking them for log1p would skip normalisation
        row = int(np.searchsorted(chunk.indptr, int(np.flatnonzero(fractional)[0]), side="right") - 1)
        raise ScaleError(
            f"{path_name}: X holds integer counts with a few non-integer values ({int(fractional.sum())} of "
            f"{fractional.size} stored values, the first in row {row})",
            "provide raw counts (all whole numbers) or log1p-normalised values",
        )
    check_log1p_range(chunk, 0, path_name)
    return "log1p"


def check_log1p_range(chunk: sp.csr_matrix, start: int, path_name: str) -> None:
    """Every chunk of a log1p input must stay in log range (not only the first one detection saw)."""
    if chunk.nnz == 0:
        return
    vmax = float(chunk.data.max())
    if vmax > MAX_PLAUSIBLE_LOG1P:
        where = f"rows from {start} hold" if start else "X is non-integer with"
        raise ScaleError(
            f"{path_name}: {where} values up to {vmax:.1f}, so it looks normalised but not log-transformed",
            "provide raw counts, or log1p(normalize_total) values in every row",
        )


def normalize_log1p(chunk: sp.csr_matrix, target_sum: float) -> sp.csr_matrix:
    """normalize_total(target_sum) then log1p, row by row (the scanpy convention).

    Cells with zero total counts stay all-zero instead of producing NaN.
    """
    chunk = chunk.astype(np.float64, copy=True)
    totals = np.asarray(chunk.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    chunk.data *= np.repeat(scale, np.diff(chunk.indptr))
    np.log1p(chunk.data, out=chunk.data)
    return chunk


def to_log1p(chunk: sp.csr_matrix, kind: InputKind, target_sum: float) -> sp.csr_matrix:
    return normalize_log1p(chunk, target_sum) if kind == "counts" else chunk


@dataclass
class GeneMoments:
    """Streaming per-gene sums of expm1(log1p data), enough for Seurat-flavour dispersions."""

    n_genes: int
    n_cells: int = 0
    s1: np.ndarray = field(init=False)
    s2: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.s1 = np.zeros(self.n_genes, dtype=np.float64)
        self.s2 = np.zeros(self.n_genes, dtype=np.float64)

    def update(self, log_chunk: sp.csr_matrix) -> None:
        lin = log_chunk.copy()
        np.expm1(lin.data, out=lin.data)
        self.n_cells += lin.shape[0]
        self.s1 += np.bincount(lin.indices, weights=lin.data, minlength=self.n_genes)
        self.s2 += np.bincount(lin.indices, weights=lin.data * lin.data, minlength=self.n_genes)

    def mean_var(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased (ddof=1) variance, as scanpy's `_get_mean_var` reports them."""
        n = self.n_cells
        mean = self.s1 / n
        var = np.maximum(self.s2 / n - mean**2, 0.0)
        if n > 1:
            var *= n / (n - 1)
        return mean, var


def seurat_dispersion_norm(mean: np.ndarray, var: np.ndarray, n_bins: int = 20) -> np.ndarray:
    """Normalised dispersion per gene: Seurat v2 / scanpy `flavor="seurat"` semantics.

    Dispersion is log(var/mean) on linear scale; genes are binned by log1p(mean) into
    `n_bins` equal-width bins and the dispersion is z-scored within its bin. A gene alone in
    its bin gets a normalised dispersion of 1 (scanpy's convention).
    """
    mean = mean.astype(np.float64, copy=True)
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = var / mean
        disp[disp == 0] = np.nan
        disp = np.log(disp)
    log_mean = np.log1p(mean)
    bins = pd.cut(pd.Series(log_mean), bins=n_bins)
    grouped = pd.Series(disp).groupby(bins, observed=True)
    avg = grouped.transform("mean").to_numpy()
    dev = grouped.transform("std").to_numpy()
    single = np.isnan(dev) & ~np.isnan(avg)
    dev[single] = avg[single]
    avg[single] = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return (disp - avg) / dev


def select_top_genes(dispersion_norm: np.ndarray, n_top: int) -> np.ndarray:
    """Indices (ascending) of the `n_top` genes by normalised dispersion; ties at the cutoff are kept."""
    finite = dispersion_norm[~np.isnan(dispersion_norm)]
    n_top = min(n_top, finite.size)
    if n_top <= 0:
        raise ScaleError("no gene has a defined dispersion, so no HVG can be selected", "drop --hvg or check the data")
    cutoff = np.sort(finite)[::-1][n_top - 1]
    return np.flatnonzero(np.nan_to_num(dispersion_norm, nan=-np.inf) >= cutoff)
