"""Training speed of the same flow VAE in flowvae and in pythae, normflows, Pyro and zuko.

The model: MLP encoder 784-300-300 → (mean, log-std) of 40 latents, decoder 40-300-300-784
Bernoulli logits, posterior flow (a) 10 planar steps or (b) 4 IAF steps with MADE 40-320-320-80;
loss = negative ELBO with the flow's log-det; Adam(lr=1e-3); batches of 100 statically binarized
MNIST images.  Every library builds it with its own public API (what each supports differs:
see the notes column), and every network uses ELU as flowvae's does (pythae's MADE is fixed to
ReLU).  The flow either reads the encoder's last hidden layer h (300; "on h": amortized planar
parameters, h into the MADE) or has global parameters ("global").  pythae's and normflows' VAEs
can only do the latter, Pyro and zuko are measured on h, and flowvae is measured both ways, so
that each peer is compared with flowvae on the same model and the same FLOPs.

Measured in one process, with the same threads and the same batches for everyone:

- training steps per second (forward, backward, Adam step): ``--warmup`` steps excluded, then
  ``--repeats`` blocks of ``--steps`` steps, taken round-robin over the implementations so that
  a change in the machine's load hits all of them alike; the median block gives steps/s;
- the importance-weighted estimate of −log p(x) with K = ``--nll-samples`` (1000) on
  ``--nll-points`` (100) test images, with the library's own estimator where it has one
  (flowvae's ``objectives.importance_weighted_nll``, compiled for the flowvae-compile rows as
  ``flowvae evaluate --compile`` does; pythae's ``get_nll``) and otherwise with ``logsumexp``
  over the library's own log q and log p; every library gets the same chunk of ``--chunk``
  samples (default: the chunk flowvae's evaluation picks on a CPU), and the median and range of
  ``--nll-repeats`` timings taken round-robin;
- drawing ``--sample-count`` (10 000) images from the prior through the decoder;
- the process keeps freed memory for reuse (``flowvae.evaluation.reuse_freed_memory``, which the
  ``flowvae`` command calls) for every row alike; ``--default-allocator`` leaves glibc's defaults;
- FLOP efficiency: FLOPs of one training step (``torch.utils.flop_counter.FlopCounterMode``:
  matrix products only) × steps/s, divided by the FLOP/s of a ``--matmul``² float32 matmul
  timed in the same run.

Install the peers once (a separate virtual environment; torch==2.13.0 goes in first):

    bash benchmarks/setup_peers.sh
    benchmarks/.venv-peers/bin/python benchmarks/peers.py                 # full run
    benchmarks/.venv-peers/bin/python benchmarks/peers.py --quick         # smoke run, not saved
    benchmarks/.venv-peers/bin/python benchmarks/peers.py --libraries flowvae pyro --flows iaf

A library that is not installed, or that has no such flow, is listed as unavailable with the
reason.  Writes ``benchmarks/results/peers.json`` and ``peers.md``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import common
from common import machine_line, markdown_table, measure, report, start

# Every flowvae-compile row compiles the same VAE methods for another model (and the last, shorter
# chunk of importance samples once more): more recompilations than dynamo's default limit of 8,
# past which it would silently run the later models eagerly.
torch._dynamo.config.recompile_limit = 64

ROOT = Path(__file__).resolve().parents[1]
DATA = next(
    (
        d / "data" / "binarized_mnist.npz"
        for d in (ROOT / "shared", ROOT.parent / "shared")
        if (d / "data" / "binarized_mnist.npz").exists()
    ),
    ROOT.parent / "shared" / "data" / "binarized_mnist.npz",
)
PIXELS, HIDDEN, LATENT, MADE_HIDDEN = 784, 300, 40, 320
FLOW_STEPS = {"none": 0, "planar": 10, "iaf": 4}  # "none": the same VAE without a flow, the floor
LIBRARIES = ("flowvae", "flowvae-compile", "torch", "pythae", "normflows", "pyro", "zuko", "nflows")
# The models each library is built as (True: the flow reads the encoder's h), and so the only ones
# its builder is asked for: pythae's VAE_LinNF / VAE_IAF and normflows' NormalizingFlowVAE pass no
# context to their flows; Pyro and zuko are measured on h; flowvae both ways, so each peer meets
# the same model.
CONDITIONINGS = {
    "flowvae": (True, False),
    "flowvae-compile": (True, False),
    "pythae": (False,),
    "normflows": (False,),
    "pyro": (True,),
    "zuko": (True,),
    "nflows": (True, False),
    "torch": (True,),
}
DISTRIBUTIONS = {
    "flowvae": "flowvae",
    "flowvae-compile": "flowvae",
    "torch": "torch",
    "pythae": "pythae",
    "normflows": "normflows",
    "pyro": "pyro-ppl",
    "zuko": "zuko",
    "nflows": "nflows",
}


class Unavailable(Exception):
    """This library cannot build this model here (not installed, or no such flow); the message says why."""


@dataclass
class Implementation:
    """One library's VAE, reduced to what the benchmark calls.

    ``loss(x)``: mean negative ELBO of a batch x (B, 784) in {0, 1}; ``nll(x, k, chunk)``: mean
    importance-weighted −log p(x) in nats; ``sample(n)``: n images (Bernoulli means).
    """

    library: str
    flow: str
    conditioned: bool  # the flow reads the encoder's h (amortized / conditioned) rather than global parameters
    notes: str
    module: nn.Module
    loss: Callable[[torch.Tensor], torch.Tensor]
    nll: Callable[[torch.Tensor, int, int], float]
    sample: Callable[[int], torch.Tensor]
    optimizer: torch.optim.Optimizer | None = None
    results: dict = field(default_factory=dict)
    eager_loss: Callable[[torch.Tensor], torch.Tensor] | None = None  # for FLOP counting, if loss is compiled
    nll_full_warmup: bool = False  # warm nll up at the timed shapes (compiled scoring), not on 2 points

    @property
    def model(self) -> str:
        return model_name(self.flow, self.conditioned)

    @property
    def name(self) -> str:
        return f"{self.library} {self.model}"


def model_name(flow: str, conditioned: bool) -> str:
    if flow == "none":
        return "no flow"
    return f"{flow}×{FLOW_STEPS[flow]} {'on h' if conditioned else 'global'}"


# --- shared pieces for the libraries that leave the networks to the user ------------------------


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ELU between them (none after the last), as flowvae's MLP VAE."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ELU())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x (B, 784) -> mean, log-std (B, 40) and the last hidden layer h (B, 300)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(mlp([PIXELS, HIDDEN, HIDDEN]), nn.ELU())
        self.head = nn.Linear(HIDDEN, 2 * LATENT)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.body(x)
        mean, log_std = self.head(h).chunk(2, dim=-1)
        return mean, log_std, h


def decoder_net() -> nn.Sequential:
    return mlp([LATENT, HIDDEN, HIDDEN, PIXELS])


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


def iw_nll(log_weights: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, k: int, chunk: int) -> float:
    """−log p(x) ≈ −logsumexp_k(log w_k) + log K, averaged over x; ``log_weights(x, n)`` is (n, B).

    Used for the libraries that have no estimator of their own; chunks of ``chunk`` samples,
    accumulated in float64.
    """
    with torch.no_grad():
        parts = [log_weights(x, min(chunk, k - start)).double() for start in range(0, k, chunk)]
        log_w = torch.cat(parts, dim=0)
        return float((math.log(k) - torch.logsumexp(log_w, dim=0)).mean())


# --- flowvae ------------------------------------------------------------------------------------


def build_flowvae_compiled(flow: str, conditioned: bool) -> Implementation:
    """flowvae's model with its loss under torch.compile (compiled during the untimed warm-up)."""
    impl = build_flowvae(flow, conditioned)
    compiled = torch.compile(impl.module)
    score = torch.compile(impl.module.log_densities)  # what evaluate(compile=True) scores samples with
    from flowvae import objectives

    def nll(x, k, chunk):
        with torch.no_grad():
            return float(
                objectives.importance_weighted_nll(
                    impl.module, x.view(-1, 1, 28, 28), samples=k, chunk_size=chunk, score=score
                ).mean()
            )

    impl.eager_loss = impl.loss  # FlopCounterMode's global hooks would make the compiled model recompile
    impl.loss = lambda x: objectives.negative_elbo(compiled(x.view(-1, 1, 28, 28), samples=1)).mean()
    impl.nll, impl.nll_full_warmup = nll, True
    impl.library = "flowvae-compile"
    impl.notes = (
        "the flowvae model above, its forward and its importance-sample scoring under torch.compile "
        "(CPU inductor); compile time excluded"
    )
    return impl


