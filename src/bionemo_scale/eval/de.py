"""Differential expression of every perturbation against the control, as pdex's `ref` mode.

cell-eval 0.8.2 calls `pdex(adata, mode="ref", is_log1p=True, geometric_mean=True,
epsilon=0.0)` once on the real cells and once on the predicted cells (each against its own
control cells). This module reproduces that table without per-perturbation Python loops:

- **Mann-Whitney U**, two-sided, asymptotic, with the tie correction and the 0.5 continuity
  correction, exactly as `numba_mwu` (and `scipy.stats.mannwhitneyu(method="asymptotic")`)
  compute it; U, p and FDR come out bit-identical to pdex's. For a perturbation cell with
  value x, its contribution to U is `#control < x + ½·#control == x` (a `searchsorted`
  into the sorted control column), so U needs no joint ranking. The tie term Σ(t³−t) over
  the joint sample is rebuilt from per-element counts: with a = ties inside the
  perturbation and b = ties in the control, Σ_x [(a²−1) + 3(ab + b²)] + Σ_control (b²−1)
  equals Σ_values ((a+b)³ − (a+b)).
- **Zeros in closed form.** Only nonzero values are sorted and searched: per gene chunk they
  are packed into a +inf-padded (genes, perturbations, width) tensor (width = the largest
  nonzero count of any perturbation for those genes; genes are chunked by that width). The
  zero block's share of U and of the tie term follows from the counts. Sparse input costs
  in proportion to its nonzeros; dense input works the same way.
- **Benjamini–Hochberg** FDR per perturbation over all genes (scipy's arithmetic).
- **log2 fold change** of `expm1(mean(x))` pseudobulks (the geometric mean in count space
  for log1p data), with 0/0 defined as 0 and one-sided zeros as ±inf, as pdex does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

logger = logging.getLogger(__name__)

# Padded values (genes x perturbations x width) per chunk; peak memory is ~40 bytes each.
_CHUNK_ELEMENTS = 4_000_000
_SQRT2 = math.sqrt(2.0)
_erfc = np.frompyfunc(math.erfc, 1, 1)  # libm's erfc, the one numba_mwu calls


@dataclass(frozen=True)
class DEResult:
    """One DE table: perturbations x genes arrays, the layout pdex returns in long form."""

    targets: np.ndarray  # (P,) perturbation names
    genes: np.ndarray  # (G,) feature names
    target_mean: np.ndarray  # (P, G) pseudobulk in count space
    ref_mean: np.ndarray  # (G,)
    n_target: np.ndarray  # (P,) cells per perturbation
    n_ref: int
    log2_fold_change: np.ndarray  # (P, G)
    percent_change: np.ndarray  # (P, G)
    p_value: np.ndarray  # (P, G)
    statistic: np.ndarray  # (P, G) U of the perturbation sample
    fdr: np.ndarray  # (P, G) BH-adjusted within each perturbation

    def significant(self, fdr: float = 0.05) -> np.ndarray:
        """(P, G) mask of `fdr < threshold`, judged on float32 values as cell-eval does."""
        return self.fdr.astype(np.float32) < np.float32(fdr)

    def to_frame(self) -> pd.DataFrame:
        """The long table pdex writes (`real_de.csv` / `pred_de.csv` in cell-eval)."""
        n_p, n_g = self.p_value.shape
        return pd.DataFrame(
            {
                "target": np.repeat(self.targets, n_g),
                "feature": np.tile(self.genes, n_p),
                "target_mean": self.target_mean.ravel(),
                "ref_mean": np.tile(self.ref_mean, n_p),
                "target_membership": np.repeat(self.n_target, n_g),
                "ref_membership": np.full(n_p * n_g, self.n_ref),
                "log2_fold_change": self.log2_fold_change.ravel(),
                "percent_change": self.percent_change.ravel(),
                "p_value": self.p_value.ravel(),
                "statistic": self.statistic.ravel(),
                "fdr": self.fdr.ravel(),
            }
        )


def group_means(X: np.ndarray | sp.spmatrix, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """(n_groups, G) float64 arithmetic mean of the rows in each group (code -1 is ignored).

    One sparse indicator product, so it costs a single pass over X whatever the group count.
    """
    keep = codes >= 0
    rows = codes[keep]
    counts = np.bincount(rows, minlength=n_groups).astype(np.float64)
    weights = 1.0 / np.maximum(counts, 1.0)
    indicator = sp.csr_matrix(
        (weights[rows], (rows, np.flatnonzero(keep))), shape=(n_groups, codes.shape[0]), dtype=np.float64
    )
    out = indicator @ X  # scipy computes in float64 for float32 input
    return np.asarray(out.toarray() if sp.issparse(out) else out, dtype=np.float64)


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH-adjusted p-values along the last axis, with scipy's `false_discovery_control` arithmetic."""
    p = np.asarray(p, dtype=np.float64)
    m = p.shape[-1]
    if m <= 1:
        return p.copy()
    order = np.argsort(p, axis=-1)
    ranked = np.take_along_axis(p, order, axis=-1)
    ranked = ranked * (m / np.arange(1, m + 1, dtype=np.float64))
    ranked = np.flip(np.minimum.accumulate(np.flip(ranked, axis=-1), axis=-1), axis=-1)
    out = np.empty_like(ranked)
    np.put_along_axis(out, order, ranked, axis=-1)
    return np.clip(out, 0.0, 1.0)


