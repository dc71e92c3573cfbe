"""The perturbation index: vocabularies and the group → row-range table of a processed dataset.

Rows of the SCDL memmap are sorted by (context, batch, perturbation, dose[, split]), so each
group is one contiguous row range and a set is drawn with one gather. Control pools are
*derived* from the group table (never stored separately), so they cannot disagree with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from bionemo_scale.errors import ScaleError

NO_BATCH = "__none__"
INDEX_VERSION = 1

GROUP_COLUMNS = ("context_id", "batch_id", "pert_id", "dose", "split", "start", "end")


def split_combination(label: str, sep: str) -> list[str]:
    """'A+B' -> ['A', 'B'] (sorted, so that 'B+A' is the same combination); '' parts dropped."""
    return sorted({p.strip() for p in label.split(sep) if p.strip()})


def parse_dose(text: str) -> float:
    """'1' -> 1.0; '0.5+1' (a combination) -> mean of the parts; '' -> 0.0.

    The model sees log1p(dose); per-part doses of a combination are averaged because the
    combination is one condition token.
    """
    text = str(text).strip()
    if text in ("", "nan", "None"):
        return 0.0
    parts = [p for p in text.split("+") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ScaleError(
            f"dose value '{text}' is not numeric", "give doses as numbers (e.g. 0.1, or 1+1 for combinations)"
        ) from None
    return float(np.mean(values))


@dataclass
class PerturbationIndex:
    """Vocabularies plus one row per group (a contiguous SCDL row range)."""

    control_label: str
    contexts: list[str]
    batches: list[str]
    perturbations: list[str]  # id 0 is always the control label
    parts: list[str]  # atomic perturbations that combinations are built from
    pert_parts: list[list[int]]  # part ids of each perturbation (control: [])
    groups: pd.DataFrame  # GROUP_COLUMNS
    combo_sep: str = "+"
    split_from_data: bool = False  # True when --split-col labels were stored per group
    meta: dict[str, object] = field(default_factory=dict)

    # -- derived views ------------------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def n_cells(self) -> int:
        return int(self.groups["end"].max()) if len(self.groups) else 0

    @cached_property
    def group_arrays(self) -> dict[str, np.ndarray]:
        """Columns as contiguous numpy arrays for the sampler's hot path."""
        return {c: self.groups[c].to_numpy() for c in GROUP_COLUMNS if c != "split"}

    @cached_property
    def is_control(self) -> np.ndarray:
        return self.groups["pert_id"].to_numpy() == 0

    @cached_property
    def control_groups_by_context_batch(self) -> dict[tuple[int, int], np.ndarray]:
        """(context_id, batch_id) -> group ids of its control cells."""
        ctrl = self.groups[self.is_control]
        return {
            (int(c), int(b)): sub.index.to_numpy()
            for (c, b), sub in ctrl.groupby(["context_id", "batch_id"], sort=True)
        }

    @cached_property
    def control_groups_by_context(self) -> dict[int, np.ndarray]:
        ctrl = self.groups[self.is_control]
        return {int(c): sub.index.to_numpy() for c, sub in ctrl.groupby("context_id", sort=True)}

    def control_pools(self) -> dict[str, dict[str, list[list[int]]]]:
        """Human-readable control pools: context -> batch -> list of [start, end) row ranges."""
        out: dict[str, dict[str, list[list[int]]]] = {}
        for (c, b), gids in self.control_groups_by_context_batch.items():
            ranges = [[int(self.groups.at[g, "start"]), int(self.groups.at[g, "end"])] for g in gids]
            out.setdefault(self.contexts[c], {})[self.batches[b]] = ranges
        return out

    def pert_id(self, label: str) -> int:
        try:
            return self.perturbations.index(label)
        except ValueError:
            raise ScaleError(
                f"unknown perturbation '{label}'",
                f"use one of the {len(self.perturbations)} perturbations in the index (e.g. {self.perturbations[:5]})",
            ) from None

    def context_id(self, label: str) -> int:
        try:
            return self.contexts.index(label)
        except ValueError:
            raise ScaleError(f"unknown context '{label}'", f"use one of {self.contexts}") from None

    def parts_matrix(self, pad: int = -1) -> np.ndarray:
        """[n_perturbations, max_parts] part ids, padded with `pad` (control: all pad)."""
        width = max(1, max((len(p) for p in self.pert_parts), default=1))
        out = np.full((len(self.perturbations), width), pad, dtype=np.int64)
        for i, parts in enumerate(self.pert_parts):
            out[i, : len(parts)] = parts
        return out

    def summary(self) -> dict[str, object]:
        pert_groups = self.groups[~self.is_control]
        ctx_without_ctrl = sorted(set(range(len(self.contexts))) - set(self.control_groups_by_context))
        return {
            "cells": self.n_cells,
            "groups": self.n_groups,
            "contexts": len(self.contexts),
            "batches": len(self.batches) if self.batches != [NO_BATCH] else 0,
            "perturbations": len(self.perturbations) - 1,
            "combinations": sum(len(p) > 1 for p in self.pert_parts),
            "parts": len(self.parts),
            "control_cells": int((self.groups["end"] - self.groups["start"])[self.is_control].sum()),
            "perturbed_groups": len(pert_groups),
            "contexts_without_controls": [self.contexts[c] for c in ctx_without_ctrl],
        }

    # -- persistence -----------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        vocab = {
            "version": INDEX_VERSION,
            "control_label": self.control_label,
            "combo_sep": self.combo_sep,
            "split_from_data": self.split_from_data,
            "contexts": self.contexts,
            "batches": self.batches,
            "perturbations": self.perturbations,
            "parts": self.parts,
            "pert_parts": self.pert_parts,
            "control_pools": self.control_pools(),
            "meta": self.meta,
        }
        (directory / "index.json").write_text(json.dumps(vocab, indent=1))
        self.groups.loc[:, list(GROUP_COLUMNS)].to_parquet(directory / "groups.parquet", index=False)

    @classmethod
    def load(cls, directory: Path) -> PerturbationIndex:
        try:
            vocab = json.loads((directory / "index.json").read_text())
            groups = pd.read_parquet(directory / "groups.parquet")
        except FileNotFoundError as exc:
            raise ScaleError(
                f"{directory} is missing {Path(exc.filename).name}", "re-run `bionemo-scale preprocess`"
            ) from None
        except (json.JSONDecodeError, OSError, ValueError) as exc:
            raise ScaleError(
                f"the index in {directory} is corrupt ({exc.__class__.__name__})",
                "re-run `bionemo-scale preprocess` with --overwrite",
            ) from None
        if vocab.get("version") != INDEX_VERSION:
            raise ScaleError(f"index version {vocab.get('version')} is not supported", "re-run preprocess")
        missing = [c for c in GROUP_COLUMNS if c not in groups.columns]
        if missing:
            raise ScaleError(f"groups.parquet lacks columns {missing}", "re-run `bionemo-scale preprocess`")
        absent = [k for k in ("control_label", "contexts", "batches", "perturbations") if k not in vocab]
        if absent:
            raise ScaleError(
                f"index.json in {directory} lacks {absent}", "re-run `bionemo-scale preprocess` with --overwrite"
            )
        return cls(
            control_label=vocab["control_label"],
            contexts=list(vocab["contexts"]),
            batches=list(vocab["batches"]),
            perturbations=list(vocab["perturbations"]),
            parts=list(vocab["parts"]),
            pert_parts=[list(p) for p in vocab["pert_parts"]],
            groups=groups,
            combo_sep=vocab.get("combo_sep", "+"),
            split_from_data=bool(vocab.get("split_from_data", False)),
            meta=dict(vocab.get("meta", {})),
        )


