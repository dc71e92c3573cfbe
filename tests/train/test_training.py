"""Training, checkpoints, stop-and-go resume and the validation callback, through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from tests._torchrun import REPO_ROOT, worker_env
from tests.train.conftest import SPLIT, base_log, cli, kill_when, read_losses, tb_scalars, train_args

pytestmark = [pytest.mark.slow]


def test_run_directory_and_learning(base_run: Path) -> None:
    for name in ("config.yaml", "vocab.json", "split.json", "train_loss.csv", "val_loss.csv"):
        assert (base_run / name).exists(), name
    losses = read_losses(base_run / "train_loss.csv")
    assert [s for s, _ in losses] == list(range(1, 31))
    val = pd.read_csv(base_run / "val_loss.csv")
    assert list(val["step"]) == [10, 20, 30]
    # It learns: the validation sets are fixed, so the validation loss is a clean signal. Most of
    # this loss is cell-level noise no model can remove, hence the modest size of the fall.
    assert val["val_loss"].is_monotonic_decreasing
    assert val["val_loss"].iloc[-1] < 0.98 * val["val_loss"].iloc[0]
    ckpts = sorted(p.name for p in (base_run / "checkpoints").iterdir())
    assert any(n.endswith("-last") for n in ckpts)
    _check_best_record(base_run)
    vocab = json.loads((base_run / "vocab.json").read_text())
    assert len(vocab["genes"]) == 500 and vocab["perturbations"][0] == "control"
    scalars = tb_scalars(base_run)
    assert "reduced_train_loss" in scalars and "val/pearson_delta" in scalars
    _check_validation_terms(base_run, scalars, val)


def _check_validation_terms(run: Path, scalars: dict, val: pd.DataFrame) -> None:
    """Every validation logs its per-term losses, and the flow's weights sum them to val_loss."""
    import yaml

    flow = yaml.safe_load((run / "config.yaml").read_text())["flow"]
    weights = {"endpoint": flow["endpoint_weight"], "gene": flow["gene_mse_weight"],
               "pseudobulk": flow["pseudobulk_weight"], "reconstruction": flow["reconstruction_weight"],
               "distribution": flow["distribution_weight"]}  # fmt: skip
    terms = {name: dict(scalars[f"val/{name}"]) for name in weights}
    for step, loss in zip(val["step"], val["val_loss"], strict=True):
        # Lightning stamps a validation's logs with the index of the last training batch
        logged = {name: terms[name][step - 1] for name in weights}
        assert all(v >= 0 for v in logged.values()) and logged["pseudobulk"] > 0, logged
        assert sum(weights[k] * logged[k] for k in weights) == pytest.approx(loss, rel=1e-5)


def _check_best_record(run: Path, top_k: int = 1) -> None:
    """checkpoints/best.json ranks each checkpoint by the validation of its *own* weights.

    A step checkpoint named step=N holds the weights validated at step N + 1 (the validation
    log's step). Stock Lightning saved it before that validation, ranked by the previous one.
    """
    record = json.loads((run / "checkpoints" / "best.json").read_text())
    val = dict(pd.read_csv(run / "val_loss.csv").drop_duplicates("step").itertuples(index=False, name=None))
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir() and not p.name.endswith("-last"))
    assert sorted(record["top_k"]) == kept and len(kept) == min(top_k, len(val))
    for name, score in record["top_k"].items():
        step = int(name.split("-")[0].split("=")[1]) + 1
        assert score == pytest.approx(val[step], rel=1e-6), (name, val)
    assert record["score"] == pytest.approx(min(val.values()), rel=1e-6)  # mode min: the lowest val_loss
    from bionemo_scale.train.release import find_checkpoint

    assert find_checkpoint(run, "best").parent.name == record["best"]


def _offline_metrics(metrics_dir: Path, step: int) -> pd.DataFrame:
    from bionemo_scale.eval.callback import metrics_by_context

    pred = ad.read_h5ad(metrics_dir / f"val_step{step:07d}_pred.h5ad")
    real = ad.read_h5ad(metrics_dir / f"val_step{step:07d}_real.h5ad")
    labels = real.obs["perturbation"].astype(str).to_numpy()
    assert (pred.obs["perturbation"].astype(str).to_numpy() == labels).all()
    return metrics_by_context(
        real.X.toarray(), pred.X.toarray(), labels, real.obs["context"].astype(str).to_numpy(),
        list(real.var_names), "control", "fast",
    )  # fmt: skip


