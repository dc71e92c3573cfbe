"""bionemo_scale.parallel: layout validation, the CPU shim, and a NeMo-free megatron step.

Anything that installs the shim runs in a subprocess (workers/shim_checks.py): the shim is a
process-global install and must not leak into the pytest process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bionemo_scale import parallel
from bionemo_scale.errors import ScaleError
from tests._torchrun import run_python, run_torchrun

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shim is a no-op with CUDA")
# The `*_is_needed` tests (slow, about 1 min) prove that every shim patch is still needed: each
# one, skipped, breaks a run with its own signature. A megatron-core or NeMo upgrade that makes a
# patch unnecessary (or changes the failure) shows up here: `pytest tests/parallel -k needed`.


@pytest.mark.parametrize(
    ("world", "tp", "pp", "dp"),
    [(1, 1, 1, 1), (2, 2, 1, 1), (2, 1, 2, 1), (8, 2, 2, 2), (6, 3, 1, 2)],
)
def test_layout_infers_data_parallel_size(world: int, tp: int, pp: int, dp: int) -> None:
    assert parallel.check_layout(world, tp, pp) == dp


@pytest.mark.parametrize(
    ("world", "tp", "pp", "match"),
    [
        (1, 2, 1, r"world size 1 is not divisible by TP×PP = 2×1"),
        (6, 2, 2, r"world size 6 is not divisible by TP×PP = 2×2 = 4"),
        (4, 0, 1, r"tensor_model_parallel_size must be a positive integer"),
        (4, 1, -2, r"pipeline_model_parallel_size must be a positive integer"),
        (4, 1.5, 1, r"tensor_model_parallel_size must be a positive integer"),
    ],
)
def test_bad_layout_is_a_one_line_error(world: int, tp, pp, match: str) -> None:
    with pytest.raises(ScaleError, match=match) as info:
        parallel.check_layout(world, tp, pp)
    assert "\n" not in str(info.value) and "Fix:" in str(info.value)


def test_init_distributed_rejects_bad_layout_before_initialising(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulate a fresh process even when earlier tests in this one initialised things.
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(parallel, "_SHIM_INSTALLED", False)
    touched: list[str] = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: touched.append("pg"))
    monkeypatch.setattr(parallel, "install_cpu_shim", lambda: touched.append("shim"))
    with pytest.raises(ScaleError, match="not divisible by TP×PP"):
        parallel.init_distributed(tp=2)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ScaleError, match="world size 3 is not divisible by TP×PP = 1×2"):
        parallel.init_distributed(pp=2)
    assert touched == []  # validation comes before the shim and before any process group


@CPU_ONLY
def test_nccl_on_cpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ScaleError, match="NCCL backend needs a CUDA GPU"):
        parallel.init_distributed(backend="nccl")


def test_shim_is_a_noop_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(parallel, "_SHIM_INSTALLED", False)  # as in a fresh process
    monkeypatch.setattr(parallel, "_NEMO_PATCHED", False)
    current_device = torch.cuda.current_device
    assert parallel.install_cpu_shim() is False
    assert parallel.patch_nemo_for_cpu() is False
    assert torch.cuda.current_device is current_device and not parallel.cpu_shim_installed()


def test_optimizer_flags_per_device() -> None:
    assert parallel.optimizer_device_flags(cpu=True) == {
        "use_distributed_optimizer": False,
        "bf16": False,
        "fp16": False,
    }
    gpu = parallel.optimizer_device_flags(cpu=False, params_dtype=torch.bfloat16)
    assert gpu == {"use_distributed_optimizer": True, "bf16": True, "fp16": False}
    with pytest.raises(ScaleError, match="training in bfloat16 needs a CUDA GPU"):
        parallel.optimizer_device_flags(cpu=True, params_dtype=torch.bfloat16)


def test_cpu_safe_kwargs_turn_fusions_off_and_set_pipeline_dtype() -> None:
    kwargs = parallel.cpu_safe_transformer_kwargs(pp=2, pipeline_dtype=torch.bfloat16)
    assert kwargs["use_cpu_initialization"] is True
    assert kwargs["pipeline_dtype"] is torch.bfloat16
    fusions = [k for k in kwargs if "fusion" in k or k == "persist_layer_norm"]
    assert len(fusions) >= 5 and not any(kwargs[k] for k in fusions)
    assert "pipeline_dtype" not in parallel.cpu_safe_transformer_kwargs(pp=1)


@pytest.fixture(scope="module")
def shim_checks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_python("shim_checks.py", tmp_path_factory.mktemp("shim"), "--mode", "checks")


@CPU_ONLY
def test_shim_install_is_idempotent(shim_checks: dict) -> None:
    assert shim_checks["first_install"] and shim_checks["second_install"]
    assert shim_checks["idempotent"]  # same patched objects, one device mode on the stack


@CPU_ONLY
def test_shim_maps_cuda_devices_to_cpu(shim_checks: dict) -> None:
    devices = shim_checks["devices"]
    assert devices[-2] == "torch.float64"  # .to("cuda", dtype) keeps the dtype
    assert set(devices[:-2] + devices[-1:]) == {"cpu"}


@CPU_ONLY
def test_init_and_destroy_single_process(shim_checks: dict) -> None:
    layout = shim_checks["layout"]
    assert (layout.rank, layout.world_size, layout.tp, layout.pp, layout.dp, layout.backend) == (0, 1, 1, 1, 1, "gloo")
    assert shim_checks["initialised"] and shim_checks["reinit_same"]
    assert shim_checks["tracker_states"] == ["data-parallel-rng", "expert-parallel-rng", "model-parallel-rng"]
    assert "world size 1 is not divisible" in shim_checks["bad_layout"]
    assert shim_checks["destroyed"] and shim_checks["reinit_after_destroy"]


@pytest.fixture(scope="module")
def plain_step(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_python("shim_checks.py", tmp_path_factory.mktemp("step"), "--mode", "step")


@CPU_ONLY
def test_megatron_training_step_without_nemo(plain_step: dict) -> None:
    """DDP wrapper + plain megatron optimizer + grad clipping + dropout: the loss falls."""
    losses = plain_step["losses"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses
    assert min(plain_step["grad_norms"]) > 0.5  # above clip_grad=0.5: the clipping path ran
    assert "Distrib" not in plain_step["optimizer"]


@CPU_ONLY
def test_recomputation_replays_dropout_exactly(plain_step: dict, tmp_path: Path) -> None:
    """Full activation recompute restores the CPU RNG state: same losses as without it."""
    recomputed = run_python("shim_checks.py", tmp_path, "--mode", "step", "--recompute", "1")
    assert recomputed["losses"] == pytest.approx(plain_step["losses"], abs=1e-6)


@CPU_ONLY
def test_megatron_training_step_under_cpu_bf16_autocast(plain_step: dict, tmp_path: Path) -> None:
    """`trainer.autocast=bf16` on CPU: megatron's parallel linears run their backward under the
    forward's autocast too, so the step trains; bf16 matmuls move the losses off float32's."""
    autocast = run_python("shim_checks.py", tmp_path, "--mode", "step", "--autocast", "1")
    losses = autocast["losses"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.8 * losses[0], losses
    assert losses != plain_step["losses"]
    assert losses[0] == pytest.approx(plain_step["losses"][0], rel=2e-2)


# Each patch, skipped, must break a run: the evidence that it is still needed. When a
# megatron-core upgrade makes one of these pass, drop that patch from parallel.py.
# (The NeMo patches are proven the same way in test_nemo_cpu.py.)
NEEDED = [
    ("current_device", ("--mode", "step"), "in current_device"),
    ("device_mode", ("--mode", "step"), "Cannot access accelerator device"),
    ("rng_tracker", ("--mode", "step"), "tensor_parallel/random.py"),
    ("rng_state_fns", ("--mode", "step", "--recompute", "1"), "in _get_cuda_rng_state"),
    ("clip_grads", ("--mode", "step"), "in clip_grad_by_total_norm_fp32"),
    ("linear_autocast", ("--mode", "step", "--autocast", "1"), "expected m1 and m2 to have the same dtype"),
]


@CPU_ONLY
@pytest.mark.slow
@pytest.mark.parametrize(("patch", "args", "signature"), NEEDED, ids=[n[0] for n in NEEDED])
def test_each_megatron_patch_is_needed(patch: str, args: tuple[str, ...], signature: str, tmp_path: Path) -> None:
    output = run_python(
        "shim_checks.py", tmp_path, *args, env={"BIONEMO_SCALE_CPU_SHIM_SKIP": patch}, expect_failure=True
    )
    assert signature in output, output[-3000:]


@CPU_ONLY
@pytest.mark.slow
@pytest.mark.distributed
def test_synchronize_patch_is_needed_by_pipeline_p2p(tmp_path: Path) -> None:
    (output,) = run_torchrun(
        "block_parity.py",
        2,
        tmp_path,
        "--mode",
        "pp",
        env={"BIONEMO_SCALE_CPU_SHIM_SKIP": "synchronize"},
        expect_failure=True,
    )
    assert "p2p_communication.py" in output and "in synchronize" in output, output[-3000:]
