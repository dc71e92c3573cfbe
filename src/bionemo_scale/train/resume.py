"""Resuming a run directory: only the run that wrote the checkpoints may continue from them.

Kept free of NeMo/megatron imports so the command line can refuse a bad resume at once.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bionemo_scale.config import ScaleConfig, flatten_config, load_yaml
from bionemo_scale.errors import ScaleError

#: The run's record of which (context, batch, perturbation) groups its split held out.
SPLIT_RECORD = "split.json"

# Settings a resumed run may change: how long it runs and how it is logged, validated and
# checkpointed. Anything else (model, losses, optimiser, sampling, seeds, and the device layout,
# which sets the global batch and the data order) would make the restored weights continue a
# different run than the one they came from.
RESUMABLE_KEYS = (
    "name",
    "data.path",
    "data.num_workers",
    "trainer.max_steps",
    "trainer.val_check_interval",
    "trainer.limit_val_batches",
    "trainer.log_every_n_steps",
    "flow.count_lattice",  # applied to predictions only, never to training
    "checkpoint.",
    "eval.",
)


# Filled from the data by `train` (engine.with_vocabulary): absent from a config before that.
VOCAB_KEYS = ("model.n_genes", "model.n_parts", "model.n_contexts", "model.n_batches")


# Settings added after runs were written, with when a config written before the key existed ran
# exactly as the key's default does. Not every default reproduces the behaviour from before its
# key (`model.additive_prior`: no prior at all before it; `flow.pseudobulk_weight`: no such term),
# so only the keys listed here are filled in; any other missing key stays a conflict.
ADDED_KEYS: dict[str, Callable[[dict[str, object]], bool]] = {
    "model.prior_rank": lambda old: True,  # before it, the prior was never projected (= None)
    # it matters only with a rank; runs with a rank but without this key (commits 575ba73..f7d0a7f)
    # used the leave-one-out basis, not the default
    "model.prior_basis_leave_one_out": lambda old: old.get("model.prior_rank") in (None, "None"),
    "model.center_controls": lambda old: True,  # before it, control sets were never centred (= False)
    "trainer.matmul_precision": lambda old: True,  # before it, training never changed torch's default (= highest)
    "trainer.autocast": lambda old: True,  # before it, training never ran under autocast (= off)
}

# Settings added after runs were written whose default does *not* reproduce the runs before them,
# with the value that does: an old run resumes only when that value is asked for.
LEGACY_VALUES: dict[str, object] = {
    "optim.cpu_fused_adam": False,  # before it, CPU runs stepped torch's per-tensor Adam loop
}


def resume_conflicts(old: dict[str, object], new: dict[str, object], ignore: tuple[str, ...] = ()) -> list[str]:
    """`key: old -> new` for every setting that differs and that a resumed run may not change.

    A key the old config lacks (the run predates it) counts as its default where `ADDED_KEYS`
    says the old run behaved that way, as its `LEGACY_VALUES` value where it has one, and as
    `<unset>` (a conflict) everywhere else.
    """
    flat_old, flat_new = flatten_config(old), flatten_config(new)
    defaults = flatten_config(ScaleConfig().model_dump(mode="json"))
    filled = {
        k: defaults[k] for k, same in ADDED_KEYS.items() if k not in flat_old and k in defaults and same(flat_old)
    }
    filled.update({k: v for k, v in LEGACY_VALUES.items() if k not in flat_old})
    flat_old = {**flat_old, **filled}
    out = []
    for key in sorted(set(flat_old) | set(flat_new)):
        if key in ignore or any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS):
            continue
        a, b = flat_old.get(key, "<unset>"), flat_new.get(key, "<unset>")
        if a != b:
            out.append(f"{key}: {a} -> {b}")
    return out


#: What a run (or Slurm, or another rank starting at the same moment) may already have put in its
#: directory before config.yaml exists; anything else means the folder is not a run.
RUN_ENTRIES = ("checkpoints", "config.yaml", "vocab.json", "prior.safetensors", "logs", "tb", "metrics",
               "train_loss.csv", "val_loss.csv", SPLIT_RECORD, "launch.sbatch", "slurm-*.out", "nemo_log_*", ".*")  # fmt: skip


def _written_by_a_run(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in RUN_ENTRIES)


def check_resume(cfg: ScaleConfig, run_dir: Path, before_vocabulary: bool = False) -> None:
    """Refuse to resume a run whose checkpoints were trained with other settings.

    `before_vocabulary`: the config's vocabulary sizes are not filled in yet (the CLI checks
    before it imports the training stack, so the error stays a single line); they are skipped.
    """
    ckpts = run_dir / "checkpoints"
    config = run_dir / "config.yaml"
    if run_dir.exists() and not run_dir.is_dir():
        raise ScaleError(f"--output {run_dir} is a file", "train into a new or empty --output directory")
    foreign = sorted(p.name for p in run_dir.iterdir() if not _written_by_a_run(p.name)) if run_dir.is_dir() else []
    if foreign and not config.exists():
        raise ScaleError(
            f"--output {run_dir} is a folder with other content ({', '.join(foreign[:3])}), not a bionemo-scale run",
            "train into a new or empty --output directory (a run directory resumes)",
        )
    if not (config.exists() and ckpts.is_dir() and any(ckpts.iterdir())):
        return
    ignore = VOCAB_KEYS if before_vocabulary else ()
    if (run_dir / SPLIT_RECORD).is_file():
        # The split is compared by what it holds out (`check_split_unchanged`), not by its path: the
        # same file named from another directory (or made absolute by `launch`) continues the run.
        ignore = (*ignore, "data.split")
    conflicts = resume_conflicts(load_yaml(config), cfg.model_dump(mode="json"), ignore)
    if conflicts:
        raise ScaleError(
            f"{run_dir} holds checkpoints of a run with other settings ({'; '.join(conflicts[:4])}"
            + (f"; {len(conflicts) - 4} more" if len(conflicts) > 4 else "")
            + "), so resuming it would not continue the same run",
            "train into a new --output directory, or resume with the run's own config.yaml",
        )


def split_record(index, labels: np.ndarray, split: str) -> dict[str, object]:
    """What the split assigned, by name (not by file): a hash of every group's label, and counts.

    config.yaml stores only the split's path, so an edited split file would otherwise go unnoticed
    on resume and the restored weights would continue on other training pairs.
    """
    groups = index.groups
    lines = sorted(
        f"{index.contexts[c]}\t{index.batches[b]}\t{index.perturbations[p]}\t{label}"
        for c, b, p, label in zip(groups["context_id"], groups["batch_id"], groups["pert_id"], labels, strict=True)
    )
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    perturbed = ~np.asarray(index.is_control)
    counts = {k: int(((labels == k) & perturbed).sum()) for k in ("train", "val", "test")}
    return {"split": str(split), "sha256": digest, "perturbed_groups": counts}


def check_split_unchanged(run_dir: Path, record: dict[str, object]) -> None:
    """Refuse to resume checkpoints that were trained on another assignment of held-out pairs."""
    path, ckpts = run_dir / SPLIT_RECORD, run_dir / "checkpoints"
    if not (path.is_file() and ckpts.is_dir() and any(ckpts.iterdir())):
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ScaleError(
            f"{path} is unreadable ({type(err).__name__})", "restore it, or train into a new --output directory"
        ) from err
    if old.get("sha256") != record["sha256"]:
        raise ScaleError(
            f"the split {record['split']} now holds out other pairs than when {run_dir} started "
            f"(train/val/test groups {old.get('perturbed_groups')} -> {record['perturbed_groups']}), "
            "so resuming would not continue the same run",
            "restore the split file, or train into a new --output directory",
        )
