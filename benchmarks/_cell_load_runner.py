"""Time Arc's cell-load `PerturbationDataModule` train loader; run by the comparison venv.

cell-load (STATE's loader) needs numpy>=2, so `benchmarks/dataloader.py` runs this file with
`.venv-bench/bin/python` and reads the one JSON line it prints. The loader is used exactly as
STATE's `state tx train` builds it: `PerturbationDataModule(...).setup()` then
`train_dataloader()`, here with num_workers=0 so the main process does all the work.

Each batch holds `batch_size` sets of `cell_sentence_len` perturbed cells (`pert_cell_emb`,
[B*S, G]) and one mapped control per cell (`ctrl_cell_emb`, [B*S, G]); cells/s counts the rows
of both tensors, i.e. 2*S per set, as for the other loaders.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    ThroughputResult,
    emit_result,
    peak_rss_mb_self,
    setup_logging,
    time_spec_batches,
    versions,
    warmup_batches,
)

logger = logging.getLogger("benchmarks.cell_load")


def train_loader(spec: dict[str, Any], *, barcode: bool) -> tuple[Any, float]:
    """cell-load's train loader as `state tx train` builds it (num_workers=0), and its set-up seconds.

    Seeds numpy's global RNG (PerturbationBatchSampler shuffles with it), `random` and torch
    from spec['seed'] and sets torch's threads (spec['threads'], default 1) first.
    """
    import numpy as np
    import torch

    warnings.filterwarnings("ignore")
    np.random.seed(spec["seed"])  # PerturbationBatchSampler shuffles with the global numpy RNG
    random.seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    torch.set_num_threads(spec.get("threads", 1))  # as cell-load's own DataLoader workers do

    from cell_load.data_modules import PerturbationDataModule

    t0 = time.perf_counter()
    dm = PerturbationDataModule(
        toml_config_path=spec["toml"],
        batch_size=spec["batch_size"],
        num_workers=0,
        random_seed=spec["seed"],
        pert_col=spec["pert_col"],
        batch_col=spec["batch_col"],
        cell_type_key=spec["cell_type_key"],
        control_pert=spec["control_pert"],
        embed_key=spec["embed_key"],
        output_space=spec["output_space"],
        basal_mapping_strategy=spec["basal_mapping_strategy"],
        n_basal_samples=1,
        should_yield_control_cells=True,  # STATE's default (configs/data/perturbation.yaml)
        cell_sentence_len=spec["set_size"],
        use_consecutive_loading=spec["use_consecutive_loading"],
        barcode=barcode,
    )
    dm.setup()
    loader = dm.train_dataloader()
    return loader, time.perf_counter() - t0


def count_cells(batch: dict[str, Any]) -> int:
    """Cells of a cell-load batch: the perturbed rows plus their mapped controls."""
    return int(batch["pert_cell_emb"].shape[0] + batch["ctrl_cell_emb"].shape[0])


def run(spec: dict) -> dict:
    loader, setup_s = train_loader(spec, barcode=spec["barcode"])
    batches_per_epoch = len(loader)
    logger.info("cell-load set up in %.1f s: %d train batches per epoch", setup_s, batches_per_epoch)

    shapes: dict[str, list[int]] = {}

    def count(batch: dict) -> int:
        if not shapes:
            shapes.update({k: list(v.shape) for k, v in batch.items() if hasattr(v, "shape")})
        return count_cells(batch)

    warmup = warmup_batches(spec, batches_per_epoch)
    repeats, warmup_s, epochs = time_spec_batches(
        spec,
        lambda: iter(loader),
        count,
        warmup,
        on_repeat=lambda r, res: logger.info("repeat %d: %.0f cells/s", r, res.cells_per_s),
    )
    result = ThroughputResult(
        loader=spec["label"],
        warmup_batches=warmup,
        warmup_s=warmup_s,
        repeats=repeats,
        epochs_started=epochs,
        setup_s=setup_s,
        peak_rss_mb=peak_rss_mb_self(),
        extra={
            "batches_per_epoch": batches_per_epoch,
            "first_batch_shapes": shapes,
            "versions": versions(("cell-load", "anndata", "h5py", "numpy", "torch", "lightning")),
            "datamodule_kwargs": {k: v for k, v in spec.items() if k not in ("label",)},
        },
    )
    return result.to_json()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True, help="JSON file with the data-module kwargs and timing knobs")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    setup_logging(args.verbose)
    spec = json.loads(Path(args.spec).read_text())
    emit_result(run(spec))


if __name__ == "__main__":
    main()
