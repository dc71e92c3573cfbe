"""The on-disk layout of a processed dataset, shared by `preprocess` and `synth`.

OUT/
  scdl/            SCDL SingleCellMemMapDataset (log1p expression, rows sorted by group)
  index.json       vocabularies: contexts, batches, perturbations (+ parts), control pools
  groups.parquet   one row per group: ids, dose, split label, [start, end) row range
  obs.parquet      kept obs columns in row order (cell_id, source_row, ...)
  genes.txt        gene names, one per line, in column order
  manifest.json    format version, normalisation, gene selection, summary
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bionemo_scale.data.index import PerturbationIndex, build_index

FORMAT_VERSION = 1
SCDL_SUBDIR = "scdl"


def write_dataset_files(
    out: Path,
    *,
    keys: pd.DataFrame,
    contexts: list[str],
    batches: list[str],
    perturbations: list[str],
    control: str,
    combo_sep: str,
    split_from_data: bool,
    dataset_name: str,
    obs: pd.DataFrame,
    genes: list[str],
    manifest: dict[str, object],
) -> PerturbationIndex:
    """Write everything beside the SCDL directory; `keys` are per-row ids in SCDL order."""
    index = build_index(keys, contexts, batches, perturbations, control, combo_sep, split_from_data)
    index.meta = {"dataset": dataset_name}
    index.save(out)
    obs.to_parquet(out / "obs.parquet", index=False)
    (out / "genes.txt").write_text("\n".join(genes) + "\n")
    manifest = {"format_version": FORMAT_VERSION, **manifest, "index": index.summary()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return index
