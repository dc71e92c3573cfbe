"""Model-step throughput on CPU: SCALE (`ScaleModel`) against Arc's STATE transition model.

    .venv/bin/python benchmarks/model_step.py [--quick] [--genes 2000 1000] [--threads 2 1] \
        [--repeats 3 --iters 10] [--out bench_out/model_step]

What is timed (no data loading: both models read the same pre-drawn set pairs from memory)
- training: one optimizer step on B sets of S control + S perturbed cells; cells/s counts
  2·S·B cells per step for both models.
  - ours: `prepare_flow_batch` (exact OT coupling inside each set, flow time t, context
    dropout) + `ScaleModel.forward` + `loss_terms` (endpoint, gene, pseudobulk,
    reconstruction, energy distance) + backward + grad-norm clip 1.0 + AdamW (lr 3e-4, betas
    0.9/0.95, wd 0.01: our OptimConfig; torch's fused CPU kernel, as `train` runs it on CPU by
    default, `optim.cpu_fused_adam`) — a plain torch loop, no NeMo/megatron DDP wrappers.
  - STATE: `StateTransitionPerturbationModel.training_step` (forward + its default energy
    loss, geomloss `SamplesLoss('energy', blur=0.05)`) + backward + grad-norm clip 10 (STATE's
    gradient_clip_val) + its own `configure_optimizers()` (Adam, lr 1e-4), without Lightning.
- inference: S·B predicted cells per call, eval mode, no grad. Ours: `predict(..., steps=K)`
  at NFE K = 1 and 10 (Euler). STATE: `forward(batch)` (one evaluation; STATE has no NFE
  knob, so NFE = 1 only, and its `predict_step` would add an unused gene decoder; not timed).
  Ours also at NFE = 1 plus the count lattice (`put_on_lattice` on the predicted cells, as
  `predict` applies it with flow.count_lattice): its ratio to NFE = 1 alone is what the lattice costs.

Both models: hidden 256, 4 layers, 8 heads (head dim 32), SwiGLU/LLaMA MLP 1024 = 4×hidden
(STATE's configs use 4×hidden: state.yaml 768→3072, state_sm.yaml 672→2688), set S=64,
B=8 sets, G genes, float32, one process with `--threads` torch threads. STATE is built by
its own Hydra config (`model=state` plus size overrides, exactly the `state tx train` CLI
overrides) and `state.tx.utils.get_lightning_module`, as `state tx train` builds it for
`embed_key=X_hvg, output_space=gene` (gene-expression input and output).

Float32 matmul precision: each model runs at its own command line's setting. `state tx train` sets
torch's 'medium' (bf16 products where the hardware has them: GPUs, and CPUs with AMX or
AVX512-BF16 through oneDNN), `state tx predict` leaves 'highest'; ours trains and predicts at
'highest' by default, and `inference NFE=1, matmul medium` is ours at `predict --matmul-precision
medium`.

Protocol: each model lives in a persistent worker process (ours in .venv, STATE in
.venv-bench through `_state_runner.py`); after a warm-up, the parent alternates them (ABBA
order per repeat) for every measurement, so both see the same machine noise. Each repeat is
`--iters` timed iterations; we report the median and IQR over repeats of cells/s (wall) and
cells per CPU-second (process CPU time of all threads: far less sensitive to other work on
the machine), the ratio of medians, and the IQR of the per-repeat paired ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_util import (
    BENCH_PYTHON,
    STATE_RUNNER,
    Summary,
    Worker,
    add_model_size_args,
    bar_chart,
    bench_main,
    bench_parser,
    bench_versions,
    default_out,
    fmt_num,
    fmt_ratio,
    machine_load,
    markdown_table,
    model_sizes,
    serve,
    thread_env,
    time_iterations,
    versions,
    write_json,
)

logger = logging.getLogger("benchmarks.model_step")

INPUT_VERSION = 1  # bump when the cached inputs change


# -- inputs ------------------------------------------------------------------------------------
def prepare_inputs(genes: int, cache: Path, sizes: dict[str, int], n_batches: int, seed: int = 0) -> Path:
    """Draw `n_batches` batches of set pairs from a synthetic screen with `genes` genes; cached npz.

    The pairs come from our own sampler over a `bionemo-scale synth` dataset (NB counts,
    log1p(normalize_total)), so both models see realistic sparse expression; the dataset
    itself is written to a temporary directory and deleted once the batches are drawn.
    """
    import numpy as np

    S, B = sizes["set_size"], sizes["batch_sets"]
    path = cache / f"inputs_{genes}g_S{S}_B{B}_n{n_batches}_s{seed}.npz"
    stamp = path.with_suffix(".json")
    want = {"genes": genes, "S": S, "B": B, "n": n_batches, "seed": seed, "v": INPUT_VERSION}
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()) == want:
        return path
    from torch.utils.data import default_collate

    from bionemo_scale.config import SamplerConfig, SynthConfig
    from bionemo_scale.data.prior import AdditivePrior, GroupPriors
    from bionemo_scale.data.sampler import SetPairDataset
    from bionemo_scale.data.store import ProcessedDataset
    from bionemo_scale.data.synth import write_synthetic_dataset

    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        ds_dir = Path(tmp) / "synth"
        # ~100 cells per perturbed group, enough for sets of 64 without replacement
        write_synthetic_dataset(ds_dir, SynthConfig(n_cells=50_000, n_genes=genes, seed=seed), progress=False)
        data = ProcessedDataset(ds_dir)
        idx = data.index
        labels = np.array(["train"] * len(idx.groups), dtype=object)
        groups = np.flatnonzero(~idx.is_control)
        ds = SetPairDataset(data, groups, SamplerConfig(set_size=S, seed=seed))
        priors = GroupPriors(AdditivePrior.from_data(data, labels), data)
        keys = ("ctrl", "pert", "parts", "dose", "context_id", "batch_id", "index", "group_id", "pert_id")
        out: dict[str, list[Any]] = {k: [] for k in (*keys, "prior")}
        for b in range(n_batches):
            batch = default_collate(ds.__getitems__(list(range(b * B, (b + 1) * B))))
            for k in keys:
                out[k].append(batch[k].numpy())
            out["prior"].append(priors.batch(batch["group_id"]).numpy())
        np.savez(
            path,
            **{k: np.stack(v) for k, v in out.items()},
            n_parts=len(idx.parts),
            n_contexts=len(idx.contexts),
            n_batches=len(idx.batches),
            n_perts=len(idx.perturbations),
        )
    stamp.write_text(json.dumps(want))
    logger.info("inputs for G=%d drawn in %.1f s: %s", genes, time.perf_counter() - t0, path)
    return path


# -- our worker --------------------------------------------------------------------------------
def build_ours(spec: dict[str, Any], n_parts: int, n_contexts: int, n_batches: int):
    """ScaleModel at the benchmark size (defaults otherwise: additive prior, control stats, 2×hidden MLPs)."""
    from bionemo_scale.config import ScaleModelConfig
    from bionemo_scale.model.scale_model import ScaleModel
    from bionemo_scale.model.transformer_config import build_transformer_config

    cfg = ScaleModelConfig(
        hidden_size=spec["hidden"],
        num_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        ffn_hidden_size=spec["ffn"],
        n_genes=spec["genes"],
        n_parts=n_parts,
        n_contexts=n_contexts,
        n_batches=n_batches,
    )
    return ScaleModel(build_transformer_config(cfg), cfg), cfg


def load_batches(path: str, torch_mod: Any) -> tuple[list[dict[str, Any]], dict[str, int]]:
    import numpy as np

    z = np.load(path)
    n = z["ctrl"].shape[0]
    keys = ("ctrl", "pert", "parts", "dose", "context_id", "batch_id", "index", "group_id", "pert_id", "prior")
    batches = [{k: torch_mod.from_numpy(np.ascontiguousarray(z[k][i])) for k in keys} for i in range(n)]
    vocab = {k: int(z[k]) for k in ("n_parts", "n_contexts", "n_batches", "n_perts")}
    return batches, vocab


def ours_train_step(model: Any, cfg: Any, seed: int, autocast: str = "off") -> Callable[[dict[str, Any]], Any]:
    """One optimizer step of ScaleModel on a batch (returns the loss): OT coupling and flow time
    (`prepare_flow_batch`), forward, flow-matching loss, backward, gradient clip 1.0, AdamW step.
    `autocast="bf16"`: the forward under bf16 autocast, as `train` runs it with `trainer.autocast=bf16`."""
    import torch

    from bionemo_scale.config import FlowConfig
    from bionemo_scale.model.autocast import forward_autocast, outputs_to_float32
    from bionemo_scale.model.batch import prepare_flow_batch
    from bionemo_scale.model.objective import loss_terms
    from bionemo_scale.model.scale_model import conditions_of

    flow = FlowConfig()
    # fused: what `train` steps on CPU by default (optim.cpu_fused_adam)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=True)

    def step(batch: dict[str, Any]) -> Any:
        b = prepare_flow_batch(
            batch, flow, seed=seed, context_dropout=cfg.context_dropout, unknown_context=cfg.n_contexts
        )
        with forward_autocast(autocast, "cpu"):
            out = model(b["ctrl"], b["t"], conditions_of(b), b["pert"])
        loss = loss_terms(outputs_to_float32(out), b["ctrl"], b["pert"], flow)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    return step


def ours_worker(spec: dict[str, Any]) -> None:
    """Serve train/infer timing requests for ScaleModel (runs in the main venv)."""
    import torch

    torch.set_num_threads(spec["threads"])
    # the modules of ours_train_step, loaded before the set-up clock starts
    import bionemo_scale.model.batch
    import bionemo_scale.model.objective  # noqa: F401
    from bionemo_scale.model.scale_model import conditions_of
    from bionemo_scale.parallel import init_distributed

    t0 = time.perf_counter()
    init_distributed(1, 1, seed=spec["seed"])
    batches, vocab = load_batches(spec["inputs"], torch)
    model, cfg = build_ours(spec, vocab["n_parts"], vocab["n_contexts"], vocab["n_batches"])
    steps = {mode: ours_train_step(model, cfg, spec["seed"], autocast=mode) for mode in ("off", "bf16")}

    def train(iters: int, warmup: int, autocast: str = "off") -> dict[str, Any]:
        model.train()
        torch.set_float32_matmul_precision("highest")  # `train`'s default (an earlier request may have changed it)
        return time_iterations(lambda i: steps[autocast](batches[i % len(batches)]), iters, warmup)

    def train_autocast(iters: int, warmup: int) -> dict[str, Any]:
        return train(iters, warmup, autocast="bf16")  # `trainer.autocast=bf16`

    from bionemo_scale.data.count_lattice import put_on_lattice

    ctrl_cells = [b["ctrl"].reshape(-1, b["ctrl"].shape[-1]).numpy() for b in batches]

    def infer(
        iters: int, warmup: int, nfe: int, lattice: bool = False, precision: str = "highest", autocast: str = "off"
    ) -> dict[str, Any]:
        """`lattice`: also put the predicted cells on their controls' count lattice, as `predict` does;
        `precision`: torch's float32 matmul precision (`predict --matmul-precision`); `autocast`: as
        `predict --autocast`."""
        from bionemo_scale.model.autocast import forward_autocast

        model.eval()
        torch.set_float32_matmul_precision(precision)

        def call(i: int) -> None:
            b = batches[i % len(batches)]
            with forward_autocast(autocast, "cpu"):
                pred = model.predict(b["ctrl"], conditions_of(b), steps=nfe)
            if lattice:
                put_on_lattice(pred.reshape(-1, pred.shape[-1]).numpy(), ctrl_cells[i % len(batches)], spec["seed"], i)

        with torch.no_grad():
            res = time_iterations(call, iters, warmup)
        model.train()
        return res

    def infer_lattice(iters: int, warmup: int, nfe: int) -> dict[str, Any]:
        return infer(iters, warmup, nfe, lattice=True)

    def infer_medium(iters: int, warmup: int, nfe: int) -> dict[str, Any]:
        return infer(iters, warmup, nfe, precision="medium")

    def infer_autocast(iters: int, warmup: int, nfe: int) -> dict[str, Any]:
        return infer(iters, warmup, nfe, autocast="bf16")

    n_params = sum(p.numel() for p in model.parameters())
    n_block = sum(p.numel() for p in model.decoder.parameters())
    ready = {
        "model": "ScaleModel",
        "params": n_params,
        "params_transformer": n_block,
        "params_outside_transformer": n_params - n_block,
        "config": cfg.model_dump(mode="json"),
        "threads": torch.get_num_threads(),
        "setup_s": time.perf_counter() - t0,
        "versions": versions(("torch", "megatron-core", "numpy", "bionemo-scale")),
    }
    serve(
        ready,
        {
            "train": train,
            "train_autocast": train_autocast,
            "infer": infer,
            "infer_lattice": infer_lattice,
            "infer_medium": infer_medium,
            "infer_autocast": infer_autocast,
        },
    )


# -- the comparison ----------------------------------------------------------------------------
# infer_lattice: ours' NFE=1 inference plus the count lattice that `predict` applies (flow.count_lattice)
# train_autocast: both training steps under bf16 autocast (ours as `trainer.autocast=bf16`, STATE as
# Lightning's precision="bf16-mixed" would run its training_step; its CLI has no such setting)
# infer_autocast: inference under bf16 autocast (ours as `predict --autocast bf16`; STATE's forward
# under the same autocast, which `state tx predict` has no setting for: the equal-precision peer)
OPS = [
    ("train", None),
    ("train_autocast", None),
    ("infer", 1),
    ("infer_lattice", 1),
    ("infer_medium", 1),
    ("infer_autocast", 1),
    ("infer", 10),
    ("infer_autocast", 10),
]
AUTOCAST_SUFFIX = ", bf16 autocast"
LATTICE_LABEL = "inference NFE=1 + count lattice"


def op_label(op: str, nfe: int | None) -> str:
    if op == "infer_lattice":
        return LATTICE_LABEL
    if op == "infer_medium":
        return f"inference NFE={nfe}, matmul medium"
    if op == "train_autocast":
        return "train (fwd+bwd+opt)" + AUTOCAST_SUFFIX
    if op == "infer_autocast":
        return f"inference NFE={nfe}" + AUTOCAST_SUFFIX
    return "train (fwd+bwd+opt)" if op == "train" else f"inference NFE={nfe}"


def start_workers(spec: dict[str, Any], out: Path, tag: str) -> dict[str, Worker]:
    env = thread_env(spec["threads"], spec.get("omp_wait_policy"))
    spec_path = out / "specs" / f"{tag}.json"
    write_json(spec_path, spec)
    ours = Worker(
        "ours",
        [sys.executable, str(Path(__file__).resolve()), "--worker", "--spec", str(spec_path)],
        env,
        out / "logs" / f"{tag}__ours.log",
    )
    state = Worker(
        "STATE",
        [str(BENCH_PYTHON), str(STATE_RUNNER), "serve-model", "--spec", str(spec_path)],
        env,
        out / "logs" / f"{tag}__state.log",
    )
    return {"ours": ours, "STATE": state}


def compare(
    genes: int,
    threads: int,
    inputs: Path,
    sizes: dict[str, int],
    *,
    ops: list[tuple[str, int | None]],
    repeats: int,
    iters: int,
    warmup: int,
    out: Path,
    seed: int = 0,
    omp_wait_policy: str | None = None,
) -> dict[str, Any]:
    """Time both models on the same inputs, alternating ABBA per repeat; raw per-repeat results."""
    spec = {**sizes, "genes": genes, "threads": threads, "inputs": str(inputs), "seed": seed}
    spec["omp_wait_policy"] = omp_wait_policy
    tag = f"G{genes}_t{threads}"
    workers = start_workers(spec, out, tag)
    try:
        ready = {name: w.ready() for name, w in workers.items()}
        logger.info(
            "[%s] ours %.2fM params, STATE %.2fM params (%.2fM trainable)",
            tag,
            ready["ours"]["params"] / 1e6,
            ready["STATE"]["params"] / 1e6,
            ready["STATE"]["params_trainable"] / 1e6,
        )
        raw: dict[str, dict[str, list[dict[str, Any]]]] = {op_label(*o): {"ours": [], "STATE": []} for o in ops}
        for r in range(repeats):
            order = ["ours", "STATE"] if r % 2 == 0 else ["STATE", "ours"]
            for op, nfe in ops:
                for name in order:
                    if name == "STATE" and (
                        (op.startswith("infer") and nfe != 1) or op in ("infer_lattice", "infer_medium")
                    ):
                        continue  # STATE has one forward evaluation only, no count lattice, and predicts at 'highest'
                    req: dict[str, Any] = {"op": op, "iters": iters, "warmup": warmup if r == 0 else 1}
                    if not op.startswith("train"):
                        req["nfe"] = nfe
                    res = workers[name].request(**req)
                    res["repeat"] = r
                    raw[op_label(op, nfe)][name].append(res)
                    logger.info(
                        "[%s] %s %-22s repeat %d: %.3f s/iter wall, %.3f CPU-s/iter (load %.1f)",
                        tag,
                        name,
                        op_label(op, nfe),
                        r,
                        sum(res["wall_s"]) / iters,
                        sum(res["cpu_s"]) / iters,
                        res["load_after"]["loadavg_1m"],
                    )
    finally:
        for w in workers.values():
            w.close()
    return {"genes": genes, "threads": threads, "ready": ready, "raw": raw, "spec": spec}


def summarise(run: dict[str, Any], sizes: dict[str, int]) -> list[dict[str, Any]]:
    """One row per (measurement, model): medians/IQR of cells/s and ratios against STATE NFE=1."""
    S, B = sizes["set_size"], sizes["batch_sets"]
    rows = []
    state_ref: dict[str, list[dict[str, Any]]] = {}
    for label, by_model in run["raw"].items():
        for name, reps in by_model.items():
            if not reps:
                continue
            cells = (2 * S * B) if label.startswith("train") else S * B
            wall = [cells * len(x["wall_s"]) / sum(x["wall_s"]) for x in reps]
            cpu = [cells * len(x["cpu_s"]) / sum(x["cpu_s"]) for x in reps]
            loads = [x["load_after"]["loadavg_1m"] for x in reps] + [x["load_before"]["loadavg_1m"] for x in reps]
            row = {
                "genes": run["genes"],
                "threads": run["threads"],
                "measurement": label,
                "model": name,
                "cells_per_iter": cells,
                "iters_per_repeat": len(reps[0]["wall_s"]),
                "cells_per_s": Summary.of(wall).to_json(),
                "cells_per_cpu_s": Summary.of(cpu).to_json(),
                "ms_per_iter": Summary.of([1000 * sum(x["wall_s"]) / len(x["wall_s"]) for x in reps]).to_json(),
                "per_repeat_cells_per_s": wall,
                "per_repeat_cells_per_cpu_s": cpu,
                "loadavg_1m": [min(loads), max(loads)],
            }
            rows.append(row)
            if name == "STATE":
                state_ref[label] = reps
    # ratios: ours ÷ STATE at the same measurement; inference of ours at any NFE ÷ STATE's forward
    by_key = {(r["measurement"], r["model"]): r for r in rows}
    for r in rows:
        if r["model"] != "ours":
            continue
        ref_label = r["measurement"] if r["measurement"].startswith("train") else op_label("infer", 1)
        ref = by_key.get((ref_label, "STATE"))
        if ref is None:
            continue
        r["vs_state_measurement"] = ref_label
        for key in ("cells_per_s", "cells_per_cpu_s"):
            r[f"ratio_{key}"] = r[key]["median"] / ref[key]["median"]
            pairs = [a / b for a, b in zip(r[f"per_repeat_{key}"], ref[f"per_repeat_{key}"], strict=False)]
            r[f"paired_ratio_{key}"] = Summary.of(pairs).to_json()
        # inference under autocast also against STATE's forward under the same autocast (equal precision)
        equal = by_key.get((op_label("infer_autocast", 1), "STATE"))
        if r["measurement"].startswith("inference") and r["measurement"].endswith(AUTOCAST_SUFFIX) and equal:
            r["ratio_cells_per_s_vs_state_autocast"] = r["cells_per_s"]["median"] / equal["cells_per_s"]["median"]
    return rows


def lattice_overhead(rows: list[dict[str, Any]]) -> str:
    """What the count lattice costs in `predict`: ours NFE=1 with it ÷ without it, same run."""
    by_key = {(r["genes"], r["threads"], r["measurement"]): r for r in rows if r["model"] == "ours"}
    lines = []
    for (genes, threads, label), r in by_key.items():
        base = by_key.get((genes, threads, op_label("infer", 1)))
        if label != LATTICE_LABEL or base is None:
            continue
        ratio = r["cells_per_s"]["median"] / base["cells_per_s"]["median"]
        pairs = [a / b for a, b in zip(r["per_repeat_cells_per_s"], base["per_repeat_cells_per_s"], strict=False)]
        iqr = Summary.of(pairs)
        lines.append(
            f"- G={genes}, {threads} threads: NFE=1 with the count lattice runs at {ratio:.2f}x the cells/s of NFE=1 "
            f"without it (paired-ratio IQR {iqr.q25:.2f}–{iqr.q75:.2f})"
        )
    return (
        ("\n\nCount lattice (what `predict` adds to the model's output):\n\n" + "\n".join(lines) + "\n")
        if lines
        else ""
    )


def report(results: list[dict[str, Any]], rows: list[dict[str, Any]], args: argparse.Namespace, meta: dict) -> str:
    headers = [
        "G",
        "threads",
        "measurement",
        "model",
        "cells/s (median)",
        "IQR",
        "ours ÷ STATE",
        "paired-ratio IQR",
        "cells per CPU-s",
        "ours ÷ STATE (CPU)",
        "ms/iter",
        "load 1m",
    ]
    body = []
    for r in rows:
        s, c = r["cells_per_s"], r["cells_per_cpu_s"]
        ratio = fmt_ratio(r.get("ratio_cells_per_s")) if r["model"] == "ours" else ""
        pr = r.get("paired_ratio_cells_per_s")
        ratio_iqr = f"{pr['q25']:.2f}–{pr['q75']:.2f}" if pr else ""
        if r["model"] == "ours" and r["measurement"] in (
            op_label("infer", 10),
            op_label("infer_autocast", 10),
            LATTICE_LABEL,
        ):
            ratio += " (vs STATE NFE=1)"
        if "ratio_cells_per_s_vs_state_autocast" in r:
            ratio += f"; {r['ratio_cells_per_s_vs_state_autocast']:.2f}× vs STATE's under autocast"
        body.append(
            [
                r["genes"],
                r["threads"],
                r["measurement"],
                r["model"],
                fmt_num(s["median"]),
                f"{fmt_num(s['q25'])}–{fmt_num(s['q75'])}",
                ratio,
                ratio_iqr,
                fmt_num(c["median"]),
                fmt_ratio(r.get("ratio_cells_per_cpu_s")) if r["model"] == "ours" else "",
                fmt_num(r["ms_per_iter"]["median"]),
                f"{r['loadavg_1m'][0]:.1f}–{r['loadavg_1m'][1]:.1f}",
            ]
        )
    table = markdown_table(headers, body)
    table += lattice_overhead(rows)
    params = []
    for res in results:
        o, st = res["ready"]["ours"], res["ready"]["STATE"]
        params.append(
            [
                res["genes"],
                f"{o['params'] / 1e6:.2f}M ({o['params_transformer'] / 1e6:.2f}M transformer)",
                f"{st['params'] / 1e6:.2f}M total, {st['params_trainable'] / 1e6:.2f}M trainable "
                f"({st['params_backbone_trainable'] / 1e6:.2f}M transformer)",
            ]
        )
    seen, ptable = set(), []
    for p in params:
        if p[0] not in seen:
            seen.add(p[0])
            ptable.append(p)
    sz = model_sizes(args)
    notes = (
        f"\nHidden {sz['hidden']}, {sz['layers']} layers, {sz['heads']} heads, MLP {sz['ffn']} (4×hidden, as STATE's "
        f"configs), S={sz['set_size']} cells per set, B={sz['batch_sets']} sets per step; training cells/s counts "
        f"2·S·B = {2 * sz['set_size'] * sz['batch_sets']} cells (control + perturbed) per step, inference S·B = "
        f"{sz['set_size'] * sz['batch_sets']} predicted cells per call. {args.repeats} repeats × {args.iters} "
        f"iterations after {args.warmup} warm-up iterations (1 more before each later repeat); ours and STATE "
        "alternate ABBA within the same run. 'ours ÷ STATE' = ratio of the medians; 'paired-ratio IQR' = IQR of "
        "the per-repeat ratios of adjacent (paired) repeats. Ours at NFE=10 is compared with STATE's single "
        "forward (STATE has no multi-step inference). Inference rows marked 'bf16 autocast' run the forward under "
        "torch's bf16 autocast with float32 weights (ours: `predict --autocast bf16`); their ratio is against STATE's "
        "float32 forward (`state tx predict`), then against STATE's forward under the same autocast. "
        "CPU-s = process CPU time of all threads.\n"
    )
    ptab = markdown_table(["G", "ours params", "STATE params"], ptable)
    load = meta["machine_load_start"], meta["machine_load_end"]
    notes += (
        f"\nMachine: {platform.machine()}, {os.cpu_count()} CPUs; load average (1/5/15 min) at start "
        f"{load[0]['loadavg_1m']:.1f}/{load[0]['loadavg_5m']:.1f}/{load[0]['loadavg_15m']:.1f}, at end "
        f"{load[1]['loadavg_1m']:.1f}/{load[1]['loadavg_5m']:.1f}/{load[1]['loadavg_15m']:.1f} (other engineers' jobs "
        f"share the machine). Run time {meta['total_s']:.0f} s.\n"
    )
    vers = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    return table + "\n" + notes + "\n" + ptab + "\n\nversions: " + vers + "\n"


def chart(rows: list[dict[str, Any]], path: Path, threads: int) -> None:
    sel = [r for r in rows if r["threads"] == threads]
    groups, meds, errs, notes = [], {}, {}, {}
    for r in sel:
        g = f"{r['measurement'].replace(' (fwd+bwd+opt)', '')}\nG={r['genes']}"
        if g not in groups:
            groups.append(g)
        name = "STATE (arc-state)" if r["model"] == "STATE" else "SCALE (ours)"
        meds[(g, name)] = r["cells_per_s"]["median"]
        errs[(g, name)] = (r["cells_per_s"]["q25"], r["cells_per_s"]["q75"])
        if r["model"] == "ours" and "ratio_cells_per_s" in r:
            notes[g] = f"ours÷STATE {r['ratio_cells_per_s']:.2f}×"
    bar_chart(
        path,
        groups,
        ["SCALE (ours)", "STATE (arc-state)"],
        meds,
        errs,
        ylabel="cells/s (median, IQR whiskers)",
        title=f"model step on CPU, {threads} threads: hidden 256, 4 layers, 8 heads, S=64, B=8",
        annotations=notes,
        log=True,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not BENCH_PYTHON.exists():
        raise SystemExit(f"{BENCH_PYTHON} is missing: create the comparison venv (.venv-bench, see STACK.md)")
    t0 = time.perf_counter()
    load0 = machine_load()
    sizes = model_sizes(args)
    training = [o for o in OPS if o[0].startswith("train")]
    ops = [*([] if args.infer_only else training), *(o for o in OPS if o not in training and o[1] in args.nfe)]
    results = []
    for genes in args.genes:
        inputs = prepare_inputs(genes, out / "cache", sizes, args.input_batches, args.seed)
        for threads in args.threads:
            results.append(
                compare(
                    genes,
                    threads,
                    inputs,
                    sizes,
                    ops=ops,
                    repeats=args.repeats,
                    iters=args.iters,
                    warmup=args.warmup,
                    out=out,
                    seed=args.seed,
                    omp_wait_policy=args.omp_wait_policy,
                )
            )
    rows = [row for res in results for row in summarise(res, sizes)]
    meta = {
        "args": vars(args),
        "sizes": sizes,
        "machine_load_start": load0,
        "machine_load_end": machine_load(),
        "total_s": time.perf_counter() - t0,
        "versions": {
            "python": platform.python_version(),
            **versions(("bionemo-scale", "torch", "megatron-core", "nemo-toolkit", "numpy")),
            **{f"bench:{k}": v for k, v in bench_versions().items()},
        },
        "state_config": results[0]["ready"]["STATE"].get("config") if results else None,
        "ours_config": results[0]["ready"]["ours"].get("config") if results else None,
    }
    text = report(results, rows, args, meta)
    if not args.no_write:
        write_json(out / "model_step.json", {"meta": meta, "rows": rows, "raw": results})
        (out / "model_step.md").write_text(text)
        chart(rows, out / "model_step.png", args.threads[0])
        if args.docs_img:
            Path(args.docs_img).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / "model_step.png", args.docs_img)
        logger.info("wrote %s/model_step.{json,md,png} in %.0f s", out, meta["total_s"])
    print("\n" + text)
    return {"meta": meta, "rows": rows, "text": text}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = bench_parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="smoke test (~1-2 min): G=1000, 2 threads, 3×3 iterations")
    ap.add_argument("--out", help="output directory (default bench_out/model_step, or model_step_quick)")
    ap.add_argument("--genes", type=int, nargs="+", default=[2000, 1000], help="gene panel sizes G")
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch threads (first one is charted)")
    add_model_size_args(ap)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per model and measurement (>= 3)")
    ap.add_argument("--iters", type=int, default=10, help="timed iterations per repeat (>= 10)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up iterations before the first repeat")
    ap.add_argument("--nfe", type=int, nargs="+", default=[1, 10], choices=[1, 10], help="inference NFEs of ours")
    ap.add_argument("--infer-only", action="store_true", help="skip the training measurement")
    ap.add_argument("--input-batches", type=int, default=8, help="distinct pre-drawn batches cycled through")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--omp-wait-policy", choices=["passive", "active"], help="OMP_WAIT_POLICY of both models (default: unset)"
    )
    ap.add_argument("--docs-img", default="", help="also copy the chart here (e.g. docs/img/model_step.png)")
    ap.add_argument("--no-write", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.genes, args.threads = [1000], [2]
        args.repeats, args.iters, args.warmup = 3, 3, 1
        args.docs_img = ""
    default_out(args, "model_step")
    return args


def main(argv: list[str] | None = None) -> None:
    bench_main(parse_args(argv), run, ours_worker)


if __name__ == "__main__":
    main()
