"""`trainer.autocast=bf16`: bf16 matmuls with float32 weights, float32 norms and float32 outputs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bionemo_scale.config import FlowConfig, TrainerConfig
from bionemo_scale.model.autocast import Float32RMSNorm, forward_autocast, outputs_to_float32
from bionemo_scale.model.objective import loss_terms
from bionemo_scale.model.scale_model import ScaleOutput
from tests.model.conftest import tiny_model
from tests.model.test_scale_model import B, G, S, _cond


def _norm_config() -> SimpleNamespace:
    return SimpleNamespace(normalization="RMSNorm")


def test_float32_rmsnorm_is_torchs_rmsnorm_in_float32() -> None:
    torch.manual_seed(0)
    ours, plain = Float32RMSNorm(_norm_config(), 16, eps=1e-5), torch.nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        plain.weight.copy_(ours.weight)
    x = torch.randn(5, 16) * 3
    assert torch.equal(ours(x), plain(x))
    # a bf16 input is normalised in float32 and comes out float32
    xb = x.bfloat16()
    assert ours(xb).dtype == torch.float32 and torch.equal(ours(xb), plain(xb.float()))
    # with bf16 weights (megatron's Float16Module) input and output stay bf16
    ours.bfloat16()
    assert ours(xb).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="RMSNorm only"):
        Float32RMSNorm(SimpleNamespace(normalization="LayerNorm"), 16)


def test_the_local_spec_builds_float32_norms_under_the_old_names(megatron_single) -> None:
    """Every norm of the local block, the final one included, is `Float32RMSNorm`, and the
    checkpoint keys are those of megatron's own norms (old checkpoints still load)."""
    model, cfg = tiny_model()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert len(norms) == 2 * cfg.num_layers + 1 and all(isinstance(m, Float32RMSNorm) for m in norms)
    keys = set(model.state_dict())
    assert {"decoder.final_layernorm.weight", "decoder.layers.0.input_layernorm.weight"} <= keys
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in keys


def test_outputs_to_float32_converts_every_floating_tensor() -> None:
    bf = torch.ones(2, 3, dtype=torch.bfloat16)
    out = ScaleOutput(z1_hat=bf, z1=bf, z0=bf.float(), x1_hat=bf, x0_rec=None, x1_rec=bf)
    conv = outputs_to_float32(out)
    assert all(getattr(conv, k).dtype == torch.float32 for k in ("z1_hat", "z1", "z0", "x1_hat", "x1_rec"))
    assert conv.x0_rec is None and conv.z0 is out.z0  # float32 tensors are passed through
    assert outputs_to_float32(bf).dtype == torch.float32
    assert outputs_to_float32(torch.ones(2, dtype=torch.long)).dtype == torch.long


def test_forward_autocast_modes() -> None:
    with forward_autocast("off", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with forward_autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="autocast must be one of"):
        forward_autocast("fp16", "cpu")


def test_autocast_and_megatron_bf16_are_not_combined() -> None:
    with pytest.raises(ValueError, match="both ask for bf16"):
        TrainerConfig(autocast="bf16", precision="bf16-mixed")
    assert TrainerConfig(autocast="bf16").precision == "32"


def test_the_training_forward_under_autocast_is_float32_out_and_trains(megatron_single) -> None:
    """`ScaleLightningModule.forward` with `trainer.autocast=bf16`: the outputs are float32, within
    bf16 rounding of the float32 forward but not equal to it, and the backward (through megatron's
    parallel linears and the CPU shim) gives finite float32 gradients to every weight."""
    from bionemo_scale.train.module import ScaleLightningModule

    torch.manual_seed(0)
    model, _ = tiny_model()
    g = torch.Generator().manual_seed(3)
    ctrl, pert, t = torch.rand(B, S, G, generator=g) * 3, torch.rand(B, S, G, generator=g), torch.rand(B, generator=g)

    def forward(mode: str) -> ScaleOutput:
        wrapped = SimpleNamespace(module=model, cfg=SimpleNamespace(trainer=SimpleNamespace(autocast=mode)))
        return ScaleLightningModule.forward(wrapped, ctrl, t, _cond(), pert)

    full, half = forward("off"), forward("bf16")
    for name in ("z1_hat", "z1", "z0", "x1_hat", "x0_rec", "x1_rec"):
        a, b = getattr(full, name), getattr(half, name)
        assert b.dtype == torch.float32, name
        assert not torch.equal(a, b), name
        assert torch.allclose(a, b, rtol=0.05, atol=0.05), (name, float((a - b).abs().max()))
    model.zero_grad(set_to_none=True)
    loss_terms(half, ctrl, pert, FlowConfig())["loss"].mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


@pytest.mark.parametrize("steps", [1, 4])
def test_predict_under_autocast_keeps_the_flow_state_float32(megatron_single, monkeypatch, steps: int) -> None:
    """`predict --autocast bf16`: the network runs in bf16, but the Euler state the solver carries and
    the predicted cells are float32, within bf16 rounding of the float32 prediction and not equal to it."""
    import bionemo_scale.model.scale_model as scale_model

    torch.manual_seed(0)
    model, _ = tiny_model()
    model.eval()
    ctrl = torch.rand(B, S, G, generator=torch.Generator().manual_seed(4)) * 3
    seen: list[torch.dtype] = []
    solve = scale_model.solve_endpoint

    def spy(endpoint, z0, **kwargs):
        def recorded(z, t):
            out = endpoint(z, t)
            seen.extend([z.dtype, out.dtype])
            return out

        seen.append(z0.dtype)
        return solve(recorded, z0, **kwargs)

    monkeypatch.setattr(scale_model, "solve_endpoint", spy)
    full = model.predict(ctrl, _cond(), steps=steps)
    seen.clear()
    with forward_autocast("bf16", "cpu"):
        half = model.predict(ctrl, _cond(), steps=steps)
    assert len(seen) == 1 + 2 * steps and set(seen) == {torch.float32}
    assert half.dtype == torch.float32 and not torch.equal(full, half)
    assert torch.allclose(full, half, rtol=0.02, atol=0.02), float((full - half).abs().max())
