"""ScaleModel on one CPU process: set equivariance, the flow, prediction, learning, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bionemo_scale.config import FlowConfig, ScaleConfig, ScaleModelConfig
from bionemo_scale.errors import ScaleError
from bionemo_scale.model.objective import loss_terms
from bionemo_scale.model.scale_model import validate_against_data
from tests.model.conftest import tiny_model

B, S, G = 3, 10, 20


def _cond(b: int = B) -> dict[str, torch.Tensor]:
    return {
        "parts": torch.tensor([[0, 1], [2, -1], [3, -1]])[:b],
        "dose": torch.ones(b),
        "context_id": torch.tensor([0, 1, 2])[:b],
        "batch_id": torch.tensor([0, 1, 0])[:b],
    }


@pytest.fixture
def model(megatron_single):
    torch.manual_seed(0)
    return tiny_model()[0]


def test_forward_shapes_and_terms(model) -> None:
    g = torch.Generator().manual_seed(1)
    ctrl, pert, t = torch.rand(B, S, G, generator=g), torch.rand(B, S, G, generator=g), torch.rand(B, generator=g)
    out = model(ctrl, t, _cond(), pert)
    assert out.z1_hat.shape == out.z1.shape == out.z0.shape == (B, S, 32)
    assert out.x1_hat.shape == out.x0_rec.shape == out.x1_rec.shape == (B, S, G)
    terms = loss_terms(out, ctrl, pert, FlowConfig())
    assert set(terms) == {"endpoint", "gene", "pseudobulk", "reconstruction", "distribution", "loss"}
    assert all(v.shape == (B,) for v in terms.values())
    terms["loss"].mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("what", ["forward", "predict"])
def test_permutation_equivariance(model, what: str) -> None:
    g = torch.Generator().manual_seed(2)
    ctrl, pert, t = torch.rand(B, S, G, generator=g), torch.rand(B, S, G, generator=g), torch.rand(B, generator=g)
    perm = torch.randperm(S, generator=g)
    if what == "forward":
        a = model(ctrl, t, _cond(), pert).z1_hat
        b = model(ctrl[:, perm], t, _cond(), pert[:, perm]).z1_hat
    else:
        a = model.predict(ctrl, _cond(), steps=3)
        b = model.predict(ctrl[:, perm], _cond(), steps=3)
    assert (b - a[:, perm]).abs().max() < 1e-5
    assert (b - a).abs().max() > 1e-4  # the outputs really depend on which cell is which


def test_one_step_is_the_endpoint_and_steps_change_it(model) -> None:
    with torch.no_grad():  # a fresh head is near zero; make the endpoint move so that steps matter
        model.head.fc_out.weight.mul_(200.0)
    g = torch.Generator().manual_seed(3)
    ctrl = torch.rand(B, S, G, generator=g)
    t0 = torch.zeros(B)
    teacher = model(ctrl, t0, _cond(), None)  # t = 0: z_t is z0, as in prediction
    nfe1 = model.predict(ctrl, _cond(), steps=1)
    torch.testing.assert_close(nfe1, teacher.x1_hat.clamp_min(0), atol=1e-5, rtol=1e-5)
    assert (model.predict(ctrl, _cond(), steps=4) - nfe1).abs().max() > 1e-4
    assert model.predict(ctrl, _cond(), steps=4, solver="heun").shape == (B, S, G)
    assert (nfe1 >= 0).all()


def test_combination_is_composed_from_its_parts(model) -> None:
    cond = model.conditions
    a = cond.perturbation_token(torch.tensor([[0, -1]]), torch.zeros(1))
    b = cond.perturbation_token(torch.tensor([[1, -1]]), torch.zeros(1))
    ab = cond.perturbation_token(torch.tensor([[0, 1]]), torch.zeros(1))
    ba = cond.perturbation_token(torch.tensor([[1, 0]]), torch.zeros(1))
    torch.testing.assert_close(ab, a + b - cond.perturbation_token(torch.tensor([[-1, -1]]), torch.zeros(1)))
    torch.testing.assert_close(ab, ba)


def test_learns_a_program_shift(megatron_single) -> None:
    """A perturbation adds a known shift to a gene program; the model must learn it.

    Endpoint MSE must fall by > 90%, and the NFE=1 prediction's mean delta must point along
    the true shift (cosine > 0.9).
    """
    torch.manual_seed(0)
    model, _ = tiny_model(n_genes=G, gene_residual=True, latent_residual=True)
    gen = torch.Generator().manual_seed(4)
    program = torch.zeros(G)
    program[:6] = torch.tensor([1.5, 1.2, 1.0, -0.8, -1.0, 0.9])
    flow = FlowConfig(distribution_weight=0.05)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def draw(n: int):
        base = 1.0 + 0.3 * torch.randn(n, S, G, generator=gen)
        ctrl = (base + 0.1 * torch.randn(n, S, G, generator=gen)).clamp_min(0)
        pert = (base + program + 0.1 * torch.randn(n, S, G, generator=gen)).clamp_min(0)
        return ctrl, pert

    cond = {k: v[:1].expand(8, *v.shape[1:]).contiguous() for k, v in _cond().items()}
    losses = []
    for _ in range(250):
        ctrl, pert = draw(8)
        t = torch.rand(8, generator=gen)
        terms = loss_terms(model(ctrl, t, cond, pert), ctrl, pert, flow)
        opt.zero_grad()
        terms["loss"].mean().backward()
        opt.step()
        losses.append(float(terms["gene"].mean()))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.1 * first, (first, last)
    ctrl, pert = draw(8)
    pred = model.predict(ctrl, cond, steps=1)
    delta = (pred - ctrl).mean(dim=(0, 1))
    cos = torch.nn.functional.cosine_similarity(delta, program, dim=0)
    assert cos > 0.9, float(cos)


def test_unknown_ids_are_clear_errors(model) -> None:
    ctrl = torch.rand(1, S, G)
    bad = _cond(1)
    bad["parts"] = torch.tensor([[9, -1]])  # the model knows 4 parts (+ unknown id 4)
    with pytest.raises(ScaleError, match="parts 9 is outside the model's vocabulary"):
        model.predict(ctrl, bad)
    bad = _cond(1)
    bad["context_id"] = torch.tensor([7])
    with pytest.raises(ScaleError, match="context_id"):
        model.predict(ctrl, bad)


def test_gene_dimension_mismatch_is_a_clear_error() -> None:
    cfg = ScaleModelConfig(n_genes=500, n_contexts=2)
    with pytest.raises(ScaleError, match="built for 500 genes but the data has 300"):
        validate_against_data(cfg, 300)


@pytest.mark.parametrize(
    "override,match",
    [
        ({"model": {"hidden_size": 30, "num_attention_heads": 4}}, "not divisible by num_attention_heads"),
        ({"trainer": {"tensor_model_parallel_size": 3}}, "not divisible by TP size 3"),
        ({"model": {"num_layers": 3}, "trainer": {"pipeline_model_parallel_size": 2, "devices": 2}}, "num_layers 3"),
        ({"data": {"sampler": {"set_size": 0}}}, "set size must be >= 1"),
        ({"model": {"fp8": "hybrid"}}, "fp8 needs model.spec=te"),
    ],
)
def test_bad_shapes_fail_at_config_time(override: dict, match: str) -> None:
    from pydantic import ValidationError

    data = ScaleConfig().model_dump()
    for section, values in override.items():
        for k, v in values.items():
            if isinstance(v, dict):
                data[section][k].update(v)
            else:
                data[section][k] = v
    with pytest.raises(ValidationError, match=match):
        ScaleConfig.model_validate(data)


def test_te_spec_without_transformer_engine_names_it(megatron_single) -> None:
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here: this checks the error raised without it")
    with pytest.raises(ScaleError, match="Transformer Engine"):
        tiny_model(spec="te")
    with pytest.raises(ScaleError, match="fp8"):
        tiny_model(spec="te", fp8="hybrid")


@pytest.mark.gpu
@pytest.mark.fp8
def test_te_spec_runs_under_fp8_on_gpu() -> None:
    """Where TE and an FP8-capable GPU exist: build with spec=te, fp8=hybrid and run a forward."""
    import transformer_engine  # noqa: F401

    from bionemo_scale.parallel import init_distributed

    init_distributed(1, 1)
    torch.manual_seed(0)
    # FP8 GEMMs want token and feature counts that are multiples of 16.
    model, _ = tiny_model(spec="te", fp8="hybrid", hidden_size=64, encoder_hidden_size=128, params_dtype="bfloat16")
    model = model.cuda()
    ctrl = torch.rand(2, 27, 20, device="cuda")  # 5 condition tokens + 27 cells = 32 tokens
    cond = {k: v[:2].cuda() for k, v in _cond().items()}
    out = model(ctrl, torch.rand(2, device="cuda"), cond, torch.rand_like(ctrl))
    assert torch.isfinite(out.x1_hat).all()
    layer = model.decoder.layers[0]
    assert "transformer_engine" in type(layer.self_attention.linear_qkv).__module__


def test_additive_prior_is_the_starting_point_and_is_required(megatron_single) -> None:
    """With the prior, the prediction is control + prior + a learned correction; without it, an error."""
    torch.manual_seed(0)
    model, _ = tiny_model(additive_prior=True)
    g = torch.Generator().manual_seed(6)
    ctrl = torch.rand(B, S, G, generator=g)
    prior = torch.zeros(B, G)
    prior[:, :4] = torch.tensor([2.0, -0.5, 1.0, 3.0])
    with_prior = model.predict(ctrl, {**_cond(), "prior": prior})
    zero = model.predict(ctrl, {**_cond(), "prior": torch.zeros(B, G)})
    # the prior shifts the prediction by itself (up to the small learned correction and clamping at 0)
    shift = (with_prior - zero).mean(dim=(0, 1))
    assert shift[0] > 1.5 and shift[3] > 2.5 and abs(float(shift[5:].mean())) < 0.2
    with pytest.raises(ScaleError, match="additive prior"):
        model.predict(ctrl, _cond())
    # training targets the deviation from the prior: a perturbed set equal to control + prior is "no change"
    out = model(ctrl, torch.zeros(B), {**_cond(), "prior": prior}, ctrl + prior[:, None, :])
    torch.testing.assert_close(out.x1_rec - prior[:, None, :], model.decode(model.encode(ctrl)), atol=1e-5, rtol=1e-5)


def test_half_precision_wrapper_leaves_cells_and_time_in_fp32(megatron_single) -> None:
    """Under bf16, NeMo wraps the model in megatron's Float16Module, which casts the first stage's
    positional tensor inputs to bf16. The training module passes them by keyword, so the cells
    reach the gene residual unrounded and t reaches its sin/cos features (up to 1,000 rad) intact.
    With a zero gene decoder the residual is exact: X̂1 = X0 to the last fp32 bit."""
    from types import SimpleNamespace

    from megatron.core.transformer.module import Float16Module

    from bionemo_scale.train.module import ScaleLightningModule

    torch.manual_seed(0)
    model, _ = tiny_model(params_dtype="bfloat16")
    assert model.config.bf16
    torch.nn.init.zeros_(model.gene_decoder.fc_out.weight)
    seen: dict[str, torch.dtype] = {}

    def record(module, args, kwargs) -> None:
        bound = {**dict(zip(("ctrl", "t", "conditions", "pert"), args)), **kwargs}
        seen.update({k: bound[k].dtype for k in ("ctrl", "t", "pert")}, positional=len(args))

    model.register_forward_pre_hook(record, with_kwargs=True)
    off = SimpleNamespace(trainer=SimpleNamespace(autocast="off"))
    wrapped = SimpleNamespace(module=Float16Module(model.config, model), cfg=off)
    g = torch.Generator().manual_seed(7)
    ctrl = torch.rand(B, S, G, generator=g) * 3  # values that bf16 (8 mantissa bits) cannot hold
    pert, t = torch.rand(B, S, G, generator=g), torch.rand(B, generator=g)
    assert (ctrl.bfloat16().float() != ctrl).any()
    out = ScaleLightningModule.forward(wrapped, ctrl, t, _cond(), pert)
    assert seen == {"ctrl": torch.float32, "t": torch.float32, "pert": torch.float32, "positional": 0}
    assert out.x1_hat.dtype == torch.float32
    assert torch.equal(out.x1_hat, ctrl)
    # the same call by position is what megatron rounds (why the keyword matters)
    rounded = wrapped.module(ctrl, t, _cond(), pert)
    assert seen["ctrl"] == torch.bfloat16 and not torch.equal(rounded.x1_hat, ctrl)


def test_centred_controls_move_each_set_onto_its_pool_mean(megatron_single) -> None:
    """`center_controls`: the gene residual starts from X0 − mean_set(X0) + pool mean. With a zero
    decoder the residual is exact, so the prediction is the centred set plus the prior, in training
    and at inference alike, and a batch without the pool mean is a clear error."""
    torch.manual_seed(0)
    model, _ = tiny_model(additive_prior=True, center_controls=True)
    torch.nn.init.zeros_(model.gene_decoder.fc_out.weight)
    g = torch.Generator().manual_seed(8)
    ctrl = torch.rand(B, S, G, generator=g) + 1.0
    prior, pool = torch.rand(B, G, generator=g) - 0.5, torch.rand(B, G, generator=g) + 1.0
    cond = {**_cond(), "prior": prior, "control_mean": pool}
    expected = ctrl - ctrl.mean(dim=1, keepdim=True) + pool[:, None, :] + prior[:, None, :]
    torch.testing.assert_close(model.predict(ctrl, cond, clamp=False), expected)
    torch.testing.assert_close(model.predict(ctrl, cond, clamp=False).mean(dim=1), pool + prior)
    out = model(ctrl, torch.rand(B, generator=g), cond, torch.rand(B, S, G, generator=g))
    torch.testing.assert_close(out.x1_hat, expected)
    # off (the default), the same weights keep the sampled cells' own mean
    plain, _ = tiny_model(additive_prior=True)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain.predict(ctrl, cond, clamp=False), ctrl + prior[:, None, :])
    with pytest.raises(ScaleError, match="control_mean"):
        model.predict(ctrl, {**_cond(), "prior": prior})


def test_centring_needs_the_gene_residual() -> None:
    with pytest.raises(ValueError, match="needs gene_residual"):
        ScaleModelConfig(center_controls=True, gene_residual=False)
