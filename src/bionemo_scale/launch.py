"""`bionemo-scale launch`: run a recipe under torchrun locally, or as a Slurm batch job.

The Slurm script follows the NGC/DGX conventions BioNeMo uses: one task per GPU via `srun`,
the container image through pyxis/enroot flags, NCCL settings for InfiniBand, and
MASTER_ADDR/MASTER_PORT taken from the first node of the allocation.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from bionemo_scale.errors import ScaleError

#: The Slurm job runs `bionemo-scale` inside this image, so it must be one built from this
#: repository's Dockerfile and pushed where the cluster can pull it; no public image has the
#: package, so there is no default.
IMAGE_FIX = "build the Dockerfile, push it where the cluster can pull it, and pass --image REGISTRY/bionemo-scale:TAG"
SPLIT_COL = "split-col"  # --split value that is not a path
#: Slurm's --time forms: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (and UNLIMITED)
SLURM_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|UNLIMITED|infinite)$")


def _abspath(path: str) -> str:
    return str(Path(path).expanduser().resolve())


@dataclass
class LaunchSpec:
    recipe: str
    nodes: int
    gpus_per_node: int
    data: str
    split: str
    output: str
    overrides: list[str] = field(default_factory=list)
    job_name: str = "bionemo-scale"
    partition: str | None = None
    account: str | None = None
    time: str = "04:00:00"
    image: str | None = None
    mounts: list[str] = field(default_factory=list)
    master_port: int = 29500

    def validate(self) -> None:
        """Check the layout against the recipe *with the overrides applied*, before anything runs.

        TP/PP may come from an override (e.g. `trainer.tensor_model_parallel_size=2` on the CPU
        recipe), and a bad override key or value must fail here, not on the cluster.
        """
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ScaleError("--nodes and --gpus-per-node must be >= 1", "pass positive counts")
        if not SLURM_TIME.match(self.time):
            raise ScaleError(f"--time {self.time!r} is not a Slurm time limit", "write e.g. 04:00:00, 90 or 2-00:00:00")
        for mount in self.mounts:
            src, sep, dst = mount.partition(":")
            if not (sep and src and dst):
                raise ScaleError(f"--mount {mount!r} is not SRC:DST", "write e.g. --mount /lustre/refs:/refs")
        # data/split/output are not checked here: under Slurm they are paths on the cluster
        from bionemo_scale.config import apply_overrides
        from bionemo_scale.recipes import get_recipe

        cfg = get_recipe(self.recipe)
        tp, pp = cfg.trainer.tensor_model_parallel_size, cfg.trainer.pipeline_model_parallel_size
        for item in self.overrides:
            key, _, raw = item.partition("=")
            key = key.strip()
            if key in ("trainer.tensor_model_parallel_size", "trainer.pipeline_model_parallel_size"):
                try:
                    value = int(raw)
                except ValueError:
                    continue  # apply_overrides below reports the bad value
                tp, pp = (value, pp) if key.endswith("tensor_model_parallel_size") else (tp, value)
        world = self.nodes * self.gpus_per_node
        if tp >= 1 and pp >= 1 and world % (tp * pp):
            raise ScaleError(
                f"{self.nodes} nodes × {self.gpus_per_node} GPUs = {world} is not a multiple of the recipe's "
                f"TP×PP = {tp}×{pp}",
                "change --nodes/--gpus-per-node or override trainer.tensor_model_parallel_size",
            )
        layout = [f"trainer.devices={self.gpus_per_node}", f"trainer.num_nodes={self.nodes}"]
        apply_overrides(cfg, [*layout, *self.overrides])  # unknown keys, bad values, shape errors

    def absolute(self) -> LaunchSpec:
        """The same spec with data/split/output as absolute paths (a container has another cwd)."""
        split = self.split if self.split == SPLIT_COL else _abspath(self.split)
        return replace(self, data=_abspath(self.data), split=split, output=_abspath(self.output))

    def train_args(self) -> list[str]:
        args = [
            "bionemo-scale",
            "train",
            "--recipe",
            self.recipe,
            "--data",
            self.data,
            "--split",
            self.split,
            "--output",
            self.output,
            f"trainer.devices={self.gpus_per_node}",
            f"trainer.num_nodes={self.nodes}",
        ]
        return args + list(self.overrides)


def torchrun_command(spec: LaunchSpec, nproc: int | None = None) -> list[str]:
    """Single-node torchrun (CPU processes or local GPUs)."""
    n = nproc or spec.gpus_per_node
    train = spec.train_args()
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        "-m",
        "bionemo_scale.cli",
        *train[1:],
    ]


def slurm_script(spec: LaunchSpec) -> str:
    """An sbatch script: one srun task per GPU, each running `bionemo-scale train`.

    Paths become absolute: the container starts in its own working directory, and the mounts
    (the parent directories of data, split and output) are bound at the same absolute paths.
    """
    if not spec.image:
        raise ScaleError("--image is required with --executor slurm (no public image has bionemo-scale)", IMAGE_FIX)
    spec = spec.absolute()
    header = [
        "#!/bin/bash",
        f"#SBATCH --job-name={spec.job_name}",
        f"#SBATCH --nodes={spec.nodes}",
        f"#SBATCH --ntasks-per-node={spec.gpus_per_node}",
        f"#SBATCH --gpus-per-node={spec.gpus_per_node}",
        "#SBATCH --exclusive",
        f"#SBATCH --time={spec.time}",
        f"#SBATCH --output={spec.output}/slurm-%j.out",
    ]
    if spec.partition:
        header.append(f"#SBATCH --partition={spec.partition}")
    if spec.account:
        header.append(f"#SBATCH --account={spec.account}")
    paths = [spec.output, spec.data] + ([] if spec.split == SPLIT_COL else [spec.split])
    dirs = sorted({str(Path(p).parent) for p in paths})
    mounts = ",".join([*spec.mounts, *(f"{d}:{d}" for d in dirs)])
    train = " ".join(shlex.quote(a) for a in spec.train_args())
    # Each task maps Slurm's ids to torch's; the whole inner command is quoted once, so that
    # arguments with spaces or quotes survive, and $SLURM_* expand inside the task.
    task = shlex.quote(f"export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID; exec {train}")
    body = f"""
