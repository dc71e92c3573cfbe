"""`bionemo-scale evaluate`: score predicted cells against real cells, as cell-eval does.

Writes into OUTPUT_DIR (atomically: on any error nothing is left at that path):

- `results.csv` / `agg_results.csv`: cell-eval's per-perturbation metrics and their
  `describe()` table, same column names and order (cell-eval's `clustering_agreement`
  is the one column not produced). With `--context-col`, every (context, perturbation)
  pair is scored against the control cells of its own context and `results.csv` gains a
  `context` column right after `perturbation`; each context's own files are also written
  as `{context}_results.csv` / `{context}_agg_results.csv`, which is how `cell-eval run
  --celltype-col` names them. `agg_results.csv` then pools all pairs.
- `results_extra.csv`: per-perturbation energy distances (real vs control, predicted vs
  control, predicted vs real), which are not cell-eval columns.
- `real_de.csv` / `pred_de.csv` with `write_de=True`: the pdex-format DE tables, which
  `cell-eval run -dr/-dp` accepts.
- `report.md` with PNG plots in `figures/`, and `baselines/` with the same tables for each
  baseline prediction and for two degenerate references built from the real controls.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from bionemo_scale.atomic import EVALUATION, atomic_dir, check_output_free
from bionemo_scale.errors import ScaleError
from bionemo_scale.eval import _anndata
from bionemo_scale.eval._anndata import Side
from bionemo_scale.eval.metrics import (
    PROFILES,
    MetricResults,
    _resolve_profile,
    aggregate,
    compute_metrics,
    needs_de,
)

logger = logging.getLogger(__name__)

# Degenerate predictions built from the real data alone, scored beside every model so that
# a metric a trivial predictor can win (see DESIGN.md, "Metric pitfalls") is visible.
REFERENCES = ("control_mean", "all_zeros")


@dataclass
class ContextResult:
    context: str | None
    metrics: MetricResults


@dataclass
class Evaluation:
    """All contexts of one prediction (the model, a baseline or a reference)."""

    name: str
    contexts: list[ContextResult]

    @property
    def results(self) -> pd.DataFrame:
        frames = []
        for c in self.contexts:
            frame = c.metrics.results
            if c.context is not None:
                frame = frame.copy()
                frame.insert(1, "context", c.context)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    @property
    def agg(self) -> pd.DataFrame:
        if len(self.contexts) == 1:
            return self.contexts[0].metrics.agg
        return aggregate(self.results)

    @property
    def extras(self) -> pd.DataFrame:
        frames = []
        for c in self.contexts:
            frame = c.metrics.extras
            if c.context is not None:
                frame = frame.copy()
                frame.insert(1, "context", c.context)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)


@dataclass
class EvaluateOutput:
    """What `run_evaluate` computed and where it wrote it."""

    output_dir: Path
    model: Evaluation
    baselines: dict[str, Evaluation] = field(default_factory=dict)
    seconds: float = 0.0


# --------------------------------------------------------------------------- CSV writing


def _format_value(value: object) -> str:
    """polars' CSV conventions: empty for null, NaN for NaN, shortest round-trip floats."""
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, float | np.floating):
        value = float(value)
        if np.isnan(value):
            return "NaN"
        return repr(value)
    return str(value)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write a results frame the way cell-eval (polars) does, keeping null and NaN apart."""
    lines = [",".join(_quote(str(c)) for c in frame.columns)]
    cols = [frame[c].array for c in frame.columns]
    for i in range(len(frame)):
        lines.append(",".join(_quote(_format_value(col[i])) for col in cols))
    path.write_text("\n".join(lines) + "\n")


def _quote(text: str) -> str:
    if any(ch in text for ch in ',"\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _safe_name(text: str) -> str:
    """cell-eval's prefix rule (a `/` becomes `-`), plus no path tricks."""
    return text.replace("/", "-").replace("\\", "-").lstrip(".") or "context"


# --------------------------------------------------------------------------- references


def reference_prediction(real: Side, rows: np.ndarray, control: str, kind: str) -> Side:
    """A degenerate prediction for the given real rows: the control cells as they are, then
    every perturbed cell replaced by the control mean (`control_mean`) or by zeros (`all_zeros`).

    `all_zeros` has delta −(control mean), which correlates with the real delta through the
    control's own noise: the regression-to-the-mean inflation of PDCorr.
    """
    X = real.X[rows]
    labels = real.labels[rows]
    is_ctrl = labels == control
    n_pert = int((~is_ctrl).sum())
    ctrl_X = X[is_ctrl]
    if kind == "control_mean":
        # float64, so the predicted delta is 0 up to rounding rather than float32 truncation
        mean = np.asarray(ctrl_X.astype(np.float64).mean(axis=0)).ravel()
        fill = np.broadcast_to(mean, (n_pert, mean.size))
        fill = sp.csr_matrix(fill) if sp.issparse(X) else np.array(fill)
    elif kind == "all_zeros":
        fill = sp.csr_matrix((n_pert, X.shape[1]), dtype=X.dtype) if sp.issparse(X) else np.zeros_like(X[~is_ctrl])
    else:
        raise ValueError(f"unknown reference {kind!r}")
    stacked = sp.vstack([ctrl_X, fill], format="csr") if sp.issparse(X) else np.vstack([ctrl_X, fill])
    return Side(X=stacked, labels=np.concatenate([labels[is_ctrl], labels[~is_ctrl]]), contexts=None)


