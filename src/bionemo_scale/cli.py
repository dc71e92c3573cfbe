"""`bionemo-scale`: one command, one subcommand per job.

Heavy imports (torch, NeMo, megatron) happen inside the handlers, so `bionemo-scale --help`
and data-only jobs stay fast. A `ScaleError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from bionemo_scale.errors import ScaleError

logger = logging.getLogger("bionemo_scale")

Handler = Callable[[argparse.Namespace], int]


# -- data ---------------------------------------------------------------------------------------
def _cmd_preprocess(args: argparse.Namespace) -> int:
    from bionemo_scale.config import PreprocessConfig, validate_config
    from bionemo_scale.data.preprocess import preprocess

    cfg = validate_config(
        PreprocessConfig,
        {
            "pert_col": args.pert_col,
            "control": args.control,
            "context_col": args.context_col,
            "batch_col": args.batch_col,
            "dose_col": args.dose_col,
            "split_col": args.split_col,
            "split": args.split,
            "hvg": args.hvg,
            "keep_obs": args.keep_obs or [],
            "combo_sep": args.combo_sep,
            "target_sum": args.target_sum,
            "chunk_rows": args.chunk_rows,
            "dataset_name": args.dataset_name,
        },
        "preprocess options",
    )
    report = preprocess(args.input, args.output, cfg, overwrite=args.overwrite, progress=not args.quiet)
    _print_dataset_report(args.output, report)
    return 0


def _print_dataset_report(path: str | Path, report: dict) -> None:
    idx, genes, norm = report["index"], report["genes"], report["normalisation"]
    print(f"dataset     {path}")
    print(f"cells       {idx['cells']:,} in {idx['groups']:,} groups ({idx['control_cells']:,} controls)")
    print(f"contexts    {idx['contexts']}   batches {idx['batches']}   perturbations {idx['perturbations']}", end="")
    print(f" ({idx['combinations']} combinations of {idx['parts']} parts)")
    print(f"genes       {genes['kept']:,} of {genes['input']:,}: {genes['selection']}")
    print(f"normalised  input looked like {norm['input']}; applied {norm['applied']}")


def _cmd_synth(args: argparse.Namespace) -> int:
    from bionemo_scale.config import SynthConfig, validate_config
    from bionemo_scale.data.synth import write_synthetic_dataset, write_synthetic_h5ad

    fields = {
        "n_cells": args.cells,
        "n_genes": args.genes,
        "n_contexts": args.contexts,
        "n_batches": args.batches,
        "n_perturbations": args.perturbations,
        "n_combinations": args.combinations,
        "seed": args.seed,
        "chunk_rows": args.chunk_rows,
        "program_gain_sd": args.program_gain_sd,
        "context_specificity": args.context_specificity,
    }
    cfg = validate_config(SynthConfig, {k: v for k, v in fields.items() if v is not None}, "synth options")
    if args.format == "h5ad":
        info = write_synthetic_h5ad(args.output, cfg, overwrite=args.overwrite, progress=not args.quiet)
        print(json.dumps(info))
    else:
        report = write_synthetic_dataset(args.output, cfg, overwrite=args.overwrite, progress=not args.quiet)
        _print_dataset_report(args.output, report)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from bionemo_scale.data.splits import split_summary
    from bionemo_scale.data.store import ProcessedDataset

    data = ProcessedDataset(args.data)
    _print_dataset_report(args.data, data.manifest)
    if args.split:
        labels = data.split_labels(args.split)
        for which, row in split_summary(data.index, labels).items():
            print(f"split {which:5s} {row['pairs']:5d} pairs  {row['groups']:5d} groups  {row['cells']:9,d} cells")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    """Draw a few set pairs and print what they hold (a smoke test of the sampler)."""
    from bionemo_scale.demo import describe_pairs

    print(describe_pairs(args.data, args.split, args.subset, args.set_size, args.n, args.seed))
    return 0


def _prior_rank_arg(value: str) -> int | str:
    if value == "auto" or (value.isdigit() and int(value) > 0):
        return value if value == "auto" else int(value)
    raise argparse.ArgumentTypeError(f"'{value}' is not a positive integer or 'auto'")


def _cmd_baseline(args: argparse.Namespace) -> int:
    from bionemo_scale.data.control_means import GroupControlMeans
    from bionemo_scale.data.store import ProcessedDataset
    from bionemo_scale.eval.baselines import make_baseline
    from bionemo_scale.predict import build_anndata, held_out_groups, plan_predictions, run_predictor, write_predictions

    if args.prior_rank is not None and args.method != "additive":
        raise ScaleError(
            f"--prior-rank applies to the additive baseline only, not to --method {args.method}",
            "drop --prior-rank, or use --method additive",
        )
    _check_prediction_output(args)
    data = ProcessedDataset(args.data)
    groups = held_out_groups(data, args.split, args.subset)
    labels = data.split_labels(args.split)
    predictor = make_baseline(args.method, data, labels, prior_rank=args.prior_rank, center=args.center_controls)
    plans = plan_predictions(data, groups, args.seed)
    control_means = GroupControlMeans(data) if args.center_controls else None
    pred_X = run_predictor(
        data, plans, predictor, args.set_size, args.seed, progress=not args.quiet, lattice=args.count_lattice,
        control_means=control_means,
    )  # fmt: skip
    pred, real = build_anndata(data, plans, pred_X, kind=f"baseline:{args.method}", lattice=args.count_lattice)
    real_path = write_predictions(pred, real, Path(args.output), overwrite=args.overwrite)
    print(f"wrote {args.output} ({pred.n_obs:,} cells, {len(groups)} held-out groups) and {real_path}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from bionemo_scale.eval.evaluate import parse_baselines, run_evaluate

    out = run_evaluate(
        args.pred,
        args.real,
        args.pert_col,
        args.control,
        args.output,
        context_col=args.context_col,
        profile=args.profile,
        baselines=parse_baselines(args.baseline),
        overwrite=args.overwrite,
        report=not args.no_report,
        references=False if args.no_references else None,
        write_de=args.write_de,
        fdr=args.fdr,
        progress=not args.quiet,
        threads=args.threads,
    )
    print(f"wrote {args.output}: results.csv, agg_results.csv" + (", report.md" if not args.no_report else ""))
    del out
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from bionemo_scale.demo import run_demo

    run_demo(Path(args.output), quick=args.quick)
    return 0


# -- training and inference --------------------------------------------------------------------
def _job_config(args: argparse.Namespace, default_recipe: str | None = None):
    """Recipe or YAML config, then --data/--split, then dotted overrides (validated)."""
    from bionemo_scale.config import ScaleConfig, apply_overrides, load_yaml, validate_config
    from bionemo_scale.recipes import get_recipe

    if getattr(args, "config", None):
        cfg = validate_config(ScaleConfig, load_yaml(args.config), f"config {args.config}")
    else:
        cfg = get_recipe(args.recipe or default_recipe)
    fixed = [f"data.path={args.data}", f"data.split={args.split}"]
    return apply_overrides(cfg, [*fixed, *args.overrides])


def _int_at_least(minimum: int, why: str) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum` (`why` is its docstring, for the reader)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, not {value}")
        return value

    parse.__doc__ = why
    return parse


_positive_int = _int_at_least(1, "a set of 0 cells or 0 integration steps means nothing")
_seed = _int_at_least(0, "numpy's generators take seeds >= 0 only")


def _check_prediction_output(args: argparse.Namespace) -> None:
    """Before any work: PRED.h5ad must be a free file path (REAL.h5ad goes beside it)."""
    from bionemo_scale.atomic import check_output_free

    if Path(args.output).is_dir():
        raise ScaleError(
            f"--output {args.output} is a folder", "give the PRED.h5ad file path (REAL.h5ad goes beside it)"
        )
    check_output_free(Path(args.output), args.overwrite)
    check_output_free(Path(args.output).with_name("REAL.h5ad"), True)  # e.g. a symlink: refused before the work


def _check_split(args: argparse.Namespace) -> None:
    if args.split != "split-col" and not Path(args.split).exists():
        raise ScaleError(f"split file {args.split} does not exist", "pass an existing TOML split, or 'split-col'")


def _check_dataset_path(path: str) -> None:
    """Open the dataset before the training stack is imported, so a typo fails in one line."""
    from bionemo_scale.data.store import ProcessedDataset

    ProcessedDataset(path)


@contextlib.contextmanager
def _no_half_run(output: Path) -> Iterator[None]:
    """A new run directory that a bad-input (or out-of-memory) error stops during set-up is removed.

    Once training has logged a step the directory is kept (its logs explain the failure, and its
    checkpoints are how a stopped job continues), and under torchrun nothing is removed.
    """
    fresh = not output.exists()
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1  # never delete under other ranks' feet
    try:
        yield
    except (ScaleError, MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not _out_of_memory(exc):
            raise
        started = (output / "train_loss.csv").exists() or (output / "checkpoints").is_dir()
        if fresh and single and output.is_dir() and not started:  # failed in set-up: nothing to keep
            shutil.rmtree(output, ignore_errors=True)
        raise


def _check_split_unchanged(cfg, run_dir: Path) -> None:
    """A resumed run's split must still hold out the same pairs (checked again inside train)."""
    from bionemo_scale.train.resume import SPLIT_RECORD, check_split_unchanged, split_record

    if not (run_dir / SPLIT_RECORD).is_file():
        return
    from bionemo_scale.data.store import ProcessedDataset

    data = ProcessedDataset(cfg.data.path)
    check_split_unchanged(run_dir, split_record(data.index, data.split_labels(cfg.data.split), str(cfg.data.split)))


