"""TransformerBlock on CPU/gloo: equivariance, TP=2 vs TP=1, PP=2 vs PP=1, dropout under TP.

Every parallel run copies its weights from a single full (TP=1, PP=1) model built in the same
process first, so that the comparisons are exact up to float summation order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from _common import (
    BATCH,
    HIDDEN,
    SET,
    build_block,
    finish,
    global_layer_name,
    make_tiny_set_model_class,
    parse_args,
    quiet,
    save_result,
)

SEED = 1234


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SET, BATCH, HIDDEN, generator=g), torch.randn(SET, BATCH, HIDDEN, generator=g)


def _forward_backward(block, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = block(hidden_states=x, attention_mask=None)
    (y * w).sum().backward()
    return y.detach(), x.grad.detach()


def equivariance() -> dict:
    """Permuting the set permutes the output (and a causal mask would break this).

    Also records the block's distributed-checkpoint keys.
    """
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_block import TransformerBlock

    from bionemo_scale.model.specs import get_layer_spec
    from bionemo_scale.parallel import init_distributed

    init_distributed(1, 1, seed=SEED)
    block = build_block().eval()
    x, _ = _inputs()
    perm = torch.randperm(SET, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = block(hidden_states=x, attention_mask=None)
        y_perm = block(hidden_states=x[perm], attention_mask=None)
    # The same weights with a causal mask: the check must be able to fail.
    spec = get_layer_spec("local")
    spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.causal}
    causal = TransformerBlock(block.config, spec=spec).eval()
    causal.load_state_dict(block.state_dict())
    with torch.no_grad():
        c = causal(hidden_states=x, attention_mask=None)
        c_perm = causal(hidden_states=x[perm], attention_mask=None)
    # Distributed-checkpoint keys of the local spec use Transformer Engine's fused names.
    sharded = block.sharded_state_dict(prefix="decoder.")
    ckpt_keys = {k: v.key for k, v in sharded.items() if k.endswith("weight")}
    return {
        "ckpt_keys": ckpt_keys,
        "err": (y[perm] - y_perm).abs().max().item(),
        "scale": y.abs().max().item(),
        "causal_err": (c[perm] - c_perm).abs().max().item(),
        "mask_types": sorted({str(layer.self_attention.attn_mask_type) for layer in block.layers}),
    }


def _shard(name: str, full: torch.Tensor, param: torch.nn.Parameter, rank: int, tp: int) -> torch.Tensor:
    """Slice a TP=1 weight into this rank's shard, as megatron lays shards out."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    if name.endswith("linear_fc1.weight"):  # SwiGLU fc1 is [gate; up]; each half is sharded
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    return full.chunk(tp, dim=param.partition_dim)[rank]