def build_flowvae(flow: str, conditioned: bool) -> Implementation:
    try:
        from flowvae import objectives
        from flowvae.models import build_vae
    except ImportError as error:
        raise Unavailable(f"flowvae.models / flowvae.objectives not importable: {error}") from error
    kwargs = {"flow_hidden": MADE_HIDDEN} if flow == "iaf" else {}
    model = build_vae(
        arch="mlp",
        image_shape=(1, 28, 28),
        latent_dim=LATENT,
        hidden=HIDDEN,
        likelihood="bernoulli",
        flow=flow,
        flow_steps=FLOW_STEPS[flow],
        flow_context=conditioned,
        **kwargs,
    )

    def loss(x):
        return objectives.negative_elbo(model(x.view(-1, 1, 28, 28), samples=1)).mean()

    def nll(x, k, chunk):
        with torch.no_grad():
            return float(
                objectives.importance_weighted_nll(model, x.view(-1, 1, 28, 28), samples=k, chunk_size=chunk).mean()
            )

    def sample(n):
        with torch.no_grad():
            return model.sample(n)

    if flow == "none":
        notes = "build_vae(arch='mlp', flow='none'): the VAE without a flow, the floor of every flow model"
    elif flow == "planar":
        notes = (
            "build_vae(arch='mlp'"
            + (
                "): u, w, b of each step from a linear head on h (amortized)"
                if conditioned
                else ", flow_context=False): global u, w, b"
            )
            + ", û constraint"
        )
    else:
        notes = (
            "build_vae(arch='mlp'"
            + (
                "): h through an extra linear into the MADE's first layer, "
                if conditioned
                else ", flow_context=False): no h, "
            )
            + "σ-gated IAF (clamped shift), ELU MADE 2×320, order reversed between steps"
        )
    return Implementation("flowvae", flow, conditioned, notes, model, loss, nll, sample)


