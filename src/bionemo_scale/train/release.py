"""Checkpoints in, portable releases out, and releases back in for prediction and fine-tuning.

A *run* holds NeMo/megatron distributed checkpoints (any TP/PP). A *release* is what users
download and fine-tune from, with no pickle anywhere:

    RELEASE/model.safetensors   full (unsharded) weights
    RELEASE/config.yaml         the ScaleConfig it was trained with
    RELEASE/vocab.json          genes, perturbations (+parts), contexts, batches
    RELEASE/genes.txt           the gene panel, one per line
    RELEASE/normalisation.json  what preprocessing did to the counts
    RELEASE/MODEL_CARD.md       data, recipe, intended use and limits
    RELEASE/prior.safetensors   training-pair deltas of the additive prior (when the model uses one)

Full weights are loaded into a tensor-parallel model by slicing each parameter along the
offsets of megatron's own sharded state dict, so a release trained at TP=1 fine-tunes at
TP=2 (and back) without a conversion script.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bionemo_scale.atomic import RELEASE, atomic_dir
from bionemo_scale.config import ScaleConfig, dump_yaml, load_yaml, validate_config
from bionemo_scale.errors import ScaleError

logger = logging.getLogger(__name__)

RELEASE_FILES = ("model.safetensors", "config.yaml", "vocab.json")
MODEL_PREFIX = "module."


# -- run checkpoints ---------------------------------------------------------------------------
def checkpoint_step(ckpt_dir: Path) -> int:
    """The `step=N` of a checkpoint directory's name (-1 without one): N + 1 steps were trained."""
    part = next((p for p in ckpt_dir.name.split("-") if p.startswith("step=")), "step=-1")
    return int(part.split("=")[1])


def trained_steps(run_dir: str | Path) -> int | None:
    """How many steps a run's last finished checkpoint holds; None when it has none."""
    try:
        return checkpoint_step(find_checkpoint(run_dir, "last").parent) + 1
    except ScaleError:
        return None


def find_checkpoint(run_dir: str | Path, which: str = "last") -> Path:
    """The `weights` directory of a run's last (or best-by-monitor) distributed checkpoint."""
    ckpt_root = Path(run_dir) / "checkpoints"
    if not ckpt_root.is_dir():
        raise ScaleError(f"{run_dir} has no checkpoints/ directory", "train first, or point to a release")
    done = [d for d in ckpt_root.iterdir() if d.is_dir() and not d.name.endswith("-unfinished")]
    done = [d for d in done if (d / "weights" / "metadata.json").exists()]
    if not done:
        raise ScaleError(
            f"{ckpt_root} holds no finished checkpoint", "train longer than checkpoint.every_n_train_steps"
        )

    if which == "last":
        last = [d for d in done if d.name.endswith("-last")] or done
        return max(last, key=checkpoint_step) / "weights"
    best = [d for d in done if not d.name.endswith("-last")]
    recorded = _recorded_best(ckpt_root)
    if recorded is not None and recorded in {d.name for d in best}:
        return ckpt_root / recorded / "weights"
    if len(best) != 1:  # without checkpoints/best.json (older runs) only k = 1 is unambiguous
        raise ScaleError(
            f"{ckpt_root} holds {len(best)} top-k checkpoints, so 'best' is ambiguous"
            if best
            else f"{ckpt_root} holds no best-by-monitor checkpoint (only the last)",
            "export --which last, or train with checkpoint.save_top_k=1 and validation",
        )
    return best[0] / "weights"


def _recorded_best(ckpt_root: Path) -> str | None:
    """The best checkpoint's directory name from checkpoints/best.json (None when absent)."""
    path = ckpt_root / "best.json"
    if not path.is_file():
        return None
    try:
        best = json.loads(path.read_text()).get("best")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise ScaleError(
            f"{path} is unreadable ({type(err).__name__})", "export --which last, or restore the file"
        ) from err
    return best if isinstance(best, str) else None