def _gather(name: str, local: torch.Tensor, param: torch.nn.Parameter, tp: int) -> torch.Tensor:
    """Inverse of _shard, through an all-gather over the tensor-parallel group."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return local
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    if name.endswith("linear_fc1.weight"):
        gates, ups = zip(*(p.chunk(2, dim=0) for p in parts), strict=True)
        return torch.cat([torch.cat(gates), torch.cat(ups)])
    return torch.cat(parts, dim=param.partition_dim)


def tensor_parallel() -> dict:
    from megatron.core import parallel_state, tensor_parallel

    from bionemo_scale.errors import ScaleError
    from bionemo_scale.parallel import destroy_distributed, init_distributed

    init_distributed(1, 1, seed=SEED)  # both ranks build the full model (DP=2, no grad sync)
    ref = build_block()
    x, w = _inputs()
    y_ref, xg_ref = _forward_backward(ref, x, w)
    full = {n: p.detach().clone() for n, p in ref.named_parameters()}
    grads_ref = {n: p.grad.clone() for n, p in ref.named_parameters()}

    try:  # a second layout needs an explicit destroy first
        init_distributed(2, 1, seed=SEED)
        relayout_error = None
    except ScaleError as exc:
        relayout_error = str(exc)
    destroy_distributed(process_group=False)
    init_distributed(2, 1, seed=SEED)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    block = build_block(tp=2)
    with torch.no_grad():
        for n, p in block.named_parameters():
            p.copy_(_shard(n, full[n], p, tp_rank, 2))
    y, xg = _forward_backward(block, x, w)
    grad_err = {n: (_gather(n, p.grad, p, 2) - grads_ref[n]).abs().max().item() for n, p in block.named_parameters()}
    result = {
        "tp_rank": tp_rank,
        "relayout_error": relayout_error,
        "out_err": (y - y_ref).abs().max().item(),
        "x_grad_err": (xg - xg_ref).abs().max().item(),
        "grad_err": grad_err,
        "grad_scale": max(g.abs().max().item() for g in grads_ref.values()),
        "local_shapes": {n: tuple(p.shape) for n, p in block.named_parameters()},
        "full_shapes": {n: tuple(t.shape) for n, t in full.items()},
    }

    # Dropout under TP: deterministic for a seed, identical replicated activations on both TP
    # ranks (shared default stream), and per-rank streams inside tensor-parallel regions.
    drop = build_block(tp=2, hidden_dropout=0.2, attention_dropout=0.2)
    drop.load_state_dict(block.state_dict())
    outs = []
    for _ in range(2):
        torch.manual_seed(SEED)
        tensor_parallel.model_parallel_cuda_manual_seed(SEED)
        with torch.no_grad():
            outs.append(drop(hidden_states=x, attention_mask=None))
    both = [torch.empty_like(outs[0]) for _ in range(2)]
    dist.all_gather(both, outs[0], group=parallel_state.get_tensor_model_parallel_group())
    states = tensor_parallel.get_cuda_rng_tracker().get_states()
    mp_state = states["model-parallel-rng"]
    mp_states = [torch.empty_like(mp_state) for _ in range(2)]
    dist.all_gather(mp_states, mp_state, group=parallel_state.get_tensor_model_parallel_group())
    result["dropout"] = {
        "repeat_err": (outs[0] - outs[1]).abs().max().item(),
        "tp_ranks_err": (both[0] - both[1]).abs().max().item(),
        "vs_no_dropout": (outs[0] - y).abs().max().item(),
        "mp_streams_differ": not torch.equal(mp_states[0], mp_states[1]),
        "tracker": type(tensor_parallel.get_cuda_rng_tracker()).__name__,
    }
    return result


def pipeline_parallel(num_microbatches: int) -> dict:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from _common import FFN, HEADS, LAYERS
    from bionemo_scale.model.specs import make_transformer_config
    from bionemo_scale.parallel import destroy_distributed, init_distributed

    TinySetModel = make_tiny_set_model_class()
    in_dim, out_dim = 12, 5
    g = torch.Generator().manual_seed(3)
    microbatches = [
        {"x": torch.randn(BATCH, SET, in_dim, generator=g), "y": torch.randn(BATCH, SET, out_dim, generator=g)}
        for _ in range(num_microbatches)
    ]

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["x"])

        def loss_func(output_tensor: torch.Tensor):
            loss = torch.nn.functional.mse_loss(output_tensor, batch["y"])
            return loss, {"loss": loss.detach()}

        return output, loss_func

    def run(model) -> list[float]:
        fb = get_forward_backward_func()
        losses = fb(
            forward_step_func=forward_step,
            data_iterator=iter(microbatches),
            model=[model],
            num_microbatches=num_microbatches,
            seq_length=SET,
            micro_batch_size=BATCH,
            forward_only=False,
        )
        return [d["loss"].item() for d in losses]

    init_distributed(1, 1, seed=SEED)
    ref = TinySetModel(make_transformer_config(HIDDEN, LAYERS, HEADS, FFN, 1, 1), in_dim, out_dim)
    ref_losses = run(ref)
    full = {n: p.detach().clone() for n, p in ref.named_parameters()}
    grads_ref = {n: p.grad.clone() for n, p in ref.named_parameters()}

    destroy_distributed(process_group=False)
    init_distributed(1, 2, seed=SEED)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    config = make_transformer_config(HIDDEN, LAYERS, HEADS, FFN, 1, 2)
    model = TinySetModel(
        config,
        in_dim,
        out_dim,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    names = {n: global_layer_name(model, n) for n, _ in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(full[names[n]])
    losses = run(model)
    return {
        "pp_rank": pp_rank,
        "losses": losses,
        "ref_losses": ref_losses,
        "params": sorted(names.values()),
        "grad_err": {names[n]: (p.grad - grads_ref[names[n]]).abs().max().item() for n, p in model.named_parameters()},
        "grad_scale": max(g.abs().max().item() for g in grads_ref.values()),
    }


if __name__ == "__main__":
    quiet()
    args = parse_args(mode="tp", microbatches=3)
    if args.mode == "equivariance":
        save_result(args.out, equivariance())
    elif args.mode == "tp":
        save_result(args.out, tensor_parallel())
    elif args.mode == "pp":
        save_result(args.out, pipeline_parallel(args.microbatches))
    else:
        raise SystemExit(f"unknown mode {args.mode}")
    finish()