# --- pythae -------------------------------------------------------------------------------------


def build_pythae(flow: str, conditioned: bool) -> Implementation:
    try:
        from pythae.models import VAE_IAF, VAE_IAF_Config, VAE_LinNF, VAE_LinNF_Config
        from pythae.models.base.base_utils import ModelOutput
        from pythae.models.nn import BaseDecoder, BaseEncoder
        from pythae.samplers import NormalSampler, NormalSamplerConfig
    except ImportError as error:
        raise Unavailable(f"pythae not importable: {error}") from error

    class PythaeEncoder(BaseEncoder):
        def __init__(self):
            BaseEncoder.__init__(self)
            self.net = Encoder()

        def forward(self, x):
            mean, log_std, _ = self.net(x.reshape(x.shape[0], -1))
            return ModelOutput(embedding=mean, log_covariance=2.0 * log_std)

    class PythaeDecoder(BaseDecoder):
        # pythae's 'bce' reconstruction loss takes probabilities, so the decoder ends in a sigmoid.
        def __init__(self):
            BaseDecoder.__init__(self)
            self.net = decoder_net()

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))

    common = {"input_dim": (PIXELS,), "latent_dim": LATENT, "reconstruction_loss": "bce"}
    if flow == "planar":
        config = VAE_LinNF_Config(flows=["Planar"] * FLOW_STEPS[flow], **common)
        model = VAE_LinNF(config, encoder=PythaeEncoder(), decoder=PythaeDecoder())
        notes = (
            "VAE_LinNF: global planar parameters (no amortization in its API), no wᵀu ≥ −1 constraint; "
            "decoder ends in sigmoid (BCE on probabilities)"
        )
    else:
        config = VAE_IAF_Config(n_made_blocks=FLOW_STEPS[flow], n_hidden_in_made=2, hidden_size=MADE_HIDDEN, **common)
        model = VAE_IAF(config, encoder=PythaeEncoder(), decoder=PythaeDecoder())
        notes = (
            "VAE_IAF: ungated affine IAF z·exp(s)+m (s unclamped), no h input, ReLU MADE 2×320 (fixed), "
            "features flipped between steps; decoder ends in sigmoid"
        )
    sampler = NormalSampler(model, NormalSamplerConfig())

    def loss(x):
        return model({"data": x}).loss

    def nll(x, k, chunk):
        # pythae's own estimator returns the mean log p(x); it loops over the points one at a time.
        with torch.no_grad():
            return -float(model.get_nll(x, n_samples=k, batch_size=chunk))

    def sample(n):
        with torch.no_grad():
            return sampler.sample(num_samples=n, batch_size=min(n, 1000), return_gen=True)

    return Implementation("pythae", flow, False, notes, model, loss, nll, sample)


# --- normflows ----------------------------------------------------------------------------------


def build_normflows(flow: str, conditioned: bool) -> Implementation:
    try:
        import normflows as nf
    except ImportError as error:
        raise Unavailable(f"normflows not importable: {error}") from error

    encoder = mlp([PIXELS, HIDDEN, HIDDEN, 2 * LATENT])  # NNDiagGaussian: first half mean, second log-variance
    if flow == "planar":
        flows = [nf.flows.Planar((LATENT,)) for _ in range(FLOW_STEPS[flow])]
        notes = (
            "NormalizingFlowVAE: global planar parameters (the VAE passes no context), wᵀu ≥ −1 "
            "constraint; N(0, I) prior as DiagGaussian"
        )
    else:
        flows = []
        for _ in range(FLOW_STEPS[flow]):
            flows.append(
                nf.flows.MaskedAffineAutoregressive(
                    LATENT, MADE_HIDDEN, num_blocks=1, use_residual_blocks=False, activation=F.elu
                )
            )
            flows.append(nf.flows.Permute(LATENT, mode="shuffle"))
        flows = flows[:-1]
        notes = (
            "NormalizingFlowVAE with MaskedAffineAutoregressive run forward (one pass: IAF), scale "
            "sigmoid(s+2)+1e-3, no h (the VAE passes no context), ELU MADE 2×320, fixed random "
            "permutation between steps"
        )
    model = nf.NormalizingFlowVAE(
        nf.distributions.DiagGaussian(LATENT, trainable=False),
        nf.distributions.NNDiagGaussian(encoder),
        flows,
        nf.distributions.NNBernoulliDecoder(decoder_net()),
    )

    def loss(x):
        _, log_q, log_p = model(x, num_samples=1)
        return (log_q - log_p).mean()

    def log_weights(x, n):
        _, log_q, log_p = model(x, num_samples=n)  # (B, n)
        return (log_p - log_q).t()

    def sample(n):
        with torch.no_grad():
            z, _ = model.prior(n)
            return model.decoder(z)

    return Implementation(
        "normflows", flow, False, notes, model, loss, lambda x, k, chunk: iw_nll(log_weights, x, k, chunk), sample
    )


