"""Chunked, bounded-memory reading of an h5ad file.

`anndata.read_h5ad` materialises the whole matrix, and backed mode is slow for random rows.
Preprocessing only ever needs sequential row chunks plus a few obs columns, so this reads the
on-disk CSR (or dense) arrays with h5py directly: memory is O(chunk) whatever the cell count.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from bionemo_scale.errors import ScaleError

logger = logging.getLogger(__name__)

try:  # anndata >= 0.11
    from anndata.io import read_elem
except ImportError:  # pragma: no cover - older anndata
    from anndata.experimental import read_elem


@dataclass(frozen=True)
class MatrixLayout:
    """Where the expression matrix lives inside the file and how it is encoded."""

    key: str
    encoding: str  # "csr_matrix" | "array"
    n_obs: int
    n_vars: int


class H5adSource:
    """A read-only view of one h5ad file: obs columns, var names and row chunks of X."""

    def __init__(self, path: str | Path, matrix_key: str = "X") -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise ScaleError(f"input file {self.path} does not exist", "check the path")
        if self.path.stat().st_size == 0:
            raise ScaleError(f"input file {self.path} is empty", "re-export the AnnData with adata.write_h5ad()")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise ScaleError(
                f"input file {self.path} is not a readable HDF5/h5ad file ({exc.__class__.__name__})",
                "re-export it with anndata's adata.write_h5ad()",
            ) from None
        for group in ("obs", "var"):
            if group not in self._file:
                self.close()
                raise ScaleError(f"{self.path} has no '{group}' group, so it is not an AnnData h5ad", "re-export it")
        self.layout = self._find_matrix(matrix_key)
        if not isinstance(self._file["obs"], h5py.Group):
            self.close()
            raise ScaleError(
                f"{self.path}: obs is stored as a table (anndata < 0.7 layout)",
                "re-save it with a current anndata: anndata.read_h5ad(IN).write_h5ad(OUT)",
            )
        self.obs_columns: list[str] = [k for k in self._file["obs"] if k != self._file["obs"].attrs.get("_index")]

    def _find_matrix(self, key: str) -> MatrixLayout:
        if key not in self._file:
            self.close()
            raise ScaleError(f"{self.path} has no matrix '{key}'", "choose an existing matrix (X, or layers/NAME)")
        node = self._file[key]
        encoding = node.attrs.get("encoding-type", "array" if isinstance(node, h5py.Dataset) else "")
        if isinstance(encoding, bytes):
            encoding = encoding.decode()
        if encoding == "csr_matrix":
            n_obs, n_vars = (int(x) for x in node.attrs["shape"])
        elif encoding == "array" and isinstance(node, h5py.Dataset) and node.ndim == 2:
            n_obs, n_vars = node.shape
        elif encoding == "csc_matrix":
            self.close()
            raise ScaleError(
                f"{self.path}:{key} is stored as CSC, which cannot be streamed by rows",
                "convert it once with adata.X = adata.X.tocsr(); adata.write_h5ad(...)",
            )
        else:
            self.close()
            raise ScaleError(f"{self.path}:{key} has an unsupported encoding '{encoding}'", "store X as CSR or dense")
        if n_obs == 0 or n_vars == 0:
            self.close()
            raise ScaleError(f"{self.path} has an empty matrix ({n_obs} cells × {n_vars} genes)", "check the export")
        return MatrixLayout(key=key, encoding=encoding, n_obs=n_obs, n_vars=n_vars)

    # -- metadata ---------------------------------------------------------------------------
    @property
    def n_obs(self) -> int:
        return self.layout.n_obs

    @property
    def n_vars(self) -> int:
        return self.layout.n_vars

    def _index_of(self, group: str) -> np.ndarray:
        node = self._file[group]
        key = node.attrs.get("_index") if isinstance(node, h5py.Group) else None
        if key is None or key not in node:
            raise ScaleError(
                f"{self.path}: '{group}' has no index (an old or non-standard h5ad layout)",
                "re-save it with a current anndata: anndata.read_h5ad(IN).write_h5ad(OUT)",
            )
        return np.asarray(read_elem(node[key])).astype(str)

    def var_names(self) -> np.ndarray:
        return self._index_of("var")

    def obs_names(self) -> np.ndarray:
        return self._index_of("obs")

    def read_obs(self, columns: list[str]) -> pd.DataFrame:
        """Read only the named obs columns (cheap even for millions of cells)."""
        missing = [c for c in columns if c not in self.obs_columns]
        if missing:
            raise ScaleError(
                f"obs column(s) {missing} not found in {self.path.name}",
                f"use one of the available columns: {sorted(self.obs_columns)}",
            )
        data = {c: read_elem(self._file["obs"][c]) for c in columns}
        return pd.DataFrame(data, index=pd.Index(self.obs_names(), name="cell_id"))

    # -- matrix -----------------------------------------------------------------------------
    def iter_chunks(self, chunk_rows: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        """Yield (first_row, CSR chunk) in file order; values as float64 for exact checks."""
        try:
            yield from self._chunks(chunk_rows)
        except OSError as exc:  # h5py: a damaged compressed chunk, a truncated dataset, ...
            raise ScaleError(
                f"cannot read the matrix of {self.path} ({str(exc).splitlines()[0][:120]}): the file is damaged",
                "re-export it with anndata's adata.write_h5ad()",
            ) from None

    def _chunks(self, chunk_rows: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        node = self._file[self.layout.key]
        n = self.n_obs
        if self.layout.encoding == "csr_matrix":
            data, indices, indptr = node["data"], node["indices"], node["indptr"]
            for start in range(0, n, chunk_rows):
                stop = min(start + chunk_rows, n)
                ptr = np.asarray(indptr[start : stop + 1], dtype=np.int64)
                lo, hi = int(ptr[0]), int(ptr[-1])
                cols = np.asarray(indices[lo:hi])
                # scipy does not bounds-check CSR indices, and an out-of-range column would write
                # outside the dense buffer later: check here, once, while the chunk is in memory
                if ptr.size != stop - start + 1 or np.any(np.diff(ptr) < 0) or hi > data.shape[0] or lo < 0:
                    raise ScaleError(
                        f"the CSR matrix '{self.layout.key}' has corrupt row pointers (rows {start}-{stop})",
                        "rewrite the file (e.g. adata.X = scipy.sparse.csr_matrix(adata.X); adata.write_h5ad(...))",
                    )
                if cols.size and (int(cols.min()) < 0 or int(cols.max()) >= self.n_vars):
                    raise ScaleError(
                        f"the CSR matrix '{self.layout.key}' has column indices outside its {self.n_vars} genes "
                        f"(rows {start}-{stop})",
                        "rewrite the file (e.g. adata.X = scipy.sparse.csr_matrix(adata.X); adata.write_h5ad(...))",
                    )
                chunk = sp.csr_matrix(
                    (np.asarray(data[lo:hi], dtype=np.float64), cols, ptr - lo), shape=(stop - start, self.n_vars)
                )
                yield start, chunk
        else:
            for start in range(0, n, chunk_rows):
                stop = min(start + chunk_rows, n)
                yield start, sp.csr_matrix(np.asarray(node[start:stop], dtype=np.float64))

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already closed or never opened
            self._file.close()

    def __enter__(self) -> H5adSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
