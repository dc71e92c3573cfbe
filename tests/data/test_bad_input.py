"""Every bad input gets one line naming problem and fix, exit code 2, and no output left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from bionemo_scale.cli import main
from tests.data.conftest import PP_ARGS, make_counts_adata


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(["-q", *args])
    err = capsys.readouterr().err.strip()
    return rc, err


def _assert_clean_failure(rc: int, err: str, out: Path, *needles: str) -> None:
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "error:" in lines[0] and "Fix:" in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.tmp") for p in out.parent.iterdir())


def _h5ad(tmp_path: Path, mutate=None, name: str = "in.h5ad") -> Path:
    a = make_counts_adata()
    if mutate is not None:
        a = mutate(a) or a
    path = tmp_path / name
    a.write_h5ad(path)
    return path


def _set_value(value: float):
    def mutate(a):
        X = a.X.toarray()
        X[7, 3] = value
        a.X = sp.csr_matrix(X)

    return mutate


def test_missing_column(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = [
        "preprocess",
        str(_h5ad(tmp_path)),
        str(out),
        "--pert-col",
        "guide",
        "--control",
        "ctrl",
        "--context-col",
        "cell_line",
    ]
    _assert_clean_failure(*_run(args, capsys), out, "'guide'", "available columns")


def test_control_label_absent(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["preprocess", str(_h5ad(tmp_path)), str(out), *PP_ARGS]
    args[args.index("ctrl")] = "non-targeting"
    _assert_clean_failure(*_run(args, capsys), out, "'non-targeting'", "--control")


def test_context_without_controls(tmp_path: Path, capsys) -> None:
    def drop(a):
        keep = ~((a.obs["cell_line"] == "ctxB") & (a.obs["gene"] == "ctrl")).to_numpy()
        return a[keep].copy()

    out = tmp_path / "out"
    _assert_clean_failure(
        *_run(["preprocess", str(_h5ad(tmp_path, drop)), str(out), *PP_ARGS], capsys), out, "ctxB", "no control"
    )


@pytest.mark.parametrize("value,word", [(np.nan, "NaN"), (np.inf, "infinite"), (-1.0, "negative")])
def test_bad_values(tmp_path: Path, capsys, value: float, word: str) -> None:
    out = tmp_path / "out"
    rc, err = _run(["preprocess", str(_h5ad(tmp_path, _set_value(value))), str(out), *PP_ARGS], capsys)
    _assert_clean_failure(rc, err, out, word, "cell row 7")


def test_empty_file(tmp_path: Path, capsys) -> None:
    src = tmp_path / "empty.h5ad"
    src.write_bytes(b"")
    out = tmp_path / "out"
    _assert_clean_failure(*_run(["preprocess", str(src), str(out), *PP_ARGS], capsys), out, "empty")


def test_corrupt_file(tmp_path: Path, capsys) -> None:
    good = _h5ad(tmp_path).read_bytes()
    src = tmp_path / "corrupt.h5ad"
    src.write_bytes(good[: len(good) // 3])
    out = tmp_path / "out"
    _assert_clean_failure(*_run(["preprocess", str(src), str(out), *PP_ARGS], capsys), out, "corrupt.h5ad")


def test_not_an_h5ad(tmp_path: Path, capsys) -> None:
    src = tmp_path / "table.h5ad"
    src.write_text("cell,gene\n1,2\n")
    out = tmp_path / "out"
    _assert_clean_failure(*_run(["preprocess", str(src), str(out), *PP_ARGS], capsys), out, "not a readable HDF5")


def test_duplicate_genes(tmp_path: Path, capsys) -> None:
    def dup(a):
        names = a.var_names.to_list()
        names[4] = names[2]
        a.var_names = names

    out = tmp_path / "out"
    _assert_clean_failure(
        *_run(["preprocess", str(_h5ad(tmp_path, dup)), str(out), *PP_ARGS], capsys), out, "duplicate gene", "g2"
    )


def test_output_exists_without_overwrite(tmp_path: Path, capsys) -> None:
    src = _h5ad(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc, err = _run(["preprocess", str(src), str(out), *PP_ARGS], capsys)
    assert rc == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"
    assert _run(["preprocess", str(src), str(out), *PP_ARGS, "--overwrite"], capsys)[0] == 0
    assert not (out / "keep.txt").exists() and (out / "scdl").is_dir()


def test_set_size_below_one(tmp_path: Path, capsys) -> None:
    src, out = _h5ad(tmp_path), tmp_path / "out"
    assert _run(["preprocess", str(src), str(out), *PP_ARGS], capsys)[0] == 0
    rc, err = _run(["sample", str(out), "--set-size", "0"], capsys)
    assert rc == 2 and "set size must be >= 1" in err and len(err.splitlines()) == 1


def test_failure_midway_leaves_no_partial_output(tmp_path: Path, capsys) -> None:
    """A NaN in the *last* chunk is found after work has started; still nothing is published."""

    def late_nan(a):
        X = a.X.toarray()
        X[-1, 0] = np.nan
        a.X = sp.csr_matrix(X)

    out = tmp_path / "out"
    rc, err = _run(["preprocess", str(_h5ad(tmp_path, late_nan)), str(out), *PP_ARGS, "--chunk-rows", "10"], capsys)
    _assert_clean_failure(rc, err, out, "NaN")


def test_console_script_exit_code(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bionemo_scale.cli",
            "-q",
            "preprocess",
            str(tmp_path / "missing.h5ad"),
            str(out),
            *PP_ARGS,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "does not exist" in proc.stderr and not out.exists()
