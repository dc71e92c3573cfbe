"""SCALE: a set-aware conditional flow on a bidirectional megatron-core transformer.

Training step for a batch of set pairs (X0 control, X1 perturbed, coupled by OT):

    Z0, Z1 = enc(X0), enc(X1)                   # per-cell gene encoder (tensor-parallel MLP)
    Zt     = (1 - t) Z0 + t Z1                  # linear path
    h      = Transformer([cond tokens; Zt])     # bidirectional, no positional encoding
    Ẑ1     = Zt + (1 - t) head(h)               # endpoint, residual on the current state
    X̂1     = X0 + prior + dec(Ẑ1) - dec(Z0)     # residual on the control cells and the prior

With `center_controls`, X0 in the residual is the control set moved onto its pool's mean
(X0 − mean_set(X0) + mean_pool): the sampled cells' mean deviation is noise, not response.

With the additive prior (the additive baseline's shift for this perturbation, from the *other*
training contexts), the flow transports X0 to X1 − prior: it learns only how this context
deviates from the cross-context average effect. Without it, prior = 0.

Pipeline parallelism: the first stage owns the encoder and condition tokens, the last stage
the endpoint head and decoder. The last stage needs Z0 and Z1 (computed on the first), so they
ride along the activation tensor as extra sequence positions that the transformer layers never
see: each stage runs its layers on the first T+S positions and passes the carry through
untouched, and gradients flow back to the encoder through the normal p2p backward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from bionemo_scale.config import ScaleModelConfig
from bionemo_scale.data.control_means import center_sets
from bionemo_scale.errors import ScaleError
from bionemo_scale.flow.paths import linear_path
from bionemo_scale.flow.solvers import solve_endpoint
from bionemo_scale.model.conditions import ConditionTokens
from bionemo_scale.model.layers import ParallelMLP
from bionemo_scale.model.specs import get_block_spec

logger = logging.getLogger(__name__)

CONDITION_KEYS = ("parts", "dose", "context_id", "batch_id")
OPTIONAL_CONDITION_KEYS = ("prior", "pert_features", "control_mean")


def conditions_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The condition tensors of a batch (ids, dose, and the prior/features when present)."""
    out = {k: batch[k] for k in CONDITION_KEYS}
    out.update({k: batch[k] for k in OPTIONAL_CONDITION_KEYS if k in batch})
    return out


@dataclass
class ScaleOutput:
    """What the last pipeline stage returns (all batch-first)."""

    z1_hat: torch.Tensor  # [B, S, H] predicted endpoint latent
    z1: torch.Tensor  # [B, S, H] target latent enc(X1) (zeros at inference)
    z0: torch.Tensor  # [B, S, H]
    x1_hat: torch.Tensor  # [B, S, G] decoded endpoint
    x0_rec: torch.Tensor | None  # [B, S, G] dec(Z0), training only
    x1_rec: torch.Tensor | None  # [B, S, G] dec(Z1), training only


