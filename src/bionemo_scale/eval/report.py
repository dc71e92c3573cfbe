"""`report.md` and its PNG plots for `bionemo-scale evaluate`.

Four figures, each answering one question a reviewer asks of a virtual-cell model:

- `delta_scatter.png`: does the predicted change from control follow the observed one,
  gene by gene, for the strongest perturbations (PDCorr r in each title)?
- `metric_bars.png`: does the model beat the baselines, and the degenerate references
  (control mean, all zeros) that expose regression-to-the-mean inflation of PDCorr?
- `pca.png`: do the predicted cells land where the real perturbed cells are, away from
  the controls (cell-level, not only the mean)?
- `de_overlap.png`: are the predicted DE genes specific to the right perturbation (a
  bright diagonal), or the same generic response everywhere (bright columns)?

Figures are drawn on matplotlib's Agg canvas without pyplot, so no global backend is touched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from bionemo_scale.eval.metrics import HIGHER_IS_BETTER

if TYPE_CHECKING:
    from bionemo_scale.eval._anndata import Side
    from bionemo_scale.eval.evaluate import EvaluateOutput, Evaluation

logger = logging.getLogger(__name__)

KEY_METRICS = (
    "pearson_delta",
    "mae",
    "mse_delta",
    "discrimination_score_l1",
    "overlap_at_N",
    "precision_at_N",
    "de_direction_match",
    "de_sig_genes_recall",
    "de_spearman_lfc_sig",
    "roc_auc",
    "pr_auc",
    "pearson_edistance",
)
_MAX_PANELS = 12
_MAX_PCA = 6
_MAX_HEATMAP = 30


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png")


def _grid(n: int, cols: int) -> tuple[int, int]:
    cols = max(1, min(cols, n))
    return int(np.ceil(n / cols)), cols


def _label(pert: str, ctx: str | None) -> str:
    return pert if ctx is None else f"{pert} ({ctx})"


def _top_pairs(model: Evaluation, n: int) -> list[tuple[int, int]]:
    """(context index, perturbation index) of the n strongest real responses."""
    scored = []
    for ci, c in enumerate(model.contexts):
        norms = np.linalg.norm(c.metrics.pseudobulk.real_delta, axis=1)
        scored += [(float(v), ci, pi) for pi, v in enumerate(norms)]
    scored.sort(key=lambda t: -t[0])
    return [(ci, pi) for _, ci, pi in scored[:n]]


def plot_delta_scatter(model: Evaluation, path: Path) -> None:
    pairs = _top_pairs(model, _MAX_PANELS)
    rows, cols = _grid(len(pairs), 4)
    fig = _figure(3.2 * cols, 3.0 * rows)
    for k, (ci, pi) in enumerate(pairs):
        ctx = model.contexts[ci]
        pb = ctx.metrics.pseudobulk
        x, y = pb.real_delta[pi], pb.pred_delta[pi]
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.scatter(x, y, s=4, alpha=0.5, color="tab:blue", linewidths=0)
        lim = float(np.nanmax(np.abs(np.concatenate([x, y])))) or 1.0
        ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--")
        ax.axhline(0, color="lightgrey", lw=0.6)
        ax.axvline(0, color="lightgrey", lw=0.6)
        r = np.corrcoef(x, y)[0, 1] if np.std(x) > 0 and np.std(y) > 0 else float("nan")
        ax.set_title(f"{_label(str(pb.perts[pi]), ctx.context)}\nr = {r:.3f}", fontsize=8)
        ax.set_xlabel("observed Δ", fontsize=7)
        ax.set_ylabel("predicted Δ", fontsize=7)
        ax.tick_params(labelsize=6)
    _save(fig, path)


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _agg_means(ev: Evaluation) -> pd.Series:
    res = ev.results
    cols = [c for c in res.columns if c not in ("perturbation", "context")]
    return pd.Series({c: _nanmean(res[c].to_numpy(dtype=float, na_value=np.nan)) for c in cols})


def summary_table(out: EvaluateOutput) -> pd.DataFrame:
    """Mean of every key metric (rows) for the model, each baseline and each reference (columns)."""
    frames = {"model": _agg_means(out.model)}
    frames.update({name: _agg_means(ev) for name, ev in out.baselines.items()})
    table = pd.DataFrame(frames)
    keep = [m for m in KEY_METRICS if m in table.index]
    return table.loc[keep]


def plot_metric_bars(table: pd.DataFrame, path: Path) -> None:
    names = list(table.columns)
    colours = {"model": "tab:blue", "control_mean": "lightgrey", "all_zeros": "darkgrey"}
    palette = iter(["tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
    colour = [colours.get(n) or next(palette, "tab:red") for n in names]
    rows, cols = _grid(len(table.index), 4)
    fig = _figure(3.0 * cols, 2.6 * rows)
    for k, metric in enumerate(table.index):
        ax = fig.add_subplot(rows, cols, k + 1)
        values = table.loc[metric].to_numpy(dtype=float)
        ax.bar(range(len(names)), np.nan_to_num(values), color=colour)
        for i, v in enumerate(values):
            ax.text(
                i, 0 if np.isnan(v) else v, "n/a" if np.isnan(v) else f"{v:.3g}", ha="center", va="bottom", fontsize=6
            )
        better = "higher" if HIGHER_IS_BETTER.get(metric, True) else "lower"
        ax.set_title(f"{metric} ({better} is better)", fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=6)
    _save(fig, path)


def _dense(X) -> np.ndarray:
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def plot_pca(model: Evaluation, real: Side, pred: Side, pairs: list, control: str, path: Path, seed: int = 0) -> None:
    """Real controls, real perturbed and predicted cells on the real cells' first two PCs."""
    rng = np.random.default_rng(seed)
    chosen = _top_pairs(model, _MAX_PCA)
    rows, cols = _grid(len(chosen), 3)
    fig = _figure(3.4 * cols, 3.2 * rows)
    for k, (ci, pi) in enumerate(chosen):
        ctx = model.contexts[ci]
        pert = str(ctx.metrics.pseudobulk.perts[pi])
        _, r_rows, p_rows = pairs[ci]
        r_lab, p_lab = real.labels[r_rows], pred.labels[p_rows]

        def sample(idx: np.ndarray, cap: int = 300) -> np.ndarray:
            return idx if idx.size <= cap else rng.choice(idx, cap, replace=False)

        ctrl = _dense(real.X[r_rows[sample(np.flatnonzero(r_lab == control))]])
        obs = _dense(real.X[r_rows[sample(np.flatnonzero(r_lab == pert))]])
        prd = _dense(pred.X[p_rows[sample(np.flatnonzero(p_lab == pert))]])
        fit = np.vstack([ctrl, obs]).astype(np.float64)
        mean = fit.mean(0)
        _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
        comps = vt[:2].T
        if comps.shape[1] < 2:  # one gene (or one cell): plot it against a flat second axis
            comps = np.pad(comps, ((0, 0), (0, 2 - comps.shape[1])))
        ax = fig.add_subplot(rows, cols, k + 1)
        for data, name, colour in (
            (ctrl, "real control", "lightgrey"),
            (obs, "real", "tab:blue"),
            (prd, "predicted", "tab:orange"),
        ):
            z = (data - mean) @ comps
            ax.scatter(z[:, 0], z[:, 1], s=5, alpha=0.6, color=colour, label=name, linewidths=0)
        ax.set_title(_label(pert, ctx.context), fontsize=8)
        ax.set_xlabel("PC1", fontsize=7)
        ax.set_ylabel("PC2", fontsize=7)
        ax.tick_params(labelsize=6)
        if k == 0:
            ax.legend(fontsize=6, markerscale=2)
    _save(fig, path)


