"""export -> release -> fine-tune and predict; PP=2 and DP=2 fine-tuning against one process."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from tests.train.conftest import SPLIT, cli, read_losses, tb_scalars, train_args

pytestmark = [pytest.mark.slow]


def test_release_has_everything_and_no_pickle(release: Path) -> None:
    for name in ("model.safetensors", "config.yaml", "vocab.json", "genes.txt", "normalisation.json", "MODEL_CARD.md"):
        assert (release / name).exists(), name
    assert not list(release.glob("*.pt")) and not list(release.glob("*.pkl"))
    vocab = json.loads((release / "vocab.json").read_text())
    assert (release / "genes.txt").read_text().split() == vocab["genes"]
    assert json.loads((release / "normalisation.json").read_text())["stored"] == "log1p"


def test_export_round_trip_is_exact(base_run: Path, release: Path) -> None:
    """The run's checkpoint, the release, and a fine-tune model initialised from it hold the same weights."""
    from bionemo_scale.train.finetune import extend_vocabulary, init_from_release
    from bionemo_scale.train.release import full_state, load_release_model, load_run_model, read_release

    from_run, _, _ = load_run_model(base_run)
    from_release, _, _ = load_release_model(release)
    _, rel_vocab, weights = read_release(release)
    a, b = full_state(from_run), full_state(from_release)
    assert a.keys() == b.keys() == weights.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], weights[k]) for k in a)
    # Not trivially equal: training moved the weights away from a fresh initialisation.
    from bionemo_scale.config import ScaleConfig, load_yaml
    from bionemo_scale.model.scale_model import ScaleModel
    from bionemo_scale.model.transformer_config import build_transformer_config
    from tests.model.conftest import tiny_model  # noqa: F401 (megatron is initialised already)

    cfg = ScaleConfig.model_validate(load_yaml(release / "config.yaml"))
    fresh = ScaleModel(build_transformer_config(cfg.model), cfg.model)
    assert not all(torch.equal(full_state(fresh)[k], a[k]) for k in a)
    # Fine-tuning with new labels: old rows kept exactly, new rows start from the unknown row.
    data_vocab = dict(rel_vocab)
    data_vocab["contexts"] = [*rel_vocab["contexts"], "NEWLINE"]
    data_vocab["parts"] = [*rel_vocab["parts"], "NEWGENE"]
    data_vocab["perturbations"] = [*rel_vocab["perturbations"], "NEWGENE"]
    run_vocab = extend_vocabulary(rel_vocab, data_vocab)
    big = cfg.model.model_copy(update={"n_contexts": len(run_vocab["contexts"]), "n_parts": len(run_vocab["parts"])})
    model = ScaleModel(build_transformer_config(big), big)
    init_from_release(model, release, run_vocab)
    got = full_state(model)
    for k, v in weights.items():
        if k in ("conditions.context_emb.weight", "conditions.part_emb.weight"):
            n = v.shape[0] - 1
            assert torch.equal(got[k][:n], v[:n]) and torch.equal(got[k][-1], v[-1]) and torch.equal(got[k][n], v[-1])
        else:
            assert torch.equal(got[k], v), k


