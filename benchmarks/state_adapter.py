"""Train Arc's STATE (arc-state's transition model) on a processed SCALE dataset and split, and
write its held-out predictions in bionemo-scale's PRED/REAL format.

    .venv/bin/python benchmarks/state_adapter.py --data DIR --split TOML --out DIR \
        [--steps 300 --seed 0 --hidden 256 --layers 4 --heads 8 --set-size 64 --batch-sets 8]

Runs in the main venv (numpy 1.26); everything STATE-side runs in `.venv-bench` through
subprocesses, so no numpy-2 package is imported here. The steps, all inside `out_dir`:

1. `cell_load/data/<context>.h5ad`: the processed matrix (log1p(normalize_total) over our genes,
   exactly what SCALE trains on) exported in the layout of `state tx preprocess_train`: one h5ad
   per context ("one H5 file per cell type"), `obsm['X_hvg']` = the expression, dense float32,
   and X = the same values as CSR; categorical obs `perturbation` / `context` / `batch` (batch
   `b0` when the data has none), unique barcodes, `uns['log1p']`.
2. `cell_load/split.toml`: cell-load's TOML with the same held-out pairs. It is written from the
   split as *resolved by our index* (so `A+B` held out as `B+A` in the file names the data's
   label) and checked after training against the pairs cell-load itself put in val/test.
3. `state tx train` (`.venv-bench/bin/state`), STATE's own CLI, loader (cell-load's
   PerturbationDataModule) and model/loss (`model=state`: bidirectional LLaMA over cell sets,
   energy distance), on `embed_key=X_hvg`, `output_space=gene` (STATE's README recipe for
   training on HVG expression): the model reads and predicts the gene-space expression. Only the
   sizes and budget are set (see `train_overrides`); the optimizer and LR are STATE's defaults.
4. `_state_infer.py` (bench venv) loads `final.ckpt` as `state tx infer` does and runs
   `predict_step` on sets made of *our* planned control cells (`predict.plan_predictions`, the
   same cells the baselines and SCALE use), cut into sets of `set_size` and padded exactly as
   `predict.run_predictor` pads them; predictions are clipped to [0, 14] as `state tx infer` does.
5. `PRED.h5ad` + `REAL.h5ad` via `predict.build_anndata(kind="state")`; `state_run.json` logs
   the commands, STATE's resolved config, wall times and steps/s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BENCH_VENV = REPO / ".venv-bench"
STATE_BIN = BENCH_VENV / "bin" / "state"
BENCH_PYTHON = BENCH_VENV / "bin" / "python"
INFER_RUNNER = Path(__file__).resolve().parent / "_state_infer.py"

DATASET = "scale"  # cell-load dataset name in the TOML ("scale.<context>" keys)
PERT_COL, CONTEXT_COL, BATCH_COL = "perturbation", "context", "batch"
NO_BATCH_LABEL = "b0"
EMBED_KEY = "X_hvg"
CLIP = (0.0, 14.0)  # state tx infer clips gene-space predictions to this range

logger = logging.getLogger("benchmarks.state_adapter")


class StateRunError(RuntimeError):
    pass


# -- labels -------------------------------------------------------------------------------------
def state_labels(data: Any) -> list[str]:
    """STATE's perturbation label of every group.

    The perturbation's own label, unless a perturbation comes at several doses in the data; then
    `label@dose` (STATE conditions on the label alone, like its `drugname_drugconc` column).
    """
    idx = data.index
    g = idx.groups
    perts = g["pert_id"].to_numpy()
    doses = g["dose"].to_numpy()
    multi = {int(p) for p in np.unique(perts) if p != 0 and np.unique(doses[perts == p]).size > 1}
    return [f"{idx.perturbations[p]}@{d:g}" if int(p) in multi else idx.perturbations[p] for p, d in zip(perts, doses)]


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label)


def _batch_labels(data: Any) -> list[str]:
    from bionemo_scale.data.index import NO_BATCH

    return [NO_BATCH_LABEL if b == NO_BATCH else str(b) for b in data.index.batches]


def has_batches(data: Any) -> bool:
    from bionemo_scale.data.index import NO_BATCH

    return data.index.batches != [NO_BATCH]


# -- 1. cell-load inputs -----------------------------------------------------------------------
def export_cell_load_inputs(data: Any, dest: Path, chunk_rows: int = 20_000) -> dict[str, Any]:
    """One h5ad per context with obsm['X_hvg'] (dense) and X (CSR) = our expression values."""
    import h5py
    import pandas as pd

    try:
        from anndata.io import write_elem
    except ImportError:  # pragma: no cover - anndata < 0.11
        from anndata.experimental import write_elem

    dest.mkdir(parents=True, exist_ok=True)
    idx, arrays = data.index, data.arrays
    g = idx.groups
    labels = np.asarray(state_labels(data), dtype=object)
    batch_labels = _batch_labels(data)
    genes = pd.DataFrame(index=pd.Index(data.genes))
    files = {}
    for c, ctx in enumerate(idx.contexts):
        sub = g[g["context_id"] == c]
        lo, hi = int(sub["start"].min()), int(sub["end"].max())
        if int((sub["end"] - sub["start"]).sum()) != hi - lo:
            raise StateRunError(f"context {ctx} is not one contiguous row range in {data.path}")
        sizes = (sub["end"] - sub["start"]).to_numpy()
        pert = np.repeat(labels[sub.index.to_numpy()], sizes)
        batch = np.repeat(np.asarray(batch_labels, dtype=object)[sub["batch_id"].to_numpy()], sizes)
        obs = pd.DataFrame(
            {
                PERT_COL: pd.Categorical(pert.astype(str)),
                CONTEXT_COL: pd.Categorical([ctx] * (hi - lo), categories=[ctx]),
                BATCH_COL: pd.Categorical(batch.astype(str)),
            },
            index=pd.Index(data.obs["cell_id"].to_numpy()[lo:hi].astype(str)),
        )
        path = dest / f"{_safe(ctx)}.h5ad"
        if path.exists():  # two context labels with the same file-safe spelling
            path = dest / f"{_safe(ctx)}_{c}.h5ad"
        with h5py.File(path, "w") as f:
            f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
            _write_csr_slice(f, arrays, lo, hi, data.n_genes, data._column_order)
            write_elem(f, "obs", obs)
            write_elem(f, "var", genes)
            write_elem(f, "obsm", {})
            for key in ("varm", "obsp", "varp", "layers"):
                write_elem(f, key, {})
            write_elem(f, "uns", {"log1p": {"base": None}})  # scanpy's mark of log1p data
            dense = f["obsm"].create_dataset(EMBED_KEY, shape=(hi - lo, data.n_genes), dtype=np.float32)
            dense.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
            for a in range(lo, hi, chunk_rows):
                b = min(a + chunk_rows, hi)
                dense[a - lo : b - lo] = data.gather(np.arange(a, b))
        files[ctx] = {"path": str(path), "cells": hi - lo}
    return files


def _write_csr_slice(f: Any, arrays: Any, lo: int, hi: int, n_genes: int, column_order: Any) -> None:
    if column_order is not None:
        raise StateRunError("datasets with align_genes() are not supported by the STATE export")
    row_ptr = np.asarray(arrays.row_ptr[lo : hi + 1], dtype=np.int64)
    p0, p1 = int(row_ptr[0]), int(row_ptr[-1])
    X = f.create_group("X")
    X.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (hi - lo, n_genes)})
    X.create_dataset("data", data=np.asarray(arrays.data[p0:p1], dtype=np.float32))
    X.create_dataset("indices", data=np.asarray(arrays.col[p0:p1], dtype=np.int32))
    X.create_dataset("indptr", data=row_ptr - p0)


# -- 2. the split ------------------------------------------------------------------------------
def held_out_pairs(data: Any, split: str | Path) -> dict[str, list[list[str]]]:
    """Our val/test (context, STATE label) pairs, sorted; the reference the TOML must reproduce."""
    labels = data.split_labels(split)
    names = state_labels(data)
    g = data.index.groups
    out: dict[str, list[list[str]]] = {"val": [], "test": []}
    for which in out:
        pairs = {
            (data.index.contexts[int(g.at[i, "context_id"])], names[i])
            for i in np.flatnonzero((labels == which) & ~data.index.is_control)
        }
        out[which] = sorted([list(p) for p in pairs])
    return out


def write_cell_load_toml(data: Any, split: str | Path, data_dir: Path, path: Path) -> dict[str, Any]:
    """cell-load's TOML reproducing our resolved split: [zeroshot] contexts + [fewshot] lists."""
    from bionemo_scale.data.splits import FROM_DATA, SplitSpec

    idx = data.index
    zeroshot: dict[str, str] = {}
    if not (isinstance(split, str) and split == FROM_DATA):
        spec = SplitSpec.from_toml(split)
        held = spec.assign(idx.contexts, idx.perturbations, idx.control_label, idx.combo_sep, data.dataset_name)
        zeroshot = {idx.contexts[c]: which for (c, p), which in held.items() if p < 0}
    pairs = held_out_pairs(data, split)
    fewshot: dict[str, dict[str, list[str]]] = {}
    for which in ("val", "test"):
        for ctx, label in pairs[which]:
            if ctx in zeroshot:
                continue
            fewshot.setdefault(ctx, {"val": [], "test": []})[which].append(label)
    names = state_labels(data)
    for ctx, which in zeroshot.items():  # a zeroshot context must hold out every perturbation there
        perts = {lab for c, lab in pairs[which] if c == ctx}
        in_ctx = (idx.groups["context_id"] == idx.contexts.index(ctx)).to_numpy() & ~idx.is_control
        n_all = len({names[i] for i in np.flatnonzero(in_ctx)})
        if len(perts) != n_all:
            raise StateRunError(f"zeroshot context {ctx}: {len(perts)} of {n_all} perturbations held out")
    q = json.dumps  # TOML basic strings accept JSON escapes
    lines = [f"# written by benchmarks/state_adapter.py from {split}", "[datasets]", f"{DATASET} = {q(str(data_dir))}",
             "", "[training]", f'{DATASET} = "train"', "", "[zeroshot]"]  # fmt: skip
    lines += [f"{q(f'{DATASET}.{ctx}')} = {q(which)}" for ctx, which in zeroshot.items()]
    lines += ["", "[fewshot]"]
    for ctx, lists in fewshot.items():
        lines.append(f"[fewshot.{q(f'{DATASET}.{ctx}')}]")
        for which in ("val", "test"):
            lines.append(f"{which} = [{', '.join(q(p) for p in sorted(lists[which]))}]")
    path.write_text("\n".join(lines) + "\n")
    return {"zeroshot": zeroshot, "fewshot": fewshot, "pairs": pairs}


