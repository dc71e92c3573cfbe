"""Single-process checks of bionemo_scale.parallel (run as a plain subprocess, no torchrun).

Modes:
  checks  the shim is idempotent, maps CUDA devices to CPU, init/destroy/re-init work without
          torchrun (in-memory store), a second init with another layout is refused.
  step    a NeMo-free megatron training loop: DDP wrapper, plain megatron optimizer with grad
          clipping, forward_backward_func, dropout on (`--autocast 1`: the forward under CPU bf16
          autocast). With a patch skipped through
          BIONEMO_SCALE_CPU_SHIM_SKIP it must fail, which is how the tests prove each patch is needed.
"""

from __future__ import annotations

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


def checks() -> dict:
    from megatron.core import parallel_state, tensor_parallel

    from bionemo_scale import parallel
    from bionemo_scale.errors import ScaleError

    out: dict = {}
    out["first_install"] = parallel.install_cpu_shim()
    current_device, modes = torch.cuda.current_device, len(torch.overrides._get_current_function_mode_stack())
    out["second_install"] = parallel.install_cpu_shim()
    out["idempotent"] = (
        torch.cuda.current_device is current_device
        and len(torch.overrides._get_current_function_mode_stack()) == modes == 1
    )
    x = torch.ones(2)
    out["devices"] = [
        str(torch.zeros(1, device="cuda").device),
        str(torch.empty(1, device=torch.device("cuda", 0)).device),
        str(torch.tensor([1.0], device=torch.cuda.current_device()).device),
        str(x.to("cuda").device),
        str(x.cuda().device),
        str(x.to("cuda", torch.float64).dtype),
        str(torch.tensor(1.0, pin_memory=True).to("cuda", non_blocking=True).device),
    ]

    layout = parallel.init_distributed(1, 1, seed=7)
    out["layout"] = layout
    out["initialised"] = parallel_state.model_parallel_is_initialized() and torch.distributed.is_initialized()
    out["tracker_states"] = sorted(tensor_parallel.get_cuda_rng_tracker().get_states())
    out["reinit_same"] = parallel.init_distributed(1, 1, seed=7) == layout
    try:
        parallel.init_distributed(2, 1)
        out["bad_layout"] = None
    except ScaleError as exc:
        out["bad_layout"] = str(exc)

    parallel.destroy_distributed()
    out["destroyed"] = not parallel_state.model_parallel_is_initialized() and not torch.distributed.is_initialized()
    out["reinit_after_destroy"] = parallel.init_distributed(1, 1, seed=7) == layout
    parallel.destroy_distributed()
    return out


def step(steps: int, recompute: bool, autocast: bool = False) -> dict:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from bionemo_scale.model.specs import make_transformer_config
    from bionemo_scale.parallel import init_distributed, optimizer_device_flags

    init_distributed(1, 1, seed=11)
    # Full activation recomputation replays dropout through megatron's CheckpointFunction,
    # which saves and restores the RNG states (_get_cuda_rng_state/_set_cuda_rng_state).
    extra = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    config = make_transformer_config(
        HIDDEN, LAYERS, HEADS, FFN, hidden_dropout=0.1, attention_dropout=0.1, **(extra if recompute else {})
    )
    config.finalize_model_grads_func = finalize_model_grads
    model = make_tiny_set_model_class()(config, 12, 5)
    flags = optimizer_device_flags()
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=flags["use_distributed_optimizer"]), model
    )
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, clip_grad=0.5, **flags), [ddp])

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * BATCH, SET, 12, generator=g)
    y = torch.tanh(x @ torch.randn(12, 5, generator=g))

    def forward_step(data_iterator, model):
        xb, yb = next(data_iterator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # as `trainer.autocast=bf16`
            output = model(xb).float()
        return output, lambda out: (
            torch.nn.functional.mse_loss(out, yb),
            {"loss": torch.nn.functional.mse_loss(out, yb).detach()},
        )

    losses, norms = [], []
    for _ in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        batches = iter([(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)])
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=batches,
            model=[ddp],
            num_microbatches=len(x) // BATCH,
            seq_length=SET,
            micro_batch_size=BATCH,
            forward_only=False,
        )
        _, grad_norm, _ = optimizer.step()
        losses.append(torch.stack([d["loss"] for d in reduced]).mean().item())
        norms.append(float(grad_norm))
    return {"losses": losses, "grad_norms": norms, "optimizer": type(optimizer).__name__}


if __name__ == "__main__":
    quiet()
    args = parse_args(mode="checks", steps=4, recompute=0, autocast=0)
    if args.mode == "checks":
        save_result(args.out, checks())
    elif args.mode == "step":
        save_result(args.out, step(args.steps, bool(args.recompute), bool(args.autocast)))
    else:
        raise SystemExit(f"unknown mode {args.mode}")
    finish()
