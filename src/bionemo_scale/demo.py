"""`make demo`: the main job end to end on the bundled data, in minutes on 2 CPU cores.

Stages: preprocess the bundled PerturBench file into SCDL, resolve the demo split, and draw
set pairs from it. Each stage prints what it did, so the demo doubles as a tour.
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
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s; outputs in {out}")