set -euo pipefail
mkdir -p {shlex.quote(spec.output)}

# Rendezvous: the first node of the allocation hosts the TCP store.
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT={spec.master_port}
export WORLD_SIZE=$((SLURM_NNODES * SLURM_NTASKS_PER_NODE))

# NCCL on DGX/InfiniBand; CUDA_DEVICE_MAX_CONNECTIONS=1 lets TP comm overlap compute. The tasks
# are not bound to CPUs (--cpu-bind=none): each rank's data workers share the exclusive node's cores.
export NCCL_IB_DISABLE=0
export NCCL_IB_HCA=${{NCCL_IB_HCA:-mlx5}}
export NCCL_SOCKET_IFNAME=${{NCCL_SOCKET_IFNAME:-^lo,docker}}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_NCCL_AVOID_RECORD_STREAMS=1
export CUDA_DEVICE_MAX_CONNECTIONS=1
export PYTHONUNBUFFERED=1

srun --container-image={shlex.quote(spec.image)} \\
     --container-mounts={shlex.quote(mounts)} \\
     --no-container-mount-home \\
     --kill-on-bad-exit=1 \\
     --cpu-bind=none \\
     bash -c {task}
"""
    return "\n".join(header) + "\n" + body


def launch(spec: LaunchSpec, executor: str, dry_run: bool) -> int:
    spec.validate()
    if executor == "local":
        if spec.nodes != 1:
            raise ScaleError(
                f"the local executor runs on one node, not {spec.nodes}", "use --nodes 1, or --executor slurm"
            )
        if not dry_run:  # local paths: check them here, or every rank fails and torchrun adds its traceback
            from bionemo_scale.data.store import ProcessedDataset

            ProcessedDataset(spec.data)
            if spec.split != SPLIT_COL and not Path(spec.split).is_file():
                raise ScaleError(
                    f"split file {spec.split} does not exist", "pass an existing TOML split, or 'split-col'"
                )
        cmd = torchrun_command(spec)
        print(" ".join(shlex.quote(c) for c in cmd))
        return 0 if dry_run else subprocess.call(cmd)
    if executor == "slurm":
        script = slurm_script(spec)
        if dry_run:
            print(script)
            return 0
        sbatch = shutil.which("sbatch")
        if sbatch is None:
            raise ScaleError("sbatch is not on PATH", "run on a Slurm login node, or use --dry-run to print the script")
        out = Path(spec.output)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "launch.sbatch"
        path.write_text(script)
        return subprocess.call([sbatch, str(path)])
    raise ScaleError(f"unknown executor '{executor}'", "use local or slurm")
