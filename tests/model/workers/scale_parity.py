"""ScaleModel under TP=2 or PP=2 against the same full weights at TP=1/PP=1 (CPU, gloo).

--mode ref   one process: build the model from a seed, run megatron's no-pipelining schedule
             on 2 microbatches, save full weights, per-microbatch losses, outputs and grads.
--mode tp|pp two ranks: load those full weights into the sharded model, run the matching
             schedule on the same microbatches, and report the largest differences.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import warnings
from pathlib import Path

import torch

B, S, G, MICRO = 2, 8, 24, 2


def quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(MICRO):
        out.append(
            {
                "ctrl": torch.rand(B, S, G, generator=g),
                "pert": torch.rand(B, S, G, generator=g),
                "t": torch.rand(B, generator=g),
                "parts": torch.tensor([[0, 2], [1, -1]]),
                "dose": torch.tensor([1.0, 0.5]),
                "context_id": torch.tensor([0, 1]),
                "batch_id": torch.tensor([1, 0]),
                "prior": 0.3 * torch.randn(B, G, generator=g),
            }
        )
    return out


def build(tp: int, pp: int):
    from megatron.core import parallel_state

    from bionemo_scale.config import ScaleModelConfig
    from bionemo_scale.model.scale_model import ScaleModel
    from bionemo_scale.model.transformer_config import build_transformer_config
    from bionemo_scale.parallel import init_distributed

    init_distributed(tp, pp, seed=11)
    cfg = ScaleModelConfig(
        hidden_size=32,
        num_layers=2,
        num_attention_heads=4,
        encoder_hidden_size=48,
        n_genes=G,
        n_parts=3,
        n_contexts=2,
        n_batches=2,
    )
    tconfig = build_transformer_config(cfg, tp, pp)
    model = ScaleModel(
        tconfig,
        cfg,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    return model, cfg


def run_schedule(model) -> tuple[list[float], list[torch.Tensor]]:
    """Megatron's schedule for this PP size; returns the losses and x1_hat per microbatch."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from bionemo_scale.config import FlowConfig
    from bionemo_scale.model.objective import loss_terms

    flow = FlowConfig()
    losses, outputs = [], []

    def step(data_iterator, chunk):
        b = next(data_iterator)
        cond = {k: b[k] for k in ("parts", "dose", "context_id", "batch_id", "prior")}
        out = chunk(b["ctrl"], b["t"], cond, b["pert"])

        def loss_func(output):
            loss = loss_terms(output, b["ctrl"], b["pert"], flow)["loss"].mean()
            losses.append(float(loss))
            outputs.append(
                torch.cat(
                    [output.x1_hat.detach().flatten(), output.z1_hat.detach().flatten(), output.z0.detach().flatten()]
                )
            )
            return loss, {"loss": loss.detach()}

        return out, loss_func

    model.zero_grad(set_to_none=True)
    get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter(batches()),
        model=[model],
        num_microbatches=MICRO,
        seq_length=model.num_condition_tokens + 3 * S,
        micro_batch_size=B,
        forward_only=False,
    )
    return losses, outputs


@contextlib.contextmanager
def grads_as_data(model):
    """Temporarily swap each parameter's data with its grad, to read grads like weights."""
    saved = {}
    for p in model.parameters():
        if p.grad is not None:
            saved[p] = p.data
            p.data = p.grad
    try:
        yield
    finally:
        for p, data in saved.items():
            p.data = data


def main() -> None:
    quiet()
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mode", choices=["ref", "tp", "pp"], required=True)
    ap.add_argument("--ref", type=Path)
    args = ap.parse_args()

    from megatron.core import parallel_state

    from bionemo_scale.train.release import _pieces, _region, full_state, load_full_weights

    tp, pp = {"ref": (1, 1), "tp": (2, 1), "pp": (1, 2)}[args.mode]
    model, _ = build(tp, pp)
    rank = torch.distributed.get_rank()
    if args.mode == "ref":
        weights = full_state(model)
        losses, outputs = run_schedule(model)
        with grads_as_data(model):
            grads = full_state(model)
        torch.save({"weights": weights, "losses": losses, "outputs": outputs, "grads": grads}, args.out / "rank0.pt")
        return
    ref = torch.load(args.ref, weights_only=False)
    load_full_weights(model, ref["weights"])
    losses, outputs = run_schedule(model)
    grad_err, n_checked, sharded = {}, 0, 0
    with grads_as_data(model):
        for name, piece in _pieces(model):
            expected = _region(ref["grads"][name], piece)
            if tuple(expected.shape) != tuple(piece.global_shape[piece.prepend_axis_num :]):
                sharded += 1
            grad_err[name] = max(grad_err.get(name, 0.0), float((piece.data - expected).abs().max()))
            n_checked += 1
    result = {
        "rank": rank,
        "last_stage": parallel_state.is_pipeline_last_stage(),
        "loss_err": max((abs(a - b) for a, b in zip(losses, ref["losses"], strict=False)), default=None),
        "n_losses": len(losses),
        "out_err": max(
            (float((a - b).abs().max()) for a, b in zip(outputs, ref["outputs"], strict=False)), default=None
        ),
        "grad_err": grad_err,
        "grad_scale": max(float(g.abs().max()) for g in ref["grads"].values()),
        "n_checked": n_checked,
        "sharded_pieces": sharded,
        "n_params_local": sum(p.numel() for p in model.parameters()),
    }
    torch.save(result, args.out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