def _check_on_lattice(pred: ad.AnnData) -> None:
    """Validation predictions are what `predict` writes: every value 0 or at least one count of
    the control cell it came from (`flow.count_lattice`, on in the recipes)."""
    from bionemo_scale.data.count_lattice import source_levels

    assert pred.uns["bionemo_scale"]["count_lattice"]
    x = pred.X.toarray()[pred.obs["is_prediction"].to_numpy()]
    assert not ((x > 0) & (x < source_levels(pred)[:, None] - 1e-6)).any() and (x > 0).any()


def _check_callback(run: Path, steps: tuple[int, ...]) -> None:
    scalars = tb_scalars(run)
    _check_on_lattice(ad.read_h5ad(run / "metrics" / f"val_step{steps[-1]:07d}_pred.h5ad"))
    for step in steps:
        logged = pd.read_csv(run / "metrics" / f"val_step{step:07d}.csv")
        offline = _offline_metrics(run / "metrics", step)
        assert list(logged["perturbation"]) == list(offline["perturbation"])
        assert len(logged) == 3  # the demo split's three validation pairs
        for col in ("pearson_delta", "mse", "mae", "discrimination_score_l1"):
            np.testing.assert_allclose(logged[col].to_numpy(float), offline[col].to_numpy(float), rtol=1e-9, atol=1e-12)
            tb = dict(scalars[f"val/{col}"])
            # Lightning stamps a validation's logs with the index of the last training batch.
            assert tb[step - 1] == pytest.approx(np.nanmean(offline[col].to_numpy(float)), rel=1e-5, abs=1e-7)


def test_validation_callback_logs_the_offline_metrics(base_run: Path) -> None:
    _check_callback(base_run, (10, 20, 30))


