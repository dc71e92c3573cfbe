# syntax=docker/dockerfile:1.7
#
# bionemo-scale on top of the NGC NeMo Framework container.
#
#   docker build -t bionemo-scale .                      # runtime image (target "runtime")
#   docker build --target test -t bionemo-scale:test .   # + tests and test dependencies (GPU CI)
#   docker run --rm --gpus all --ipc=host bionemo-scale bionemo-scale recipe list
#
# NOT BUILT ON THE DEVELOPMENT MACHINE: it has no Docker engine and no GPU. This file is
# written from a careful reading of the NGC image layout; .github/workflows/docker.yml builds it
# in CI and .github/workflows/gpu.yml runs the GPU/FP8 tests inside it.
#
# Base image. We develop against nemo-toolkit 2.7.3 and megatron-core 0.15.3 (constraints.txt).
# NeMo Framework container versions (Megatron-Bridge docs/releases/software-versions.md):
#   nemo:25.09  NeMo 2.5.0, Megatron Core 0.14.0, TE 2.7,  PyTorch 2.8   -> too old (NeMo 2.5 API)
#   nemo:25.11  NeMo 2.6.0, Megatron Core 0.15 (dev), TE 2.9, PyTorch 2.9 -> NeMo one minor behind
#   nemo:26.02  NeMo 2.7.0, Megatron Core 0.16 (main), TE 2.12, PyTorch 2.10, CUDA 13.0.2
# 26.02 is the first container on the NeMo 2.7 line that this package is written for, and its
# megatron-core satisfies our floor (>=0.15.3); the CPU shim in parallel.py is not used on GPU.
# KNOWN GAP, unverified: 26.02's NeMo 2.7.0 is below pyproject's floor (nemo-toolkit>=2.7.3), and
# we measured NeMo 2.7.3 failing with megatron-core 0.16.1 on CPU. Step 3 installs with --no-deps,
# so pip does not catch the mismatch; the image's own pairing is NVIDIA's, but our code was only
# run against NeMo 2.7.3 + megatron-core 0.15.3. gpu.yml (the GPU tests in this image) is the check.
# Override with --build-arg BASE=... (e.g. a 26.02.xx patch tag, or a BioNeMo framework image
# nvcr.io/nvidia/clara/bionemo-framework:<tag> built on NeMo >= 2.7).
ARG BASE=nvcr.io/nvidia/nemo:26.02

# ------------------------------------------------------------------------------------------------
FROM ${BASE} AS runtime

SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/bionemo-scale

# 1. Freeze what the image ships. Every later pip call that may resolve dependencies runs with
#    these constraints, so nothing the image owns (torch, Transformer Engine, apex, megatron-core,
#    NeMo, lightning, numpy, ...) can be upgraded, downgraded or rebuilt: a missing dependency is
#    installed at a version compatible with the image, or the build fails loudly.
#    `pip list --format=freeze` rather than `pip freeze`: it always writes NAME==VERSION, whereas
#    `pip freeze` writes `NAME @ file://...` / `-e ...` lines for the image's source installs,
#    which are not valid constraints.
#    Lines pip would reject as constraints (Debian versions such as `1.7build1` from the system
#    dist-packages) are dropped. NeMo and megatron-core may be source checkouts without pip
#    metadata, so their versions are also recorded as Python reports them.
COPY <<'EOF' /opt/freeze-constraints.py
"""Print the installed packages as NAME==VERSION lines that pip accepts as constraints, and the
stack's versions as Python reports them (--core): step 1 records both, step 4 compares."""
import contextlib
import re
import subprocess
import sys

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

CORE = re.compile(r"^(torch|transformer[-_]engine[-_a-z0-9]*|apex|megatron[-_]core|nemo[-_]toolkit|lightning"
                  r"|pytorch[-_]lightning|numpy)==", re.IGNORECASE)
kept = []
pip_list = [sys.executable, "-m", "pip", "list", "--format=freeze"]
listing = subprocess.run(pip_list, capture_output=True, text=True, check=True).stdout
for line in listing.split():
    try:
        Version(next(iter(Requirement(line).specifier)).version)
    except (InvalidRequirement, InvalidVersion, StopIteration):
        continue  # not a valid constraint: leave that package unpinned rather than fail the build
    kept.append(line)
