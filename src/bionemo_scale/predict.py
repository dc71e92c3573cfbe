"""Cell-level predictions for held-out (perturbation, context) pairs, written as AnnData.

For every held-out group (context, batch, perturbation) with n real cells, n control cells are
drawn from the same context and batch (falling back to the context), cut into sets of S,
pushed through a predictor, and written as n predicted cells. The real control cells of the
contexts involved go into both files, so `PRED.h5ad` / `REAL.h5ad` can be scored directly by
`bionemo-scale evaluate` or `cell-eval run`.

The predictor is any callable (control sets [B, S, G], conditions) -> [B, S, G]: the SCALE
model, or one of the baselines, which therefore share exactly the same control cells.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from bionemo_scale.atomic import atomic_file, check_output_free
from bionemo_scale.config import SamplerConfig
from bionemo_scale.data.control_means import GroupControlMeans, center_sets, group_targets
from bionemo_scale.data.count_lattice import put_on_lattice
from bionemo_scale.data.prior import GroupPriors
from bionemo_scale.data.sampler import SetPairDataset, draw_positions
from bionemo_scale.data.store import ProcessedDataset
from bionemo_scale.errors import ScaleError
from bionemo_scale.model.autocast import Autocast, forward_autocast

logger = logging.getLogger(__name__)

PERT_COL, CONTEXT_COL, BATCH_COL = "perturbation", "context", "batch"
# A drug screen holds one perturbation at several doses: `condition` ("drug@0.5") tells them apart,
# so `evaluate --pert-col condition` scores each dose on its own (`perturbation` pools them).
DOSE_COL, CONDITION_COL = "dose", "condition"
Predictor = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class GroupPlan:
    group: int
    ctrl_rows: np.ndarray  # one control cell per real cell of the group
    real_rows: np.ndarray


def plan_predictions(
    data: ProcessedDataset, groups: np.ndarray, seed: int, control_matching: str = "batch"
) -> list[GroupPlan]:
    """Choose, reproducibly, the control cells each held-out group is predicted from."""
    pools = SetPairDataset(data, groups, SamplerConfig(set_size=1, control_matching=control_matching), num_epochs=1)
    plans = []
    for g in np.asarray(groups, dtype=np.int64):
        real = data.group_rows(int(g))
        rng = np.random.default_rng([seed, int(g), 0xC7])
        pool = pools.control_pool(int(g))
        plans.append(GroupPlan(int(g), pool.rows(draw_positions(rng, pool.size, real.size)).astype(np.int64), real))
    return plans


def group_conditions(
    data: ProcessedDataset,
    group: int,
    n_sets: int,
    priors: GroupPriors | None = None,
    control_means: GroupControlMeans | None = None,
) -> dict[str, torch.Tensor]:
    """Condition tensors for `n_sets` sets of one group (with its prior and pool mean when given)."""
    g = data.index.groups
    pert = int(g.at[group, "pert_id"])
    parts = torch.from_numpy(data.index.parts_matrix()[pert]).expand(n_sets, -1).contiguous()
    full = lambda v, dt: torch.full((n_sets,), v, dtype=dt)  # noqa: E731
    extra = {} if priors is None else {"prior": torch.from_numpy(priors(group)).expand(n_sets, -1).contiguous()}
    if priors is not None:
        parts = priors.uncover(torch.full((n_sets,), group, dtype=torch.long), parts)
    if control_means is not None:
        extra["control_mean"] = torch.from_numpy(control_means(group)).expand(n_sets, -1).contiguous()
    return extra | {
        "parts": parts,
        "dose": full(float(g.at[group, "dose"]), torch.float32),
        "context_id": full(int(g.at[group, "context_id"]), torch.long),
        "batch_id": full(int(g.at[group, "batch_id"]), torch.long),
        "pert_id": full(pert, torch.long),
    }


def composition_groups(data: ProcessedDataset, group: int) -> list[int]:
    """The single-part groups a combination is composed of, in its context (same batch preferred).

    Empty when `group` is not a combination or when any of its parts has no single-part group in
    that context: then there is nothing to compose from and the combination is predicted directly.
    """
    idx, g = data.index, data.index.groups
    parts = idx.pert_parts[int(g.at[group, "pert_id"])]
    if len(parts) < 2:
        return []
    single_of = {pp[0]: pid for pid, pp in enumerate(idx.pert_parts) if len(pp) == 1}
    ctx, batch = int(g.at[group, "context_id"]), int(g.at[group, "batch_id"])
    out = []
    for part in parts:
        if part not in single_of:
            return []
        rows = g.index[(g["context_id"] == ctx) & (g["pert_id"] == single_of[part])]
        if len(rows) == 0:
            return []
        same_batch = [r for r in rows if int(g.at[r, "batch_id"]) == batch]
        out.append(int(same_batch[0] if same_batch else rows[0]))
    return out


def centred_group(conditions: dict[str, torch.Tensor], ctrl: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """Conditions whose `control_mean` (when present) centres the group's n cells as one sample."""
    if "control_mean" not in conditions:
        return conditions
    return conditions | {"control_mean": group_targets(ctrl, n, conditions["control_mean"])}


