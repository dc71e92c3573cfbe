"""`state tx predict` with STATE's forward under bf16 autocast; runs in the comparison venv.

    .venv-bench/bin/python benchmarks/_state_bf16_predict.py tx predict ARGS...

The equal-precision peer of our `predict --autocast bf16` rows in throughput.py. `state tx predict`
runs its model in float32 and has no precision setting, so this script wraps the transition
model's `predict_step` in torch's bf16 autocast (float32 weights, bf16 matmuls: the arithmetic of
ours) and hands float32 tensors back to the CLI, which then runs unchanged. If no `predict_step`
ran under the wrapper, the script fails: a silent float32 run would pass for a bf16 one.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

CALLS = 0


def _float32(value: Any) -> Any:
    return value.float() if torch.is_tensor(value) and value.is_floating_point() else value


def main() -> int:
    from state.tx.models.state_transition import StateTransitionPerturbationModel as Model

    plain = Model.predict_step

    def predict_step(self: Model, *args: Any, **kwargs: Any) -> Any:
        global CALLS
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = plain(self, *args, **kwargs)
        CALLS += 1
        return {k: _float32(v) for k, v in out.items()} if isinstance(out, dict) else _float32(out)

    Model.predict_step = predict_step
    from state.__main__ import main as state_main

    sys.argv = ["state", *sys.argv[1:]]
    code = state_main()
    if CALLS == 0:
        print("_state_bf16_predict: no predict_step ran under bf16 autocast", file=sys.stderr)
        return 1
    print(f"_state_bf16_predict: {CALLS} predict_step calls under bf16 autocast", file=sys.stderr)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
