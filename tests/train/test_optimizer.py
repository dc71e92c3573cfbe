"""The fused CPU Adam switch (pure torch; the training runs that use it are in test_training)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bionemo_scale.train.optimizer import torch_adams, use_fused_cpu_adam


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in ((64, 32), (32,), (7, 5, 3))]


def _run(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


def _adamw(params: list[torch.nn.Parameter], **kw: object) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01, **kw)


def test_the_switched_optimizer_is_torchs_fused_adam() -> None:
    # megatron's and NeMo's wrappers: NeMo's McoreOpt -> ChainedOptimizer -> FP32Optimizer -> torch AdamW
    switched, native, loop = _params(), _params(), _params()
    inner = _adamw(switched)
    wrapped = SimpleNamespace(mcore_optimizer=SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=inner)]))
    assert list(torch_adams(wrapped)) == [inner]
    assert use_fused_cpu_adam(wrapped) == 1
    assert all(g["fused"] and g["foreach"] is False for g in inner.param_groups)
    got, want = _run(inner, switched), _run(_adamw(native, fused=True), native)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)  # the same kernel as a constructor-fused AdamW, bit for bit
    for a, b, start in zip(got, _run(_adamw(loop), loop), _params(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)  # and the loop's update, to rounding
        assert (a - start).abs().max() > 1e-2  # five steps of lr 1e-2 moved every tensor


def test_each_optimizer_is_switched_once_and_others_are_left_alone() -> None:
    adam = _adamw(_params())
    sgd = torch.optim.SGD(_params(), lr=0.1)
    both = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=adam), SimpleNamespace(optimizer=adam), sgd])
    assert use_fused_cpu_adam(both) == 1
    assert "fused" not in sgd.param_groups[0] or not sgd.param_groups[0]["fused"]
    assert use_fused_cpu_adam(SimpleNamespace()) == 0


def test_parameters_the_fused_kernel_cannot_take_are_refused_up_front() -> None:
    ints = torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)
    with pytest.raises(ValueError, match="floating-point CPU parameters"):
        use_fused_cpu_adam(_adamw([ints]))
