"""Shared helpers of model_step.py, throughput.py and _state_runner.py.

Standard library only at import time: the STATE side runs in `.venv-bench` (numpy 2, no
bionemo_scale) and imports this file too. psutil and matplotlib are imported lazily. What the
loader benchmarks need as well (logging, `Summary`, number formatting, tables, JSON, charts,
the ru_maxrss fork wrapper, package versions, timing of batches) lives in `_common.py` and is
imported from there.

What is here, and why:
- `Summary`: median and IQR, the statistics every table reports.
- `machine_load`: other engineers share this 2-core machine; every timing records the load.
- `Worker` / `serve`: persistent worker processes driven over stdin/stdout, so that our model
  and STATE can be timed in alternating repeats (shared noise) without paying Python/torch
  start-up for every repeat.
- `run_measured`: a child process with its exact peak RSS (ru_maxrss through a tiny fork
  wrapper), sampled anonymous / file-backed RSS, and time-stamped output lines (training
  progress is read from them).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
from _common import (  # noqa: F401 - re-exported for model_step.py, throughput.py, _state_runner.py
    bench_main,
    fmt_num,
    logger,
    markdown_table,
    read_peak_rss_mb,
    rusage_command,
    setup_logging,
    time_spec_batches,
    versions,
    warm_page_cache,
    write_json,
)

RESULT_MARKER = "@@BENCH@@ "
REPO = Path(__file__).resolve().parents[1]
BENCH_PYTHON = REPO / ".venv-bench" / "bin" / "python"
STATE_BIN = REPO / ".venv-bench" / "bin" / "state"
STATE_RUNNER = Path(__file__).resolve().parent / "_state_runner.py"
#: The model size every spec carries (see `model_sizes`); the keywords of `state_model_overrides`.
MODEL_SIZE_KEYS = ("hidden", "layers", "heads", "ffn", "set_size", "batch_sets")


def thread_env(threads: int, wait_policy: str | None = None) -> dict[str, str]:
    """Environment pinning every BLAS/OpenMP pool to `threads` (torch reads OMP_NUM_THREADS).

    `wait_policy` sets OMP_WAIT_POLICY. With libgomp's default, idle threads spin; when another
    process holds one of the two cores, a 2-thread torch step then waits a scheduler slice at
    every parallel region (measured: ScaleModel 5.6 s/step instead of 0.48 s; PASSIVE: 0.48 s).
    """
    env = dict(os.environ)
    env.update({k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy.upper()
    else:
        env.pop("OMP_WAIT_POLICY", None)  # unset means libgomp's default, whatever the caller's shell had
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONPATH", None)  # nothing of one venv may leak into the other
    return env


# -- command line ------------------------------------------------------------------------------
def bench_parser(doc: str) -> argparse.ArgumentParser:
    """Parser of a benchmark script: first paragraph of `doc` as description, all after the second as epilog."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_model_size_args(ap: argparse.ArgumentParser) -> None:
    """--hidden, --layers, --heads, --set-size, --batch-sets (the MLP is 4×hidden, see `model_sizes`)."""
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--set-size", type=int, default=64)
    ap.add_argument("--batch-sets", type=int, default=8)


def model_sizes(args: argparse.Namespace) -> dict[str, int]:
    """The model size of `add_model_size_args`, keyed by MODEL_SIZE_KEYS."""
    return {
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "ffn": 4 * args.hidden,
        "set_size": args.set_size,
        "batch_sets": args.batch_sets,
    }


def default_out(args: argparse.Namespace, name: str) -> None:
    """`args.out` defaults to bench_out/NAME, or bench_out/NAME_quick with --quick."""
    if args.out is None:
        args.out = str(REPO / "bench_out" / (f"{name}_quick" if args.quick else name))


# -- STATE's configuration ---------------------------------------------------------------------
def state_model_overrides(
    *, hidden: int, layers: int, heads: int, ffn: int, set_size: int, batch_sets: int
) -> list[str]:
    """Hydra overrides giving `state tx train`'s `model=state` our benchmark size; nothing else.

    head_dim = hidden / heads and a 4×hidden MLP keep STATE's own proportions (state.yaml
    768/12/64/3072, state_sm.yaml 672/8/84/2688). Not set, i.e. STATE's defaults: energy loss
    (blur 0.05), predict_residual, 1-layer encoders and output MLP, Adam lr 1e-4, gradient clip
    10, one-hot perturbations, bidirectional LLaMA without positional embeddings.
    """
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
    bk = "model.kwargs.transformer_backbone_kwargs"
    return [
        "model=state",
        f"model.kwargs.cell_set_len={set_size}",
        f"model.kwargs.hidden_dim={hidden}",
        f"{bk}.num_hidden_layers={layers}",
        f"{bk}.num_attention_heads={heads}",
        f"{bk}.num_key_value_heads={heads}",
        f"{bk}.head_dim={hidden // heads}",
        f"{bk}.intermediate_size={ffn}",
        f"training.batch_size={batch_sets}",
    ]


