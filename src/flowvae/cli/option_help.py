"""One line of help for every training option (``flowvae train --help`` and the CLI reference).

The options themselves are declared once, in :class:`~flowvae.config.TrainConfig` and
:class:`~flowvae.models.ModelConfig`; this module says what each one does and, where the values
are names, which names are accepted (read from the registries, so a new flow shows by itself).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flowvae.config import OPTIMIZERS, PRIORS
from flowvae.data import available_datasets
from flowvae.flows import FLOW_NAMES
from flowvae.models import LIKELIHOODS, MODELS
from flowvae.priors import FLOW_PRIOR_NAMES

HELP: dict[str, str] = {
    # the data
    "dataset": "a registered data set, or a folder of PNG/JPEG images, a .npy or a .npz file of your own",
    "data_dir": "where registered data sets are read and downloaded to; unset: $FLOWVAE_DATA, else ~/.cache/flowvae",
    "data_kind": "how to read a --dataset PATH's values; unset: detected from them (0/1 binary, floats in "
    "[0, 1] grayscale, integers 0..255 8bit)",
    "valid_fraction": "share of a --dataset PATH's images held out for validation when it has no valid split",
    "test_fraction": "share of a --dataset PATH's images held out for the test when it has no test split",
    # the optimisation
    "epochs": "passes over the training set (at most)",
    "batch_size": "images per training step (the global batch under torchrun)",
    "optimizer": "the optimizer",
    "lr": "learning rate",
    "lr_decay": "multiply the learning rate by this after every --lr-patience epochs without a better "
    "validation -ELBO (1: never)",
    "lr_patience": "epochs without a better validation -ELBO before the learning rate decays",
    "warmup_epochs": "KL weight beta rises linearly from 0 to 1 over this many epochs (0: beta = 1 throughout)",
    "free_bits": "floor on each KL group, in nats per latent unit (0: off)",
    "patience": "stop after this many epochs without a better validation -ELBO (0: never stop early)",
    "max_minutes": "wall-clock budget of the training loop in minutes (the final evaluation comes after it)",
    "grad_clip": "clip the gradient norm to this (0: off)",
    "grad_skip": "skip an update whose gradient norm is above this many times its running level "
    "(0: skip only non-finite ones)",
    "ema": "evaluate an exponential moving average of the weights with this decay, e.g. 0.999 (0: off)",
    # evaluation
    "eval_samples": "K importance samples per test image for the final -log p(x); K=5000 is costly (on digits "
    "it took as long as about 80 training epochs): lower it for quick runs",
    "eval_batch_size": "images per evaluation batch",
    # the machine
    "seed": "seeds the weights, the shuffles, the noise and the splits of a --dataset PATH",
    "threads": "CPU threads for torch (0: torch's default)",
    "device": "where to train: auto (CUDA if there is one), cpu, cuda or cuda:N",
    "precision": "fp32, or bf16/fp16 autocast for the networks (densities accumulate in fp32)",
    "compile": "torch.compile the model (faster steps after a compilation of about a minute)",
    "tf32": "CUDA: TF32 matmuls and convolutions and cudnn.benchmark (faster, about 1e-3 relative error)",
    "deterministic": "deterministic algorithms (CUDA: cuBLAS workspace, deterministic cuDNN)",
    "progress": "progress bars on a terminal; plain lines per epoch when the output is not a terminal",
    "tensorboard": 'also log to RUN/tensorboard (pip install "flowvae[tensorboard]")',
    "out": "the run directory (created; must be new or empty unless --resume)",
    # the model
    "arch": "the architecture: mlp, conv and gated are single-latent VAEs; ladder and resnet are hierarchical",
    "latent_dim": "latent units (per stochastic layer for ladder; latent channels for resnet)",
    "layers": "stochastic layers (ladder, resnet)",
    "hidden": "width of the MLP layers",
    "channels": "resnet: deterministic channels per layer",
    "feature_dim": "size of the convolutional encoders' feature vector h",
    "likelihood": "p(x|z) (default from the data: bernoulli for binary/grayscale, categorical256 for 8bit)",
    "flow": "the posterior's normalizing flow (per stochastic layer for ladder and resnet; none: diagonal Gaussian)",
    "flow_steps": "steps of the posterior flow",
    "flow_hidden": "width of the MADE and coupling networks",
    "reflections": "Householder reflections of the Householder-Sylvester flow",
    "rank": "orthogonal Sylvester: rank M of Q (default: latent_dim)",
    "flow_context": "condition the flow on the encoder's h (--no-flow-context: flow parameters shared by all images)",
    "prior": "p(z): standard N(0, I), a flow prior or the VampPrior (the top layer's for hierarchical models)",
    "prior_flow": "the flow of --prior flow (default: maf for vectors, glow for the resnet's spatial top layer)",
    "prior_flow_steps": "steps of the prior's flow",
    "pseudo_inputs": "learned pseudo-inputs (mixture components) of --prior vamp; for the ladder, on its top layer",
}


def choices(name: str) -> tuple[str, ...] | None:
    """The names an option accepts, or None for a free value."""
    table: dict[str, tuple[str, ...]] = {
        "dataset": tuple(available_datasets()),
        "data_kind": ("binary", "grayscale", "8bit"),
        "optimizer": tuple(OPTIMIZERS),
        "precision": ("fp32", "bf16", "fp16"),
        "arch": tuple(MODELS.names()),
        "flow": tuple(FLOW_NAMES),
        "likelihood": tuple(LIKELIHOODS),
        "prior": tuple(PRIORS),
        "prior_flow": FLOW_PRIOR_NAMES,
    }
    return table.get(name)


def option_help(field: dataclasses.Field, default: Any) -> str:
    """``--help``'s line for a config field: :data:`HELP`'s text (or the field's ``metadata['help']``),
    the names it accepts and its default."""
    names = choices(field.name)
    text = HELP.get(field.name) or field.metadata.get("help", "")
    accepted = f"; one of {', '.join(names)}" if names else ""
    return f"{text}{accepted} (default: {default})".strip()
