"""The demo data shipped inside the package (see resources/ATTRIBUTION.md).

Only `importlib.resources` is used, so an installed wheel works offline and never reaches
for a path outside the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from bionemo_scale.errors import ScaleError


@dataclass(frozen=True)
class BundledDataset:
    filename: str
    pert_col: str
    control: str
    context_col: str
    batch_col: str | None
    dose_col: str | None
    splits: tuple[str, ...]
    description: str


BUNDLED: dict[str, BundledDataset] = {
    "norman19_mcfaline23": BundledDataset(
        filename="norman19_mcfaline23_devel.h5ad",
        pert_col="condition",
        control="control",
        context_col="cell_type",
        batch_col=None,
        dose_col="dose",
        splits=("norman_demo_split.toml", "norman_zeroshot_split.toml"),
        description="PerturBench devel: Norman19 K562 CRISPRa (singles + A+B) and McFaline23 glioma CRISPRi, "
        "5,961 cells x 500 HVGs, log-normalised (BSD-3, Altos Labs)",
    ),
    "glioblastoma_panobinostat": BundledDataset(
        filename="glioblastoma_panobinostat.h5ad",
        pert_col="condition",
        control="ctrl",
        context_col="patient_id",
        batch_col="sample_id",
        dose_col=None,
        splits=(),
        description="Zhao et al. 2021 via lemur: 5 glioblastoma patients, panobinostat vs DMSO, "
        "5,000 cells x 300 genes, raw counts (MIT)",
    ),
}


def resource_path(filename: str) -> Path:
    """Filesystem path of a packaged resource file."""
    ref = resources.files("bionemo_scale.data") / "resources" / filename
    if not ref.is_file():
        raise ScaleError(f"bundled resource {filename} is missing from the installation", "reinstall bionemo-scale")
    return Path(str(ref))


def bundled(name: str) -> BundledDataset:
    try:
        return BUNDLED[name]
    except KeyError:
        raise ScaleError(f"unknown bundled dataset '{name}'", f"use one of {sorted(BUNDLED)}") from None
