"""Peak memory of `bionemo-scale preprocess` (and of the synthetic h5ad writer) vs cell count.

    .venv/bin/python benchmarks/preprocess_scale.py [--sizes 250000 1000000 3000000] [--keep]

For each size a raw-count synthetic h5ad is written by `bionemo-scale synth --format h5ad`
(which streams), then `bionemo-scale preprocess` runs on it once per `--chunk-rows` value. Every
command runs in its own process; its peak RSS comes from wait4() (exact) and an RSS trace is
sampled with psutil, which also separates anonymous memory from file-backed pages of memory
maps (preprocess reads its scratch matrix back through a memmap: those pages count towards RSS
but are page cache that the kernel can drop, not memory the process holds).

Streaming means the matrix never sits in RAM: memory = imports + O(chunk) + O(n_cells) metadata
(labels, codes, sort order, row pointers, obs). The report fits the per-cell slope, so the
O(n_cells) part is visible and can be extrapolated.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    ChildRun,
    dir_size,
    fmt_num,
    markdown_table,
    run_measured,
    setup_logging,
    write_json,
)

logger = logging.getLogger("benchmarks.preprocess_scale")

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / ".venv" / "bin" / "bionemo-scale"
#: bytes on disk per cell per gene of a synthetic raw-count h5ad (measured: ~4.1 KB/cell at 1,000 genes);
#: refined from the first file written.
DEFAULT_BYTES_PER_CELL_GENE = 4.3
IMPORT_PROBE = (
    "import bionemo_scale.cli, bionemo_scale.data.preprocess, bionemo_scale.data.synth; "
    "from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset"
)


@dataclass
class Measurement:
    """One command: what ran and what it cost."""

    step: str  # "synth" | "preprocess" | "import"
    cells: int
    genes: int
    chunk_rows: int
    wall_s: float
    peak_rss_mb: float
    peak_anon_mb: float
    returncode: int
    bytes_in: int = 0
    bytes_out: int = 0
    nnz: int = 0
    trace: list[tuple[float, float, float]] = field(default_factory=list)
    machine_load: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def cells_per_s(self) -> float:
        return self.cells / self.wall_s if self.wall_s > 0 else float("nan")


def measure(step: str, cmd: list[str], cells: int, genes: int, chunk: int, log: Path) -> tuple[Measurement, ChildRun]:
    logger.info("%s: %s", step, " ".join(cmd[-6:]))
    child = run_measured(cmd, log_path=log, poll_s=0.1)
    m = Measurement(
        step=step,
        cells=cells,
        genes=genes,
        chunk_rows=chunk,
        wall_s=child.wall_s,
        peak_rss_mb=child.peak_rss_mb,
        peak_anon_mb=child.peak_anon_mb,
        returncode=child.returncode,
        trace=[(round(t, 2), round(r, 1), round(a, 1)) for t, r, a in child.trace],
        machine_load={"before": child.load_before, "after": child.load_after},
    )
    if child.returncode != 0:
        m.error = (child.stderr.strip().splitlines() or ["?"])[-1][:300]
        logger.error("%s failed (exit %d): %s", step, child.returncode, m.error)
    else:
        logger.info(
            "  %s: %.1f s, peak RSS %.0f MB (anon %.0f MB)", step, child.wall_s, child.peak_rss_mb, child.peak_anon_mb
        )
    return m, child


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def h5ad_nnz(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["X"]["data"].shape[0])


def fit_slope(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares (intercept MB, slope bytes/cell) of peak memory against cells."""
    if len(points) < 2:
        return None
    import numpy as np

    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope * 2**20)


