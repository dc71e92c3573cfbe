"""`bionemo-scale ensemble`: the per-cell mean of predictions of the same cells, and its refusals."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from bionemo_scale.cli import main
from bionemo_scale.config import SynthConfig
from bionemo_scale.data.synth import write_synthetic_dataset

SMALL = SynthConfig(
    n_cells=3000, n_genes=60, n_programs=4, n_contexts=3, n_batches=1, n_perturbations=6, chunk_rows=900
)


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(["-q", *args])
    return rc, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two baselines predicted from the same control cells (seed 0), and one from other cells (seed 1)."""
    root = tmp_path_factory.mktemp("ensemble")
    data = root / "ds"
    write_synthetic_dataset(data, SMALL, progress=False)
    split = root / "split.toml"
    split.write_text('[fewshot.C0]\nval = []\ntest = ["P001", "P002"]\n')
    out = {}
    runs = (("add", "additive", 0, []), ("cmean", "context-mean", 0, []), ("add_seed1", "additive", 1, []),
            ("add_lattice", "additive", 0, ["--count-lattice"]))  # fmt: skip
    for name, method, seed, extra in runs:
        path = root / name / "PRED.h5ad"
        rc = main(["-q", "baseline", "--method", method, "--data", str(data), "--split", str(split),
                   "--output", str(path), "--set-size", "16", "--seed", str(seed), *extra])  # fmt: skip
        assert rc == 0
        out[name] = path
    return out


def test_ensemble_is_the_per_cell_mean(members, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ens" / "PRED.h5ad"
    rc, err = _run(
        ["ensemble", str(members["add"]), str(members["cmean"]), "--output", str(out), "--no-count-lattice"], capsys
    )
    assert rc == 0, err
    a, b, e = (ad.read_h5ad(p) for p in (members["add"], members["cmean"], out))
    assert e.n_obs == a.n_obs and list(e.var_names) == list(a.var_names)
    np.testing.assert_allclose(e.X.toarray(), (a.X.toarray() + b.X.toarray()) / 2, rtol=1e-6, atol=1e-7)
    # the two members really differ on the predicted cells, so the test can tell a mean from a copy
    is_pred = a.obs["is_prediction"].to_numpy()
    assert np.abs(a.X[is_pred].toarray() - b.X[is_pred].toarray()).max() > 1e-3
    assert e.uns["bionemo_scale"]["kind"] == "ensemble"
    assert list(e.uns["bionemo_scale"]["member_kinds"]) == ["baseline:additive", "baseline:context-mean"]
    real = ad.read_h5ad(out.with_name("REAL.h5ad"))
    np.testing.assert_array_equal(
        real.obs["source_row"], ad.read_h5ad(members["add"].with_name("REAL.h5ad")).obs["source_row"]
    )


def test_the_output_rule_follows_the_members(members, tmp_path: Path, capsys) -> None:
    """Continuous members give a continuous mean unless --count-lattice asks; members that differ
    in their output rule are refused in one line (the caller must choose)."""
    pair = [str(members["add"]), str(members["cmean"])]
    default, explicit, lattice = (tmp_path / n / "PRED.h5ad" for n in ("default", "explicit", "lattice"))
    assert _run(["ensemble", *pair, "--output", str(default)], capsys)[0] == 0
    assert _run(["ensemble", *pair, "--output", str(explicit), "--no-count-lattice"], capsys)[0] == 0
    assert _run(["ensemble", *pair, "--output", str(lattice), "--count-lattice"], capsys)[0] == 0
    d, e, lat = (ad.read_h5ad(p) for p in (default, explicit, lattice))
    np.testing.assert_array_equal(d.X.toarray(), e.X.toarray())
    assert not d.uns["bionemo_scale"]["count_lattice"] and lat.uns["bionemo_scale"]["count_lattice"]
    assert (d.X.toarray() != lat.X.toarray()).any()
    mixed = tmp_path / "mixed" / "PRED.h5ad"
    rc, err = _run(["ensemble", str(members["add_lattice"]), str(members["cmean"]), "--output", str(mixed)], capsys)
    assert rc != 0 and "differ in their output rule: 1 on the count lattice, 1 continuous" in err
    assert len(err.splitlines()) == 1 and not mixed.exists()


def test_members_of_other_cells_are_refused(members, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ens" / "PRED.h5ad"
    rc, err = _run(["ensemble", str(members["add"]), str(members["add_seed1"]), "--output", str(out)], capsys)
    assert rc == 2 and len(err.splitlines()) == 1
    assert "predict different cells" in err and "--seed" in err
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.mark.parametrize(
    "case, needle",
    [
        ("one", "at least 2 members"),
        ("twice", "given twice"),
        ("output_is_member", "is one of the members"),
        ("missing", "is not a file"),
        ("corrupt", "could not be read"),
        ("no_real", "REAL.h5ad is missing"),
        ("nan", "non-finite"),
        ("genes", "different genes"),
    ],
)
def test_bad_members_get_one_line(members, tmp_path: Path, capsys, case: str, needle: str) -> None:
    add, cmean = members["add"], members["cmean"]
    out = tmp_path / "ens" / "PRED.h5ad"
    args = [str(add), str(cmean)]
    overwrite: list[str] = []
    if case == "one":
        args = [str(add)]
    elif case == "twice":
        args = [str(add), str(add)]
    elif case == "output_is_member":
        out, overwrite = cmean, ["--overwrite"]
    elif case == "missing":
        args = [str(add), str(tmp_path / "nope.h5ad")]
    elif case in ("corrupt", "no_real", "nan", "genes"):
        copy = tmp_path / "m" / "PRED.h5ad"
        copy.parent.mkdir()
        if case == "corrupt":
            copy.write_bytes(b"not an h5ad file")
            (copy.with_name("REAL.h5ad")).write_bytes(cmean.with_name("REAL.h5ad").read_bytes())
        else:
            m = ad.read_h5ad(cmean)
            if case == "nan":
                x = m.X.toarray()
                x[0, 0] = np.nan
                m.X = sp.csr_matrix(x)
            if case == "genes":
                m.var_names = [f"X{i}" for i in range(m.n_vars)]
            m.write_h5ad(copy)
            if case != "no_real":
                (copy.with_name("REAL.h5ad")).write_bytes(cmean.with_name("REAL.h5ad").read_bytes())
        args = [str(add), str(copy)]
    before = out.read_bytes() if out.exists() else None
    rc, err = _run(["ensemble", *args, "--output", str(out), *overwrite], capsys)
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Fix:" in err and needle in err, err
    if before is None:
        assert not out.exists()
    else:
        assert out.read_bytes() == before  # an input is never replaced
