"""Does averaging several SCALE models help? Seed ensembles on one case, scored like quality.py.

    .venv/bin/python benchmarks/ensemble.py --case b --train-only 0 1 2 3 4   # 5 of the 9 SCALE runs, ~16 min
    .venv/bin/python benchmarks/ensemble.py --case b                          # the other 4, then the table
    .venv/bin/python benchmarks/ensemble.py --case b --subset val             # the same runs on the val pairs

Why: on case b the single-model PDCorr varies by seed (0.82-0.87 on test) while each model's
error is a few genes it gets wrong in its own way, so the per-cell mean of several models should
keep the shared signal and cancel part of the seed noise. SCALE maps each control cell to its
perturbed state, and every seed predicts from the same control cells (`predict.plan_predictions`
does not depend on the training seed), so the members can be averaged cell by cell
(`bionemo-scale ensemble`).

Members are seeds 0 .. members*groups-1 with the case's quality.py settings; group k is the
ensemble of seeds k*members .. (k+1)*members-1, so the ensemble's spread over groups is a spread
over seeds, like the single models'. An ensemble costs `members` times the training of one model:
the table says so. STATE is not ensembled here (its adapter samples its own control cells per
seed, so its predictions cannot be averaged cell by cell).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from quality import (  # noqa: E402
    CASE_OVERRIDES,
    CLI,
    HEADLINE,
    SIZE,
    plot,
    prepare_case,
    prior_rank_of,
    scale_overrides,
    score,
    sh,
    summarise,
)

logger = logging.getLogger("ensemble")


def train_member(
    data: Path, split: Path, base: Path, steps: int, seed: int, case: str, subset: str, fresh: bool
) -> Path:
    """Train one seed (unless its run finished before) and predict the subset's pairs."""
    run, pred = base / "run", base / subset / "PRED.h5ad"
    done = (run / "config.yaml").exists() and (run / "checkpoints").exists() and (base / "train.done").exists()
    if fresh or not done:
        shutil.rmtree(run, ignore_errors=True)  # a fresh run: `train` would resume an old one's checkpoints
        (base / "train.done").unlink(missing_ok=True)
        sh([*CLI, "train", "--recipe", "tiny_cpu", "--data", str(data), "--split", str(split), "--output", str(run),
            *scale_overrides(steps, seed), *CASE_OVERRIDES.get(case, [])], base / "train.log")  # fmt: skip
        (base / "train.done").write_text(f"{steps}\n")
    if fresh or not pred.exists():
        sh([*CLI, "predict", "--checkpoint", str(run), "--data", str(data), "--split", str(split), "--subset", subset,
            "--output", str(pred), "--overwrite"], base / f"predict_{subset}.log")  # fmt: skip
    return pred


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="b", choices=["a", "b", "c"])
    ap.add_argument("--members", type=int, default=3, help="models per ensemble")
    ap.add_argument("--groups", type=int, default=3, help="ensembles (each of its own seeds) for the spread")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--subset", default="test", choices=["val", "test"])
    ap.add_argument("--fresh", action="store_true", help="retrain members whose runs exist")
    ap.add_argument(
        "--train-only", type=int, nargs="+", metavar="SEED",
        help="train and predict only these member seeds, then stop (splits the work into commands under 30 min)",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "ensemble")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    data, split, description = prepare_case(args.case, REPO / "bench_out" / "quality" / "data")
    out = args.out / f"case_{args.case}"
    seeds = list(range(args.members * args.groups))
    if args.train_only:
        for seed in args.train_only:
            train_member(data, split, out / f"seed{seed}", args.steps, seed, args.case, args.subset, args.fresh)
            logger.info("member seed %d done", seed)
        return
    preds = {}
    for seed in seeds:
        preds[seed] = train_member(
            data, split, out / f"seed{seed}", args.steps, seed, args.case, args.subset, args.fresh
        )
        logger.info("member seed %d: %s", seed, preds[seed])

    rows = []
    for seed in seeds:
        res = score(preds[seed], out / f"seed{seed}" / args.subset / "eval")
        rows.append({"method": "scale", "group": seed, **{m: float(res[m].mean()) for m in HEADLINE}})
    for k in range(args.groups):
        members = [preds[s] for s in seeds[k * args.members : (k + 1) * args.members]]
        pred = out / args.subset / f"ensemble{k}" / "PRED.h5ad"
        sh([*CLI, "ensemble", *map(str, members), "--output", str(pred), "--overwrite"], pred.parent / "ensemble.log")
        res = score(pred, pred.parent / "eval")
        rows.append(
            {"method": f"scale x{args.members} ensemble", "group": k, **{m: float(res[m].mean()) for m in HEADLINE}}
        )
    base = out / args.subset / "baselines"
    runs = [("additive", []), ("additive-lattice", ["--count-lattice"]), ("additive-centred", ["--center-controls"])]
    if prior_rank_of(CASE_OVERRIDES.get(args.case, [])) is not None:
        runs.append(("additive-lowrank", ["--prior-rank", prior_rank_of(CASE_OVERRIDES[args.case])]))
    for name, extra in runs:
        path = base / name / "PRED.h5ad"
        sh([*CLI, "baseline", "--method", "additive", "--data", str(data), "--split", str(split), "--subset", args.subset,
            "--output", str(path), "--set-size", str(SIZE["set_size"]), "--overwrite", *extra], base / f"{name}.log")  # fmt: skip
        res = score(path, base / name / "eval")
        rows.append({"method": name, "group": 0, **{m: float(res[m].mean()) for m in HEADLINE}})

    frame = pd.DataFrame(rows)
    frame.to_csv(out / f"ensemble_{args.subset}.csv", index=False)
    agg = frame.groupby("method", sort=False)[list(HEADLINE)].agg(["mean", "std"])
    lines = [f"### case {args.case} ({description}), {args.subset} pairs: seed ensembles of {args.members} SCALE models",
             "", "| method | n | " + " | ".join(HEADLINE) + " |", "|---|---|" + "---|" * len(HEADLINE)]  # fmt: skip
    for method in agg.index:
        n = int((frame["method"] == method).sum())
        cells = [
            f"{agg.loc[method, (m, 'mean')]:.3f} ± {agg.loc[method, (m, 'std')] if n > 1 else 0:.3f}" for m in HEADLINE
        ]
        lines.append(f"| {method} | {n} | " + " | ".join(cells) + " |")
    lines += ["", f"{args.steps} steps per model; an ensemble costs {args.members}x one model's training. "
              f"n: single models (seeds) or ensembles (disjoint seed groups) behind each mean ± sd."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    (out / f"ensemble_{args.subset}.md").write_text(text)
    plot(
        summarise(frame.assign(case=args.case).to_dict(orient="records")), args.case,
        args.out / f"ensemble_case_{args.case}_{args.subset}.png",
        title=f"case {args.case}, {args.subset} pairs: single SCALE models vs 3-model ensembles (mean ± sd over seeds)",
    )  # fmt: skip
    print(text)


if __name__ == "__main__":
    main()
