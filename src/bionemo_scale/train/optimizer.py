"""The optimizer: megatron's Adam under NeMo, with torch's fused kernel on CPU.

Without Transformer Engine or apex, megatron-core falls back to `torch.optim.AdamW` and builds it
without `fused`, so on CPU every step updates the parameters one tensor at a time, a dozen
elementwise kernels per tensor. At the benchmark size (10 M parameters, 2 threads) that loop is
~40 ms of a ~300 ms training step; torch's fused CPU kernel does the same update in ~10 ms, and
agrees with the loop to float32 rounding (not bit for bit, so `optim.cpu_fused_adam` is a
setting a resumed run may not change). On GPU megatron uses TE's or apex's FusedAdam and this
module changes nothing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from bionemo_scale.config import ScaleConfig
from bionemo_scale.parallel import optimizer_device_flags

if TYPE_CHECKING:
    from nemo.lightning.pytorch.optim import MegatronOptimizerModule

logger = logging.getLogger(__name__)

#: attributes through which megatron's and NeMo's wrappers hold the optimizers they wrap
_WRAPPED = ("mcore_optimizer", "chained_optimizers", "optimizer")


def torch_adams(optimizer: object) -> Iterator[torch.optim.Adam]:
    """Every torch Adam/AdamW inside NeMo's and megatron's optimizer wrappers, once each."""
    seen: set[int] = set()
    stack = [optimizer]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.optim.Adam):  # AdamW is a subclass
            yield obj
            continue
        for name in _WRAPPED:
            inner = getattr(obj, name, None)
            if isinstance(inner, list | tuple):
                stack.extend(inner)
            elif inner is not None:
                stack.append(inner)


def use_fused_cpu_adam(optimizer: object) -> int:
    """Switch the torch Adams inside `optimizer` to torch's fused CPU kernel; returns how many.

    torch reads `fused` and `foreach` from each parameter group at every step, so setting them on
    the built optimizer is what `fused=True` in its constructor does; the constructor's one other
    effect, grad-scaler support, has no use in CPU float32 training. Parameters that the fused
    kernel cannot take (not on CPU, not floating point) are refused here, not at the first step.
    """
    n = 0
    for adam in torch_adams(optimizer):
        for group in adam.param_groups:
            bad = [p for p in group["params"] if p.device.type != "cpu" or not p.is_floating_point()]
            if bad:
                raise ValueError(
                    f"the fused CPU Adam needs floating-point CPU parameters, got {bad[0].dtype} on {bad[0].device}"
                )
            if group.get("differentiable"):
                raise ValueError("the fused CPU Adam does not support differentiable=True")
            group["foreach"] = False
            group["fused"] = True
        n += 1
    return n


@functools.cache
def _optimizer_module_class() -> type[MegatronOptimizerModule]:
    from nemo.lightning.pytorch.optim import MegatronOptimizerModule

    class ScaleOptimizerModule(MegatronOptimizerModule):
        """NeMo's megatron optimizer module, with the fused CPU Adam when asked for."""

        def __init__(self, *args: object, fuse_cpu_adam: bool = False, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.fuse_cpu_adam = fuse_cpu_adam

        def optimizers(self, model: object) -> list[torch.optim.Optimizer]:
            optimizers = super().optimizers(model)
            if self.fuse_cpu_adam:
                n = sum(use_fused_cpu_adam(o) for o in optimizers)
                logger.info("Adam runs torch's fused CPU kernel (%d optimizer%s)", n, "" if n == 1 else "s")
            return optimizers

    return ScaleOptimizerModule


def build_optimizer(cfg: ScaleConfig, cpu: bool) -> MegatronOptimizerModule:
    """megatron Adam with the run's settings and a cosine schedule (linear warm-up) to `optim.min_lr`."""
    from megatron.core.optimizer import OptimizerConfig
    from nemo.lightning.pytorch.optim import CosineAnnealingScheduler

    o = cfg.optim
    dtype = torch.bfloat16 if cfg.trainer.precision == "bf16-mixed" else torch.float32
    config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        clip_grad=o.clip_grad,
        params_dtype=dtype,
        **optimizer_device_flags(cpu, params_dtype=dtype),
    )
    scheduler = CosineAnnealingScheduler(
        max_steps=cfg.trainer.max_steps, warmup_steps=o.warmup_steps, constant_steps=0, min_lr=o.min_lr
    )
    return _optimizer_module_class()(config=config, lr_scheduler=scheduler, fuse_cpu_adam=cpu and o.cpu_fused_adam)
