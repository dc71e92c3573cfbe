"""How much of case a is learnable? Oracle ceilings and two cheap estimators, on non-test pairs.

    .venv/bin/python benchmarks/case_a_ceiling.py          # ~8 min on 2 cores; needs bench_out/quality/data

Case a is our own synthetic screen, so its generative truth (truth.npz) is known. For every
(context, perturbation) pair that is NOT a test pair, this scores pseudobulk PDCorr (Pearson of
the predicted and observed shift from the context's control mean) for:

- additive: the mean observed shift of the same perturbation in the other contexts (the baseline);
- foldchange: the other contexts' mean log fold change of linear expression, applied to this
  context's control cells (perturbation effects as multiplicative, not additive in log1p space);
- additive_rankK, foldchange_rankK: both projected onto the top-K singular vectors of the training
  pairs' vectors (val pairs only: for a training pair the basis would contain the pair itself);
- cp_rank_R: CP tensor completion of the (context x perturbation x gene) shift tensor, scored by
  5-fold cross-validation over the training pairs (and fitted on all of them for the val pairs);
  additive_same_folds is additive with the same pairs held out, its fair comparison;
- oracle_latent_mean: the noise-free mean latent effect of the other contexts, pushed through this
  context's exact generator (baseline, substates, responders, NB noise) by Monte Carlo;
- oracle_gains: the same, but with this context's true per-program gains (the learnable part of
  the context dependence, known exactly);
- oracle_full: the pair's own true latent effect (what no model can know: the per-pair scale,
  the non-responding pairs and the idiosyncratic deviations are in it).

The oracles bound what a model could gain over additive; the estimators show how much of that a
simple method recovers. Test pairs are excluded everywhere (they are never fitted or scored).
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]

from bionemo_scale.config import SynthConfig  # noqa: E402
from bionemo_scale.data.normalize import normalize_log1p  # noqa: E402
from bionemo_scale.data.store import ProcessedDataset  # noqa: E402
from bionemo_scale.data.synth import TARGET_SUM, SynthTruth, make_truth, sample_counts  # noqa: E402


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b) + 1e-12))


def load_truth(data: Path) -> tuple[SynthTruth, SynthConfig]:
    arrays = np.load(data / "truth.npz")
    vocab = json.loads((data / "truth_vocab.json").read_text())
    cfg = SynthConfig(**json.loads((data / "manifest.json").read_text())["config"])
    return SynthTruth(**{k: arrays[k] for k in arrays.files}, **vocab), cfg


def pair_status(split: Path, contexts: list[str], perts: list[str]) -> np.ndarray:
    """[C, P-1] of 'train' / 'val' / 'test' (few-shot splits only, as case a uses)."""
    raw = tomllib.loads(split.read_text())
    held = {(c, p): k for c, v in raw.get("fewshot", {}).items() for k in ("val", "test") for p in v.get(k, [])}
    return np.array([[held.get((c, p), "train") for p in perts[1:]] for c in contexts])


def observed(data: ProcessedDataset) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Per (context, perturbation): mean log1p expression, mean linear expression; control cells."""
    g = data.index.groups
    C, P = len(data.index.contexts), len(data.index.perturbations)
    logm, linm, ctrl = np.zeros((C, P, data.n_genes)), np.zeros((C, P, data.n_genes)), []
    for c in tqdm(range(C), desc="pseudobulks", unit="context"):
        for p in range(P):
            rows = np.concatenate([data.group_rows(int(i)) for i in g.index[(g.context_id == c) & (g.pert_id == p)]])
            x = data.gather(rows)
            logm[c, p], linm[c, p] = x.mean(0), np.expm1(x).mean(0)
            if p == 0:
                ctrl.append(x)
    return logm, linm, ctrl


