"""Launch a worker script under torchrun (gloo on CPU) and collect what each rank saved.

Workers live in tests/parallel/workers/. Each takes `--out DIR` (plus its own arguments) and
saves its result with `workers/_common.save_result` (one torch.save file per rank), so pytest
asserts on real tensors. On a non-zero exit or a timeout the combined stdout/stderr of all
ranks is raised with the assertion, so a failing worker shows its traceback in the report.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKERS = REPO_ROOT / "tests" / "parallel" / "workers"
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
_PORT_CLASH = ("EADDRINUSE", "address already in use", "Address already in use")


def free_port() -> int:
    """A TCP port that was free a moment ago (the launcher retries if another process wins it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The workers' environment: the repo's src first, one BLAS thread per rank (2-core CI)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    env.update(extra or {})
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, float]:
    start = time.monotonic()
    with tempfile.TemporaryFile(mode="w+") as log:
        # Output goes to a file, not a pipe, so that a straggling grandchild holding the pipe
        # cannot stall us; a new session lets us kill torchrun, its workers and any such
        # straggler afterwards, by this group's id only.
        proc = subprocess.Popen(
            cmd, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout)
            note = ""
        except subprocess.TimeoutExpired:
            code, note = -1, f"\n[_torchrun] killed after {timeout:.0f} s timeout"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.seek(0)
        return code, log.read() + note, time.monotonic() - start


def run_torchrun(
    worker: str,
    nproc: int,
    out_dir: Path,
    *args: str,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    expect_failure: bool = False,
) -> list[Any]:
    """Run tests/parallel/workers/<worker> on `nproc` ranks; return each rank's saved result.

    With `expect_failure`, returns the combined output (a one-element list) of a run that must
    exit non-zero instead.
    """
    script = WORKERS / worker
    out_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            str(script),
            "--out",
            str(out_dir),
            *args,
        ]
        code, output, seconds = _run(cmd, worker_env(env), timeout)
        if code != 0 and attempt < 2 and any(s in output for s in _PORT_CLASH):
            continue  # another process took the port between free_port() and torchrun's bind
        break
    if expect_failure:
        assert code != 0, f"{worker} was expected to fail but exited 0:\n{output[-4000:]}"
        return [output]
    assert code == 0, f"{worker} on {nproc} ranks exited {code} after {seconds:.0f} s:\n{output[-12000:]}"
    results = []
    for rank in range(nproc):
        path = out_dir / f"rank{rank}.pt"
        assert path.exists(), f"{worker}: rank {rank} saved no result\n{output[-6000:]}"
        results.append(torch.load(path, weights_only=False))
    return results


def run_python(
    worker: str,
    out_dir: Path,
    *args: str,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    expect_failure: bool = False,
) -> Any:
    """Run a worker as one plain process (no torchrun variables); return its saved result.

    With `expect_failure`, returns the output of a run that must exit non-zero instead.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in worker_env(env).items() if k not in _TORCHRUN_VARS}
    cmd = [sys.executable, str(WORKERS / worker), "--out", str(out_dir), *args]
    code, output, seconds = _run(cmd, clean, timeout)
    if expect_failure:
        assert code != 0, f"{worker} was expected to fail but exited 0:\n{output[-4000:]}"
        return output
    assert code == 0, f"{worker} exited {code} after {seconds:.0f} s:\n{output[-12000:]}"
    return torch.load(out_dir / "rank0.pt", weights_only=False)
