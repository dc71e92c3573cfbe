"""bionemo-scale: SCALE, a set-aware conditional flow virtual-cell model, as a BioNeMo/NeMo plugin."""

from bionemo_scale.errors import ScaleError

__version__ = "0.1.0"

__all__ = ["ScaleError", "__version__"]