# -- statistics --------------------------------------------------------------------------------
class Summary(_common.Summary):
    """Median and inter-quartile range of repeated measurements, NaN values left out."""

    @classmethod
    def of(cls, values: Iterable[float]) -> Summary:
        return super().of([v for v in values if v == v])


def fmt_ratio(x: float) -> str:
    return "–" if x is None or x != x else f"{x:.2f}×"


# -- machine state -----------------------------------------------------------------------------
def machine_load() -> dict[str, float]:
    """1, 5 and 15-min load averages and CPU pressure: other work on the machine skews timings."""
    return _common.machine_load(all_averages=True)


def proc_memory_mb(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of one process from /proc (MB).

    RssFile is the resident part of file mappings (our SCDL memmap, h5 files read through
    mmap, shared libraries): page cache the kernel can drop. RssAnon is what cannot be dropped.
    """
    out: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return out


class MemSampler:
    """Samples the memory of a process tree in a thread (largest process); keeps peaks and a thinned trace."""

    def __init__(self, root_pid: int, poll_s: float = 0.1, t0: float | None = None) -> None:
        self.root_pid = root_pid
        self.poll_s = poll_s
        self.t0 = time.perf_counter() if t0 is None else t0
        self.peak = {"VmRSS": 0.0, "RssAnon": 0.0, "RssFile": 0.0}
        self.trace: list[tuple[float, float, float, float]] = []  # (t, rss, anon, file)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _pids(self) -> list[int]:
        try:
            import psutil

            root = psutil.Process(self.root_pid)
            return [root.pid, *(p.pid for p in root.children(recursive=True))]
        except Exception:  # the tree may vanish at any time
            return [self.root_pid]

    def _run(self) -> None:
        last_trace = -1.0
        while not self._stop.is_set():
            # max, not sum, over the tree: forked helpers share copy-on-write pages with their parent
            tot = {"VmRSS": 0.0, "RssAnon": 0.0, "RssFile": 0.0}
            for pid in self._pids():
                mem = proc_memory_mb(pid)
                for k in tot:
                    tot[k] = max(tot[k], mem.get(k, 0.0))
            if tot["VmRSS"]:
                for k, v in tot.items():
                    self.peak[k] = max(self.peak[k], v)
                now = time.perf_counter() - self.t0
                if now - last_trace >= 1.0:
                    self.trace.append(
                        (round(now, 2), round(tot["VmRSS"], 1), round(tot["RssAnon"], 1), round(tot["RssFile"], 1))
                    )
                    last_trace = now
            self._stop.wait(self.poll_s)

    def start(self) -> MemSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# -- child processes ---------------------------------------------------------------------------
@dataclass
class ChildRun:
    """A finished child: exit code, wall time, memory, and its output lines with time stamps."""

    returncode: int
    wall_s: float
    peak_rss_mb: float  # exact ru_maxrss of the command (fork wrapper, see run_measured)
    peak_anon_mb: float  # sampled max of RssAnon of the largest process in the tree
    peak_file_mb: float  # sampled max of RssFile (page cache of mapped files), likewise
    lines: list[tuple[float, str]]  # (seconds since start, text) split on \n, \r and rich's erase-line
    trace: list[tuple[float, float, float, float]] = field(default_factory=list)
    load_before: dict[str, float] = field(default_factory=dict)
    load_after: dict[str, float] = field(default_factory=dict)
    timed_out: bool = False

    def first(self, pattern: str) -> float | None:
        """Time at which `pattern` (a substring) first appeared in the output."""
        return next((t for t, s in self.lines if pattern in s), None)

    def tail(self, n: int = 15) -> str:
        return "\n".join(s for _, s in self.lines[-n:])


_LINE_BREAK = re.compile(rb"[\r\n]|\x1b\[2K")  # rich redraws its progress bar after an erase-line code


def run_measured(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    log_path: Path | None = None,
    timeout_s: float = 1800.0,
    poll_s: float = 0.1,
) -> ChildRun:
    """Run `cmd` with stdout+stderr merged, time-stamping every output line (also \\r updates).

    Linux keeps ru_maxrss across fork+exec, so a child forked from this (possibly large)
    process would report our peak; the command is therefore forked by a ~10 MB wrapper
    (`_common.rusage_command`) whose wait4() gives the command's own peak RSS.
    """
    with tempfile.TemporaryDirectory() as tmp:
        usage_path = Path(tmp) / "rusage.json"
        wrapped = rusage_command(cmd, usage_path)
        load_before = machine_load()
        t0 = time.perf_counter()
        # A session of its own, so a timeout can stop the wrapper and the command it forked together.
        proc = subprocess.Popen(
            wrapped, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        sampler = MemSampler(proc.pid, poll_s=poll_s, t0=t0).start()
        lines: list[tuple[float, str]] = []
        if log_path:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("w") if log_path else None
        if log:
            log.write("$ " + " ".join(map(str, cmd)) + "\n")
        expired = threading.Event()

        def stop_child() -> None:
            expired.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group of our own child, by its id

        killer = threading.Timer(timeout_s, stop_child)
        killer.start()
        try:
            buf = b""
            assert proc.stdout is not None
            while True:
                chunk = proc.stdout.read1(65536)
                if not chunk:
                    break
                now = time.perf_counter() - t0
                if log:
                    log.write(chunk.decode("utf-8", "replace"))
                buf += chunk
                parts = _LINE_BREAK.split(buf)
                buf = parts.pop()
                lines += [(now, p.decode("utf-8", "replace")) for p in parts if p.strip()]
            if buf.strip():
                lines.append((time.perf_counter() - t0, buf.decode("utf-8", "replace")))
            returncode = proc.wait()
        finally:
            killer.cancel()
            sampler.stop()
            if log:
                log.close()
        wall = time.perf_counter() - t0
        peak_rss_mb = read_peak_rss_mb(usage_path)
    return ChildRun(
        returncode=returncode,
        wall_s=wall,
        peak_rss_mb=peak_rss_mb,
        peak_anon_mb=sampler.peak["RssAnon"] or float("nan"),
        peak_file_mb=sampler.peak["RssFile"] or float("nan"),
        lines=lines,
        trace=sampler.trace,
        load_before=load_before,
        load_after=machine_load(),
        timed_out=expired.is_set(),
    )


# -- persistent workers ------------------------------------------------------------------------
class WorkerError(RuntimeError):
    pass


class Worker:
    """A child that answers one JSON request per line with one marked JSON line on stdout.

    Library chatter on stdout (STATE prints its whole module tree) is skipped: only lines that
    start with RESULT_MARKER are answers. stderr goes to a log file.
    """

    def __init__(self, name: str, cmd: Sequence[str], env: dict[str, str], log_path: Path, cwd: Path = REPO) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._err = log_path.open("w")
        self._err.write("$ " + " ".join(map(str, cmd)) + "\n")
        self._err.flush()
        self.proc = subprocess.Popen(
            list(cmd),
            env=env,
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            bufsize=1,
        )
        self.pid = self.proc.pid

    def _read_answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(RESULT_MARKER):
                ans = json.loads(line[len(RESULT_MARKER) :])
                if "error" in ans:
                    raise WorkerError(f"{self.name}: {ans['error']}")
                return ans
        code = self.proc.wait()
        tail = "".join(self.log_path.read_text().splitlines(keepends=True)[-25:])
        raise WorkerError(f"{self.name} exited with code {code} before answering; {self.log_path}:\n{tail}")

    def ready(self) -> dict[str, Any]:
        """The worker's first answer (sent once its model and inputs are built)."""
        return self._read_answer()

    def request(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read_answer()

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.request(op="quit")
        except (WorkerError, BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by its handle
        self._err.close()


def answer(obj: dict[str, Any]) -> None:
    """Worker side: print one marked JSON answer."""
    sys.stdout.write(RESULT_MARKER + json.dumps(obj, default=float) + "\n")
    sys.stdout.flush()


def serve(ready: dict[str, Any], handlers: dict[str, Callable[..., dict[str, Any]]]) -> None:
    """Worker side: announce `ready`, then answer requests from stdin until 'quit'."""
    answer(ready)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        op = req.pop("op")
        if op == "quit":
            answer({"ok": True})
            return
        try:
            answer(handlers[op](**req))
        except Exception as exc:  # reported to the parent, which stops
            logger.exception("request %s failed", op)
            answer({"error": f"{type(exc).__name__}: {exc}"})


def parse_answer(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    raise WorkerError("the worker printed no result line")


def time_iterations(fn: Callable[[int], Any], iters: int, warmup: int = 0) -> dict[str, Any]:
    """Run fn(i) `warmup` untimed then `iters` timed times; per-iteration wall and CPU seconds.

    CPU seconds are the process's (all threads): cells per CPU-second moves far less than
    cells per wall-second when other work competes for the two cores.
    """
    for i in range(warmup):
        fn(i)
    wall, cpu = [], []
    load0 = machine_load()
    for i in range(iters):
        c0, w0 = time.process_time(), time.perf_counter()
        fn(warmup + i)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {"wall_s": wall, "cpu_s": cpu, "load_before": load0, "load_after": machine_load()}


# -- step clocks -------------------------------------------------------------------------------
_BAR = re.compile(r"(\d+)/(\d+)(?: \[|\s+\d+:\d\d)")  # tqdm '27/60 [00:30' or rich '27/60 0:00:30'
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def progress_bar_steps(lines: Sequence[tuple[float, str]], prefix: str = "Epoch") -> list[tuple[float, int]]:
    """(time, step) from Lightning's training bar, tqdm ('Epoch 0:  45%|..| 27/60 [00:30<..') or rich.

    The bar is redrawn after every batch (refresh rate 1), so the arrival time of 'k/N' is the
    wall clock at the end of optimizer step k, as seen from outside.
    """
    out: list[tuple[float, int]] = []
    epoch_base, last_raw, last_epoch = 0, -1, None
    for t, text in lines:
        s = _ANSI.sub("", text).strip()
        if not s.startswith(prefix):
            continue
        m = _BAR.search(s)
        if not m:
            continue
        epoch = s.split(":", 1)[0].split("/", 1)[0]
        k = int(m.group(1))
        if last_epoch is not None and epoch != last_epoch:
            epoch_base += max(last_raw, 0)
        last_epoch = epoch
        if k != last_raw:
            out.append((t, epoch_base + k))
            last_raw = k
    return out


def windowed_rates(
    stamps: Sequence[tuple[float, int]], skip_steps: int, windows: int, cells_per_step: int
) -> dict[str, Any]:
    """Cells/s over `windows` consecutive, equal step windows after `skip_steps` warm-up steps.

    Every window rate = cells in its steps / wall time between its first and last stamp, so
    start-up, the first (compiling, cache-filling) steps and the final checkpoint are excluded.
    """
    pts = sorted({s: t for t, s in stamps}.items())  # step -> first time seen
    pts = [(s, t) for s, t in pts if s >= skip_steps]
    if len(pts) < 2:
        return {"rates": [], "steps_timed": 0, "step_s": []}
    n = len(pts) - 1
    windows = max(1, min(windows, n))
    bounds = [round(i * n / windows) for i in range(windows + 1)]
    rates, step_s = [], []
    for a, b in itertools.pairwise(bounds):
        (s0, t0), (s1, t1) = pts[a], pts[b]
        if s1 > s0 and t1 > t0:
            rates.append(cells_per_step * (s1 - s0) / (t1 - t0))
            step_s.append((t1 - t0) / (s1 - s0))
    return {"rates": rates, "steps_timed": pts[-1][0] - pts[0][0], "step_s": step_s}


# -- output ------------------------------------------------------------------------------------
def bench_versions() -> dict[str, str]:
    """Versions inside .venv-bench (asked through its own interpreter)."""
    pkgs = ("arc-state", "cell-load", "torch", "lightning", "transformers", "geomloss", "numpy", "anndata", "h5py")
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import _bench_util as u, json; "
    code += f"print(json.dumps(u.versions({pkgs!r})))"
    res = subprocess.run([str(BENCH_PYTHON), "-c", code], capture_output=True, text=True, check=False)
    return json.loads(res.stdout) if res.returncode == 0 else {"error": res.stderr[-300:]}


#: `_common.bar_chart` in the size and small type of the model benchmarks' charts, linear by default.
bar_chart = functools.partial(_common.bar_chart, log=False, size=(6.5, 1.9, 2.0, 4.6), small_text=True)