# --- Pyro ---------------------------------------------------------------------------------------


def build_pyro(flow: str, conditioned: bool) -> Implementation:
    try:
        import pyro.distributions as dist
        from pyro.distributions.transforms import ConditionalAffineAutoregressive, ConditionalPlanar
        from pyro.nn import ConditionalAutoRegressiveNN
    except ImportError as error:
        raise Unavailable(f"pyro-ppl not importable: {error}") from error

    class PlanarHead(nn.Module):
        """h -> (b, u, w) of one planar step, one linear layer as in flowvae's amortized planar."""

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(HIDDEN, 1 + 2 * LATENT)

        def forward(self, h):
            return self.linear(h).split([1, LATENT, LATENT], dim=-1)

    if flow == "planar":
        transforms = [ConditionalPlanar(PlanarHead()) for _ in range(FLOW_STEPS[flow])]
        notes = (
            "ConditionalPlanar with a linear hypernet on h (amortized), wᵀu ≥ −1 constraint; "
            "pyro.distributions in a plain torch loop (not SVI)"
        )
    else:
        orders = [torch.arange(LATENT), torch.arange(LATENT).flip(0)]
        transforms = [
            ConditionalAffineAutoregressive(
                ConditionalAutoRegressiveNN(
                    LATENT, HIDDEN, [MADE_HIDDEN, MADE_HIDDEN], permutation=orders[k % 2], nonlinearity=nn.ELU()
                ),
                stable=True,
            )
            for k in range(FLOW_STEPS[flow])
        ]
        notes = (
            "ConditionalAffineAutoregressive(stable=True: σ-gated IAF), h concatenated to the MADE input, "
            "ELU MADE 2×320, order reversed between steps; plain torch loop (not SVI)"
        )

    class PyroVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = Encoder(), decoder_net()
            self.transforms = nn.ModuleList(transforms)

        def log_weights(self, x, n):
            mean, log_std, h = self.encoder(x)
            base = dist.Normal(mean, log_std.exp()).to_event(1)
            q = dist.TransformedDistribution(base, [t.condition(h) for t in self.transforms])
            z = q.rsample((n,))  # (n, B, 40); the transforms cache z for log_prob
            log_q = q.log_prob(z)
            return bernoulli_log_prob(self.decoder(z), x) + standard_normal_log_prob(z) - log_q

    model = PyroVAE()
    return Implementation(
        "pyro",
        flow,
        True,
        notes,
        model,
        lambda x: -model.log_weights(x, 1).mean(),
        lambda x, k, chunk: iw_nll(model.log_weights, x, k, chunk),
        lambda n: torch.sigmoid(model.decoder(torch.randn(n, LATENT))).detach(),
    )


# --- zuko ---------------------------------------------------------------------------------------


def build_zuko(flow: str, conditioned: bool) -> Implementation:
    try:
        import zuko
    except ImportError as error:
        raise Unavailable(f"zuko not importable: {error}") from error
    if flow == "planar":
        raise Unavailable("zuko has no planar flow")
    orders = [torch.arange(LATENT), torch.arange(LATENT).flip(0)]
    lazy = [
        zuko.flows.MaskedAutoregressiveTransform(
            LATENT, context=HIDDEN, order=orders[k % 2], hidden_features=(MADE_HIDDEN, MADE_HIDDEN), activation=nn.ELU
        )
        for k in range(FLOW_STEPS[flow])
    ]
    notes = (
        "MaskedAutoregressiveTransform used in its one-pass direction (IAF) through "
        "NormalizingFlow(...).rsample_and_log_prob; exp(a)·z+b with soft-clamped a (ungated), "
        "h as context, ELU MADE 2×320, order reversed between steps"
    )

    class ZukoVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = Encoder(), decoder_net()
            self.transforms = nn.ModuleList(lazy)

        def log_weights(self, x, n):
            mean, log_std, h = self.encoder(x)
            # NormalizingFlow's transform maps samples to the base; its .inv (our steps, in order) samples.
            sampling = zuko.transforms.ComposedTransform(*(t(h) for t in self.transforms))
            q = zuko.distributions.NormalizingFlow(sampling.inv, zuko.distributions.DiagNormal(mean, log_std.exp()))
            z, log_q = q.rsample_and_log_prob((n,))
            return bernoulli_log_prob(self.decoder(z), x) + standard_normal_log_prob(z) - log_q

    model = ZukoVAE()
    return Implementation(
        "zuko",
        flow,
        True,
        notes,
        model,
        lambda x: -model.log_weights(x, 1).mean(),
        lambda x, k, chunk: iw_nll(model.log_weights, x, k, chunk),
        lambda n: torch.sigmoid(model.decoder(torch.randn(n, LATENT))).detach(),
    )