def write_part_features(data: Any, path: Path) -> dict[str, Any]:
    """STATE `perturbation_features_file`: label -> multi-hot over atomic parts (A+B = A + B).

    Opt-in (`pert_features="parts"`). STATE's default one-hot gives a held-out combination an
    untrained one-hot column; this feeds it the same part structure SCALE composes combinations
    from, through STATE's own supported option. The control gets the zero vector (cell-load's
    fill for labels absent from the file). With several doses per perturbation, a log1p(dose)
    column is appended.
    """
    import torch

    idx = data.index
    g = idx.groups
    labels = state_labels(data)
    multi_dose = any("@" in lab for lab, p in zip(labels, g["pert_id"]) if p != 0)
    width = len(idx.parts) + int(multi_dose)
    feats: dict[str, Any] = {}
    for i, lab in enumerate(labels):
        p = int(g.at[i, "pert_id"])
        if p == 0 or lab in feats:
            continue
        v = torch.zeros(width)
        v[idx.pert_parts[p]] = 1.0
        if multi_dose:
            v[-1] = float(np.log1p(float(g.at[i, "dose"])))
        feats[lab] = v
    torch.save(feats, path)
    return {"path": str(path), "dim": width, "labels": len(feats), "parts": len(idx.parts)}


# -- 3. training -------------------------------------------------------------------------------
def train_overrides(
    *,
    toml: Path,
    control: str,
    batch_col: str,
    basal_mapping: str,
    output_dir: Path,
    name: str,
    hidden: int,
    layers: int,
    heads: int,
    set_size: int,
    batch_sets: int,
    max_steps: int,
    seed: int,
    val_freq: int,
    pert_features: Path | None = None,
) -> list[str]:
    """Hydra overrides for `state tx train`: data layout, sizes, budget, seed; nothing else.

    The transformer keeps STATE's own proportions at the new width (its configs use
    head_dim = hidden / heads and a 4x MLP: state.yaml 768/12/64/3072, state_sm.yaml 672/8/84/2688).
    Not set, i.e. STATE's defaults: model=state (energy loss, blur 0.05, predict_residual, 1-layer
    encoders/decoder MLPs, dropout 0.1), training.lr=1e-4 (Adam), gradient_clip_val=10,
    should_yield_control_cells, n_basal_samples=1, one-hot perturbations.
    """
    if hidden % heads:
        raise StateRunError(f"hidden {hidden} is not divisible by heads {heads}")
    extra = [f"data.kwargs.perturbation_features_file={pert_features}"] if pert_features else []
    return [
        *extra,
        f"data.kwargs.toml_config_path={toml}",
        f"data.kwargs.embed_key={EMBED_KEY}",
        "data.kwargs.output_space=gene",
        f"data.kwargs.pert_col={PERT_COL}",
        f"data.kwargs.cell_type_key={CONTEXT_COL}",
        f"data.kwargs.batch_col={batch_col}",
        f"data.kwargs.control_pert={json.dumps(control)}",
        f"data.kwargs.basal_mapping_strategy={basal_mapping}",
        "data.kwargs.num_workers=0",  # 2-core machine; the brief runs every loader in the main process
        f"+data.kwargs.random_seed={seed}",
        "model=state",
        f"model.kwargs.cell_set_len={set_size}",
        f"model.kwargs.hidden_dim={hidden}",
        f"model.kwargs.transformer_backbone_kwargs.num_hidden_layers={layers}",
        f"model.kwargs.transformer_backbone_kwargs.num_attention_heads={heads}",
        f"model.kwargs.transformer_backbone_kwargs.num_key_value_heads={heads}",
        f"model.kwargs.transformer_backbone_kwargs.head_dim={hidden // heads}",
        f"model.kwargs.transformer_backbone_kwargs.intermediate_size={4 * hidden}",
        f"training.batch_size={batch_sets}",
        f"training.max_steps={max_steps}",
        f"training.train_seed={seed}",
        f"training.val_freq={val_freq}",
        f"training.ckpt_every_n_steps={val_freq}",
        "use_wandb=false",
        "wandb.local_wandb_dir=./wandb_logs",
        f"output_dir={output_dir}",
        f"name={name}",
        "overwrite=true",
    ]