def build_index(
    sorted_keys: pd.DataFrame,
    contexts: list[str],
    batches: list[str],
    perturbations: list[str],
    control_label: str,
    combo_sep: str,
    split_from_data: bool,
) -> PerturbationIndex:
    """Group table from per-row keys that are already sorted (one row per cell, in SCDL order).

    `sorted_keys` has integer columns context_id, batch_id, pert_id, float dose and str split.
    """
    key_cols = ["context_id", "batch_id", "pert_id", "dose", "split"]
    keys = sorted_keys[key_cols]
    change = np.ones(len(keys), dtype=bool)
    if len(keys) > 1:
        diff = np.zeros(len(keys) - 1, dtype=bool)
        for c in key_cols:
            col = keys[c].to_numpy()
            diff |= col[1:] != col[:-1]
        change[1:] = diff
    starts = np.flatnonzero(change)
    ends = np.append(starts[1:], len(keys))
    groups = keys.iloc[starts].reset_index(drop=True).copy()
    groups["start"] = starts.astype(np.int64)
    groups["end"] = ends.astype(np.int64)
    parts_vocab = sorted({p for lab in perturbations[1:] for p in split_combination(lab, combo_sep)})
    part_id = {p: i for i, p in enumerate(parts_vocab)}
    pert_parts = [[]] + [[part_id[p] for p in split_combination(lab, combo_sep)] for lab in perturbations[1:]]
    return PerturbationIndex(
        control_label=control_label,
        contexts=contexts,
        batches=batches,
        perturbations=perturbations,
        parts=parts_vocab,
        pert_parts=pert_parts,
        groups=groups,
        combo_sep=combo_sep,
        split_from_data=split_from_data,
    )
