"""Fine-tuning from a release: vocabulary extension, id remapping and weight initialisation.

A release knows some perturbation parts, contexts and batches; a new screen brings more. The
fine-tuning run's vocabulary is the release's (same ids, so the learned embeddings keep their
meaning) followed by the new labels. New embedding rows start from the release's "unknown"
row, i.e. from what the released model would have used for an unseen label.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from bionemo_scale.data.index import split_combination
from bionemo_scale.errors import ScaleError, read_user_text

logger = logging.getLogger(__name__)

VOCAB_KEYS = {
    "parts": "conditions.part_emb.weight",
    "contexts": "conditions.context_emb.weight",
    "batches": "conditions.batch_emb.weight",
}


def extend_vocabulary(release: dict[str, object], data: dict[str, object]) -> dict[str, object]:
    """Release labels first (same ids), then the data's new labels; genes must already match."""
    if list(release["genes"]) != list(data["genes"]):  # type: ignore[arg-type]
        raise ScaleError(
            "the data's genes differ from the release's (names or order)",
            "preprocess with the release's genes.txt, or pass --gene-map DATA_GENE<TAB>RELEASE_GENE",
        )
    out = dict(data)
    for key in ("parts", "contexts", "batches"):
        old = list(release[key])  # type: ignore[arg-type]
        out[key] = old + [x for x in data[key] if x not in set(old)]  # type: ignore[union-attr]
    # perturbations: the release's control label stays id 0; the data's own control is not a perturbation
    old = list(release["perturbations"])  # type: ignore[arg-type]
    new = [x for x in list(data["perturbations"])[1:] if x not in set(old)]  # type: ignore[arg-type]
    out["perturbations"] = old + new
    sep = str(data.get("combo_sep", "+"))
    part_id = {p: i for i, p in enumerate(out["parts"])}  # type: ignore[arg-type]
    out["pert_parts"] = [[]] + [
        [part_id[p] for p in split_combination(label, sep)] for label in out["perturbations"][1:]
    ]
    out["extended_from"] = {k: len(release[k]) for k in ("parts", "contexts", "batches")}  # type: ignore[arg-type]
    return out


def id_tables(run_vocab: dict[str, object], data_index) -> dict[str, np.ndarray]:
    """Data id -> run id for contexts, batches and parts (all data labels are in the run vocab)."""

    def table(run_labels: list[str], data_labels: list[str]) -> np.ndarray:
        pos = {label: i for i, label in enumerate(run_labels)}
        return np.array([pos[label] for label in data_labels], dtype=np.int64)

    return {
        "context_id": table(list(run_vocab["contexts"]), data_index.contexts),  # type: ignore[arg-type]
        "batch_id": table(list(run_vocab["batches"]), data_index.batches),  # type: ignore[arg-type]
        "parts": table(list(run_vocab["parts"]), data_index.parts),  # type: ignore[arg-type]
    }


def remap_batch(batch: dict[str, torch.Tensor], tables: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    out = dict(batch)
    out["context_id"] = torch.from_numpy(tables["context_id"][batch["context_id"].numpy()])
    out["batch_id"] = torch.from_numpy(tables["batch_id"][batch["batch_id"].numpy()])
    parts = batch["parts"].numpy()
    out["parts"] = torch.from_numpy(np.where(parts >= 0, tables["parts"][np.clip(parts, 0, None)], -1))
    return out


def expand_embeddings(
    weights: dict[str, torch.Tensor], release_vocab: dict[str, object], run_vocab: dict[str, object]
) -> dict[str, torch.Tensor]:
    """Grow the part/context/batch tables: old rows, new rows (= old unknown), unknown last."""
    out = dict(weights)
    for key, name in VOCAB_KEYS.items():
        old, new = len(release_vocab[key]), len(run_vocab[key])  # type: ignore[arg-type]
        table = weights[name]
        if table.shape[0] != old + 1:
            raise ScaleError(f"release table {name} has {table.shape[0]} rows for {old} labels", "re-export it")
        unknown = table[old : old + 1]
        out[name] = torch.cat([table[:old], unknown.expand(new - old, -1), unknown], dim=0).contiguous()
    return out


def read_gene_map(path: str | Path) -> dict[str, str]:
    """Two tab-separated columns per line: data gene, release gene."""
    mapping: dict[str, str] = {}
    for n, line in enumerate(read_user_text(path, "gene map").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) != 2:
            raise ScaleError(
                f"{path}:{n} does not hold two tab-separated gene names", "write DATA_GENE<TAB>RELEASE_GENE"
            )
        mapping[cols[0].strip()] = cols[1].strip()
    targets: dict[str, list[str]] = {}
    for source, target in mapping.items():
        targets.setdefault(target, []).append(source)
    many = {t: s for t, s in targets.items() if len(s) > 1}
    if many:
        target, sources = next(iter(many.items()))
        raise ScaleError(
            f"{path} maps {len(many)} gene(s) from several data genes, e.g. {sources[:3]} -> {target}",
            "keep one data gene per model gene (e.g. the most expressed), or sum them before preprocessing",
        )
    return mapping


def init_from_release(model: torch.nn.Module, release_dir: str | Path, run_vocab: dict[str, object]) -> None:
    """Load a release into a freshly built (possibly TP/PP-sharded) model stage.

    Called right after the stage is built, before DDP wrapping and optimizer creation, so the
    optimizer's main parameters start from the release too. A resumed run then overwrites
    these weights from its own checkpoint.
    """
    from bionemo_scale.train.release import load_full_weights, read_release

    _, release_vocab, weights = read_release(release_dir)
    load_full_weights(model, expand_embeddings(weights, release_vocab, run_vocab))
    logger.info("initialised from release %s", release_dir)
