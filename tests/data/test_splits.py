"""cell-load style TOML splits and the split-col alternative."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bionemo_scale.config import PreprocessConfig
from bionemo_scale.data.preprocess import preprocess
from bionemo_scale.data.splits import SplitSpec, split_summary
from bionemo_scale.data.store import ProcessedDataset
from bionemo_scale.errors import ScaleError

CFG = dict(pert_col="gene", control="ctrl", context_col="cell_line", batch_col="plate")


@pytest.fixture
def data(counts_h5ad: Path, tmp_path: Path) -> ProcessedDataset:
    preprocess(counts_h5ad, tmp_path / "out", PreprocessConfig(**CFG, dataset_name="screen"), progress=False)
    return ProcessedDataset(tmp_path / "out")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "split.toml"
    path.write_text(text)
    return path


def _pairs(data: ProcessedDataset, labels: np.ndarray, which: str) -> set[tuple[str, str]]:
    g, idx = data.index.groups, data.index
    m = (labels == which) & ~idx.is_control
    return {(idx.contexts[c], idx.perturbations[p]) for c, p in zip(g["context_id"][m], g["pert_id"][m])}


def test_zeroshot_and_fewshot(data: ProcessedDataset, tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '[datasets]\nscreen = "/somewhere"\n[training]\nscreen = "train"\n'
        '[zeroshot]\n"screen.ctxB" = "test"\n'
        '[fewshot."ctxA"]\nval = ["KO2"]\ntest = ["KO2+KO1"]\n',
    )
    labels = data.split_labels(path)
    assert _pairs(data, labels, "test") == {("ctxB", "KO1"), ("ctxB", "KO2"), ("ctxB", "KO1+KO2"), ("ctxA", "KO1+KO2")}
    assert _pairs(data, labels, "val") == {("ctxA", "KO2")}
    assert _pairs(data, labels, "train") == {("ctxA", "KO1")}
    summary = split_summary(data.index, labels)
    assert summary["test"]["pairs"] == 4 and summary["val"]["pairs"] == 1
    # the group ids served for training are exactly the train pairs (2 batches each)
    assert len(data.groups_in(path, "train")) == 2


def test_round_trip_through_toml(data: ProcessedDataset, tmp_path: Path) -> None:
    spec = SplitSpec(zeroshot={"ctxB": "val"}, fewshot={"ctxA": {"val": [], "test": ["KO1"]}})
    path = _write(tmp_path, spec.to_toml())
    again = SplitSpec.from_toml(path)
    assert again.zeroshot == spec.zeroshot and again.fewshot == spec.fewshot


@pytest.mark.parametrize(
    "text,match",
    [
        ('[zeroshot]\n"ctxZ" = "test"\n', "context 'ctxZ'"),
        ('[fewshot."ctxA"]\ntest = ["NOPE"]\n', "perturbation 'NOPE'"),
        ('[fewshot."ctxA"]\ntest = ["ctrl"]\n', "control label"),
        ('[fewshot."ctxA"]\nval = ["KO1"]\ntest = ["KO1"]\n', "both val and test"),
        ('[zeroshot]\n"ctxA" = "train"\n', 'use "val" or "test"'),
        ("[holdout]\nx = 1\n", "unknown section"),
        ("[zeroshot\n", "not valid TOML"),
        ('[zeroshot]\n"other.ctxB" = "test"\n', "context 'other.ctxB'"),
    ],
)
def test_bad_specs_are_errors(data: ProcessedDataset, tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ScaleError, match=match):
        data.split_labels(_write(tmp_path, text))


def test_missing_split_file(data: ProcessedDataset, tmp_path: Path) -> None:
    with pytest.raises(ScaleError, match="does not exist"):
        data.split_labels(tmp_path / "nope.toml")


def test_split_col_requires_it_at_preprocess(data: ProcessedDataset) -> None:
    with pytest.raises(ScaleError, match="without --split-col"):
        data.split_labels("split-col")
