"""cell-eval 0.8.2 metrics, vectorised across perturbations.

Every metric follows cell-eval's definition, including the details that move numbers:

- **Pseudobulk** is the arithmetic mean of each perturbation's cells. The *predicted* delta
  subtracts the mean of the *predicted* control cells, the real delta the real control mean.
- **DE** comes from `bionemo_scale.eval.de` (pdex `ref` mode) run separately on the real and
  on the predicted cells. cell-eval stores the DE tables as float32, so significance
  (`fdr < 0.05`) and the |log2FC| ranking are judged on float32 values here too; ties in
  |log2FC| keep gene order (polars' ordinal rank).
- `overlap_at_N` takes N = the number of real significant genes of that perturbation;
  `precision_at_N` takes N = the number of predicted significant genes. `_at_K` caps N at K.
- `pr_auc` / `roc_auc` label a gene positive when its real FDR < 0.05 and score it with
  −log10(clip(pred FDR, 1e-10, 1)) in float32.
- `discrimination_score_*` ranks the true perturbation's real delta among all real deltas by
  distance to the predicted delta (the target gene's column left out when the perturbation
  is named after a gene): 1 − rank/P, so 1 is best.
- `pearson_edistance` correlates, across perturbations, the energy distance of real cells
  to real controls with that of predicted cells to predicted controls.

Missing values follow cell-eval's frame: *null* where a metric is not defined for a
perturbation (no significant real DE genes), NaN where it is defined but degenerate
(a constant vector in a correlation). `compute_metrics` returns nullable Float64 columns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from bionemo_scale.eval.de import DEResult, differential_expression, group_means

logger = logging.getLogger(__name__)

Matrix = np.ndarray | sp.spmatrix

DE_METRICS: tuple[str, ...] = (
    *(f"overlap_at_{k}" for k in ("N", 50, 100, 200, 500)),
    *(f"precision_at_{k}" for k in ("N", 50, 100, 200, 500)),
    "de_spearman_sig",
    "de_direction_match",
    "de_spearman_lfc_sig",
    "de_sig_genes_recall",
    "de_nsig_counts_real",
    "de_nsig_counts_pred",
    "pr_auc",
    "roc_auc",
)
ANNDATA_METRICS: tuple[str, ...] = (
    "pearson_delta",
    "mse",
    "mae",
    "mse_delta",
    "mae_delta",
    "discrimination_score_l1",
    "discrimination_score_l2",
    "discrimination_score_cosine",
    "pearson_edistance",
)
# Column order of cell-eval's results.csv for each profile (cell-eval computes the DE metrics
# first, then the AnnData ones). cell-eval's `clustering_agreement` (Leiden clustering of
# centroids, needs python-igraph) is not implemented.
PROFILES: dict[str, tuple[str, ...]] = {
    "full": DE_METRICS + ANNDATA_METRICS,
    "de": DE_METRICS,
    "anndata": ANNDATA_METRICS,
    "minimal": (
        "overlap_at_N",
        "precision_at_N",
        "de_nsig_counts_real",
        "de_nsig_counts_pred",
        "pearson_delta",
        "mse",
        "mae",
        "discrimination_score_l1",
    ),
    "vcc": ("overlap_at_N", "mae", "discrimination_score_l1"),
    # No DE and no cell-level distances: pseudobulk metrics only, cheap enough for every
    # validation pass.
    "fast": ("pearson_delta", "mse", "mae", "mse_delta", "mae_delta", "discrimination_score_l1"),
}
# Per-perturbation energy distances, written beside results.csv (not cell-eval columns).
EXTRA_METRICS: tuple[str, ...] = ("edistance_real", "edistance_pred", "edistance_pred_real")
HIGHER_IS_BETTER: dict[str, bool] = {
    **{m: True for m in DE_METRICS if not m.startswith("de_nsig")},
    **{m: True for m in ANNDATA_METRICS},
    "mse": False,
    "mae": False,
    "mse_delta": False,
    "mae_delta": False,
}
_AUC_FDR = 0.05  # cell-eval labels real DE genes at 0.05 for the AUCs, whatever fdr_threshold says


# --------------------------------------------------------------------------- pseudobulk


@dataclass(frozen=True)
class Pseudobulk:
    """Mean expression per perturbation (P, G) and of the control cells (G,), both sides."""

    perts: np.ndarray
    real: np.ndarray
    real_ctrl: np.ndarray
    pred: np.ndarray
    pred_ctrl: np.ndarray

    @property
    def real_delta(self) -> np.ndarray:
        return self.real - self.real_ctrl[None, :]

    @property
    def pred_delta(self) -> np.ndarray:
        """Predicted perturbation mean minus the *predicted* control mean, as cell-eval does."""
        return self.pred - self.pred_ctrl[None, :]


def label_codes(labels: np.ndarray, perts: np.ndarray, control: str) -> np.ndarray:
    """Per-cell index into `perts`, len(perts) for control cells, -1 for anything else."""
    labels = np.asarray(labels).astype(str)
    codes = pd.Index(perts).get_indexer(labels).astype(np.int64)
    codes[labels == control] = len(perts)
    return codes


def pseudobulk(
    real_X: Matrix, real_labels: np.ndarray, pred_X: Matrix, pred_labels: np.ndarray, perts: np.ndarray, control: str
) -> Pseudobulk:
    """Arithmetic-mean pseudobulks of every perturbation and of the control, real and predicted."""
    n = len(perts)
    real = group_means(real_X, label_codes(real_labels, perts, control), n + 1)
    pred = group_means(pred_X, label_codes(pred_labels, perts, control), n + 1)
    return Pseudobulk(perts=np.asarray(perts), real=real[:n], real_ctrl=real[n], pred=pred[:n], pred_ctrl=pred[n])


# --------------------------------------------------------------------------- vector metrics


def pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row of x with the same row of y; NaN where a row is constant."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    xm = x - x.mean(axis=-1, keepdims=True)
    ym = y - y.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xm * ym).sum(-1) / np.sqrt((xm * xm).sum(-1) * (ym * ym).sum(-1))
    constant = (x == x[..., :1]).all(-1) | (y == y[..., :1]).all(-1)
    r = np.clip(r, -1.0, 1.0)
    r[constant] = np.nan
    return r


def pearson_delta(pb: Pseudobulk) -> np.ndarray:
    """Pearson r between predicted and real deltas from control (PDCorr), per perturbation.

    A predicted delta that is only rounding error (a "no change" prediction, whose two means
    differ in the last bits) is treated as constant, giving NaN rather than the correlation
    of floating-point noise that scipy would return.
    """
    r = pearson_rows(pb.pred_delta, pb.real_delta)
    scale = np.maximum(np.abs(pb.pred).max(-1), np.abs(pb.pred_ctrl).max())
    r[np.abs(pb.pred_delta).max(-1) <= 1e-12 * scale] = np.nan
    return r


def mse(pb: Pseudobulk) -> np.ndarray:
    return ((pb.pred - pb.real) ** 2).mean(-1)


def mae(pb: Pseudobulk) -> np.ndarray:
    return np.abs(pb.pred - pb.real).mean(-1)


def mse_delta(pb: Pseudobulk) -> np.ndarray:
    return ((pb.pred_delta - pb.real_delta) ** 2).mean(-1)


def mae_delta(pb: Pseudobulk) -> np.ndarray:
    return np.abs(pb.pred_delta - pb.real_delta).mean(-1)


def target_gene_index(perts: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """Column of the gene each perturbation is named after, or -1 (combinations, drugs)."""
    return pd.Index(np.asarray(genes).astype(str)).get_indexer(np.asarray(perts).astype(str))


def distance_matrix(pred: np.ndarray, real: np.ndarray, metric: str, exclude: np.ndarray | None = None) -> np.ndarray:
    """D[p, q] = distance(pred[p], real[q]), leaving out column exclude[p] of row p when ≥ 0."""
    pred = np.asarray(pred, dtype=np.float64)
    real = np.asarray(real, dtype=np.float64)
    excl = np.full(pred.shape[0], -1) if exclude is None else np.asarray(exclude)
    has = excl >= 0
    col = np.where(has, excl, 0)
    pred_t = np.where(has, pred[np.arange(pred.shape[0]), col], 0.0)  # (P,)
    real_t = np.where(has[:, None], real[:, col].T, 0.0)  # (P, Q): real[q, excl[p]]
    if metric == "l1":
        full = torch.cdist(torch.from_numpy(pred), torch.from_numpy(real), p=1).numpy()
        return full - np.abs(pred_t[:, None] - real_t)
    if metric == "l2":
        full = torch.cdist(
            torch.from_numpy(pred), torch.from_numpy(real), p=2, compute_mode="donot_use_mm_for_euclid_dist"
        ).numpy()
        sq = np.maximum(full * full - (pred_t[:, None] - real_t) ** 2, 0.0)
        return np.sqrt(sq)
    if metric == "cosine":
        dot = pred @ real.T - pred_t[:, None] * real_t
        pn = (pred * pred).sum(-1)[:, None] - pred_t[:, None] ** 2
        rn = (real * real).sum(-1)[None, :] - real_t**2
        norm = np.sqrt(np.maximum(pn, 0.0)) * np.sqrt(np.maximum(rn, 0.0))
        with np.errstate(invalid="ignore", divide="ignore"):
            sim = np.where(norm > 0, dot / norm, 0.0)  # sklearn: a zero vector has similarity 0
        return np.clip(1.0 - sim, 0.0, 2.0)
    raise ValueError(f"unknown distance {metric!r}; use l1, l2 or cosine")


def discrimination_score(
    real_delta: np.ndarray, pred_delta: np.ndarray, metric: str = "l1", target_index: np.ndarray | None = None
) -> np.ndarray:
    """1 − rank/P of the true perturbation among all real deltas, nearest to the prediction first.

    Exact distance ties are broken by perturbation order (a stable sort); cell-eval's
    `np.argsort` leaves that order to numpy's sort internals.
    """
    dist = distance_matrix(pred_delta, real_delta, metric, target_index)
    order = np.argsort(dist, axis=1, kind="stable")
    n = dist.shape[0]
    rank = np.argmax(order == np.arange(n)[:, None], axis=1)
    return 1.0 - rank / n


# --------------------------------------------------------------------------- energy distance


def _mean_distance(a: np.ndarray, b: np.ndarray, a_sq: np.ndarray, b_sq: np.ndarray, same: bool) -> float:
    """Mean Euclidean distance over all pairs (a_i, b_j), with sklearn's `euclidean_distances`
    arithmetic (‖a‖² + ‖b‖² − 2a·b, clipped at 0, zero diagonal for a set with itself).

    The norms and the sum are float64; the product a·b runs in the inputs' dtype.
    """
    d2 = (-2.0 * (a @ b.T)).astype(np.float64, copy=False)
    d2 += a_sq[:, None]
    d2 += b_sq[None, :]
    np.maximum(d2, 0.0, out=d2)
    if same:
        np.fill_diagonal(d2, 0.0)
    return float(np.sqrt(d2, out=d2).mean())


@dataclass(frozen=True)
class EnergyDistances:
    """Per perturbation: real vs real control, predicted vs predicted control, predicted vs real."""

    real: np.ndarray
    pred: np.ndarray
    pred_real: np.ndarray


class _CellSets:
    """Dense blocks of one matrix's perturbation groups, centred, with squared row norms.

    Rows are reordered by group once, so each group is a contiguous slice. Every block is
    shifted by the same `center` (distances do not change), which keeps ‖x‖² small next to
    the distances. float32 input keeps its float32 matrix products (2x faster): cell-eval's
    own distances are float32 there, and centring leaves our error far below its rounding.
    float64 input is computed in float64 throughout.
    """

    def __init__(self, X: Matrix, codes: np.ndarray, n_perts: int, center: np.ndarray) -> None:
        order = np.argsort(codes, kind="stable")
        self.bounds = np.searchsorted(codes[order], np.arange(n_perts + 2))
        self.X = X[order]
        self.dtype = np.float32 if X.dtype == np.float32 else np.float64
        self.center = center.astype(self.dtype)
        self.control = self.block(n_perts)
        c, c_sq = self.control
        self.sigma_control = _mean_distance(c, c, c_sq, c_sq, same=True)

    def block(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.X[self.bounds[i] : self.bounds[i + 1]]
        x = (rows.toarray() if sp.issparse(rows) else np.asarray(rows)).astype(self.dtype, copy=False)
        x = x - self.center
        x64 = x.astype(np.float64, copy=False)
        return x, np.einsum("ij,ij->i", x64, x64)

    def to_control(self, i: int) -> tuple[float, np.ndarray, np.ndarray, float]:
        """Energy distance of group i to the control cells, plus the group's block and
        within-group mean distance for reuse."""
        x, x_sq = self.block(i)
        sigma = _mean_distance(x, x, x_sq, x_sq, same=True)
        cross = _mean_distance(x, self.control[0], x_sq, self.control[1], same=False)
        return 2.0 * cross - sigma - self.sigma_control, x, x_sq, sigma


def energy_distances(
    real_X: Matrix,
    real_codes: np.ndarray,
    pred_X: Matrix,
    pred_codes: np.ndarray,
    n_perts: int,
    *,
    with_pred_real: bool = True,
    progress: Callable[[int], None] | None = None,
) -> EnergyDistances:
    """Energy distances E(X, Y) = 2·E‖x−y‖ − E‖x−x'‖ − E‖y−y'‖ (self-pairs included, as cell-eval).

    Codes index perturbations 0..n_perts-1, with n_perts for control cells.
    """
    center = np.asarray(real_X[real_codes == n_perts].astype(np.float64).mean(axis=0)).ravel()
    real = _CellSets(real_X, real_codes, n_perts, center)
    pred = _CellSets(pred_X, pred_codes, n_perts, center)
    out_r, out_p, out_pr = (np.full(n_perts, np.nan) for _ in range(3))
    for i in range(n_perts):
        out_r[i], r, r_sq, sigma_r = real.to_control(i)
        out_p[i], p, p_sq, sigma_p = pred.to_control(i)
        if with_pred_real:
            cross = _mean_distance(p, r, p_sq, r_sq, same=False)
            out_pr[i] = 2.0 * cross - sigma_p - sigma_r
        if progress is not None:
            progress(1)
    return EnergyDistances(real=out_r, pred=out_p, pred_real=out_pr)


def pearson_edistance(ed: EnergyDistances) -> float:
    """Pearson r across perturbations of real-vs-control and predicted-vs-control energy distances."""
    if ed.real.size < 2:
        return float("nan")
    return float(pearson_rows(ed.real[None, :], ed.pred[None, :])[0])


# --------------------------------------------------------------------------- DE metrics


@dataclass(frozen=True)
class DEComparison:
    """Real and predicted DE tables reduced to what the DE metrics read, in float32 as cell-eval."""

    real_lfc: np.ndarray  # (P, G) float32
    pred_lfc: np.ndarray
    real_sig: np.ndarray  # (P, G) bool
    pred_sig: np.ndarray
    real_rank: np.ndarray  # (P, G) position in the |log2FC| ranking of significant genes, or G
    pred_rank: np.ndarray
    real_auc_label: np.ndarray  # (P, G) bool, real FDR < 0.05
    pred_fdr: np.ndarray  # (P, G) float32

    @property
    def n_real(self) -> np.ndarray:
        return self.real_sig.sum(1)

    @property
    def n_pred(self) -> np.ndarray:
        return self.pred_sig.sum(1)


def _significance_rank(abs_lfc: np.ndarray, sig: np.ndarray) -> np.ndarray:
    """Rank of each significant gene by |log2FC| descending (ties: gene order); G elsewhere."""
    key = np.where(sig, -abs_lfc.astype(np.float64), np.inf)
    order = np.argsort(key, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(order.shape[1])[None, :].repeat(order.shape[0], 0), axis=1)
    return np.where(sig, rank, sig.shape[1])


def compare_de(real: DEResult, pred: DEResult, fdr: float = 0.05) -> DEComparison:
    """Align and downcast two DE tables the way cell-eval reads them."""
    if not np.array_equal(real.targets, pred.targets) or not np.array_equal(real.genes, pred.genes):
        raise ValueError("real and predicted DE tables cover different perturbations or genes")
    real_lfc = real.log2_fold_change.astype(np.float32)
    pred_lfc = pred.log2_fold_change.astype(np.float32)
    real_fdr = real.fdr.astype(np.float32)
    pred_fdr = pred.fdr.astype(np.float32)
    real_sig = real_fdr < np.float32(fdr)
    pred_sig = pred_fdr < np.float32(fdr)
    return DEComparison(
        real_lfc=real_lfc,
        pred_lfc=pred_lfc,
        real_sig=real_sig,
        pred_sig=pred_sig,
        real_rank=_significance_rank(np.abs(real_lfc), real_sig),
        pred_rank=_significance_rank(np.abs(pred_lfc), pred_sig),
        real_auc_label=real_fdr < np.float32(_AUC_FDR),
        pred_fdr=pred_fdr,
    )


def de_overlap(cmp: DEComparison, k: int | None, metric: str = "overlap") -> np.ndarray:
    """Share of the top-k real significant genes among the top-k predicted ones.

    `overlap`: k defaults to, and is capped by, the real significant count (a recall);
    `precision`: to the predicted significant count. 0 when k is 0.
    """
    cap = cmp.n_real if metric == "overlap" else cmp.n_pred if metric == "precision" else None
    if cap is None:
        raise ValueError(f"unknown overlap metric {metric!r}")
    k_eff = cap if k is None else np.minimum(k, cap)
    top_real = cmp.real_rank < k_eff[:, None]
    top_pred = cmp.pred_rank < k_eff[:, None]
    hits = (top_real & top_pred).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(k_eff > 0, hits / np.maximum(k_eff, 1), 0.0)


def ambiguous_top_k(cmp: DEComparison, k: int | None, metric: str = "overlap") -> np.ndarray:
    """(P,) True where the top-k cut falls inside a run of equal |log2FC| (real or predicted).

    There the top-k set depends on how ties are ordered: here by gene order, in cell-eval by
    polars' unstable sort. Typical cause: several genes with log2FC = ±inf (unexpressed on one
    side, cell-eval's epsilon = 0).
    """
    cap = cmp.n_real if metric == "overlap" else cmp.n_pred
    k_eff = cap if k is None else np.minimum(k, cap)
    out = np.zeros(k_eff.shape, dtype=bool)
    for lfc, rank, n_sig in ((cmp.real_lfc, cmp.real_rank, cmp.n_real), (cmp.pred_lfc, cmp.pred_rank, cmp.n_pred)):
        cut = (k_eff > 0) & (k_eff < n_sig)
        abs_lfc = np.abs(lfc)
        last_in = np.where(rank == (k_eff - 1)[:, None], abs_lfc, -np.inf).max(1)
        first_out = np.where(rank == k_eff[:, None], abs_lfc, -np.inf).max(1)
        out |= cut & (last_in == first_out)
    return out


def average_ranks(values: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Average (tie-sharing) ranks along the last axis among masked entries; NaN outside.

    NaN values rank above every number, as polars' Spearman does.
    """
    values = np.asarray(values, dtype=np.float64)
    mask = np.ones(values.shape, dtype=bool) if mask is None else mask
    rows, width = values.shape
    key = np.where(np.isnan(values), np.inf, values)
    nan_last = np.isnan(values).astype(np.int8)
    order = np.lexsort((nan_last, key, ~mask), axis=-1)  # masked-in first, by value, NaN last
    v = np.take_along_axis(key, order, -1)
    n_last = np.take_along_axis(nan_last, order, -1)
    m = np.take_along_axis(mask, order, -1)
    new = np.ones((rows, width), dtype=bool)
    new[:, 1:] = (v[:, 1:] != v[:, :-1]) | (n_last[:, 1:] != n_last[:, :-1]) | (m[:, 1:] != m[:, :-1])
    pos = np.arange(width)[None, :].repeat(rows, 0)
    start = np.maximum.accumulate(np.where(new, pos, 0), axis=1)
    end_flag = np.ones((rows, width), dtype=bool)
    end_flag[:, :-1] = new[:, 1:]
    end = np.flip(np.minimum.accumulate(np.flip(np.where(end_flag, pos, width), 1), axis=1), 1)
    ranks_sorted = (start + end) / 2.0 + 1.0
    ranks = np.empty_like(ranks_sorted)
    np.put_along_axis(ranks, order, ranks_sorted, axis=-1)
    return np.where(mask, ranks, np.nan)