# --- plain torch: the no-flow VAE and its estimator written by hand ------------------------------


def build_torch(flow: str, conditioned: bool) -> Implementation:
    """What a user writes without a library: the no-flow VAE, and −log p(x) one test image at a time
    with all K samples in one batch (the chunk is ignored)."""
    if flow != "none":
        raise Unavailable("the hand-written baseline is the VAE without a flow")
    notes = (
        "plain torch modules; −log p(x): a loop over the test images, each scored with all K samples "
        "in one batch, logsumexp in float64"
    )

    class TorchVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = Encoder(), decoder_net()

        def log_weights(self, x, n):
            mean, log_std, _ = self.encoder(x)
            eps = torch.randn(n, *mean.shape)
            z = mean + log_std.exp() * eps
            log_q = standard_normal_log_prob(eps) - log_std.sum(-1)
            return bernoulli_log_prob(self.decoder(z), x) + standard_normal_log_prob(z) - log_q

    model = TorchVAE()

    def nll(x, k, chunk):
        with torch.no_grad():
            return float(
                np.mean(
                    [
                        math.log(k) - torch.logsumexp(model.log_weights(x[i : i + 1], k).double(), 0).item()
                        for i in range(len(x))
                    ]
                )
            )

    return Implementation(
        "torch",
        flow,
        True,
        notes,
        model,
        lambda x: -model.log_weights(x, 1).mean(),
        nll,
        lambda n: torch.sigmoid(model.decoder(torch.randn(n, LATENT))).detach(),
    )


# --- nflows -------------------------------------------------------------------------------------


def build_nflows(flow: str, conditioned: bool) -> Implementation:
    try:
        from nflows import transforms
    except ImportError as error:
        raise Unavailable(f"nflows not importable: {error}") from error
    if flow != "iaf":
        raise Unavailable("nflows has no planar flow")
    steps: list[nn.Module] = []
    for k in range(FLOW_STEPS[flow]):
        if k:
            steps.append(transforms.ReversePermutation(LATENT))
        steps.append(
            transforms.MaskedAffineAutoregressiveTransform(
                LATENT,
                MADE_HIDDEN,
                context_features=HIDDEN if conditioned else None,
                num_blocks=1,
                use_residual_blocks=False,
                activation=F.elu,
            )
        )
    notes = (
        "MaskedAffineAutoregressiveTransform in its one-pass direction (IAF) in a CompositeTransform, "
        "(σ(s + 2) + 1e-3)·z + m (gated scale), "
        + ("h as context, " if conditioned else "no context, ")
        + "ELU MADE 2×320 (num_blocks=1), ReversePermutation between steps"
    )

    class NflowsVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = Encoder(), decoder_net()
            self.flow = transforms.CompositeTransform(steps)

        def log_weights(self, x, n):
            mean, log_std, h = self.encoder(x)
            eps = torch.randn(n, *mean.shape)
            z0 = (mean + log_std.exp() * eps).reshape(-1, LATENT)
            log_q0 = (-0.5 * eps * eps - log_std - 0.5 * math.log(2 * math.pi)).sum(-1).reshape(-1)
            context = h.expand(n, *h.shape).reshape(-1, HIDDEN) if conditioned else None
            z, log_det = self.flow(z0, context=context)
            log_q = (log_q0 - log_det).reshape(n, -1)
            z = z.reshape(n, -1, LATENT)
            return bernoulli_log_prob(self.decoder(z), x) + standard_normal_log_prob(z) - log_q

    model = NflowsVAE()
    return Implementation(
        "nflows",
        flow,
        conditioned,
        notes,
        model,
        lambda x: -model.log_weights(x, 1).mean(),
        lambda x, k, chunk: iw_nll(model.log_weights, x, k, chunk),
        lambda n: torch.sigmoid(model.decoder(torch.randn(n, LATENT))).detach(),
    )


BUILDERS = {
    "flowvae": build_flowvae,
    "flowvae-compile": build_flowvae_compiled,
    "torch": build_torch,
    "pythae": build_pythae,
    "normflows": build_normflows,
    "pyro": build_pyro,
    "zuko": build_zuko,
    "nflows": build_nflows,
}


# --- measurement --------------------------------------------------------------------------------


def load_data(path: Path, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    if path.exists():
        with np.load(path) as data:
            return data["train"], data["test"], f"{path.name} (static binarization)"
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 2, (10_000, PIXELS), dtype=np.uint8),
        rng.integers(0, 2, (1_000, PIXELS), dtype=np.uint8),
        f"random bits ({path} not found)",
    )


