"""Helpers shared by the torchrun workers (imported as a sibling module, not via `tests`)."""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch


def quiet() -> None:
    """Keep worker output to what matters: megatron/NeMo warn loudly about missing apex/TE."""
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)


def parse_args(**extra: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    for name, default in extra.items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    return parser.parse_args()


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def save_result(out_dir: Path, obj: Any) -> None:
    """Save this rank's result where tests/_torchrun.run_torchrun looks for it."""
    path = Path(out_dir) / f"rank{rank()}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


# Block shape used by the parity tests: hidden 64, 4 heads, 2 layers, a set of 16 tokens.
HIDDEN, HEADS, LAYERS, FFN, SET, BATCH = 64, 4, 2, 128, 16, 2


def build_block(tp: int = 1, pp: int = 1, pre_process: bool = True, post_process: bool = True, **cfg: Any):
    from megatron.core.transformer.transformer_block import TransformerBlock

    from bionemo_scale.model.specs import get_layer_spec, make_transformer_config

    config = make_transformer_config(HIDDEN, LAYERS, HEADS, FFN, tp, pp, **cfg)
    return TransformerBlock(config, spec=get_layer_spec("local"), pre_process=pre_process, post_process=post_process)


def make_tiny_set_model_class():
    """A toy MegatronModule shaped like SCALE: encoder on the first stage, head on the last.

    Built lazily so that importing _common does not import megatron.
    """
    from megatron.core.enums import ModelType
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_block import TransformerBlock

    from bionemo_scale.model.specs import get_layer_spec

    class TinySetModel(MegatronModule):
        def __init__(self, config, in_dim: int, out_dim: int, pre_process: bool = True, post_process: bool = True):
            super().__init__(config=config)
            self.model_type = ModelType.encoder_or_decoder
            self.pre_process, self.post_process = pre_process, post_process
            self.share_embeddings_and_output_weights = False
            if pre_process:
                self.embed = torch.nn.Linear(in_dim, config.hidden_size, bias=False)
            self.block = TransformerBlock(
                config, spec=get_layer_spec("local"), pre_process=pre_process, post_process=post_process
            )
            if post_process:
                self.head = torch.nn.Linear(config.hidden_size, out_dim, bias=False)

        def set_input_tensor(self, input_tensor) -> None:
            if isinstance(input_tensor, list):
                input_tensor = input_tensor[0]
            self.block.set_input_tensor(input_tensor)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """[B, S, in] -> [B, S, out] on the last stage, else the [S, B, H] activation."""
            hidden = self.embed(x).transpose(0, 1).contiguous() if self.pre_process else None
            hidden = self.block(hidden_states=hidden, attention_mask=None)
            return self.head(hidden).transpose(0, 1) if self.post_process else hidden

    return TinySetModel


def global_layer_name(model: torch.nn.Module, name: str) -> str:
    """Rename a stage-local `...layers.<i>.` parameter to its global layer index (PP > 1)."""
    parts = name.split(".")
    if "layers" not in parts:
        return name
    i = parts.index("layers")
    module = model
    for part in parts[: i + 2]:
        module = getattr(module, part) if not part.isdigit() else module[int(part)]
    parts[i + 1] = str(module.layer_number - 1)
    return ".".join(parts)


def finish() -> None:
    """Exit at once after the result is saved: tearing down a NeMo/megatron interpreter takes
    3-5 s per rank, which is most of a small test's wall time. Every collective is done by now.

    Not for a worker that saved a megatron dist checkpoint: its writer's spawn Manager (and
    multiprocessing's resource tracker) would be orphaned instead of shut down at exit.
    """
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
