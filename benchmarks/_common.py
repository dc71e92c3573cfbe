"""Shared helpers for the benchmark scripts: timing loops, RSS measurement, tables, JSON.

Standard library only at import time, so that the runners executed by the comparison venv
(numpy 2, no bionemo_scale) can import it too. matplotlib is imported lazily by `bar_chart`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks")

#: Marker that precedes the one JSON line a worker prints, so stray library output on stdout
#: (progress bars, warnings) cannot be mistaken for the result.
RESULT_MARKER = "@@RESULT@@ "


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


# -- statistics --------------------------------------------------------------------------------
@dataclass
class Summary:
    """Median and inter-quartile range of repeated measurements."""

    median: float
    q25: float
    q75: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q75 - self.q25

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        vals = sorted(float(v) for v in values)
        if not vals:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        if len(vals) == 1:
            return cls(vals[0], vals[0], vals[0], 1)
        q = statistics.quantiles(vals, n=4, method="inclusive")
        return cls(statistics.median(vals), q[0], q[2], len(vals))

    def to_json(self) -> dict[str, float]:
        return {**asdict(self), "iqr": self.iqr}


# -- timing ------------------------------------------------------------------------------------
@dataclass
class RepeatResult:
    batches: int
    cells: int
    seconds: float
    cpu_seconds: float = float("nan")  # process CPU time (all threads) during the repeat

    @property
    def cells_per_s(self) -> float:
        return self.cells / self.seconds if self.seconds > 0 else float("nan")

    @property
    def cells_per_cpu_s(self) -> float:
        """Throughput per CPU-second: insensitive to other processes competing for the cores."""
        return self.cells / self.cpu_seconds if self.cpu_seconds > 0 else float("nan")


@dataclass
class ThroughputResult:
    """What every loader worker reports (one JSON object)."""

    loader: str
    warmup_batches: int
    warmup_s: float
    repeats: list[RepeatResult]
    epochs_started: int
    setup_s: float
    peak_rss_mb: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rates(self) -> list[float]:
        return [r.cells_per_s for r in self.repeats]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["cells_per_s"] = asdict(Summary.of(self.rates))
        out["cells_per_cpu_s"] = asdict(Summary.of([r.cells_per_cpu_s for r in self.repeats]))
        return out


class _Restartable:
    """Next batch from an iterator factory, starting a new epoch when one runs out."""

    def __init__(self, make_iter: Callable[[], Iterator[Any]]) -> None:
        self.make_iter = make_iter
        self.epochs = 1
        self.it = make_iter()

    def __next__(self) -> Any:
        try:
            return next(self.it)
        except StopIteration:
            self.epochs += 1
            self.it = self.make_iter()  # epoch-start cost (re-shuffling, ...) is part of the timing
            return next(self.it)


def time_batches(
    make_iter: Callable[[], Iterator[Any]],
    count_cells: Callable[[Any], int],
    *,
    warmup_batches: int,
    repeats: int,
    batches_per_repeat: int,
    max_seconds_per_repeat: float,
    on_repeat: Callable[[int, RepeatResult], None] | None = None,
) -> tuple[list[RepeatResult], float, int]:
    """Warm up, then `repeats` timed runs of up to `batches_per_repeat` batches each.

    A repeat stops early once `max_seconds_per_repeat` have passed (after at least one batch),
    so very slow loaders are still measured with several repeats in bounded time. The rate of a
    repeat is the cells it delivered divided by its wall time; batches are consumed exactly as a
    training loop would (nothing is done with them but counting).
    """
    src = _Restartable(make_iter)
    t0 = time.perf_counter()
    for _ in range(warmup_batches):
        next(src)
    warmup_s = time.perf_counter() - t0
    results: list[RepeatResult] = []
    for r in range(repeats):
        cells = n = 0
        cpu0 = time.process_time()
        start = time.perf_counter()
        while n < batches_per_repeat and (n == 0 or time.perf_counter() - start < max_seconds_per_repeat):
            cells += count_cells(next(src))
            n += 1
        res = RepeatResult(
            batches=n, cells=cells, seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu0
        )
        results.append(res)
        if on_repeat is not None:
            on_repeat(r, res)
    return results, warmup_s, src.epochs


def warmup_batches(spec: dict[str, Any], batches_per_epoch: int) -> int:
    """`spec['warmup_batches']`, or one whole epoch when an epoch is short.

    Short epochs mean small data: then a loader that caches decoded rows (cell-load keeps an
    LRU cache of 10,000 rows per process) reaches its steady state only after one epoch, and
    that steady state is what a long training run sees.
    """
    w = int(spec["warmup_batches"])
    if 0 < batches_per_epoch <= int(spec.get("warmup_epoch_max_batches", 0)):
        w = max(w, batches_per_epoch)
    return w


def time_spec_batches(
    spec: dict[str, Any],
    make_iter: Callable[[], Iterator[Any]],
    count_cells: Callable[[Any], int],
    warmup: int,
    on_repeat: Callable[[int, RepeatResult], None] | None = None,
) -> tuple[list[RepeatResult], float, int]:
    """`time_batches` with the `repeats`, `batches_per_repeat` and `max_seconds_per_repeat` of a worker spec."""
    return time_batches(
        make_iter,
        count_cells,
        warmup_batches=warmup,
        repeats=spec["repeats"],
        batches_per_repeat=spec["batches_per_repeat"],
        max_seconds_per_repeat=spec["max_seconds_per_repeat"],
        on_repeat=on_repeat,
    )


# -- memory ------------------------------------------------------------------------------------
def peak_rss_mb_self() -> float:
    """Peak RSS of this process image: /proc VmHWM, else ru_maxrss (which survives exec)."""
    hwm = vm_hwm_mb()
    return hwm if hwm == hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def vm_hwm_mb() -> float:
    """Peak RSS of this process image from /proc (reset at exec, unlike ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def machine_load(*, all_averages: bool = False) -> dict[str, float]:
    """1-min (or 1/5/15-min) load average and CPU pressure (PSI 'some' avg10): other work skews timings."""
    one, five, fifteen = os.getloadavg()
    out = {"loadavg_1m": one}
    if all_averages:
        out.update(loadavg_5m=five, loadavg_15m=fifteen)
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0].split()
        out["cpu_psi_some_avg10"] = float(some[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        pass
    return out


@dataclass
class ChildRun:
    """A finished child process: exit code, wall time, peak RSS and its sampled RSS trace."""

    returncode: int
    wall_s: float
    peak_rss_mb: float  # exact: ru_maxrss of the command, forked from a small wrapper (see below)
    peak_anon_mb: float  # max over samples of (rss - file-backed shared pages)
    trace: list[tuple[float, float, float]]  # (t, rss_mb, anon_mb)
    stdout: str
    stderr: str
    load_before: dict[str, float] = field(default_factory=dict)
    load_after: dict[str, float] = field(default_factory=dict)


def run_measured(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    poll_s: float = 0.1,
    log_path: Path | None = None,
) -> ChildRun:
    """Run `cmd`, returning its exact peak RSS and a sampled RSS trace.

    Linux keeps ru_maxrss across fork+exec, so a child forked from this (possibly large)
    process would inherit our peak. The command is therefore forked by a tiny wrapper (this
    file run as a script, ~10 MB), whose wait4() gives the command's own peak. File-backed
    pages of memory maps count towards RSS, so the psutil trace also records `rss - shared`
    (≈ anonymous memory): the part that cannot be reclaimed as page cache.
    """
    import psutil  # both venvs have it

    with tempfile.TemporaryDirectory() as tmp:
        usage_path = Path(tmp) / "rusage.json"
        wrapped = rusage_command(cmd, usage_path)
        out_f = open(log_path.with_suffix(".stdout"), "w+") if log_path else tempfile.TemporaryFile("w+")  # noqa: SIM115
        err_f = open(log_path.with_suffix(".stderr"), "w+") if log_path else tempfile.TemporaryFile("w+")  # noqa: SIM115
        load_before = machine_load()
        t0 = time.perf_counter()
        proc = subprocess.Popen(wrapped, env=env, cwd=cwd, stdout=out_f, stderr=err_f)
        trace: list[tuple[float, float, float]] = []
        stop = threading.Event()

        def poll() -> None:
            try:
                wrapper = psutil.Process(proc.pid)
                while not stop.is_set():
                    rss = anon = 0.0
                    for p in wrapper.children(recursive=True):
                        try:
                            mi = p.memory_info()
                        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                            continue
                        rss += mi.rss / 2**20
                        anon += (mi.rss - getattr(mi, "shared", 0)) / 2**20
                    if rss:
                        trace.append((time.perf_counter() - t0, rss, anon))
                    stop.wait(poll_s)
            except psutil.NoSuchProcess:
                return

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        returncode = proc.wait()
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
        load_after = machine_load()
        peak_rss_mb = read_peak_rss_mb(usage_path)
        out_f.seek(0)
        err_f.seek(0)
        stdout, stderr = out_f.read(), err_f.read()
        out_f.close()
        err_f.close()
    return ChildRun(
        returncode=returncode,
        wall_s=wall,
        peak_rss_mb=peak_rss_mb,
        peak_anon_mb=max((a for _, _, a in trace), default=float("nan")),
        trace=trace,
        stdout=stdout,
        stderr=stderr,
        load_before=load_before,
        load_after=load_after,
    )


def rusage_command(cmd: Sequence[str], usage_path: Path) -> list[str]:
    """`cmd` forked by the ~10 MB wrapper of this file, which writes the command's own ru_maxrss to `usage_path`."""
    return [sys.executable, str(Path(__file__).resolve()), "--rusage-out", str(usage_path), "--", *cmd]


def read_peak_rss_mb(usage_path: Path) -> float:
    """The peak RSS (MB) that the wrapper of `rusage_command` wrote; NaN when it wrote none."""
    usage = json.loads(usage_path.read_text()) if usage_path.exists() else {}
    return usage.get("maxrss_kb", float("nan")) / 1024.0


def _rusage_wrapper(argv: list[str]) -> int:
    """`_common.py --rusage-out FILE -- CMD...`: fork+exec CMD, write its ru_maxrss, return its code."""
    if len(argv) < 4 or argv[0] != "--rusage-out" or argv[2] != "--":
        sys.stderr.write("usage: _common.py --rusage-out FILE -- CMD...\n")
        return 2
    out, cmd = argv[1], argv[3:]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    Path(out).write_text(json.dumps({"maxrss_kb": usage.ru_maxrss, "returncode": code}))
    return code if code >= 0 else 128 - code


def emit_result(obj: dict[str, Any]) -> None:
    """Print the worker's result as one marked JSON line on stdout."""
    sys.stdout.write(RESULT_MARKER + json.dumps(obj) + "\n")
    sys.stdout.flush()


def parse_result(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    raise RuntimeError("worker printed no result line")


def versions(packages: Sequence[str]) -> dict[str, str]:
    """Installed version of each package ('absent' when not installed)."""
    import importlib.metadata as md

    out = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def bench_main(
    args: argparse.Namespace, run: Callable[[argparse.Namespace], Any], worker: Callable[[dict], Any]
) -> None:
    """Set up logging; a `--worker` process handles the JSON `--spec` it was given, the parent runs `run(args)`."""
    setup_logging(args.verbose)
    if args.worker:
        worker(json.loads(Path(args.spec).read_text()))
        return
    run(args)


def warm_page_cache(paths: Iterable[Path], block: int = 1 << 24) -> int:
    """Read files once so every loader is timed on a warm page cache; returns bytes read."""
    total = 0
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while chunk := fh.read(block):
                    total += len(chunk)
    return total


def dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- output ------------------------------------------------------------------------------------
def fmt_num(x: float, digits: int = 3) -> str:
    """Human-readable number with thousands separators and ~`digits` significant figures; '–' for NaN/None."""
    if x is None or x != x:  # NaN
        return "–"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")


def bar_chart(
    path: Path,
    groups: Sequence[str],
    series: Sequence[str],
    medians: dict[tuple[str, str], float],
    errors: dict[tuple[str, str], tuple[float, float]],
    ylabel: str,
    title: str,
    log: bool = True,
    *,
    annotations: dict[str, str] | None = None,
    hline: float | None = None,
    size: tuple[float, float, float, float] = (6.0, 2.2, 1.5, 4.2),
    small_text: bool = False,
) -> None:
    """Grouped bars (one group per case, one bar per series) with IQR whiskers; optional group notes.

    The figure is max(size[0], size[1] * groups + size[2]) wide and size[3] high; `small_text`
    sets the group labels in 8 pt and the title in 10 pt.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(series))
    min_w, per_group, pad, height = size
    fig, ax = plt.subplots(figsize=(max(min_w, per_group * len(groups) + pad), height))
    for j, name in enumerate(series):
        xs, ys, lo, hi = [], [], [], []
        for i, g in enumerate(groups):
            m = medians.get((g, name))
            if m is None or m != m:
                continue
            q25, q75 = errors.get((g, name), (m, m))
            xs.append(i + (j - (len(series) - 1) / 2) * width)
            ys.append(m)
            lo.append(max(0.0, m - q25))
            hi.append(max(0.0, q75 - m))
        bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=name)
        for b, y in zip(bars, ys, strict=True):
            ax.annotate(fmt_num(y), (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)))
    labels = [f"{g}\n{annotations[g]}" if annotations and g in annotations else g for g in groups]
    small = {"fontsize": 8} if small_text else {}
    ax.set_xticklabels(labels, **small)
    if hline is not None:
        ax.axhline(hline, color="grey", lw=0.8, ls="--")
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, **({"fontsize": 10} if small_text else {}))
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(_rusage_wrapper(sys.argv[1:]))
