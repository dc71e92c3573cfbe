"""Distributed and megatron-core initialisation, plus the CPU shim (the only one in the package).

On a GPU nothing here patches anything: `init_distributed` is torch.distributed (NCCL) plus
megatron's `initialize_model_parallel` and `model_parallel_cuda_manual_seed`.

On a CPU-only machine megatron-core 0.15 and NeMo 2.7 still call CUDA-only APIs on the code
paths SCALE uses. `install_cpu_shim()` (megatron-core) and `patch_nemo_for_cpu()` (NeMo's
Trainer/MegatronStrategy) patch exactly those call sites, so that the same `TransformerBlock`,
pipeline schedules, DDP, optimizer and NeMo strategy run on gloo for development and CI.
Every patch names its call site and was kept only because a run failed without it; the
opt-in tests re-prove that after an upgrade:

    BIONEMO_SCALE_PROVE_SHIM=1 pytest tests/parallel -k needed

(`BIONEMO_SCALE_CPU_SHIM_SKIP=name,...` leaves patches out, for that diagnosis only.)

The shim is a process-global, idempotent install: call it once at start, before building a
model, from the thread that trains (`init_distributed` calls it on CPU). It never runs when
CUDA is available.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from bionemo_scale.errors import ScaleError

logger = logging.getLogger(__name__)

# The megatron-core / NeMo minor versions whose CUDA call sites the shim was written against.
SHIM_MCORE_VERSION = (0, 15)
SHIM_NEMO_VERSION = (2, 7)

_SHIM_INSTALLED = False
_NEMO_PATCHED = False
_CUDA_TO_CPU_MODE: torch.overrides.TorchFunctionMode | None = None


# ---------------------------------------------------------------------------------------------
# Process groups and megatron model parallelism
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParallelLayout:
    """Where this process sits: global rank and the TP/PP/DP sizes megatron was built with."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    backend: str


def device_is_cpu() -> bool:
    """True when this process has no usable CUDA device (the shim applies)."""
    return not torch.cuda.is_available()


def check_layout(world_size: int, tp: int, pp: int) -> int:
    """Return the data-parallel size, or raise a one-line ScaleError for an impossible layout."""
    for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ScaleError(f"{name} must be a positive integer (got {value!r})", f"set {name} >= 1")
    if world_size < 1 or world_size % (tp * pp):
        raise ScaleError(
            f"world size {world_size} is not divisible by TP×PP = {tp}×{pp} = {tp * pp}",
            "launch a multiple of TP×PP processes (devices × nodes), or change the TP/PP sizes",
        )
    return world_size // (tp * pp)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def init_distributed(
    tp: int = 1,
    pp: int = 1,
    *,
    backend: str | None = None,
    seed: int = 1234,
    timeout_s: float = 600.0,
) -> ParallelLayout:
    """Initialise torch.distributed (torchrun env, else one process) and megatron TP/PP/DP.

    gloo on CPU, NCCL on GPU. An existing default process group (Lightning's) is reused.
    Seeding follows NeMo/Megatron-LM: seed + 100 × pipeline rank for the default generator,
    and megatron's tracker for tensor-parallel regions, so that this function and NeMo's
    `MegatronStrategy` initialise identical weights.
    """
    torch_dist = torch.distributed
    if torch_dist.is_initialized():
        rank, world_size = torch_dist.get_rank(), torch_dist.get_world_size()
    else:
        rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    dp = check_layout(world_size, tp, pp)  # before anything is initialised or imported
    cpu = device_is_cpu()
    backend = backend or ("gloo" if cpu else "nccl")
    if backend == "nccl" and cpu:
        raise ScaleError("the NCCL backend needs a CUDA GPU and none is visible", "use backend='gloo' on CPU")

    from megatron.core import parallel_state, tensor_parallel

    if cpu:
        install_cpu_shim()
    else:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())

    if not torch_dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ:
            torch_dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        elif world_size == 1:
            # One process without torchrun: an in-memory store, so no port is needed.
            store = torch_dist.HashStore()
            torch_dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        else:
            raise ScaleError(
                f"WORLD_SIZE={world_size} but MASTER_ADDR is not set",
                "launch with torchrun (or srun with MASTER_ADDR/MASTER_PORT exported)",
            )

    if parallel_state.model_parallel_is_initialized():
        have = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
        )
        if have != (tp, pp):
            raise ScaleError(
                f"megatron model parallelism is already initialised with TP={have[0]}, PP={have[1]}",
                "call bionemo_scale.parallel.destroy_distributed() before re-initialising",
            )
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            distributed_timeout_minutes=max(1, int(timeout_s // 60)),
        )

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)
    layout = ParallelLayout(rank, world_size, local_rank, tp, pp, dp, backend)
    logger.info("distributed: %s", layout)
    return layout


