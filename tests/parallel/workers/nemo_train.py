"""A toy set model trained a few steps by NeMo 2's Trainer + MegatronStrategy on CPU (gloo).

This is the feasibility proof for issue 4: NeMo's LightningModule contract for a megatron
model (configure_model / data_step / forward_step / training_step / loss reduction), the
plain megatron optimizer, and the CPU shim. The real SCALE training module lives in train/.
"""

from __future__ import annotations

import time

import torch

from _common import (
    BATCH,
    FFN,
    HEADS,
    HIDDEN,
    LAYERS,
    SET,
    finish,
    make_tiny_set_model_class,
    parse_args,
    quiet,
    save_result,
)

IN_DIM, OUT_DIM, N_SAMPLES = 12, 5, 256


class SetPairs(torch.utils.data.Dataset):
    """Sets of random cells whose target is a fixed nonlinear map of the set (learnable fast)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, SET, IN_DIM, generator=g)
        w = torch.randn(IN_DIM, OUT_DIM, generator=g) / IN_DIM**0.5
        # A set-level term (the set mean) so that attention has something to learn.
        self.y = torch.tanh(self.x @ w) + 0.5 * (self.x.mean(dim=1, keepdim=True) @ w)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


def main() -> None:
    quiet()
    args = parse_args(tp=1, pp=1, devices=0, steps=4, lr=3e-3, global_batch=4)
    t0 = time.monotonic()

    from bionemo_scale.parallel import optimizer_device_flags, patch_nemo_for_cpu

    patch_nemo_for_cpu()  # before NeMo builds anything
    from nemo.lightning import megatron_init

    seed_fn = megatron_init._set_random_seed
    idempotent = patch_nemo_for_cpu() and megatron_init._set_random_seed is seed_fn

    import lightning.pytorch as pl
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl
    from nemo.lightning.megatron_parallel import MegatronLossReduction
    from nemo.lightning.pytorch.optim import MegatronOptimizerModule
    from nemo.lightning.pytorch.plugins import MegatronDataSampler

    from bionemo_scale.model.specs import make_transformer_config

    TinySetModel = make_tiny_set_model_class()

    class MSEReduction(MegatronLossReduction):
        """Per-microbatch loss for backward, and the microbatch mean for logging."""

        def forward(self, batch: dict[str, torch.Tensor], forward_out: torch.Tensor):
            loss = torch.nn.functional.mse_loss(forward_out.float(), batch["y"])
            logged = loss.detach().clone()
            torch.distributed.all_reduce(logged, group=parallel_state.get_data_parallel_group())
            return loss, {"avg": logged / parallel_state.get_data_parallel_world_size()}

        def reduce(self, losses_reduced_per_micro_batch) -> torch.Tensor:
            return torch.stack([d["avg"] for d in losses_reduced_per_micro_batch]).mean()

    class ToyModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.config = make_transformer_config(HIDDEN, LAYERS, HEADS, FFN, args.tp, args.pp)
            self.optim = MegatronOptimizerModule(
                OptimizerConfig(optimizer="adam", lr=args.lr, clip_grad=1.0, **optimizer_device_flags())
            )
            self.optim.connect(self)
            self._loss = MSEReduction()

        def configure_model(self) -> None:
            if not hasattr(self, "module"):
                self.module = TinySetModel(
                    self.config,
                    IN_DIM,
                    OUT_DIM,
                    pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage(),
                )

        def data_step(self, dataloader_iter) -> dict[str, torch.Tensor]:
            batch = next(dataloader_iter)
            return batch[0] if isinstance(batch, tuple) and len(batch) == 3 else batch

        def forward_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.module(batch["x"])

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int | None = None) -> torch.Tensor:
            return self.forward_step(batch)

        @property
        def training_loss_reduction(self) -> MegatronLossReduction:
            return self._loss

    class ToyData(pl.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            # seq_len is what pipeline stages exchange: the activation's sequence length.
            self.data_sampler = MegatronDataSampler(
                seq_len=SET, micro_batch_size=BATCH, global_batch_size=args.global_batch
            )

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(SetPairs(N_SAMPLES), num_workers=0)

    losses: list[float] = []

    class RecordLoss(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            out = outputs["loss"] if isinstance(outputs, dict) else outputs
            losses.append(float(out))

    strategy = nl.MegatronStrategy(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        pipeline_dtype=torch.float32,
        ckpt_async_save=False,
    )
    trainer = nl.Trainer(
        accelerator="cpu",
        devices=args.devices or args.tp * args.pp,
        strategy=strategy,
        max_steps=args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RecordLoss()],
        plugins=nl.MegatronMixedPrecision(precision="32"),
    )
    setup_s = time.monotonic() - t0
    trainer.fit(ToyModule(), datamodule=ToyData())
    save_result(
        args.out,
        {
            "losses": losses,
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
            "dp_rank": parallel_state.get_data_parallel_rank(),
            "last_stage": parallel_state.is_pipeline_last_stage(),
            "global_step": trainer.global_step,
            "idempotent": idempotent,
            "optimizer": type(getattr(trainer.optimizers[0], "mcore_optimizer", trainer.optimizers[0])).__name__,
            "setup_s": setup_s,
            "total_s": time.monotonic() - t0,
        },
    )


if __name__ == "__main__":
    main()
    finish()
