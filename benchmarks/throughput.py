"""Throughput and memory against STATE, measured in one run on this machine (issue 6 §3).

    .venv/bin/python benchmarks/throughput.py [--quick] [--parts data train infer scale] [--keep] \
        [--out bench_out/throughput]

Parts (each can be run alone with --parts):
- data: set-pair loader cells/s, ours (`SetPairDataset` + `ShardedSetSampler` + torch
  DataLoader, main process) against cell-load's `PerturbationDataModule` train loader (STATE's
  loader) in three variants: STATE's data defaults (X, output_space=all), the obsm['X_hvg']
  layout `state tx train` uses below, and `use_consecutive_loading`. Same approach as
  benchmarks/dataloader.py, on its cached inputs (the 1M-cell synthetic screen in full mode,
  the bundled Norman data with --quick or without that cache; `dataloader.py --quick
  --prepare-only` writes its inputs first, into our own output folder, when none exist).
  One thread per loader, warm page cache, interleaved.
- train: end-to-end training cells/s, data loading included, equal model size (hidden 256,
  4 layers, 8 heads, MLP 1024, S=64, 8 sets per step), same data, 2 torch threads each:
    ours (plain loop):  our loader + ScaleModel step in a plain torch loop (= model_step.py's step)
    ours (NeMo):        `bionemo-scale train` (NeMo Trainer + MegatronStrategy, one process)
    STATE:              `state tx train` (its CLI, Lightning, cell-load, X_hvg, num_workers=0)
  `state tx train` sets torch's float32 matmul precision to 'medium' (bf16 products on GPUs and on
  CPUs with AMX or AVX512-BF16); ours trains at 'highest' by default, so our plain loop also runs at
  `trainer.matmul_precision=medium`, STATE's own setting (--skip-medium leaves it out; --nemo-medium
  adds `bionemo-scale train` at 'medium'). Both of ours also run under `trainer.autocast=bf16`
  (float32 weights, bf16 matmuls), and so does STATE: its CLI has no such setting, so
  `_state_bf16_train.py` passes Lightning's precision="bf16-mixed" to its Trainer, the
  equal-precision peer of those rows (--skip-autocast leaves all three out).
  Rates come from step time stamps, never from process wall time: the worker's own clock
  (plain loop), rows appearing in RUN/train_loss.csv (NeMo; the tqdm bar as a fallback) and
  Lightning's progress bar (STATE, forced to redraw with TTY_COMPATIBLE/TTY_INTERACTIVE).
  The first --skip-steps steps (start-up, caches) are excluded and the rest is cut into
  --windows equal windows: medians and IQR are over windows. Peak RSS of each process too.
- infer: inference cells/s at NFE=1 and 10 vs STATE's forward (model_step.py's protocol,
  G = the genes of the train data), ours at NFE=1 with `predict --matmul-precision medium`
  (STATE predicts at 'highest', as `state tx predict` does), and ours at NFE=1 and 10 under
  `predict --autocast bf16`, against STATE's forward in float32 and under the same autocast.
- predict: end-to-end prediction of held-out pairs, each tool's own command as a user runs it:
  `bionemo-scale predict` (NFE 1 and 10; with --predict-autocast also under `--autocast
  bf16`) against `state tx predict --predict-only`, both
  reading the cells from disk and writing AnnData. Both models are first trained for
  --predict-train-steps steps on a split holding out --predict-pairs LARGE perturbations of one
  context; each command then runs on that split and on one holding out SMALL of them, and its
  rate is extra predicted cells / extra wall time, so start-up and loading costs cancel
  (`_predict_e2e.py`). This is the comparison the paper's inference claim makes (its speed-up
  comes from the data pipeline); the model-only `infer` rows stay beside it.
- scale: `write_synthetic_dataset` at 1M and 5M cells (--scale-genes genes, 256 by default
  so that writing 5M cells takes ~5 min; library size --scale-library; both generated
  concurrently), then our plain training loop for --scale-steps steps on each in a
  subprocess: median step time, peak RSS and peak anonymous RSS, and the 5M/1M ratios. The ratio that matters is anonymous memory: our loader reads an SCDL memmap,
  whose touched pages count towards RSS as file-backed page cache (reclaimable; reported
  beside it). The data are deleted afterwards unless --keep.

Default run: ~29 min on a 2-core machine, of which `predict` ~14 min and `train` ~7 min (--quick: ~5 min). Timings on a shared machine
are unreliable: every row records the 1-min load average; the 2-thread runs slow down by far
more than 2× when another process holds a core.

Outputs: throughput.md, throughput.json and throughput.png in --out (--docs-img also copies the
PNG). Goals (issue 6): data ≥10×, training ≥3×, inference ≥2× (read on both the model-only and
the end-to-end rows),
RSS(5M)/RSS(1M) ≤1.1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_util import (
    BENCH_PYTHON,
    REPO,
    STATE_BIN,
    STATE_RUNNER,
    ChildRun,
    Summary,
    add_model_size_args,
    answer,
    bench_main,
    bench_parser,
    bench_versions,
    default_out,
    fmt_num,
    fmt_ratio,
    machine_load,
    markdown_table,
    model_sizes,
    parse_answer,
    proc_memory_mb,
    progress_bar_steps,
    run_measured,
    state_model_overrides,
    thread_env,
    time_spec_batches,
    versions,
    warm_page_cache,
    windowed_rates,
    write_json,
)

logger = logging.getLogger("benchmarks.throughput")

DATALOADER = Path(__file__).resolve().parent / "dataloader.py"
DATALOADER_CACHE = REPO / "bench_out" / "dataloader" / "cache"
MAIN_BIN = Path(sys.executable).parent
GOALS = {"data": 10.0, "train": 3.0, "infer": 2.0, "scale_rss": 1.1}


# -- the data ----------------------------------------------------------------------------------
@dataclass
class Case:
    """One dataset in both layouts: our processed SCDL dir and cell-load's h5ad copies."""

    title: str
    processed: Path
    cell_load: Path  # holds X/, X_hvg/, X.toml, X_hvg.toml (benchmarks/dataloader.py's layout)
    pert_col: str
    control: str
    context_col: str
    batch_col: str  # cell-load needs one; 'gem_group' when the data has none
    matching: str  # 'batch' or 'random'
    genes: int = 0
    cells: int = 0


def _case_ok(root: Path) -> bool:
    return all(
        (root / p).exists()
        for p in ("scale/manifest.json", "cell_load/X.toml", "cell_load/X_hvg.toml", "cell_load/.bench_stamp.json")
    )


def resolve_case(quick: bool, out: Path) -> Case:
    """The 1M synthetic screen cached by dataloader.py (full), else the bundled Norman data."""
    synth = DATALOADER_CACHE / "synth_1000k_1000g"
    if not quick and _case_ok(synth):
        case = Case(
            "synthetic 1M cells",
            synth / "scale",
            synth / "cell_load",
            "perturbation",
            "control",
            "context",
            "batch",
            "batch",
        )
    else:
        if not quick:
            logger.warning("no cached 1M synthetic screen under %s: falling back to the bundled Norman data", synth)
        norman = DATALOADER_CACHE / "norman19_mcfaline23"
        if not _case_ok(norman):
            own = out / "dataloader_quick"
            norman = own / "cache" / "norman19_mcfaline23"
            if not _case_ok(norman):
                # --prepare-only writes both cell-load layouts: `state tx train` reads X_hvg, which
                # a plain --quick run (timing cell-load's default layout only) would not write.
                logger.info("preparing the Norman inputs with `dataloader.py --quick --prepare-only --out %s`", own)
                cmd = [sys.executable, str(DATALOADER), "--quick", "--prepare-only", "--out", str(own)]
                subprocess.run(cmd, check=True, cwd=REPO)
        from bionemo_scale.data.bundled import bundled

        spec = bundled("norman19_mcfaline23")
        case = Case(
            "Norman19+McFaline23",
            norman / "scale",
            norman / "cell_load",
            spec.pert_col,
            spec.control,
            spec.context_col,
            spec.batch_col or "gem_group",
            "batch" if spec.batch_col else "random",
        )
    manifest = json.loads((case.processed / "manifest.json").read_text())
    case.genes = int(manifest["genes"]["kept"])
    case.cells = int(manifest["index"]["cells"])
    return case


def all_train_split(out: Path) -> Path:
    path = out / "all_train_split.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# every (context, perturbation) pair is a training pair\n[zeroshot]\n")
    return path


# -- workers (main venv) -----------------------------------------------------------------------
def _set_pair_loader(data: Any, groups: Any, cfg: Any, batch_size: int) -> Any:
    """Our set pairs through a plain torch DataLoader in the calling process (as the training engine reads them)."""
    from torch.utils.data import DataLoader

    from bionemo_scale.data.sampler import SetPairDataset, ShardedSetSampler

    ds = SetPairDataset(data, groups, cfg)
    return DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=0,
        sampler=ShardedSetSampler(len(ds), micro_batch_size=batch_size),
    )