def report(ms: list[Measurement], args: argparse.Namespace, meta: dict[str, Any]) -> str:
    headers = ["step", "cells", "chunk rows", "h5ad GB", "wall s", "cells/s", "peak RSS MB", "peak anon MB"]
    rows = []
    for m in ms:
        if m.error:
            rows.append([m.step, f"{m.cells:,}", str(m.chunk_rows or ""), "", "", "", "failed", m.error[:50]])
            continue
        rows.append(
            [
                m.step,
                f"{m.cells:,}" if m.cells else "–",
                f"{m.chunk_rows:,}" if m.chunk_rows else "–",
                f"{m.bytes_in / 1e9:.2f}"
                if m.step == "preprocess"
                else (f"{m.bytes_out / 1e9:.2f}" if m.bytes_out else "–"),
                f"{m.wall_s:.1f}",
                fmt_num(m.cells_per_s) if m.cells else "–",
                f"{m.peak_rss_mb:,.0f}",
                f"{m.peak_anon_mb:,.0f}",
            ]
        )
    text = markdown_table(headers, rows)
    lines = ["", "Per-cell growth of peak memory (least-squares over sizes; intercept = memory at 0 cells):", ""]
    fits = []
    for step, chunk in sorted({(m.step, m.chunk_rows) for m in ms if m.step != "import"}):
        pts = [(m.cells, m.peak_rss_mb) for m in ms if m.step == step and m.chunk_rows == chunk and not m.error]
        pts_anon = [(m.cells, m.peak_anon_mb) for m in ms if m.step == step and m.chunk_rows == chunk and not m.error]
        f, fa = fit_slope(pts), fit_slope(pts_anon)
        if f and fa:
            fits.append(
                [
                    step,
                    f"{chunk:,}",
                    f"{f[0]:,.0f}",
                    f"{f[1]:,.0f}",
                    f"{fa[0]:,.0f}",
                    f"{fa[1]:,.0f}",
                    f"{(fa[0] + fa[1] * 1e8 / 2**20) / 1024:,.1f}",
                ]
            )
    if fits:
        lines.append(
            markdown_table(
                [
                    "step",
                    "chunk rows",
                    "RSS intercept MB",
                    "RSS bytes/cell",
                    "anon intercept MB",
                    "anon bytes/cell",
                    "anon GB at 100M cells (extrapolated)",
                ],
                fits,
            )
        )
    lines.append("")
    lines.append(
        f"{args.genes} genes; synthetic screens from `bionemo-scale synth --format h5ad` (raw NB counts, 5 contexts × 2 "
        "batches × 40 perturbations + controls, groups in shuffled file order). peak RSS is exact (wait4 of the "
        "command); peak anon (= RSS − file-backed pages, sampled every 0.1 s) excludes the page cache of memory-mapped "
        "files. 'import' = the memory of importing the CLI's modules alone."
    )
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    return text + "\n" + "\n".join(lines)