def de_overlap_matrix(model: Evaluation, fdr: float = 0.05) -> tuple[np.ndarray, list[str]]:
    """M[i, j] = |real DE of i ∩ predicted DE of j| / |real DE of i| for the perturbations
    with the most real DE genes (first context with DE tables)."""
    for c in model.contexts:
        if c.metrics.real_de is None or c.metrics.pred_de is None:
            continue
        real_sig = c.metrics.real_de.significant(fdr)
        pred_sig = c.metrics.pred_de.significant(fdr)
        n_real = real_sig.sum(1)
        top = np.argsort(-n_real, kind="stable")[:_MAX_HEATMAP]
        top = top[n_real[top] > 0]
        inter = real_sig[top].astype(np.float64) @ pred_sig[top].T.astype(np.float64)
        labels = [_label(str(p), c.context) for p in c.metrics.real_de.targets[top]]
        return inter / np.maximum(n_real[top], 1)[:, None], labels
    return np.zeros((0, 0)), []


def plot_de_overlap(matrix: np.ndarray, labels: list[str], path: Path) -> None:
    n = max(len(labels), 1)
    fig = _figure(2.5 + 0.22 * n, 2.0 + 0.22 * n)
    ax = fig.add_subplot(1, 1, 1)
    if matrix.size:
        im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of real DE genes recovered")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=6)
        ax.set_xlabel("predicted perturbation")
        ax.set_ylabel("real perturbation")
    else:
        ax.text(0.5, 0.5, "no perturbation has significant real DE genes", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("DE-gene overlap (diagonal: the right perturbation)", fontsize=9)
    _save(fig, path)


def _markdown_table(frame: pd.DataFrame, floatfmt: str = ".3f") -> str:
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    lines = [header, rule]
    for _, row in frame.iterrows():
        cells = []
        for v in row:
            if v is None or v is pd.NA:
                cells.append("n/a")
            elif isinstance(v, float | np.floating):
                cells.append("n/a" if np.isnan(v) else format(float(v), floatfmt))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pitfall_notes(table: pd.DataFrame) -> list[str]:
    notes = []
    for ref in ("all_zeros", "control_mean"):
        if ref not in table.columns:
            continue
        for metric in table.index:
            model, trivial = table.loc[metric, "model"], table.loc[metric, ref]
            if np.isnan(model) or np.isnan(trivial):
                continue
            higher = HIGHER_IS_BETTER.get(metric, True)
            margin = (trivial - model) if higher else (model - trivial)
            if margin > 1e-3:
                notes.append(
                    f"- **{metric}**: the degenerate `{ref}` reference scores {trivial:.3f}, better than the"
                    f" model ({model:.3f}). Do not read this metric alone."
                )
    return notes


def write_report(
    directory: Path,
    out: EvaluateOutput,
    *,
    real: Side,
    pred: Side,
    pairs: list,
    genes: np.ndarray,
    control: str,
    inputs: dict,
) -> Path:
    """Draw the figures into `directory/figures` and write `directory/report.md`."""
    figures = directory / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    model = out.model
    table = summary_table(out)
    plot_delta_scatter(model, figures / "delta_scatter.png")
    plot_metric_bars(table, figures / "metric_bars.png")
    plot_pca(model, real, pred, pairs, control, figures / "pca.png")
    heat, heat_labels = de_overlap_matrix(model)
    if inputs.get("de"):
        plot_de_overlap(heat, heat_labels, figures / "de_overlap.png")

    results = model.results
    n_pairs = len(results)
    lines = [
        "# bionemo-scale evaluation",
        "",
        f"Prediction `{inputs['pred']}` scored against `{inputs['real']}`: {n_pairs} "
        + ("(context, perturbation) pairs" if inputs.get("context_col") else "perturbations")
        + f", {genes.size} genes, profile `{inputs['profile']}`. Metrics follow cell-eval 0.8.2;"
        " `results.csv` and `agg_results.csv` can be compared with cell-eval's directly.",
        "",
        "| input | value |",
        "|---|---|",
        f"| perturbation column | `{inputs['pert_col']}` |",
        f"| control label | `{inputs['control']}` |",
        f"| context column | `{inputs.get('context_col') or '-'}` |",
        f"| real cells | {real.labels.size} |",
        f"| predicted cells | {pred.labels.size} |",
        "",
        "## Model against baselines",
        "",
        "Mean over perturbations. `control_mean` predicts every perturbed cell as the mean control"
        " cell; `all_zeros` predicts zero expression. Both are built from the real data alone: a"
        " metric on which they match the model measures the data, not the model.",
        "",
        _markdown_table(table.reset_index(names="metric")),
        "",
    ]
    notes = _pitfall_notes(table)
    if notes:
        lines += ["**Read with care:**", "", *notes, ""]
    lines += [
        "![metric bars](figures/metric_bars.png)",
        "",
        "## Predicted against observed change from control",
        "",
        "Each point is a gene; r is PDCorr (cell-eval `pearson_delta`) for that perturbation.",
        "",
        "![delta scatter](figures/delta_scatter.png)",
        "",
        "## Cells",
        "",
        "Real control, real perturbed and predicted cells on the first two principal components of the real cells.",
        "",
        "![pca](figures/pca.png)",
        "",
    ]
    if inputs.get("de"):
        lines += [
            "## Differential expression",
            "",
            "Rows: real perturbations; columns: predicted ones. Each cell is the share of the row's real"
            " DE genes (FDR < 0.05, Mann-Whitney vs control, BH) that the column's prediction also calls.",
            "",
            "![de overlap](figures/de_overlap.png)",
            "",
        ]
    if "pearson_delta" in results:
        order = results.assign(_r=results["pearson_delta"].to_numpy(dtype=float, na_value=np.nan))
        order = order.sort_values("_r", ascending=False, na_position="last")
        keep = [c for c in ("perturbation", "context", "pearson_delta", "mae", "overlap_at_N") if c in order]
        lines += [
            "## Best and worst perturbations by PDCorr",
            "",
            _markdown_table(pd.concat([order.head(5), order.tail(5)])[keep].astype(object)),
            "",
        ]
    lines += [
        "## Files",
        "",
        "- `results.csv`, `agg_results.csv`: cell-eval format (no `clustering_agreement` column).",
        "- `results_extra.csv`: energy distance per perturbation (real vs control, predicted vs control,"
        " predicted vs real).",
        "- `baselines/`: the same tables for each baseline and reference.",
        "",
    ]
    path = directory / "report.md"
    path.write_text("\n".join(lines))
    return path
