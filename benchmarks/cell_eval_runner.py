"""Run `cell-eval run` in the comparison virtualenv and record how long it took.

cell-eval 0.8.2 needs numpy 2, which cannot share a venv with megatron-core's numpy, so
the parity tests and `benchmarks/metrics.py` call this script with the *bench* venv's
python (`.venv-bench/bin/python`, or `$BIONEMO_SCALE_BENCH_PYTHON`):

    .venv-bench/bin/python benchmarks/cell_eval_runner.py --real REAL.h5ad --pred PRED.h5ad \\
        --pert-col target --control control --outdir OUT [--celltype-col cell_type]

OUT then holds cell-eval's own files (results.csv, agg_results.csv, real_de.csv,
pred_de.csv; prefixed by cell type with --celltype-col) and `timing.json` with the wall
time of the `cell-eval run` call itself (imports included, interpreter start excluded).
This file imports nothing from bionemo_scale and runs only in the bench venv.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

_START = time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", required=True)
    parser.add_argument("--pred", required=True)
    parser.add_argument("--pert-col", required=True)
    parser.add_argument("--control", required=True)
    parser.add_argument("--outdir", required=True)
    parser.add_argument("--celltype-col", default=None)
    parser.add_argument("--profile", default="full")
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--skip-metrics", default=None, help="comma-separated cell-eval metric names")
    args = parser.parse_args(argv)

    from cell_eval.__main__ import main as cell_eval_main  # the `cell-eval` console script

    command = [
        "cell-eval",
        "run",
        "--adata-pred",
        args.pred,
        "--adata-real",
        args.real,
        "--pert-col",
        args.pert_col,
        "--control-pert",
        args.control,
        "--outdir",
        args.outdir,
        "--profile",
        args.profile,
        "--num-threads",
        str(args.num_threads),
    ]
    if args.celltype_col:
        command += ["--celltype-col", args.celltype_col]
    if args.skip_metrics:
        command += ["--skip-metrics", args.skip_metrics]
    old_argv = sys.argv
    sys.argv = command
    started = time.perf_counter()
    try:
        cell_eval_main()
    finally:
        sys.argv = old_argv
    finished = time.perf_counter()

    import importlib.metadata

    import numpy

    timing = {
        "cell_eval_version": importlib.metadata.version("cell-eval"),
        "numpy_version": numpy.__version__,
        "seconds_run": round(finished - started, 4),
        "seconds_total": round(finished - _START, 4),
        "command": command,
    }
    Path(args.outdir, "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