def destroy_distributed(process_group: bool = True) -> None:
    """Tear down megatron's groups (and, unless told not to, the default process group) so a
    process can re-initialise with another layout; the shim stays installed."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if process_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Device-dependent megatron settings
# ---------------------------------------------------------------------------------------------
def cpu_safe_transformer_kwargs(pp: int = 1, pipeline_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """TransformerConfig flags for a CPU run (all of them are also valid on GPU).

    - gradient_accumulation_fusion and persist_layer_norm fail on CPU (apex's
      fused_weight_gradient_mlp_cuda is missing; WrappedTorchNorm asserts). They are False by
      default in megatron-core 0.15 but NeMo's GPT configs turn them on, so they are pinned.
    - the other fusions only select CUDA kernels or jit paths: off, so CPU runs exercise the
      plain PyTorch code everywhere.
    - use_cpu_initialization: megatron's host initialisation builds each full weight from the
      default generator and slices it per TP rank, so (SwiGLU fc1's gate/up split aside) TP
      does not change the initial weights; the device path draws each shard from the
      per-TP-rank stream.
    - pipeline_dtype: megatron's p2p needs it whenever PP > 1.
    """
    kwargs: dict[str, Any] = {
        "use_cpu_initialization": True,
        "gradient_accumulation_fusion": False,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "masked_softmax_fusion": False,
        "apply_rope_fusion": False,
        "persist_layer_norm": False,
    }
    if pp > 1:
        kwargs["pipeline_dtype"] = pipeline_dtype
    return kwargs


def optimizer_device_flags(cpu: bool | None = None, params_dtype: torch.dtype = torch.float32) -> dict[str, bool]:
    """Flags for megatron's `OptimizerConfig` per device and precision.

    `use_distributed_optimizer` also belongs in the `DistributedDataParallelConfig` (the two
    must agree). megatron's distributed optimizer does not run on CPU (it rejects non-CUDA
    params: "Wrapped parameters must be one of torch.cuda.FloatTensor ..."), so CPU runs use
    the plain optimizer, which all-reduces whole gradients; on GPU the distributed optimizer
    shards optimizer state across data-parallel ranks. The plain mixed-precision
    (Float16Optimizer) path has the same CUDA-only check, so CPU training is float32 only.
    """
    cpu = device_is_cpu() if cpu is None else cpu
    if cpu and params_dtype != torch.float32:
        raise ScaleError(
            f"training in {str(params_dtype).removeprefix('torch.')} needs a CUDA GPU "
            "(megatron's mixed-precision optimizer only wraps CUDA parameters)",
            "use params_dtype=float32 on CPU",
        )
    return {
        "use_distributed_optimizer": not cpu,
        "bf16": params_dtype == torch.bfloat16,
        "fp16": params_dtype == torch.float16,
    }


# ---------------------------------------------------------------------------------------------
# The CPU shim
# ---------------------------------------------------------------------------------------------
def _is_cuda_device(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # a bare index means cuda:N


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch call (and drops pin_memory)."""

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        elif func is torch.Tensor.cuda:
            return args[0]
        return func(*args, **kwargs)