def train_steps(impl: Implementation, batches: list[torch.Tensor], start: int, count: int) -> int:
    for i in range(start, start + count):
        impl.optimizer.zero_grad(set_to_none=True)
        impl.loss(batches[i % len(batches)]).backward()
        impl.optimizer.step()
    return start + count


def count_flops(impl: Implementation, x: torch.Tensor) -> int:
    """Matmul FLOPs of one training step (forward + backward), counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        (impl.eager_loss or impl.loss)(x).backward()
    impl.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_flops_per_s(n: int, budget: float) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = measure(lambda: a @ b, budget_s=budget, min_repeats=5)
    return 2.0 * n**3 / t.median


def run(args: argparse.Namespace) -> dict:
    train, test, data_note = load_data(Path(args.data), args.seed)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(train))[: args.batch * args.n_batches]
    batches = [torch.from_numpy(train[order[i : i + args.batch]]).float() for i in range(0, len(order), args.batch)]
    x_test = torch.from_numpy(test[: args.nll_points]).float()

    impls, unavailable = [], []
    models = [
        (flow, conditioned) for flow in args.flows for conditioned in ((True,) if flow == "none" else (True, False))
    ]
    for flow, conditioned in models:
        for library in args.libraries:
            # the peers build the flow models, the hand-written torch row only the no-flow floor
            peer = library not in ("flowvae", "flowvae-compile")
            if conditioned not in CONDITIONINGS[library] or (peer and (flow == "none") != (library == "torch")):
                continue
            torch.manual_seed(args.seed)
            try:
                impl = BUILDERS[library](flow, conditioned)
            except Unavailable as why:
                unavailable.append({"library": library, "model": model_name(flow, conditioned), "reason": str(why)})
                print(f"unavailable: {library} {model_name(flow, conditioned)}: {why}", file=sys.stderr)
                continue
            except Exception as error:  # a peer that breaks on construction is reported, not fatal
                unavailable.append(
                    {
                        "library": library,
                        "model": model_name(flow, conditioned),
                        "reason": f"{type(error).__name__}: {error}".splitlines()[0],
                    }
                )
                traceback.print_exc()
                continue
            # The same optimizer for every row: torch's default Adam, or its fused kernel for all.
            impl.optimizer = torch.optim.Adam(
                impl.module.parameters(), lr=1e-3, fused=True if args.optimizer == "fused" else None
            )
            impl.results["parameters"] = sum(p.numel() for p in impl.module.parameters())
            impls.append(impl)

    chunk = args.chunk or flowvae_cpu_chunk(impls, args.nll_points, args.nll_samples)
    matmul = matmul_flops_per_s(args.matmul, budget=2.0)
    print(f"{args.matmul}² float32 matmul: {matmul / 1e9:.1f} GFLOP/s", file=sys.stderr)

    positions = {}
    for impl in list(impls):
        try:
            impl.results["flops_per_step"] = count_flops(impl, batches[0])
            positions[impl.name] = train_steps(impl, batches, 0, args.warmup)
        except Exception as error:
            unavailable.append(
                {
                    "library": impl.library,
                    "model": impl.model,
                    "reason": f"failed in training: {type(error).__name__}: {error}".splitlines()[0],
                }
            )
            traceback.print_exc()
            impls.remove(impl)

    blocks = {impl.name: [] for impl in impls}
    for r in range(args.repeats):
        for impl in impls:  # round-robin: every implementation sees the same stretch of machine load
            start = common.clock()
            positions[impl.name] = train_steps(impl, batches, positions[impl.name], args.steps)
            blocks[impl.name].append(args.steps / (common.clock() - start))
        print(
            f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n} {b[-1]:.1f}/s" for n, b in blocks.items()),
            file=sys.stderr,
        )

    for impl in impls:
        rates = blocks[impl.name]  # in round-robin order: block r of every row ran in the same stretch
        impl.results.update(
            steps_per_s=float(np.median(rates)), steps_per_s_blocks=rates, ms_per_step=1e3 / float(np.median(rates))
        )
        impl.results["efficiency"] = impl.results["flops_per_step"] * impl.results["steps_per_s"] / matmul
        with torch.no_grad():
            impl.results["final_loss"] = float(impl.loss(batches[0]))
        torch.manual_seed(args.seed)
        start = common.clock()
        if impl.nll_full_warmup:  # compiles for the timed shapes; the compilation is reported, not timed
            impl.nll(x_test, args.nll_samples, chunk)
            impl.results["nll_compile_s"] = common.clock() - start
        else:
            impl.nll(x_test[:2], 10, 10)
        impl.sample(100)
        t = measure(lambda impl=impl: impl.sample(args.sample_count), budget_s=3.0, min_repeats=3, max_repeats=5)
        impl.results["sample_s"] = t.median

    nll_times = {impl.name: [] for impl in impls}
    for r in range(args.nll_repeats):
        for impl in impls:  # round-robin, as the training blocks
            torch.manual_seed(args.seed)
            start = common.clock()
            value = impl.nll(x_test, args.nll_samples, chunk)
            nll_times[impl.name].append(common.clock() - start)
            impl.results.setdefault("nll", value)
        print(
            f"−log p(x) repeat {r + 1}/{args.nll_repeats}: "
            + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in nll_times.items()),
            file=sys.stderr,
        )
    for impl in impls:
        times = nll_times[impl.name]  # round-robin order, as the blocks
        impl.results.update(nll_s=float(np.median(times)), nll_s_repeats=times, nll_chunk=chunk)
        print(
            f"{impl.name}: {impl.results['steps_per_s']:.1f} steps/s, −log p(x) {impl.results['nll']:.1f} "
            f"in {impl.results['nll_s']:.2f} s, {args.sample_count} samples in "
            f"{1e3 * impl.results['sample_s']:.0f} ms",
            file=sys.stderr,
        )

    return {
        "data": data_note,
        "matmul_flops_per_s": matmul,
        "implementations": [
            {
                "library": i.library,
                "flow": i.flow,
                "steps": FLOW_STEPS[i.flow],
                "conditioned": i.conditioned,
                "model": i.model,
                "notes": i.notes,
                **i.results,
            }
            for i in impls
        ],
        "unavailable": unavailable,
        "versions": versions(),
    }


def flowvae_cpu_chunk(impls: list[Implementation], points: int, samples: int) -> int:
    """The importance samples per chunk that flowvae's evaluation picks on a CPU for these images
    (``auto_chunk_size`` under ``CPU_DECODE_BUDGET``); 100 where no flowvae row is measured."""
    ours = next((impl.module for impl in impls if impl.library.startswith("flowvae")), None)
    if ours is None:
        return 100
    from flowvae.evaluation import CPU_DECODE_BUDGET, auto_chunk_size

    return auto_chunk_size(ours, points, samples, CPU_DECODE_BUDGET)[1]


def interpreter() -> str:
    """The Python that ran this, relative to the repository when it lives there (the peers' venv)."""
    path = Path(sys.executable)
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return "python"


def versions() -> dict:
    out = {}
    for library, distribution in DISTRIBUTIONS.items():
        try:
            out[library] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            out[library] = None
    return out


def render(results: dict, info: dict, args: argparse.Namespace) -> str:
    rows = []
    impls = results["implementations"]
    ours = ("flowvae", "flowvae-compile")
    reference = {lib: {r["model"]: r for r in impls if r["library"] == lib} for lib in ours}

    def ratio(lib: str, r: dict) -> str:
        ref = reference[lib].get(r["model"])
        return f"{ref['steps_per_s'] / r['steps_per_s']:.2f}" if ref else "—"

    # The floor: the same VAE without a flow (flowvae's, eager for eager rows, compiled for compiled
    # ones); the ceiling of a flow model: the floor's speed scaled by its share of the matrix work.
    floors = {lib: reference[lib].get("no flow") for lib in ours}

    def floor_of(r: dict) -> dict | None:
        return floors["flowvae-compile" if r["library"] == "flowvae-compile" else "flowvae"]

    def ceiling(r: dict) -> float | None:
        floor = floor_of(r)
        return floor["steps_per_s"] * floor["flops_per_step"] / r["flops_per_step"] if floor else None

    for r in impls:
        floor, top = floor_of(r), ceiling(r)
        rows.append(
            [
                r["library"],
                r["model"],
                f"{r['steps_per_s']:.1f}",
                f"{r['ms_per_step']:.2f}",
                ratio("flowvae", r),
                ratio("flowvae-compile", r),
                f"{floor['steps_per_s']:.1f}" if floor else "—",
                f"{top:.1f}" if top else "—",
                f"{100 * r['steps_per_s'] / top:.0f}%" if top else "—",
                f"{r['flops_per_step'] / 1e6:.0f}",
                f"{100 * r['efficiency']:.1f}%",
                f"{r['nll_s']:.2f} ({min(r['nll_s_repeats']):.2f}–{max(r['nll_s_repeats']):.2f})",
                f"{r['nll']:.1f}",
                f"{1e3 * r['sample_s']:.0f}",
                r["notes"],
            ]
        )
    summary = []
    for model in dict.fromkeys(r["model"] for r in impls):
        peers = [r for r in impls if r["model"] == model and r["library"] not in ours]
        if not peers:
            continue
        fastest = max(peers, key=lambda r: r["steps_per_s"])
        versus = ", ".join(
            f"{lib} {reference[lib][model]['steps_per_s'] / fastest['steps_per_s']:.2f}×"
            for lib in ours
            if model in reference[lib]
        )
        quickest = min(peers, key=lambda r: r["nll_s"])
        iw = ", ".join(
            f"{lib} {quickest['nll_s'] / reference[lib][model]['nll_s']:.2f}×"
            for lib in ours
            if model in reference[lib]
        )
        summary.append(
            f"- {model}: fastest peer {fastest['library']} ({fastest['steps_per_s']:.1f} steps/s); "
            f"{versus}. "
            f"−log p(x): fastest peer {quickest['library']} ({quickest['nll_s']:.2f} s); {iw}"
        )
    header = [
        "library",
        "model",
        "steps/s",
        "ms/step",
        "flowvae/peer",
        "flowvae-compile/peer",
        "floor steps/s",
        "ceiling steps/s",
        "of ceiling",
        "MFLOP/step",
        "FLOP eff.",
        f"−log p(x) s (K={args.nll_samples}, {args.nll_points} pts; range)",
        "−log p(x) nats",
        f"{args.sample_count} samples ms",
        "notes",
    ]
    v = results["versions"]
    lines = [
        "# peers: the same flow VAE in flowvae and other libraries",
        "",
        f"Machine: {machine_line(info)}.",
        "Versions: " + ", ".join(f"{k} {v[k] or 'not installed'}" for k in LIBRARIES) + ".",
        f"Command: `{interpreter()} benchmarks/peers.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"Clock: {args.clock}. Data: {results['data']}; batch {args.batch}; "
        f"{'fused' if args.optimizer == 'fused' else 'torch default'} Adam(lr=1e-3) for every row; "
        f"{args.warmup} warm-up steps, then the "
        f"median of {args.repeats} blocks of {args.steps} steps (round-robin over libraries). "
        f"{args.matmul}² float32 matmul: {results['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s; FLOP eff. = matmul "
        "FLOPs of a training step (FlopCounterMode) × steps/s ÷ that. flowvae/peer > 1: flowvae is faster. "
        "Floor: the same VAE without a flow (flowvae's; compiled for the compiled rows); ceiling: the floor's "
        "steps/s × its matmul FLOPs ÷ the row's (the speed if the flow cost only its matrix work). "
        "−log p(x) after the timed training steps only (not a trained model; a sanity check): median (range) of "
        f"{args.nll_repeats} round-robin runs, {impls[0].get('nll_chunk', '?') if impls else '?'} samples per chunk "
        "for every library; flowvae-compile scores the samples with torch.compile (its compilation excluded). "
        + (
            "glibc's malloc defaults."
            if args.default_allocator
            else "Freed memory kept for reuse in the whole process (flowvae.evaluation.reuse_freed_memory, applied: "
            f"{getattr(args, 'reused_freed_memory', False)}), for every row."
        ),
        "",
        markdown_table(header, rows),
        "",
        "Against the fastest peer on the same model (flowvae's speed ÷ the peer's, for training steps and for "
        "−log p(x)); 'on h': the flow is amortized / conditioned on "
        "the encoder's last hidden layer, 'global': its parameters are shared by all data points:",
        *summary,
    ]
    if results["unavailable"]:
        lines += ["", "Unavailable:", ""]
        lines += [f"- {u['library']} {u['model']}: {u['reason']}" for u in results["unavailable"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    p.add_argument(
        "--flows",
        nargs="+",
        default=list(FLOW_STEPS),
        choices=list(FLOW_STEPS),
        help="'none' (the no-flow floor, flowvae only) gives the floor and ceiling columns",
    )
    p.add_argument(
        "--optimizer",
        choices=("default", "fused"),
        default="default",
        help="Adam(lr=1e-3) for every row: torch's default implementation, or fused=True for all",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all visible cores)")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or CPU time of this process (robust on a busy machine with --threads 1)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for other processes to leave the cores idle",
    )
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--n-batches", type=int, default=50, help="distinct training batches, cycled")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=50, help="training steps per timed block")
    p.add_argument("--repeats", type=int, default=7, help="timed blocks per implementation")
    p.add_argument("--nll-samples", type=int, default=1000)
    p.add_argument("--nll-points", type=int, default=100)
    p.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="importance samples per chunk, the same for every library (default: flowvae's CPU chunk)",
    )
    p.add_argument("--nll-repeats", type=int, default=3, help="timed −log p(x) runs per implementation")
    p.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's malloc settings (by default the process keeps freed memory for reuse, "
        "as the flowvae command does, for every library alike)",
    )
    p.add_argument("--sample-count", type=int, default=10_000)
    p.add_argument("--matmul", type=int, default=2048)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smoke run: few steps, small K; results not saved")
    p.add_argument("--out", default=None, help="result name under benchmarks/results/ (default peers)")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.steps, args.repeats = 3, 5, 2
        args.nll_samples, args.nll_points, args.sample_count, args.nll_repeats = 20, 10, 1000, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.default_allocator:
        try:
            from flowvae.evaluation import reuse_freed_memory

            args.reused_freed_memory = reuse_freed_memory()
        except ImportError:
            args.reused_freed_memory = False
    threads, info, load = start(args)
    report("peers", args, info, threads, run(args), render, load)


if __name__ == "__main__":
    main()