def worker_data(spec: dict[str, Any]) -> dict[str, Any]:
    """Our loader alone: the batches a training loop would get, counted and dropped."""
    import numpy as np
    import torch

    from bionemo_scale.config import SamplerConfig
    from bionemo_scale.data.store import ProcessedDataset

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    data = ProcessedDataset(spec["processed"])
    groups = np.flatnonzero(~data.index.is_control)
    cfg = SamplerConfig(set_size=spec["set_size"], control_matching=spec["matching"], seed=spec["seed"])
    loader = _set_pair_loader(data, groups, cfg, spec["batch_size"])
    setup_s = time.perf_counter() - t0
    repeats, _, _ = time_spec_batches(
        spec,
        lambda: iter(loader),
        lambda b: int(b["ctrl"].shape[0] * b["ctrl"].shape[1] + b["pert"].shape[0] * b["pert"].shape[1]),
        spec["warmup_batches"],
    )
    return {
        "loader": spec["label"],
        "setup_s": setup_s,
        "repeats": [asdict(r) for r in repeats],
        "memory_mb": proc_memory_mb(),
    }


def worker_train(spec: dict[str, Any]) -> dict[str, Any]:
    """Our loader + the model_step.py training step in a plain loop; per-step clock and memory."""
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    torch.set_float32_matmul_precision(spec.get("matmul_precision", "highest"))  # as trainer.matmul_precision
    # the modules of ours_train_step, loaded before the set-up clock starts
    import bionemo_scale.model.batch
    import bionemo_scale.model.objective  # noqa: F401
    from bionemo_scale.config import SamplerConfig
    from bionemo_scale.data.prior import AdditivePrior, GroupPriors
    from bionemo_scale.data.store import ProcessedDataset
    from bionemo_scale.parallel import init_distributed
    from model_step import build_ours, ours_train_step

    t0 = time.perf_counter()
    init_distributed(1, 1, seed=spec["seed"])
    mem0 = proc_memory_mb()
    data = ProcessedDataset(spec["processed"])
    idx = data.index
    labels = data.split_labels(spec["split"])
    groups = np.flatnonzero((labels == "train") & ~idx.is_control)
    t_open = time.perf_counter()
    priors = GroupPriors(AdditivePrior.from_data(data, labels), data)
    t_prior = time.perf_counter()
    mem_prior = proc_memory_mb()
    sampler_cfg = SamplerConfig(set_size=spec["set_size"], control_matching=spec["matching"], seed=spec["seed"])
    loader = _set_pair_loader(data, groups, sampler_cfg, spec["batch_sets"])
    model, cfg = build_ours({**spec, "genes": data.n_genes}, len(idx.parts), len(idx.contexts), len(idx.batches))
    train_step = ours_train_step(model, cfg, spec["seed"], autocast=spec.get("autocast", "off"))
    t_ready = time.perf_counter()
    stamps, cpu, mem = [(t_ready - t0, 0)], [time.process_time()], []
    for step, batch in enumerate(loader, start=1):
        batch["prior"] = priors.batch(batch["group_id"])
        loss = train_step(batch)
        stamps.append((time.perf_counter() - t0, step))
        cpu.append(time.process_time())
        m = proc_memory_mb()
        mem.append((step, round(m.get("RssAnon", 0.0), 1), round(m.get("RssFile", 0.0), 1)))
        if step >= spec["steps"]:
            break
    return {
        "stamps": stamps,
        "cpu_s": cpu,
        "mem_steps": mem,
        "memory_end_mb": proc_memory_mb(),
        "memory_start_mb": mem0,
        "memory_after_prior_mb": mem_prior,
        "setup_s": {"open": t_open - t0, "prior": t_prior - t_open, "model": t_ready - t_prior},
        "params": sum(p.numel() for p in model.parameters()),
        "genes": data.n_genes,
        "cells": data.n_cells,
        "last_loss": float(loss),
    }


WORKERS = {"data": worker_data, "train": worker_train}


# -- part 1: data pipeline ---------------------------------------------------------------------
CELL_LOAD_VARIANTS = {
    "cell-load (STATE defaults: X, output_space=all)": ("X", None, "all", False),
    "cell-load X_hvg (as `state tx train` below)": ("X_hvg", "X_hvg", "gene", False),
    "cell-load consecutive": ("X", None, "all", True),
}


def part_data(case: Case, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    timing = {
        "set_size": args.set_size,
        "batch_size": args.batch_sets,
        "seed": args.seed,
        "threads": 1,
        "warmup_batches": args.data_warmup,
        "repeats": args.data_repeats,
        "batches_per_repeat": 200,
        "max_seconds_per_repeat": args.data_seconds,
    }
    loaders: list[tuple[str, list[str], list[Path]]] = []
    spec = {**timing, "label": "ours", "processed": str(case.processed), "matching": case.matching}
    loaders.append(
        (
            "ours",
            _spec_cmd(out, "data_ours", spec, [sys.executable, str(Path(__file__).resolve()), "--worker", "data"]),
            [case.processed / "scdl"],
        )
    )
    variants = list(CELL_LOAD_VARIANTS)[: 1 if args.quick else None]
    for label in variants:
        layout, embed_key, space, consecutive = CELL_LOAD_VARIANTS[label]
        spec = {
            **timing,
            "label": label,
            "toml": str(case.cell_load / f"{layout}.toml"),
            "pert_col": case.pert_col,
            "cell_type_key": case.context_col,
            "batch_col": case.batch_col,
            "control_pert": case.control,
            "embed_key": embed_key,
            "output_space": space,
            "basal_mapping_strategy": case.matching,
            "use_consecutive_loading": consecutive,
        }
        cmd = _spec_cmd(
            out,
            f"data_{layout}{'_consec' if consecutive else ''}",
            spec,
            [str(BENCH_PYTHON), str(STATE_RUNNER), "cell-load"],
        )
        loaders.append((label, cmd, [case.cell_load / layout]))
    results: dict[str, dict[str, Any]] = {name: {"rates": [], "cpu_rates": [], "runs": []} for name, _, _ in loaders}
    for rnd in range(args.data_rounds):
        for name, cmd, inputs in loaders:
            warm_page_cache(inputs)
            logger.info("[data] %s (round %d)", name, rnd + 1)
            child = run_measured(
                cmd,
                env=thread_env(1, args.omp_wait_policy),
                cwd=REPO,
                log_path=out / "logs" / f"data_{_safe(name)}_r{rnd}.log",
            )
            if child.returncode != 0:
                results[name]["error"] = f"exit {child.returncode}: {child.tail(3)}"
                logger.error("%s failed:\n%s", name, child.tail(20))
                continue
            res = parse_answer("\n".join(s for _, s in child.lines))
            results[name]["rates"] += [r["cells"] / r["seconds"] for r in res["repeats"]]
            results[name]["cpu_rates"] += [r["cells"] / r["cpu_seconds"] for r in res["repeats"] if r["cpu_seconds"]]
            results[name]["runs"].append({**res, **_child_meta(child)})
            logger.info("  %s: median %s cells/s", name, fmt_num(Summary.of(results[name]["rates"]).median))
    for r in results.values():
        r["cells_per_s"] = Summary.of(r["rates"]).to_json()
        r["cells_per_cpu_s"] = Summary.of(r["cpu_rates"]).to_json()
    ours = results["ours"]["cells_per_s"]["median"]
    for r in results.values():
        r["ours_over_this"] = ours / r["cells_per_s"]["median"] if r["rates"] else float("nan")
    return {"case": case.title, "loaders": results}


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label)[:60]


def _spec_cmd(out: Path, tag: str, spec: dict[str, Any], base: list[str]) -> list[str]:
    path = out / "specs" / f"{tag}.json"
    write_json(path, spec)
    return [*map(str, base), "--spec", str(path)]


def _child_meta(child: ChildRun) -> dict[str, Any]:
    return {
        "wall_s": child.wall_s,
        "peak_rss_mb": child.peak_rss_mb,
        "peak_anon_mb": child.peak_anon_mb,
        "peak_file_mb": child.peak_file_mb,
        "load_before": child.load_before,
        "load_after": child.load_after,
    }