class _CpuRNGStatesTracker:
    """Mix-in that keeps megatron's named RNG states on the CPU default generator."""

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _check_version(package: str, version: str, expected: tuple[int, int]) -> None:
    found = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if found != expected:
        msg = (
            f"bionemo_scale's CPU shim was written for {package} {expected[0]}.{expected[1]}.x but "
            f"{version} is installed; CPU runs may hit unpatched CUDA calls. Re-validate with "
            "BIONEMO_SCALE_PROVE_SHIM=1 pytest tests/parallel, or install the pinned version from constraints.txt."
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        logger.warning(msg)


def _patch_current_device() -> None:
    # torch.cuda.current_device() is the `device=` of buffers megatron allocates itself:
    # parallel_state.GlobalMemoryBuffer.get_tensor (DotProductAttention's baddbmm buffer),
    # pipeline_parallel.p2p_communication (shape and receive buffers),
    # distributed.param_and_grad_buffer (DDP grad buffers), tensor_parallel mappings/layers
    # (gathers). Index 0 keeps the int contract; the device mode maps it to CPU.
    torch.cuda.current_device = lambda: 0


def _patch_synchronize() -> None:
    # torch.cuda.synchronize(): p2p_communication._communicate_shapes and _communicate
    # (batch_p2p_sync) call it after batch_isend_irecv. There is nothing to wait for on CPU.
    torch.cuda.synchronize = lambda device=None: None


def _patch_device_mode() -> None:
    # Hard-coded CUDA devices: every pipeline schedule's `total_num_tokens = torch.zeros([],
    # device="cuda")`, optimizer.py's found_inf/_scale tensors, clip_grads.get_grad_norm_fp32,
    # utils.local_multi_tensor_l2_norm, and every `device=torch.cuda.current_device()` (index
    # 0, see above); NeMo's MegatronStrategy logs with `torch.tensor(x, pin_memory=True)
    # .to("cuda")`. A TorchFunctionMode maps any CUDA device to CPU and drops pin_memory
    # (which needs an accelerator). It is pushed once and never popped. Torch function modes
    # are thread-local: it covers the thread that installed the shim (the training thread),
    # not helper threads.
    global _CUDA_TO_CPU_MODE
    _CUDA_TO_CPU_MODE = _CudaToCpuMode()
    _CUDA_TO_CPU_MODE.__enter__()


def _patch_rng_tracker() -> None:
    # tensor_parallel.random.CudaRNGStatesTracker keeps megatron's named RNG states
    # ("model-parallel-rng", forked by DotProductAttention around attention dropout on every
    # forward; the data-parallel and expert states) with torch.cuda.get_rng_state, which fails
    # without CUDA. On CPU dropout draws from the CPU default generator, so the tracker keeps
    # CPU generator states: tensor-parallel regions get per-TP-rank streams and everything else
    # the shared default stream, deterministically, exactly as on GPU.
    from megatron.core.tensor_parallel import random as mcore_random

    base = mcore_random.CudaRNGStatesTracker
    mcore_random.CudaRNGStatesTracker = type("CpuRNGStatesTracker", (_CpuRNGStatesTracker, base), {})
    mcore_random.initialize_rng_tracker(force_reset=True)


def _patch_rng_state_fns() -> None:
    # tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state: activation recomputation
    # (CheckpointFunction, recompute_granularity="full") saves the RNG state in forward and
    # restores it to replay dropout in backward; they read the CUDA generator. On CPU they read
    # and write the CPU generator, so recomputed dropout masks match the original ones.
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda device=None, clone=False, graph_safe=False: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)


