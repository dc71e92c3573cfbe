"""Data layer: h5ad -> SCDL memmap + perturbation index, splits, and the set-pair sampler."""