def _evaluate_reference(
    kind: str,
    real: Side,
    pairs: list[tuple[str | None, np.ndarray, np.ndarray]],
    genes: np.ndarray,
    control: str,
    metrics: tuple[str, ...],
    fdr: float,
    tick: Callable[[int], None],
    parallel: bool = True,
) -> Evaluation:
    """Score a degenerate reference. Its predicted cells are identical within a perturbation,
    so its energy distances carry no information: `pearson_edistance` is NaN without computing."""
    cheap = tuple(m for m in metrics if m != "pearson_edistance")
    contexts = []
    for ctx, r_rows, _ in pairs:
        side = reference_prediction(real, r_rows, control, kind)
        res = compute_metrics(
            real.X[r_rows],
            real.labels[r_rows],
            side.X,
            side.labels,
            genes,
            control,
            profile=cheap,
            fdr=fdr,
            extras=False,
            progress=tick,
            parallel=parallel,
        )
        if "pearson_edistance" in metrics:
            res.results["pearson_edistance"] = pd.array([np.nan] * len(res.results), dtype="Float64")
            res.results = res.results[["perturbation", *[m for m in metrics if m in res.results]]]
            res.agg = aggregate(res.results)
        contexts.append(ContextResult(ctx, res))
    return Evaluation(kind, contexts)


# --------------------------------------------------------------------------- pipeline


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Set torch's intra-op thread count for the block, then restore it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def parse_baselines(specs: list[str] | None) -> dict[str, Path]:
    """`["additive=runs/additive.h5ad", ...]` (repeatable `--baseline NAME=PATH`) as a dict."""
    out: dict[str, Path] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ScaleError(f"--baseline {spec!r} is not NAME=PATH", "write it as --baseline additive=additive.h5ad")
        if name.strip() in out:
            raise ScaleError(f"baseline name {name.strip()!r} is given twice", "give each baseline its own name")
        out[name.strip()] = Path(path.strip())
    return out


def _evaluate_side(
    name: str,
    real: Side,
    pred: Side,
    pairs: list[tuple[str | None, np.ndarray, np.ndarray]],
    genes: np.ndarray,
    control: str,
    metrics: tuple[str, ...],
    fdr: float,
    extras: bool,
    tick: Callable[[int], None],
    parallel: bool = True,
) -> Evaluation:
    contexts = []
    for ctx, r_rows, p_rows in pairs:
        logger.info("scoring %s%s", name, "" if ctx is None else f" in context {ctx}")
        res = compute_metrics(
            real.X[r_rows],
            real.labels[r_rows],
            pred.X[p_rows],
            pred.labels[p_rows],
            genes,
            control,
            profile=metrics,
            fdr=fdr,
            extras=extras,
            progress=tick,
            parallel=parallel,
        )
        contexts.append(ContextResult(ctx, res))
    return Evaluation(name, contexts)


def _work_units(pairs: list, real: Side, control: str, per_cell: bool) -> int:
    """Progress steps of `compute_metrics` over all contexts (4, plus one per perturbation when
    cell-level energy distances are computed)."""
    total = 0
    for _, rows, _ in pairs:
        n_perts = np.unique(real.labels[rows][real.labels[rows] != control]).size
        total += 4 + (n_perts if per_cell else 0)
    return total


def _load_prediction(path: str | Path, role: str, pert_col: str, context_col: str | None, genes_from) -> Side:
    adata = _anndata.read_h5ad(path, role)
    _anndata.check_genes(genes_from, adata, role)
    return _anndata.load_side(adata, role, pert_col, context_col)


def _write_evaluation(ev: Evaluation, directory: Path, prefix: str = "", write_de: bool = False) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_csv(ev.results, directory / f"{prefix}results.csv")
    write_csv(ev.agg, directory / f"{prefix}agg_results.csv")
    extras = ev.extras
    if extras.shape[1] > (2 if "context" in extras else 1):
        write_csv(extras, directory / f"{prefix}results_extra.csv")
    for c in ev.contexts:
        if c.context is not None:
            ctx = _safe_name(c.context)
            write_csv(c.metrics.results, directory / f"{prefix}{ctx}_results.csv")
            write_csv(c.metrics.agg, directory / f"{prefix}{ctx}_agg_results.csv")
        if write_de and c.metrics.real_de is not None and c.metrics.pred_de is not None:
            ctx_prefix = "" if c.context is None else f"{_safe_name(c.context)}_"
            c.metrics.real_de.to_frame().to_csv(directory / f"{prefix}{ctx_prefix}real_de.csv", index=False)
            c.metrics.pred_de.to_frame().to_csv(directory / f"{prefix}{ctx_prefix}pred_de.csv", index=False)


