"""NeMo's ModelCheckpoint, with the best checkpoint's score being its own and surviving a resume.

Three fixes to how the stock callback behaves with step-based checkpoints (`every_n_train_steps`):

1. **Score lag.** Lightning saves a step checkpoint in `on_train_batch_end`, *before* the
   validation of that same step runs, so the checkpoint was ranked by the previous validation
   (of weights `val_check_interval` steps older). Here a checkpoint that falls on a validation
   step is saved after that validation, ranked by its own score.
2. **Top-k lost on resume.** On restart NeMo rebuilds the top-k table from checkpoint file names,
   which in this project do not hold the metric, so the restored table was wiped: the old best
   was never deleted and any new checkpoint became "best". Here the table restored from the
   checkpoint is kept (minus entries whose files are gone).
3. **Which one is best.** `checkpoints/best.json` names the best checkpoint and every top-k score,
   so `export --which best` can choose among `save_top_k > 1` checkpoints.

The price of (1): a checkpoint due on a validation step exists only once that validation has
finished, so a job killed *during* that validation resumes from the previous checkpoint. Scores
stay stale where a checkpoint step is not a validation step (`every_n_train_steps` not a
multiple of `val_check_interval`, or metrics computed every few validations); `train` warns then.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from nemo.lightning.ckpt_utils import ckpt_to_dir
from nemo.lightning.pytorch.callbacks import ModelCheckpoint

from bionemo_scale.atomic import atomic_file

logger = logging.getLogger(__name__)

BEST_RECORD = "best.json"


def _score(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


class ScaleModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose step checkpoints on validation steps are saved after validating."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred_step: int | None = None

    # -- 1. save after the validation of the same step ---------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        due = (
            not self._should_skip_saving_checkpoint(trainer)
            and self._every_n_train_steps >= 1
            and trainer.global_step % self._every_n_train_steps == 0
        )
        loop = trainer.fit_loop.epoch_loop
        if due and loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            self._deferred_step = trainer.global_step  # saved in on_validation_end, ranked by its own score
            return
        self._flush(trainer)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        if self._deferred_step is not None and self._deferred_step == trainer.global_step:
            self._flush(trainer)
            return
        super().on_validation_end(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[override]
        self._flush(trainer)  # a deferred save whose validation did not run (never expected)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        self._flush(trainer)
        super().on_train_end(trainer, pl_module)

    def _flush(self, trainer) -> None:
        if self._deferred_step is None:
            return
        step, self._deferred_step = self._deferred_step, None
        if step != trainer.global_step or self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    # -- 2. keep the restored top-k table on resume -------------------------------------------
    def nemo_topk_check_previous_run(self) -> None:
        """Keep the table restored from the checkpoint; trim it when save_top_k was lowered."""
        self._remove_invalid_entries_from_topk()
        if self.save_top_k < 0 or len(self.best_k_models) <= self.save_top_k:
            return
        ranked = sorted(self.best_k_models, key=lambda p: _score(self.best_k_models[p]), reverse=self.mode == "max")
        for path in ranked[self.save_top_k :]:
            self.best_k_models.pop(path)
            self._del_model_without_trainer(path)  # rank 0 deletes; every rank meets its barrier
        self._remove_invalid_entries_from_topk()  # recompute best and k-th
        if self.best_k_models and self.dirpath and _is_global_zero():
            write_best_record(Path(self.dirpath), self.monitor, self.mode, self.best_model_path, self.best_k_models)

    # -- 3. record which checkpoint is best ---------------------------------------------------
    def _update_best_and_save(self, current, trainer, monitor_candidates) -> None:  # type: ignore[override]
        super()._update_best_and_save(current, trainer, monitor_candidates)
        if trainer.is_global_zero and self.dirpath:
            write_best_record(Path(self.dirpath), self.monitor, self.mode, self.best_model_path, self.best_k_models)


def _is_global_zero() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def write_best_record(ckpt_root: Path, monitor: str | None, mode: str, best_path: str, top_k: dict[str, Any]) -> Path:
    """checkpoints/best.json, written atomically (a reader never sees half a file)."""
    record = {
        "monitor": monitor,
        "mode": mode,
        "best": ckpt_to_dir(best_path).name,
        "top_k": {ckpt_to_dir(p).name: _score(v) for p, v in top_k.items()},
    }
    record["score"] = record["top_k"].get(record["best"])
    path = ckpt_root / BEST_RECORD
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    return path