def chart(path: Path, ms: list[Measurement]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    series = sorted({(m.step, m.chunk_rows) for m in ms if m.step != "import" and not m.error})
    for step, chunk in series:
        pts = sorted((m.cells, m.peak_rss_mb, m.peak_anon_mb) for m in ms if (m.step, m.chunk_rows) == (step, chunk))
        pts = [p for p in pts if p[0]]
        label = f"{step} (chunk {chunk:,})"
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{label} RSS")
        ax.plot(
            [p[0] for p in pts], [p[2] for p in pts], "s--", color=line.get_color(), alpha=0.6, label=f"{label} anon"
        )
    imp = [m for m in ms if m.step == "import" and not m.error]
    if imp:
        ax.axhline(imp[0].peak_rss_mb, color="grey", lw=0.8, ls=":", label="imports only")
    ax.set_xscale("log")
    ax.set_xlabel("cells")
    ax.set_ylabel("peak memory (MB)")
    ax.set_title("peak memory vs cells")
    ax.legend(fontsize=7)
    biggest = max((m.cells for m in ms if m.step == "preprocess" and not m.error), default=0)
    for m in ms:
        if m.step == "preprocess" and m.cells == biggest and m.trace:
            ax2.plot([t for t, _, _ in m.trace], [r for _, r, _ in m.trace], label=f"RSS, chunk {m.chunk_rows:,}")
            ax2.plot(
                [t for t, _, _ in m.trace], [a for _, _, a in m.trace], "--", label=f"anon, chunk {m.chunk_rows:,}"
            )
    ax2.set_xlabel("seconds")
    ax2.set_ylabel("MB")
    ax2.set_title(f"preprocess of {biggest:,} cells over time")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def versions() -> dict[str, str]:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for pkg in ("bionemo-scale", "bionemo-scdl", "anndata", "h5py", "numpy", "scipy", "pandas"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[250_000, 1_000_000, 3_000_000], help="cells per file")
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument(
        "--chunk-rows", type=int, nargs="+", default=[20_000, 5_000], help="preprocess --chunk-rows values to run"
    )
    ap.add_argument("--out", default=str(REPO / "bench_out" / "preprocess_scale"))
    ap.add_argument("--keep", action="store_true", help="keep the generated h5ad files")
    ap.add_argument("--budget-min", type=float, default=28.0, help="skip sizes projected to exceed this total time")
    ap.add_argument("--min-free-gb", type=float, default=5.0, help="disk headroom left after the largest file set")
    ap.add_argument("--quick", action="store_true", help="smoke test: 20k and 60k cells, 200 genes")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)
    if args.quick:
        args.sizes, args.genes, args.chunk_rows = [20_000, 60_000], 200, [20_000, 5_000]
    out = Path(args.out).resolve()
    work = out / "work"
    logs = out / "logs"
    work.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    disk = shutil.disk_usage(out)
    logger.info("disk at %s: %.1f GB free of %.1f GB", out, disk.free / 1e9, disk.total / 1e9)

    ms: list[Measurement] = []
    m, _ = measure("import", [sys.executable, "-c", IMPORT_PROBE], 0, 0, 0, logs / "import")
    ms.append(m)

    bytes_per_cell = DEFAULT_BYTES_PER_CELL_GENE * args.genes
    sec_per_cell: float | None = None
    skipped: list[str] = []
    for n in sorted(args.sizes):
        need = 3.1 * n * bytes_per_cell + args.min_free_gb * 1e9  # h5ad + scratch + output at the peak
        if free_bytes(out) < need:
            msg = f"{n:,} cells skipped: needs ~{need / 1e9:.0f} GB free, {free_bytes(out) / 1e9:.0f} GB available"
            logger.warning(msg)
            skipped.append(msg)
            continue
        elapsed = time.perf_counter() - t_start
        if sec_per_cell is not None and elapsed + n * sec_per_cell > args.budget_min * 60:
            msg = (
                f"{n:,} cells skipped: projected {n * sec_per_cell / 60:.1f} min would exceed the "
                f"{args.budget_min:g} min budget ({elapsed / 60:.1f} min used)"
            )
            logger.warning(msg)
            skipped.append(msg)
            continue
        t_size = time.perf_counter()
        h5ad = work / f"synth_{n}.h5ad"
        cmd = [str(CLI), "-q", "synth", "--format", "h5ad", "--cells", str(n), "--genes", str(args.genes)]
        cmd += [str(h5ad), "--overwrite"]
        m, _ = measure("synth", cmd, n, args.genes, 20_000, logs / f"synth_{n}")
        ms.append(m)
        if m.error:
            continue
        m.bytes_out = h5ad.stat().st_size
        m.nnz = h5ad_nnz(h5ad)
        bytes_per_cell = m.bytes_out / n
        for chunk in args.chunk_rows:
            dest = work / f"proc_{n}_{chunk}"
            cmd = [str(CLI), "-q", "preprocess", "--pert-col", "perturbation", "--control", "control"]
            cmd += ["--context-col", "context", "--batch-col", "batch", "--chunk-rows", str(chunk)]
            cmd += [str(h5ad), str(dest), "--overwrite"]
            pm, _ = measure("preprocess", cmd, n, args.genes, chunk, logs / f"preprocess_{n}_{chunk}")
            pm.bytes_in, pm.nnz = m.bytes_out, m.nnz
            if not pm.error:
                pm.bytes_out = dir_size(dest)
                manifest = json.loads((dest / "manifest.json").read_text())
                pm.cells = int(manifest["index"]["cells"])
            ms.append(pm)
            shutil.rmtree(dest, ignore_errors=True)
        if not args.keep:
            h5ad.unlink(missing_ok=True)
        sec_per_cell = (time.perf_counter() - t_size) / n

    meta = {
        "args": vars(args),
        "versions": versions(),
        "total_s": time.perf_counter() - t_start,
        "skipped": skipped,
        "disk_free_gb_at_start": disk.free / 1e9,
    }
    text = report(ms, args, meta)
    if skipped:
        text += "\n\nskipped: " + "; ".join(skipped)
    print("\n" + text + "\n")
    write_json(out / "preprocess_scale.json", {"meta": meta, "results": [asdict(m) for m in ms]})
    (out / "preprocess_scale.md").write_text(text + "\n")
    chart(out / "preprocess_scale.png", ms)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("wrote %s/preprocess_scale.{json,md,png} in %.0f s", out, time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