def _patch_clip_grads() -> None:
    # clip_grads.clip_grad_by_total_norm_fp32 asserts `param.grad.type() ==
    # 'torch.cuda.FloatTensor'` (MegatronOptimizer.clip_grad_norm, imported by name into
    # optimizer.py). Same clipping, with the fp32 check kept and the device check dropped.
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as mcore_optimizer

    def clip_grad_by_total_norm_fp32(
        parameters: list[torch.Tensor] | torch.Tensor,
        max_norm: float,
        total_norm: float,
        use_decoupled_grad: bool = False,
    ) -> None:
        params = [parameters] if isinstance(parameters, torch.Tensor) else parameters
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr).detach() for p in params if getattr(p, attr, None) is not None]
        if not use_decoupled_grad and any(g.dtype != torch.float32 for g in grads):
            raise AssertionError("clip_grad_by_total_norm_fp32 expects fp32 (main) grads")
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            for g in grads:
                g.mul_(clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    mcore_optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


def _patch_linear_autocast() -> None:
    # tensor_parallel.layers: the autograd functions behind every Column/RowParallelLinear
    # (LinearWithGradAccumulationAndAsyncCommunication, LinearWithFrozenWeight) are decorated
    # with custom_fwd/custom_bwd for device_type="cuda" only. Under CPU autocast
    # (`trainer.autocast=bf16`) their forward returns bf16, but their backward runs with CPU
    # autocast off and multiplies a bf16 grad_output by the float32 weight: "expected m1 and m2
    # to have the same dtype". The forward now records the CPU autocast state too, and the
    # backward runs under it, as custom_fwd/custom_bwd do on CUDA. Without autocast nothing changes.
    from megatron.core.tensor_parallel import layers

    for fn in (layers.LinearWithGradAccumulationAndAsyncCommunication, layers.LinearWithFrozenWeight):
        fn.forward = staticmethod(_record_cpu_autocast(fn.forward))
        fn.backward = staticmethod(_replay_cpu_autocast(fn.backward))


def _record_cpu_autocast(forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def wrapped(ctx: Any, *args: Any, **kwargs: Any) -> Any:
        ctx.cpu_autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        return forward(ctx, *args, **kwargs)

    return wrapped


def _replay_cpu_autocast(backward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(backward)
    def wrapped(ctx: Any, *grads: Any) -> Any:
        enabled, dtype = getattr(ctx, "cpu_autocast", (False, torch.bfloat16))
        with torch.autocast("cpu", dtype=dtype, enabled=enabled):
            return backward(ctx, *grads)

    return wrapped


# Applied in this order. BIONEMO_SCALE_CPU_SHIM_SKIP=name,name skips some: a diagnostic for
# re-proving each patch against a new release (tests/parallel/test_shim.py, test_nemo_cpu.py).
_MCORE_PATCHES: dict[str, Callable[[], None]] = {
    "current_device": _patch_current_device,
    "synchronize": _patch_synchronize,
    "device_mode": _patch_device_mode,
    "rng_tracker": _patch_rng_tracker,
    "rng_state_fns": _patch_rng_state_fns,
    "clip_grads": _patch_clip_grads,
    "linear_autocast": _patch_linear_autocast,
}


def _skipped() -> set[str]:
    return {p.strip() for p in os.environ.get("BIONEMO_SCALE_CPU_SHIM_SKIP", "").split(",") if p.strip()}


def install_cpu_shim() -> bool:
    """Patch megatron-core's CUDA-only call sites for CPU. Idempotent; a no-op with CUDA.

    Returns True when the shim is (now) installed. Not patched, by design:
    - the distributed optimizer: `optimizer_device_flags()` selects the plain one on CPU;
    - fused kernels: `cpu_safe_transformer_kwargs()` turns them off in TransformerConfig;
    - torch.cuda.manual_seed/manual_seed_all/empty_cache/max_memory_*: already safe no-ops
      without CUDA (torch 2.13);
    - dist_checkpointing: needs psutil, and its writer starts a *spawn* multiprocessing
      Manager that re-imports __main__, so scripts that save checkpoints need an
      `if __name__ == "__main__":` guard.
    """
    global _SHIM_INSTALLED
    if _SHIM_INSTALLED:
        return True
    if not device_is_cpu():
        return False

    import megatron.core

    _check_version("megatron-core", megatron.core.__version__, SHIM_MCORE_VERSION)
    skip = _skipped()
    for name, patch in _MCORE_PATCHES.items():
        if name not in skip:
            patch()
    _SHIM_INSTALLED = True
    logger.info(
        "installed the megatron-core %s CPU shim%s",
        megatron.core.__version__,
        f" (skipping {sorted(skip)})" if skip else "",
    )
    return True


def cpu_shim_installed() -> bool:
    """True once `install_cpu_shim` has patched this process."""
    return _SHIM_INSTALLED


class _NoStream:
    """Stand-in for torch.cuda.Stream on CPU: every method is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _patch_nemo_streams() -> None:
    # MegatronParallel.init_model_parallel wraps init_ddp in
    # `with torch.cuda.stream(torch.cuda.Stream()):` (for full-iteration CUDA graphs).
    # A stream means nothing on CPU: a stand-in object and a null context.
    torch.cuda.Stream = _NoStream
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()


def _patch_nemo_distillation_shapes() -> None:
    # MegatronStep.__call__ reads MegatronStep.adjust_tensor_shapes_fn on every step (PP=1
    # included), and the property imports nemo.collections.llm, only to support ModelOpt
    # distillation. That import fails here (it needs `rich`, not a nemo-toolkit[core]
    # dependency) and costs seconds where it works. SCALE never distils: return None.
    from nemo.lightning import megatron_parallel

    megatron_parallel.MegatronStep.adjust_tensor_shapes_fn = property(lambda self: None)


def _patch_nemo_seed() -> None:
    # megatron_init._set_random_seed (called by initialize_model_parallel_for_nemo when the
    # strategy sets up) seeds megatron's RNG tracker only `if torch.cuda.device_count() > 0`.
    # On CPU the tracker then has no "model-parallel-rng" state and DotProductAttention's
    # fork() raises. Seed it the same way (seed + 100 × pipeline rank) on CPU too.
    from megatron.core import parallel_state, tensor_parallel
    from nemo.lightning import megatron_init

    original = megatron_init._set_random_seed

    def _set_random_seed(seed_: int) -> None:
        original(seed_)
        seed = seed_ + 100 * parallel_state.get_pipeline_model_parallel_rank()
        tensor_parallel.model_parallel_cuda_manual_seed(seed)

    megatron_init._set_random_seed = _set_random_seed


def _patch_nemo_checkpoint_device() -> None:
    # nemo.lightning.io.pl.MegatronCheckpointIO.load_checkpoint calls _fix_tensors_device,
    # which asserts torch.cuda.is_initialized() before moving loaded tensors to the current
    # CUDA device. Resuming a run on CPU hits it [AssertionError: (False, False)]; on CPU the
    # loaded tensors are already where they belong.
    from nemo.lightning.io import pl as nemo_io_pl

    nemo_io_pl._fix_tensors_device = lambda ckpt: ckpt


_NEMO_PATCHES: dict[str, Callable[[], None]] = {
    "nemo_seed": _patch_nemo_seed,
    "nemo_streams": _patch_nemo_streams,
    "nemo_distillation_shapes": _patch_nemo_distillation_shapes,
    "nemo_checkpoint_device": _patch_nemo_checkpoint_device,
}


def patch_nemo_for_cpu() -> bool:
    """The NeMo 2.7 part of the CPU shim; the train/ package calls it before building a Trainer.

    Imports NeMo lazily so that `bionemo_scale.parallel` stays NeMo-free. Installs the
    megatron-core shim too. Idempotent; a no-op with CUDA. Returns True when installed.
    """
    global _NEMO_PATCHED
    if _NEMO_PATCHED:
        return True
    if not install_cpu_shim():
        return False

    import nemo

    _check_version("nemo-toolkit", nemo.__version__, SHIM_NEMO_VERSION)
    skip = _skipped()
    for name, patch in _NEMO_PATCHES.items():
        if name not in skip:
            patch()
    _NEMO_PATCHED = True
    logger.info("patched NeMo %s for CPU training", nemo.__version__)
    return True
