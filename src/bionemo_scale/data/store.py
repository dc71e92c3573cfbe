"""Open a processed SCALE dataset directory (the output of `preprocess` or `synth`)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from bionemo_scale.data.index import PerturbationIndex
from bionemo_scale.data.layout import FORMAT_VERSION, SCDL_SUBDIR
from bionemo_scale.data.scdl_io import CsrArrays, open_scdl
from bionemo_scale.data.splits import SplitSpec, group_splits
from bionemo_scale.errors import ScaleError


class ProcessedDataset:
    """SCDL expression memmap + perturbation index + genes + obs, read-only."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_file():
            raise ScaleError(
                f"{self.path} is a file, not a processed dataset folder",
                f"run `bionemo-scale preprocess {self.path} OUT ...` and pass OUT",
            )
        if not self.path.is_dir():
            raise ScaleError(f"dataset {self.path} does not exist", "run `bionemo-scale preprocess` first")
        manifest_path = self.path / "manifest.json"
        if not manifest_path.exists():
            raise ScaleError(f"{self.path} is not a processed SCALE dataset (no manifest.json)", "run preprocess")
        try:
            self.manifest: dict[str, object] = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            raise ScaleError(f"{manifest_path} is corrupt", "re-run preprocess with --overwrite") from None
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ScaleError(
                f"{self.path} has format version {self.manifest.get('format_version')}, expected {FORMAT_VERSION}",
                "re-run preprocess with this version of bionemo-scale",
            )
        genes_path = self.path / "genes.txt"
        if not genes_path.exists():
            raise ScaleError(f"{self.path} is missing genes.txt", "re-run preprocess")
        # one name per line (names may contain spaces); the count must match what preprocess kept,
        # because it sets the width of every gathered row
        self.genes: list[str] = genes_path.read_text().splitlines()
        kept = (self.manifest.get("genes") or {}).get("kept") if isinstance(self.manifest.get("genes"), dict) else None
        if kept is not None and int(kept) != len(self.genes):
            raise ScaleError(
                f"{genes_path} lists {len(self.genes)} genes but the dataset has {kept}",
                "restore genes.txt or re-run preprocess with --overwrite",
            )
        self.index = PerturbationIndex.load(self.path)
        self.arrays: CsrArrays = open_scdl(self.path / SCDL_SUBDIR, len(self.genes))
        if self.arrays.n_rows != self.index.n_cells:
            raise ScaleError(
                f"{self.path}: SCDL has {self.arrays.n_rows} rows but the index covers {self.index.n_cells}",
                "re-run preprocess with --overwrite",
            )

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def n_cells(self) -> int:
        return self.arrays.n_rows

    @property
    def dataset_name(self) -> str:
        return str(self.index.meta.get("dataset", ""))

    @cached_property
    def obs(self) -> pd.DataFrame:
        """Kept obs columns in SCDL row order (loaded on first use only)."""
        path = self.path / "obs.parquet"
        try:
            obs = pd.read_parquet(path)
        except FileNotFoundError:
            raise ScaleError(f"{self.path} is missing obs.parquet", "re-run `bionemo-scale preprocess`") from None
        except (OSError, ValueError) as exc:
            raise ScaleError(
                f"{path} is corrupt ({type(exc).__name__})", "re-run preprocess with --overwrite"
            ) from None
        if len(obs) != self.n_cells:
            raise ScaleError(
                f"{path} has {len(obs)} rows for {self.n_cells} cells", "re-run preprocess with --overwrite"
            )
        return obs

    def gather(self, rows: np.ndarray) -> np.ndarray:
        out = self.arrays.gather(rows)
        return out if self._column_order is None else out[:, self._column_order]

    def gather_csr(self, rows: np.ndarray):
        """The same rows as CSR (no densifying), honouring `align_genes`."""
        out = self.arrays.gather_csr(rows)
        return out if self._column_order is None else out[:, self._column_order]

    _column_order: np.ndarray | None = None

    def align_genes(self, target: list[str], rename: dict[str, str] | None = None) -> None:
        """Serve columns in `target` order (e.g. a checkpoint's panel), after optional renaming.

        Every target gene must exist in the data; extra data genes are dropped. Used by
        fine-tuning with --gene-map, so a dataset with other gene ids or order can be used.
        """
        names = [rename.get(g, g) for g in self.genes] if rename else list(self.genes)
        wanted = set(target)
        pos: dict[str, int] = {}
        for i, g in enumerate(names):
            if g in pos and g in wanted:  # a renamed gene landed on a data gene kept under its own name
                a, b = self.genes[pos[g]], self.genes[i]
                renamed = b if rename and b in rename else a
                raise ScaleError(
                    f"the gene map renames {renamed} to {g}, which the data also has as a gene of its own",
                    f"map the data's {g} to another name as well, or drop the line for {renamed}",
                )
            pos[g] = i
        missing = [g for g in target if g not in pos]
        if missing:
            raise ScaleError(
                f"{len(missing)} of the model's genes are not in the data after mapping, e.g. {missing[:5]}",
                "extend the --gene-map, or preprocess data that measures these genes",
            )
        self._column_order = np.array([pos[g] for g in target], dtype=np.int64)
        self.genes = list(target)

    def group_rows(self, group: int) -> np.ndarray:
        g = self.index.groups
        return np.arange(int(g.at[group, "start"]), int(g.at[group, "end"]))

    def split_labels(self, split: str | Path | SplitSpec) -> np.ndarray:
        return group_splits(self.index, split, self.dataset_name)

    def groups_in(self, split: str | Path | SplitSpec, which: str) -> np.ndarray:
        """Perturbed (non-control) group ids whose split label is `which`."""
        labels = self.split_labels(split)
        return np.flatnonzero((labels == which) & ~self.index.is_control)


ROW_CHUNK = 4096  # rows per read while summing ranges: a control pool can hold millions of cells


def mean_of_row_ranges(data: ProcessedDataset, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Mean expression [G] over the rows of several [start, end) ranges, in float64.

    Column sums in bounded row chunks: a whole range at once costs ~30 bytes of temporaries per
    stored value, so peak memory would grow with the dataset instead of staying flat.
    """
    total = np.zeros(data.n_genes, dtype=np.float64)
    count = 0
    for start, end in zip(np.asarray(starts).tolist(), np.asarray(ends).tolist(), strict=True):
        for a in range(int(start), int(end), ROW_CHUNK):
            total += data.gather_csr(np.arange(a, min(a + ROW_CHUNK, int(end)))).sum(axis=0, dtype=np.float64).A1
        count += int(end) - int(start)
    return total / max(count, 1)
