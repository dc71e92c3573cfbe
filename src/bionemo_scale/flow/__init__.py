"""Pure tensor math for SCALE's conditional flow: paths, in-set OT coupling, time sampling, solvers, losses.

No module state, no distributed code: every function maps tensors to tensors, so it can be unit tested
in milliseconds and reused by the model, the trainer and the evaluation code alike.
"""

from __future__ import annotations

from bionemo_scale.flow.coupling import (
    CouplingMethod,
    apply_coupling,
    couple,
    coupling_cost,
    identity_coupling,
    ot_coupling,
    sinkhorn_greedy_assignment,
    squared_cost_matrix,
)
from bionemo_scale.flow.losses import (
    DEFAULT_RBF_BANDWIDTHS,
    endpoint_mse,
    energy_distance,
    pairwise_distances,
    pairwise_sq_distances,
    rbf_mmd,
)
from bionemo_scale.flow.paths import endpoint_to_velocity, expand_time, linear_path, velocity_to_endpoint
from bionemo_scale.flow.solvers import (
    EndpointFn,
    NFECounter,
    SolverMethod,
    euler_endpoint,
    heun_endpoint,
    nfe,
    solve_endpoint,
)
from bionemo_scale.flow.timesteps import TimeDistribution, sample_time, time_grid

__all__ = [
    "DEFAULT_RBF_BANDWIDTHS",
    "CouplingMethod",
    "EndpointFn",
    "NFECounter",
    "SolverMethod",
    "TimeDistribution",
    "apply_coupling",
    "couple",
    "coupling_cost",
    "endpoint_mse",
    "endpoint_to_velocity",
    "energy_distance",
    "euler_endpoint",
    "expand_time",
    "heun_endpoint",
    "identity_coupling",
    "linear_path",
    "nfe",
    "ot_coupling",
    "pairwise_distances",
    "pairwise_sq_distances",
    "rbf_mmd",
    "sample_time",
    "sinkhorn_greedy_assignment",
    "solve_endpoint",
    "squared_cost_matrix",
    "time_grid",
    "velocity_to_endpoint",
]