class ScaleModel(MegatronModule):
    """The SCALE MegatronModule (one pipeline stage of it when PP > 1)."""

    def __init__(
        self,
        config: TransformerConfig,
        cfg: ScaleModelConfig,
        pre_process: bool = True,
        post_process: bool = True,
    ) -> None:
        super().__init__(config=config)
        if min(cfg.n_genes, cfg.n_contexts) < 1:
            raise ScaleError("model vocabulary is empty (n_genes/n_contexts = 0)", "build the model from a dataset")
        self.cfg = cfg
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process = pre_process
        self.post_process = post_process
        self.share_embeddings_and_output_weights = False
        self.input_tensor: torch.Tensor | None = None
        self.num_condition_tokens = 4 + int(cfg.use_control_stats)
        h, g, w = cfg.hidden_size, cfg.n_genes, cfg.encoder_width

        if pre_process:
            self.gene_encoder = ParallelMLP(config, g, w, h)
            self.conditions = ConditionTokens(cfg, config)
            assert self.conditions.num_tokens == self.num_condition_tokens
        spec = get_block_spec(config, cfg.spec)
        # `decoder` is megatron's name for the block (its schedules look it up by that name).
        self.decoder = TransformerBlock(config, spec=spec, pre_process=pre_process, post_process=post_process)
        if post_process:
            self.head = ParallelMLP(config, h, w, h)
            self.gene_decoder = ParallelMLP(config, h, w, g)

    # -- pipeline plumbing ---------------------------------------------------------------------
    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor] | None) -> None:
        """Megatron's schedules hand non-first stages their input here."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    # -- pieces --------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, G] -> [S, B, H] (megatron is sequence-first), each cell at unit RMS.

        Normalising the latent fixes its scale: the encoder is trained by reconstruction, which
        does not bound it, and an unbounded latent makes the endpoint MSE grow without limit.
        """
        z = self.gene_encoder(x.transpose(0, 1).contiguous().to(self.config.params_dtype))
        return z * torch.rsqrt(z.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(z.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """[S, B, H] -> [B, S, G]."""
        return self.gene_decoder(z.to(self.config.params_dtype)).transpose(0, 1).float()

    def _condition_tokens(self, batch: dict[str, torch.Tensor], ctrl: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self._check_ids(batch)
        return self.conditions(
            ctrl=ctrl,
            parts=batch["parts"],
            dose=batch["dose"],
            context_id=batch["context_id"],
            batch_id=batch["batch_id"],
            t=t,
            pert_features=batch.get("pert_features"),
            prior=self._prior(batch),
        )

    def _prior(self, conditions: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """[B, G] additive prior, required when the model was built with one."""
        if not self.cfg.additive_prior:
            return None
        prior = conditions.get("prior")
        if prior is None:
            raise ScaleError(
                "this model predicts on top of an additive prior, but the batch has no 'prior'",
                "build inputs with bionemo_scale.data.prior (predict/train do this from prior.safetensors)",
            )
        return prior.float()

    def _check_ids(self, batch: dict[str, torch.Tensor]) -> None:
        cfg = self.cfg
        limits = {"parts": cfg.n_parts, "context_id": cfg.n_contexts, "batch_id": cfg.n_batches}
        for key, n in limits.items():
            ids = batch[key]
            if ids.numel() and int(ids.max()) > n:  # n itself is the reserved "unknown" id
                raise ScaleError(
                    f"{key} {int(ids.max())} is outside the model's vocabulary of {n}",
                    "map unseen labels to the unknown id, or fine-tune with an extended vocabulary",
                )

    def _run_transformer(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.pre_process:
            self.decoder.set_input_tensor(hidden)
        return self.decoder(hidden_states=hidden, attention_mask=None)

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self,
        ctrl: torch.Tensor,
        t: torch.Tensor,
        conditions: dict[str, torch.Tensor],
        pert: torch.Tensor | None = None,
    ) -> ScaleOutput | torch.Tensor:
        """One stage of the training/teacher-forced forward.

        Returns the activation tensor [T + 3S, B, H] on non-last stages, a `ScaleOutput` on the last.
        """
        n_cond, s = self.num_condition_tokens, ctrl.shape[1]
        prior = self._prior(conditions)
        if self.pre_process:
            target = pert if pert is None or prior is None else pert - prior[:, None, :]
            if target is not None:  # one encoder pass over both sets: larger GEMMs, same result
                z0, z1 = self.encode(torch.cat([ctrl, target], dim=0)).chunk(2, dim=1)
            else:
                z0 = self.encode(ctrl)
                z1 = torch.zeros_like(z0)
            zt = linear_path(z0, z1, t.view(1, -1, 1).to(z0.dtype))
            hidden = torch.cat([self._condition_tokens(conditions, ctrl, t), zt], dim=0)
            carry = torch.cat([z1, z0], dim=0)
        else:
            if self.input_tensor is None:
                raise RuntimeError("non-first pipeline stage called without set_input_tensor")
            hidden, carry = self.input_tensor[: n_cond + s], self.input_tensor[n_cond + s :]
        out = self._run_transformer(hidden)
        if not self.post_process:
            return torch.cat([out, carry], dim=0)
        z1, z0 = carry[:s], carry[s:]
        tt = t.view(1, -1, 1).to(z0.dtype)
        z1_hat = self._endpoint_from_hidden(out[n_cond:], linear_path(z0, z1, tt), tt)
        training = pert is not None
        if training:
            # dec(Ẑ1), dec(Z0) and dec(Z1) in one decoder pass; dec(Z0) serves both the gene
            # residual and the reconstruction term (it used to be decoded twice).
            x1_dec, x0_rec, x1_rec = self.decode(torch.cat([z1_hat, z0, z1], dim=1)).chunk(3, dim=0)
            x1_hat = self._decode_endpoint(z1_hat, z0, self._residual_base(ctrl, conditions), prior, (x1_dec, x0_rec))
        else:
            x1_hat = self._decode_endpoint(z1_hat, z0, self._residual_base(ctrl, conditions), prior)
        return ScaleOutput(
            z1_hat=z1_hat.transpose(0, 1),
            z1=z1.transpose(0, 1),
            z0=z0.transpose(0, 1),
            x1_hat=x1_hat,
            x0_rec=x0_rec if training else None,
            x1_rec=self._add_prior(x1_rec, prior) if training else None,
        )

    def _endpoint_from_hidden(self, h_cells: torch.Tensor, zt: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        delta = self.head(h_cells)
        return zt + (1.0 - tt) * delta if self.cfg.latent_residual else delta

    def _residual_base(self, ctrl: torch.Tensor, conditions: dict[str, torch.Tensor]) -> torch.Tensor:
        """The cells the gene residual starts from: the control set, or it centred on its pool."""
        if not self.cfg.center_controls:
            return ctrl
        control_mean = conditions.get("control_mean")
        if control_mean is None:
            raise ScaleError(
                "this model centres control sets on their pool's mean, but the batch has no 'control_mean'",
                "build inputs with bionemo_scale.data.control_means (predict/train do this)",
            )
        return center_sets(ctrl, control_mean)

    @staticmethod
    def _add_prior(x: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        return x if prior is None else x + prior[:, None, :]

    def _decode_endpoint(
        self,
        z1_hat: torch.Tensor,
        z0: torch.Tensor,
        ctrl: torch.Tensor,
        prior: torch.Tensor | None,
        decoded: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """X̂1 from Ẑ1; `decoded` = (dec(Ẑ1), dec(Z0)) when the caller already has them."""
        x1_hat, x0_dec = decoded if decoded is not None else (self.decode(z1_hat), None)
        if self.cfg.gene_residual:
            x1_hat = ctrl.float() + x1_hat - (x0_dec if x0_dec is not None else self.decode(z0))
        return self._add_prior(x1_hat, prior)

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(
        self,
        ctrl: torch.Tensor,
        conditions: dict[str, torch.Tensor],
        steps: int = 1,
        solver: str = "euler",
        clamp: bool = True,
    ) -> torch.Tensor:
        """Predicted perturbed cells [B, S, G] from control sets [B, S, G] (single pipeline stage).

        steps=1 is one endpoint evaluation (NFE = 1); K > 1 integrates K Euler (or Heun) steps
        of the velocity (Ẑ1 − Z)/(1 − t) implied by the endpoint. Log-expression is clamped at 0
        unless `clamp=False` (shifts that will be summed must be clamped once, after the sum).
        """
        if not (self.pre_process and self.post_process):
            raise ScaleError("predict needs the whole model on one pipeline stage", "predict with PP=1")
        # The integration state stays float32: under bf16 autocast (`predict --autocast bf16`) only
        # the network's products drop to bf16, and K Euler steps do not accumulate bf16 rounding.
        z0 = self.encode(ctrl).float()
        n_cond = self.num_condition_tokens

        def endpoint(z_bsh: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            z = z_bsh.transpose(0, 1).to(self.config.params_dtype)  # bf16 weights (megatron's bf16) take bf16
            hidden = torch.cat([self._condition_tokens(conditions, ctrl, t), z], dim=0)
            out = self._run_transformer(hidden)
            z1 = self._endpoint_from_hidden(out[n_cond:], z, t.view(1, -1, 1).to(z.dtype))
            return z1.float().transpose(0, 1)

        z1_hat = solve_endpoint(endpoint, z0.transpose(0, 1), method=solver, steps=steps).transpose(0, 1)
        # dec(Ẑ1) and dec(Z0) in one decoder pass (one larger GEMM is cheaper than two)
        decoded = self.decode(torch.cat([z1_hat, z0], dim=1)).chunk(2, dim=0) if self.cfg.gene_residual else None
        base = self._residual_base(ctrl, conditions)
        x1_hat = self._decode_endpoint(z1_hat, z0, base, self._prior(conditions), decoded=decoded)
        return x1_hat.clamp_min(0.0) if clamp else x1_hat


def validate_against_data(cfg: ScaleModelConfig, n_genes: int, where: str = "the data") -> None:
    """A gene panel that differs from the model's is a user error, not a shape crash in megatron."""
    if cfg.n_genes != n_genes:
        raise ScaleError(
            f"the model was built for {cfg.n_genes} genes but {where} has {n_genes}",
            "preprocess with the checkpoint's gene list (genes.txt), or fine-tune with --gene-map",
        )