# -- part 2: end-to-end training ---------------------------------------------------------------
def _train_result(
    name: str,
    child: ChildRun,
    stamps: list[tuple[float, int]],
    args: argparse.Namespace,
    skip: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    cells = 2 * args.set_size * args.batch_sets
    w = windowed_rates(stamps, skip, args.windows, cells)
    first = min((t for t, s in stamps if s >= 1), default=float("nan"))
    res = {
        "name": name,
        "cells_per_s": Summary.of(w["rates"]).to_json(),
        "step_s": Summary.of(w["step_s"]).to_json(),
        "window_rates": w["rates"],
        "steps_timed": w["steps_timed"],
        "steps_seen": max((s for _, s in stamps), default=0),
        "time_to_first_step_s": first,
        "returncode": child.returncode,
        **_child_meta(child),
        **extra,
    }
    res["steps_per_s"] = res["cells_per_s"]["median"] / cells
    if child.returncode != 0:
        res["error"] = child.tail(12)
    logger.info(
        "[train] %s: %s cells/s (%.2f steps/s) over %d steps; first step after %.0f s; peak RSS %.0f MB, anon %.0f MB",
        name,
        fmt_num(res["cells_per_s"]["median"]),
        res["steps_per_s"],
        w["steps_timed"],
        first,
        child.peak_rss_mb,
        child.peak_anon_mb,
    )
    return res


def train_ours_plain(
    case: Case,
    split: Path,
    args: argparse.Namespace,
    out: Path,
    steps: int,
    tag: str = "train",
    threads: int | None = None,
    precision: str = "highest",
    autocast: str = "off",
) -> dict[str, Any]:
    spec = {
        "matmul_precision": precision,
        "autocast": autocast,
        "processed": str(case.processed),
        "split": str(split),
        "matching": case.matching,
        "steps": steps,
        "threads": threads or args.threads,
        "seed": args.seed,
        **model_sizes(args),
    }
    name = f"{tag}_ours_plain" + _run_suffix(precision, autocast)
    cmd = _spec_cmd(out, name, spec, [sys.executable, str(Path(__file__).resolve()), "--worker", "train"])
    logger.info(
        "[%s] ours, plain torch loop, matmul %s, autocast %s: %d steps on %s",
        tag,
        precision,
        autocast,
        steps,
        case.title,
    )
    child = run_measured(
        cmd,
        env=thread_env(spec["threads"], args.omp_wait_policy),
        cwd=REPO,
        log_path=out / "logs" / f"{name}.log",
        timeout_s=args.timeout,
    )
    res = parse_answer("\n".join(s for _, s in child.lines)) if child.returncode == 0 else {}
    stamps = [(float(t), int(s)) for t, s in res.get("stamps", [])]
    extra = {
        k: res[k]
        for k in (
            "setup_s",
            "params",
            "memory_end_mb",
            "memory_after_prior_mb",
            "mem_steps",
            "memory_start_mb",
            "genes",
            "cells",
            "last_loss",
        )
        if k in res
    }
    extra["clock"] = "worker's perf_counter after every optimizer step"
    return _train_result(
        f"ours (plain torch loop{_precision_note(precision, autocast)})", child, stamps, args, args.skip_steps, extra
    )


def _precision_note(precision: str, autocast: str = "off") -> str:
    """How a run's name says that it ran at a float32 matmul precision or an autocast other than our default."""
    note = "" if precision == "highest" else f", matmul {precision} as `state tx train`"
    return note + ("" if autocast == "off" else f", `trainer.autocast={autocast}`")


def _run_suffix(precision: str, autocast: str) -> str:
    """File-name suffix of a run at a non-default precision or autocast."""
    return ("" if precision == "highest" else f"_{precision}") + ("" if autocast == "off" else f"_autocast_{autocast}")


class CsvStepClock:
    """Time stamps of the rows NeMo's LossHistory appends to RUN/train_loss.csv (one per step)."""

    def __init__(self, path: Path, poll_s: float = 0.05) -> None:
        self.path, self.poll_s = path, poll_s
        self.t0 = time.perf_counter()
        self.stamps: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        seen = 0
        while not self._stop.is_set():
            try:
                rows = self.path.read_text().count("\n") - 1  # header
            except OSError:
                rows = 0
            if rows > seen:
                now = time.perf_counter() - self.t0
                self.stamps += [(now, s) for s in range(seen + 1, rows + 1)]
                seen = rows
            self._stop.wait(self.poll_s)

    def __enter__(self) -> CsvStepClock:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def train_ours_nemo(
    case: Case,
    split: Path,
    args: argparse.Namespace,
    out: Path,
    steps: int,
    precision: str = "highest",
    tag: str = "train",
    keep: bool = False,
    autocast: str = "off",
) -> dict[str, Any]:
    """`bionemo-scale train` timed from its step stamps; the run folder is deleted unless `keep`."""
    from bionemo_scale.config import (
        CheckpointConfig,
        DataConfig,
        EvalConfig,
        SamplerConfig,
        ScaleConfig,
        ScaleModelConfig,
        TrainerConfig,
        dump_yaml,
    )

    cfg = ScaleConfig(
        name="throughput",
        data=DataConfig(
            sampler=SamplerConfig(set_size=args.set_size, control_matching=case.matching, seed=args.seed),
            micro_batch_size=args.batch_sets,
        ),
        model=ScaleModelConfig(
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_attention_heads=args.heads,
            ffn_hidden_size=4 * args.hidden,
        ),
        trainer=TrainerConfig(
            max_steps=steps,
            val_check_interval=steps,
            log_every_n_steps=10,
            accelerator="cpu",
            matmul_precision=precision,
            autocast=autocast,
        ),
        checkpoint=CheckpointConfig(every_n_train_steps=steps, monitor="val_loss"),
        eval=EvalConfig(enabled=False),
    )
    suffix = _run_suffix(precision, autocast) + ("" if tag == "train" else f"_{tag}")
    cfg_path = out / "specs" / f"nemo_config{suffix}.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(dump_yaml(cfg))
    run_dir = out / "runs" / f"ours_nemo{suffix}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run, never a resume
    cmd = [
        str(MAIN_BIN / "bionemo-scale"),
        "train",
        "--config",
        str(cfg_path),
        "--data",
        str(case.processed),
        "--split",
        str(split),
        "--output",
        str(run_dir),
    ]
    logger.info(
        "[train] ours, `bionemo-scale train` (NeMo + MegatronStrategy), matmul %s, autocast %s: %d steps",
        precision,
        autocast,
        steps,
    )
    with CsvStepClock(run_dir / "train_loss.csv") as clock:
        child = run_measured(
            cmd,
            env=thread_env(args.threads, args.omp_wait_policy),
            cwd=REPO,
            log_path=out / "logs" / f"{tag}_ours_nemo{suffix}.log",
            timeout_s=args.timeout,
        )
    # both clocks start within milliseconds of each other; prefer the csv rows, fall back to the bar
    bar = progress_bar_steps(child.lines)
    stamps, source = (clock.stamps, "rows appended to RUN/train_loss.csv (polled every 50 ms)")
    if len(stamps) < 3:
        stamps, source = bar, "tqdm progress bar"
    extra = {"clock": source, "config": str(cfg_path), "run_dir": str(run_dir), "bar_stamps_n": len(bar)}
    if len(bar) > 3 and len(clock.stamps) > 3:
        extra["bar_cells_per_s"] = Summary.of(
            windowed_rates(bar, args.skip_steps, args.windows, 2 * args.set_size * args.batch_sets)["rates"]
        ).median
    name = f"ours (`bionemo-scale train`, NeMo{_precision_note(precision, autocast)})"
    res = _train_result(name, child, stamps, args, min(args.skip_steps, steps // 2), extra)
    if not (args.keep or keep):
        shutil.rmtree(run_dir, ignore_errors=True)
    return res


def train_state(
    case: Case,
    args: argparse.Namespace,
    out: Path,
    steps: int,
    toml: Path | None = None,
    tag: str = "train",
    keep: bool = False,
    workers: int = 0,
    bf16: bool = False,
) -> dict[str, Any]:
    """`state tx train` on `toml` (default: every pair in training); its run is deleted unless `keep`.

    `workers` is cell-load's `num_workers`, saved with the run (so `state tx predict` uses it too).
    `bf16`: under Lightning's precision="bf16-mixed", which the CLI has no setting for
    (`_state_bf16_train.py` passes it to STATE's Trainer): the peer of our `trainer.autocast=bf16`.
    """
    run_root = out / "runs" / ("state" if tag == "train" else f"state_{tag}")
    if bf16:
        run_root = run_root.with_name(run_root.name + "_bf16")
    overrides = [
        f"data.kwargs.toml_config_path={toml or case.cell_load / 'X_hvg.toml'}",
        "data.kwargs.embed_key=X_hvg",
        "data.kwargs.output_space=gene",
        f"data.kwargs.pert_col={case.pert_col}",
        f"data.kwargs.cell_type_key={case.context_col}",
        f"data.kwargs.batch_col={case.batch_col}",
        f"data.kwargs.control_pert={case.control}",
        f"data.kwargs.basal_mapping_strategy={case.matching}",
        f"data.kwargs.num_workers={workers}",  # 0 as ours: the loader runs in the training process
        *state_model_overrides(**model_sizes(args)),
        f"training.max_steps={steps}",
        f"training.val_freq={steps}",
        f"training.ckpt_every_n_steps={steps}",
        f"training.train_seed={args.seed}",
        "use_wandb=false",
        f"output_dir={run_root}",
        "name=run",
        "overwrite=true",
    ]
    env = thread_env(args.threads, args.omp_wait_policy)
    env.update(
        {
            "WANDB_MODE": "disabled",
            "HYDRA_FULL_ERROR": "1",
            "TTY_COMPATIBLE": "1",
            "TTY_INTERACTIVE": "1",
            "COLUMNS": "200",
        }
    )
    logger.info("[train] STATE, `state tx train`%s: %d steps", " (bf16-mixed)" if bf16 else "", steps)
    launcher = [str(BENCH_PYTHON), str(Path(__file__).resolve().with_name("_state_bf16_train.py"))]
    child = run_measured(
        [*(launcher if bf16 else [str(STATE_BIN)]), "tx", "train", *overrides],
        env=env,
        cwd=out,
        log_path=out / "logs" / f"{tag}_state{'_bf16' if bf16 else ''}.log",
        timeout_s=args.timeout,
    )
    stamps = progress_bar_steps(child.lines)
    fit0, fit1 = child.first("About to call trainer.fit()"), child.first("trainer.fit() completed")
    extra = {
        "clock": "Lightning's rich progress bar redraws (one per optimizer step)",
        "command": ["state", "tx", "train", *overrides],
        "fit_s": (fit1 - fit0) if fit0 is not None and fit1 is not None else None,
        "startup_s": fit0,
    }
    skip = max(1, args.skip_steps // 2)  # STATE's steps are slow: fewer of them, fewer skipped
    skip = min(skip, steps // 2)
    if bf16:
        # Lightning's announcement that the Trainer took the precision the launcher passed it
        extra["bf16_mixed_confirmed"] = any("bfloat16 Automatic Mixed Precision" in line for _, line in child.lines)
    name = "STATE (`state tx train`" + (", Lightning bf16-mixed patched in)" if bf16 else ")")
    res = _train_result(name, child, stamps, args, skip, extra)
    res["skip_steps"] = skip
    res["run_dir"] = str(run_root / "run")
    if not (args.keep or keep):
        shutil.rmtree(run_root, ignore_errors=True)
    return res


def part_train(case: Case, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    split = all_train_split(out)
    warm_page_cache([case.processed / "scdl", case.cell_load / "X_hvg"])
    res = {"case": case.title, "genes": case.genes, "cells": case.cells, "runs": []}
    res["runs"].append(train_ours_plain(case, split, args, out, args.train_steps))
    res["runs"].append(train_state(case, args, out, args.state_steps))
    if not args.skip_nemo:
        res["runs"].append(train_ours_nemo(case, split, args, out, args.nemo_steps))
    # at STATE's own setting: `state tx train` sets torch's float32 matmul precision to 'medium'
    if not args.skip_medium:
        res["runs"].append(train_ours_plain(case, split, args, out, args.train_steps, precision="medium"))
        if not args.skip_nemo and args.nemo_medium:  # off by default: keeps the default run under 30 min
            res["runs"].append(train_ours_nemo(case, split, args, out, args.nemo_steps, precision="medium"))
    # bf16 autocast: float32 weights, bf16 matmuls (STATE's CLI has no such setting for its model)
    if not args.skip_autocast:
        res["runs"].append(train_ours_plain(case, split, args, out, args.train_steps, autocast="bf16"))
        if not args.skip_nemo:
            res["runs"].append(train_ours_nemo(case, split, args, out, args.nemo_steps, autocast="bf16"))
        res["runs"].append(train_state(case, args, out, args.state_steps, bf16=True))
    state = next(r for r in res["runs"] if r["name"].startswith("STATE"))
    state_bf16 = next((r for r in res["runs"] if r["name"].startswith("STATE") and "bf16" in r["name"]), None)
    for r in res["runs"]:
        if state_bf16 is not None and "autocast=bf16" in r["name"]:
            r["ratio_vs_state_bf16"] = r["cells_per_s"]["median"] / state_bf16["cells_per_s"]["median"]
        r["ratio_vs_state"] = r["cells_per_s"]["median"] / state["cells_per_s"]["median"]
        r["rss_ratio_vs_state"] = r["peak_rss_mb"] / state["peak_rss_mb"]
        r["anon_ratio_vs_state"] = r["peak_anon_mb"] / state["peak_anon_mb"]
    return res


# -- part 3: inference -------------------------------------------------------------------------
def part_infer(genes: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from model_step import compare, op_label, prepare_inputs, summarise

    sizes = model_sizes(args)
    inputs = prepare_inputs(genes, REPO / "bench_out" / "model_step" / "cache", sizes, 8, args.seed)
    ops = [("infer", 1), ("infer_medium", 1), ("infer_autocast", 1), ("infer", 10), ("infer_autocast", 10)]
    raw = compare(
        genes,
        args.threads,
        inputs,
        sizes,
        ops=ops,
        repeats=args.infer_repeats,
        iters=args.infer_iters,
        warmup=2,
        out=out / "infer",
        seed=args.seed,
        omp_wait_policy=args.omp_wait_policy,
    )
    rows = summarise(raw, sizes)
    return {
        "genes": genes,
        "rows": rows,
        "labels": [op_label(*o) for o in ops],
        "params": {k: v.get("params") for k, v in raw["ready"].items()},
    }


# -- part 3b: end-to-end prediction ------------------------------------------------------------
def part_predict(case: Case, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """`bionemo-scale predict` vs `state tx predict` on the same held-out cells (see _predict_e2e.py)."""
    import _predict_e2e as e2e

    pout = out / "predict"
    splits = e2e.held_out_splits(case.processed, case.cell_load / "X_hvg", pout / "splits", tuple(args.predict_pairs))
    small, large = splits
    logger.info("[predict] held-out cells: %s %d, %s %d", small.label, small.cells, large.label, large.cells)
    warm_page_cache([case.processed / "scdl", case.cell_load / "X_hvg"])
    steps = args.predict_train_steps
    ours_run = train_ours_nemo(case, large.path, args, out, steps, tag="predict", keep=True)
    state_run = train_state(
        case, args, out, steps, toml=large.path, tag="predict", keep=True, workers=args.predict_state_workers
    )
    failed = [r["name"] for r in (ours_run, state_run) if r["returncode"] != 0]
    if failed:
        raise RuntimeError(f"training for the prediction part failed: {failed} (logs in {out / 'logs'})")
    state_dir = Path(state_run["run_dir"])
    ckpt = next((c for c in ("final.ckpt", "last.ckpt") if (state_dir / "checkpoints" / c).exists()), None)
    if ckpt is None:
        raise RuntimeError(f"`state tx train` wrote no final.ckpt or last.ckpt under {state_dir / 'checkpoints'}")
    # None of the runs writes into another's files; each command's outputs are overwritten by its next round.
    commands: dict[str, tuple[e2e.Command, e2e.Command]] = {}
    for autocast in ("off", "bf16") if args.predict_autocast else ("off",):
        for nfe in args.predict_nfe:
            label = f"ours, `bionemo-scale predict` NFE={nfe}" + (" --autocast bf16" if autocast == "bf16" else "")
            commands[label] = tuple(  # type: ignore[assignment]
                e2e.Command(
                    "ours",
                    label,
                    sp.label,
                    sp.cells,
                    e2e.ours_command(MAIN_BIN, Path(ours_run["run_dir"]), case.processed, sp, pout, nfe, autocast),
                )
                for sp in splits
            )
    label = "STATE, `state tx predict`" + (
        f" ({args.predict_state_workers} loader worker{'s' * (args.predict_state_workers > 1)})"
        if args.predict_state_workers
        else ""
    )
    commands[label] = tuple(  # type: ignore[assignment]
        e2e.Command("STATE", label, sp.label, sp.cells, e2e.state_command(STATE_BIN, state_dir, ckpt, sp))
        for sp in splits
    )
    bf16_label = label + " under bf16 autocast"
    if args.predict_autocast:  # the equal-precision peer of ours under `--autocast bf16`
        launcher = [str(BENCH_PYTHON), str(Path(__file__).resolve().with_name("_state_bf16_predict.py"))]
        commands[bf16_label] = tuple(  # type: ignore[assignment]
            e2e.Command(
                "STATE", bf16_label, sp.label, sp.cells, e2e.state_command(STATE_BIN, state_dir, ckpt, sp, launcher)
            )
            for sp in splits
        )

    def check_state_cells(c: e2e.Command, run: dict[str, Any]) -> dict[str, Any]:
        """STATE must have predicted every held-out cell; its rate counts every row it predicted."""
        if c.tool != "STATE":
            return {}
        got = e2e.take_state_output(state_dir, ckpt, case.pert_col, case.control)
        if run["returncode"] != 0:
            return {}
        if got is None or got[1] != c.cells:
            raise RuntimeError(
                f"`state tx predict` on {c.split} predicted {got} (all, perturbed) cells, expected {c.cells} perturbed"
            )
        return {"predicted_cells": got[0], "predicted_perturbed_cells": got[1]}

    # interleaved: each round runs every command at the small size, then at the large one
    order = [pair[0] for pair in commands.values()] + [pair[1] for pair in commands.values()]
    e2e.run_rounds(
        order, args.predict_rounds, args.threads, args.omp_wait_policy, out / "logs" / "predict", args.timeout,
        after_run=check_state_cells,
    )  # fmt: skip
    res = {"splits": [vars(sp) | {"path": str(sp.path)} for sp in splits], "tools": e2e.summarise(commands)}
    res["state_checkpoint"] = ckpt
    state = res["tools"][label]["cells_per_s"]
    state_bf16 = res["tools"].get(bf16_label, {}).get("cells_per_s", float("nan"))
    for name, r in res["tools"].items():
        r["ratio_vs_state"] = r["cells_per_s"] / state if state == state and state > 0 else float("nan")
        if name.endswith("--autocast bf16") and state_bf16 == state_bf16 and state_bf16 > 0:
            r["ratio_vs_state_bf16"] = r["cells_per_s"] / state_bf16
    if not args.keep:
        shutil.rmtree(Path(ours_run["run_dir"]), ignore_errors=True)
        shutil.rmtree(state_dir.parent, ignore_errors=True)
    return res


# -- part 4: scale behaviour -------------------------------------------------------------------
def _scale_dir(out: Path, cells: int, genes: int, library: float) -> Path:
    return out / "scale_data" / f"synth_{cells // 1000}k_{genes}g_lib{int(library)}"


def _synth_cfg(cells: int, genes: int, library: float) -> dict[str, Any]:
    return {"n_cells": cells, "n_genes": genes, "library_size": library, "seed": 0}


def _generate(paths: dict[int, Path], genes: int, library: float, out: Path) -> dict[int, float]:
    """Write the synthetic screens that are missing, concurrently (one process each); seconds each."""
    procs: dict[int, tuple[subprocess.Popen, float, Any]] = {}
    secs: dict[int, float] = {}
    for cells, path in paths.items():
        manifest = path / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text()).get("config", {}).get("n_cells") == cells:
            logger.info("[scale] reusing %s", path)
            secs[cells] = 0.0
            continue
        if path.exists():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg = json.dumps(_synth_cfg(cells, genes, library))
        code = (
            "import json, sys; from bionemo_scale.config import SynthConfig; "
            "from bionemo_scale.data.synth import write_synthetic_dataset; "
            f"write_synthetic_dataset(sys.argv[1], SynthConfig(**json.loads({cfg!r})), progress=False)"
        )
        (out / "logs").mkdir(parents=True, exist_ok=True)
        log = (out / "logs" / f"synth_{cells}.log").open("w")
        logger.info("[scale] generating %s (%s cells × %d genes)", path, f"{cells:,}", genes)
        procs[cells] = (
            subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=log, stderr=log, cwd=REPO),
            time.perf_counter(),
            log,
        )
    for cells, (proc, t0, log) in procs.items():
        code = proc.wait()
        log.close()
        if code != 0:
            raise RuntimeError(f"synthetic generation of {cells} cells failed; see {out / 'logs'}")
        secs[cells] = time.perf_counter() - t0
    return secs


def part_scale(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cells_list = args.scale_cells
    genes, library = args.scale_genes, args.scale_library
    paths = {c: _scale_dir(out, c, genes, library) for c in cells_list}
    # upper bound: every value stored, 8 bytes each (measured at library size 1000: 0.55 of 256 genes
    # and 0.38 of 512 genes are non-zero)
    need = sum(c * genes * 8 for c, p in paths.items() if not (p / "manifest.json").exists())
    free = shutil.disk_usage(out).free
    logger.info("[scale] disk: %.1f GB free, at most %.1f GB needed", free / 1e9, need / 1e9)
    if need > 0.8 * free - 5e9:
        raise RuntimeError(f"not enough disk for the scale test: need ~{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
    t0 = time.perf_counter()
    gen_s = _generate(paths, genes, library, out)
    gen_wall = time.perf_counter() - t0
    split = all_train_split(out)
    runs = []
    try:
        for cells, path in paths.items():
            manifest = json.loads((path / "manifest.json").read_text())
            case = Case(
                f"synthetic {cells:,}",
                path,
                path,
                "perturbation",
                "control",
                "context",
                "batch",
                "batch",
                genes=genes,
                cells=int(manifest["index"]["cells"]),
            )
            warm_page_cache([path / "scdl"])
            r = train_ours_plain(case, split, args, out, args.scale_steps, tag=f"scale_{cells // 1000}k")
            steps_mem = r.get("mem_steps", [])
            r.update(
                {
                    "cells": case.cells,
                    "genes": genes,
                    "disk_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
                    "generation_s": gen_s.get(cells, 0.0),
                    "peak_anon_steps_mb": max((a for _, a, _ in steps_mem), default=float("nan")),
                    "peak_file_steps_mb": max((f for _, _, f in steps_mem), default=float("nan")),
                }
            )
            runs.append(r)
    finally:
        if not args.keep:
            for path in paths.values():
                shutil.rmtree(path, ignore_errors=True)
            logger.info("[scale] deleted the synthetic data (--keep keeps it)")
    small, big = runs[0], runs[-1]
    ratios = {
        "step_time": big["step_s"]["median"] / small["step_s"]["median"],
        "peak_anon_rss": big["peak_anon_mb"] / small["peak_anon_mb"],
        "peak_anon_rss_training_steps": big["peak_anon_steps_mb"] / small["peak_anon_steps_mb"],
        "peak_rss_total": big["peak_rss_mb"] / small["peak_rss_mb"],
        "setup_prior_s": big["setup_s"]["prior"] / max(small["setup_s"]["prior"], 1e-9),
    }
    label = f"{_cells_label(big['cells'])} ÷ {_cells_label(small['cells'])}"
    return {
        "runs": runs,
        "ratios": ratios,
        "label": label,
        "generation_wall_s": gen_wall,
        "genes": genes,
        "library_size": library,
    }


def _cells_label(n: int) -> str:
    return f"{n / 1e6:.2g}M" if n >= 1_000_000 else f"{n / 1e3:.3g}k"


# -- report ------------------------------------------------------------------------------------
def _load_range(items: list[dict[str, Any]]) -> str:
    loads = [x[k]["loadavg_1m"] for x in items for k in ("load_before", "load_after") if k in x]
    return f"{min(loads):.1f}–{max(loads):.1f}" if loads else "–"


def _mark(value: float, goal: float, higher: bool = True) -> str:
    if value != value:
        return "–"
    return "yes" if (value >= goal if higher else value <= goal) else "**no**"


def _train_summary_row(label: str, ours: dict[str, Any], peer: dict[str, Any], ratio: float) -> list[str]:
    """A summary line for one of our training runs against one STATE run, read against the goal."""
    return [
        label,
        fmt_num(ours["cells_per_s"]["median"]),
        fmt_num(peer["cells_per_s"]["median"]),
        fmt_ratio(ratio),
        f"≥{GOALS['train']:g}×",
        _mark(ratio, GOALS["train"]),
    ]


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    out: list[str] = []
    summary_rows: list[list[str]] = []
    if "data" in results:
        d = results["data"]
        out.append(f"### Data pipeline ({d['case']}): set-pair loader cells/s, main process, 1 thread\n")
        rows = []
        for name, r in d["loaders"].items():
            if not r["rates"]:
                rows.append([name, "failed", r.get("error", "")[:80], "", "", "", "", ""])
                continue
            s, c = r["cells_per_s"], r["cells_per_cpu_s"]
            runs = r["runs"]
            rows.append(
                [
                    name,
                    fmt_num(s["median"]),
                    f"{fmt_num(s['q25'])}–{fmt_num(s['q75'])}",
                    "1" if name == "ours" else fmt_ratio(r["ours_over_this"]),
                    fmt_num(c["median"]),
                    str(s["n"]),
                    f"{max(x['peak_rss_mb'] for x in runs):,.0f} / {max(x['peak_anon_mb'] for x in runs):,.0f}",
                    _load_range(runs),
                ]
            )
        out.append(
            markdown_table(
                [
                    "loader",
                    "cells/s (median)",
                    "IQR",
                    "ours ÷ loader",
                    "cells per CPU-s",
                    "repeats",
                    "peak RSS / anon MB",
                    "load 1m",
                ],
                rows,
            )
        )
        out.append(
            "\ncells/s counts control + perturbed rows delivered (2·S per set); S=64, 8 sets per batch, "
            "warm page cache, num_workers=0.\n"
        )
        for name, r in d["loaders"].items():
            if name != "ours" and r["rates"]:
                headline = name.startswith("cell-load X_hvg") or (args.quick and name.startswith("cell-load"))
                summary_rows.append(
                    [
                        f"data pipeline vs {name}",
                        fmt_num(d["loaders"]["ours"]["cells_per_s"]["median"]),
                        fmt_num(r["cells_per_s"]["median"]),
                        fmt_ratio(r["ours_over_this"]),
                        f"≥{GOALS['data']:g}×" + (" (headline)" if headline else ""),
                        _mark(r["ours_over_this"], GOALS["data"]),
                    ]
                )
    if "train" in results:
        t = results["train"]
        out.append(
            f"### End-to-end training ({t['case']}, G={t['genes']}): data loading included, "
            f"{args.threads} torch threads\n"
        )
        rows = []
        for r in t["runs"]:
            s = r["cells_per_s"]
            rows.append(
                [
                    r["name"],
                    fmt_num(s["median"]),
                    f"{fmt_num(s['q25'])}–{fmt_num(s['q75'])}",
                    f"{r['steps_per_s']:.2f}",
                    fmt_ratio(r["ratio_vs_state"])
                    + (f" ({fmt_ratio(r['ratio_vs_state_bf16'])} ÷ STATE bf16)" if "ratio_vs_state_bf16" in r else ""),
                    str(r["steps_timed"]),
                    f"{r['time_to_first_step_s']:.0f}",
                    f"{r['peak_rss_mb']:,.0f}",
                    f"{r['peak_anon_mb']:,.0f}",
                    _load_range([r]),
                    r.get("clock", ""),
                ]
            )
        out.append(
            markdown_table(
                [
                    "run",
                    "cells/s (median)",
                    "IQR (windows)",
                    "steps/s",
                    "÷ STATE",
                    "steps timed",
                    "s to 1st step",
                    "peak RSS MB",
                    "peak anon MB",
                    "load 1m",
                    "step clock",
                ],
                rows,
            )
        )
        out.append(
            f"\ncells/s = 2·S·B = {2 * args.set_size * args.batch_sets} cells per optimizer step × steps/s, "
            f"measured between step time stamps after the first {args.skip_steps} steps (STATE: "
            f"{max(1, args.skip_steps // 2)}), in {args.windows} equal windows; start-up, imports, data setup "
            "and the final checkpoint are excluded ('s to 1st step' shows them).\n"
        )
        state = next(r for r in t["runs"] if r["name"].startswith("STATE"))
        state_bf16 = next((r for r in t["runs"] if r["name"].startswith("STATE") and "bf16" in r["name"]), None)
        for r in t["runs"]:
            if r["name"].startswith("STATE"):
                continue
            summary_rows.append(_train_summary_row(f"training e2e: {r['name']}", r, state, r["ratio_vs_state"]))
            if state_bf16 is not None and "ratio_vs_state_bf16" in r:
                label = f"training e2e: {r['name']} vs {state_bf16['name']}"
                summary_rows.append(_train_summary_row(label, r, state_bf16, r["ratio_vs_state_bf16"]))
        for r in t["runs"]:
            if r is state:
                continue
            summary_rows.append(
                [
                    f"peak RSS (total / anon), {r['name']}",
                    f"{r['peak_rss_mb']:,.0f} / {r['peak_anon_mb']:,.0f} MB",
                    f"{state['peak_rss_mb']:,.0f} / {state['peak_anon_mb']:,.0f} MB",
                    f"{r['rss_ratio_vs_state']:.2f}× / {r['anon_ratio_vs_state']:.2f}×",
                    "(report)",
                    "",
                ]
            )
    if "infer" in results:
        inf = results["infer"]
        out.append(f"### Inference (model only, G={inf['genes']}, {args.threads} threads, same pre-drawn sets)\n")
        rows = []
        for r in inf["rows"]:
            s = r["cells_per_s"]
            rows.append(
                [
                    r["measurement"],
                    r["model"],
                    fmt_num(s["median"]),
                    f"{fmt_num(s['q25'])}–{fmt_num(s['q75'])}",
                    fmt_ratio(r.get("ratio_cells_per_s")) if r["model"] == "ours" else "",
                    fmt_num(r["cells_per_cpu_s"]["median"]),
                    fmt_ratio(r.get("ratio_cells_per_cpu_s")) if r["model"] == "ours" else "",
                    f"{r['loadavg_1m'][0]:.1f}–{r['loadavg_1m'][1]:.1f}",
                ]
            )
            if r["model"] == "ours":
                state_rows = {x["measurement"]: x for x in inf["rows"] if x["model"] == "STATE"}
                summary_rows.append(
                    [
                        f"{r['measurement']} (vs STATE forward)",
                        fmt_num(s["median"]),
                        fmt_num(state_rows["inference NFE=1"]["cells_per_s"]["median"]),
                        fmt_ratio(r.get("ratio_cells_per_s")),
                        f"≥{GOALS['infer']:g}×",
                        _mark(r.get("ratio_cells_per_s", float("nan")), GOALS["infer"]),
                    ]
                )
                equal = r.get("ratio_cells_per_s_vs_state_autocast")
                if equal is not None:  # the equal-precision comparison
                    summary_rows.append(
                        [
                            f"{r['measurement']} (vs STATE forward under bf16 autocast)",
                            fmt_num(s["median"]),
                            fmt_num(state_rows["inference NFE=1, bf16 autocast"]["cells_per_s"]["median"]),
                            fmt_ratio(equal),
                            f"≥{GOALS['infer']:g}×",
                            _mark(equal, GOALS["infer"]),
                        ]
                    )
        out.append(
            markdown_table(
                [
                    "measurement",
                    "model",
                    "cells/s (median)",
                    "IQR",
                    "ours ÷ STATE NFE=1",
                    "cells per CPU-s",
                    "÷ (CPU)",
                    "load 1m",
                ],
                rows,
            )
        )
        out.append(
            f"\nS·B = {args.set_size * args.batch_sets} predicted cells per call; {args.infer_repeats} "
            f"interleaved repeats × {args.infer_iters} calls (model_step.py's protocol). STATE has one forward "
            "evaluation (NFE=1).\n"
        )
    if "predict" in results:
        out.append(predict_section(results["predict"], args, summary_rows))
    if "scale" in results:
        sc = results["scale"]
        out.append(f"### Scale behaviour: ours (plain loop), {args.scale_steps} steps, G={sc['genes']}\n")
        rows = []
        for r in sc["runs"]:
            rows.append(
                [
                    f"{r['cells']:,}",
                    f"{r['disk_bytes'] / 1e9:.1f}",
                    f"{r['generation_s']:.0f}",
                    f"{r['setup_s']['prior']:.1f}",
                    f"{1000 * r['step_s']['median']:.0f}",
                    f"{1000 * r['step_s']['q25']:.0f}–{1000 * r['step_s']['q75']:.0f}",
                    f"{r['peak_anon_mb']:,.0f}",
                    f"{r['peak_anon_steps_mb']:,.0f}",
                    f"{r['peak_file_steps_mb']:,.0f}",
                    f"{r['peak_rss_mb']:,.0f}",
                    _load_range([r]),
                ]
            )
        ra = sc["ratios"]
        rows.append(
            [
                sc["label"],
                "",
                "",
                f"{ra['setup_prior_s']:.2f}×",
                f"{ra['step_time']:.2f}×",
                "",
                f"{ra['peak_anon_rss']:.2f}×",
                f"{ra['peak_anon_rss_training_steps']:.2f}×",
                "",
                f"{ra['peak_rss_total']:.2f}×",
                "",
            ]
        )
        out.append(
            markdown_table(
                [
                    "cells",
                    "disk GB",
                    "synth s",
                    "prior setup s",
                    "step ms (median)",
                    "IQR",
                    "peak anon MB",
                    "anon in steps MB",
                    "file-backed in steps MB",
                    "peak RSS MB",
                    "load 1m",
                ],
                rows,
            )
        )
        out.append(
            "\npeak anon = sampled maximum of RssAnon (the process's own allocations) over the whole run, start-up "
            "included; anon in steps = its maximum measured after each training step (start-up transients such as "
            "building the additive prior excluded). peak RSS = ru_maxrss, which also counts resident pages of the "
            "memory-mapped SCDL files (page cache the kernel can reclaim; the additive prior reads every cell once, "
            "so this part follows the dataset size). The goal (≤1.1×) is read on anonymous memory.\n"
        )
        summary_rows.append(
            [
                f"step time {sc['label']}",
                f"{1000 * sc['runs'][-1]['step_s']['median']:.0f} ms",
                f"{1000 * sc['runs'][0]['step_s']['median']:.0f} ms",
                f"{ra['step_time']:.2f}×",
                f"≤{GOALS['scale_rss']:g}×",
                _mark(ra["step_time"], GOALS["scale_rss"], higher=False),
            ]
        )
        summary_rows.append(
            [
                f"peak anon RSS {sc['label']}",
                f"{sc['runs'][-1]['peak_anon_mb']:,.0f} MB",
                f"{sc['runs'][0]['peak_anon_mb']:,.0f} MB",
                f"{ra['peak_anon_rss']:.2f}×",
                f"≤{GOALS['scale_rss']:g}×",
                _mark(ra["peak_anon_rss"], GOALS["scale_rss"], higher=False),
            ]
        )
        summary_rows.append(
            [
                f"peak total RSS {sc['label']} (incl. page cache)",
                f"{sc['runs'][-1]['peak_rss_mb']:,.0f} MB",
                f"{sc['runs'][0]['peak_rss_mb']:,.0f} MB",
                f"{ra['peak_rss_total']:.2f}×",
                "(report)",
                "",
            ]
        )
    head = [
        "### Summary against the goals\n",
        markdown_table(
            ["measure", "ours (scale: larger data)", "STATE (scale: smaller data)", "ratio", "goal", "met"],
            summary_rows,
        ),
        "",
    ]
    meta = results["meta"]
    tail = (
        f"\nMachine: {platform.machine()}, {os.cpu_count()} CPUs, shared with other engineers' jobs; load average "
        f"(1/5/15 min) at start {meta['load_start']['loadavg_1m']:.1f}/{meta['load_start']['loadavg_5m']:.1f}/"
        f"{meta['load_start']['loadavg_15m']:.1f}, at end {meta['load_end']['loadavg_1m']:.1f}/"
        f"{meta['load_end']['loadavg_5m']:.1f}/{meta['load_end']['loadavg_15m']:.1f}. Total run time "
        f"{meta['total_s'] / 60:.1f} min ({' '.join(f'{k} {v:.0f} s' for k, v in meta['part_s'].items())}). "
        f"OMP_WAIT_POLICY: {(args.omp_wait_policy or 'unset (libgomp default)').upper()}.\n\n"
        "versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "\n"
    )
    return "\n".join(head + out) + tail


def predict_section(pr: dict[str, Any], args: argparse.Namespace, summary_rows: list[list[str]]) -> str:
    """The end-to-end prediction table; adds its rows against the inference goal to `summary_rows`."""
    small, large = pr["splits"]
    rows = []
    state_name = next(n for n in pr["tools"] if n.startswith("STATE"))
    state = pr["tools"][state_name]
    for name, r in pr["tools"].items():
        rows.append(
            [
                name,
                f"{r['predicted_cells'][0]:,.0f} / {r['predicted_cells'][1]:,.0f}",
                f"{r['wall_s'][0]:.1f} / {r['wall_s'][1]:.1f}",
                fmt_num(r["cells_per_s"]),
                ", ".join(fmt_num(x) for x in r["rates"]),
                "1" if name == state_name else fmt_ratio(r["ratio_vs_state"]),
                f"{r['peak_rss_mb']:,.0f} / {r['peak_anon_mb']:,.0f}",
                f"{r['load_1m'][0]:.1f}–{r['load_1m'][1]:.1f}",
            ]
        )
        if not name.startswith("STATE"):
            summary_rows.append(
                [
                    f"prediction end to end: {name} vs `state tx predict`",
                    fmt_num(r["cells_per_s"]),
                    fmt_num(state["cells_per_s"]),
                    fmt_ratio(r["ratio_vs_state"]),
                    f"≥{GOALS['infer']:g}×",
                    _mark(r["ratio_vs_state"], GOALS["infer"]),
                ]
            )
        if "ratio_vs_state_bf16" in r:  # the equal-precision comparison
            peer = next(n for n in pr["tools"] if n.startswith("STATE") and n.endswith("bf16 autocast"))
            summary_rows.append(
                [
                    f"prediction end to end: {name} vs `state tx predict` under bf16 autocast",
                    fmt_num(r["cells_per_s"]),
                    fmt_num(pr["tools"][peer]["cells_per_s"]),
                    fmt_ratio(r["ratio_vs_state_bf16"]),
                    f"≥{GOALS['infer']:g}×",
                    _mark(r["ratio_vs_state_bf16"], GOALS["infer"]),
                ]
            )
    table = markdown_table(
        [
            "command",
            f"cells predicted, {small['label']} / {large['label']}",
            "wall s (median)",
            "cells/s (median)",
            "per round",
            "÷ STATE",
            "peak RSS / anon MB",
            "load 1m",
        ],
        rows,
    )
    return (
        f"### Prediction end to end: each tool's own command, {args.threads} threads\n\n"
        + table
        + f"\n\nHeld-out cells: {small['cells']:,} ({small['label']}) and {large['cells']:,} ({large['label']}) of one "
        "context, the same cells for both tools; STATE also predicts the control cells cell-load puts in its test "
        "split, and they count as its cells. cells/s = extra cells ÷ extra wall time between the two splits, "
        f"per round ({args.predict_rounds} interleaved rounds), so start-up, checkpoint loading, cell-load's set-up "
        "and our priors cancel; reading the control cells, the model (NFE as named), our count lattice and writing "
        "the AnnData files remain. Both models trained "
        f"{args.predict_train_steps} steps at the table's size (the weights do not change the cost). STATE: "
        f"`state tx predict --predict-only` from `{pr['state_checkpoint']}`"
        + (
            "; 'under bf16 autocast': the same command with its model's `predict_step` under torch's bf16 autocast "
            "(`_state_bf16_predict.py`; its CLI has no precision setting), the peer of ours under `--autocast bf16`"
            if any(n.startswith("STATE") and n.endswith("bf16 autocast") for n in pr["tools"])
            else ""
        )
        + ".\n"
    )


def chart(results: dict[str, Any], path: Path) -> None:
    """Left: ours ÷ STATE speed ratios with their goals; right: 5M ÷ 1M ratios with the 1.1 limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed: list[tuple[str, float, float]] = []  # (label, ratio, goal)
    if "data" in results:
        for name, r in results["data"]["loaders"].items():
            if name != "ours" and r["rates"]:
                short = "data vs\n" + name.split(" (")[0].replace("cell-load ", "cell-load\n")
                speed.append((short, r["ours_over_this"], GOALS["data"]))
    if "train" in results:
        for r in results["train"]["runs"]:
            if not r["name"].startswith("STATE"):
                speed.append(
                    (
                        "train e2e\n"
                        + ("NeMo" if "NeMo" in r["name"] else "plain loop")
                        + ("\n(medium)" if "matmul medium" in r["name"] else "")
                        + ("\n(bf16)" if "trainer.autocast=bf16" in r["name"] else ""),
                        r["ratio_vs_state"],
                        GOALS["train"],
                    )
                )
                if "ratio_vs_state_bf16" in r:  # the equal-precision comparison
                    loop = "NeMo" if "NeMo" in r["name"] else "plain loop"
                    speed.append((f"{loop} (bf16)\n÷ STATE\n(bf16)", r["ratio_vs_state_bf16"], GOALS["train"]))
    if "infer" in results:
        for r in results["infer"]["rows"]:
            if r["model"] == "ours":
                speed.append(
                    (
                        r["measurement"]
                        .replace("inference ", "model only\n")
                        .replace(", matmul medium", "\n(medium)")
                        .replace(", bf16 autocast", "\n(bf16)"),
                        r.get("ratio_cells_per_s", float("nan")),
                        GOALS["infer"],
                    )
                )
    if "predict" in results:
        for name, r in results["predict"]["tools"].items():
            if not name.startswith("STATE"):
                short = name.split("` ")[-1].replace(" --autocast bf16", "\n(bf16)")
                speed.append(("predict e2e\n" + short, r["ratio_vs_state"], GOALS["infer"]))
                if "ratio_vs_state_bf16" in r:  # the equal-precision comparison
                    speed.append(
                        ("predict e2e\n" + short + "\n÷ STATE (bf16)", r["ratio_vs_state_bf16"], GOALS["infer"])
                    )
    scale = results.get("scale", {}).get("ratios", {})
    width = max(10.0, 0.95 * len(speed))  # inches: about one per bar, so that the labels stay apart
    fig, axes = plt.subplots(1, 2, figsize=(width + 3.8, 4.8), gridspec_kw={"width_ratios": [width, 3.6]})
    ax = axes[0]
    xs = range(len(speed))
    colors = ["tab:green" if r >= g else "tab:red" for _, r, g in speed]
    bars = ax.bar(xs, [r for _, r, _ in speed], color=colors)
    for i, (_, r, g) in enumerate(speed):
        ax.hlines(g, i - 0.4, i + 0.4, colors="black", linestyles="--", lw=1)
        ax.annotate(f"{r:.2f}×", (bars[i].get_x() + bars[i].get_width() / 2, r), ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([s for s, _, _ in speed], fontsize=7)
    ax.set_ylabel("ours ÷ STATE (cells/s), log scale")
    ax.set_title("throughput ratios vs STATE (dashed: goal; green: met)", fontsize=10)
    ax = axes[1]
    if scale:
        items = [
            ("step time", scale["step_time"]),
            ("peak anon\nRSS", scale["peak_anon_rss"]),
            ("peak total RSS\n(+page cache)", scale["peak_rss_total"]),
        ]
        cols = ["tab:green" if v <= GOALS["scale_rss"] else "tab:red" for _, v in items[:2]] + ["tab:grey"]
        b = ax.bar(range(len(items)), [v for _, v in items], color=cols)
        for i, (_, v) in enumerate(items):
            ax.annotate(f"{v:.2f}×", (b[i].get_x() + b[i].get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        ax.axhline(GOALS["scale_rss"], color="black", ls="--", lw=1)
        ax.set_xticks(range(len(items)))
        ax.set_xticklabels([s for s, _ in items], fontsize=7)
        ax.set_ylabel(results["scale"]["label"].replace(" ÷ ", " cells ÷ ") + " cells")
        ax.set_title("scale behaviour (goal ≤1.1×)", fontsize=10)
    else:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


# -- driver ------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for exe in (BENCH_PYTHON, STATE_BIN):
        if not exe.exists():
            raise SystemExit(f"{exe} is missing: create the comparison venv (.venv-bench, see STACK.md)")
    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    part_s: dict[str, float] = {}
    meta: dict[str, Any] = {"args": vars(args), "load_start": machine_load()}
    if meta["load_start"]["loadavg_1m"] > 0.5:
        logger.warning(
            "the machine is busy (1-min load %.1f on %d CPUs): timings will be noisy%s",
            meta["load_start"]["loadavg_1m"],
            os.cpu_count(),
            "" if args.omp_wait_policy else "; consider --omp-wait-policy passive",
        )
    case = resolve_case(args.quick, out) if {"data", "train", "infer", "predict"} & set(args.parts) else None
    if case:
        meta["case"] = {k: str(v) for k, v in case.__dict__.items()}
    for part in args.parts:
        t0 = time.perf_counter()
        if part == "data":
            results["data"] = part_data(case, args, out)
        elif part == "train":
            results["train"] = part_train(case, args, out)
        elif part == "infer":
            results["infer"] = part_infer(args.infer_genes or case.genes, args, out)
        elif part == "predict":
            results["predict"] = part_predict(case, args, out)
        elif part == "scale":
            results["scale"] = part_scale(args, out)
        part_s[part] = time.perf_counter() - t0
        write_json(out / "throughput.partial.json", results)
    meta.update(
        {
            "load_end": machine_load(),
            "part_s": part_s,
            "total_s": time.perf_counter() - t_start,
            "versions": {
                "python": platform.python_version(),
                **versions(("bionemo-scale", "torch", "megatron-core", "nemo-toolkit", "lightning", "numpy")),
                **{f"bench:{k}": v for k, v in bench_versions().items()},
            },
        }
    )
    results["meta"] = meta
    text = report(results, args)
    write_json(out / "throughput.json", results)
    (out / "throughput.partial.json").unlink(missing_ok=True)
    (out / "throughput.md").write_text(text)
    chart(results, out / "throughput.png")
    if args.docs_img:
        Path(args.docs_img).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "throughput.png", args.docs_img)
    print("\n" + text)
    logger.info("wrote %s/throughput.{json,md,png} in %.1f min", out, meta["total_s"] / 60)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = bench_parser(__doc__)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test (~3 min on an idle machine): Norman data, few steps, 20k/100k-cell scale test",
    )
    ap.add_argument("--out", help="output directory (default bench_out/throughput, or throughput_quick)")
    parts = ["data", "train", "infer", "predict", "scale"]
    ap.add_argument("--parts", nargs="+", default=parts, choices=parts)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic scale data and the training run folders")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training and inference")
    add_model_size_args(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--omp-wait-policy",
        choices=["passive", "active"],
        help="OMP_WAIT_POLICY of every timed process, ours and STATE alike (default: unset = libgomp's "
        "spinning; 'passive' keeps 2-thread timings sane when other work holds a core)",
    )
    g = ap.add_argument_group("data pipeline")
    g.add_argument("--data-rounds", type=int, default=1, help="times each loader is started, interleaved")
    g.add_argument("--data-repeats", type=int, default=4)
    g.add_argument("--data-seconds", type=float, default=4.0, help="cap on one timed repeat")
    g.add_argument("--data-warmup", type=int, default=3, help="warm-up batches")
    g = ap.add_argument_group("end-to-end training")
    g.add_argument("--train-steps", type=int, default=140, help="steps of ours (plain loop)")
    g.add_argument("--nemo-steps", type=int, default=100, help="steps of `bionemo-scale train`")
    g.add_argument("--state-steps", type=int, default=40, help="steps of `state tx train`")
    g.add_argument("--skip-steps", type=int, default=20, help="warm-up steps excluded (STATE: half as many)")
    g.add_argument("--windows", type=int, default=5, help="timing windows after the warm-up (median/IQR over them)")
    g.add_argument("--skip-nemo", action="store_true", help="leave out the `bionemo-scale train` run")
    g.add_argument(
        "--skip-medium",
        action="store_true",
        help="leave out our training runs at float32 matmul precision 'medium' (`state tx train`'s own setting)",
    )
    g.add_argument(
        "--nemo-medium",
        action="store_true",
        help="also run `bionemo-scale train` at matmul 'medium' (the plain loop at 'medium' runs by default)",
    )
    g.add_argument(
        "--skip-autocast",
        action="store_true",
        help="leave out our training runs under `trainer.autocast=bf16` (float32 weights, bf16 matmuls)",
    )
    g.add_argument("--timeout", type=float, default=900, help="seconds allowed to each training process")
    g = ap.add_argument_group("inference")
    g.add_argument("--infer-repeats", type=int, default=3)
    g.add_argument("--infer-iters", type=int, default=10)
    g.add_argument("--infer-genes", type=int, help="default: the genes of the training data")
    g = ap.add_argument_group("end-to-end prediction")
    g.add_argument(
        "--predict-pairs",
        type=int,
        nargs=2,
        default=[2, 12],
        metavar=("SMALL", "LARGE"),
        help="held-out perturbations of one context in the two splits (rate = extra cells / extra wall time)",
    )
    g.add_argument("--predict-rounds", type=int, default=2, help="interleaved rounds of every prediction command")
    g.add_argument("--predict-train-steps", type=int, default=10, help="training steps of each model before predicting")
    g.add_argument("--predict-nfe", type=int, nargs="+", default=[1, 10], help="our integration steps (NFE) to time")
    g.add_argument(
        "--predict-autocast",
        action="store_true",
        help="also time `bionemo-scale predict --autocast bf16` at each NFE (~5 min more; off by default to keep "
        "the default run under 30 min)",
    )
    g.add_argument(
        "--predict-state-workers",
        type=int,
        default=0,
        help="cell-load's num_workers for `state tx predict` (default 0: one process, as ours and the training rows)",
    )
    g = ap.add_argument_group("scale behaviour")
    g.add_argument("--scale-cells", type=int, nargs=2, default=[1_000_000, 5_000_000])
    g.add_argument(
        "--scale-genes", type=int, default=256, help="genes of the synthetic scale data (few: fast to write)"
    )
    g.add_argument("--scale-library", type=float, default=1000.0, help="synthetic library size (sets the density)")
    g.add_argument("--scale-steps", type=int, default=150)
    ap.add_argument("--docs-img", default="", help="also copy the chart here (e.g. docs/img/throughput.png)")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.data_repeats, args.data_seconds, args.data_warmup = 2, 1.0, 1
        args.train_steps, args.nemo_steps, args.state_steps = 16, 12, 10
        args.skip_steps, args.windows = 4, 3
        args.infer_repeats, args.infer_iters = 3, 2
        args.predict_pairs, args.predict_rounds, args.predict_train_steps = [1, 3], 1, 4
        args.scale_cells, args.scale_genes, args.scale_steps = [20_000, 100_000], 128, 16
        args.docs_img = ""
    default_out(args, "throughput")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    bench_main(args, run, lambda spec: answer(WORKERS[args.worker](spec)))


if __name__ == "__main__":
    main()
