"""Every bad input gets one line naming problem and fix, exit code 2, and no output left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from bionemo_scale.cli import main
from bionemo_scale.errors import ScaleError
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


def test_counts_with_a_stray_fraction_are_not_taken_for_log1p(tmp_path: Path, capsys) -> None:
    # one 1.5 among raw counts used to make the whole matrix "log1p": normalisation silently skipped
    out = tmp_path / "out"
    rc, err = _run(["preprocess", str(_h5ad(tmp_path, _set_value(1.5))), str(out), *PP_ARGS], capsys)
    _assert_clean_failure(rc, err, out, "integer counts with a few non-integer values", "row 7")


def test_log1p_with_linear_rows_later_is_refused(tmp_path: Path, capsys) -> None:
    # detection reads the first chunk; every later chunk of a log1p input is range-checked too
    def mixed(a):
        X = a.X.toarray()
        L = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
        L[-5:] = X[-5:] * 10 + 0.5  # linear values in the last rows, above any log1p range
        a.X = sp.csr_matrix(L.astype(np.float32))

    out = tmp_path / "out"
    rc, err = _run(["preprocess", str(_h5ad(tmp_path, mixed)), str(out), *PP_ARGS, "--chunk-rows", "10"], capsys)
    _assert_clean_failure(rc, err, out, "hold values up to", "log1p(normalize_total) values in every row")


@pytest.mark.parametrize("column", ["gene", "cell_line", "plate"])
def test_an_empty_label_is_refused_like_a_missing_one(tmp_path: Path, capsys, column: str) -> None:
    def blank(a):
        labels = a.obs[column].astype(str)
        labels.iloc[3] = " "
        a.obs[column] = labels

    out = tmp_path / "out"
    rc, err = _run(["preprocess", str(_h5ad(tmp_path, blank)), str(out), *PP_ARGS], capsys)
    _assert_clean_failure(rc, err, out, "1 cells have an empty", f"obs['{column}']")


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
    assert rc == 2 and "already exists" in err and "--overwrite" not in err  # not a dataset: no such advice
    assert (out / "keep.txt").read_text() == "precious"
    rc, err = _run(["preprocess", str(src), str(out), *PP_ARGS, "--overwrite"], capsys)
    assert rc == 2 and "not a previous processed dataset" in err  # --overwrite replaces datasets only
    assert (out / "keep.txt").read_text() == "precious"


def test_set_size_below_one(tmp_path: Path, capsys) -> None:
    src, out = _h5ad(tmp_path), tmp_path / "out"
    assert _run(["preprocess", str(src), str(out), *PP_ARGS], capsys)[0] == 0
    for flag in (["--set-size", "0"], ["-n", "-3"]):
        with pytest.raises(SystemExit) as exit_info:  # argparse refuses it, in the same one-line form
            _run(["sample", str(out), *flag], capsys)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
        assert f"argument {flag[0]}: must be >= 1" in err and "Fix:" in err


def test_a_set_size_beyond_memory_is_one_line(tmp_path: Path, capsys) -> None:
    """An absurd set size fails at allocation: one line naming memory and the knobs, no output."""
    src, data = _h5ad(tmp_path), tmp_path / "data"
    assert _run(["preprocess", str(src), str(data), *PP_ARGS], capsys)[0] == 0
    out, split = tmp_path / "PRED.h5ad", tmp_path / "split.toml"
    split.write_text('[fewshot.ctxA]\nval = []\ntest = ["KO2"]\n')
    rc, err = _run(["baseline", "--method", "control", "--data", str(data), "--split", str(split),
                    "--output", str(out), "--set-size", str(10**12)], capsys)  # fmt: skip
    _assert_clean_failure(rc, err, out, "out of memory", "--set-size")


def test_prior_rank_on_a_baseline_that_has_no_prior(tmp_path: Path, capsys) -> None:
    out = tmp_path / "PRED.h5ad"
    rc, err = _run(["baseline", "--method", "context-mean", "--data", str(tmp_path / "nowhere"), "--split",
                    str(tmp_path / "s.toml"), "--output", str(out), "--prior-rank", "3"], capsys)  # fmt: skip
    _assert_clean_failure(rc, err, out, "--prior-rank applies to the additive baseline only", "--method additive")


@pytest.mark.parametrize("target", ["missing", "folder", "file"])
def test_a_symlink_as_output_is_refused(tmp_path: Path, capsys, target: str) -> None:
    """Writing "onto" a link would replace the link itself (a broken one crashed the rename)."""
    src = _h5ad(tmp_path)
    dest = tmp_path / "target"
    if target == "folder":
        dest.mkdir()
        (dest / "manifest.json").write_text("{}")  # looks like a dataset: --overwrite alone would replace it
    elif target == "file":
        dest.write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(dest)
    rc, err = _run(["preprocess", str(src), str(link), *PP_ARGS, "--overwrite"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "is a symbolic link" in err and "Fix:" in err
    assert link.is_symlink() and os.readlink(link) == str(dest)
    assert dest.exists() == (target != "missing")


def test_failure_midway_leaves_no_partial_output(tmp_path: Path, capsys) -> None:
    """A NaN in the *last* chunk is found after work has started; still nothing is published."""

    def late_nan(a):
        X = a.X.toarray()
        X[-1, 0] = np.nan
        a.X = sp.csr_matrix(X)

    out = tmp_path / "out"
    rc, err = _run(["preprocess", str(_h5ad(tmp_path, late_nan)), str(out), *PP_ARGS, "--chunk-rows", "10"], capsys)
    _assert_clean_failure(rc, err, out, "NaN")


@pytest.mark.parametrize("command", ["preprocess", "evaluate"])
def test_a_write_that_runs_out_of_room_is_one_line(tmp_path: Path, capsys, command: str) -> None:
    # a full disk or a file-size limit (here `ulimit -f 8`) used to end in an OSError traceback
    import resource

    src, data = _h5ad(tmp_path), tmp_path / "data"
    args = ["preprocess", str(src), str(tmp_path / "out"), *PP_ARGS]
    if command == "evaluate":
        assert _run(["preprocess", str(src), str(data), *PP_ARGS], capsys)[0] == 0
        pred = tmp_path / "pred" / "PRED.h5ad"
        split = tmp_path / "split.toml"
        split.write_text('[fewshot.ctxA]\nval = []\ntest = ["KO2"]\n')
        assert _run(["baseline", "--method", "additive", "--data", str(data), "--split", str(split),
                     "--output", str(pred)], capsys)[0] == 0  # fmt: skip
        args = ["evaluate", "--pred", str(pred), "--real", str(pred.with_name("REAL.h5ad")), "--pert-col",
                "perturbation", "--control", "ctrl", "--output", str(tmp_path / "out")]  # fmt: skip
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 1024, 8 * 1024))  # noqa: E731
    proc = subprocess.run([sys.executable, "-m", "bionemo_scale.cli", "-q", *args], capture_output=True, text=True,
                          check=False, preexec_fn=limit, timeout=300)  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "File too large" in lines[0] and "ulimit -f" in lines[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


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


# -- found by the bad-input sweep of 2026-11-24 (each used to end in a traceback or worse) -------
def test_usage_errors_are_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sample"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "required: data" in err and "--help" in err


def test_csr_with_out_of_range_columns_is_refused(tmp_path: Path, capsys) -> None:
    """scipy does not bounds-check CSR indices; unchecked, the gather wrote outside its buffer."""
    import h5py

    src = _h5ad(tmp_path)
    with h5py.File(src, "r+") as f:
        f["X/indices"][3] = 40 + 7  # the fixture has 40 genes
    out = tmp_path / "out"
    rc, err = _run(["preprocess", str(src), str(out), *PP_ARGS], capsys)
    _assert_clean_failure(rc, err, out, "column indices outside its 40 genes")


def test_empty_gene_name_is_refused(tmp_path: Path, capsys) -> None:
    def blank(a):
        a.var_names = ["", *a.var_names[1:]]

    out = tmp_path / "out"
    rc, err = _run(["preprocess", str(_h5ad(tmp_path, blank)), str(out), *PP_ARGS], capsys)
    _assert_clean_failure(rc, err, out, "empty or contain a line break")


def test_gene_names_with_spaces_keep_their_columns(tmp_path: Path, capsys) -> None:
    """genes.txt is one name per line: a name with a space used to become two genes."""
    from bionemo_scale.data.store import ProcessedDataset

    def spaced(a):
        a.var_names = ["HLA A", *a.var_names[1:]]

    out = tmp_path / "out"
    assert _run(["preprocess", str(_h5ad(tmp_path, spaced)), str(out), *PP_ARGS], capsys)[0] == 0
    data = ProcessedDataset(out)
    assert data.n_genes == 40 and data.genes[0] == "HLA A"
    (out / "genes.txt").write_text("\n".join(data.genes[:-1]) + "\n")  # a damaged panel
    with pytest.raises(ScaleError, match="lists 39 genes but the dataset has 40"):
        ProcessedDataset(out)


@pytest.mark.parametrize(
    "text,needle",
    [
        ('zeroshot = "test"\n', "[zeroshot]"),
        ('[fewshot."ctxA"]\nval = "KO1"\n', "must be lists of labels"),
    ],
)
def test_split_values_of_the_wrong_shape(tmp_path: Path, text: str, needle: str) -> None:
    from bionemo_scale.data.splits import SplitSpec

    path = tmp_path / "split.toml"
    path.write_text(text)
    with pytest.raises(ScaleError) as info:
        SplitSpec.from_toml(path)
    assert needle in info.value.one_line() and "Fix:" in info.value.one_line()


@pytest.mark.parametrize("kind", ["folder", "binary"])
def test_split_and_config_files_that_are_not_text(tmp_path: Path, kind: str) -> None:
    from bionemo_scale.config import load_yaml
    from bionemo_scale.data.splits import SplitSpec

    path = tmp_path / "input"
    if kind == "folder":
        path.mkdir()
    else:
        path.write_bytes(bytes(range(128, 256)))
    for read in (SplitSpec.from_toml, load_yaml):
        with pytest.raises(ScaleError, match="is a folder" if kind == "folder" else "not a UTF-8 text file"):
            read(path)


def test_empty_config_file_is_refused(tmp_path: Path) -> None:
    from bionemo_scale.config import load_yaml

    path = tmp_path / "c.yaml"
    path.write_text("")
    with pytest.raises(ScaleError, match="is empty"):
        load_yaml(path)


def test_synth_refuses_more_combinations_than_pairs(tmp_path: Path, capsys) -> None:
    out = tmp_path / "s"
    rc, err = _run(
        ["synth", str(out), "--cells", "200", "--genes", "20", "--perturbations", "2", "--combinations", "10"], capsys
    )
    _assert_clean_failure(rc, err, out, "exceeds the 1 pairs")


@pytest.mark.parametrize(
    "extra,needle", [(["--keep-obs", "cell_id"], "written by preprocess"), (["--combo-sep", ""], "combo_sep")]
)
def test_preprocess_option_conflicts(tmp_path: Path, capsys, extra: list[str], needle: str) -> None:
    out = tmp_path / "out"
    rc, err = _run(["preprocess", str(_h5ad(tmp_path)), str(out), *PP_ARGS, *extra], capsys)
    _assert_clean_failure(rc, err, out, needle)


def test_output_under_a_file_or_onto_a_folder(tmp_path: Path) -> None:
    from bionemo_scale.atomic import atomic_file, check_output_free

    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(ScaleError, match="is a file, not a folder"):
        check_output_free(blocker / "sub" / "out.h5ad", overwrite=False)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ScaleError, match="is a folder"), atomic_file(folder, overwrite=True):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder"]  # no temporary left


def test_damaged_dataset_side_files(tmp_path: Path, capsys) -> None:
    import json

    from bionemo_scale.data.store import ProcessedDataset

    out = tmp_path / "out"
    assert _run(["preprocess", str(_h5ad(tmp_path)), str(out), *PP_ARGS], capsys)[0] == 0
    (out / "obs.parquet").unlink()
    with pytest.raises(ScaleError, match=r"missing obs\.parquet"):
        ProcessedDataset(out).obs  # noqa: B018 (the property loads the file)
    index = json.loads((out / "index.json").read_text())
    del index["control_label"]
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ScaleError, match=r"index.json in .* lacks \['control_label'\]"):
        ProcessedDataset(out)


def test_damaged_compressed_chunk_is_one_line(tmp_path: Path, capsys) -> None:
    """A flipped byte inside a gzip chunk of X used to surface as h5py's OSError traceback."""
    import h5py

    src = tmp_path / "gz.h5ad"
    make_counts_adata().write_h5ad(src, compression="gzip")
    with h5py.File(src, "r") as f:
        info = f["X/data"].id.get_chunk_info(0)
    with src.open("r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes(16))
    out = tmp_path / "out"
    rc, err = _run(["preprocess", str(src), str(out), *PP_ARGS], capsys)
    _assert_clean_failure(rc, err, out, "the file is damaged")


def test_h5ad_without_an_index_is_one_line(tmp_path: Path, capsys) -> None:
    import h5py

    src = _h5ad(tmp_path)
    with h5py.File(src, "r+") as f:
        del f["var"].attrs["_index"]
    out = tmp_path / "out"
    rc, err = _run(["preprocess", str(src), str(out), *PP_ARGS], capsys)
    _assert_clean_failure(rc, err, out, "has no index")


def test_overwrite_never_replaces_a_folder_of_something_else(tmp_path: Path, capsys) -> None:
    """`--overwrite` with the output pointed at the input's folder used to delete the input."""
    folder = tmp_path / "inp"
    folder.mkdir()
    src = _h5ad(folder)
    rc, err = _run(["preprocess", str(src), str(folder), *PP_ARGS, "--overwrite"], capsys)
    assert rc == 2 and "not a previous processed dataset" in err and len(err.splitlines()) == 1
    assert src.exists()  # the input survived
    out = tmp_path / "out"
    assert _run(["preprocess", str(src), str(out), *PP_ARGS], capsys)[0] == 0
    assert _run(["preprocess", str(src), str(out), *PP_ARGS, "--overwrite"], capsys)[0] == 0  # a dataset: replaced


def test_negative_seed_and_unknown_monitor(tmp_path: Path, capsys) -> None:
    src, out = _h5ad(tmp_path), tmp_path / "out"
    assert _run(["preprocess", str(src), str(out), *PP_ARGS], capsys)[0] == 0
    with pytest.raises(SystemExit):
        _run(["sample", str(out), "--seed", "-1"], capsys)
    assert "--seed: must be >= 0" in capsys.readouterr().err
    from bionemo_scale.config import ScaleConfig, apply_overrides
    from bionemo_scale.recipes import get_recipe

    with pytest.raises(ScaleError, match=r"checkpoint\.monitor 'val/nonexistent' is not logged"):
        apply_overrides(get_recipe("tiny_cpu"), ["checkpoint.monitor=val/nonexistent"])
    assert isinstance(apply_overrides(get_recipe("tiny_cpu"), ["checkpoint.monitor=val/pearson_delta"]), ScaleConfig)


def test_a_file_given_as_the_dataset(tmp_path: Path) -> None:
    from bionemo_scale.data.store import ProcessedDataset

    with pytest.raises(ScaleError, match="is a file, not a processed dataset folder"):
        ProcessedDataset(_h5ad(tmp_path))


def test_sigterm_leaves_no_temporary(tmp_path: Path) -> None:
    """`kill` or a Slurm time limit mid-preprocess used to leave the hidden temporary folder."""
    import signal
    import time

    src = tmp_path / "big.h5ad"
    make_counts_adata(n_per_group=400, n_genes=300).write_h5ad(src)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "bionemo_scale.cli",
        "-q",
        "preprocess",
        str(src),
        str(out),
        *PP_ARGS,
        "--chunk-rows",
        "1",  # one row per chunk: the work lasts seconds (12 s in all here), not the ~0.5 s of 16 rows
    ]
    # the child starts with SIGTERM blocked, as under a parent that blocks it: the CLI must unblock it
    block = lambda: signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])  # noqa: E731
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=block)
    deadline = time.monotonic() + 300  # a guard against a hang, not a speed requirement
    while not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir()) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        status = [ln for ln in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if ln.startswith("Sig")]
    except OSError:
        status = ["(exited)"]
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    err = proc.stderr.read() if proc.stderr else ""
    assert rc == 128 + signal.SIGTERM, f"rc {rc}; child signal state when sent: {status}; stderr: {err[-1500:]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.h5ad"]


