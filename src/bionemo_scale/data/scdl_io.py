"""Write and open SCDL (`bionemo-scdl`) memory-mapped CSR datasets, in chunks.

SCDL's own `load_h5ad` copies rows in file order. We need rows in *group* order and we
normalise on the way, so we append CSR chunks to the three raw arrays ourselves and then let
`SingleCellMemMapDataset` write its header and feature index: the result is a genuine SCDL
directory that `SingleCellMemMapDataset(path)` opens, with no private format of ours.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from bionemo_scale.errors import ScaleError

logger = logging.getLogger(__name__)

# SCDL's defaults when a directory has no header yet; we write exactly these dtypes.
DATA_DTYPE = np.float32
COL_DTYPE = np.uint32
ROW_DTYPE = np.uint64


class ScdlAppender:
    """Append CSR row chunks to an SCDL directory that does not exist yet."""

    def __init__(self, path: str | Path, n_genes: int) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=False)
        self.n_genes = n_genes
        self._data = open(self.path / "data.npy", "wb")  # noqa: SIM115 - closed in finalize/abort
        self._cols = open(self.path / "col_ptr.npy", "wb")  # noqa: SIM115
        self._row_lengths: list[np.ndarray] = []
        self.n_rows = 0
        self.nnz = 0

    def append(self, chunk: sp.csr_matrix) -> None:
        if chunk.shape[1] != self.n_genes:
            raise ValueError(f"chunk has {chunk.shape[1]} genes, expected {self.n_genes}")
        chunk = chunk.tocsr()
        chunk.sort_indices()
        self._data.write(np.ascontiguousarray(chunk.data, dtype=DATA_DTYPE).tobytes())
        self._cols.write(np.ascontiguousarray(chunk.indices, dtype=COL_DTYPE).tobytes())
        self._row_lengths.append(np.diff(chunk.indptr).astype(np.int64))
        self.n_rows += chunk.shape[0]
        self.nnz += chunk.nnz

    def _close_and_row_ptr(self) -> np.ndarray:
        self._data.close()
        self._cols.close()
        if self.n_rows == 0:
            raise ScaleError("no cells to write", "check the input and split selection")
        if self.nnz == 0:
            raise ScaleError("every selected cell has zero expression", "check the input matrix")
        row_ptr = np.zeros(self.n_rows + 1, dtype=ROW_DTYPE)
        np.cumsum(np.concatenate(self._row_lengths), out=row_ptr[1:])
        row_ptr.tofile(self.path / "row_ptr.npy")
        return row_ptr

    def finalize_raw(self) -> CsrArrays:
        """Close a scratch dataset and map it back for reading (no SCDL header needed)."""
        row_ptr = self._close_and_row_ptr()
        data = np.memmap(self.path / "data.npy", dtype=DATA_DTYPE, mode="r", shape=(self.nnz,))
        col = np.memmap(self.path / "col_ptr.npy", dtype=COL_DTYPE, mode="r", shape=(self.nnz,))
        return CsrArrays(data=data, col=col, row_ptr=row_ptr, n_genes=self.n_genes)

    def finalize(self, genes: list[str], label: str) -> None:
        """Write the row pointers, metadata, header and gene feature index."""
        from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset

        self._close_and_row_ptr()
        (self.path / "metadata.json").write_text(json.dumps({"num_rows": self.n_rows}))
        (self.path / "version.json").write_text(json.dumps(importlib.metadata.version("bionemo.scdl")))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "header missing": we are about to write it
            ds = SingleCellMemMapDataset(str(self.path))
        ds._var_feature_index.append_features(
            n_obs=self.n_rows, features={"feature_id": np.asarray(genes, dtype=object)}, label=label
        )
        ds.save()

    def abort(self) -> None:
        for handle in (self._data, self._cols):
            if not handle.closed:
                handle.close()


@dataclass
class CsrArrays:
    """The three memory-mapped CSR arrays of an SCDL dataset."""

    data: np.ndarray
    col: np.ndarray
    row_ptr: np.ndarray
    n_genes: int

    @property
    def n_rows(self) -> int:
        return len(self.row_ptr) - 1

    def _offsets(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(data offsets of every stored value of `rows`, CSR indptr of those rows)."""
        starts = self.row_ptr[rows].astype(np.int64)
        lengths = self.row_ptr[rows + 1].astype(np.int64) - starts
        indptr = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        # offsets[k] = starts[row of k] + (k - first k of that row); added in place (no 3rd temporary)
        offsets = np.repeat(starts - indptr[:-1], lengths)
        offsets += np.arange(offsets.size, dtype=np.int64)
        return offsets, indptr

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Dense float32 [len(rows), n_genes] for arbitrary rows in ONE vectorised gather.

        No per-cell Python loop: the data offsets of every requested row are built with one
        repeat/arange and read with one fancy index; scipy's compiled CSR->dense kernel then
        scatters them. (A 2-D fancy assignment `out[r, c] = v` costs ~3x more: numpy builds a
        broadcast multi-index and needs a third nnz-sized index array.)
        """
        rows = np.asarray(rows, dtype=np.int64)
        offsets, indptr = self._offsets(rows)
        if offsets.size == 0:
            return np.zeros((rows.size, self.n_genes), dtype=np.float32)
        # col is uint32 on disk; gene ids < 2**31, so the int32 view is exact and copies nothing
        cols = np.asarray(self.col[offsets]).view(np.int32)
        m = sp.csr_matrix((np.asarray(self.data[offsets]), cols, indptr), shape=(rows.size, self.n_genes))
        return m.toarray().astype(np.float32, copy=False)

    def gather_csr(self, rows: np.ndarray) -> sp.csr_matrix:
        """The same rows as a CSR matrix (for writing without densifying)."""
        rows = np.asarray(rows, dtype=np.int64)
        offsets, indptr = self._offsets(rows)
        return sp.csr_matrix(
            (np.asarray(self.data[offsets]), np.asarray(self.col[offsets]), indptr), shape=(rows.size, self.n_genes)
        )


def open_scdl(path: str | Path, n_genes: int) -> CsrArrays:
    """Open an SCDL directory through SCDL itself and expose its memmaps."""
    from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset

    path = Path(path)
    if not (path / "metadata.json").exists():
        raise ScaleError(f"{path} is not an SCDL dataset (no metadata.json)", "re-run `bionemo-scale preprocess`")
    try:
        ds = SingleCellMemMapDataset(str(path))
    except Exception as exc:
        raise ScaleError(f"cannot open SCDL dataset {path}: {exc}", "re-run `bionemo-scale preprocess`") from None
    arrays = CsrArrays(data=ds.data, col=ds.col_index, row_ptr=ds.row_index, n_genes=n_genes)
    if arrays.row_ptr.size < 2 or int(arrays.row_ptr[-1]) != arrays.data.size or arrays.col.size != arrays.data.size:
        raise ScaleError(
            f"SCDL dataset {path} is truncated or corrupt (row pointers do not match the data arrays)",
            "re-run `bionemo-scale preprocess` with --overwrite",
        )
    return arrays
