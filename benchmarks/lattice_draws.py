"""How much of a DE-overlap figure is the count lattice's random draws?

    .venv/bin/python benchmarks/lattice_draws.py --case b --draws 10

The count lattice (`data/count_lattice.py`) samples every sub-count predicted value to 0 or one
count. On a case with few real DE genes (case b: 0–5 per combination), which of them a
prediction finds can hinge on those draws. This script takes the *continuous* test predictions
of SCALE (each seed's run of `benchmarks/quality.py`, re-predicted with `--no-count-lattice`)
and of the additive baseline, puts each on the lattice with `--draws` different seeds
(`lattice_of_file`), scores every draw, and reports mean ± sd over draws per method, so a
difference between methods can be read against the draws' own spread. Needs the runs of
`quality.py --cases CASE` (2 minutes for 10 draws on case b here; case a scores slower).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bionemo_scale.data.count_lattice import lattice_of_file  # noqa: E402
from bionemo_scale.predict import write_predictions  # noqa: E402
from quality import CLI, HEADLINE, SIZE, prepare_case, score, sh  # noqa: E402

logger = logging.getLogger("lattice_draws")


def continuous_predictions(case: str, seeds: list[int], quality_out: Path, out: Path) -> dict[str, Path]:
    """SCALE (per seed) and additive test predictions without the lattice, from the same control cells."""
    data, split, _ = prepare_case(case, quality_out / "data")
    preds = {}
    for seed in seeds:
        run = quality_out / f"case_{case}" / f"seed{seed}" / "scale" / "run"
        if not (run / "checkpoints").is_dir():
            sys.exit(f"no finished run in {run}: run benchmarks/quality.py --cases {case} first")
        path = out / f"scale_seed{seed}" / "PRED.h5ad"
        sh([*CLI, "predict", "--checkpoint", str(run), "--data", str(data), "--split", str(split), "--output",
            str(path), "--overwrite", "--no-count-lattice"], path.with_suffix(".log"))  # fmt: skip
        preds[f"scale_seed{seed}"] = path
    path = out / "additive" / "PRED.h5ad"
    sh([*CLI, "baseline", "--method", "additive", "--data", str(data), "--split", str(split), "--output", str(path),
        "--set-size", str(SIZE["set_size"]), "--overwrite"], path.with_suffix(".log"))  # fmt: skip
    preds["additive"] = path
    return preds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="b", choices=["a", "b", "c"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="SCALE runs (quality.py seeds)")
    ap.add_argument("--draws", type=int, default=10, help="lattice seeds per prediction")
    ap.add_argument("--quality-out", type=Path, default=REPO / "bench_out" / "quality")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "lattice_draws")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = args.out / f"case_{args.case}"
    preds = continuous_predictions(args.case, args.seeds, args.quality_out, out)
    rows = []
    for name, path in preds.items():
        pred, real = ad.read_h5ad(path), ad.read_h5ad(path.with_name("REAL.h5ad"))
        for draw in range(args.draws):
            latt = pred.copy()
            latt.X = lattice_of_file(pred, seed=draw)
            target = out / name / f"draw{draw}" / "PRED.h5ad"
            write_predictions(latt, real, target, overwrite=True)
            res = score(target, target.parent / "eval")
            rows.append({"prediction": name, "draw": draw, **{m: float(res[m].mean()) for m in HEADLINE}})
            logger.info("%s draw %d: %s", name, draw, {m: round(rows[-1][m], 3) for m in HEADLINE})
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "draws.csv", index=False)
    frame["method"] = np.where(frame["prediction"].str.startswith("scale"), "scale", frame["prediction"])
    by_pred = frame.groupby("prediction")[list(HEADLINE)].agg(["mean", "std"]).round(3)
    by_method = frame.groupby("method")[list(HEADLINE)].agg(["mean", "std"]).round(3)
    text = (
        f"case {args.case}, test pairs, {args.draws} lattice draws per prediction (mean ± sd over draws)\n\n"
        + by_pred.to_string() + "\n\nper method (SCALE: all seeds and draws pooled)\n\n" + by_method.to_string()
    )  # fmt: skip
    (out / "summary.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