def additive(shift: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Each pair's mean shift over the other contexts where the pair is known."""
    out = np.zeros_like(shift)
    for c in range(shift.shape[0]):
        for p in range(shift.shape[1]):
            others = [o for o in range(shift.shape[0]) if o != c and known[o, p]]
            out[c, p] = shift[others, p].mean(0) if others else 0.0
    return out


def cp_complete(shift: np.ndarray, known: np.ndarray, rank: int, ridge: float = 1.0, iters: int = 60) -> np.ndarray:
    """Rank-`rank` CP fit of the shift tensor by ALS, unknown entries imputed by the current fit."""
    C, P, G = shift.shape
    rng = np.random.default_rng(0)
    A, B, W = 1 + 0.1 * rng.normal(size=(C, rank)), rng.normal(size=(P, rank)), rng.normal(size=(G, rank))
    X = np.where(known[..., None], shift, additive(shift, known))

    def solve(unfolded: np.ndarray, f1: np.ndarray, f2: np.ndarray) -> np.ndarray:
        kr = (f1[:, None, :] * f2[None, :, :]).reshape(-1, rank)
        return np.linalg.solve(kr.T @ kr + ridge * np.eye(rank), kr.T @ unfolded.T).T

    for _ in range(iters):
        A = solve(X.reshape(C, -1), B, W)
        B = solve(X.transpose(1, 0, 2).reshape(P, -1), A, W)
        W = solve(X.transpose(2, 0, 1).reshape(G, -1), A, B)
        fit = np.einsum("cr,pr,gr->cpg", A, B, W)
        X = np.where(known[..., None], shift, fit)
    return fit


def project(estimates: np.ndarray, training: np.ndarray, rank: int) -> np.ndarray:
    """Estimates [C, P, G] projected onto the top-`rank` right singular vectors of the training vectors."""
    basis = np.linalg.svd(training, full_matrices=False)[2][:rank]
    return estimates @ basis.T @ basis


def varimax(loadings: np.ndarray, iters: int = 100, tol: float = 1e-6) -> np.ndarray:
    """Kaiser's varimax rotation of [G, K] loadings: sparse components, like gene programs."""
    k = loadings.shape[1]
    rotation, last = np.eye(k), 0.0
    for _ in range(iters):
        rotated = loadings @ rotation
        target = rotated**3 - rotated @ np.diag((rotated**2).mean(0))
        u, s, vh = np.linalg.svd(loadings.T @ target)
        rotation = u @ vh
        if last and s.sum() < last * (1 + tol):
            break
        last = s.sum()
    return loadings @ rotation


def gain_corrected(shift: np.ndarray, known: np.ndarray, rank: int, ridge: float) -> np.ndarray:
    """Additive prior times a per-(context, component) gain, in a varimax basis of the known shifts.

    The generator scales each program's effect per context; with the programs approximated by
    sparse components, a context's gain on a component is the ridge slope (towards 1) of its known
    pairs' observed coefficients on their additive-prior coefficients.
    """
    prior = additive(shift, known)
    basis = varimax(np.linalg.svd(shift[known], full_matrices=False)[2][:rank].T).T  # orthonormal rows
    out = prior.copy()
    for c in range(shift.shape[0]):
        pairs = np.flatnonzero(known[c])
        seen, guess = shift[c, pairs] @ basis.T, prior[c, pairs] @ basis.T
        gain = ((seen * guess).sum(0) + ridge) / ((guess * guess).sum(0) + ridge)
        out[c] = prior[c] + ((gain - 1) * (prior[c] @ basis.T)) @ basis
    return out


class Simulator:
    """Expected pseudobulk log1p expression in a context under a given latent effect (Monte Carlo)."""

    def __init__(self, truth: SynthTruth, cfg: SynthConfig, cells: int) -> None:
        self.truth, self.cfg, self.cells = truth, cfg, cells

    def __call__(self, c: int, effect: np.ndarray) -> np.ndarray:
        t = self.truth
        saved = t.effects[c, 1].copy()
        t.effects[c, 1] = effect  # sample_counts reads the effect of perturbation 1
        try:
            means = []
            for b in range(len(t.batches[c])):
                counts, _, _ = sample_counts(t, self.cfg, c, b, 1, self.cells, np.random.default_rng([c, b, 7]))
                means.append(np.asarray(normalize_log1p(counts.tocsr(), TARGET_SUM).mean(0)).ravel())
        finally:
            t.effects[c, 1] = saved
        return np.mean(means, axis=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "bench_out" / "quality" / "data" / "synth_a")
    ap.add_argument("--split", type=Path, default=REPO / "bench_out" / "quality" / "data" / "synth_a_split.toml")
    ap.add_argument("--mc-cells", type=int, default=3000, help="Monte Carlo cells per batch for the oracles")
    ap.add_argument("--ranks", type=int, nargs="+", default=[10, 20, 30], help="CP ranks")
    ap.add_argument("--rank", type=int, default=32, help="rank of the low-rank prior variants (val pairs only)")
    ap.add_argument("--gain-ridge", type=float, default=16.0, help="ridge of the per-context component gains")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "case_a_ceiling.csv")
    args = ap.parse_args()
    if not (args.data / "truth.npz").exists():
        sys.exit(f"no truth.npz in {args.data}: run benchmarks/quality.py --cases a first (it builds the screen)")

    data = ProcessedDataset(args.data)
    truth, cfg = load_truth(args.data)
    contexts, perts = data.index.contexts, data.index.perturbations
    if list(perts) != list(truth.perturbations) or list(contexts) != list(truth.contexts):
        sys.exit("the dataset's vocabulary differs from its truth.npz: regenerate the screen")
    status = pair_status(args.split, contexts, perts)
    logm, linm, ctrl = observed(data)
    shift = (logm - logm[:, :1])[:, 1:]  # [C, P-1, G]
    train, scored = status == "train", status != "test"

    # additive and fold change use every non-test pair of the other contexts (val pairs are not
    # training data either, so they are excluded as sources)
    add = additive(shift, train)
    lfc = np.log((linm[:, 1:] + 0.1) / (linm[:, :1] + 0.1))
    lfc_other = additive(lfc, train)
    # low-rank versions (val pairs only: for a training pair the basis would contain the pair itself)
    add_lr = project(add, shift[train], args.rank)
    lfc_lr = project(lfc_other, lfc[train], args.rank)
    # CP completion: val pairs from a fit on all training pairs; training pairs by 5-fold CV
    cp = {r: cp_complete(shift, train, r) for r in args.ranks}
    pairs = np.argwhere(train)
    fold = np.random.default_rng(1).permutation(len(pairs)) % 5
    cp_cv = {r: np.zeros_like(shift) for r in args.ranks}
    add_cv, gains_cv = np.zeros_like(shift), np.zeros_like(shift)
    gains_fit = gain_corrected(shift, train, args.rank, args.gain_ridge)
    for f in tqdm(range(5), desc="CP folds"):
        known = train.copy()
        known[tuple(pairs[fold == f].T)] = False
        a = additive(shift, known)
        fits = {r: cp_complete(shift, known, r) for r in args.ranks}
        g = gain_corrected(shift, known, args.rank, args.gain_ridge)
        for c, p in pairs[fold == f]:
            add_cv[c, p], gains_cv[c, p] = a[c, p], g[c, p]
            for r in args.ranks:
                cp_cv[r][c, p] = fits[r][c, p]

    # the generator's per-(context, program) gains: the same truth drawn without them
    base_truth = make_truth(cfg.model_copy(update={"program_gain_sd": 0.0}), np.random.default_rng(cfg.seed))
    hit = np.abs(base_truth.effects) > 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        gains = np.nanmedian(np.where(hit, truth.effects / base_truth.effects, np.nan), axis=1)  # [C, K]
    gains = np.nan_to_num(gains, nan=1.0)
    sim = Simulator(truth, cfg, args.mc_cells)

    rows = []
    for c, p in tqdm(np.argwhere(scored), desc="oracles", unit="pair"):
        pi = p + 1  # index into the vocabulary (control is 0)
        others = [o for o in range(len(contexts)) if o != c and train[o, p]]
        base = sim(c, np.zeros(truth.effects.shape[2]))
        latent_mean = truth.effects[others, pi].mean(0)
        with_gains = gains[c] * (truth.effects[others, pi] / gains[others]).mean(0)
        fold_change = np.log1p(np.expm1(ctrl[c]) * np.exp(lfc_other[c, p])).mean(0) - logm[c, 0]
        obs = shift[c, p]
        row = {"context": contexts[c], "perturbation": perts[pi], "split": status[c, p]}
        row["additive"] = pearson(add[c, p], obs)
        # CP's training pairs are scored out of fold, so compare them with additive on the same folds
        row["additive_same_folds"] = pearson(add[c, p] if status[c, p] == "val" else add_cv[c, p], obs)
        row["foldchange"] = pearson(fold_change, obs)
        val = status[c, p] == "val"
        row[f"additive_rank{args.rank}"] = pearson(add_lr[c, p], obs) if val else np.nan
        fc_lr = np.log1p(np.expm1(ctrl[c]) * np.exp(lfc_lr[c, p])).mean(0) - logm[c, 0]
        row[f"foldchange_rank{args.rank}"] = pearson(fc_lr, obs) if val else np.nan
        row[f"gains_rank{args.rank}"] = pearson((gains_fit if val else gains_cv)[c, p], obs)
        for r in args.ranks:
            row[f"cp_rank_{r}"] = pearson((cp if status[c, p] == "val" else cp_cv)[r][c, p], obs)
        row["oracle_latent_mean"] = pearson(sim(c, latent_mean) - base, obs)
        row["oracle_gains"] = pearson(sim(c, with_gains) - base, obs)
        row["oracle_full"] = pearson(sim(c, truth.effects[c, pi]) - base, obs)
        rows.append(row)
    df = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    cols = [k for k in df.columns if k not in ("context", "perturbation", "split")]
    # a column scored on val pairs only has no all-pairs mean (pandas would average the val rows)
    summary = pd.DataFrame(
        {"all non-test pairs": df[cols].mean(skipna=False), "val pairs": df[df.split == "val"][cols].mean()}
    )
    print(f"pseudobulk PDCorr, mean over pairs ({len(df)} non-test, {int((df.split == 'val').sum())} val):")
    print(summary.round(3).to_string())
    print(f"per-pair rows: {args.out}")


if __name__ == "__main__":
    main()