def compose_shifts(
    ctrl: torch.Tensor, single_preds: list[torch.Tensor], control_mean: torch.Tensor | None = None
) -> torch.Tensor:
    """Control cells plus the sum of each single prediction's shift from them (log-expression ≥ 0).

    With `control_mean` the singles were predicted from centred sets (`model.center_controls`):
    their shifts are taken from, and summed onto, the centred cells, so the centring counts once.
    """
    base = ctrl.float() if control_mean is None else center_sets(ctrl, control_mean.to(ctrl.device))
    shift = torch.stack([p.float() - base for p in single_preds]).sum(dim=0)
    return (base + shift).clamp_min(0.0)


def run_predictor(
    data: ProcessedDataset,
    plans: list[GroupPlan],
    predictor: Predictor,
    set_size: int,
    seed: int,
    progress: bool = True,
    priors: GroupPriors | None = None,
    compose: bool = False,
    lattice: bool = False,
    control_means: GroupControlMeans | None = None,
) -> np.ndarray:
    """Predicted expression for every planned cell, in plan order: [sum n_g, G].

    With `compose`, a combination whose parts all have single-part groups in its context is
    predicted as the sum of the predicted single shifts on the same control sets (`flow.combinations`).
    With `lattice`, values below one count are sampled to 0 or one count of the control cell
    they were predicted from (`data.count_lattice`, `flow.count_lattice`). `control_means` gives
    every set its pool's mean (`model.center_controls`, `baseline --center-controls`).
    """
    out = []
    for plan in tqdm(plans, desc="predict", unit="pair", disable=not progress):
        n = plan.ctrl_rows.size
        n_sets = -(-n // set_size)
        rows = plan.ctrl_rows
        if n_sets * set_size > n:  # pad the last set with extra controls of the same pool
            rng = np.random.default_rng([seed, plan.group, 0xAD])
            rows = np.concatenate([rows, rng.choice(plan.ctrl_rows, n_sets * set_size - n)])
        ctrl_cells = data.gather(rows)
        ctrl = torch.from_numpy(ctrl_cells).view(n_sets, set_size, -1)
        singles = composition_groups(data, plan.group) if compose else []
        target = centred_group(group_conditions(data, plan.group, n_sets, priors, control_means), ctrl, n)
        if singles:
            # unclamped single predictions: clamping each before the sum would bias zeros upward;
            # the cells are this group's, so every single is centred on this group's pool
            raw = getattr(predictor, "unclamped", predictor)
            pool = {k: target[k] for k in ("control_mean",) if k in target}
            conds = [group_conditions(data, s, n_sets, priors) | pool for s in singles]
            pred = compose_shifts(ctrl, [raw(ctrl, c) for c in conds], pool.get("control_mean"))
        else:
            pred = predictor(ctrl, target)
        cells = pred.reshape(n_sets * set_size, -1)[:n].float().cpu().numpy()
        out.append(put_on_lattice(cells, ctrl_cells[:n], seed, plan.group) if lattice else cells)
    return np.concatenate(out) if out else np.zeros((0, data.n_genes), dtype=np.float32)


def _obs(data: ProcessedDataset, rows: np.ndarray, pert_labels: list[str] | None = None) -> pd.DataFrame:
    idx = data.index
    group_of_row = np.searchsorted(idx.groups["end"].to_numpy(), rows, side="right")
    g = idx.groups.iloc[group_of_row]
    perts = pert_labels or [idx.perturbations[p] for p in g["pert_id"]]
    doses = g["dose"].to_numpy(np.float64)
    conditions = [p if p == idx.control_label else f"{p}@{d:g}" for p, d in zip(perts, doses, strict=True)]
    return pd.DataFrame(
        {
            PERT_COL: pd.Categorical(perts),
            CONTEXT_COL: pd.Categorical([idx.contexts[c] for c in g["context_id"]]),
            BATCH_COL: pd.Categorical([idx.batches[b] for b in g["batch_id"]]),
            DOSE_COL: doses,
            CONDITION_COL: pd.Categorical(conditions),
        }
    )


def build_anndata(
    data: ProcessedDataset, plans: list[GroupPlan], pred_X: np.ndarray, kind: str, lattice: bool = False
) -> tuple[ad.AnnData, ad.AnnData]:
    """(predicted, real) AnnData, each with the real control cells of the contexts involved.

    The predicted cells come first (`ensemble` relies on it); `lattice` is recorded in uns.
    """
    idx = data.index
    contexts = sorted({int(idx.groups.at[p.group, "context_id"]) for p in plans})
    ctrl_groups = np.concatenate([idx.control_groups_by_context[c] for c in contexts]) if contexts else np.array([])
    ctrl_rows = np.concatenate([data.group_rows(int(g)) for g in ctrl_groups]) if len(ctrl_groups) else np.array([])
    ctrl_rows = ctrl_rows.astype(np.int64)
    real_rows = np.concatenate([p.real_rows for p in plans]).astype(np.int64)
    ctrl_X = data.gather_csr(ctrl_rows)

    pred_obs = pd.concat([_obs(data, real_rows), _obs(data, ctrl_rows)], ignore_index=True)
    pred_obs["source_row"] = np.concatenate([np.concatenate([p.ctrl_rows for p in plans]), ctrl_rows])
    pred_obs["is_prediction"] = np.r_[np.ones(real_rows.size, bool), np.zeros(ctrl_rows.size, bool)]
    pred_obs.index = [f"pred{i}" for i in range(len(pred_obs))]
    pred = ad.AnnData(
        X=sp.vstack([sp.csr_matrix(pred_X.astype(np.float32)), ctrl_X], format="csr"),
        obs=pred_obs,
        var=pd.DataFrame(index=pd.Index(data.genes, name="gene")),
        uns={
            "bionemo_scale": {
                "kind": kind,
                "control": idx.control_label,
                "pert_col": PERT_COL,
                "count_lattice": lattice,
            }
        },
    )
    real_obs = pd.concat([_obs(data, real_rows), _obs(data, ctrl_rows)], ignore_index=True)
    real_obs["source_row"] = np.concatenate([real_rows, ctrl_rows])
    real_obs.index = data.obs["cell_id"].to_numpy()[real_obs["source_row"].to_numpy()].astype(str)
    real = ad.AnnData(
        X=sp.vstack([data.gather_csr(real_rows), ctrl_X], format="csr"),
        obs=real_obs,
        var=pd.DataFrame(index=pd.Index(data.genes, name="gene")),
        uns={"bionemo_scale": {"kind": "real", "control": idx.control_label, "pert_col": PERT_COL}},
    )
    return pred, real


def real_path_for(pred_path: Path) -> Path:
    return pred_path.with_name("REAL.h5ad")


def write_predictions(pred: ad.AnnData, real: ad.AnnData, pred_path: Path, overwrite: bool = True) -> Path:
    """Write PRED and REAL.h5ad (beside it) atomically; returns the REAL path."""
    real_path = real_path_for(pred_path)
    if real_path.resolve() == pred_path.resolve():
        raise ScaleError("the prediction file may not be called REAL.h5ad", "choose another --output name")
    check_output_free(pred_path, overwrite)
    if real_path.exists() and not overwrite and not _same_cells(real_path, real):
        raise ScaleError(
            f"{real_path} already holds the real cells of other predictions (other cells or genes)",
            "write to another folder, or pass --overwrite",
        )
    with atomic_file(pred_path, overwrite) as tmp_pred, atomic_file(real_path, True) as tmp_real:
        pred.write_h5ad(tmp_pred)
        real.write_h5ad(tmp_real)
    logger.info("wrote %s (%d cells) and %s", pred_path, pred.n_obs, real_path)
    return real_path


def _same_cells(path: Path, real: ad.AnnData) -> bool:
    """Whether an existing REAL.h5ad holds exactly these cells and genes.

    Several methods predicted for one split share one REAL.h5ad (same held-out and control
    cells), so rewriting it with identical content is fine; replacing another split's is not.
    """
    try:
        old = ad.read_h5ad(path, backed="r")
    except Exception:  # unreadable: not ours to replace silently either
        return False
    try:
        same = old.shape == real.shape and list(old.var_names) == list(real.var_names)
        if same and "source_row" in old.obs and "source_row" in real.obs:
            same = np.array_equal(old.obs["source_row"].to_numpy(), real.obs["source_row"].to_numpy())
        return bool(same)
    finally:
        old.file.close()


def held_out_groups(data: ProcessedDataset, split: str | Path, subset: str) -> np.ndarray:
    groups = data.groups_in(split, subset)
    if groups.size == 0:
        raise ScaleError(f"the split selects no '{subset}' pairs", "check --split and --subset")
    return groups


class VocabularyMap:
    """Translate a dataset's ids into a model's ids, label by label.

    Labels the model never saw map to its reserved "unknown" id (one past its vocabulary):
    an unseen context is then predicted from its control cells alone.
    """

    def __init__(self, model_vocab: dict[str, object], data: ProcessedDataset) -> None:
        if list(model_vocab["genes"]) != data.genes:  # type: ignore[arg-type]
            raise ScaleError(
                f"the model's {len(model_vocab['genes'])} genes differ from the data's {data.n_genes} "  # type: ignore[arg-type]
                "(names or order)",
                "preprocess the data against the model's genes.txt, or fine-tune with --gene-map (and give predict the same --gene-map)",
            )
        idx = data.index

        def mapping(model_labels: list[str], data_labels: list[str]) -> tuple[np.ndarray, list[str]]:
            pos = {label: i for i, label in enumerate(model_labels)}
            ids = np.array([pos.get(label, len(model_labels)) for label in data_labels], dtype=np.int64)
            return ids, [label for label in data_labels if label not in pos]

        self.context, self.unknown_contexts = mapping(list(model_vocab["contexts"]), idx.contexts)  # type: ignore[arg-type]
        self.batch, self.unknown_batches = mapping(list(model_vocab["batches"]), idx.batches)  # type: ignore[arg-type]
        self.part, self.unknown_parts = mapping(list(model_vocab["parts"]), idx.parts)  # type: ignore[arg-type]
        for what, labels in (("contexts", self.unknown_contexts), ("parts", self.unknown_parts)):
            if labels:
                logger.warning("the model never saw %d %s: %s", len(labels), what, labels[:8])

    def __call__(self, conditions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(conditions)
        out["context_id"] = torch.from_numpy(self.context[conditions["context_id"].numpy()])
        out["batch_id"] = torch.from_numpy(self.batch[conditions["batch_id"].numpy()])
        parts = conditions["parts"].numpy()
        mapped = np.where(parts >= 0, self.part[np.clip(parts, 0, None)], -1)
        out["parts"] = torch.from_numpy(mapped)
        return out


def model_predictor(
    model,
    vocab_map: VocabularyMap,
    steps: int = 1,
    solver: str = "euler",
    max_sets: int = 64,
    autocast: Autocast = "off",
):
    """A Predictor running `model.predict` on chunks of at most `max_sets` sets.

    `autocast="bf16"` runs the network's products in bf16 (`predict --autocast bf16`): faster on
    GPUs and on CPUs with AVX512-BF16 or AMX. Weights, the flow's integration state and the
    predicted cells stay float32.
    Its `unclamped` attribute is the same predictor without the clamp at 0, for composition.
    """
    device_type = next(model.parameters()).device.type

    def run(ctrl: torch.Tensor, conditions: dict[str, torch.Tensor], clamp: bool) -> torch.Tensor:
        cond = vocab_map(conditions)
        outs = []
        for lo in range(0, ctrl.shape[0], max_sets):
            sl = slice(lo, lo + max_sets)
            part = {k: v[sl] for k, v in cond.items()}
            with forward_autocast(autocast, device_type):
                outs.append(model.predict(ctrl[sl], part, steps=steps, solver=solver, clamp=clamp).float())
        return torch.cat(outs)

    def predict(ctrl: torch.Tensor, conditions: dict[str, torch.Tensor]) -> torch.Tensor:
        return run(ctrl, conditions, clamp=True)

    predict.unclamped = lambda ctrl, conditions: run(ctrl, conditions, clamp=False)  # type: ignore[attr-defined]
    return predict
