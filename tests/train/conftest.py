"""Real training runs, shared by the tests of this package (NeMo 2 Trainer + MegatronStrategy on CPU).

Every run goes through the `bionemo-scale` command line in a subprocess, one process or two
under torchrun (gloo), exactly as a user would launch it.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._torchrun import REPO_ROOT, free_port, worker_env

SPLIT = REPO_ROOT / "src" / "bionemo_scale" / "data" / "resources" / "norman_demo_split.toml"
FAST = [
    "trainer.val_check_interval=10",
    "checkpoint.every_n_train_steps=10",
    "eval.save_predictions=true",
]


def cli(
    *args: str, nproc: int = 1, timeout: float = 420, check: bool = True, quiet: bool = True
) -> subprocess.CompletedProcess:
    """Run `bionemo-scale ARGS` (under torchrun when nproc > 1); the log is in the result.

    `quiet=False` keeps the INFO log lines (and progress bars) that `-q` drops.
    """
    flags = ["-q"] if quiet else []
    if nproc == 1:
        cmd = [sys.executable, "-m", "bionemo_scale.cli", *flags, *args]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "bionemo_scale.cli", *flags, *args,
        ]  # fmt: skip
    env = worker_env({"OMP_NUM_THREADS": "1" if nproc > 1 else "2"})
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args[:1])} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-8000:]}")
    return proc


def read_losses(path: Path) -> list[tuple[int, float]]:
    with path.open() as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def tb_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar a run logged to TensorBoard: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def train_args(data: Path, out: Path, steps: int, *extra: str, recipe: str = "tiny_cpu") -> list[str]:
    return ["train", "--recipe", recipe, "--data", str(data), "--split", str(SPLIT), "--output", str(out),
            f"trainer.max_steps={steps}", *FAST, *extra]  # fmt: skip


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    from bionemo_scale.config import PreprocessConfig
    from bionemo_scale.data.bundled import bundled, resource_path
    from bionemo_scale.data.preprocess import preprocess

    spec = bundled("norman19_mcfaline23")
    cfg = PreprocessConfig(
        pert_col=spec.pert_col, control=spec.control, context_col=spec.context_col, dose_col=spec.dose_col
    )
    preprocess(resource_path(spec.filename), out, cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def base_run(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_cpu, one process, 30 steps: validation + checkpoints at 10, 20, 30.

    Its INFO log is kept beside the run, in `base_log(run)`, for the tests that read what it did.
    """
    out = tmp_path_factory.mktemp("runs") / "base"
    proc = cli(*train_args(demo_data, out, 30), quiet=False)
    base_log(out).write_text(proc.stdout + proc.stderr)
    return out


def base_log(run: Path) -> Path:
    return run.with_name(run.name + ".log")


@pytest.fixture(scope="session")
def release(base_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("release") / "scale_tiny"
    cli("export", str(base_run), str(out))
    return out


def kill_when(proc: subprocess.Popen, path: Path, min_rows: int, timeout: float = 300) -> int:
    """SIGKILL the whole process group once `path` has `min_rows` data rows; returns the rows seen."""
    start = time.monotonic()
    rows = 0
    while time.monotonic() - start < timeout:
        if path.exists():
            rows = max(0, len(path.read_text().splitlines()) - 1)
            if rows >= min_rows:
                break
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return rows


def reduced_precision_changes_matmuls() -> bool:
    """Whether torch's 'medium' float32 matmul precision changes products on this machine.

    It does on GPUs and on CPUs whose oneDNN kernels have bf16 (AMX, AVX512-BF16); elsewhere the
    setting is accepted but every product stays float32, so its numerical effect cannot be seen.
    """
    import torch

    from bionemo_scale.matmul_precision import float32_matmul_precision

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
    full = a @ b
    with float32_matmul_precision("medium"):
        reduced = a @ b
    return not torch.equal(full, reduced)
