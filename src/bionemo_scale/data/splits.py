"""Train/val/test splits over (context, perturbation) pairs, in cell-load's TOML format.

    [zeroshot]                     # a context held out whole
    "U87MG" = "test"

    [fewshot."k562"]               # perturbations held out inside a context
    val = ["KLF1"]
    test = ["MAP2K6+KLF1", "SGK1"]

Context keys may carry cell-load's dataset prefix ("devel.U87MG"). `[datasets]` and
`[training]` are accepted for compatibility and otherwise ignored. The alternative is a
per-cell split column stored at preprocess time (`--split-col`), selected with `split-col`.

Controls are never "held out": they are the inputs from which held-out pairs are predicted.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bionemo_scale.data.index import PerturbationIndex, split_combination
from bionemo_scale.errors import ScaleError, read_user_text

SPLITS = ("train", "val", "test")
FROM_DATA = "split-col"
KNOWN_SECTIONS = {"datasets", "training", "zeroshot", "fewshot"}
SPLIT_FORMAT = 'write e.g. [zeroshot] "ctx" = "test" and [fewshot."ctx"] val = ["A"] test = ["B", "C"]'


@dataclass
class SplitSpec:
    """Held-out contexts and per-context held-out perturbations, by label."""

    zeroshot: dict[str, str] = field(default_factory=dict)  # context -> "val" | "test"
    fewshot: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # context -> {"val": [...], "test": [...]}
    source: str = "<memory>"

    # -- parsing --------------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | Path) -> SplitSpec:
        path = Path(path)
        text = read_user_text(path, "split file")
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ScaleError(f"split file {path} is not valid TOML ({exc})", "fix the syntax") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, object], source: str = "<memory>") -> SplitSpec:
        unknown = set(raw) - KNOWN_SECTIONS
        if unknown:
            raise ScaleError(
                f"split {source} has unknown section(s) {sorted(unknown)}", f"use only {sorted(KNOWN_SECTIONS)}"
            )
        for section in ("zeroshot", "fewshot"):
            if not isinstance(raw.get(section, {}), dict):
                raise ScaleError(f"[{section}] in {source} must be a table, not a value", SPLIT_FORMAT)
        zeroshot: dict[str, str] = {}
        for ctx, which in dict(raw.get("zeroshot", {})).items():
            if which not in ("val", "test"):
                raise ScaleError(f"[zeroshot] '{ctx}' = '{which}' in {source}", 'use "val" or "test"')
            zeroshot[str(ctx)] = str(which)
        fewshot: dict[str, dict[str, list[str]]] = {}
        for ctx, lists in dict(raw.get("fewshot", {})).items():
            if not isinstance(lists, dict) or set(lists) - {"val", "test"}:
                raise ScaleError(f'[fewshot."{ctx}"] in {source} must hold only val/test lists', "fix the split file")
            if not all(isinstance(lists.get(k, []), list) for k in ("val", "test")):
                raise ScaleError(f'[fewshot."{ctx}"] val/test in {source} must be lists of labels', SPLIT_FORMAT)
            val, test = [str(p) for p in lists.get("val", [])], [str(p) for p in lists.get("test", [])]
            both = sorted(set(val) & set(test))
            if both:
                raise ScaleError(f'[fewshot."{ctx}"] lists {both} in both val and test', "put each in one list")
            fewshot[str(ctx)] = {"val": val, "test": test}
        overlap = sorted(set(zeroshot) & set(fewshot))
        if overlap:
            raise ScaleError(f"context(s) {overlap} are both zeroshot and fewshot in {source}", "choose one")
        return cls(zeroshot=zeroshot, fewshot=fewshot, source=source)

    def to_toml(self) -> str:
        lines = []
        if self.zeroshot:
            lines.append("[zeroshot]")
            lines += [f'"{c}" = "{w}"' for c, w in self.zeroshot.items()]
            lines.append("")
        for ctx, lists in self.fewshot.items():
            lines.append(f'[fewshot."{ctx}"]')
            for which in ("val", "test"):
                items = ", ".join(f'"{p}"' for p in lists.get(which, []))
                lines.append(f"{which} = [{items}]")
            lines.append("")
        return "\n".join(lines)

    # -- resolution ---------------------------------------------------------------------------
    def assign(
        self, contexts: list[str], perturbations: list[str], control_label: str, combo_sep: str = "+", dataset: str = ""
    ) -> dict[tuple[int, int], str]:
        """Map every held-out (context id, pert id) to "val"/"test"; missing pairs are train.

        Also returns (context id, -1) for zeroshot contexts, covering every perturbation there.
        Names that the data does not contain are errors, not silent no-ops.
        """
        ctx_id = {c: i for i, c in enumerate(contexts)}
        by_parts = {frozenset(split_combination(p, combo_sep)): i for i, p in enumerate(perturbations) if i > 0}

        def resolve_context(key: str) -> int:
            if key in ctx_id:
                return ctx_id[key]
            prefix, _, rest = key.partition(".")
            if rest in ctx_id and (not dataset or prefix == dataset):
                return ctx_id[rest]
            raise ScaleError(
                f"split {self.source} names context '{key}', which is not in the data",
                f"use one of {contexts}",
            )

        def resolve_pert(label: str, ctx: str) -> int:
            if label == control_label:
                raise ScaleError(f"split {self.source} holds out the control label in '{ctx}'", "remove it")
            if label in perturbations:
                return perturbations.index(label)
            key = frozenset(split_combination(label, combo_sep))
            if key in by_parts:
                return by_parts[key]
            raise ScaleError(
                f"split {self.source} names perturbation '{label}' in '{ctx}', which is not in the data",
                "fix the name (combinations are matched by their parts, e.g. A+B = B+A)",
            )

        out: dict[tuple[int, int], str] = {}
        for ctx, which in self.zeroshot.items():
            out[(resolve_context(ctx), -1)] = which
        for ctx, lists in self.fewshot.items():
            c = resolve_context(ctx)
            for which in ("val", "test"):
                for label in lists[which]:
                    out[(c, resolve_pert(label, ctx))] = which
        return out

    def label_pairs(
        self,
        context_codes: np.ndarray,
        pert_codes: np.ndarray,
        contexts: list[str],
        perturbations: list[str],
        control_label: str,
        combo_sep: str = "+",
        dataset: str = "",
    ) -> np.ndarray:
        """Split label per element of parallel (context, pert) code arrays (cells or groups)."""
        held = self.assign(contexts, perturbations, control_label, combo_sep, dataset)
        labels = np.full(len(context_codes), "train", dtype=object)
        for (c, p), which in held.items():
            mask = context_codes == c
            if p >= 0:
                mask &= pert_codes == p
            labels[mask] = which
        return labels


def group_splits(index: PerturbationIndex, split: str | Path | SplitSpec, dataset: str = "") -> np.ndarray:
    """Split label of every group of `index` ("train"/"val"/"test"; controls keep their context's)."""
    if isinstance(split, str) and split == FROM_DATA:
        if not index.split_from_data:
            raise ScaleError(
                "split 'split-col' was requested but this dataset was preprocessed without --split-col",
                "pass a TOML split file, or re-run preprocess with --split-col",
            )
        return index.groups["split"].to_numpy().astype(object)
    spec = split if isinstance(split, SplitSpec) else SplitSpec.from_toml(split)
    return spec.label_pairs(
        index.groups["context_id"].to_numpy(),
        index.groups["pert_id"].to_numpy(),
        index.contexts,
        index.perturbations,
        index.control_label,
        index.combo_sep,
        dataset,
    )


def split_summary(index: PerturbationIndex, labels: np.ndarray) -> dict[str, dict[str, int]]:
    """Per split: number of perturbed groups, (context, perturbation) pairs, and cells."""
    g = index.groups
    sizes = (g["end"] - g["start"]).to_numpy()
    pert = ~index.is_control
    out: dict[str, dict[str, int]] = {}
    for which in SPLITS:
        m = pert & (labels == which)
        pairs = {(int(c), int(p)) for c, p in zip(g["context_id"][m], g["pert_id"][m])}
        out[which] = {"groups": int(m.sum()), "pairs": len(pairs), "cells": int(sizes[m].sum())}
    return out
