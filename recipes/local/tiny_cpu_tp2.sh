#!/usr/bin/env bash
# Tensor parallelism on a laptop: the `tiny_cpu` recipe on 2 CPU processes (torchrun, gloo), TP=2.
#
#   make demo                              # once: preprocesses the bundled data into demo_out/data
#   recipes/local/tiny_cpu_tp2.sh          # 300 steps, a few minutes on 2 cores
#   recipes/local/tiny_cpu_tp2.sh trainer.max_steps=40 optim.lr=5e-4   # extra overrides go last
#
# Environment: PYTHON (default .venv/bin/python), DATA (default demo_out/data),
# SPLIT (default the packaged norman_demo_split.toml), OUT (default runs/tiny_cpu_tp2; an
# existing run directory with checkpoints is resumed).
#
# The same job through the launcher (it prints, then runs, the equivalent torchrun command):
#   bionemo-scale launch --recipe tiny_cpu --nodes 1 --gpus-per-node 2 --executor local \
#     --data demo_out/data --split src/bionemo_scale/data/resources/norman_demo_split.toml \
#     --output runs/tiny_cpu_tp2 trainer.tensor_model_parallel_size=2
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-demo_out/data}
SPLIT=${SPLIT:-src/bionemo_scale/data/resources/norman_demo_split.toml}
OUT=${OUT:-runs/tiny_cpu_tp2}

if [[ ! -d "$DATA" ]]; then
    echo "tiny_cpu_tp2.sh: no processed dataset at $DATA; run \`make demo\` first (or set DATA=...)" >&2
    exit 2
fi

# One thread per rank: two ranks on two cores, no oversubscription.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 \
    -m bionemo_scale.cli train \
    --recipe tiny_cpu \
    --data "$DATA" \
    --split "$SPLIT" \
    --output "$OUT" \
    trainer.accelerator=cpu \
    trainer.devices=2 \
    trainer.tensor_model_parallel_size=2 \
    "$@"
