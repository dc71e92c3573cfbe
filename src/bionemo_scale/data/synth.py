"""A synthetic perturbation screen whose generative structure is known exactly.

For cell i in context c, batch b, substate m, under perturbation p (responder flag r_i):

    eta_i   = mu_c + (a_{c,m} + r_i * e_{c,p}) @ W + beta_{c,b}      # log relative expression
    p_i     = softmax(eta_i)
    L_i     ~ LogNormal(log(library_size), library_sd)               # varying library size
    counts  ~ NB(mean = L_i * p_i, theta)                            # negative binomial

- W [K, G]: sparse gene programs; mu_c: context baseline; a_{c,m}: context substates;
- e_{c,p} = g_c * (s_{c,p} * e_p) + context_specificity * d_{c,p}: a shared program-level
  effect, scaled per (context, perturbation), times per-(context, program) gains g_{c,k} (a
  context that amplifies a pathway does so for every perturbation that hits it: the part of the
  context dependence a model can learn from the context's other perturbations), plus an
  idiosyncratic deviation; combinations add their parts' effects and a small interaction;
- r_i ~ Bernoulli(pi_p): partial responders; beta_{c,b}: batch effects on genes.

The screen is generated group by group in SCDL row order and written in chunks, so millions
of cells never sit in RAM. The truth (W, mu, e, pi, ...) is saved to truth.npz for tests.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from bionemo_scale.atomic import DATASET, atomic_dir, atomic_file
from bionemo_scale.config import SynthConfig
from bionemo_scale.data.layout import SCDL_SUBDIR, write_dataset_files
from bionemo_scale.data.normalize import normalize_log1p
from bionemo_scale.data.scdl_io import ScdlAppender

logger = logging.getLogger(__name__)

CONTROL = "control"
TARGET_SUM = 1e4


@dataclass
class SynthTruth:
    """Every parameter of the generative model (saved as truth.npz)."""

    W: np.ndarray  # [K, G]
    mu: np.ndarray  # [C, G]
    substates: np.ndarray  # [C, M, K]
    substate_weights: np.ndarray  # [C, M]
    effects: np.ndarray  # [C, P_all, K]; row 0 (control) is zero
    responder_fraction: np.ndarray  # [P_all]; 0 for control
    batch: np.ndarray  # [C, B, G]
    contexts: list[str]
    batches: list[list[str]]
    perturbations: list[str]  # control first

    def save(self, path: Path) -> None:
        arrays = {k: v for k, v in self.__dict__.items() if isinstance(v, np.ndarray)}
        np.savez_compressed(path, **arrays)
        (path.parent / "truth_vocab.json").write_text(
            json.dumps({"contexts": self.contexts, "batches": self.batches, "perturbations": self.perturbations})
        )

    def log_rate(self, c: int, b: int, p: int, substate: np.ndarray, responder: np.ndarray) -> np.ndarray:
        """eta for a group of cells: [n, G]."""
        prog = self.substates[c, substate] + responder[:, None] * self.effects[c, p][None, :]
        return self.mu[c][None, :] + prog @ self.W + self.batch[c, b][None, :]


def make_truth(cfg: SynthConfig, rng: np.random.Generator) -> SynthTruth:
    K, G, C, B, M = cfg.n_programs, cfg.n_genes, cfg.n_contexts, cfg.n_batches, cfg.n_substates
    W = np.zeros((K, G))
    genes_per_program = max(2, (2 * G) // K)
    for k in range(K):
        idx = rng.choice(G, size=min(G, genes_per_program), replace=False)
        W[k, idx] = rng.normal(0, 1.0, size=idx.size)
    base = rng.normal(-1.0, 1.5, size=G)  # log-normal spread of gene abundances
    mu = base[None, :] + rng.normal(0, 0.4, size=(C, G))
    substates = rng.normal(0, 0.5, size=(C, M, K))
    substate_weights = rng.dirichlet(np.full(M, 3.0), size=C)

    singles = [f"P{i:03d}" for i in range(cfg.n_perturbations)]
    shared = np.zeros((cfg.n_perturbations, K))
    for i in range(cfg.n_perturbations):
        active = rng.choice(K, size=min(K, int(rng.integers(1, 4))), replace=False)
        shared[i, active] = rng.normal(0, 1.0, size=active.size) * cfg.effect_scale
    scale = np.exp(rng.normal(0, 0.3, size=(C, cfg.n_perturbations)))
    scale *= rng.random((C, cfg.n_perturbations)) > 0.1  # some contexts do not respond at all
    deviation = rng.normal(0, 0.5, size=(C, cfg.n_perturbations, K)) * (rng.random((C, cfg.n_perturbations, K)) < 0.15)
    single_effects = scale[:, :, None] * shared[None] + cfg.context_specificity * cfg.effect_scale * deviation

    combos: list[str] = []
    combo_effects = []
    seen: set[tuple[int, int]] = set()
    while len(combos) < cfg.n_combinations and cfg.n_perturbations >= 2:
        a, b = sorted(rng.choice(cfg.n_perturbations, size=2, replace=False).tolist())
        if (a, b) in seen:
            continue
        seen.add((a, b))
        combos.append(f"{singles[a]}+{singles[b]}")
        interaction = rng.normal(0, 0.2, size=(C, K)) * cfg.effect_scale
        combo_effects.append(single_effects[:, a] + single_effects[:, b] + interaction)
    perts = [CONTROL, *sorted(singles + combos)]
    label_effect = {s: single_effects[:, i] for i, s in enumerate(singles)}
    label_effect.update({c: e for c, e in zip(combos, combo_effects, strict=True)})
    effects = np.zeros((C, len(perts), K))
    for j, label in enumerate(perts[1:], start=1):
        effects[:, j] = label_effect[label]
    lo, hi = cfg.responder_fraction
    responder = np.concatenate([[0.0], rng.uniform(lo, hi, size=len(perts) - 1)])
    batch = rng.normal(0, cfg.batch_effect, size=(C, B, G))
    # Drawn last so that every other parameter keeps its random stream whatever the gain sd.
    gains = np.exp(rng.normal(0.0, cfg.program_gain_sd, size=(C, 1, K))) if cfg.program_gain_sd > 0 else 1.0
    effects = effects * gains
    contexts = [f"C{c}" for c in range(C)]
    batches = [[f"C{c}_B{b}" for b in range(B)] for c in range(C)]
    return SynthTruth(W, mu, substates, substate_weights, effects, responder, batch, contexts, batches, perts)


def group_sizes(cfg: SynthConfig, n_perts: int) -> tuple[int, int]:
    """(control cells per (context, batch), cells per perturbed group) for ~cfg.n_cells in total."""
    per_cb = cfg.n_cells / (cfg.n_contexts * cfg.n_batches)
    ctrl = max(2, round(per_cb * cfg.control_fraction))
    pert = max(2, round(per_cb * (1 - cfg.control_fraction) / max(1, n_perts - 1)))
    return ctrl, pert


def sample_counts(truth: SynthTruth, cfg: SynthConfig, c: int, b: int, p: int, n: int, rng: np.random.Generator):
    """Integer counts [n, G] (CSR) plus the substate and responder flag of each cell."""
    M = truth.substate_weights.shape[1]
    substate = rng.choice(M, size=n, p=truth.substate_weights[c])
    responder = (rng.random(n) < truth.responder_fraction[p]).astype(np.float64)
    eta = truth.log_rate(c, b, p, substate, responder)
    eta -= eta.max(axis=1, keepdims=True)
    prob = np.exp(eta)
    prob /= prob.sum(axis=1, keepdims=True)
    lib = np.exp(rng.normal(np.log(cfg.library_size), cfg.library_sd, size=(n, 1)))
    mean = lib * prob
    theta = cfg.nb_theta
    counts = rng.poisson(rng.gamma(theta, mean / theta))
    return sp.csr_matrix(counts.astype(np.float64)), substate, responder


def iter_groups(truth: SynthTruth, cfg: SynthConfig) -> Iterator[tuple[int, int, int, int]]:
    """(context, batch, pert, n_cells) in SCDL sort order: context, batch, perturbation."""
    ctrl_n, pert_n = group_sizes(cfg, len(truth.perturbations))
    for c in range(len(truth.contexts)):
        for b in range(len(truth.batches[c])):
            for p in range(len(truth.perturbations)):
                yield c, b, p, (ctrl_n if p == 0 else pert_n)


def _chunks(truth: SynthTruth, cfg: SynthConfig, groups: list[tuple[int, int, int, int]], rng: np.random.Generator):
    """Yield (counts CSR, obs DataFrame) chunks of about cfg.chunk_rows cells."""
    mats, obs, rows = [], [], 0
    for c, b, p, n in groups:
        counts, substate, responder = sample_counts(truth, cfg, c, b, p, n, rng)
        mats.append(counts)
        obs.append(
            pd.DataFrame(
                {
                    "perturbation": truth.perturbations[p],
                    "context": truth.contexts[c],
                    "batch": truth.batches[c][b],
                    "substate": substate.astype(np.int16),
                    "responder": responder.astype(bool),
                }
            )
        )
        rows += n
        if rows >= cfg.chunk_rows:
            yield sp.vstack(mats, format="csr"), pd.concat(obs, ignore_index=True)
            mats, obs, rows = [], [], 0
    if mats:
        yield sp.vstack(mats, format="csr"), pd.concat(obs, ignore_index=True)


def write_synthetic_dataset(out: str | Path, cfg: SynthConfig, overwrite: bool = False, progress: bool = True) -> dict:
    """Write a processed dataset (SCDL + index) directly, plus truth.npz."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    truth = make_truth(cfg, rng)
    groups = list(iter_groups(truth, cfg))
    total = sum(n for *_, n in groups)
    genes = [f"G{g:05d}" for g in range(cfg.n_genes)]
    batches = sorted(b for bs in truth.batches for b in bs)
    with atomic_dir(out, overwrite=overwrite, kind=DATASET) as tmp:
        appender = ScdlAppender(tmp / SCDL_SUBDIR, cfg.n_genes)
        obs_parts = []
        with tqdm(total=total, unit="cells", desc="synth", disable=not progress) as bar:
            for counts, obs in _chunks(truth, cfg, groups, rng):
                appender.append(normalize_log1p(counts, TARGET_SUM))
                obs["n_counts"] = np.asarray(counts.sum(axis=1)).ravel()
                obs_parts.append(obs)
                bar.update(counts.shape[0])
        appender.finalize(genes, label="synthetic")
        obs = pd.concat(obs_parts, ignore_index=True)
        ctx_ids = {c: i for i, c in enumerate(truth.contexts)}
        batch_ids = {b: i for i, b in enumerate(batches)}
        pert_ids = {p: i for i, p in enumerate(truth.perturbations)}
        keys = pd.DataFrame(
            {
                "context_id": obs["context"].map(ctx_ids).to_numpy(np.int64),
                "batch_id": obs["batch"].map(batch_ids).to_numpy(np.int64),
                "pert_id": obs["perturbation"].map(pert_ids).to_numpy(np.int64),
                "dose": np.where(obs["perturbation"] == CONTROL, 0.0, 1.0),
                "split": "",
            }
        )
        obs.insert(0, "cell_id", [f"cell{i}" for i in range(len(obs))])
        obs.insert(1, "source_row", np.arange(len(obs), dtype=np.int64))
        write_dataset_files(
            tmp,
            keys=keys,
            contexts=truth.contexts,
            batches=batches,
            perturbations=truth.perturbations,
            control=CONTROL,
            combo_sep="+",
            split_from_data=False,
            dataset_name="synthetic",
            obs=obs,
            genes=genes,
            manifest={
                "source": "synthetic",
                "config": cfg.model_dump(mode="json"),
                "normalisation": {
                    "input": "counts",
                    "applied": "normalize_total+log1p",
                    "target_sum": TARGET_SUM,
                    "stored": "log1p",
                },
                "genes": {"input": cfg.n_genes, "kept": cfg.n_genes, "selection": "all genes"},
                "seconds": round(time.perf_counter() - t0, 2),
            },
        )
        truth.save(tmp / "truth.npz")
        manifest = json.loads((tmp / "manifest.json").read_text())
    logger.info("wrote synthetic dataset %s: %d cells × %d genes", out, total, cfg.n_genes)
    return manifest