def _cmd_train(args: argparse.Namespace) -> int:
    from bionemo_scale.train.resume import check_resume

    _check_split(args)
    _check_dataset_path(args.data)
    cfg = _job_config(args)
    check_resume(cfg, Path(args.output), before_vocabulary=True)
    _check_split_unchanged(cfg, Path(args.output))
    from bionemo_scale.train.engine import train

    _quiet_training_stack()
    with _no_half_run(Path(args.output)):
        run = train(cfg, args.output, progress=not args.quiet)
    print(f"run written to {run} (checkpoints in {Path(run) / 'checkpoints'})")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from bionemo_scale.train.finetune import read_gene_map

    _check_split(args)
    _check_dataset_path(args.data)
    cfg = _job_config(args, default_recipe="finetune")
    cfg = cfg.model_copy(update={"init_from": args.source})
    # no early check_resume here: the architecture and source are resolved from the release inside
    # train(), which checks the resume there; the early check would compare unresolved values
    gene_map = read_gene_map(args.gene_map) if args.gene_map else None
    from bionemo_scale.train.engine import train

    _quiet_training_stack()
    with _no_half_run(Path(args.output)):
        run = train(cfg, args.output, gene_map=gene_map, progress=not args.quiet)
    print(f"fine-tuned run written to {run}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from bionemo_scale.data.control_means import GroupControlMeans
    from bionemo_scale.data.prior import GroupPriors
    from bionemo_scale.data.store import ProcessedDataset
    from bionemo_scale.matmul_precision import float32_matmul_precision
    from bionemo_scale.predict import (
        VocabularyMap,
        build_anndata,
        held_out_groups,
        model_predictor,
        plan_predictions,
        run_predictor,
        write_predictions,
    )
    from bionemo_scale.registry import resolve
    from bionemo_scale.train.release import load_model, load_prior

    _check_split(args)
    _check_prediction_output(args)
    data = ProcessedDataset(args.data)
    groups = held_out_groups(data, args.split, args.subset)
    source = resolve(args.checkpoint)
    model, cfg, vocab = load_model(source, args.which)
    if args.gene_map:  # the same renaming the model was fine-tuned with
        from bionemo_scale.train.finetune import read_gene_map

        data.align_genes(list(vocab["genes"]), read_gene_map(args.gene_map))  # type: ignore[arg-type]
    prior = load_prior(source, cfg)
    priors = GroupPriors(prior, data, cover=cfg.model.prior_cover) if prior is not None else None
    steps = args.steps or cfg.flow.inference_steps
    predictor = model_predictor(model, VocabularyMap(vocab, data), steps=steps, autocast=args.autocast)
    set_size = cfg.data.sampler.set_size
    matching = cfg.data.sampler.control_matching
    control_means = GroupControlMeans(data, matching) if cfg.model.center_controls else None
    plans = plan_predictions(data, groups, args.seed, matching)
    compose = (args.combinations or cfg.flow.combinations) == "compose"
    lattice = cfg.flow.count_lattice if args.count_lattice is None else args.count_lattice
    with float32_matmul_precision(args.matmul_precision):
        pred_X = run_predictor(
            data, plans, predictor, set_size, args.seed, progress=not args.quiet, priors=priors, compose=compose,
            lattice=lattice, control_means=control_means,
        )  # fmt: skip
    pred, real = build_anndata(data, plans, pred_X, kind=f"scale:{args.checkpoint}", lattice=lattice)
    # provenance: the digits of the network's products
    pred.uns["bionemo_scale"]["matmul_precision"] = args.matmul_precision
    pred.uns["bionemo_scale"]["autocast"] = args.autocast
    real_path = write_predictions(pred, real, Path(args.output), overwrite=args.overwrite)
    print(f"wrote {args.output} ({pred.n_obs:,} cells, {len(groups)} held-out groups) and {real_path}")
    return 0


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from bionemo_scale.ensemble import average_predictions

    _check_prediction_output(args)
    real_path = average_predictions(
        [Path(p) for p in args.members],
        Path(args.output),
        overwrite=args.overwrite,
        lattice=args.count_lattice,
        seed=args.seed,
    )
    print(f"wrote {args.output} (the mean of {len(args.members)} predictions) and {real_path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from bionemo_scale.atomic import RELEASE, check_output_free

    if not Path(args.run).is_dir():
        raise ScaleError(f"run directory {args.run} does not exist", "pass the --output of `bionemo-scale train`")
    check_output_free(Path(args.out), args.overwrite, RELEASE)  # before the checkpoint is loaded
    from bionemo_scale.train.release import export_release

    quiet_libraries()

    out = export_release(args.run, args.out, which=args.which, overwrite=args.overwrite)
    print(f"release written to {out}")
    return 0


def _cmd_recipe(args: argparse.Namespace) -> int:
    from bionemo_scale.config import dump_yaml
    from bionemo_scale.recipes import get_recipe, registered

    if args.action == "list":
        for name, fn in sorted(registered().items()):
            doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
            print(f"{name:22s} {doc}")
        return 0
    if not args.name:
        raise ScaleError(f"'recipe {args.action}' needs a recipe name", "run `bionemo-scale recipe list`")
    cfg = get_recipe(args.name)
    if args.action == "show":
        from bionemo_scale.recipes import registered as _reg

        fn = _reg().get(args.name)
        print((fn.__doc__ or "").strip() if fn else "")
        print()
    print(dump_yaml(cfg), end="")
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    from bionemo_scale.launch import LaunchSpec, launch

    spec = LaunchSpec(
        recipe=args.recipe,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        data=args.data,
        split=args.split,
        output=args.output,
        overrides=list(args.overrides),
        partition=args.partition,
        account=args.account,
        time=args.time,
        image=args.image,
        mounts=args.mount or [],
    )
    return launch(spec, args.executor, args.dry_run)


# -- parser -------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Usage errors in the same one-line form as every other bad input (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}. Fix: see `{self.prog} --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bionemo-scale",
        description="SCALE: set-aware conditional flow for single-cell perturbation response (BioNeMo plugin).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("preprocess", help="h5ad -> SCDL memmap sorted by group + perturbation index")
    p.add_argument("input", help="input .h5ad (raw counts or log1p-normalised, CSR or dense X)")
    p.add_argument("output", help="output dataset directory")
    p.add_argument("--pert-col", required=True, help="obs column with the perturbation label")
    p.add_argument("--control", required=True, help="label of control cells in --pert-col")
    p.add_argument("--context-col", required=True, help="obs column with the cellular context (cell line, donor)")
    p.add_argument("--batch-col", help="obs column with the batch/plate (controls are matched within it)")
    p.add_argument("--dose-col", help="obs column with numeric dose ('a+b' for combinations)")
    p.add_argument("--split-col", help="obs column with per-cell train/val/test labels")
    p.add_argument("--split", help="TOML split; HVGs are then selected on training cells only")
    p.add_argument("--hvg", type=int, help="keep the N most highly variable genes (seurat flavour)")
    p.add_argument("--keep-obs", nargs="*", help="extra obs columns to keep in obs.parquet")
    p.add_argument("--combo-sep", default="+", help="separator of combination labels (default '+')")
    p.add_argument("--target-sum", type=float, default=1e4, help="normalize_total target for raw counts")
    p.add_argument(
        "--chunk-rows", type=int, default=5_000, help="rows per streamed chunk (bounds memory; default 5,000)"
    )
    p.add_argument("--dataset-name", help="dataset name for cell-load style 'dataset.context' split keys")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(handler=_cmd_preprocess)

    p = sub.add_parser("synth", help="write a synthetic perturbation screen with known structure")
    p.add_argument("output", help="output dataset directory (or .h5ad file with --format h5ad)")
    p.add_argument("--format", choices=["scdl", "h5ad"], default="scdl")
    p.add_argument("--cells", type=int, help="approximate number of cells (default 20,000)")
    p.add_argument("--genes", type=int)
    p.add_argument("--contexts", type=int)
    p.add_argument("--batches", type=int, help="batches per context")
    p.add_argument("--perturbations", type=int)
    p.add_argument("--combinations", type=int)
    p.add_argument("--seed", type=_seed)
    p.add_argument("--chunk-rows", type=int)
    p.add_argument("--program-gain-sd", type=float, help="sd of per-(context, program) log gains (default 0.5)")
    p.add_argument("--context-specificity", type=float, help="size of idiosyncratic context deviations (0.5)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=_cmd_synth)

    p = sub.add_parser("info", help="summarise a processed dataset (and a split of it)")
    p.add_argument("data")
    p.add_argument("--split", help="TOML split file, or 'split-col'")
    p.set_defaults(handler=_cmd_info)

    p = sub.add_parser("sample", help="draw a few set pairs and print them")
    p.add_argument("data")
    p.add_argument("--split", help="TOML split file, or 'split-col' (default: all perturbed groups)")
    p.add_argument("--subset", default="train", choices=["train", "val", "test"])
    p.add_argument("--set-size", type=_positive_int, default=32)
    p.add_argument("-n", type=_positive_int, default=4)
    p.add_argument("--seed", type=_seed, default=0)
    p.set_defaults(handler=_cmd_sample)

    p = sub.add_parser("train", help="train a SCALE model (NeMo 2 MegatronStrategy; CPU or GPU)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--recipe", help="a named recipe (bionemo-scale recipe list)")
    src.add_argument("--config", help="a YAML config (bionemo-scale recipe dump NAME > file.yaml)")
    p.add_argument("--data", required=True, help="processed dataset directory")
    p.add_argument("--split", required=True, help="TOML split file, or 'split-col'")
    p.add_argument("--output", required=True, help="run directory (resumed automatically if it has checkpoints)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. trainer.max_steps=40")
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("finetune", help="fine-tune from a release (path, file:// URL or registry tag)")
    p.add_argument("--from", dest="source", required=True, help="release directory, file:// URL or registry tag")
    p.add_argument("--recipe", default=None, help="recipe for the schedule (default: finetune)")
    p.add_argument("--config", help="a YAML config instead of a recipe")
    p.add_argument("--data", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--gene-map", help="TSV: data gene <TAB> release gene, when the panels are named differently")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(handler=_cmd_finetune)

    p = sub.add_parser("predict", help="predict held-out pairs to AnnData (PRED.h5ad + REAL.h5ad)")
    p.add_argument("--checkpoint", required=True, help="run directory, release directory, or registry tag")
    p.add_argument(
        "--which",
        choices=["last", "best"],
        default="last",
        help="a run's checkpoint: the last, or the best by the run's checkpoint.monitor (checkpoints/best.json)",
    )
    p.add_argument("--data", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--subset", default="test", choices=["val", "test"])
    p.add_argument("--output", required=True, help="PRED.h5ad (REAL.h5ad is written beside it)")
    p.add_argument("--gene-map", help="TSV: data gene <TAB> model gene (as given to finetune --gene-map)")
    p.add_argument("--steps", type=_positive_int, help="integration steps (NFE); default from the config (1)")
    p.add_argument(
        "--combinations",
        choices=["direct", "compose"],
        help="predict A+B directly or as the sum of the predicted A and B shifts; default from the config",
    )
    p.add_argument(
        "--count-lattice",
        action=argparse.BooleanOptionalAction,
        help="sample values below one count to 0 or one count (default from the config: on)",
    )
    p.add_argument(
        "--matmul-precision",
        default="highest",
        choices=["highest", "high", "medium"],
        help="torch float32 matmul precision while predicting; 'medium' uses bf16 products on GPUs and "
        "AMX CPUs (faster, fewer digits)",
    )
    p.add_argument(
        "--autocast",
        default="off",
        choices=["off", "bf16"],
        help="run the network's matrix products in bf16 (torch autocast; weights, the flow's state and the "
        "output stay float32): faster on GPUs and on CPUs with AVX512-BF16 or AMX, within bf16 rounding",
    )
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=_cmd_predict)

    p = sub.add_parser("ensemble", help="average several models' predictions of the same cells, cell by cell")
    p.add_argument("members", nargs="+", help="PRED.h5ad files from predict (same data, split, subset and seed)")
    p.add_argument("--output", required=True, help="PRED.h5ad of the ensemble (REAL.h5ad is written beside it)")
    p.add_argument(
        "--count-lattice",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sample the mean's values below one count to 0 or one count (default: as the members, "
        "on when they were predicted on the lattice)",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of the lattice draws")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=_cmd_ensemble)

    p = sub.add_parser("export", help="export a run's checkpoint as a portable release (safetensors)")
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--which", choices=["last", "best"], default="last")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser("recipe", help="list, show or dump the named recipes")
    p.add_argument("action", choices=["list", "show", "dump"])
    p.add_argument("name", nargs="?")
    p.set_defaults(handler=_cmd_recipe)

    p = sub.add_parser("launch", help="run a recipe under torchrun (local) or as a Slurm job")
    p.add_argument("--recipe", required=True)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--data", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", default="04:00:00")
    p.add_argument("--image", help="Slurm: the container built from this repo's Dockerfile (required there)")
    p.add_argument("--mount", action="append", help="extra container mounts SRC:DST (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the command or sbatch script, run nothing")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(handler=_cmd_launch)

    p = sub.add_parser("baseline", help="cell-level predictions of a reference baseline")
    p.add_argument("--method", required=True, choices=["control", "additive", "context-mean"])
    p.add_argument("--data", required=True, help="processed dataset directory")
    p.add_argument("--split", required=True, help="TOML split file, or 'split-col'")
    p.add_argument("--subset", default="test", choices=["val", "test"])
    p.add_argument("--output", required=True, help="PRED.h5ad (REAL.h5ad is written beside it)")
    p.add_argument("--set-size", type=_positive_int, default=64)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument(
        "--prior-rank",
        type=_prior_rank_arg,
        help="additive only: project its shift onto the top-K training-delta directions (K or 'auto')",
    )
    p.add_argument(
        "--count-lattice",
        action="store_true",
        help="sample values below one count to 0 or one count, as SCALE's predict does (off: the textbook baseline)",
    )
    p.add_argument(
        "--center-controls",
        action="store_true",
        help="move each control set onto its pool's mean before adding the shift, as model.center_controls does "
        "(off: the textbook baseline, which carries the sampled cells' mean deviation)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=_cmd_baseline)

    p = sub.add_parser("evaluate", help="cell-eval metrics of PRED vs REAL, results.csv + report.md")
    p.add_argument("--pred", required=True, help="predicted cells (.h5ad), with control cells")
    p.add_argument("--real", required=True, help="real cells (.h5ad), with control cells")
    p.add_argument("--pert-col", required=True)
    p.add_argument("--control", required=True)
    p.add_argument("--context-col", help="evaluate each context against its own controls")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--profile", default="full", choices=["full", "minimal", "vcc", "de", "anndata", "fast"])
    p.add_argument("--baseline", action="append", help="NAME=PRED.h5ad, scored the same way (repeatable)")
    p.add_argument("--no-report", action="store_true", help="only results.csv and agg_results.csv")
    p.add_argument("--no-references", action="store_true", help="skip the degenerate control-mean/all-zeros rows")
    p.add_argument("--write-de", action="store_true", help="also write real_de.csv and pred_de.csv")
    p.add_argument("--fdr", type=float, default=0.05)
    p.add_argument("--threads", type=int, help="torch threads while scoring")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=_cmd_evaluate)

    p = sub.add_parser("demo", help="the end-to-end demo on the bundled Norman19/McFaline23 data")
    p.add_argument("--output", default="demo_out")
    p.add_argument("--quick", action="store_true", help="smallest settings (used by the tests)")
    p.set_defaults(handler=_cmd_demo)
    return parser


#: Libraries whose import-time notices ("Transformer Engine and Apex are not installed", API
#: deprecations) say nothing a user can act on; shown with -v.
LIBRARY_LOGGERS = (
    "megatron", "nemo", "nemo_logger", "lightning", "lightning.pytorch", "lightning.fabric", "numexpr",
    "nv_one_logger", "one_logger",
)  # fmt: skip


def configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if verbose:
        return
    # Our own warnings stay visible; the libraries' fallbacks and deprecations do not, so that a
    # bad-input error is the only line a user sees (with -q, nothing else at all).
    for module in ("megatron", "nemo", "lightning", "torch", "transformer_engine", "apex", "nv_one_logger"):
        pattern = rf"{module}(\.|$)"
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=pattern)
        if module in ("megatron", "nemo", "nv_one_logger"):  # their UserWarnings are CPU fallbacks
            warnings.filterwarnings("ignore", category=UserWarning, module=pattern)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed")
    warnings.filterwarnings("ignore", message="Please use DTensor instead")
    global _LIBRARY_LEVEL
    _LIBRARY_LEVEL = logging.ERROR if quiet else logging.WARNING
    quiet_libraries()
    if quiet:
        warnings.simplefilter("ignore")


_LIBRARY_LEVEL: int | None = None  # None: -v, leave the libraries alone


def _quiet_training_stack() -> None:
    """Load NeMo's logger, then apply the library levels: NeMo sets its own logger to INFO when it
    is first defined, which would otherwise undo -q (megatron_init's group listing and the like)."""
    import nemo.lightning  # noqa: F401 - defines nemo_logger

    quiet_libraries()


def quiet_libraries() -> None:
    """(Re)apply the library log levels: lightning resets its loggers to INFO when it is imported,
    so the handlers call this again once the training stack is loaded."""
    if _LIBRARY_LEVEL is not None:
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(_LIBRARY_LEVEL)


#: Commands whose outputs are written atomically: on SIGTERM (`kill`, a Slurm time limit) they
#: unwind like Ctrl-C, so the temporary sibling is removed. Training keeps Lightning's handling.
TERMINABLE = {"preprocess", "synth", "predict", "baseline", "ensemble", "evaluate", "export"}


def _terminate(signum: int, frame: object) -> None:
    from bionemo_scale.atomic import request_termination

    request_termination(signum)  # holds even if the SystemExit below is swallowed somewhere
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _restored_process_state() -> Iterator[None]:
    """Undo what main() changes process-wide (warning filters, library log levels, the SIGTERM
    handler), so calling it from a notebook or a test leaves the caller's process as it was."""
    global _LIBRARY_LEVEL
    levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    library_level = _LIBRARY_LEVEL
    sigterm = signal.getsignal(signal.SIGTERM)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])  # this thread's blocked signals (no change)
    try:
        with warnings.catch_warnings():  # restores the warning filters on exit
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        _LIBRARY_LEVEL = library_level
        if signal.getsignal(signal.SIGTERM) is not sigterm and sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)  # only set when main() changed it (main thread)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        from bionemo_scale.atomic import request_termination

        request_termination(None)  # a caller's own atomic writes after main() are not refused


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with _restored_process_state():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    configure_logging(args.verbose, args.quiet)
    if args.command in TERMINABLE:
        signal.signal(signal.SIGTERM, _terminate)
        # A blocked SIGTERM is inherited through fork and exec (a parent that blocks it, e.g. a
        # test runner or a job wrapper): unblocked, so `kill` reaches the handler instead of
        # waiting, pending, until the command has written its output.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
    handler: Handler = args.handler
    from bionemo_scale.atomic import request_termination, termination_requested

    request_termination(None)
    try:
        rc = handler(args)
        signum = termination_requested()
        if signum is not None:  # the handler's SystemExit was swallowed, but the command did stop short
            print(f"bionemo-scale {args.command}: terminated by signal {signum}", file=sys.stderr)
            return 128 + signum
        return rc
    except ScaleError as exc:
        print(f"bionemo-scale {args.command}: error: {exc.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bionemo-scale {args.command}: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:  # torch's CPU/GPU allocation failures are RuntimeErrors
        if not _out_of_memory(exc):
            raise
        err = ScaleError(f"out of memory ({_first_line(exc)})", OOM_FIXES.get(args.command, OOM_FIX_DEFAULT))
        print(f"bionemo-scale {args.command}: error: {err.one_line()}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a quota, a read-only or forbidden place: the machine's, not a bug
        fix = _storage_fix(exc)
        if fix is None:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        err = ScaleError(f"{exc.strerror or _first_line(exc)}{where}", fix)
        print(f"bionemo-scale {args.command}: error: {err.one_line()}", file=sys.stderr)
        return 2


STORAGE_FIXES = {
    errno.ENOSPC: "free disk space, or write to another file system",
    errno.EFBIG: "raise the file-size limit (ulimit -f), or write to another file system",
    errno.EDQUOT: "free space within your quota, or write to another file system",
    errno.EROFS: "write to a writable location",
    errno.EACCES: "check the permissions of that path, or use another location",
    errno.EPERM: "check the permissions of that path, or use another location",
}
# h5py reports a failed write as an OSError without errno, the C library's text inside its message
STORAGE_MESSAGES = {"no space left on device": errno.ENOSPC, "file too large": errno.EFBIG,
                    "disk quota exceeded": errno.EDQUOT, "read-only file system": errno.EROFS}  # fmt: skip


def _storage_fix(exc: OSError) -> str | None:
    """The fix for an OSError that comes from where files go (None for any other OSError)."""
    if exc.errno in STORAGE_FIXES:
        return STORAGE_FIXES[exc.errno]
    text = str(exc).lower()
    return next((STORAGE_FIXES[code] for needle, code in STORAGE_MESSAGES.items() if needle in text), None)


OOM_FIX_DEFAULT = "use a machine with more memory, or split the input"
OOM_FIXES = {
    "train": "lower data.sampler.set_size or data.micro_batch_size, or use a machine with more memory",
    "finetune": "lower data.sampler.set_size or data.micro_batch_size, or use a machine with more memory",
    "baseline": "lower --set-size, or use a machine with more memory",
    "sample": "lower --set-size or -n, or use a machine with more memory",
    "predict": "predict fewer held-out pairs at once (a smaller --split subset), or use a machine with more memory",
    "preprocess": "lower --chunk-rows, or use a machine with more memory",
    "synth": "lower --cells or --genes, or use a machine with more memory",
}


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation failure: numpy's MemoryError, torch's OutOfMemoryError or CPU allocator error."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return "can't allocate memory" in text or "out of memory" in text


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


if __name__ == "__main__":
    sys.exit(main())
