"""Average the predictions of several models, cell by cell.

SCALE maps each control cell to its perturbed state, and `predict` draws the control cells from
the data, split, subset and seed alone (not from the model), so models trained with different
seeds predict the *same* cells. Their per-cell mean keeps what the models agree on and cancels
part of what each gets wrong in its own way (seed noise). Members must therefore share their
cells exactly: same held-out groups, same control cells, same genes, same REAL.h5ad.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from bionemo_scale.data.count_lattice import lattice_of_file
from bionemo_scale.errors import ScaleError
from bionemo_scale.predict import real_path_for, write_predictions

logger = logging.getLogger(__name__)

MATCH_COLUMNS = ("perturbation", "context", "source_row", "is_prediction")
SAME_CELLS_FIX = "predict every member with the same --data, --split, --subset and --seed"


def _read_member(path: Path) -> ad.AnnData:
    if not path.is_file():
        raise ScaleError(f"ensemble member {path} is not a file", "pass the PRED.h5ad files written by predict")
    try:
        return ad.read_h5ad(path)
    except Exception as err:  # h5py/anndata raise many types for a damaged file
        raise ScaleError(
            f"ensemble member {path} could not be read ({type(err).__name__})", "re-run the predict that wrote it"
        ) from err


def _check_same_cells(first: ad.AnnData, other: ad.AnnData, first_path: Path, path: Path) -> None:
    if list(other.var_names) != list(first.var_names):
        raise ScaleError(f"{path} and {first_path} predict different genes", SAME_CELLS_FIX)
    if other.n_obs != first.n_obs:
        raise ScaleError(f"{path} has {other.n_obs} cells, {first_path} has {first.n_obs}", SAME_CELLS_FIX)
    for col in MATCH_COLUMNS:
        if col not in other.obs or col not in first.obs:
            raise ScaleError(
                f"{path if col not in other.obs else first_path} has no obs column '{col}'",
                "ensemble only PRED.h5ad files written by bionemo-scale predict or baseline",
            )
        if not np.array_equal(np.asarray(other.obs[col]).astype(str), np.asarray(first.obs[col]).astype(str)):
            raise ScaleError(f"{path} and {first_path} predict different cells (obs '{col}' differs)", SAME_CELLS_FIX)


def mean_expression(matrices: list[sp.spmatrix | np.ndarray]) -> sp.csr_matrix:
    """The element-wise mean of same-shaped matrices, as float32 CSR."""
    total = sp.csr_matrix(matrices[0], dtype=np.float64)
    for m in matrices[1:]:
        total = total + sp.csr_matrix(m, dtype=np.float64)
    return sp.csr_matrix(total / len(matrices), dtype=np.float32)


def _members_rule(members: list[ad.AnnData]) -> bool:
    """Whether the members are on the count lattice (all or none of them; mixed is an error)."""
    on = [bool(m.uns.get("bionemo_scale", {}).get("count_lattice", False)) for m in members]
    if any(on) and not all(on):
        raise ScaleError(
            f"the members differ in their output rule: {sum(on)} on the count lattice, {len(on) - sum(on)} continuous",
            "pass --count-lattice or --no-count-lattice to choose the ensemble's",
        )
    return all(on)


def average_predictions(
    paths: list[Path], output: Path, overwrite: bool = False, lattice: bool | None = None, seed: int = 0
) -> Path:
    """Write the per-cell mean of the members' PRED.h5ad to `output` (and their REAL.h5ad beside it).

    With `lattice`, the mean's sub-count values are sampled onto the count lattice: the mean of
    members that were each on it is not (0, 0 and one count average to a third of a count).
    `None` follows the members: on when they are all on the lattice, off when none is (a
    continuous `predict`, e.g. `flow.count_lattice=false`); members that differ are refused.
    """
    if len(paths) < 2:
        raise ScaleError(f"an ensemble needs at least 2 members, got {len(paths)}", "pass two or more PRED.h5ad files")
    if len({p.resolve() for p in paths}) < len(paths):
        raise ScaleError("the same PRED.h5ad is given twice", "pass each member once")
    if output.resolve() in {p.resolve() for p in paths}:
        raise ScaleError(f"--output {output} is one of the members", "write the ensemble to a new file")
    members = [_read_member(p) for p in paths]
    for path, member in zip(paths[1:], members[1:], strict=True):
        _check_same_cells(members[0], member, paths[0], path)
    for path, member in zip(paths, members, strict=True):
        data = member.X.data if sp.issparse(member.X) else np.asarray(member.X)
        if not np.isfinite(data).all():
            raise ScaleError(f"{path} has non-finite predicted values (NaN or inf)", "re-run the predict that wrote it")
    if lattice is None:
        lattice = _members_rule(members)
    is_pred = np.asarray(members[0].obs["is_prediction"]).astype(bool)
    controls = [sp.csr_matrix(m.X[~is_pred]) for m in members]
    if any((c != controls[0]).nnz for c in controls[1:]):
        raise ScaleError("the members' real control cells differ", SAME_CELLS_FIX)

    real_paths = [real_path_for(p) for p in paths]
    for rp in real_paths:
        if not rp.is_file():
            raise ScaleError(f"{rp} is missing", "ensemble members need the REAL.h5ad that predict writes beside them")
    real = _read_member(real_paths[0])
    for rp in real_paths[1:]:
        other = _read_member(rp)
        if other.shape != real.shape or not np.array_equal(
            np.asarray(other.obs["source_row"]), np.asarray(real.obs["source_row"])
        ):
            raise ScaleError(f"{rp} and {real_paths[0]} hold different real cells", SAME_CELLS_FIX)

    pred = members[0].copy()
    pred.X = mean_expression([m.X for m in members])
    if lattice:
        if not np.array_equal(np.flatnonzero(is_pred), np.arange(is_pred.sum())):
            raise ScaleError(
                "the members' predicted cells do not come first", "ensemble PRED.h5ad files written by predict"
            )
        pred.X = lattice_of_file(pred, seed)
    info = dict(pred.uns.get("bionemo_scale", {}))
    info["kind"] = "ensemble"
    info["members"] = [str(p) for p in paths]
    info["count_lattice"] = lattice
    info["member_kinds"] = [str(m.uns.get("bionemo_scale", {}).get("kind", "unknown")) for m in members]
    pred.uns["bionemo_scale"] = info
    logger.info("averaged %d members over %d cells x %d genes", len(members), pred.n_obs, pred.n_vars)
    return write_predictions(pred, real, output, overwrite=overwrite)
