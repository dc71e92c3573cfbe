"""NeMo 2 Trainer + MegatronStrategy on CPU (gloo) with the CPU shim: a toy set model trains.

Feasibility for issue 4: the toy LightningModule (workers/nemo_train.py) has the shape the
real SCALE training module needs; each run is one torchrun launch of ~15-25 s (NeMo's import
dominates).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._torchrun import run_torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STEPS = 4


def _train(tmp: Path, nproc: int, *args: str, env: dict[str, str] | None = None) -> list[dict]:
    return run_torchrun("nemo_train.py", nproc, tmp, "--steps", str(STEPS), *args, timeout=240, env=env)


def _assert_trains(results: list[dict]) -> None:
    for r in results:
        assert r["global_step"] == STEPS and len(r["losses"]) == STEPS
        assert r["losses"][-1] < 0.85 * r["losses"][0], r["losses"]
        assert r["idempotent"]
        assert "Distrib" not in r["optimizer"]
    # NeMo reports the last pipeline stage's (data-parallel averaged) loss on every rank.
    assert all(r["losses"] == pytest.approx(results[0]["losses"], abs=1e-6) for r in results)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return _train(tmp_path_factory.mktemp("nemo1"), 1)


def test_nemo_trains_on_one_cpu_process(one_device: list[dict]) -> None:
    _assert_trains(one_device)


def test_nemo_trains_with_tensor_parallelism(tmp_path: Path) -> None:
    results = _train(tmp_path, 2, "--tp", "2")
    assert sorted(r["tp_rank"] for r in results) == [0, 1]
    _assert_trains(results)


def test_nemo_trains_with_pipeline_parallelism(tmp_path: Path) -> None:
    results = _train(tmp_path, 2, "--pp", "2")
    assert sorted(r["pp_rank"] for r in results) == [0, 1]
    _assert_trains(results)


def test_nemo_data_parallel_matches_one_process(one_device: list[dict], tmp_path: Path) -> None:
    """DP=2 with half the microbatches each reproduces the one-process run: the data sampler
    shards the global batch and megatron's DDP averages gradients over gloo."""
    results = _train(tmp_path, 2, "--devices", "2")
    assert sorted(r["dp_rank"] for r in results) == [0, 1]
    _assert_trains(results)
    assert results[0]["losses"] == pytest.approx(one_device[0]["losses"], abs=1e-5)


@pytest.mark.parametrize(
    ("patch", "signature"),
    [
        ("nemo_seed", "model-parallel-rng is not added"),
        ("nemo_streams", "torch.cuda.Stream requires CUDA support"),
        ("nemo_distillation_shapes", "adjust_tensor_shapes_fn"),
    ],
)
def test_each_nemo_patch_is_needed(patch: str, signature: str, tmp_path: Path) -> None:
    """Each NeMo patch, skipped, breaks training (3 x ~20 s; see test_shim.py)."""
    (output,) = run_torchrun(
        "nemo_train.py", 1, tmp_path, env={"BIONEMO_SCALE_CPU_SHIM_SKIP": patch}, timeout=240, expect_failure=True
    )
    assert signature in output, output[-3000:]