def _run_logged(cmd: list[str], log: Path, cwd: Path, timeout_s: float, markers: dict[str, str]) -> dict[str, Any]:
    """Run `cmd`, tee its output to `log`, and time-stamp the first line matching each marker."""
    env = dict(os.environ, WANDB_MODE="disabled", HYDRA_FULL_ERROR="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # nothing of the main venv may leak into the bench venv
    stamps: dict[str, float] = {}
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)  # fmt: skip
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                now = time.perf_counter() - t0
                f.write(line)
                for key, pattern in markers.items():
                    if key not in stamps and pattern in line:
                        stamps[key] = now
                if now > timeout_s:
                    proc.kill()
                    raise StateRunError(f"{cmd[0]} ran past {timeout_s:.0f} s; see {log}")
            rc = proc.wait(timeout=max(1.0, timeout_s - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            raise StateRunError(f"{cmd[0]} ran past {timeout_s:.0f} s; see {log}") from None
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise StateRunError(f"{' '.join(cmd[:3])} failed with exit code {rc}; log {log}:\n{tail}")
    return {"wall_s": wall, "cpu_s": cpu, "stamps_s": stamps}


def _read_metrics(run_dir: Path) -> dict[str, Any]:
    import csv

    out: dict[str, Any] = {}
    for path in sorted(run_dir.glob("version_*/metrics.csv")):
        rows = list(csv.DictReader(path.open()))
        for key in ("train_loss", "val_loss", "batches_per_second"):
            vals = [(r.get("step"), float(r[key])) for r in rows if r.get(key) not in (None, "")]
            if vals:
                out[key] = {"first": vals[0], "last": vals[-1], "n": len(vals)}
    return out


# -- 4. inference inputs -----------------------------------------------------------------------
def infer_inputs(data: Any, plans: list[Any], set_size: int, seed: int, path: Path) -> list[int]:
    """Control expression of every planned cell, cut into sets exactly as `run_predictor` does.

    Returns the number of real cells per plan; sets are written in plan order with the STATE
    label and batch label of the group each set predicts.
    """
    labels = state_labels(data)
    batches = _batch_labels(data)
    g = data.index.groups
    ctrl, set_pert, set_batch, set_ctx, n_real = [], [], [], [], []
    for plan in plans:
        n = plan.ctrl_rows.size
        n_sets = -(-n // set_size)
        rows = plan.ctrl_rows
        if n_sets * set_size > n:  # identical padding to bionemo_scale.predict.run_predictor
            rng = np.random.default_rng([seed, plan.group, 0xAD])
            rows = np.concatenate([rows, rng.choice(plan.ctrl_rows, n_sets * set_size - n)])
        ctrl.append(data.gather(rows))
        set_pert += [labels[plan.group]] * n_sets
        set_batch += [batches[int(g.at[plan.group, "batch_id"])]] * n_sets
        set_ctx += [data.index.contexts[int(g.at[plan.group, "context_id"])]] * n_sets
        n_real.append(n)
    np.savez(
        path,
        ctrl=np.concatenate(ctrl).astype(np.float32),
        set_pert=np.asarray(set_pert, dtype=str),
        set_batch=np.asarray(set_batch, dtype=str),
        set_context=np.asarray(set_ctx, dtype=str),
        set_size=np.int64(set_size),
    )
    return n_real


def unpad(pred: np.ndarray, n_real: list[int], set_size: int) -> np.ndarray:
    out, pos = [], 0
    for n in n_real:
        padded = -(-n // set_size) * set_size
        out.append(pred[pos : pos + n])
        pos += padded
    if pos != pred.shape[0]:
        raise StateRunError(f"STATE returned {pred.shape[0]} rows, expected {pos}")
    return np.concatenate(out) if out else pred[:0]


# -- the whole run -----------------------------------------------------------------------------
def run_state(
    data_dir: str | Path,
    split_toml: str | Path,
    out_dir: str | Path,
    *,
    hidden: int = 256,
    layers: int = 4,
    heads: int = 8,
    set_size: int = 64,
    batch_sets: int = 8,
    max_steps: int = 300,
    seed: int = 0,
    subset: str = "test",
    control_matching: str = "batch",
    val_freq: int | None = None,
    timeout_s: float = 1800.0,
    keep_inputs: bool = True,
    pert_features: str = "onehot",
) -> Path:
    """Train STATE with `state tx train` and write its `subset` predictions to out_dir/PRED.h5ad.

    `val_freq` (default: max_steps, i.e. one validation pass at the end) only sets how often
    STATE validates and checkpoints; predictions always come from `final.ckpt` (what `state tx
    infer` loads by default), so the val pairs select nothing. Returns the PRED.h5ad path
    (REAL.h5ad lies beside it); `state_run.json` records commands, config and timings.
    """
    from bionemo_scale.data.store import ProcessedDataset
    from bionemo_scale.predict import build_anndata, held_out_groups, plan_predictions, write_predictions

    t_start = time.perf_counter()
    for exe in (STATE_BIN, BENCH_PYTHON):
        if not exe.exists():
            raise StateRunError(f"{exe} is missing: create the comparison venv (.venv-bench, see STACK.md)")
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir).resolve()
    split = split_toml if str(split_toml) == "split-col" else str(Path(split_toml).resolve())
    out_dir.mkdir(parents=True, exist_ok=True)
    log: dict[str, Any] = {
        "args": {
            "data_dir": str(data_dir),
            "split": str(split),
            "out_dir": str(out_dir),
            "hidden": hidden,
            "layers": layers,
            "heads": heads,
            "set_size": set_size,
            "batch_sets": batch_sets,
            "max_steps": max_steps,
            "seed": seed,
            "subset": subset,
            "control_matching": control_matching,
            "pert_features": pert_features,
        },
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "timings_s": {},
    }

    def save_log() -> None:
        (out_dir / "state_run.json").write_text(json.dumps(log, indent=2, default=str) + "\n")

    data = ProcessedDataset(data_dir)
    groups = held_out_groups(data, split, subset)

    # 1-2. inputs
    t0 = time.perf_counter()
    cl_dir = out_dir / "cell_load"
    if cl_dir.exists():
        shutil.rmtree(cl_dir)
    files = export_cell_load_inputs(data, cl_dir / "data")
    toml = cl_dir / "split.toml"
    split_info = write_cell_load_toml(data, split, (cl_dir / "data").resolve(), toml)
    log["cell_load_inputs"] = {"files": files, "toml": str(toml), "toml_text": toml.read_text()}
    log["split_ours"] = split_info["pairs"]
    features = None
    if pert_features == "parts":
        features = cl_dir / "pert_features_parts.pt"
        log["pert_features"] = write_part_features(data, features)
    elif pert_features != "onehot":
        raise StateRunError(f"pert_features must be 'onehot' (STATE's default) or 'parts', not {pert_features!r}")
    log["timings_s"]["export"] = time.perf_counter() - t0

    # 3. train
    batched = has_batches(data)
    basal = "batch" if (batched and control_matching == "batch") else "random"
    train_root, name = out_dir / "state_train", "run"
    overrides = train_overrides(
        toml=toml, control=data.index.control_label, batch_col=BATCH_COL, basal_mapping=basal,
        output_dir=train_root, name=name, hidden=hidden, layers=layers, heads=heads, set_size=set_size,
        batch_sets=batch_sets, max_steps=max_steps, seed=seed, val_freq=val_freq or max_steps, pert_features=features,
    )  # fmt: skip
    train_cmd = [str(STATE_BIN), "tx", "train", *overrides]
    log["commands"] = {"train": train_cmd}
    log["basal_mapping_strategy"] = basal
    save_log()
    logger.info("training STATE: %d steps (log %s)", max_steps, out_dir / "state_train.log")
    res = _run_logged(
        train_cmd, out_dir / "state_train.log", out_dir, timeout_s,
        markers={"fit_start": "About to call trainer.fit()", "fit_end": "trainer.fit() completed"},
    )  # fmt: skip
    run_dir = train_root / name
    stamps = res["stamps_s"]
    fit_s = stamps.get("fit_end", res["wall_s"]) - stamps.get("fit_start", 0.0)
    log["timings_s"]["train_process"] = res["wall_s"]
    log["timings_s"]["train_fit"] = fit_s
    log["timings_s"]["train_process_cpu"] = res["cpu_s"]
    log["load_average_after_train"] = os.getloadavg()
    log["train"] = {
        "steps": max_steps,
        "steps_per_s_fit": max_steps / fit_s if fit_s > 0 else None,
        "cells_per_s_fit": max_steps * batch_sets * set_size / fit_s if fit_s > 0 else None,
        "note": "fit = trainer.fit() wall time: data-module iteration + optimizer steps + Lightning's 2-batch "
        "sanity validation + validation every val_freq steps; the process time adds imports and data setup",
        "state_metrics_csv": _read_metrics(run_dir),
    }
    log["state_config_yaml"] = (run_dir / "config.yaml").read_text()
    ckpt = run_dir / "checkpoints" / "final.ckpt"
    if not ckpt.exists():
        raise StateRunError(f"STATE wrote no {ckpt}")
    save_log()

    # 4. inference on our control cells
    t0 = time.perf_counter()
    plans = plan_predictions(data, groups, seed, control_matching)
    infer_in, infer_out = out_dir / "infer_inputs.npz", out_dir / "state_pred.npy"
    n_real = infer_inputs(data, plans, set_size, seed, infer_in)
    check_json = out_dir / "cell_load_split_check.json"
    infer_cmd = [str(BENCH_PYTHON), str(INFER_RUNNER), "--run-dir", str(run_dir), "--checkpoint", str(ckpt),
                 "--inputs", str(infer_in), "--output", str(infer_out), "--check-split", str(check_json)]  # fmt: skip
    log["commands"]["infer"] = infer_cmd
    save_log()
    res = _run_logged(infer_cmd, out_dir / "state_infer.log", out_dir, timeout_s, markers={})
    log["timings_s"]["infer_process"] = res["wall_s"]
    log["timings_s"]["infer_process_cpu"] = res["cpu_s"]
    check = json.loads(check_json.read_text())
    log["split_cell_load"] = check
    for which in ("val", "test"):
        theirs = sorted([list(p) for p in check[which]])
        if theirs != split_info["pairs"][which]:
            raise StateRunError(
                f"cell-load's {which} pairs differ from ours: only ours {_diff(split_info['pairs'][which], theirs)}, "
                f"only cell-load's {_diff(theirs, split_info['pairs'][which])}"
            )
    log["split_check"] = "cell-load's val/test (context, perturbation) pairs == ours"
    pred_X = unpad(np.load(infer_out), n_real, set_size)
    pred, real = build_anndata(data, plans, pred_X, kind="state")
    pred.uns["state"] = {"checkpoint": str(ckpt), "max_steps": max_steps, "seed": seed}
    pred_path = out_dir / "PRED.h5ad"
    write_predictions(pred, real, pred_path, overwrite=True)
    log["timings_s"]["predict_total"] = time.perf_counter() - t0
    log["timings_s"]["total"] = time.perf_counter() - t_start
    log["outputs"] = {"pred": str(pred_path), "real": str(pred_path.with_name("REAL.h5ad")),
                      "groups": len(groups), "cells": int(pred_X.shape[0])}  # fmt: skip
    if not keep_inputs:
        shutil.rmtree(cl_dir / "data")
    save_log()
    logger.info("STATE predictions written to %s (%.0f s total)", pred_path, log["timings_s"]["total"])
    return pred_path


def _diff(a: list[list[str]], b: list[list[str]]) -> list[list[str]]:
    sb = {tuple(x) for x in b}
    return [x for x in a if tuple(x) not in sb][:10]


# -- CLI -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="state_adapter.py",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--data", required=True, help="processed SCALE dataset directory (preprocess / synth output)")
    ap.add_argument("--split", required=True, help="cell-load-style split TOML (or 'split-col')")
    ap.add_argument("--out", required=True, help="output directory; every intermediate stays inside it")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps (training.max_steps)")
    ap.add_argument("--seed", type=int, default=0, help="training seed, cell-load seed and control-cell plan seed")
    ap.add_argument("--hidden", type=int, default=256, help="model.kwargs.hidden_dim")
    ap.add_argument("--layers", type=int, default=4, help="LLaMA layers")
    ap.add_argument("--heads", type=int, default=8, help="attention heads (head_dim = hidden/heads)")
    ap.add_argument("--set-size", type=int, default=64, help="cells per set (model.kwargs.cell_set_len)")
    ap.add_argument("--batch-sets", type=int, default=8, help="sets per step (training.batch_size)")
    ap.add_argument("--subset", default="test", choices=["val", "test"], help="which held-out pairs to predict")
    ap.add_argument(
        "--control-matching",
        default="batch",
        choices=["batch", "random"],
        help="control cells from the same batch (where the data has batches) or any of the context",
    )
    ap.add_argument(
        "--pert-features",
        default="onehot",
        choices=["onehot", "parts"],
        help="STATE's perturbation input: its default one-hot, or (opt-in, via its "
        "perturbation_features_file) a multi-hot over the atomic parts, so A+B is built from A and B",
    )
    ap.add_argument("--val-freq", type=int, help="STATE validation/checkpoint interval (default: --steps)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed to each STATE subprocess")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    try:
        path = run_state(
            args.data, args.split, args.out, hidden=args.hidden, layers=args.layers, heads=args.heads,
            set_size=args.set_size, batch_sets=args.batch_sets, max_steps=args.steps, seed=args.seed,
            subset=args.subset, control_matching=args.control_matching, val_freq=args.val_freq,
            timeout_s=args.timeout, pert_features=args.pert_features,
        )  # fmt: skip
    except StateRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    run = json.loads((Path(args.out) / "state_run.json").read_text())
    t = run["timings_s"]
    print(f"wrote {path} and {path.with_name('REAL.h5ad')}")
    print(f"train {t['train_fit']:.0f} s fit ({run['train']['steps_per_s_fit']:.2f} steps/s), "
          f"{t['train_process']:.0f} s process ({t['train_process_cpu']:.0f} CPU-s); predict {t['predict_total']:.0f} s; "
          f"total {t['total']:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