@pytest.mark.distributed
def test_tensor_parallel_training_matches_and_its_callback_too(demo_data: Path, base_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "tp2"
    cli(*train_args(demo_data, out, 20, "trainer.devices=2", "trainer.tensor_model_parallel_size=2"), nproc=2)
    tp1, tp2 = read_losses(base_run / "train_loss.csv")[:20], read_losses(out / "train_loss.csv")
    assert [s for s, _ in tp2] == list(range(1, 21))
    for (_, a), (_, b) in zip(tp1[:5], tp2[:5], strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    _check_callback(out, (10, 20))


def test_stop_and_go_resume_replays_the_same_losses(demo_data: Path, base_run: Path, tmp_path: Path) -> None:
    """SIGKILL mid-training after the step-10 checkpoint; the resumed run equals the uninterrupted one."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "bionemo_scale.cli", "-q", *train_args(demo_data, out, 30)]
    env = worker_env({"OMP_NUM_THREADS": "2"})
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    seen = kill_when(proc, out / "train_loss.csv", 14)
    assert 14 <= seen < 30, seen
    cli(*train_args(demo_data, out, 30))  # same command: AutoResume picks up the last checkpoint
    killed = read_losses(out / "train_loss.csv")
    reference = dict(read_losses(base_run / "train_loss.csv"))
    resumed = killed[seen:]
    assert resumed[0][0] <= 11  # replayed from the step-10 checkpoint, not from scratch
    assert [s for s, _ in resumed] == list(range(resumed[0][0], 31))
    for step, loss in killed:
        assert loss == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    _check_best_record(out)  # the top-k table survived the restart: one best, the right one


def test_bad_training_input(demo_data: Path, tmp_path: Path) -> None:
    def fails(*args: str) -> str:
        proc = cli(*args, check=False, timeout=120)
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1, proc.stderr[-3000:]
        return lines[0]

    base = ["--data", str(demo_data), "--split", str(SPLIT), "--output", str(tmp_path / "r")]
    assert "unknown recipe 'nope'" in fails("train", "--recipe", "nope", *base)
    assert "did you mean trainer.max_steps" in fails("train", "--recipe", "tiny_cpu", *base, "trainer.max_step=3")
    assert "split file" in fails(
        "train",
        "--recipe",
        "tiny_cpu",
        "--data",
        str(demo_data),
        "--split",
        "missing.toml",
        "--output",
        str(tmp_path / "r"),
    )
    assert "not divisible by TP size 3" in fails(
        "train", "--recipe", "tiny_cpu", *base, "trainer.devices=3", "trainer.tensor_model_parallel_size=3"
    )
    assert "not a multiple of TP × PP" in fails(
        "train", "--recipe", "tiny_cpu", *base, "trainer.devices=3", "trainer.tensor_model_parallel_size=2"
    )
    assert not (tmp_path / "r").exists()


def test_resuming_with_other_settings_is_refused(demo_data: Path, base_run: Path, tmp_path: Path) -> None:
    """A run directory's checkpoints continue only the run that wrote them (longer is fine)."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(base_run, run)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    proc = cli(*train_args(demo_data, run, 30, "flow.pseudobulk_weight=3"), check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "flow.pseudobulk_weight: 1.0 -> 3.0" in lines[0], proc.stderr[-3000:]
    assert "new --output" in lines[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_training_a_finished_run_again_changes_nothing(demo_data: Path, base_run: Path, tmp_path: Path) -> None:
    """`train` on a run that already reached max_steps trains nothing and rewrites nothing, even
    with other resumable settings: config.yaml stays the record of what trained the checkpoints."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(base_run, run)
    before = {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    proc = cli(*train_args(demo_data, run, 30, "eval.enabled=false", "flow.count_lattice=false"), timeout=120)
    assert "already holds 30 trained steps (trainer.max_steps=30): nothing to train" in proc.stderr, proc.stderr[-3000:]
    after = {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert after == before
    from bionemo_scale.train.release import trained_steps

    assert trained_steps(run) == 30 and trained_steps(tmp_path / "nothing") is None


def test_resuming_after_the_split_was_edited_is_refused(demo_data: Path, base_run: Path, tmp_path: Path) -> None:
    """config.yaml stores the split's path only; split.json records what it held out."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(base_run, run)
    record = json.loads((run / "split.json").read_text())
    assert record["perturbed_groups"]["train"] > 0 and len(record["sha256"]) == 64
    record["sha256"] = "0" * 64  # as if the split file had held out other pairs when the run started
    (run / "split.json").write_text(json.dumps(record))
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    proc = cli(*train_args(demo_data, run, 40), check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "now holds out other pairs" in lines[0], proc.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_lowering_save_top_k_on_resume_trims_the_old_checkpoints(demo_data: Path, tmp_path: Path) -> None:
    """The restored top-k table is kept on resume, and cut down when save_top_k was lowered."""
    run = tmp_path / "topk"
    cli(*train_args(demo_data, run, 30, "checkpoint.save_top_k=3"))
    _check_best_record(run, top_k=3)
    cli(*train_args(demo_data, run, 40, "checkpoint.save_top_k=1"))
    _check_best_record(run, top_k=1)


def test_prior_cover_and_self_rate_reach_the_training_batches(demo_data: Path, base_run: Path, tmp_path: Path) -> None:
    """The two prior options change what the model is shown (same seed, same sets otherwise)."""
    out = tmp_path / "cover"
    cli(*train_args(demo_data, out, 10, "model.prior_cover=true", "model.prior_self_rate=0.5"))
    base, cover = read_losses(base_run / "train_loss.csv")[:10], read_losses(out / "train_loss.csv")
    assert [s for s, _ in cover] == list(range(1, 11))
    assert all(np.isfinite(v) for _, v in cover)
    assert any(abs(a - b) > 1e-6 for (_, a), (_, b) in zip(base, cover, strict=True))


def test_prior_rank_is_applied_and_saved_with_the_run(demo_data: Path, base_run: Path, tmp_path: Path) -> None:
    """`model.prior_rank` changes the prior the model trains on, and the run keeps that basis."""
    from bionemo_scale.data.prior import AdditivePrior

    out = tmp_path / "rank"
    cli(*train_args(demo_data, out, 10, "model.prior_rank=3"))
    saved = AdditivePrior.load(out / "prior.safetensors")
    assert saved.rank == 3 and AdditivePrior.load(base_run / "prior.safetensors").rank is None
    base, ranked = read_losses(base_run / "train_loss.csv")[:10], read_losses(out / "train_loss.csv")
    assert any(abs(a - b) > 1e-6 for (_, a), (_, b) in zip(base, ranked, strict=True))


def test_matmul_precision_is_a_training_setting(demo_data: Path, base_run: Path, tmp_path: Path) -> None:
    """`trainer.matmul_precision=medium` trains (bf16 products where the hardware has them), is recorded
    with the run, and a resume may not change it."""
    import yaml

    from tests.train.conftest import reduced_precision_changes_matmuls

    out = tmp_path / "medium"
    cli(*train_args(demo_data, out, 10, "trainer.matmul_precision=medium"))
    assert yaml.safe_load((out / "config.yaml").read_text())["trainer"]["matmul_precision"] == "medium"
    base, medium = read_losses(base_run / "train_loss.csv")[:10], read_losses(out / "train_loss.csv")
    assert [s for s, _ in medium] == list(range(1, 11)) and all(np.isfinite(v) for _, v in medium)
    # close to the full-precision run at the first step, before the trajectories can drift apart
    assert abs(medium[0][1] - base[0][1]) < 0.02 * abs(base[0][1])
    if reduced_precision_changes_matmuls():  # otherwise the setting has no numerical effect to see
        assert any(abs(a - b) > 1e-7 for (_, a), (_, b) in zip(base, medium, strict=True))
    proc = cli(*train_args(demo_data, out, 20), check=False)
    assert proc.returncode != 0 and "trainer.matmul_precision: medium -> highest" in proc.stdout + proc.stderr


def test_bf16_autocast_is_a_training_setting(demo_data: Path, base_run: Path, tmp_path: Path) -> None:
    """`trainer.autocast=bf16` trains through NeMo's strategy (bf16 matmuls, float32 weights), is
    recorded with the run, and a resume may not change it."""
    import yaml

    out = tmp_path / "autocast"
    cli(*train_args(demo_data, out, 10, "trainer.autocast=bf16"))
    assert yaml.safe_load((out / "config.yaml").read_text())["trainer"]["autocast"] == "bf16"
    base, half = read_losses(base_run / "train_loss.csv")[:10], read_losses(out / "train_loss.csv")
    assert [s for s, _ in half] == list(range(1, 11)) and all(np.isfinite(v) for _, v in half)
    # bf16 rounding moves every loss a little, the first one included, and never far
    assert half[0][1] != base[0][1]
    assert abs(half[0][1] - base[0][1]) < 0.02 * abs(base[0][1])
    proc = cli(*train_args(demo_data, out, 20), check=False)
    assert proc.returncode != 0 and "trainer.autocast: bf16 -> off" in proc.stdout + proc.stderr


@pytest.mark.distributed
def test_bf16_autocast_trains_across_pipeline_stages(demo_data: Path, base_run: Path, tmp_path: Path) -> None:
    """PP=2 under `trainer.autocast=bf16`: the stages exchange float32 activations (the buffers'
    dtype), and the run trains like the float32 one to within bf16 rounding."""
    out = tmp_path / "pp2_autocast"
    layout = ("trainer.devices=2", "trainer.pipeline_model_parallel_size=2", "trainer.autocast=bf16")
    cli(*train_args(demo_data, out, 10, *layout), nproc=2)
    base, half = read_losses(base_run / "train_loss.csv")[:10], read_losses(out / "train_loss.csv")
    assert [s for s, _ in half] == list(range(1, 11)) and all(np.isfinite(v) for _, v in half)
    assert abs(half[0][1] - base[0][1]) < 0.02 * abs(base[0][1])


def test_the_fused_cpu_adam_is_the_default_and_the_loop_still_trains(
    demo_data: Path, base_run: Path, tmp_path: Path
) -> None:
    """The default run steps torch's fused CPU Adam and `optim.cpu_fused_adam=false` its per-tensor
    loop: the same update to float32 rounding, so the losses agree closely. Whether they also agree
    bit for bit depends on the CPU's kernels and on the step sizes (at warm-up's small learning
    rates the two updates round to the same weights on some hosts), so which kernel each run
    stepped is read from its log, not inferred from the losses."""
    out = tmp_path / "loop"
    proc = cli(*train_args(demo_data, out, 10, "optim.cpu_fused_adam=false"), quiet=False)
    fused, loop = read_losses(base_run / "train_loss.csv")[:10], read_losses(out / "train_loss.csv")
    assert [s for s, _ in loop] == list(range(1, 11))
    assert fused[0] == loop[0]  # the first loss comes before any optimizer step
    for (_, a), (_, b) in zip(fused, loop, strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    switched = "Adam runs torch's fused CPU kernel"
    assert switched in base_log(base_run).read_text(), "the default run did not step the fused kernel"
    assert switched not in proc.stdout + proc.stderr, "optim.cpu_fused_adam=false did not reach the optimizer"