def test_main_leaves_the_calling_process_as_it_was(capsys) -> None:
    """In a notebook or test, `main(["-q", ...])` must not silence the caller's warnings and loggers."""
    import logging
    import signal
    import warnings

    filters, level = list(warnings.filters), logging.getLogger("megatron").level
    handler = signal.getsignal(signal.SIGTERM)
    assert main(["-q", "recipe", "list"]) == 0
    assert main(["-q", "ensemble", "a.h5ad", "--output", "b.h5ad"]) == 2  # a TERMINABLE command that fails
    capsys.readouterr()
    assert list(warnings.filters) == filters
    assert logging.getLogger("megatron").level == level
    assert signal.getsignal(signal.SIGTERM) == handler


def test_main_runs_outside_the_main_thread(capsys) -> None:
    """Signal handlers can only be set in the main thread: main() must not touch them needlessly."""
    import threading

    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(main(["-q", "recipe", "list"])))
    worker.start()
    worker.join()
    assert result == [0]


def test_a_gene_map_onto_a_gene_the_data_keeps_is_refused(tmp_path: Path, capsys) -> None:
    # X -> g0 while the data has its own g0: one of the two columns would silently feed the model's g0
    from bionemo_scale.data.store import ProcessedDataset
    from bionemo_scale.errors import ScaleError

    def extra_gene(a):
        b = make_counts_adata(n_genes=41)
        b.var_names = [*a.var_names, "X"]
        return b

    data = tmp_path / "data"
    assert _run(["preprocess", str(_h5ad(tmp_path, extra_gene)), str(data), *PP_ARGS], capsys)[0] == 0
    model_genes = [f"g{i}" for i in range(40)]
    with pytest.raises(ScaleError, match="renames X to g0, which the data also has as a gene of its own"):
        ProcessedDataset(data).align_genes(model_genes, {"X": "g0"})
    # renaming both (a swap) is unambiguous, and so is a rename onto a gene the model does not use
    swapped = ProcessedDataset(data)
    swapped.align_genes(model_genes, {"X": "g0", "g0": "unused"})
    ProcessedDataset(data).align_genes(model_genes, {"X": "g1_alias", "g1_alias": "g2_alias"})
    plain = ProcessedDataset(data)
    np.testing.assert_array_equal(
        swapped.gather(np.arange(5))[:, 0], plain.gather(np.arange(5))[:, plain.genes.index("X")]
    )


def test_a_termination_request_stops_the_commit_even_if_its_exception_was_lost(tmp_path: Path) -> None:
    # SIGTERM's SystemExit can be swallowed (raised inside a finaliser, Python only prints
    # "Exception ignored"); the recorded request still keeps the temporary output from being renamed
    from bionemo_scale.atomic import atomic_dir, atomic_file, request_termination

    try:
        request_termination(15)
        for make, path in ((atomic_dir, tmp_path / "d"), (atomic_file, tmp_path / "f.txt")):
            with pytest.raises(SystemExit) as stop, make(path) as tmp:
                (tmp / "x").write_text("1") if make is atomic_dir else tmp.write_text("1")
            assert stop.value.code == 143 and not path.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == []
    finally:
        request_termination(None)
    with atomic_file(tmp_path / "ok.txt") as tmp:  # cleared: commits again
        tmp.write_text("1")
    assert (tmp_path / "ok.txt").read_text() == "1"
