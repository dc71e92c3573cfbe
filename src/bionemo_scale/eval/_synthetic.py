"""A small, fast real/predicted screen pair for metric tests and the metrics benchmark.

Counts are negative binomial around per-gene baselines; each perturbation moves a few
percent of genes up or down. The prediction is the same generative model with the effect
shrunk and partly wrong, so every metric lands somewhere informative rather than at 0 or 1.
Both sides are log1p(normalize_total(1e4)) CSR float32, the format cell-eval expects.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

CONTROL = "control"


def _nb_counts(rng: np.random.Generator, mean: np.ndarray, theta: float) -> np.ndarray:
    """Negative binomial as a gamma-Poisson mixture (mean `mean`, dispersion 1/theta)."""
    return rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32)


def _lognorm(counts: np.ndarray) -> sp.csr_matrix:
    totals = counts.sum(axis=1, keepdims=True)
    x = np.log1p(counts / np.maximum(totals, 1.0) * 1e4).astype(np.float32)
    out = sp.csr_matrix(x)
    out.eliminate_zeros()
    return out


def _perturbation_names(n_perts: int, genes: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Half single-gene names (so target-gene exclusion is exercised), half `A+B` combinations."""
    names: list[str] = []
    for i in range(n_perts):
        if i % 2 == 0:
            names.append(str(genes[i]))
        else:
            a, b = rng.choice(genes.size, size=2, replace=False)
            names.append(f"{genes[a]}+{genes[b]}")
    return sorted(set(names))


def make_pair(
    n_perts: int = 20,
    cells_per_pert: int = 100,
    n_genes: int = 2000,
    n_control: int = 500,
    *,
    seed: int = 0,
    effect_fraction: float = 0.05,
    shrink: float = 0.6,
    wrong_fraction: float = 0.3,
    depth: float = 2000.0,
    pert_col: str = "target",
    control: str = CONTROL,
) -> tuple[ad.AnnData, ad.AnnData]:
    """Return `(real, pred)` AnnData with identical genes, perturbations and control cells.

    The prediction keeps the real control cells (as a model evaluated from controls would),
    shrinks every true effect by `shrink` and replaces `wrong_fraction` of effect genes with
    random ones, so DE overlap is partial and PDCorr is well below one.
    """
    rng = np.random.default_rng(seed)
    genes = np.array([f"G{i:05d}" for i in range(n_genes)])
    base = rng.lognormal(mean=-0.5, sigma=1.5, size=n_genes)
    base = base / base.sum() * depth
    perts = _perturbation_names(n_perts, genes, rng)

    def cells(mean: np.ndarray, n: int) -> np.ndarray:
        lib = rng.lognormal(0.0, 0.25, size=(n, 1))
        return _nb_counts(rng, mean[None, :] * lib, theta=2.0)

    real_blocks = [cells(base, n_control)]
    pred_blocks = [real_blocks[0]]
    labels = [control] * n_control
    n_eff = max(1, int(effect_fraction * n_genes))
    for name in perts:
        idx = rng.choice(n_genes, size=n_eff, replace=False)
        lfc = rng.normal(0.0, 1.2, size=n_eff)
        true = np.zeros(n_genes)
        true[idx] = lfc
        pred_eff = shrink * true
        n_wrong = int(wrong_fraction * n_eff)
        if n_wrong:
            pred_eff[idx[:n_wrong]] = 0.0
            pred_eff[rng.choice(n_genes, size=n_wrong, replace=False)] = rng.normal(0.0, 1.0, size=n_wrong)
        real_blocks.append(cells(base * np.exp(true), cells_per_pert))
        pred_blocks.append(cells(base * np.exp(pred_eff), cells_per_pert))
        labels += [name] * cells_per_pert

    obs = pd.DataFrame({pert_col: pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))])
    var = pd.DataFrame(index=genes)
    real = ad.AnnData(X=_lognorm(np.vstack(real_blocks)), obs=obs.copy(), var=var.copy())
    pred = ad.AnnData(X=_lognorm(np.vstack(pred_blocks)), obs=obs.copy(), var=var.copy())
    return real, pred