@pytest.fixture(scope="module")
def prediction(release: Path, demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pred") / "pred.h5ad"
    cli("predict", "--checkpoint", str(release), "--data", str(demo_data), "--split", str(SPLIT), "--output", str(out))
    return out


def test_prediction_format(prediction: Path, demo_data: Path) -> None:
    from bionemo_scale.data.store import ProcessedDataset

    pred, real = ad.read_h5ad(prediction), ad.read_h5ad(prediction.with_name("REAL.h5ad"))
    data = ProcessedDataset(demo_data)
    assert list(pred.var_names) == list(real.var_names) == data.genes
    for frame in (pred.obs, real.obs):
        assert {"perturbation", "context", "batch"} <= set(frame.columns)
    # one predicted cell per real held-out cell, per (context, perturbation)
    key = ["context", "perturbation"]
    held = pred.obs[pred.obs["is_prediction"]].groupby(key, observed=True).size()
    truth = real.obs[real.obs["perturbation"] != "control"].groupby(key, observed=True).size()
    assert held.to_dict() == truth.to_dict()
    assert set(held.index) == {("k562", "KLF1+MAP2K6"), ("k562", "MAP2K3+MAP2K6"), ("k562", "MAPK1+TGFBR2"),
                               ("A172", "MAP2K3"), ("A172", "TGFBR2"), ("A172", "SGK1")}  # fmt: skip
    # the real control cells of the contexts involved are in both files
    n_ctrl = (real.obs["perturbation"] == "control").sum()
    assert n_ctrl == (pred.obs["perturbation"] == "control").sum() == 200
    assert np.isfinite(pred.X.data).all() and pred.X.min() >= 0
    assert not np.allclose(pred.X[pred.obs["is_prediction"].to_numpy()].toarray().mean(0), 0)
    _check_on_lattice(pred)


def _levels(pred: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
    """(predicted cells, one-count level [n, 1] of the control cell each came from)."""
    from bionemo_scale.data.count_lattice import source_levels

    is_pred = pred.obs["is_prediction"].to_numpy()
    return pred.X.toarray()[is_pred], source_levels(pred)[:, None]


def _check_on_lattice(pred: ad.AnnData) -> None:
    """Every predicted value is 0 or at least one count of the control cell it came from."""
    assert pred.uns["bionemo_scale"]["count_lattice"]
    x, level = _levels(pred)
    assert not ((x > 0) & (x < level - 1e-6)).any()
    assert (x > 0).mean() > 0.01  # not emptied: cells keep their expressed genes


def test_predict_without_the_lattice_keeps_sub_count_values(
    release: Path, prediction: Path, demo_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "continuous.h5ad"
    cli("predict", "--checkpoint", str(release), "--data", str(demo_data), "--split", str(SPLIT), "--output", str(out),
        "--no-count-lattice")  # fmt: skip
    cont, latt = ad.read_h5ad(out), ad.read_h5ad(prediction)
    assert not cont.uns["bionemo_scale"]["count_lattice"]
    x, level = _levels(cont)
    y, _ = _levels(latt)
    sub = (x > 0) & (x < level)
    assert sub.mean() > 0.05  # the continuous output has sub-count values (what the rule is for)
    np.testing.assert_array_equal(y[~sub], x[~sub])  # everything else is untouched
    lv = np.broadcast_to(level, x.shape)[sub]
    assert np.all((y[sub] == 0) | np.isclose(y[sub], lv, rtol=1e-6))  # the rest lands on 0 or one count
    assert (y[sub] == 0).mean() > 0.5  # most sub-count values are far below one count


def test_prediction_is_deterministic(prediction: Path, release: Path, demo_data: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.h5ad"
    cli(
        "predict", "--checkpoint", str(release), "--data", str(demo_data), "--split", str(SPLIT), "--output", str(again)
    )
    a, b = ad.read_h5ad(prediction), ad.read_h5ad(again)
    assert (a.X != b.X).nnz == 0
    other = tmp_path / "seed1.h5ad"
    cli(
        "predict",
        "--checkpoint",
        str(release),
        "--data",
        str(demo_data),
        "--split",
        str(SPLIT),
        "--output",
        str(other),
        "--seed",
        "1",
    )
    assert (ad.read_h5ad(other).X != a.X).nnz > 0  # the seed really chooses the control cells


def test_checkpoint_with_other_genes_is_refused(release: Path, tmp_path: Path) -> None:
    from bionemo_scale.config import PreprocessConfig
    from bionemo_scale.data.bundled import resource_path
    from bionemo_scale.data.preprocess import preprocess

    other = tmp_path / "glio"
    cfg = PreprocessConfig(pert_col="condition", control="ctrl", context_col="patient_id", batch_col="sample_id")
    preprocess(resource_path("glioblastoma_panobinostat.h5ad"), other, cfg, progress=False)
    split = tmp_path / "s.toml"
    split.write_text('[fewshot."PW030"]\ntest = ["panobinostat"]\n')
    for cmd in (
        [
            "predict",
            "--checkpoint",
            str(release),
            "--data",
            str(other),
            "--split",
            str(split),
            "--output",
            str(tmp_path / "p.h5ad"),
        ],
        [
            "finetune",
            "--from",
            str(release),
            "--data",
            str(other),
            "--split",
            str(split),
            "--output",
            str(tmp_path / "ft"),
        ],
    ):
        proc = cli(*cmd, check=False, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "genes" in proc.stderr and "Fix:" in proc.stderr
    assert not (tmp_path / "p.h5ad").exists() and not (tmp_path / "ft").exists()


def test_damaged_checkpoint_or_prior_is_one_line(
    base_run: Path, release: Path, demo_data: Path, tmp_path: Path
) -> None:
    """A save cut short (or a damaged prior) used to end predict/export in a long traceback."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    shards = sorted(run.glob("checkpoints/*/weights/*.distcp"))
    assert shards, "the run has no distributed checkpoint shards"
    for shard in shards:
        with shard.open("r+b") as f:
            f.truncate(1000)
    rel = tmp_path / "rel"
    shutil.copytree(release, rel)
    with (rel / "prior.safetensors").open("r+b") as f:
        f.truncate(100)
    for cmd, needle in (
        (["export", str(run), str(tmp_path / "out_rel")], "incomplete or damaged"),
        (["predict", "--checkpoint", str(rel), "--data", str(demo_data), "--split", str(SPLIT),
          "--output", str(tmp_path / "p.h5ad")], "not a readable additive prior"),
    ):  # fmt: skip
        proc = cli(*cmd, check=False, timeout=120)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
        assert needle in lines[0] and "Fix:" in lines[0]
    assert not (tmp_path / "out_rel").exists() and not (tmp_path / "p.h5ad").exists()
    # resuming training from the truncated checkpoint: one line naming it, not NeMo's traceback
    proc = cli(*train_args(demo_data, run, 40), check=False, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "cannot resume from checkpoint" in lines[0] and "incomplete or damaged" in lines[0]


def test_damaged_run_metadata_is_one_line(base_run: Path, demo_data: Path, tmp_path: Path) -> None:
    import shutil

    meta = tmp_path / "meta"
    shutil.copytree(base_run, meta)
    for path in meta.glob("checkpoints/*/weights/metadata.json"):
        path.write_text("{")
    vocab = tmp_path / "vocab"
    shutil.copytree(base_run, vocab)
    (vocab / "vocab.json").write_text("{oops")
    for cmd, needle in (
        (["export", str(meta), str(tmp_path / "r1")], "incomplete or damaged"),
        (["predict", "--checkpoint", str(meta), "--data", str(demo_data), "--split", str(SPLIT),
          "--output", str(tmp_path / "p1" / "PRED.h5ad")], "incomplete or damaged"),
        (["export", str(vocab), str(tmp_path / "r2")], "vocab.json is damaged"),
    ):  # fmt: skip
        proc = cli(*cmd, check=False, timeout=120)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
        assert needle in lines[0] and "Fix:" in lines[0]
    assert not any((tmp_path / name).exists() for name in ("r1", "r2", "p1"))


def test_predict_with_a_gene_map(release: Path, demo_data: Path, tmp_path: Path) -> None:
    """Data whose genes are named differently predicts through the map that fine-tuning took."""
    import shutil

    data = tmp_path / "renamed"
    shutil.copytree(demo_data, data)
    genes = (data / "genes.txt").read_text().splitlines()
    (data / "genes.txt").write_text("".join(f"lab_{g}\n" for g in genes))
    gene_map = tmp_path / "map.tsv"
    gene_map.write_text("".join(f"lab_{g}\t{g}\n" for g in genes))
    args = ["predict", "--checkpoint", str(release), "--data", str(data), "--split", str(SPLIT)]
    refused = cli(*args, "--output", str(tmp_path / "no.h5ad"), check=False, timeout=120)
    assert refused.returncode == 2 and "--gene-map" in refused.stderr
    cli(*args, "--output", str(tmp_path / "p.h5ad"), "--gene-map", str(gene_map), timeout=120)
    pred = ad.read_h5ad(tmp_path / "p.h5ad")
    assert list(pred.var_names) == genes and pred.n_obs > 0  # the model's panel, in its order
    two_to_one = tmp_path / "bad.tsv"
    two_to_one.write_text(f"lab_{genes[0]}\t{genes[0]}\nlab_{genes[1]}\t{genes[0]}\n")
    proc = cli(*args, "--output", str(tmp_path / "b.h5ad"), "--gene-map", str(two_to_one), check=False, timeout=120)
    assert proc.returncode == 2 and "from several data genes" in proc.stderr


FT = ["trainer.max_steps=8", "trainer.log_every_n_steps=1", "trainer.val_check_interval=8", "checkpoint.every_n_train_steps=8", "eval.enabled=false",
      "data.micro_batch_size=4", "data.global_batch_size=8", "optim.lr=0.002", "optim.warmup_steps=0"]  # fmt: skip


@pytest.fixture(scope="module")
def finetune_reference(release: Path, demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "ref"
    cli("finetune", "--from", str(release), "--data", str(demo_data), "--split", str(SPLIT), "--output", str(out), *FT)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout",
    [["trainer.pipeline_model_parallel_size=2"], ["trainer.tensor_model_parallel_size=1"]],
    ids=["pp2", "dp2"],
)
def test_parallel_fine_tuning_matches_one_process(
    layout: list[str], release: Path, demo_data: Path, finetune_reference, tmp_path: Path
) -> None:
    """PP=2 and DP=2 (2 gloo processes) start from the same release; their losses equal one
    process's, the total and each logged term (with PP=2 the terms live on the last stage and
    the logger on the first: they must be broadcast to be logged at all)."""
    out = tmp_path / "ft"
    cli("finetune", "--from", str(release), "--data", str(demo_data), "--split", str(SPLIT), "--output", str(out),
        *FT, "trainer.devices=2", *layout, nproc=2)  # fmt: skip
    got, ref = read_losses(out / "train_loss.csv"), read_losses(finetune_reference / "train_loss.csv")
    assert [s for s, _ in got] == [s for s, _ in ref] == list(range(1, 9))
    for (_, a), (_, b) in zip(ref, got, strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    ref_terms, got_terms = tb_scalars(finetune_reference), tb_scalars(out)
    for name in ("endpoint", "gene", "pseudobulk", "reconstruction", "distribution"):
        ref_steps, ref_values = zip(*ref_terms[f"train/{name}"], strict=True)
        got_steps, got_values = zip(*got_terms.get(f"train/{name}", [(None, None)]), strict=True)
        assert got_steps == ref_steps and len(ref_steps) == 8, name
        assert got_values == pytest.approx(ref_values, rel=1e-4), name


def test_predict_from_the_best_checkpoint(base_run: Path, prediction: Path, demo_data: Path, tmp_path: Path) -> None:
    # `predict --which best` reads checkpoints/best.json: the same weights `export --which best` releases
    best_release = tmp_path / "best_release"
    cli("export", str(base_run), str(best_release), "--which", "best")
    common = ["--data", str(demo_data), "--split", str(SPLIT)]
    from_run, from_release = tmp_path / "run" / "PRED.h5ad", tmp_path / "rel" / "PRED.h5ad"
    cli("predict", "--checkpoint", str(base_run), "--which", "best", *common, "--output", str(from_run))
    cli("predict", "--checkpoint", str(best_release), *common, "--output", str(from_release))
    best = ad.read_h5ad(from_run)
    assert (best.X != ad.read_h5ad(from_release).X).nnz == 0
    record = json.loads((base_run / "checkpoints" / "best.json").read_text())
    last = ad.read_h5ad(prediction)  # the release of the last checkpoint
    if "step=29" not in record["best"]:  # base_run's last checkpoint
        assert (best.X != last.X).nnz > 0
    # a release holds one set of weights: asking it for its best is a one-line error
    proc = cli("predict", "--checkpoint", str(best_release), "--which", "best", *common,
               "--output", str(tmp_path / "x" / "PRED.h5ad"), check=False)  # fmt: skip
    assert proc.returncode == 2
    assert "is a release, which holds one set of weights" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("flag", "value", "key", "default"),
    [("--matmul-precision", "medium", "matmul_precision", "highest"), ("--autocast", "bf16", "autocast", "off")],
)
def test_predict_with_bf16_products(
    release: Path, demo_data: Path, tmp_path: Path, flag: str, value: str, key: str, default: str
) -> None:
    """`--matmul-precision medium` and `--autocast bf16` predict the same cells to within bf16
    rounding, float32 out, and record the setting; an unknown value is a one-line error."""
    from tests.train.conftest import reduced_precision_changes_matmuls

    common = ["predict", "--checkpoint", str(release), "--data", str(demo_data), "--split", str(SPLIT),
              "--no-count-lattice", "--steps", "3"]  # fmt: skip
    cli(*common, "--output", str(tmp_path / "full.h5ad"))
    cli(*common, "--output", str(tmp_path / "half.h5ad"), flag, value)
    full, half = ad.read_h5ad(tmp_path / "full.h5ad"), ad.read_h5ad(tmp_path / "half.h5ad")
    assert (full.obs_names == half.obs_names).all()
    assert [a.uns["bionemo_scale"][key] for a in (full, half)] == [default, value]
    x, y = full.X.toarray(), half.X.toarray()
    assert y.dtype == np.float32
    assert np.abs(x - y).max() < 0.05 * max(1.0, float(np.abs(x).max()))
    # CPU autocast computes in bf16 on any x86 CPU (emulated without bf16 units); 'medium' changes
    # float32 matmuls only where oneDNN has bf16 hardware (AMX)
    if flag == "--autocast" or reduced_precision_changes_matmuls():
        assert np.abs(x - y).max() > 0
    proc = cli(*common, "--output", str(tmp_path / "x" / "PRED.h5ad"), flag, "fp16", check=False)
    assert proc.returncode == 2 and "invalid choice: 'fp16'" in proc.stderr and not (tmp_path / "x").exists()
