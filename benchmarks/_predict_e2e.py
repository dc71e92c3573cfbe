"""End-to-end prediction, ours vs STATE, each through its own command (throughput.py's part `predict`).

The model-only rows (part `infer`) time one forward pass on cells already in memory. A user
runs a command instead, `bionemo-scale predict` or `state tx predict`, and both read the
held-out groups' control cells from disk, run the model at NFE=1 and write AnnData. The paper's
inference claim (1.29x cells/s over STATE) is of this kind: it credits the data pipeline.

Protocol:
- Two splits of one context, K_small and K_large held-out perturbations (the large set holds
  the small one), written once as cell-load TOML, which both tools read (`held_out_splits`).
- Both models are trained for a few steps on the large split by the caller: the weights do not
  change the cost of a forward pass.
- Each command runs at both sizes, interleaved over rounds. Its rate is
  (N_large - N_small) / (wall_large - wall_small) per round, median over rounds: the per-command
  fixed costs (imports, loading the checkpoint, cell-load's set-up, our additive priors, the
  context's control cells that our REAL/PRED files carry) cancel, and what is left is the cost
  of each further predicted cell, data loading and output writing included.
- Both at their defaults: ours samples the count lattice and writes PRED+REAL.h5ad (CSR), STATE
  writes adata_pred/adata_real.h5ad (dense) with `--predict-only` (no cell-eval metrics).
- Cells are the cells each tool predicted: the held-out cells for ours; for STATE also the
  control cells that cell-load puts in its test split, which it pushes through the model as well.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _bench_util import ChildRun, run_measured, thread_env

logger = logging.getLogger("benchmarks.predict_e2e")


@dataclass
class SplitFile:
    """One held-out split: its TOML and how many perturbed cells it holds out."""

    label: str
    path: Path
    pairs: int
    cells: int


@dataclass
class Command:
    """A prediction command at one split size, and its timed runs."""

    tool: str
    label: str
    split: str
    cells: int
    argv: list[str]
    runs: list[dict[str, Any]] = field(default_factory=list)


def held_out_splits(processed: Path, cell_load_dir: Path, out: Path, sizes: tuple[int, int]) -> list[SplitFile]:
    """TOML splits holding out the first K perturbations of one context, for each K in `sizes`.

    The context is the one with the most perturbations (the first such). When it has too few for
    the large split (the small bundled fallback data), the sizes shrink to fit, with a warning:
    at least one perturbation must stay in training.
    """
    from bionemo_scale.data.store import ProcessedDataset

    if not 0 < sizes[0] < sizes[1]:
        raise ValueError(f"split sizes must be 0 < small < large, got {sizes}")
    data = ProcessedDataset(processed)
    # cell-load keys a context by "<dataset>.<context>"; ours accepts the prefix only when it is the
    # data's own dataset name, so both tools read the one file under that name
    name, idx = data.dataset_name or "bench", data.index
    g = idx.groups
    perturbed = g[g["pert_id"] > 0]
    counts = perturbed.groupby("context_id")["pert_id"].nunique()
    ctx = int(counts.idxmax())
    in_ctx = perturbed[perturbed["context_id"] == ctx]
    perts = sorted(set(in_ctx["pert_id"].tolist()))
    if len(perts) <= sizes[1]:
        large = len(perts) - 1
        fitted = (max(1, min(sizes[0], large // 4)), large)
        if not 0 < fitted[0] < fitted[1]:
            raise ValueError(f"context {idx.contexts[ctx]!r} has only {len(perts)} perturbations: too few to time")
        logger.warning(
            "context %r has %d perturbations: holding out %d and %d instead of %d and %d",
            idx.contexts[ctx], len(perts), *fitted, *sizes,
        )  # fmt: skip
        sizes = fitted
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for k in sizes:
        chosen = perts[:k]
        held = in_ctx[in_ctx["pert_id"].isin(chosen)]
        labels = [idx.perturbations[p] for p in chosen]
        path = out / f"split_{k}pairs.toml"
        path.write_text(
            f'[datasets]\n{name} = "{cell_load_dir.resolve()}"\n\n[training]\n{name} = "train"\n\n'
            f'[zeroshot]\n\n[fewshot."{name}.{idx.contexts[ctx]}"]\n'
            f"test = {json.dumps(labels)}\n"
        )
        files.append(SplitFile(f"{k} pairs", path, k, int((held["end"] - held["start"]).sum())))
    return files


def ours_command(
    bin_dir: Path, run_dir: Path, processed: Path, split: SplitFile, out: Path, steps: int, autocast: str = "off"
) -> list[str]:
    tag = "" if autocast == "off" else f"_{autocast}"
    return [
        str(bin_dir / "bionemo-scale"),
        "predict",
        "--checkpoint",
        str(run_dir),
        "--data",
        str(processed),
        "--split",
        str(split.path),
        "--output",
        str(out / f"ours_nfe{steps}{tag}_{split.pairs}" / "PRED.h5ad"),
        "--steps",
        str(steps),
        "--autocast",
        autocast,
        "--overwrite",
    ]


def state_command(
    state_bin: Path, run_dir: Path, checkpoint: str, split: SplitFile, launcher: list[str] | None = None
) -> list[str]:
    """`state tx predict ...`; `launcher` replaces the `state` executable (a python and a wrapper script)."""
    return [
        *(launcher or [str(state_bin)]),
        "tx",
        "predict",
        "--output-dir",
        str(run_dir),
        "--checkpoint",
        checkpoint,
        "--toml",
        str(split.path),
        "--predict-only",
    ]


def take_state_output(run_dir: Path, checkpoint: str, pert_col: str, control: str) -> tuple[int, int] | None:
    """(all, perturbed) rows of the adata_pred.h5ad `state tx predict` wrote, or None; then removes it.

    cell-load's test split also holds some of the context's control cells, and STATE predicts
    those too: they are part of its work, so its rate counts every row it wrote. Removing the
    folder means the next run's count can never be a stale file's.
    """
    import anndata as ad

    folder = run_dir / f"eval_{checkpoint}"
    path = folder / "adata_pred.h5ad"
    if not path.exists():
        return None
    a = ad.read_h5ad(path, backed="r")
    try:
        n, perturbed = a.n_obs, int((a.obs[pert_col].astype(str) != control).sum())
    finally:
        a.file.close()
    shutil.rmtree(folder)
    return n, perturbed


def run_rounds(
    commands: list[Command],
    rounds: int,
    threads: int,
    omp_wait_policy: str | None,
    logs: Path,
    timeout_s: float,
    after_run: Callable[[Command, dict[str, Any]], dict[str, Any]] | None = None,
) -> None:
    """Every command once per round, in order; wall time, peak RSS and load of each run.

    `after_run(command, run)` may check a run's output and returns extra fields for its record.
    """
    env = thread_env(threads, omp_wait_policy)
    env.update({"WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"})
    for r in range(rounds):
        for c in commands:
            logger.info("[predict] round %d/%d: %s, %s (%d held-out cells)", r + 1, rounds, c.label, c.split, c.cells)
            child: ChildRun = run_measured(
                c.argv, env=env, log_path=logs / f"{_safe(c.label)}_{_safe(c.split)}_r{r}.log", timeout_s=timeout_s
            )
            run = {
                "wall_s": child.wall_s,
                "returncode": child.returncode,
                "peak_rss_mb": child.peak_rss_mb,
                "peak_anon_mb": child.peak_anon_mb,
                "load_before": child.load_before,
                "load_after": child.load_after,
            }
            if child.returncode != 0:
                run["error"] = child.tail(12)
                logger.error("[predict] %s failed:\n%s", c.label, run["error"])
            run["predicted_cells"] = c.cells
            if after_run is not None:
                run.update(after_run(c, run))
            c.runs.append(run)
            logger.info("[predict]   %.1f s wall, peak RSS %.0f MB", child.wall_s, child.peak_rss_mb)


def marginal_rates(small: Command, large: Command) -> list[float]:
    """Per round: extra predicted cells over extra wall time between the large and the small split."""
    rates = []
    for a, b in zip(small.runs, large.runs, strict=True):
        if a["returncode"] or b["returncode"]:
            continue
        dt = b["wall_s"] - a["wall_s"]
        rates.append((b["predicted_cells"] - a["predicted_cells"]) / dt if dt > 0 else float("nan"))
    return rates


def summarise(pairs: dict[str, tuple[Command, Command]]) -> dict[str, Any]:
    """Median marginal rate, median wall times and the largest RSS, per tool/setting."""
    out: dict[str, Any] = {}
    for name, (small, large) in pairs.items():
        rates = marginal_rates(small, large)
        ok = [r for r in rates if r == r]
        out[name] = {
            "cells_per_s": statistics.median(ok) if ok else float("nan"),
            "rates": rates,
            "held_out_cells": [small.cells, large.cells],
            "predicted_cells": [_median_of(small, "predicted_cells"), _median_of(large, "predicted_cells")],
            "wall_s": [_median_of(small, "wall_s"), _median_of(large, "wall_s")],
            "peak_rss_mb": max((x["peak_rss_mb"] for x in small.runs + large.runs), default=float("nan")),
            "peak_anon_mb": max((x["peak_anon_mb"] for x in small.runs + large.runs), default=float("nan")),
            "load_1m": [
                min(x["load_before"]["loadavg_1m"] for x in small.runs + large.runs),
                max(x["load_after"]["loadavg_1m"] for x in small.runs + large.runs),
            ],
            "commands": [asdict(small), asdict(large)],
            "errors": [x["error"] for x in small.runs + large.runs if "error" in x],
        }
    return out


def _median_of(c: Command, key: str) -> float:
    ok = [x[key] for x in c.runs if x["returncode"] == 0]
    return statistics.median(ok) if ok else float("nan")


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_")
