"""Run NeMo 2.7.3's trainer from a PyPI install, where two optional packages are missing.

Both are no-ops inside the NGC container (which ships the packages), and neither is about CPU:
the CPU shim lives in `bionemo_scale.parallel`. Each patch applies only when the package it
stands in for cannot be found.

1. `MegatronStrategy.save_checkpoint/load_checkpoint` import
   `nemo.collections.llm.modelopt.model_utils` for ModelOpt (quantisation/distillation) state.
   Importing `nemo.collections.llm` imports `nemo_run`, and nemo-run 0.11 cannot be installed
   beside this stack (torchx 0.7 pins urllib3<1.27 and it pulls protobuf 7 against NeMo's
   protobuf~=5.29). SCALE has no ModelOpt state, so the two functions are given as no-ops
   under that module name.
2. `NeMoLogger` type-checks every ModelCheckpoint against nvidia-resiliency-ext's
   `LocalCheckpointCallback` and raises `UnavailableError` when that package is absent.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types

logger = logging.getLogger(__name__)

_APPLIED = False
MODELOPT_UTILS = "nemo.collections.llm.modelopt.model_utils"


def _stub_modelopt_state() -> None:
    if importlib.util.find_spec("nemo_run") is not None or MODELOPT_UTILS in sys.modules:
        return

    def save_modelopt_state(*args: object, **kwargs: object) -> None:
        """SCALE models carry no ModelOpt state."""

    def restore_modelopt_state(*args: object, **kwargs: object) -> None:
        """SCALE models carry no ModelOpt state."""

    names = ["nemo.collections.llm", "nemo.collections.llm.modelopt", MODELOPT_UTILS]
    for name in names:
        if name not in sys.modules:
            module = types.ModuleType(name, "bionemo-scale stand-in: nemo_run is not installed")
            module.__path__ = []  # a package, so that submodule imports resolve through sys.modules
            sys.modules[name] = module
    utils = sys.modules[MODELOPT_UTILS]
    utils.save_modelopt_state = save_modelopt_state  # type: ignore[attr-defined]
    utils.restore_modelopt_state = restore_modelopt_state  # type: ignore[attr-defined]
    logger.info("nemo_run is not installed: NeMo's ModelOpt checkpoint hooks are no-ops for SCALE")


def _allow_logger_without_resiliency_ext() -> None:
    from nemo.lightning import nemo_logger

    if getattr(nemo_logger, "HAVE_RES", True):
        return

    class _Absent:
        class LocalCheckpointCallback:  # nothing is an instance of it
            pass

    nemo_logger.lcp = _Absent


def apply() -> None:
    """Idempotent; call before building the Trainer."""
    global _APPLIED
    if _APPLIED:
        return
    _stub_modelopt_state()
    _allow_logger_without_resiliency_ext()
    _APPLIED = True
