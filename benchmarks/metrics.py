"""Wall time of `bionemo-scale evaluate` against `cell-eval run` (full profile), same files.

For each size (default 20 and 200 perturbations x 100 cells x 2,000 genes, 500 control
cells) it writes a synthetic real/predicted h5ad pair (sparse float32, log1p-normalised;
`bionemo_scale.eval._synthetic.make_pair`) and times, over `--repeats` runs each:

- **ours, subprocess**: a fresh interpreter that imports bionemo_scale and calls
  `run_evaluate(..., report=False)` (metrics + results.csv + agg_results.csv, the same work
  and outputs as `cell-eval run`), timed from outside: interpreter start and imports included.
- **ours, in process**: the `run_evaluate` call alone, imports excluded.
- **cell-eval**: `benchmarks/cell_eval_runner.py` in the comparison venv (`cell-eval run
  --profile full --num-threads N`), timed from outside the same way.

It reports medians, the speed-up (cell-eval median / our subprocess median), and whether
the numbers agree: every results.csv value within 1e-6, except the documented cases
(`pearson_edistance` on float32 input within 1e-4; top-K overlaps whose cut falls inside a
run of tied |log2FC|, bounded by the tied share). A markdown table goes to stdout and the
raw figures to a JSON file.

    .venv/bin/python benchmarks/metrics.py [--sizes 20,200] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_PYTHON = Path(os.environ.get("BIONEMO_SCALE_BENCH_PYTHON", REPO_ROOT / ".venv-bench" / "bin" / "python"))
RUNNER = REPO_ROOT / "benchmarks" / "cell_eval_runner.py"

_OURS_SNIPPET = """
import sys, time
t0 = time.perf_counter()
from bionemo_scale.eval.evaluate import run_evaluate
t1 = time.perf_counter()
threads = None if sys.argv[4] == "default" else int(sys.argv[4])
run_evaluate(sys.argv[1], sys.argv[2], "target", "control", sys.argv[3], report=False, progress=False, threads=threads)
print(f"{t1 - t0:.4f} {time.perf_counter() - t1:.4f}")
"""


def make_files(workdir: Path, n_perts: int, cells: int, genes: int, controls: int, seed: int) -> tuple[Path, Path]:
    from bionemo_scale.eval._synthetic import make_pair

    real, pred = make_pair(n_perts=n_perts, cells_per_pert=cells, n_genes=genes, n_control=controls, seed=seed)
    d = workdir / f"p{n_perts}"
    d.mkdir(parents=True, exist_ok=True)
    real.write_h5ad(d / "real.h5ad")
    pred.write_h5ad(d / "pred.h5ad")
    return d / "real.h5ad", d / "pred.h5ad"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def time_ours_subprocess(real: Path, pred: Path, out: Path, threads: int | None) -> tuple[float, float, float]:
    """(wall incl. interpreter start, import seconds, run_evaluate seconds)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _OURS_SNIPPET, str(pred), str(real), str(out), str(threads or "default")],
        capture_output=True,
        text=True,
        env=_env(),
        check=False,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"our evaluate failed:\n{proc.stderr[-3000:]}")
    imports, run = (float(x) for x in proc.stdout.split()[-2:])
    return wall, imports, run


def time_ours_in_process(real: Path, pred: Path, out: Path, threads: int | None) -> float:
    from bionemo_scale.eval.evaluate import run_evaluate

    start = time.perf_counter()
    run_evaluate(pred, real, "target", "control", out, report=False, progress=False, threads=threads)
    return time.perf_counter() - start


def time_cell_eval(real: Path, pred: Path, out: Path, threads: int) -> float:
    cmd = [str(BENCH_PYTHON), str(RUNNER), "--real", str(real), "--pred", str(pred)]
    cmd += ["--pert-col", "target", "--control", "control", "--outdir", str(out), "--num-threads", str(threads)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"cell-eval failed:\n{proc.stderr[-3000:]}")
    return wall


