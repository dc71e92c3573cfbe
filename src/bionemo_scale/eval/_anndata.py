"""Reading and checking the AnnData pair that `evaluate` compares.

Every check fails with a one-line `ScaleError` that names the file, the problem and the fix,
before any metric is computed. The checks mirror what cell-eval requires (same genes in the
same order, the same perturbations on both sides, control cells on both sides, log1p data)
and add the ones it leaves to a traceback (NaN, a missing column).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from bionemo_scale.errors import ScaleError

logger = logging.getLogger(__name__)

Matrix = np.ndarray | sp.csr_matrix
_LOG1P_MAX = 15.0  # cell-eval's ceiling for log1p-normalised values


def _preview(items: list[str] | np.ndarray, n: int = 5) -> str:
    items = [str(i) for i in items]
    shown = ", ".join(repr(i) for i in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def read_h5ad(path: str | Path, role: str) -> ad.AnnData:
    """Read an h5ad into memory, or fail with what is wrong with the path."""
    path = Path(path)
    if path.is_dir():
        raise ScaleError(f"{role} file {path} is a folder", f"pass the path of an .h5ad file as --{role}")
    if not path.is_file():
        raise ScaleError(f"{role} file {path} does not exist", f"pass the path of an .h5ad file as --{role}")
    try:
        return ad.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types for a bad file
        reason = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise ScaleError(
            f"cannot read {role} file {path} as h5ad ({type(exc).__name__}: {reason})",
            "pass an intact .h5ad written by anndata (re-write it with adata.write_h5ad)",
        ) from None


def matrix(adata: ad.AnnData, role: str) -> Matrix:
    """`adata.X` as CSR or ndarray of float32/float64 (float16 and ints are widened)."""
    X = adata.X
    if X is None:
        raise ScaleError(f"{role} AnnData has no expression matrix (.X is empty)", "store expression in .X")
    if sp.issparse(X):
        X = sp.csr_matrix(X)
    else:
        X = np.asarray(X)
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise ScaleError(f"{role} .X has non-numeric dtype {X.dtype}", "store expression values as floats")
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float32 if X.dtype == np.float16 else np.float64)
    return X


def check_finite(X: Matrix, role: str) -> None:
    values = X.data if sp.issparse(X) else X
    bad = ~np.isfinite(values)
    if bad.any():
        raise ScaleError(
            f"{role} .X contains {int(bad.sum())} NaN or infinite values",
            "replace them (e.g. np.nan_to_num) or drop the affected cells before evaluating",
        )


def looks_like_counts(X: Matrix) -> bool:
    """True when every value is an integer (cell-eval's test for raw counts).

    A leading sample settles the usual log-normalised case without a pass over all values.
    """
    values = (X.data if sp.issparse(X) else X).ravel()
    if values.size == 0:
        return False
    if np.any(np.modf(values[:100_000])[0] > 1e-3):
        return False
    return not bool(np.any(np.modf(values)[0] > 1e-3))


def check_scale(X: Matrix, role: str) -> None:
    """log1p-normalised data is ≥ 0 and below 15, as cell-eval requires."""
    values = X.data if sp.issparse(X) else X
    if values.size == 0:
        return
    low, high = float(values.min()), float(values.max())
    if low < 0:
        raise ScaleError(
            f"{role} .X has negative values (min {low:.3g}); log1p-normalised expression cannot be negative",
            "clip predictions at 0 before evaluating",
        )
    if high >= _LOG1P_MAX:
        raise ScaleError(
            f"{role} .X has values up to {high:.3g}, above the log1p range [0, {_LOG1P_MAX:g})",
            "pass log1p(normalize_total) expression, or raw integer counts (they are normalised for you)",
        )


def normalise_counts(X: Matrix) -> Matrix:
    """scanpy's normalize_total (to the median total) + log1p, as cell-eval applies to counts."""
    X = X.astype(np.float64)
    totals = np.asarray(X.sum(axis=1)).ravel()
    target = float(np.median(totals[totals > 0])) if (totals > 0).any() else 1.0
    scale = np.divide(target, totals, out=np.zeros_like(totals), where=totals > 0)
    if sp.issparse(X):
        X = sp.csr_matrix(sp.diags(scale) @ X)
        X.data = np.log1p(X.data)
        return X
    return np.log1p(X * scale[:, None])


def obs_labels(adata: ad.AnnData, column: str, role: str, flag: str) -> np.ndarray:
    if column not in adata.obs.columns:
        raise ScaleError(
            f"column {column!r} is not in the {role} obs (columns: {_preview(list(adata.obs.columns), 8)})",
            f"pass the right {flag}",
        )
    values = adata.obs[column]
    missing = values.isna().to_numpy()
    if missing.any():
        raise ScaleError(
            f"{int(missing.sum())} {role} cells have no value in obs column {column!r}",
            "label every cell or drop the unlabelled ones",
        )
    return values.astype(str).to_numpy()


def check_genes(real: ad.AnnData, pred: ad.AnnData, role: str = "prediction") -> np.ndarray:
    """Identical gene names in identical order on both sides; returns them.

    `role` names the file being checked against the real cells in the messages ("baseline X").
    """
    real_genes = real.var_names.astype(str).to_numpy()
    pred_genes = pred.var_names.astype(str).to_numpy()
    for side, adata in (("real", real), (role, pred)):
        if not adata.var_names.is_unique:
            dup = adata.var_names[adata.var_names.duplicated()].unique()
            raise ScaleError(f"{side} gene names are not unique ({_preview(dup)})", "make var_names unique")
    if np.array_equal(real_genes, pred_genes):
        return real_genes
    missing = np.setdiff1d(real_genes, pred_genes)
    extra = np.setdiff1d(pred_genes, real_genes)
    if missing.size or extra.size:
        parts = []
        if missing.size:
            parts.append(f"real genes missing from the {role}: {missing.size} ({_preview(missing)})")
        if extra.size:
            parts.append(f"{role} genes not in the real data: {extra.size} ({_preview(extra)})")
        raise ScaleError(
            "gene sets differ: " + "; ".join(parts),
            "predict the same genes as the real data (pred = pred[:, real.var_names])",
        )
    first = int(np.flatnonzero(real_genes != pred_genes)[0])
    raise ScaleError(
        f"gene order differs: position {first} is {real_genes[first]!r} in real but {pred_genes[first]!r} in the {role}",
        "reorder the prediction's genes to match (pred = pred[:, real.var_names])",
    )


def check_perturbations(real_labels: np.ndarray, pred_labels: np.ndarray, control: str, where: str = "") -> None:
    """Control cells on both sides and the same perturbations on both sides."""
    for role, labels in (("real", real_labels), ("pred", pred_labels)):
        if not (labels == control).any():
            raise ScaleError(
                f"no control cells labelled {control!r} in the {role} data{where}",
                "check --control, and include control cells in both files (copy the real controls into the prediction)",
            )
    real_set = set(np.unique(real_labels)) - {control}
    pred_set = set(np.unique(pred_labels)) - {control}
    if not real_set:
        raise ScaleError(f"the real data{where} has only control cells", "evaluate data with perturbed cells")
    missing = sorted(real_set - pred_set)
    extra = sorted(pred_set - real_set)
    if missing:
        raise ScaleError(
            f"perturbations{where} in the real data but not in the prediction: {len(missing)} ({_preview(missing)})",
            "predict every real perturbation, or drop them from the real file",
        )
    if extra:
        raise ScaleError(
            f"perturbations{where} in the prediction but not in the real data: {len(extra)} ({_preview(extra)})",
            "drop them from the prediction, or add their real cells",
        )


@dataclass(frozen=True)
class Side:
    """One AnnData's expression matrix and labels, validated."""

    X: Matrix
    labels: np.ndarray
    contexts: np.ndarray | None

    def subset(self, rows: np.ndarray) -> Side:
        return Side(self.X[rows], self.labels[rows], None if self.contexts is None else self.contexts[rows])


def load_side(adata: ad.AnnData, role: str, pert_col: str, context_col: str | None, *, normalise: bool = True) -> Side:
    """Validated matrix and labels; integer counts are normalised and log1p'd like cell-eval."""
    labels = obs_labels(adata, pert_col, role, "--pert-col")
    contexts = obs_labels(adata, context_col, role, "--context-col") if context_col else None
    X = matrix(adata, role)
    check_finite(X, role)
    if normalise and looks_like_counts(X):
        logger.warning("%s .X holds integer counts; applying normalize_total + log1p as cell-eval does", role)
        X = normalise_counts(X)
    check_scale(X, role)
    if sp.issparse(X) and (X.data == 0).any():
        X = X.copy()
        X.eliminate_zeros()
    return Side(X=X, labels=labels, contexts=contexts)


def context_pairs(real: Side, pred: Side, control: str) -> list[tuple[str | None, np.ndarray, np.ndarray]]:
    """(context, real rows, pred rows) for each context, checked; a single None context without one."""
    if real.contexts is None or pred.contexts is None:
        check_perturbations(real.labels, pred.labels, control)
        return [(None, np.arange(real.labels.size), np.arange(pred.labels.size))]
    real_ctx, pred_ctx = np.unique(real.contexts), np.unique(pred.contexts)
    missing = np.setdiff1d(real_ctx, pred_ctx)
    extra = np.setdiff1d(pred_ctx, real_ctx)
    if missing.size or extra.size:
        what = []
        if missing.size:
            what.append(f"missing from the prediction: {_preview(missing)}")
        if extra.size:
            what.append(f"not in the real data: {_preview(extra)}")
        raise ScaleError("contexts differ between real and pred (" + "; ".join(what) + ")", "predict every context")
    pairs = []
    for ctx in real_ctx:
        r_rows = np.flatnonzero(real.contexts == ctx)
        p_rows = np.flatnonzero(pred.contexts == ctx)
        check_perturbations(real.labels[r_rows], pred.labels[p_rows], control, where=f" of context {ctx!r}")
        pairs.append((str(ctx), r_rows, p_rows))
    return pairs