kept.sort(key=str.lower)
if "--core" in sys.argv:
    with contextlib.redirect_stdout(sys.stderr):  # import-time notices stay out of the record
        import megatron.core
        import nemo

    kept = [line for line in kept if CORE.match(line)]
    kept += [f"python: megatron.core {megatron.core.__version__}", f"python: nemo {nemo.__version__}"]
print("\n".join(kept))
EOF
RUN python /opt/freeze-constraints.py > /opt/image-constraints.txt \
 && python /opt/freeze-constraints.py --core > /opt/image-core.txt \
 && echo "image stack:" && cat /opt/image-core.txt

# 2. Our runtime dependencies minus the stack the image owns. Only what is missing gets installed
#    (bionemo-scdl, and anndata where the image lacks it); the rest is "already satisfied".
COPY pyproject.toml README.md ./
RUN python - <<'EOF'
import re
import tomllib

OWNED = {"torch", "megatron-core", "nemo-toolkit", "lightning", "transformer-engine"}
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
keep = [d for d in deps if re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower().replace("_", "-") not in OWNED]
open("/tmp/requirements.txt", "w").write("\n".join(keep) + "\n")
EOF
RUN echo "installing (under the image's constraints):" && cat /tmp/requirements.txt \
 && pip install -c /opt/image-constraints.txt -r /tmp/requirements.txt

# 3. This package itself, with --no-deps: pip resolves nothing, so it cannot touch torch or TE.
#    --no-build-isolation needs setuptools>=77 (PEP 639 `license = "Apache-2.0"`) in the image;
#    where the image's setuptools is older, an isolated build env fetches setuptools+wheel only
#    (our build-system requires nothing else) and is thrown away, so the image is unchanged.
COPY src ./src
RUN if python -c 'import sys, setuptools; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)'; then \
        pip install --no-deps --no-build-isolation . ; \
    else \
        pip install --no-deps . ; \
    fi \
 && rm -rf build src/*.egg-info

# 4. Proof that the stack is untouched, then a smoke run. Importing transformer_engine needs no GPU
#    (TE loads the CUDA driver lazily); nothing here initialises CUDA.
RUN python /opt/freeze-constraints.py --core | diff /opt/image-core.txt - \
 && bionemo-scale --help \
 && python -c "import bionemo_scale, transformer_engine" \
 && python -c "import megatron.core, nemo.lightning, bionemo.scdl; import bionemo_scale.model.scale_model, bionemo_scale.train.engine" \
 && bionemo-scale recipe list \
 && bionemo-scale launch --recipe tahoe_100m_pretrain --nodes 2 --gpus-per-node 8 --executor slurm \
        --data /data/scdl --split /data/split.toml --output /runs/smoke --image bionemo-scale:smoke \
        --dry-run > /dev/null

LABEL org.opencontainers.image.title="bionemo-scale" \
      org.opencontainers.image.description="SCALE virtual-cell model (BioNeMo/NeMo 2 plugin) on the NGC NeMo container" \
      org.opencontainers.image.licenses="Apache-2.0"

WORKDIR /workspace
# The NGC entrypoint (/opt/nvidia/nvidia_entrypoint.sh: banner, driver checks, then exec "$@")
# is kept; pyxis/enroot on Slurm ignore it and run the srun command directly.
CMD ["bionemo-scale", "--help"]

# ------------------------------------------------------------------------------------------------
# Test image for the GPU CI job: the runtime image plus tests and the `test` extra, under the same
# constraints (so the GPU tests run against exactly the runtime stack).
FROM runtime AS test
WORKDIR /opt/bionemo-scale
RUN python - <<'EOF'
import tomllib

test = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]
open("/tmp/test-requirements.txt", "w").write("\n".join(test) + "\n")
EOF
RUN pip install -c /opt/image-constraints.txt -r /tmp/test-requirements.txt
COPY tests ./tests
COPY recipes ./recipes
# pytest runs from here so that pyproject.toml's [tool.pytest.ini_options] (markers) applies;
# bionemo_scale is imported from site-packages (the src layout keeps ./src off sys.path).
CMD ["python", "-m", "pytest", "-m", "gpu or fp8", "-v"]