def read_run_config(run_dir: str | Path) -> tuple[ScaleConfig, dict[str, object]]:
    run_dir = Path(run_dir)
    for name in ("config.yaml", "vocab.json"):
        if not (run_dir / name).exists():
            raise ScaleError(f"{run_dir} has no {name}", "point to a run directory made by `bionemo-scale train`")
    cfg = validate_config(ScaleConfig, load_yaml(run_dir / "config.yaml"), f"{run_dir}/config.yaml")
    try:
        vocab = json.loads((run_dir / "vocab.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScaleError(
            f"{run_dir}/vocab.json is damaged ({type(err).__name__})",
            "restore it from a copy of the run (train rewrites it only when starting a new run), or retrain",
        ) from None
    if not isinstance(vocab, dict) or "genes" not in vocab:
        raise ScaleError(f"{run_dir}/vocab.json is not a run vocabulary", "point to a run directory made by `train`")
    return cfg, vocab


def _single_process_model(cfg: ScaleConfig):
    """A TP=1, PP=1 ScaleModel in this process (initialising torch.distributed if needed)."""
    from bionemo_scale.model.scale_model import ScaleModel
    from bionemo_scale.model.transformer_config import build_transformer_config
    from bionemo_scale.parallel import init_distributed

    init_distributed(1, 1, seed=cfg.trainer.seed)
    model_cfg = cfg.model.model_copy(update={"fp8": None}) if not torch.cuda.is_available() else cfg.model
    if not torch.cuda.is_available() and model_cfg.spec == "te":
        model_cfg = model_cfg.model_copy(update={"spec": "local"})
    model = ScaleModel(build_transformer_config(model_cfg, 1, 1), model_cfg)
    return model.eval()


def damaged_checkpoint_errors(with_os_errors: bool = True) -> tuple[type[BaseException], ...]:
    """What reading a damaged distributed checkpoint raises (torch's is a BaseException).

    A truncated shard raises EOFError or UnpicklingError, a damaged metadata.json JSONDecodeError.
    `with_os_errors=False` leaves OSError out, where other files could raise it too.
    """
    import pickle

    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    errors = (CheckpointException, CheckpointingException, EOFError, pickle.UnpicklingError, json.JSONDecodeError)
    return (*errors, OSError) if with_os_errors else errors


def load_run_model(run_dir: str | Path, which: str = "last"):
    """(model, cfg, vocab) from a run's distributed checkpoint, resharded to TP=1/PP=1."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    cfg, vocab = read_run_config(run_dir)
    weights = find_checkpoint(run_dir, which)
    model = _single_process_model(cfg)
    sharded = model.sharded_state_dict(prefix=MODEL_PREFIX)
    sharded = {k: v for k, v in sharded.items() if not k.endswith("_extra_state")}
    try:
        loaded = dist_checkpointing.load(sharded, str(weights), strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    except damaged_checkpoint_errors() as exc:  # a truncated shard, missing metadata, a foreign file
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise ScaleError(
            f"cannot read checkpoint {weights} ({type(exc).__name__}: {first}); it is incomplete or damaged"
            " (a save that was interrupted?)",
            "export another checkpoint of the run (--which), or retrain",
        ) from None
    state = {k.removeprefix(MODEL_PREFIX): v for k, v in loaded.items()}
    missing, _unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise ScaleError(f"checkpoint {weights} lacks weights {missing[:3]}", "point to a SCALE run")
    logger.info("loaded %s (%d tensors)", weights, len(state))
    return model, cfg, vocab


# -- releases --------------------------------------------------------------------------------
def model_card(cfg: ScaleConfig, vocab: dict[str, object], source: str) -> str:
    m = cfg.model
    return f"""# SCALE release: {cfg.name}

Set-aware conditional flow for single-cell perturbation response (bionemo-scale).

| | |
|---|---|
| trained from | `{source}` |
| recipe | `{cfg.name}` |
| data | {vocab.get("dataset", "?")}: {len(vocab["genes"])} genes, {len(vocab["perturbations"]) - 1} perturbations, {len(vocab["contexts"])} contexts, {len(vocab["batches"])} batches |
| normalisation | {vocab.get("normalisation", {}).get("applied", "?")} (stored as log1p) |
| architecture | hidden {m.hidden_size}, {m.num_layers} layers, {m.num_attention_heads} heads, spec `{m.spec}`, set size {cfg.data.sampler.set_size} |
| training | {cfg.trainer.max_steps} steps, lr {cfg.optim.lr}, seed {cfg.trainer.seed} |

## Intended use
Predict the expression of a population of cells under a perturbation in a context, from that
context's control cells. Inputs must be log1p(normalize_total(1e4)) expression over exactly the
genes in `genes.txt`, in that order. Fine-tune (`bionemo-scale finetune --from`) for new
perturbations, contexts or batches: the vocabularies are extended, the genes must match.

## Limits
Judge predictions with biological metrics against the baselines (`bionemo-scale evaluate`),
never by loss alone. Contexts never seen in training are predicted from their control cells
only (the unknown-context token); such zero-shot predictions are weaker.
"""


def export_release(run_dir: str | Path, out: str | Path, which: str = "last", overwrite: bool = False) -> Path:
    model, cfg, vocab = load_run_model(run_dir, which)
    with atomic_dir(out, overwrite=overwrite, kind=RELEASE) as tmp:
        save_file(
            {k: v.contiguous() for k, v in full_state(model).items()},
            str(tmp / "model.safetensors"),
            metadata={"format": "bionemo-scale/1"},
        )
        (tmp / "config.yaml").write_text(dump_yaml(cfg))
        (tmp / "vocab.json").write_text(json.dumps(vocab, indent=1))
        (tmp / "genes.txt").write_text("\n".join(vocab["genes"]) + "\n")  # type: ignore[arg-type]
        (tmp / "normalisation.json").write_text(json.dumps(vocab.get("normalisation", {}), indent=1))
        (tmp / "MODEL_CARD.md").write_text(model_card(cfg, vocab, str(find_checkpoint(run_dir, which))))
        if cfg.model.additive_prior:
            shutil.copyfile(Path(run_dir) / "prior.safetensors", tmp / "prior.safetensors")
    logger.info("exported %s -> %s", run_dir, out)
    return Path(out)


def read_release_meta(path: str | Path) -> tuple[ScaleConfig, dict[str, object]]:
    """(config, vocab) of a release directory, without touching the weights."""
    path = Path(path)
    missing = [f for f in RELEASE_FILES if not (path / f).exists()]
    if missing:
        raise ScaleError(f"{path} is not a SCALE release (missing {missing})", "run `bionemo-scale export RUN OUT`")
    cfg = validate_config(ScaleConfig, load_yaml(path / "config.yaml"), f"{path}/config.yaml")
    return cfg, json.loads((path / "vocab.json").read_text())  # type: ignore[return-value]


def read_release(path: str | Path) -> tuple[ScaleConfig, dict[str, object], dict[str, torch.Tensor]]:
    """(config, vocab, full weights) of a release directory; safetensors only, no pickle."""
    path = Path(path)
    cfg, vocab = read_release_meta(path)
    try:
        weights = load_file(str(path / "model.safetensors"))
    except Exception as exc:
        raise ScaleError(f"{path}/model.safetensors is corrupt ({exc.__class__.__name__})", "re-download it") from None
    return cfg, vocab, weights  # type: ignore[return-value]


def load_release_model(path: str | Path):
    """(model, cfg, vocab) ready for prediction from a release directory."""
    cfg, vocab, weights = read_release(path)
    model = _single_process_model(cfg)
    load_full_weights(model, weights)
    return model, cfg, vocab


def load_model(source: str | Path, which: str = "last"):
    """A run directory (its `which` checkpoint: "last" or "best") or a release directory."""
    source = Path(source)
    if (source / "model.safetensors").exists():
        if which != "last":
            raise ScaleError(
                f"{source} is a release, which holds one set of weights: --which {which} applies to run directories",
                "drop --which, or predict from the run directory",
            )
        return load_release_model(source)
    return load_run_model(source, which)


def load_prior(source: str | Path, cfg: ScaleConfig):
    """The additive prior saved beside a run or release (None for models built without one)."""
    from bionemo_scale.data.prior import AdditivePrior

    return AdditivePrior.load(Path(source) / "prior.safetensors") if cfg.model.additive_prior else None


# -- full weights <-> (possibly) sharded models -------------------------------------------------
# A release names every tensor by its *canonical* name: megatron's checkpoint key (which the
# local and TE specs share) with the global layer index put back, e.g.
# "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight". Each rank's ShardedTensors
# say where their data sits in that full tensor, so one pair of functions serves every
# TP/PP layout and both layer specs.
def _pieces(model: torch.nn.Module):
    """(canonical name, ShardedTensor) for every weight shard this rank holds."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for name, item in model.sharded_state_dict(prefix="").items():
        if name.endswith("_extra_state"):
            continue
        built = item.build() if isinstance(item, ShardedTensorFactory) else item
        for piece in _flat(built):
            if isinstance(piece, ShardedTensor):
                yield _canonical_name(piece), piece


def _canonical_name(piece) -> str:
    if piece.prepend_axis_num == 0:
        return piece.key
    head, sep, tail = piece.key.partition(".layers.")
    return f"{head}.layers.{piece.global_offset[0]}.{tail}" if sep else piece.key


def _region(full: torch.Tensor, piece) -> torch.Tensor:
    region = full
    offsets = piece.global_offset[piece.prepend_axis_num :]
    for axis, (offset, size) in enumerate(zip(offsets, piece.local_shape, strict=True)):
        region = region.narrow(axis, offset, size)
    return region


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full tensors by canonical name, assembled from this rank's shards (complete at TP=PP=1)."""
    out: dict[str, torch.Tensor] = {}
    for name, piece in _pieces(model):
        shape = tuple(piece.global_shape[piece.prepend_axis_num :])
        if name not in out:
            out[name] = torch.zeros(shape, dtype=piece.data.dtype)
        _region(out[name], piece).copy_(piece.data.detach().cpu())
    return out


def load_full_weights(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into this rank's shards (the shards are views of its parameters)."""
    loaded = 0
    for name, piece in _pieces(model):
        src = full.get(name)
        if src is None:
            raise ScaleError(f"release lacks weight '{name}'", "use a release of the same architecture")
        region = _region(src, piece)
        if tuple(region.shape) != tuple(piece.data.shape):
            raise ScaleError(f"release weight '{name}' has the wrong shape", "use a release of the same architecture")
        with torch.no_grad():
            piece.data.copy_(region.to(piece.data.dtype))
        loaded += 1
    if loaded == 0:
        raise ScaleError("no weight of the model matched the release", "use a release of the same architecture")


def _flat(tree: object):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _flat(v)
    elif isinstance(tree, list | tuple):
        for v in tree:
            yield from _flat(v)
    else:
        yield tree
