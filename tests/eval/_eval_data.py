"""Data builders shared by the eval tests (not collected: no `test_` prefix)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

BUNDLED = "norman19_mcfaline23_devel.h5ad"


def bundled_path() -> Path:
    """The PerturBench devel file shipped as package data."""
    return Path(str(resources.files("bionemo_scale.data") / "resources" / BUNDLED))


def shrunk_prediction(
    real: ad.AnnData,
    pert_col: str,
    control: str,
    context_col: str | None = None,
    *,
    shrink: float = 0.6,
    noise: float = 0.05,
    seed: int = 0,
) -> ad.AnnData:
    """A non-trivial dense prediction: for each (context, perturbation), control cells of that
    context resampled, plus `shrink` x the real mean delta, plus Gaussian noise, clipped at 0.
    Control cells are copied from the real data, as a model scored from controls would have."""
    rng = np.random.default_rng(seed)
    X = real.X.toarray() if sp.issparse(real.X) else np.asarray(real.X)
    X = X.astype(np.float64)
    labels = real.obs[pert_col].astype(str).to_numpy()
    contexts = real.obs[context_col].astype(str).to_numpy() if context_col else np.zeros(labels.size, dtype=str)
    out = X.copy()
    for ctx in np.unique(contexts):
        in_ctx = contexts == ctx
        ctrl = np.flatnonzero(in_ctx & (labels == control))
        ctrl_mean = X[ctrl].mean(0)
        for pert in np.unique(labels[in_ctx & (labels != control)]):
            rows = np.flatnonzero(in_ctx & (labels == pert))
            delta = X[rows].mean(0) - ctrl_mean
            base = X[rng.choice(ctrl, size=rows.size, replace=True)]
            out[rows] = base + shrink * delta + rng.normal(0.0, noise, size=base.shape)
    np.clip(out, 0.0, None, out=out)
    return ad.AnnData(X=out, obs=real.obs.copy(), var=real.var[[]].copy())


def fewshot_screen(out: Path, cfg) -> tuple:
    """A synthetic screen (`SynthConfig` cfg) with perturbations 1 and 2 held out as test pairs
    of the first context: (ProcessedDataset, per-group split labels)."""
    from bionemo_scale.data.splits import SplitSpec
    from bionemo_scale.data.store import ProcessedDataset
    from bionemo_scale.data.synth import write_synthetic_dataset

    write_synthetic_dataset(out, cfg, progress=False)
    data = ProcessedDataset(out)
    perts = data.index.perturbations[1:3]
    labels = data.split_labels(SplitSpec(fewshot={data.index.contexts[0]: {"val": [], "test": list(perts)}}))
    return data, labels
