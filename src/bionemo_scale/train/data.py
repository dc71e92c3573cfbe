"""LightningDataModule over the set-pair sampler, with Megatron's sampler and consumed-samples resume.

The dataset is a deterministic function of the sample index, and Megatron's pretraining sampler
walks indices from `consumed_samples` onward, sliced per data-parallel rank. Saving and restoring
`consumed_samples` (state_dict below) is therefore the whole of the data-resume state.
"""

from __future__ import annotations

import logging
import math

import lightning.pytorch as pl
import numpy as np
from nemo.lightning.data import WrappedDataLoader
from nemo.lightning.pytorch.plugins import MegatronDataSampler
from torch.utils.data import default_collate

from bionemo_scale.config import ScaleConfig
from bionemo_scale.data.control_means import GroupControlMeans
from bionemo_scale.data.prior import AdditivePrior, GroupPriors
from bionemo_scale.data.sampler import SetPairDataset
from bionemo_scale.data.store import ProcessedDataset
from bionemo_scale.errors import ScaleError
from bionemo_scale.train.finetune import id_tables, remap_batch

logger = logging.getLogger(__name__)


class ScaleDataModule(pl.LightningDataModule):
    def __init__(
        self,
        cfg: ScaleConfig,
        seq_length: int,
        run_vocab: dict[str, object] | None = None,
        gene_map: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if not cfg.data.path or not cfg.data.split:
            raise ScaleError("training needs data.path and data.split", "pass --data DIR and --split SPLIT")
        self.cfg = cfg
        self.data = ProcessedDataset(cfg.data.path)
        if run_vocab is not None and list(run_vocab["genes"]) != self.data.genes:  # type: ignore[arg-type]
            self.data.align_genes(list(run_vocab["genes"]), gene_map)  # type: ignore[arg-type]
        self._tables = id_tables(run_vocab, self.data.index) if run_vocab is not None else None
        self.labels = self.data.split_labels(cfg.data.split)
        self.train_groups = np.flatnonzero((self.labels == "train") & ~self.data.index.is_control)
        self.val_groups = np.flatnonzero((self.labels == "val") & ~self.data.index.is_control)
        if self.train_groups.size == 0:
            raise ScaleError("the split leaves no training pairs", "hold out fewer (context, perturbation) pairs")
        # The additive prior, from training pairs only (every rank computes the same tables).
        self.prior = (
            AdditivePrior.from_data(self.data, self.labels).with_rank(
                cfg.model.prior_rank, leave_one_out=cfg.model.prior_basis_leave_one_out
            )
            if cfg.model.additive_prior
            else None
        )
        self.priors = (
            GroupPriors(self.prior, self.data, cover=cfg.model.prior_cover) if self.prior is not None else None
        )
        self.control_means = (
            GroupControlMeans(self.data, cfg.data.sampler.control_matching) if cfg.model.center_controls else None
        )
        gbs = cfg.global_batch_size
        self.data_sampler = MegatronDataSampler(
            seq_len=seq_length,
            micro_batch_size=cfg.data.micro_batch_size,
            global_batch_size=gbs,
            dataloader_type="single",
        )
        self.init_global_step = 0
        # What NeMo's telemetry reads off a datamodule.
        self.seq_length = seq_length
        self.micro_batch_size = cfg.data.micro_batch_size
        self.global_batch_size = gbs

    # -- datasets ------------------------------------------------------------------------------
    def _train_dataset(self) -> SetPairDataset:
        sampler = self.cfg.data.sampler
        probe = SetPairDataset(self.data, self.train_groups, sampler, num_epochs=1)
        needed = (self.cfg.trainer.max_steps + 1) * self.cfg.global_batch_size
        return SetPairDataset(self.data, self.train_groups, sampler, num_epochs=max(1, math.ceil(needed / len(probe))))

    def _val_dataset(self) -> SetPairDataset | None:
        if self.val_groups.size == 0:
            return None
        sampler = self.cfg.data.sampler.model_copy(
            update={"epoch_mode": "groups", "seed": self.cfg.data.sampler.seed + 1}
        )
        per_pass = self.val_groups.size * self.cfg.data.val_sets_per_pair
        gbs = self.cfg.global_batch_size
        epochs = math.ceil(max(per_pass, gbs) / self.val_groups.size)
        return SetPairDataset(self.data, self.val_groups, sampler, num_epochs=epochs)

    def setup(self, stage: str = "") -> None:
        self._train_ds = self._train_dataset()
        self._val_ds = self._val_dataset()
        fallbacks = self._train_ds.fallback_groups()
        logger.info(
            "train: %d pairs-groups, epoch of %d set pairs; val: %d groups; %d groups use context-level controls",
            self.train_groups.size,
            self._train_ds.epoch_length,
            self.val_groups.size,
            len(fallbacks),
        )

    def _loader(self, dataset: SetPairDataset, mode: str) -> WrappedDataLoader:
        self.init_global_step = self.trainer.global_step if self.trainer is not None else 0
        self.data_sampler.init_global_step = self.init_global_step
        return WrappedDataLoader(
            mode=mode,
            dataset=dataset,
            num_workers=self.cfg.data.num_workers,
            pin_memory=False,
            persistent_workers=self.cfg.data.num_workers > 0,
            collate_fn=self._collate,
        )

    def _collate(self, items: list[dict]) -> dict:
        """default_collate, then the data's ids translated into the run's vocabulary."""
        batch = default_collate(items)
        return batch if self._tables is None else remap_batch(batch, self._tables)

    def train_dataloader(self) -> WrappedDataLoader:
        return self._loader(self._train_ds, "train")

    def val_dataloader(self) -> WrappedDataLoader | list:
        return [] if self._val_ds is None else self._loader(self._val_ds, "validation")

    # -- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        consumed = self.data_sampler.compute_consumed_samples(self.trainer.global_step - self.init_global_step)
        return {"consumed_samples": int(consumed)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        from megatron.core.num_microbatches_calculator import update_num_microbatches

        consumed = int(state_dict["consumed_samples"])
        self.data_sampler.init_consumed_samples = consumed
        self.data_sampler.prev_consumed_samples = consumed
        update_num_microbatches(consumed_samples=consumed, consistency_check=False)
        self.data_sampler.if_first_step = 1
        logger.info("resuming the data stream at consumed_samples=%d", consumed)
