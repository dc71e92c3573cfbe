"""`make demo`: the main job end to end on the bundled data, in minutes on 2 CPU cores.

preprocess the bundled PerturBench file into SCDL -> resolve the demo split -> draw set pairs
-> train the `tiny_cpu` recipe (NeMo 2 MegatronStrategy) -> export a release -> predict the
held-out pairs -> predict the same pairs with the baselines -> evaluate everything with the
cell-eval metrics and write the report. Each stage prints what it did.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from bionemo_scale.config import PreprocessConfig, SamplerConfig, validate_config
from bionemo_scale.data.bundled import bundled, resource_path

logger = logging.getLogger(__name__)

DEMO_DATASET = "norman19_mcfaline23"


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def describe_pairs(data_dir: str | Path, split: str | None, subset: str, set_size: int, n: int, seed: int) -> str:
    """Draw `n` set pairs and describe each: group, sizes, context/batch of its controls."""
    from bionemo_scale.data.sampler import SetPairDataset
    from bionemo_scale.data.store import ProcessedDataset

    data = ProcessedDataset(data_dir)
    idx = data.index
    groups = data.groups_in(split, subset) if split else np.flatnonzero(~idx.is_control)
    cfg = validate_config(SamplerConfig, {"set_size": set_size, "seed": seed}, "sampler options")
    ds = SetPairDataset(data, groups, cfg, num_epochs=1)
    lines = [f"{len(groups)} {subset} groups, epoch of {ds.epoch_length} set pairs (S={set_size})"]
    g_ctx = idx.groups["context_id"].to_numpy()
    row_ctx = np.repeat(g_ctx, (idx.groups["end"] - idx.groups["start"]).to_numpy())
    for k, item in enumerate(ds.__getitems__(list(range(min(n, len(ds)))))):
        ctx = idx.contexts[int(item["context_id"])]
        ctrl_ctx = {idx.contexts[c] for c in row_ctx[item["ctrl_rows"].numpy()]}
        delta = (item["pert"].mean(0) - item["ctrl"].mean(0)).abs()
        lines.append(
            f"pair {k}: {idx.perturbations[int(item['pert_id'])]:<16s} in {ctx:<6s} "
            f"ctrl {tuple(item['ctrl'].shape)} from {sorted(ctrl_ctx)}, pert {tuple(item['pert'].shape)}, "
            f"dose {float(item['dose']):.1f}, largest |mean delta| {float(delta.max()):.2f}"
        )
    return "\n".join(lines)


def run_demo(out: Path, quick: bool = False) -> None:
    """Run every stage that exists so far; outputs go under `out`."""
    from bionemo_scale.data.preprocess import preprocess
    from bionemo_scale.data.splits import split_summary
    from bionemo_scale.data.store import ProcessedDataset

    t0 = time.perf_counter()
    spec = bundled(DEMO_DATASET)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    split = resource_path(spec.splits[0])

    _banner(f"1. preprocess {spec.filename} -> SCDL ({data_dir})")
    print(spec.description)
    cfg = PreprocessConfig(
        pert_col=spec.pert_col,
        control=spec.control,
        context_col=spec.context_col,
        batch_col=spec.batch_col,
        dose_col=spec.dose_col,
        split=str(split),
    )
    report = preprocess(resource_path(spec.filename), data_dir, cfg, overwrite=True, progress=not quick)
    idx = report["index"]
    print(
        f"{idx['cells']:,} cells, {idx['groups']} groups, {idx['contexts']} contexts, "
        f"{idx['perturbations']} perturbations ({idx['combinations']} combinations); "
        f"normalisation: {report['normalisation']['applied']}"
    )

    _banner(f"2. split {split.name}")
    data = ProcessedDataset(data_dir)
    labels = data.split_labels(split)
    for which, row in split_summary(data.index, labels).items():
        print(f"{which:5s}: {row['pairs']:3d} (context, perturbation) pairs, {row['cells']:5,d} cells")

    _banner("3. draw set pairs (control set -> perturbed set)")
    print(describe_pairs(data_dir, str(split), "train", set_size=32, n=4, seed=0))

    run_dir, release = out / "run", out / "release"
    _banner(f"4. train recipe tiny_cpu ({run_dir})")
    steps = 40 if quick else 300
    train_demo(data_dir, split, run_dir, steps)

    _banner(f"5. export a release ({release})")
    from bionemo_scale.train.release import export_release

    export_release(run_dir, release, overwrite=True)
    print(", ".join(sorted(path.name for path in Path(release).iterdir())))  # what was written, not a fixed list

    _banner("6. predict the held-out test pairs, and the same pairs with the baselines")
    preds = predict_all(data, split, release, out / "predictions")
    for name, path in preds.items():
        print(f"{name:13s} {path}")

    _banner(f"7. evaluate ({out / 'evaluation'})")
    from bionemo_scale.eval.evaluate import run_evaluate

    run_evaluate(
        preds["scale"],
        preds["scale"].with_name("REAL.h5ad"),
        "perturbation",
        data.index.control_label,
        out / "evaluation",
        context_col="context",
        profile="full",
        baselines={k: v for k, v in preds.items() if k != "scale"},
        overwrite=True,
        progress=not quick,
    )
    print(headline_table(out / "evaluation"))
    print(f"\nreport: {out / 'evaluation' / 'report.md'}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; outputs in {out}")


def train_demo(data_dir: Path, split: Path, run_dir: Path, steps: int) -> None:
    """tiny_cpu on the bundled data; a fresh run each time the demo starts."""
    import shutil

    from bionemo_scale.config import apply_overrides
    from bionemo_scale.recipes import get_recipe
    from bionemo_scale.train.engine import train

    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = apply_overrides(
        get_recipe("tiny_cpu"),
        [
            f"data.path={data_dir}",
            f"data.split={split}",
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={max(10, steps // 3)}",
            f"checkpoint.every_n_train_steps={max(10, steps // 3)}",
        ],
    )
    train(cfg, run_dir)


def predict_all(data, split: Path, release: Path, out: Path) -> dict[str, Path]:
    """SCALE and the three baselines on the test pairs, from the same control cells."""
    from bionemo_scale.data.prior import GroupPriors
    from bionemo_scale.eval.baselines import METHODS, make_baseline
    from bionemo_scale.predict import (
        VocabularyMap,
        build_anndata,
        held_out_groups,
        model_predictor,
        plan_predictions,
        run_predictor,
        write_predictions,
    )
    from bionemo_scale.train.release import load_prior, load_release_model

    model, cfg, vocab = load_release_model(release)
    prior = load_prior(release, cfg)
    priors = GroupPriors(prior, data, cover=cfg.model.prior_cover) if prior is not None else None
    groups = held_out_groups(data, split, "test")
    plans = plan_predictions(data, groups, seed=0, control_matching=cfg.data.sampler.control_matching)
    set_size = cfg.data.sampler.set_size
    predictors = {"scale": model_predictor(model, VocabularyMap(vocab, data))}
    labels = data.split_labels(split)
    predictors.update({m: make_baseline(m, data, labels) for m in METHODS})
    paths = {}
    for name, predictor in predictors.items():
        pred_X = run_predictor(
            data,
            plans,
            predictor,
            set_size,
            seed=0,
            progress=False,
            priors=priors,
            compose=name == "scale" and cfg.flow.combinations == "compose",
            lattice=name == "scale" and cfg.flow.count_lattice,  # as `predict`; the baselines stay textbook
        )
        pred, real = build_anndata(data, plans, pred_X, kind=name, lattice=name == "scale" and cfg.flow.count_lattice)
        paths[name] = out / name / "PRED.h5ad"
        write_predictions(pred, real, paths[name], overwrite=True)
    return paths


HEADLINE = ("pearson_delta", "overlap_at_N", "precision_at_N", "discrimination_score_l1", "mae", "de_direction_match")


def headline_table(evaluation: Path) -> str:
    """Model vs baselines vs degenerate references, mean over held-out pairs."""
    import pandas as pd

    rows = {"scale": pd.read_csv(evaluation / "results.csv")}
    for path in sorted((evaluation / "baselines").glob("*_results.csv")):
        name = path.name.removesuffix("_results.csv")
        if (
            name.endswith("_agg")
            or "_agg_" in name
            or any(name.endswith(f"_{c}") for c in rows["scale"]["context"].unique())
        ):
            continue
        rows[name] = pd.read_csv(path)
    lines = ["method          " + " ".join(f"{m[:14]:>14s}" for m in HEADLINE)]
    for name, frame in rows.items():
        vals = [frame[m].mean() if m in frame else float("nan") for m in HEADLINE]
        lines.append(f"{name:15s} " + " ".join(f"{v:14.3f}" for v in vals))
    return "\n".join(lines)