def masked_pearson(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pearson r per row over the masked entries; NaN for fewer than 2 or a constant side."""
    n = mask.sum(1)
    x = np.where(mask, x, 0.0)
    y = np.where(mask, y, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = x.sum(1) / n
        my = y.sum(1) / n
        xm = np.where(mask, x - mx[:, None], 0.0)
        ym = np.where(mask, y - my[:, None], 0.0)
        sxx, syy = (xm * xm).sum(1), (ym * ym).sum(1)
        r = (xm * ym).sum(1) / np.sqrt(sxx * syy)
    r = np.clip(r, -1.0, 1.0)
    r[(n < 2) | (sxx == 0) | (syy == 0)] = np.nan
    return r


def spearman_rows(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Spearman ρ per row (Pearson r of average ranks) over the masked entries."""
    mask = np.ones(np.shape(x), dtype=bool) if mask is None else mask
    return masked_pearson(average_ranks(x, mask), average_ranks(y, mask), mask)


def de_spearman_sig(cmp: DEComparison) -> float:
    """Spearman ρ, over perturbations with real DE genes, of real vs predicted DE-gene counts."""
    has = cmp.n_real > 0
    if not has.any():
        return 1.0
    real = cmp.n_real[has].astype(np.float64)[None, :]
    pred = cmp.n_pred[has].astype(np.float64)[None, :]
    return float(spearman_rows(real, pred)[0])


def de_direction_match(cmp: DEComparison) -> np.ndarray:
    """Share of real DE genes whose predicted log2FC has the same sign; NaN-as-null where none."""
    same = (np.sign(cmp.real_lfc) == np.sign(cmp.pred_lfc)) & cmp.real_sig
    with np.errstate(invalid="ignore", divide="ignore"):
        return same.sum(1) / cmp.n_real


def de_spearman_lfc_sig(cmp: DEComparison) -> np.ndarray:
    """Spearman ρ of real vs predicted log2FC over each perturbation's real DE genes."""
    return spearman_rows(cmp.real_lfc.astype(np.float64), cmp.pred_lfc.astype(np.float64), cmp.real_sig)


def de_sig_genes_recall(cmp: DEComparison) -> np.ndarray:
    """Share of real DE genes also called DE in the prediction; NaN-as-null where none."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (cmp.real_sig & cmp.pred_sig).sum(1) / cmp.n_real


def _neg_log10_f32(fdr: np.ndarray) -> np.ndarray:
    """−log10(clip(q, 1e-10, 1)) in float32: ln rounded to float32, divided by float32 ln 10."""
    q = np.clip(fdr.astype(np.float32), np.float32(1e-10), np.float32(1.0))
    ln = np.log(q.astype(np.float64)).astype(np.float32)
    return -(ln / np.float32(np.log(10.0)))


def _auc_inputs(cmp: DEComparison) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = cmp.real_auc_label
    scores = _neg_log10_f32(cmp.pred_fdr).astype(np.float64)
    n_pos = labels.sum(1)
    defined = (n_pos > 0) & (n_pos < labels.shape[1])
    return labels, scores, defined


def roc_auc(cmp: DEComparison) -> np.ndarray:
    """Area under the ROC curve of recovering real DE genes from predicted significance.

    Equal to the Mann-Whitney probability P(score_pos > score_neg) + ½·P(tie), which is
    what sklearn's trapezoids over distinct thresholds compute.
    """
    labels, scores, defined = _auc_inputs(cmp)
    ranks = average_ranks(scores)
    n_pos = labels.sum(1).astype(np.float64)
    n_neg = labels.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * labels).sum(1) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return np.where(defined, auc, np.nan)


def pr_auc(cmp: DEComparison) -> np.ndarray:
    """Average precision (sklearn's step-wise PR AUC): mean over positives of the precision
    at their score threshold, tied scores sharing one threshold."""
    labels, scores, defined = _auc_inputs(cmp)
    order = np.argsort(-scores, axis=1, kind="stable")
    s = np.take_along_axis(scores, order, 1)
    y = np.take_along_axis(labels, order, 1).astype(np.float64)
    tp = np.cumsum(y, 1)
    seen = np.arange(1, s.shape[1] + 1, dtype=np.float64)[None, :]
    # Precision is read at the last element of each group of tied scores.
    last = np.ones(s.shape, dtype=bool)
    last[:, :-1] = s[:, 1:] != s[:, :-1]
    pos = np.arange(s.shape[1])[None, :].repeat(s.shape[0], 0)
    end = np.flip(np.minimum.accumulate(np.flip(np.where(last, pos, s.shape[1]), 1), axis=1), 1)
    precision = np.take_along_axis(tp / seen, end, 1)
    n_pos = y.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (precision * y).sum(1) / n_pos
    return np.where(defined, ap, np.nan)


# --------------------------------------------------------------------------- orchestration


@dataclass
class MetricResults:
    """What `compute_metrics` returns: cell-eval's two frames plus what the report draws on."""

    results: pd.DataFrame
    agg: pd.DataFrame
    pseudobulk: Pseudobulk
    real_de: DEResult | None = None
    pred_de: DEResult | None = None
    extras: pd.DataFrame = field(default_factory=pd.DataFrame)


def _nullable(values: np.ndarray, null: np.ndarray | None = None) -> pd.arrays.FloatingArray:
    values = np.asarray(values, dtype=np.float64)
    mask = np.zeros(values.shape, dtype=bool) if null is None else np.asarray(null, dtype=bool)
    return pd.arrays.FloatingArray(np.where(mask, 0.0, values), mask)


def _resolve_profile(profile: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ValueError(f"unknown metric profile {profile!r}; choose one of {sorted(PROFILES)}")
        return PROFILES[profile]
    unknown = [m for m in profile if m not in PROFILES["full"]]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}")
    return tuple(m for m in PROFILES["full"] if m in set(profile))


def needs_de(metrics: Sequence[str]) -> bool:
    return any(m in DE_METRICS for m in metrics)


def compute_metrics(
    real_X: Matrix,
    real_labels: np.ndarray,
    pred_X: Matrix,
    pred_labels: np.ndarray,
    genes: np.ndarray,
    control: str,
    *,
    profile: str | Sequence[str] = "full",
    fdr: float = 0.05,
    extras: bool | None = None,
    progress: Callable[[int], None] | None = None,
    parallel: bool = False,
) -> MetricResults:
    """Every metric of `profile` for each perturbation, in cell-eval's results/agg format.

    Inputs are log-normalised cells x genes matrices (dense or sparse) with a label per cell;
    both sides must contain the same perturbations and control cells labelled `control`.
    `fdr` is the significance threshold of the DE metrics. `extras` adds the per-perturbation
    energy distances (`EXTRA_METRICS`); by default they come with profiles that compute
    `pearson_edistance` anyway. `progress(n)` is called as work units finish: 4, plus one
    per perturbation when cell-level distances are computed. `parallel` runs the real and
    the predicted DE in two threads at once (numpy and torch release the GIL); pair it with
    fewer torch threads (as `run_evaluate` does) so the two do not oversubscribe the cores.
    """
    metrics = _resolve_profile(profile)
    if extras is None:
        extras = "pearson_edistance" in metrics
    genes = np.asarray(genes).astype(str)
    real_labels = np.asarray(real_labels).astype(str)
    pred_labels = np.asarray(pred_labels).astype(str)
    perts = np.unique(real_labels[real_labels != control])
    tick = progress or (lambda n: None)

    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        logger.debug("%s: %.3f s", stage, now - clock)
        clock = now

    pb = pseudobulk(real_X, real_labels, pred_X, pred_labels, perts, control)
    lap("pseudobulk")
    tick(1)
    columns: dict[str, pd.arrays.FloatingArray] = {}
    real_de = pred_de = None
    if needs_de(metrics):
        jobs = ((real_X, real_labels), (pred_X, pred_labels))
        if parallel:
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="de") as pool:
                futures = [
                    pool.submit(differential_expression, X, lab, control, genes, targets=perts) for X, lab in jobs
                ]
                real_de, pred_de = (f.result() for f in futures)
        else:
            real_de, pred_de = (differential_expression(X, lab, control, genes, targets=perts) for X, lab in jobs)
        lap("differential expression (real and predicted)")
        tick(2)
        cmp = compare_de(real_de, pred_de, fdr)
        no_real = cmp.n_real == 0
        de_values: dict[str, Callable[[], tuple[np.ndarray, np.ndarray | None]]] = {
            "de_spearman_sig": lambda: (np.full(len(perts), de_spearman_sig(cmp)), None),
            "de_direction_match": lambda: (de_direction_match(cmp), no_real),
            "de_spearman_lfc_sig": lambda: (de_spearman_lfc_sig(cmp), no_real),
            "de_sig_genes_recall": lambda: (de_sig_genes_recall(cmp), no_real),
            "de_nsig_counts_real": lambda: (cmp.n_real, None),
            "de_nsig_counts_pred": lambda: (cmp.n_pred, None),
            "pr_auc": lambda: (pr_auc(cmp), None),
            "roc_auc": lambda: (roc_auc(cmp), None),
        }
        for name in metrics:
            if name.startswith(("overlap_at_", "precision_at_")):
                kind, k = name.split("_at_")
                columns[name] = _nullable(de_overlap(cmp, None if k == "N" else int(k), kind))
            elif name in de_values:
                columns[name] = _nullable(*de_values[name]())
    else:
        tick(2)

    real_codes = label_codes(real_labels, perts, control)
    pred_codes = label_codes(pred_labels, perts, control)
    want_ed = "pearson_edistance" in metrics or extras
    ed = (
        energy_distances(real_X, real_codes, pred_X, pred_codes, len(perts), with_pred_real=extras, progress=tick)
        if want_ed
        else None
    )
    if ed is not None:
        lap("energy distances")
    targets = target_gene_index(perts, genes)
    simple: dict[str, Callable[[], np.ndarray]] = {
        "pearson_delta": lambda: pearson_delta(pb),
        "mse": lambda: mse(pb),
        "mae": lambda: mae(pb),
        "mse_delta": lambda: mse_delta(pb),
        "mae_delta": lambda: mae_delta(pb),
        **{
            f"discrimination_score_{m}": (lambda m=m: discrimination_score(pb.real_delta, pb.pred_delta, m, targets))
            for m in ("l1", "l2", "cosine")
        },
        "pearson_edistance": lambda: np.full(len(perts), pearson_edistance(ed)),
    }
    for name in metrics:
        if name in simple:
            columns[name] = _nullable(simple[name]())
    lap("pseudobulk metrics")
    tick(1)

    results = pd.DataFrame({"perturbation": perts, **{m: columns[m] for m in metrics if m in columns}})
    extra_frame = pd.DataFrame({"perturbation": perts})
    if ed is not None and extras:
        extra_frame["edistance_real"] = ed.real
        extra_frame["edistance_pred"] = ed.pred
        extra_frame["edistance_pred_real"] = ed.pred_real
    return MetricResults(
        results=results, agg=aggregate(results), pseudobulk=pb, real_de=real_de, pred_de=pred_de, extras=extra_frame
    )


# --------------------------------------------------------------------------- aggregation

AGG_STATISTICS = ("count", "null_count", "mean", "std", "min", "25%", "50%", "75%", "max")


def describe(values: pd.arrays.FloatingArray | np.ndarray) -> list[float | None]:
    """polars' `describe()` of one float column: NaN counts as a value (sorted last), null not."""
    arr = pd.array(values, dtype="Float64") if not isinstance(values, pd.arrays.FloatingArray) else values
    null = np.asarray(arr.isna())
    vals = np.asarray(arr.to_numpy(dtype=np.float64, na_value=np.nan))[~null]
    # FloatingArray.isna() covers nulls only, so NaN values survive in `vals`.
    n = vals.size
    out: list[float | None] = [float(n), float(null.sum())]
    if n == 0:
        return out + [None] * 7
    has_nan = bool(np.isnan(vals).any())
    out.append(float("nan") if has_nan else float(vals.mean()))
    out.append(None if n < 2 else float("nan") if has_nan else float(vals.std(ddof=1)))
    finite = vals[~np.isnan(vals)]
    lo = float(finite.min()) if finite.size else float("nan")
    hi = float(finite.max()) if finite.size else float("nan")
    ordered = np.sort(vals)  # NaN sorts last, as in polars
    quantiles = [float(ordered[int(np.floor(q * (n - 1) + 0.5))]) for q in (0.25, 0.5, 0.75)]
    return [*out, lo, *quantiles, hi]


def aggregate(results: pd.DataFrame) -> pd.DataFrame:
    """cell-eval's agg_results: polars `describe()` of every metric column."""
    frame = {"statistic": list(AGG_STATISTICS)}
    for name in results.columns:
        if name in ("perturbation", "context"):
            continue
        frame[name] = pd.array(describe(results[name].array), dtype="Float64")
    return pd.DataFrame(frame)
