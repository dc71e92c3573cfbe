"""STATE-side worker of model_step.py and throughput.py; runs in the comparison venv.

arc-state and cell-load need numpy >= 2, which megatron-core 0.15 forbids, so everything
STATE-side runs here, in `.venv-bench/bin/python`, driven by the main-venv scripts:

    _state_runner.py serve-model --spec SPEC.json   # persistent: answers train/infer timing requests
    _state_runner.py cell-load --spec SPEC.json     # one loader-throughput measurement, one answer

serve-model builds the transition model the way `state tx train` does: Hydra's `tx` config
with `model=state` plus the size overrides of `_bench_util.state_model_overrides`, the
`decoder_cfg` that `run_tx_train` adds for gene-space output, and
`state.tx.utils.get_lightning_module(...)` with the var_dims cell-load would report for an
`obsm['X_hvg']` input of G genes. A training step is what Lightning's automatic optimisation
runs: `training_step` (forward + energy loss), backward, `clip_grad_norm_(…, 10)` (STATE's
gradient_clip_val) and the optimizer from the model's own `configure_optimizers()`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_util import (
    MODEL_SIZE_KEYS,
    answer,
    proc_memory_mb,
    serve,
    setup_logging,
    state_model_overrides,
    time_iterations,
    time_spec_batches,
    versions,
)
from _cell_load_runner import count_cells, train_loader

STATE_PACKAGES = ("arc-state", "cell-load", "torch", "lightning", "transformers", "geomloss", "numpy")


# -- the model ---------------------------------------------------------------------------------
def build_state(spec: dict[str, Any], n_perts: int, n_batches: int) -> tuple[Any, dict[str, Any]]:
    """(StateTransitionPerturbationModel, resolved config) as `state tx train` would build them."""
    import torch
    from omegaconf import OmegaConf
    from state.__main__ import load_hydra_config
    from state.tx.utils import get_lightning_module

    # as run_tx_train: on a GPU this allows TF32/bf16, and on a CPU with AMX or AVX512-BF16 oneDNN
    # computes float32 matmuls with bf16 products (`state tx predict` leaves the default, 'highest')
    torch.set_float32_matmul_precision("medium")
    overrides = [
        *state_model_overrides(**{k: spec[k] for k in MODEL_SIZE_KEYS}),
        "data.kwargs.embed_key=X_hvg",
        "data.kwargs.output_space=gene",
        "data.kwargs.control_pert=control",
        "data.kwargs.basal_mapping_strategy=batch",
        f"training.train_seed={spec['seed']}",
        "use_wandb=false",
    ]
    cfg = OmegaConf.to_container(load_hydra_config("tx", overrides), resolve=True)
    genes = spec["genes"]
    mk = cfg["model"]["kwargs"]
    mk["decoder_cfg"] = {  # what run_tx_train adds for output_space gene/all
        "latent_dim": genes,
        "gene_dim": genes,
        "hidden_dims": mk.get("decoder_hidden_dims", [1024, 1024, 512]),
        "dropout": mk.get("decoder_dropout", 0.1),
        "residual_decoder": mk.get("residual_decoder", False),
    }
    var_dims = {  # PerturbationDataModule.get_var_dims() for embed_key=X_hvg with G genes
        "input_dim": genes,
        "gene_dim": genes,
        "hvg_dim": genes,
        "output_dim": genes,
        "pert_dim": n_perts,
        "gene_names": [f"G{i:05d}" for i in range(genes)],
        "batch_dim": n_batches,
        "pert_names": [f"P{i}" for i in range(n_perts)],
    }
    with contextlib.redirect_stdout(sys.stderr):  # STATE prints its module tree
        model = get_lightning_module(cfg["model"]["name"], cfg["data"]["kwargs"], mk, cfg["training"], var_dims)
    return model, {
        "overrides": overrides,
        "model": cfg["model"],
        "training": cfg["training"],
        "var_dims": {k: v for k, v in var_dims.items() if not k.endswith("names")},
    }


def state_batches(path: str, torch: Any) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The pre-drawn set pairs of model_step.py, in the layout cell-load's collate produces."""
    import numpy as np

    z = np.load(path)
    n, B, S, G = z["ctrl"].shape
    n_perts, n_batches = int(z["n_perts"]), int(z["n_batches"])
    out = []
    for i in range(n):
        pert_id = torch.from_numpy(z["pert_id"][i].astype(np.int64)).repeat_interleave(S)
        batch_id = torch.from_numpy(z["batch_id"][i].astype(np.int64)).repeat_interleave(S)
        out.append(
            {
                "ctrl_cell_emb": torch.from_numpy(np.ascontiguousarray(z["ctrl"][i].reshape(B * S, G))),
                "pert_cell_emb": torch.from_numpy(np.ascontiguousarray(z["pert"][i].reshape(B * S, G))),
                "pert_emb": torch.nn.functional.one_hot(pert_id, n_perts).float(),
                "batch": torch.nn.functional.one_hot(batch_id, n_batches).float(),
            }
        )
    return out, {"n_perts": n_perts, "n_batches": n_batches}


