"""Small AnnData fixtures for the data-layer tests (built in tmp dirs, never from ../shared)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp


def make_counts_adata(
    n_per_group: int = 12, n_genes: int = 40, seed: int = 0, contexts=("ctxA", "ctxB"), batches=("b1", "b2")
) -> ad.AnnData:
    """Raw counts with 2 contexts x 2 batches x {control, KO1, KO2, KO1+KO2}, rows shuffled."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in contexts:
        for b in batches:
            for p in ("ctrl", "KO1", "KO2", "KO1+KO2"):
                rows += [(c, b, p, "1" if "+" not in p else "1+1")] * n_per_group
    obs = pd.DataFrame(rows, columns=["cell_line", "plate", "gene", "dose"])
    obs = obs.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    obs.index = [f"c{i}" for i in range(len(obs))]
    X = rng.poisson(rng.gamma(2.0, 1.0, size=(len(obs), n_genes))).astype(np.float32)
    X[obs["gene"].str.contains("KO1").to_numpy(), :5] += 6  # a visible effect on 5 genes
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=var)


@pytest.fixture
def counts_h5ad(tmp_path: Path) -> Path:
    path = tmp_path / "counts.h5ad"
    make_counts_adata().write_h5ad(path)
    return path


@pytest.fixture
def log_h5ad(tmp_path: Path) -> Path:
    a = make_counts_adata(seed=1)
    X = a.X.toarray()
    X = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    a.X = sp.csr_matrix(X.astype(np.float32))
    path = tmp_path / "log.h5ad"
    a.write_h5ad(path)
    return path


PP_ARGS = ["--pert-col", "gene", "--control", "ctrl", "--context-col", "cell_line", "--batch-col", "plate"]
