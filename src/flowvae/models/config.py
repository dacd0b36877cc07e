"""Every model option, declared once.  The command-line flags, the "same model?" check on resume
and ``results.json`` are all derived from :class:`ModelConfig`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from flowvae.models.networks import ACTIVATIONS


@dataclass
class ModelConfig:
    """The model: architecture, latent variables, posterior flow, prior and likelihood."""

    arch: str = "mlp"  # mlp | conv | gated | ladder | resnet
    latent_dim: int = 32  # latents (per stochastic layer for ladder; latent channels for resnet)
    layers: int = 2  # stochastic layers (ladder, resnet)
    hidden: int = 300  # MLP widths
    channels: int = 64  # resnet: deterministic channels per layer
    feature_dim: int = 256  # conv encoders' h size
    likelihood: str | None = None  # default from the data: bernoulli (binary) or categorical256 (8-bit)
    flow: str = "none"  # posterior flow (per stochastic layer for ladder/resnet)
    flow_steps: int = 4
    flow_hidden: int = 320  # MADE / coupling widths
    reflections: int = 8  # Householder-Sylvester
    rank: int | None = None  # orthogonal Sylvester: rank M of Q (default: latent_dim)
    flow_context: bool = True  # condition the flow on the encoder's h (False: global flow parameters)
    prior: str = "standard"  # standard | flow | vamp (the top layer's prior for hierarchical models)
    prior_flow: str | None = None  # flow prior: maf | coupling (vectors), glow (spatial); None: maf / glow
    prior_flow_steps: int = 4
    pseudo_inputs: int = field(
        default=500,
        metadata={
            "help": "learned pseudo-inputs (mixture components) of --prior vamp; for the ladder, on its top layer"
        },
    )
    activation: str = field(
        default="elu",
        metadata={
            "help": "hidden layers of the MLP networks (arch mlp, ladder): "
            "elu (Linear+ELU) or gated (Linear·sigmoid(Linear))"
        },
    )
    dropout: float = field(
        default=0.0,
        metadata={
            "help": "dropout probability after every hidden layer of the MLP encoder and decoder "
            "(arch mlp, ladder; 0: off)"
        },
    )
    posterior_log_var_min: float | None = field(
        default=None,
        metadata={
            "help": "soft lower bound on the Gaussian posterior's log variance, e.g. -6 (needs --posterior-log-var-max)"
        },
    )
    posterior_log_var_max: float | None = field(
        default=None,
        metadata={
            "help": "soft upper bound on the Gaussian posterior's log variance, e.g. 2 (default: log σ within ±8)"
        },
    )

    autoregressive_decoder: int = field(
        default=0,
        metadata={
            "help": "hidden units of a MADE that makes the Bernoulli decoder autoregressive over the pixels, "
            "p(x|z) = Π p(x_i | x_<i, z) (arch ladder; 0: off, pixels independent given z)"
        },
    )
    pixelcnn_layers: int = field(
        default=0,
        metadata={
            "help": "masked convolutions (PixelCNN's masks, weights shared over the image) that add what the pixels "
            "above and to the left say to each Bernoulli logit (arch ladder, one channel; 0: off)"
        },
    )
    pixelcnn_channels: int = field(
        default=32, metadata={"help": "feature channels of the --pixelcnn-layers convolutions"}
    )
    pixelcnn_conditioned: bool = field(
        default=False,
        metadata={
            "help": "the PixelCNN term's last layer also reads each pixel's decoder logit: a learned nonlinear "
            "mix instead of a sum (starts as the sum)"
        },
    )

    @property
    def log_var_bounds(self) -> tuple[float, float] | None:
        """(low, high) of the posterior's log-variance, or None."""
        if self.posterior_log_var_min is None or self.posterior_log_var_max is None:
            return None
        return self.posterior_log_var_min, self.posterior_log_var_max

    def option_checks(self) -> list[tuple[bool, str, str]]:
        """(holds, field, message if not) for the options that shape the networks."""
        bounds = (self.posterior_log_var_min, self.posterior_log_var_max)
        autoregressive = self.autoregressive_decoder != 0 or self.pixelcnn_layers != 0
        return [
            (0 <= self.dropout < 1, "dropout", "must be in [0, 1)"),
            (self.activation in ACTIVATIONS, "activation", f"must be {' or '.join(ACTIVATIONS)}"),
            (
                (self.activation == "elu" and self.dropout == 0) or self.arch in MLP_ARCHS,
                "arch",
                f"must be one of {', '.join(MLP_ARCHS)} for --activation and --dropout (the MLP networks)",
            ),
            (self.autoregressive_decoder >= 0, "autoregressive_decoder", "must be >= 0 (0: off)"),
            (self.pixelcnn_layers >= 0, "pixelcnn_layers", "must be >= 0 (0: off)"),
            (self.pixelcnn_channels >= 1, "pixelcnn_channels", "must be >= 1"),
            (
                not self.pixelcnn_conditioned or self.pixelcnn_layers > 0,
                "pixelcnn_conditioned",
                "needs --pixelcnn-layers",
            ),
            (
                not autoregressive or self.arch == "ladder",
                "arch",
                "must be ladder for --autoregressive-decoder and --pixelcnn-layers",
            ),
            (
                (bounds[0] is None) == (bounds[1] is None),
                "posterior_log_var_min",
                "and posterior_log_var_max must be given together",
            ),
            (
                self.log_var_bounds is None or self.log_var_bounds[0] < self.log_var_bounds[1],
                "posterior_log_var_min",
                "must be below posterior_log_var_max",
            ),
            (
                self.log_var_bounds is None or self.arch != "resnet",
                "arch",
                "must not be resnet for posterior log-variance bounds",
            ),
        ]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MLP_ARCHS = ("mlp", "ladder")
"""The architectures whose networks are MLPs: the options of the MLP networks (activation, dropout,
output bias) apply to them."""

MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