def run_evaluate(
    pred_path: str | Path,
    real_path: str | Path,
    pert_col: str,
    control: str,
    output_dir: str | Path,
    context_col: str | None = None,
    profile: str = "full",
    baselines: Mapping[str, str | Path] | None = None,
    overwrite: bool = False,
    *,
    report: bool = True,
    references: bool | None = None,
    write_de: bool = False,
    fdr: float = 0.05,
    progress: bool = True,
    threads: int | None = None,
) -> EvaluateOutput:
    """Score PRED against REAL with cell-eval's metrics and write results, agg and a report.

    `baselines` maps a name to another prediction h5ad, scored the same way and shown beside
    the model. `references` (default: with the report) also scores the two degenerate
    predictions of `REFERENCES`. `threads` (default: the cores this process may use) is
    split between the real and the predicted DE, which run side by side with threads // 2
    torch threads each: their many mid-sized ops scale better as two jobs than as one
    wide one, and stall less when other work shares the cores. Torch's own setting is
    restored afterwards. Raises `ScaleError` for bad input before writing anything.
    """
    start = time.perf_counter()
    output_dir = Path(output_dir)
    check_output_free(output_dir, overwrite, EVALUATION)
    if threads is not None and threads < 1:
        raise ScaleError(f"threads must be at least 1, got {threads}", "pass --threads 1 or more")
    threads = threads or available_cores()
    if not 0.0 < fdr < 1.0:
        raise ScaleError(f"--fdr must be between 0 and 1, got {fdr}", "pass e.g. --fdr 0.05")
    if profile not in PROFILES:
        raise ScaleError(f"unknown metric profile {profile!r}", f"choose one of {', '.join(sorted(PROFILES))}")
    metrics = _resolve_profile(profile)
    references = report if references is None else references
    baselines = dict(baselines or {})
    for name in baselines:
        if name in REFERENCES or name == "model" or not name or "/" in name:
            raise ScaleError(f"baseline name {name!r} is reserved or not a plain name", "rename the baseline")

    real_ad = _anndata.read_h5ad(real_path, "real")
    pred_ad = _anndata.read_h5ad(pred_path, "pred")
    genes = _anndata.check_genes(real_ad, pred_ad)
    real = _anndata.load_side(real_ad, "real", pert_col, context_col)
    pred = _anndata.load_side(pred_ad, "pred", pert_col, context_col)
    pairs = _anndata.context_pairs(real, pred, control)
    base_sides: dict[str, tuple[Side, list]] = {}
    for name, path in baselines.items():
        side = _load_prediction(path, f"baseline {name}", pert_col, context_col, real_ad)
        base_sides[name] = (side, _anndata.context_pairs(real, side, control))
    del pred_ad

    # Per-cell energy distances come with the profiles that need them for pearson_edistance.
    extras = "pearson_edistance" in metrics
    total = _work_units(pairs, real, control, extras) * (1 + len(base_sides))
    if references:
        total += _work_units(pairs, real, control, per_cell=False) * len(REFERENCES)
    with (
        torch_threads(max(1, threads // 2)),
        tqdm(total=total, desc="evaluate", unit="step", disable=not progress, leave=False) as bar,
    ):
        tick = bar.update
        par = threads >= 2
        model = _evaluate_side("model", real, pred, pairs, genes, control, metrics, fdr, extras, tick, par)
        others: dict[str, Evaluation] = {}
        for name, (side, side_pairs) in base_sides.items():
            others[name] = _evaluate_side(name, real, side, side_pairs, genes, control, metrics, fdr, extras, tick, par)
        if references:
            for kind in REFERENCES:
                others[kind] = _evaluate_reference(kind, real, pairs, genes, control, metrics, fdr, tick, par)

    out = EvaluateOutput(output_dir=output_dir, model=model, baselines=others)
    with atomic_dir(output_dir, overwrite=overwrite, kind=EVALUATION) as tmp:
        _write_evaluation(model, tmp, write_de=write_de)
        for name, ev in others.items():
            _write_evaluation(ev, tmp / "baselines", prefix=f"{name}_")
        if report:
            from bionemo_scale.eval.report import write_report

            write_report(
                tmp,
                out,
                real=real,
                pred=pred,
                pairs=pairs,
                genes=genes,
                control=control,
                inputs={
                    "pred": str(pred_path),
                    "real": str(real_path),
                    "pert_col": pert_col,
                    "control": control,
                    "context_col": context_col,
                    "profile": profile,
                    "de": needs_de(metrics),
                },
            )
        out.seconds = time.perf_counter() - start
        (tmp / "run.json").write_text(
            json.dumps(
                {
                    "pred": str(pred_path),
                    "real": str(real_path),
                    "pert_col": pert_col,
                    "control": control,
                    "context_col": context_col,
                    "profile": profile,
                    "metrics": list(metrics),
                    "fdr": fdr,
                    "baselines": {k: str(v) for k, v in baselines.items()},
                    "references": list(REFERENCES) if references else [],
                    "seconds": round(out.seconds, 3),
                    "cell_eval_parity": "0.8.2 (clustering_agreement not computed)",
                },
                indent=2,
            )
            + "\n"
        )
    logger.info("evaluation written to %s in %.1f s", output_dir, out.seconds)
    return out