def write_synthetic_h5ad(out: str | Path, cfg: SynthConfig, overwrite: bool = False, progress: bool = True) -> dict:
    """Write raw counts as an h5ad, streaming CSR chunks with h5py (groups in shuffled order).

    The group order is shuffled so that `preprocess` has real sorting work to do.
    """
    rng = np.random.default_rng(cfg.seed)
    truth = make_truth(cfg, rng)
    groups = list(iter_groups(truth, cfg))
    order = np.random.default_rng(cfg.seed + 1).permutation(len(groups))
    groups = [groups[i] for i in order]
    total = sum(n for *_, n in groups)
    with atomic_file(out, overwrite=overwrite) as tmp:
        obs_parts = []
        with h5py.File(tmp, "w") as f:
            _write_h5ad_header(f)
            X = f.create_group("X")
            X.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (total, cfg.n_genes)})
            data = X.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 18,))
            indices = X.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,))
            indptr = [np.zeros(1, dtype=np.int64)]
            nnz = 0
            with tqdm(total=total, unit="cells", desc="synth h5ad", disable=not progress) as bar:
                for counts, obs in _chunks(truth, cfg, groups, rng):
                    data.resize((nnz + counts.nnz,))
                    indices.resize((nnz + counts.nnz,))
                    data[nnz:] = counts.data.astype(np.float32)
                    indices[nnz:] = counts.indices.astype(np.int32)
                    indptr.append(counts.indptr[1:].astype(np.int64) + nnz)
                    nnz += counts.nnz
                    obs_parts.append(obs)
                    bar.update(counts.shape[0])
            X.create_dataset("indptr", data=np.concatenate(indptr))
            obs = pd.concat(obs_parts, ignore_index=True)
            obs.index = pd.Index([f"cell{i}" for i in range(len(obs))])
            for col in ("perturbation", "context", "batch"):
                obs[col] = obs[col].astype("category")
            _write_frames(f, obs, pd.DataFrame(index=pd.Index([f"G{g:05d}" for g in range(cfg.n_genes)])))
    logger.info("wrote synthetic h5ad %s: %d cells × %d genes", out, total, cfg.n_genes)
    return {"cells": total, "genes": cfg.n_genes, "nnz": int(nnz), "path": str(out)}


def _write_h5ad_header(f: h5py.File) -> None:
    f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})


def _write_frames(f: h5py.File, obs: pd.DataFrame, var: pd.DataFrame) -> None:
    try:
        from anndata.io import write_elem
    except ImportError:  # pragma: no cover
        from anndata.experimental import write_elem
    write_elem(f, "obs", obs)
    write_elem(f, "var", var)
    for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
        write_elem(f, key, {})