def log2_fold_change(target: np.ndarray, ref: np.ndarray, epsilon: float = 0.0) -> np.ndarray:
    """log2((t+ε)/(r+ε)); 0/0 is 0 (no change), one-sided zeros stay ±inf, as in pdex."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lfc = np.log2((target + epsilon) / (ref + epsilon))
    lfc[np.isnan(lfc)] = 0.0
    return lfc


def percent_change(target: np.ndarray, ref: np.ndarray, epsilon: float = 0.0) -> np.ndarray:
    """(t−r)/(r+ε); 0/0 is 0, as in pdex."""
    with np.errstate(divide="ignore", invalid="ignore"):
        pc = (target - ref) / (ref + epsilon)
    pc[np.isnan(pc)] = 0.0
    return pc


def mwu_pvalues(u1: np.ndarray, tie_term: np.ndarray, n1: np.ndarray, n2: float) -> np.ndarray:
    """Two-sided asymptotic MWU p-value with tie and continuity corrections.

    The operations follow numba_mwu's `_mwu_stats_from_rank_sum` in the same order, so the
    p-values agree with pdex to the last bit (erfc is libm's in both).
    """
    n1 = np.asarray(n1, dtype=np.float64).reshape(-1, *([1] * (u1.ndim - 1)))
    n = n1 + n2
    u2 = n1 * n2 - u1
    u = np.maximum(u1, u2)
    mu = n1 * n2 / 2.0
    var_inner = (n + 1.0) - tie_term / (n * (n - 1.0))
    s_sq = n1 * n2 / 12.0 * var_inner
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (u - mu - 0.5) / np.sqrt(s_sq)
    p = _erfc(np.where(s_sq > 0.0, z, 0.0) / _SQRT2).astype(np.float64)
    p[~(s_sq > 0.0)] = 1.0
    return np.clip(p, 0.0, 1.0)


def _sort_dtype(X: np.ndarray | sp.spmatrix) -> torch.dtype:
    """Sort in the input's precision: ordering and ties are all the MWU needs."""
    return torch.float32 if X.dtype == np.float32 else torch.float64


@dataclass(frozen=True)
class _RankSums:
    u1: np.ndarray  # (n_groups, G)
    tie_term: np.ndarray  # (n_groups, G) Σ(t³−t) over the joint sample
    group_mean: np.ndarray  # (n_groups, G) pdex-rounded mean, input dtype
    ref_mean: np.ndarray  # (G,)
    sizes: np.ndarray  # (n_groups,)
    n_ref: int


@dataclass(frozen=True)
class _Layout:
    """Cells reordered as [reference | group 0 | group 1 | ...], each in original order."""

    rows: np.ndarray  # original row of each reordered row
    row_group: np.ndarray  # group of each reordered row, -1 for the reference
    sizes: np.ndarray  # (n_groups,)
    n_ref: int


def _layout(codes: np.ndarray, n_groups: int, ref_code: int) -> _Layout:
    key = np.where(codes == ref_code, -1, np.where((codes >= 0) & (codes < n_groups), codes, -2))
    rows = np.flatnonzero(key >= -1)
    rows = rows[np.argsort(key[rows], kind="stable")]
    sizes = np.bincount(codes[(codes >= 0) & (codes < n_groups)], minlength=n_groups).astype(np.int64)
    return _Layout(rows=rows, row_group=key[rows], sizes=sizes, n_ref=int((codes == ref_code).sum()))


def _nonzero_counts(Xo: np.ndarray | sp.csr_matrix, lay: _Layout) -> np.ndarray:
    """(G, n_groups + 1) nonzero values per gene and group (last column: the reference).

    `Xo` holds the rows in layout order, so every group is one contiguous row range.
    """
    bounds = np.concatenate([[0, lay.n_ref], lay.n_ref + np.cumsum(lay.sizes)])
    n_groups, n_genes = lay.sizes.size, Xo.shape[1]
    out = np.empty((n_genes, n_groups + 1), dtype=np.int64)
    slots = [n_groups, *range(n_groups)]  # row ranges: reference first, then groups
    for slot, r0, r1 in zip(slots, bounds[:-1], bounds[1:]):
        if sp.issparse(Xo):
            entries = slice(Xo.indptr[r0], Xo.indptr[r1])
            nonzero = Xo.data[entries] != 0
            out[:, slot] = np.bincount(Xo.indices[entries][nonzero], minlength=n_genes)
        else:
            out[:, slot] = np.count_nonzero(Xo[r0:r1], axis=0)
    return out


def _gene_chunks(widths: np.ndarray, n_rows: int, spread: float = 1.25) -> list[np.ndarray]:
    """Genes grouped by similar padded width: a chunk holds at most _CHUNK_ELEMENTS values and
    its widest gene is at most `spread` times its narrowest (bounding the padding waste)."""
    order = np.argsort(widths, kind="stable")
    w = np.maximum(widths[order], 1)
    chunks, start = [], 0
    while start < order.size:
        stop = start + 1
        while (
            stop < order.size
            and w[stop] <= spread * w[start] + 1
            and (stop - start + 1) * n_rows * w[stop] <= _CHUNK_ELEMENTS
        ):
            stop += 1
        chunks.append(order[start:stop])
        start = stop
    return chunks


def _padded_entries(
    sub: sp.csc_matrix, nnz: np.ndarray, width: int, width_ref: int, scale: np.ndarray, need_scaled: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Nonzero values of each (gene, group) packed left into +inf-padded rows.

    `nnz` is this chunk's (g, P + 1) counts. Returns (groups (g, P, width) and reference
    (g, width_ref), +inf padded) and the same two zero padded, each value times
    `scale[group]`, for the mean (the +inf arrays' values when `need_scaled` is False).
    Values stay in cell order, which the sequential mean depends on.
    """
    g, n_slots = nnz.shape
    n_groups = n_slots - 1
    # Segments in entry order: per column the reference rows come first, then each group.
    seg_counts = np.concatenate([nnz[:, -1:], nnz[:, :-1]], axis=1).ravel()
    seg_start = np.cumsum(seg_counts) - seg_counts
    seg = np.repeat(np.arange(seg_counts.size), seg_counts)
    pos = np.arange(seg.size) - seg_start[seg]
    col, slot = np.divmod(seg, n_slots)
    vals = sub.data
    is_ref = slot == 0
    dest_ref = col[is_ref] * width_ref + pos[is_ref]
    grp_rows = col[~is_ref] * n_groups + slot[~is_ref] - 1
    dest_grp = grp_rows * width + pos[~is_ref]

    ref_vals = np.full(g * width_ref, np.inf, dtype=vals.dtype)
    ref_vals[dest_ref] = vals[is_ref]
    grp_vals = np.full(g * n_groups * width, np.inf, dtype=vals.dtype)
    grp_vals[dest_grp] = vals[~is_ref]
    ref_scaled = np.zeros(g * width_ref, dtype=vals.dtype)
    grp_scaled = np.zeros(g * n_groups * width, dtype=vals.dtype)
    if need_scaled:
        ref_scaled[dest_ref] = vals[is_ref] * scale[-1]
        grp_scaled[dest_grp] = vals[~is_ref] * scale[slot[~is_ref] - 1]
    else:
        ref_scaled[dest_ref] = vals[is_ref]
        grp_scaled[dest_grp] = vals[~is_ref]
    return (
        grp_vals.reshape(g, n_groups, width),
        ref_vals.reshape(g, width_ref),
        grp_scaled.reshape(g, n_groups, width),
        ref_scaled.reshape(g, width_ref),
    )


def _run_lengths(sorted_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of ≥2 equal finite values in row-sorted data: (flat index of each run's first
    element, run length). Ties are rare in continuous data, so this touches few elements."""
    width = sorted_rows.shape[-1]
    flat = sorted_rows.reshape(-1, width)
    repeat = (flat[:, 1:] == flat[:, :-1]) & torch.isfinite(flat[:, 1:])
    idx = torch.nonzero(repeat.reshape(-1)).squeeze(1)  # flat index into (rows, width-1)
    if idx.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty
    row, col = idx // (width - 1), idx % (width - 1)
    pos = row * width + col + 1  # flat index (rows, width) of each repeated element
    new_run = torch.ones_like(pos, dtype=torch.bool)
    new_run[1:] = pos[1:] != pos[:-1] + 1
    run_id = torch.cumsum(new_run.long(), 0) - 1
    lengths = torch.bincount(run_id) + 1
    first = pos[new_run] - 1
    return first, lengths


def _chunk_statistics(
    grp: torch.Tensor, ref: torch.Tensor, nnz_grp: torch.Tensor, nnz_ref: torch.Tensor, n_p: torch.Tensor, n_ref: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """2U and the joint tie term for one gene chunk, from +inf-padded nonzero values.

    `grp` is (g, P, w) and `ref` is (g, w_ref); rows hold the nonzero values, then +inf.
    Sums run over every slot and the padding's known contribution is subtracted in closed
    form (a padding slot sits above all nonzero reference values, ties with the reference
    padding, and is kept out of within-group runs), which saves masking every element.
    """
    g, n_groups, width = grp.shape
    width_ref = ref.shape[1]
    zero = torch.zeros(1, dtype=ref.dtype)

    ref = torch.sort(ref, dim=-1).values
    b_ref = (torch.searchsorted(ref, ref, right=True) - torch.searchsorted(ref, ref)).double()
    pad_ref = (width_ref - nnz_ref).double()  # (g,)
    # Σ over nonzero reference values of (b²−1), i.e. Σ over their distinct values of (b³−b).
    ref_ties = (b_ref * b_ref).sum(-1) - width_ref - pad_ref * (pad_ref * pad_ref - 1)
    zeros_ref = (n_ref - nnz_ref).double()
    below_zero_ref = torch.searchsorted(ref, zero.expand(g, 1).contiguous()).squeeze(1).double()

    grp = torch.sort(grp, dim=-1).values
    flat = grp.view(g, n_groups * width)
    lo = torch.searchsorted(ref, flat, out_int32=True)
    hi = torch.searchsorted(ref, flat, right=True, out_int32=True)
    sum_lo = lo.view(g, n_groups, width).sum(-1, dtype=torch.int64).double()
    sum_hi = hi.view(g, n_groups, width).sum(-1, dtype=torch.int64).double()
    b = hi.sub_(lo)  # #ref == x, reusing hi's storage
    del lo
    tied = torch.nonzero(b.view(-1)).squeeze(1)
    b_tied = b.view(-1)[tied].double()
    row_of_tied = tied // width  # row in (g * P)

    nnz = nnz_grp.double()
    pad = width - nnz  # (g, P) padding slots per row
    pad_b = pad_ref[:, None]  # #ref == +inf for a padding slot
    zeros_grp = n_p.double() - nnz
    below_zero_grp = torch.searchsorted(grp, zero.expand(g, n_groups, 1).contiguous()).squeeze(-1).double()
    positive = nnz - below_zero_grp
    # 2U: a nonzero x adds #ref<x + #ref<=x (reference zeros included when x > 0); a zero
    # adds twice the negative reference values plus the reference zeros it ties with.
    twice_u = (
        sum_lo
        + sum_hi
        - pad * (nnz_ref + width_ref).double()[:, None]
        + 2 * zeros_ref[:, None] * positive
        + zeros_grp * (2 * below_zero_ref[:, None] + zeros_ref[:, None])
    )
    # Σ_x (a²−1 + 3ab + 3b²) over nonzero x, a = run length inside the group, b = #ref == x.
    # Singletons give 3b(b+1); a run of r > 1 adds r³ − r + 3rb(r−1) on top of that.
    single = torch.zeros(g * n_groups, dtype=torch.float64)
    single.index_add_(0, row_of_tied, 3 * b_tied * (b_tied + 1))
    cross = single.view(g, n_groups) - pad * 3 * pad_b * (pad_b + 1)
    first, r = _run_lengths(grp)
    if first.numel():
        r = r.double()
        b_run = b.view(-1)[first].double()
        extra = r * r * r - r + 3 * r * b_run * (r - 1)
        runs = torch.zeros(g * n_groups, dtype=torch.float64)
        runs.index_add_(0, first // width, extra)
        cross = cross + runs.view(g, n_groups)
    t_zero = zeros_grp + zeros_ref[:, None]
    ties = cross + ref_ties[:, None] + t_zero * t_zero * t_zero - t_zero
    return twice_u, ties


def rank_sums_vs_reference(X: np.ndarray | sp.spmatrix, codes: np.ndarray, n_groups: int, ref_code: int) -> _RankSums:
    """U of each group against the reference group, the joint tie term, and pdex's means.

    Cells whose code is neither a group (0..n_groups-1) nor `ref_code` are ignored. Zeros
    are handled in closed form; only nonzero values are sorted and searched, packed into
    +inf-padded (genes, groups, width) tensors, so sparse data costs in proportion to its
    nonzeros.
    """
    sparse_input = sp.issparse(X)
    lay = _layout(codes, n_groups, ref_code)
    Xo = X[lay.rows]
    Xo = sp.csr_matrix(Xo) if sparse_input else np.asarray(Xo)
    n_genes = X.shape[1]
    nnz = _nonzero_counts(Xo, lay)  # (G, n_groups + 1)
    if sparse_input:
        Xo = Xo.tocsc()
        Xo.sort_indices()
    widths = nnz[:, :n_groups].max(axis=1) if n_groups else np.zeros(n_genes, dtype=np.int64)
    # pdex's mean: sparse input is scaled by 1/n before a sequential sum, dense is summed then divided.
    counts = np.append(lay.sizes, lay.n_ref).astype(np.float64)
    ones = np.ones_like(counts)
    scale = (1.0 / np.maximum(counts, 1.0) if sparse_input else ones).astype(X.dtype)
    dtype = _sort_dtype(X)

    u1 = np.zeros((n_genes, n_groups))
    tie = np.zeros((n_genes, n_groups))
    means = np.zeros((n_genes, n_groups), dtype=X.dtype)
    ref_mean = np.zeros(n_genes, dtype=X.dtype)
    n_p = torch.from_numpy(lay.sizes)[None, :]  # (1, P)
    for genes in _gene_chunks(widths, max(n_groups, 1)):
        sub = Xo[:, genes]
        sub = sub if sparse_input else sp.csc_matrix(sub)
        sub.eliminate_zeros()
        width = max(1, int(widths[genes].max()))
        width_ref = max(1, int(nnz[genes, n_groups].max()))
        grp_np, ref_np, grp_scaled, ref_scaled = _padded_entries(
            sub, nnz[genes], width, width_ref, scale, need_scaled=sparse_input
        )
        group_sum = np.cumsum(grp_scaled, axis=-1)[..., -1]
        ref_sum = np.cumsum(ref_scaled, axis=-1)[..., -1]
        if not sparse_input:
            group_sum = group_sum / np.maximum(lay.sizes, 1).astype(X.dtype)
            ref_sum = ref_sum / X.dtype.type(max(lay.n_ref, 1))
        means[genes] = group_sum
        ref_mean[genes] = ref_sum

        twice_u, ties = _chunk_statistics(
            torch.from_numpy(grp_np).to(dtype),
            torch.from_numpy(ref_np).to(dtype),
            torch.from_numpy(nnz[genes, :n_groups]),
            torch.from_numpy(nnz[genes, n_groups]),
            n_p,
            lay.n_ref,
        )
        u1[genes] = twice_u.to(torch.float64).numpy() / 2.0
        tie[genes] = ties.to(torch.float64).numpy()
    return _RankSums(
        u1=u1.T.copy(),
        tie_term=tie.T.copy(),
        group_mean=means.T.copy(),
        ref_mean=ref_mean,
        sizes=lay.sizes,
        n_ref=lay.n_ref,
    )


def _validate_matrix(X: np.ndarray | sp.spmatrix) -> np.ndarray | sp.spmatrix:
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        if X.dtype not in (np.float32, np.float64):
            X = X.astype(np.float64)
        return X
    X = np.asarray(X)
    return X if X.dtype in (np.float32, np.float64) else X.astype(np.float64)


def differential_expression(
    X: np.ndarray | sp.spmatrix,
    labels: np.ndarray,
    control: str,
    genes: np.ndarray,
    *,
    is_log1p: bool = True,
    epsilon: float = 0.0,
    targets: np.ndarray | None = None,
) -> DEResult:
    """pdex `ref` mode: every label in `targets` (default: all but `control`) vs the control cells.

    `X` is cells x genes (dense or sparse), log1p-normalised when `is_log1p`.
    """
    X = _validate_matrix(X)
    labels = np.asarray(labels).astype(str)
    if targets is None:
        targets = np.unique(labels[labels != control])
    targets = np.asarray(targets).astype(str)
    ref_code = len(targets)
    codes = pd.Index(targets).get_indexer(labels).astype(np.int64)
    codes[labels == control] = ref_code
    if not (codes == ref_code).any():
        raise ValueError(f"no control cells labelled {control!r}")

    sums = rank_sums_vs_reference(X, codes, len(targets), ref_code)
    p = mwu_pvalues(sums.u1, sums.tie_term, sums.sizes.astype(np.float64), float(sums.n_ref))
    if is_log1p:
        target_mean, ref_mean = np.expm1(sums.group_mean), np.expm1(sums.ref_mean)
    else:  # geometric mean of counts: expm1(mean(log1p(x)))
        logged = X.log1p() if sp.issparse(X) else np.log1p(X)
        means = group_means(logged, codes, ref_code + 1)
        target_mean, ref_mean = np.expm1(means[:ref_code]), np.expm1(means[ref_code])
    target_mean = target_mean.astype(np.float64)
    ref_mean = ref_mean.astype(np.float64)
    return DEResult(
        targets=targets,
        genes=np.asarray(genes).astype(str),
        target_mean=target_mean,
        ref_mean=ref_mean,
        n_target=sums.sizes,
        n_ref=sums.n_ref,
        log2_fold_change=log2_fold_change(target_mean, ref_mean[None, :], epsilon),
        percent_change=percent_change(target_mean, ref_mean[None, :], epsilon),
        p_value=p,
        statistic=sums.u1,
        fdr=benjamini_hochberg(p),
    )
