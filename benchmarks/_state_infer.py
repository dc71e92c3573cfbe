"""Run a trained STATE transition model on given control-cell sets; run by the comparison venv.

`benchmarks/state_adapter.py` (main venv) writes the inputs and calls this with
`.venv-bench/bin/python`, since arc-state needs numpy>=2.

Inputs (`--inputs`, .npz): `ctrl` [n_sets * S, G] control expression in set order, `set_pert`
/ `set_batch` / `set_context` [n_sets] labels, `set_size` S. The model is loaded and driven the way
`state tx infer` drives it (arc-state 0.11.1, `_cli/_tx/_infer.py`):
`StateTransitionPerturbationModel.load_from_checkpoint`, `eval()`, one-hot perturbation vectors
from the run's `pert_onehot_map.pt` (unknown labels fall back to the control one-hot, as there),
batch indices from `batch_onehot_map.torch` only if the model has a batch encoder,
`predict_step(batch, padded=True)` on whole sets of S cells, `preds` as the output (gene space
for embed_key=X_hvg / output_space=gene), then clipping to [0, 14]. The only difference from
`state tx infer` is which control cells form the sets: ours (given), instead of a fresh random
draw of controls per window.

`--check-split` also rebuilds the run's cell-load data module from its saved config and writes
the (cell type, perturbation) pairs cell-load placed in val and test, so the caller can verify
that STATE trained on exactly the split it was asked for.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

logger = logging.getLogger("benchmarks.state_infer")


def check_split(run_dir: Path) -> dict:
    import numpy as np
    import yaml
    from cell_load.data_modules import PerturbationDataModule

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    kwargs = dict(cfg["data"]["kwargs"])
    dm = PerturbationDataModule(
        batch_size=cfg["training"]["batch_size"],
        cell_sentence_len=cfg["model"]["kwargs"]["cell_set_len"],
        **kwargs,
    )
    dm.setup()
    out: dict = {}
    for which, subsets in (("train", dm.train_datasets), ("val", dm.val_datasets), ("test", dm.test_datasets)):
        pairs, n_cells = set(), 0
        for sub in subsets:
            ds, idxs = sub.dataset, np.asarray(sub.indices)
            mc = ds.metadata_cache
            pert = mc.pert_codes[idxs]
            keep = pert != mc.control_pert_code
            n_cells += int(keep.sum())
            cts = ds.cell_type_categories[mc.cell_type_codes[idxs[keep]]]
            perts = ds.pert_categories[pert[keep]]
            pairs.update(zip(map(str, cts), map(str, perts)))
        out[which] = sorted(pairs)
        out[f"{which}_perturbed_cells"] = n_cells
    return out


def run(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from state.tx.models.state_transition import StateTransitionPerturbationModel

    warnings.filterwarnings("ignore")
    run_dir = Path(args.run_dir)
    if args.check_split:
        t0 = time.perf_counter()
        Path(args.check_split).write_text(json.dumps(check_split(run_dir), indent=1) + "\n")
        logger.info("split check written to %s (%.1f s)", args.check_split, time.perf_counter() - t0)

    t0 = time.perf_counter()
    model = StateTransitionPerturbationModel.load_from_checkpoint(args.checkpoint, map_location="cpu")
    model.eval()
    S = int(model.cell_sentence_len)
    inputs = np.load(args.inputs)
    if int(inputs["set_size"]) != S:
        raise SystemExit(f"sets of {int(inputs['set_size'])} cells given, the model was trained on {S}")
    ctrl = inputs["ctrl"].astype(np.float32)
    set_pert, set_batch = inputs["set_pert"].astype(str), inputs["set_batch"].astype(str)
    n_sets = set_pert.size
    if ctrl.shape[0] != n_sets * S or ctrl.shape[1] != model.input_dim:
        raise SystemExit(f"inputs {ctrl.shape} do not match {n_sets} sets x {S} cells x {model.input_dim} genes")

    pert_map = torch.load(run_dir / "pert_onehot_map.pt", weights_only=False)
    pert_map = {str(k): v for k, v in pert_map.items()}
    control = str(model.hparams.get("control_pert", "non-targeting"))
    fallback = pert_map.get(control)
    missing = sorted(set(set_pert) - set(pert_map))
    if missing:
        logger.warning("%d perturbation labels not in STATE's map, predicted as control: %s", len(missing), missing)
    uses_batch = getattr(model, "batch_encoder", None) is not None
    batch_idx = None
    if uses_batch:
        bmap = torch.load(run_dir / "batch_onehot_map.torch", weights_only=False)
        bmap = {str(k): int(torch.as_tensor(v).argmax()) for k, v in bmap.items()}
        batch_idx = np.array([bmap.get(b, 0) for b in set_batch], dtype=np.int64)

    out = np.empty((n_sets * S, model.output_dim), dtype=np.float32)
    chunk = max(1, args.sets_per_forward)
    with torch.no_grad():
        for lo in range(0, n_sets, chunk):
            hi = min(lo + chunk, n_sets)
            vecs = torch.stack([pert_map.get(p, fallback).float() for p in set_pert[lo:hi]])  # [b, P]
            batch = {
                "ctrl_cell_emb": torch.from_numpy(ctrl[lo * S : hi * S]),
                "pert_emb": vecs.repeat_interleave(S, dim=0),
                "pert_name": [p for p in set_pert[lo:hi] for _ in range(S)],
            }
            if batch_idx is not None:
                batch["batch"] = torch.from_numpy(np.repeat(batch_idx[lo:hi], S))
            res = model.predict_step(batch, batch_idx=0, padded=True)
            out[lo * S : hi * S] = res["preds"].float().cpu().numpy()
    np.clip(out, 0.0, 14.0, out=out)  # as state tx infer does for gene-space outputs
    np.save(args.output, out)
    logger.info(
        "STATE predicted %d sets x %d cells in %.1f s (output_space=%s, embed_key=%s, batch encoder=%s)",
        n_sets, S, time.perf_counter() - t0, model.output_space, model.hparams.get("embed_key"), uses_batch,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, help="state tx train run directory (config.yaml, one-hot maps)")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--inputs", required=True, help=".npz written by state_adapter.infer_inputs")
    ap.add_argument("--output", required=True, help=".npy of predictions [n_sets * S, G]")
    ap.add_argument("--check-split", help="also write cell-load's val/test pairs to this JSON")
    ap.add_argument("--sets-per-forward", type=int, default=16)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    os.environ.setdefault("WANDB_MODE", "disabled")
    run(args)


if __name__ == "__main__":
    main()
