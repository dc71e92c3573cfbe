"""Model selection on VALIDATION pairs only (never the test pairs): train variants, score val.

    .venv/bin/python benchmarks/tune.py --case b --variant name key=value ... [--seeds 0 1] [--steps 400]

Appends one line per (variant, seed) to bench_out/tune/tune_rows.csv; benchmarks/RESULTS_LOG.md
summarises what was tried and what each attempt did.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from quality import CLI, prepare_case, scale_overrides, sh  # noqa: E402

METRICS = ("pearson_delta", "overlap_at_N", "precision_at_N", "discrimination_score_l1", "mae", "de_direction_match")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--case", required=True, choices=["a", "b", "c"])
    ap.add_argument("--variant", required=True)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--baselines", action="store_true", help="also score the baselines on val")
    ap.add_argument("--combinations", choices=["direct", "compose"], help="predict's --combinations")
    ap.add_argument("--prior-rank", help="with --variant baselines: also additive on the low-rank prior (K or auto)")
    ap.add_argument("--reuse", help="predict with the trained runs of this variant instead of training")
    ap.add_argument("--predict-autocast", choices=["off", "bf16"], default="off", help="predict's --autocast")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "tune")
    args = ap.parse_args()
    data, split, _ = prepare_case(args.case, REPO / "bench_out" / "quality" / "data")
    rows_path = args.out / "tune_rows.csv"
    from bionemo_scale.eval.evaluate import run_evaluate

    for seed in args.seeds:
        base = args.out / f"case_{args.case}" / args.variant / f"seed{seed}"
        preds = {}
        if args.variant != "baselines":
            start = time.perf_counter()
            run = base / "run"
            if args.reuse:
                run = args.out / f"case_{args.case}" / args.reuse / f"seed{seed}" / "run"
            else:
                shutil.rmtree(run, ignore_errors=True)  # fresh: `train` would resume an old run's checkpoints
                sh([*CLI, "train", "--recipe", "tiny_cpu", "--data", str(data), "--split", str(split), "--output",
                    str(run), *scale_overrides(args.steps, seed), *args.overrides], base.with_suffix(".train.log"))  # fmt: skip
            wall = time.perf_counter() - start
            extra = ["--combinations", args.combinations] if args.combinations else []
            extra += ["--autocast", args.predict_autocast]
            sh([*CLI, "predict", "--checkpoint", str(run), "--data", str(data), "--split", str(split),
                "--subset", "val", "--output", str(base / "PRED.h5ad"), "--overwrite", *extra], base.with_suffix(".pred.log"))  # fmt: skip
            preds[args.variant] = base / "PRED.h5ad"
        else:
            wall = 0.0
            runs = [(m, m, []) for m in ("additive", "context-mean", "control")]
            runs.append(("additive-centred", "additive", ["--center-controls"]))
            if args.prior_rank:
                runs.append(("additive-lowrank", "additive", ["--prior-rank", args.prior_rank]))
                runs.append(
                    ("additive-lowrank-centred", "additive", ["--prior-rank", args.prior_rank, "--center-controls"])
                )
            for name, m, extra in runs:
                sh([*CLI, "baseline", "--method", m, "--data", str(data), "--split", str(split), "--subset", "val",
                    "--output", str(base / name / "PRED.h5ad"), "--overwrite", *extra], base.with_suffix(f".{name}.log"))  # fmt: skip
                preds[name] = base / name / "PRED.h5ad"
        for name, pred in preds.items():
            out = base / "eval" / name
            run_evaluate(pred, pred.with_name("REAL.h5ad"), "perturbation", "control", out, context_col="context",
                         profile="full", overwrite=True, report=False, progress=False)  # fmt: skip
            res = pd.read_csv(out / "results.csv")
            overrides = " ".join(args.overrides + ([f"reuse={args.reuse}"] if args.reuse else [])
                                 + ([f"combinations={args.combinations}"] if args.combinations else [])
                                 + ([f"predict_autocast={args.predict_autocast}"] if args.predict_autocast != "off" else []))  # fmt: skip
            row = {"case": args.case, "variant": name, "seed": seed, "steps": args.steps,
                   "overrides": overrides, "train_s": round(wall, 1)}  # fmt: skip
            row.update({m: round(float(res[m].mean()), 4) for m in METRICS})
            new = not rows_path.exists()
            with rows_path.open("a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    w.writeheader()
                w.writerow(row)
            print(row, flush=True)


if __name__ == "__main__":
    main()
