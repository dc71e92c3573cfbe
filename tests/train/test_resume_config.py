"""Which settings a resumed run may change (pure checks; the CLI refusal is in test_training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bionemo_scale.config import dump_yaml
from bionemo_scale.errors import ScaleError
from bionemo_scale.recipes import get_recipe
from bionemo_scale.train.resume import check_resume, check_split_unchanged, resume_conflicts, split_record


def _cfg(**updates: object):
    cfg = get_recipe("tiny_cpu")
    for dotted, value in updates.items():
        section, key = dotted.split("__")
        cfg = cfg.model_copy(update={section: getattr(cfg, section).model_copy(update={key: value})})
    return cfg


def test_longer_runs_and_new_checkpoint_settings_may_resume() -> None:
    old = _cfg().model_dump(mode="json")
    new = _cfg(trainer__max_steps=5000, trainer__val_check_interval=7, checkpoint__save_top_k=3, data__num_workers=2)
    assert resume_conflicts(old, new.model_dump(mode="json")) == []


def test_model_loss_and_seed_changes_are_conflicts() -> None:
    old = _cfg().model_dump(mode="json")
    new = _cfg(model__prior_rank="auto", flow__pseudobulk_weight=10.0, trainer__seed=7, trainer__devices=2)
    assert resume_conflicts(old, new.model_dump(mode="json")) == [
        "flow.pseudobulk_weight: 1.0 -> 10.0",
        "model.prior_rank: None -> auto",
        "trainer.devices: 1 -> 2",
        "trainer.seed: 1234 -> 7",
    ]


def test_a_run_written_before_a_setting_existed_had_its_default() -> None:
    old = _cfg().model_dump(mode="json")
    del old["model"]["prior_rank"], old["model"]["prior_basis_leave_one_out"]  # keys added after such runs
    del old["model"]["center_controls"], old["trainer"]["matmul_precision"], old["trainer"]["autocast"]
    assert resume_conflicts(old, _cfg().model_dump(mode="json")) == []
    bf16 = _cfg(trainer__autocast="bf16").model_dump(mode="json")
    assert resume_conflicts(old, bf16) == ["trainer.autocast: off -> bf16"]
    medium = _cfg(trainer__matmul_precision="medium").model_dump(mode="json")
    assert resume_conflicts(old, medium) == ["trainer.matmul_precision: highest -> medium"]
    centred = _cfg(model__center_controls=True).model_dump(mode="json")
    assert resume_conflicts(old, centred) == ["model.center_controls: False -> True"]
    assert resume_conflicts(old, _cfg(model__prior_rank=8).model_dump(mode="json")) == ["model.prior_rank: None -> 8"]
    # a run with a rank but no leave-one-out key used the leave-one-out basis: not the default
    ranked = _cfg(model__prior_rank=8).model_dump(mode="json")
    del ranked["model"]["prior_basis_leave_one_out"]
    assert resume_conflicts(ranked, _cfg(model__prior_rank=8).model_dump(mode="json")) == [
        "model.prior_basis_leave_one_out: <unset> -> False"
    ]
    # a key whose default is not the old behaviour stays a conflict
    no_term = _cfg().model_dump(mode="json")
    del no_term["flow"]["pseudobulk_weight"]
    assert resume_conflicts(no_term, _cfg().model_dump(mode="json")) == ["flow.pseudobulk_weight: <unset> -> 1.0"]


def test_a_run_from_before_the_fused_cpu_adam_resumes_only_with_the_loop() -> None:
    # the fused kernel is the default now, but it does not reproduce the loop's steps bit for bit
    old = _cfg().model_dump(mode="json")
    del old["optim"]["cpu_fused_adam"]
    assert resume_conflicts(old, _cfg().model_dump(mode="json")) == ["optim.cpu_fused_adam: False -> True"]
    assert resume_conflicts(old, _cfg(optim__cpu_fused_adam=False).model_dump(mode="json")) == []


def test_check_resume_reads_the_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(_cfg()))
    check_resume(_cfg(optim__lr=0.5), run)  # no checkpoints yet: nothing to continue, nothing to refuse
    (run / "checkpoints" / "step=9-last").mkdir(parents=True)
    check_resume(_cfg(trainer__max_steps=900), run)
    with pytest.raises(ScaleError, match=r"optim.lr: 0.001 -> 0.5.*new --output"):
        check_resume(_cfg(optim__lr=0.5), run)


def test_the_split_is_compared_by_content_once_recorded(tmp_path: Path) -> None:
    # the same split named by another path (another working directory, or `launch` making it
    # absolute) resumes; what it holds out is checked by check_split_unchanged instead
    run = tmp_path / "run"
    (run / "checkpoints" / "step=9-last").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(_cfg(data__split="splits/s.toml")))
    moved = _cfg(data__split=str(tmp_path / "splits" / "s.toml"))
    with pytest.raises(ScaleError, match=r"data\.split: splits/s.toml -> "):
        check_resume(moved, run)  # a run from before split.json: only the path can be compared
    (run / "split.json").write_text('{"sha256": "x"}')
    check_resume(moved, run)


def test_the_early_check_skips_the_vocabulary_sizes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints" / "step=9-last").mkdir(parents=True)
    trained = _cfg(model__n_genes=500, model__n_parts=40)  # what train wrote, vocabulary filled in
    (run / "config.yaml").write_text(dump_yaml(trained))
    check_resume(_cfg(), run, before_vocabulary=True)  # the CLI's config, before the data is read
    with pytest.raises(ScaleError, match=r"model\.n_genes: 500 -> 0"):
        check_resume(_cfg(), run)


def test_a_folder_that_is_not_a_run_is_refused(tmp_path: Path) -> None:
    """Training into, say, a dataset folder used to mix checkpoints into it."""
    check_resume(_cfg(), tmp_path / "new")  # a new directory is fine
    (tmp_path / "empty").mkdir()
    check_resume(_cfg(), tmp_path / "empty")  # so is an empty one
    data = tmp_path / "dataset"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    with pytest.raises(ScaleError, match=r"other content \(manifest.json\), not a bionemo-scale run"):
        check_resume(_cfg(), data)
    starting = tmp_path / "starting"  # another rank or Slurm got there first: still a run
    (starting / "logs").mkdir(parents=True)
    (starting / "slurm-42.out").write_text("")
    (starting / "launch.sbatch").write_text("#!/bin/bash")
    check_resume(_cfg(), starting)
    with pytest.raises(ScaleError, match="is a file"):
        check_resume(_cfg(), data / "manifest.json")


def test_best_checkpoint_must_be_unambiguous(tmp_path: Path) -> None:
    """'best' used to fall back silently to the last checkpoint, or to the latest of several top-k."""
    from bionemo_scale.train.release import find_checkpoint

    def ckpt(name: str) -> None:
        (tmp_path / "checkpoints" / name / "weights").mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "weights" / "metadata.json").write_text("{}")

    ckpt("step=9-consumed_samples=80.0-last")
    with pytest.raises(ScaleError, match="no best-by-monitor checkpoint"):
        find_checkpoint(tmp_path, "best")
    ckpt("step=4-consumed_samples=40.0")
    assert find_checkpoint(tmp_path, "best").parent.name == "step=4-consumed_samples=40.0"
    assert find_checkpoint(tmp_path, "last").parent.name.endswith("-last")
    ckpt("step=6-consumed_samples=56.0")
    with pytest.raises(ScaleError, match="2 top-k checkpoints"):
        find_checkpoint(tmp_path, "best")
    # a run that records its best (checkpoints/best.json, written by ScaleModelCheckpoint) is not ambiguous
    (tmp_path / "checkpoints" / "best.json").write_text('{"best": "step=4-consumed_samples=40.0"}')
    assert find_checkpoint(tmp_path, "best").parent.name == "step=4-consumed_samples=40.0"
    (tmp_path / "checkpoints" / "best.json").write_text('{"best": "step=5-gone"}')  # deleted since: refuse
    with pytest.raises(ScaleError, match="2 top-k checkpoints"):
        find_checkpoint(tmp_path, "best")
    (tmp_path / "checkpoints" / "best.json").write_text("{half")
    with pytest.raises(ScaleError, match=r"best\.json is unreadable"):
        find_checkpoint(tmp_path, "best")


def test_the_split_record_names_what_was_held_out(tmp_path: Path) -> None:
    import json
    import types

    import numpy as np
    import pandas as pd

    index = types.SimpleNamespace(
        contexts=["k562", "a549"], batches=["b0"], perturbations=["control", "KLF1", "TGFBR2"],
        groups=pd.DataFrame({"context_id": [0, 0, 0, 1, 1], "batch_id": [0] * 5, "pert_id": [0, 1, 2, 0, 1]}),
        is_control=np.array([True, False, False, True, False]),
    )  # fmt: skip
    labels = np.array(["train", "train", "test", "train", "val"])
    record = split_record(index, labels, "s.toml")
    assert record["perturbed_groups"] == {"train": 1, "val": 1, "test": 1}
    moved = split_record(index, np.array(["train", "train", "val", "train", "val"]), "s.toml")
    assert moved["sha256"] != record["sha256"]
    # the same assignment in another group order (a re-preprocessed dataset) is the same split
    order = [4, 3, 2, 1, 0]
    groups = index.groups.iloc[order].reset_index(drop=True)
    shuffled = types.SimpleNamespace(**{**vars(index), "groups": groups, "is_control": index.is_control[order]})
    assert split_record(shuffled, labels[order], "s.toml")["sha256"] == record["sha256"]

    run = tmp_path / "run"
    (run / "checkpoints" / "step=9-last").mkdir(parents=True)
    (run / "split.json").write_text(json.dumps(record))
    check_split_unchanged(run, record)
    with pytest.raises(ScaleError, match=r"now holds out other pairs.*restore the split file"):
        check_split_unchanged(run, moved)
    (run / "split.json").write_text("{not json")
    with pytest.raises(ScaleError, match=r"split\.json is unreadable"):
        check_split_unchanged(run, record)
