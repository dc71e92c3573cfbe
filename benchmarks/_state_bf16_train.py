"""`state tx train` under Lightning's bf16 mixed precision; runs in the comparison venv.

    .venv-bench/bin/python benchmarks/_state_bf16_train.py tx train KEY=VALUE ...

The equal-precision peer of our `trainer.autocast=bf16` training rows in throughput.py. STATE's
CLI builds its Lightning Trainer without a precision (float32 weights and matmuls, with torch's
'medium' float32 matmul precision) and has no setting for one, so this script passes
precision="bf16-mixed" to that Trainer and then runs the CLI unchanged. On CPU Lightning's
bf16-mixed is torch's bf16 autocast around each training step, with float32 weights: the same
arithmetic as ours under `trainer.autocast=bf16`.
"""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl

_trainer_init = pl.Trainer.__init__


def _bf16_trainer_init(self: pl.Trainer, *args: Any, **kwargs: Any) -> None:
    kwargs["precision"] = "bf16-mixed"
    _trainer_init(self, *args, **kwargs)


if __name__ == "__main__":
    pl.Trainer.__init__ = _bf16_trainer_init
    from state.__main__ import main

    sys.argv = ["state", *sys.argv[1:]]
    sys.exit(main())
