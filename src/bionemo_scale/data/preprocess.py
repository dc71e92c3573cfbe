"""h5ad → processed SCALE dataset: SCDL memmap sorted by group, plus index, genes and obs.

Three streaming passes keep memory at O(chunk + n_cells integers):
1. scan: validate every value, decide counts vs log1p, accumulate HVG moments on train cells;
2. transform: normalise and select genes, appending rows in *file* order to a scratch CSR;
3. sort: gather rows in (context, batch, perturbation, dose, split) order from the scratch
   memmap into the final SCDL dataset.
Output is written into a temporary directory and renamed into place only on success.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from bionemo_scale.atomic import DATASET, atomic_dir
from bionemo_scale.config import PreprocessConfig
from bionemo_scale.data.h5ad_source import H5adSource
from bionemo_scale.data.index import NO_BATCH, PerturbationIndex, parse_dose
from bionemo_scale.data.layout import SCDL_SUBDIR, write_dataset_files
from bionemo_scale.data.normalize import (
    GeneMoments,
    check_finite_nonnegative,
    check_log1p_range,
    detect_input_kind,
    is_integer_valued,
    select_top_genes,
    seurat_dispersion_norm,
    to_log1p,
)
from bionemo_scale.data.scdl_io import ScdlAppender, open_scdl
from bionemo_scale.data.splits import SPLITS, SplitSpec
from bionemo_scale.errors import ScaleError

logger = logging.getLogger(__name__)


def _labels(obs: pd.DataFrame, col: str, what: str) -> np.ndarray:
    values = obs[col]
    missing = int(values.isna().sum())
    if missing:
        raise ScaleError(f"{missing} cells have no {what} in obs['{col}']", "fill or drop those cells")
    text = values.astype(str).to_numpy()
    blank = int((np.char.str_len(np.char.strip(text.astype(str))) == 0).sum())
    if blank:
        raise ScaleError(f"{blank} cells have an empty {what} in obs['{col}']", "fill or drop those cells")
    return text


def _check_genes(genes: np.ndarray) -> None:
    bad = [str(g) for g in genes if not str(g).strip() or len(str(g).splitlines()) != 1]
    if bad:
        raise ScaleError(
            f"{len(bad)} gene name(s) in var_names are empty or contain a line break, e.g. {bad[:3]}",
            "give every gene a non-empty one-line name (e.g. its Ensembl id)",
        )
    uniq, counts = np.unique(genes, return_counts=True)
    dups = uniq[counts > 1]
    if dups.size:
        raise ScaleError(
            f"{dups.size} duplicate gene name(s) in var_names, e.g. {list(dups[:5])}",
            "make them unique first (adata.var_names_make_unique()) or drop the duplicates",
        )


def reordered_combinations(labels: set[str], control: str, sep: str) -> dict[str, str]:
    """{label: canonical label} for combinations written with their parts in another order.

    'B+A' and 'A+B' are one perturbation; left as two labels, holding out 'A+B' would leave
    'B+A' in training, and the prior would not find the other ordering in other contexts. Each
    is mapped to the first of its spellings in sorted order. Parts are compared as a multiset,
    so 'A+A' stays apart from 'A'.
    """
    spellings: dict[tuple[str, ...], list[str]] = {}
    for label in sorted(labels - {control}):
        parts = tuple(sorted(p.strip() for p in label.split(sep) if p.strip()))
        spellings.setdefault(parts, []).append(label)
    return {other: same[0] for same in spellings.values() if len(same) > 1 for other in same[1:]}


def _encode(labels: np.ndarray, vocab: list[str]) -> np.ndarray:
    lookup = {v: i for i, v in enumerate(vocab)}
    uniq, inverse = np.unique(labels, return_inverse=True)
    return np.array([lookup[u] for u in uniq], dtype=np.int64)[inverse]


class _Plan:
    """Everything decided from obs before touching the matrix."""

    def __init__(self, cfg: PreprocessConfig, src: H5adSource) -> None:
        cols = [cfg.pert_col, cfg.context_col]
        cols += [c for c in (cfg.batch_col, cfg.dose_col, cfg.split_col) if c]
        cols += [c for c in cfg.keep_obs if c not in cols]
        obs = src.read_obs(list(dict.fromkeys(cols)))
        self.obs = obs
        pert = _labels(obs, cfg.pert_col, "perturbation label")
        context = _labels(obs, cfg.context_col, "context label")
        batch = _labels(obs, cfg.batch_col, "batch label") if cfg.batch_col else np.full(len(obs), NO_BATCH)

        is_ctrl = pert == cfg.control
        if not is_ctrl.any():
            examples = sorted(set(pert))[:8]
            raise ScaleError(
                f"control label '{cfg.control}' does not occur in obs['{cfg.pert_col}'] (values include {examples})",
                "pass the right --control",
            )
        self.contexts = sorted(set(context))
        no_ctrl = sorted(set(self.contexts) - set(context[is_ctrl]))
        if no_ctrl:
            raise ScaleError(
                f"context(s) {no_ctrl} have no control cells, so their perturbations cannot be predicted",
                f"drop those cells or choose a different --context-col than '{cfg.context_col}'",
            )
        self.batches = sorted(set(batch))
        merged = reordered_combinations(set(pert), cfg.control, cfg.combo_sep)
        if merged:
            logger.warning(
                "merged %d combination label(s) that differ only in the order of their parts, e.g. %s",
                len(merged),
                ", ".join(f"'{a}' -> '{b}'" for a, b in list(merged.items())[:3]),
            )
            pert = np.array([merged.get(x, x) for x in pert], dtype=object)
        self.perturbations = [cfg.control, *sorted(set(pert) - {cfg.control})]
        self.context_codes = _encode(context, self.contexts)
        self.batch_codes = _encode(batch, self.batches)
        self.pert_codes = _encode(pert, self.perturbations)

        if cfg.dose_col:
            dose_text = obs[cfg.dose_col].astype(str).to_numpy()
            uniq, inverse = np.unique(dose_text, return_inverse=True)
            self.dose = np.array([parse_dose(u) for u in uniq], dtype=np.float64)[inverse]
        else:
            self.dose = np.where(is_ctrl, 0.0, 1.0)

        if cfg.split_col:
            split = _labels(obs, cfg.split_col, "split label")
            bad = sorted(set(split) - set(SPLITS))
            if bad:
                raise ScaleError(f"obs['{cfg.split_col}'] has values {bad[:5]}", f"use only {list(SPLITS)}")
            self.split = split
        else:
            self.split = np.full(len(obs), "", dtype=object)

        # Cells that may inform gene selection: everything except held-out cells.
        dataset = cfg.dataset_name or ""
        if cfg.split:
            spec = SplitSpec.from_toml(cfg.split)
            held = spec.label_pairs(
                self.context_codes,
                self.pert_codes,
                self.contexts,
                self.perturbations,
                cfg.control,
                cfg.combo_sep,
                dataset,
            )
            self.train_mask = held == "train"  # zeroshot contexts are held out with their controls
            self.hvg_scope = f"training cells of split {Path(cfg.split).name}"
        elif cfg.split_col:
            self.train_mask = self.split == "train"
            self.hvg_scope = f"cells with obs['{cfg.split_col}'] == 'train'"
        else:
            self.train_mask = np.ones(len(obs), dtype=bool)
            self.hvg_scope = "all cells (no split given: held-out cells influence gene selection)"

        split_rank = np.array([(SPLITS.index(s) + 1) if s else 0 for s in self.split], dtype=np.int64)
        # np.lexsort: the LAST key is the primary one. Stable, so file order survives inside a group.
        self.order = np.lexsort((split_rank, self.dose, self.pert_codes, self.batch_codes, self.context_codes))


def preprocess(
    input_path: str | Path,
    output_dir: str | Path,
    cfg: PreprocessConfig,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, object]:
    """Run the full preprocessing; returns the manifest that is also written to manifest.json."""
    t0 = time.perf_counter()
    output_dir = Path(output_dir)
    with (
        H5adSource(input_path, cfg.matrix_key) as src,
        atomic_dir(output_dir, overwrite=overwrite, kind=DATASET) as tmp,
    ):
        genes_in = src.var_names()
        _check_genes(genes_in)
        plan = _Plan(cfg, src)
        n, name = src.n_obs, Path(input_path).name

        # Pass 1: validate and collect gene moments (HVG) on training cells.
        kind = None
        moments = GeneMoments(src.n_vars) if cfg.hvg else None
        with tqdm(total=n, unit="cells", desc="scan", disable=not progress) as bar:
            for start, chunk in src.iter_chunks(cfg.chunk_rows):
                check_finite_nonnegative(chunk, start, name)
                if kind is None:
                    kind = detect_input_kind(chunk, name)
                elif kind == "counts" and chunk.nnz and not is_integer_valued(chunk):
                    raise ScaleError(
                        f"{name}: rows from {start} hold non-integer values while the first rows held counts",
                        "store one kind of value in X (all raw counts, or all log-normalised)",
                    )
                elif kind == "log1p":
                    check_log1p_range(chunk, start, name)
                if moments is not None:
                    rows = plan.train_mask[start : start + chunk.shape[0]]
                    moments.update(to_log1p(chunk[rows], kind, cfg.target_sum))
                bar.update(chunk.shape[0])
        assert kind is not None

        if moments is not None:
            if moments.n_cells < 2:
                raise ScaleError("fewer than 2 training cells for HVG selection", "check the split or drop --hvg")
            mean, var = moments.mean_var()
            keep = select_top_genes(seurat_dispersion_norm(mean, var), cfg.hvg)
        else:
            keep = np.arange(src.n_vars)
        genes = [str(g) for g in genes_in[keep]]

        # Pass 2: normalise + select genes into a scratch CSR in file order.
        scratch = ScdlAppender(tmp / "_scratch", len(genes))
        with tqdm(total=n, unit="cells", desc="normalise", disable=not progress) as bar:
            for _, chunk in src.iter_chunks(cfg.chunk_rows):
                scratch.append(to_log1p(chunk, kind, cfg.target_sum)[:, keep])
                bar.update(chunk.shape[0])
        scratch_arrays = scratch.finalize_raw()

        # Pass 3: gather in group order into the real SCDL dataset.
        out = ScdlAppender(tmp / SCDL_SUBDIR, len(genes))
        with tqdm(total=n, unit="cells", desc="sort+write", disable=not progress) as bar:
            for lo in range(0, n, cfg.chunk_rows):
                rows = plan.order[lo : lo + cfg.chunk_rows]
                out.append(scratch_arrays.gather_csr(rows))
                bar.update(rows.size)
        out.finalize(genes, label=name)
        del scratch_arrays
        shutil.rmtree(tmp / "_scratch")

        keys = pd.DataFrame(
            {
                "context_id": plan.context_codes[plan.order],
                "batch_id": plan.batch_codes[plan.order],
                "pert_id": plan.pert_codes[plan.order],
                "dose": plan.dose[plan.order],
                "split": plan.split[plan.order],
            }
        )
        obs_out = plan.obs.iloc[plan.order].copy()
        obs_out.insert(0, "source_row", plan.order.astype(np.int64))
        normalisation = {
            "input": kind,
            "applied": "normalize_total+log1p" if kind == "counts" else "none (input already log-normalised)",
            "target_sum": cfg.target_sum if kind == "counts" else None,
            "stored": "log1p",
        }
        manifest = {
            "source": str(Path(input_path).resolve()),
            "config": cfg.model_dump(mode="json"),
            "normalisation": normalisation,
            "genes": {
                "input": int(src.n_vars),
                "kept": len(genes),
                "selection": f"top {cfg.hvg} HVG (seurat flavour) on {plan.hvg_scope}" if cfg.hvg else "all genes",
            },
            "seconds": round(time.perf_counter() - t0, 2),
        }
        write_dataset_files(
            tmp,
            keys=keys,
            contexts=plan.contexts,
            batches=plan.batches,
            perturbations=plan.perturbations,
            control=cfg.control,
            combo_sep=cfg.combo_sep,
            split_from_data=cfg.split_col is not None,
            dataset_name=cfg.dataset_name or Path(input_path).stem,
            obs=obs_out.reset_index(),
            genes=genes,
            manifest=manifest,
        )
        # Re-open what we wrote through SCDL itself before publishing it.
        open_scdl(tmp / SCDL_SUBDIR, len(genes))
        PerturbationIndex.load(tmp)
        report = json.loads((tmp / "manifest.json").read_text())
    logger.info("wrote %s (%d cells, %d genes, %s)", output_dir, n, len(genes), normalisation["applied"])
    return report
