"""ScaleModel at TP=2 and PP=2 (two gloo processes) against TP=1/PP=1 with the same full weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._torchrun import run_python, run_torchrun

pytestmark = pytest.mark.distributed
WORKER = str(Path(__file__).parent / "workers" / "scale_parity.py")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ref")
    res = run_python(WORKER, out, "--mode", "ref")
    return out / "rank0.pt", res


def test_tensor_parallel_matches_single_rank(reference, tmp_path: Path) -> None:
    ref_path, ref = reference
    results = run_torchrun(WORKER, 2, tmp_path, "--mode", "tp", "--ref", str(ref_path), timeout=180)
    for r in results:
        assert r["sharded_pieces"] > 0  # the model really is split across the two ranks
        assert r["n_losses"] == 2
        assert r["loss_err"] < 1e-5
        assert r["out_err"] < 1e-5
        assert max(r["grad_err"].values()) < 1e-4 * max(1.0, r["grad_scale"])
        assert r["n_checked"] >= 25
    assert results[0]["n_params_local"] < sum(p.numel() for p in ref["weights"].values())


def test_pipeline_parallel_matches_single_stage(reference, tmp_path: Path) -> None:
    ref_path, ref = reference
    results = run_torchrun(WORKER, 2, tmp_path, "--mode", "pp", "--ref", str(ref_path), timeout=180)
    last = [r for r in results if r["last_stage"]]
    first = [r for r in results if not r["last_stage"]]
    assert len(last) == len(first) == 1
    assert last[0]["n_losses"] == 2 and last[0]["loss_err"] < 1e-5 and last[0]["out_err"] < 1e-5
    assert first[0]["n_losses"] == 0  # the loss lives on the last stage only
    # every weight of the full model is checked on exactly one stage (encoder first, decoder last)
    names = set(first[0]["grad_err"]) | set(last[0]["grad_err"])
    assert names == set(ref["grads"])
    assert not set(first[0]["grad_err"]) & set(last[0]["grad_err"])
    for r in results:
        assert max(r["grad_err"].values()) < 1e-4 * max(1.0, r["grad_scale"])