def serve_model(spec: dict[str, Any]) -> None:
    import torch

    warnings.filterwarnings("ignore")  # self.log() outside a Trainer warns on every step
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    t0 = time.perf_counter()
    batches, vocab = state_batches(spec["inputs"], torch)
    model, cfg = build_state(spec, vocab["n_perts"], vocab["n_batches"])
    opt = model.configure_optimizers()
    if isinstance(opt, dict):
        opt = opt["optimizer"]
    elif isinstance(opt, (list, tuple)):
        opt = opt[0]
    clip = float(cfg["training"]["gradient_clip_val"] or 0.0)
    params = [p for p in model.parameters() if p.requires_grad]

    def train_step(i: int) -> None:
        loss = model.training_step(batches[i % len(batches)], i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()

    def train(iters: int, warmup: int) -> dict[str, Any]:
        model.train()
        torch.set_float32_matmul_precision("medium")  # `state tx train`'s setting
        return time_iterations(train_step, iters, warmup)

    def train_autocast(iters: int, warmup: int) -> dict[str, Any]:
        """The step as Lightning's precision="bf16-mixed" runs it on CPU: training_step (forward and
        loss) under bf16 autocast, float32 weights. `state tx train` has no setting for it."""
        model.train()
        torch.set_float32_matmul_precision("medium")

        def step(i: int) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model.training_step(batches[i % len(batches)], i)
            opt.zero_grad(set_to_none=True)
            loss.float().backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()

        return time_iterations(step, iters, warmup)

    def infer(iters: int, warmup: int, nfe: int, autocast: bool = False) -> dict[str, Any]:
        if nfe != 1:
            raise ValueError("STATE predicts with one forward evaluation (NFE = 1)")
        model.eval()
        torch.set_float32_matmul_precision("highest")  # `state tx predict` leaves torch's default
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            res = time_iterations(lambda i: model.forward(batches[i % len(batches)]), iters, warmup)
        model.train()
        return res

    def infer_autocast(iters: int, warmup: int, nfe: int) -> dict[str, Any]:
        """The forward under bf16 autocast, float32 weights: the peer of `predict --autocast bf16`.
        `state tx predict` has no setting for it."""
        return infer(iters, warmup, nfe, autocast=True)

    backbone = model.transformer_backbone
    ready = {
        "model": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in params),
        "params_backbone_trainable": sum(p.numel() for p in backbone.parameters() if p.requires_grad),
        "params_gene_decoder_unused": sum(p.numel() for p in model.gene_decoder.parameters())
        if model.gene_decoder is not None
        else 0,
        "optimizer": repr(opt).replace("\n", " "),
        "gradient_clip_val": clip,
        "loss": repr(model.loss_fn),
        "config": cfg,
        "threads": torch.get_num_threads(),
        "setup_s": time.perf_counter() - t0,
        "versions": versions(STATE_PACKAGES),
    }
    serve(ready, {"train": train, "train_autocast": train_autocast, "infer": infer, "infer_autocast": infer_autocast})


# -- cell-load ---------------------------------------------------------------------------------
def cell_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Throughput of cell-load's PerturbationDataModule train loader, built as `state tx train` builds it."""
    loader, setup_s = train_loader(spec, barcode=True)
    repeats, _, epochs = time_spec_batches(spec, lambda: iter(loader), count_cells, spec["warmup_batches"])
    return {
        "loader": spec["label"],
        "setup_s": setup_s,
        "batches_per_epoch": len(loader),
        "epochs_started": epochs,
        "repeats": [asdict(r) for r in repeats],
        "memory_mb": proc_memory_mb(),
        "versions": versions(STATE_PACKAGES),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["serve-model", "cell-load"])
    ap.add_argument("--spec", required=True, help="JSON file written by the parent script")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    setup_logging(args.verbose)
    spec = json.loads(Path(args.spec).read_text())
    if args.mode == "serve-model":
        serve_model(spec)
    else:
        answer(cell_load(spec))


if __name__ == "__main__":
    main()