def agreement(real_path: Path, pred_path: Path, ours: Path, theirs: Path) -> dict:
    """Compare results.csv cell by cell under the parity rules (see module docstring)."""
    import anndata as ad

    from bionemo_scale.eval import metrics as M
    from bionemo_scale.eval.de import differential_expression

    a = pd.read_csv(theirs / "results.csv", float_precision="round_trip")
    b = pd.read_csv(ours / "results.csv", float_precision="round_trip")
    real, pred = ad.read_h5ad(real_path), ad.read_h5ad(pred_path)
    genes = real.var_names.to_numpy()
    cmp = M.compare_de(
        differential_expression(real.X, real.obs["target"].to_numpy(), "control", genes),
        differential_expression(pred.X, pred.obs["target"].to_numpy(), "control", genes),
    )
    report: dict = {"rows_match": a.perturbation.tolist() == b.perturbation.tolist(), "columns": {}}
    ok = report["rows_match"]
    for col in a.columns[1:]:
        if col not in b.columns:
            report["columns"][col] = "not computed"
            continue
        x, y = a[col].to_numpy(float), b[col].to_numpy(float)
        same_nan = bool(np.array_equal(np.isnan(x), np.isnan(y)))
        diff = np.where(np.isnan(x) | np.isnan(y), 0.0, np.abs(x - y))
        tol = np.full(x.size, 1e-4 if col == "pearson_edistance" else 1e-6)
        if col.startswith(("overlap_at_", "precision_at_")):
            kind, k = col.split("_at_")
            tol[M.ambiguous_top_k(cmp, None if k == "N" else int(k), kind)] = 1.0  # tie order: see docstring
        col_ok = same_nan and bool((diff <= tol).all())
        ok &= col_ok
        report["columns"][col] = {"max_abs_diff": float(diff.max(initial=0.0)), "ok": col_ok}
    report["all_ok"] = bool(ok)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="20,200", help="perturbation counts, comma-separated")
    parser.add_argument("--cells", type=int, default=100)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--controls", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="cell-eval --num-threads")
    parser.add_argument(
        "--ours-threads",
        type=int,
        default=None,
        help="torch threads for our evaluate (run_evaluate(threads=...)); default: torch's own setting",
    )
    parser.add_argument("--workdir", default=None, help="where the h5ad files and outputs go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write the figures here (default: WORKDIR/metrics_benchmark.json)")
    args = parser.parse_args(argv)
    if not BENCH_PYTHON.exists():
        print(f"comparison venv not found at {BENCH_PYTHON}; run `make bench-venv`", file=sys.stderr)
        return 2

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bionemo_scale_metrics_bench_"))
    rows = []
    for n_perts in (int(s) for s in args.sizes.split(",")):
        real, pred = make_files(workdir, n_perts, args.cells, args.genes, args.controls, seed=n_perts)
        times: dict[str, list[float]] = {
            "ours_subprocess": [],
            "ours_imports": [],
            "ours_in_process": [],
            "cell_eval": [],
        }
        for r in range(args.repeats):
            wall, imports, _ = time_ours_subprocess(real, pred, workdir / f"ours_sub_{n_perts}_{r}", args.ours_threads)
            times["ours_subprocess"].append(wall)
            times["ours_imports"].append(imports)
            in_proc = time_ours_in_process(real, pred, workdir / f"ours_in_{n_perts}_{r}", args.ours_threads)
            times["ours_in_process"].append(in_proc)
            times["cell_eval"].append(time_cell_eval(real, pred, workdir / f"cell_eval_{n_perts}_{r}", args.threads))
            print(
                f"[{n_perts} perturbations, run {r + 1}/{args.repeats}] "
                + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
                file=sys.stderr,
            )
        med = {k: statistics.median(v) for k, v in times.items()}
        check = agreement(real, pred, workdir / f"ours_in_{n_perts}_0", workdir / f"cell_eval_{n_perts}_0")
        rows.append(
            {
                "perturbations": n_perts,
                "cells_per_perturbation": args.cells,
                "genes": args.genes,
                "control_cells": args.controls,
                "repeats": args.repeats,
                "ours_threads": args.ours_threads or "torch default",
                "cell_eval_threads": args.threads,
                "seconds": times,
                "median_seconds": med,
                "speedup_subprocess": med["cell_eval"] / med["ours_subprocess"],
                "speedup_in_process": med["cell_eval"] / med["ours_in_process"],
                "agreement": check,
            }
        )

    print(
        "| perturbations | cells | genes | cell-eval run (s) | ours, subprocess (s) | ours, in process (s) |"
        " speed-up (subprocess) | speed-up (in process) | numbers agree |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        m = row["median_seconds"]
        n_cells = row["perturbations"] * row["cells_per_perturbation"] + row["control_cells"]
        print(
            f"| {row['perturbations']} | {n_cells:,} | {row['genes']:,} | {m['cell_eval']:.2f} | "
            f"{m['ours_subprocess']:.2f} | {m['ours_in_process']:.2f} | {row['speedup_subprocess']:.1f}x | "
            f"{row['speedup_in_process']:.1f}x | {'yes' if row['agreement']['all_ok'] else 'NO'} |"
        )
    meta = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_end": os.getloadavg(),
        "note": "medians over repeats; subprocess timings include interpreter start and imports",
    }
    out = Path(args.json or workdir / "metrics_benchmark.json")
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"\nfigures written to {out}", file=sys.stderr)
    return 0 if all(r["agreement"]["all_ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
