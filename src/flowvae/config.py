"""Training configuration: typed dataclasses, read from YAML and overridden by command-line flags.

:class:`TrainConfig` holds the run's options and a nested :class:`~flowvae.models.ModelConfig`.
Both are declared once; the flags (``--latent-dim``), the YAML keys (flat ``latent_dim: 40`` or
nested under ``model:``), the checks on resume and ``results.json`` are derived from them.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from flowvae.flows import FLOW_NAMES, IMAGE_FLOW_NAMES
from flowvae.flows.factory import MAX_FLOW_STEPS
from flowvae.models import ARCHITECTURE_FLOWS, LIKELIHOODS, MODEL_FIELDS, MODELS, ModelConfig
from flowvae.models.config import MLP_ARCHS
from flowvae.objectives import GRADIENTS, OBJECTIVES, gradient_problem
from flowvae.optimizers import OPTIMIZERS
from flowvae.priors import FLOW_PRIORS, PRIORS


class ConfigError(ValueError):
    """A bad configuration value, as one line naming the field."""


# The names of architectures, flows, likelihoods, priors and optimizers are read from their registries
# (MODELS, FLOWS / IMAGE_FLOWS, LIKELIHOODS, PRIORS, FLOW_PRIORS, OPTIMIZERS); only these are fixed here.
PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine", "exponential")
MAX_SEED = 2**32 - 1  # the trainer derives generator seeds from it (seed + 2, seed·10⁶ + step)
MAX_THREADS = 1024
MAX_IMPORTANCE_SAMPLES = 100_000  # K of the -log p(x) estimate (papers use 5000; its bias shrinks as 1/K)
MAX_FREE_BITS = 10.0  # nats per unit: far above any KL a unit carries, so the KL term stays on


def valid_seed(seed: int) -> bool:
    """A seed the trainer and the samplers accept: 0 <= seed <= MAX_SEED."""
    return 0 <= seed <= MAX_SEED


@dataclass
class TrainConfig:
    """Everything that defines a training run.  ``flowvae train --help`` lists each field as a flag
    (``flowvae.cli.option_help`` says what each does).

    >>> config = TrainConfig.from_dict({"dataset": "digits", "flow": "iaf", "epochs": 5}).validate()
    >>> config.model.flow, config.epochs, config.flat()["latent_dim"]
    ('iaf', 5, 32)
    """

    dataset: str = "digits"  # see flowvae.data.available_datasets()
    data_dir: str | None = None  # default: $FLOWVAE_DATA or ~/.cache/flowvae
    data_kind: str | None = None  # binary | grayscale | 8bit for a --dataset PATH (default: from its values)
    valid_fraction: float = 0.1  # of a --dataset PATH without a valid split, held out for validation
    test_fraction: float = 0.1  # of a --dataset PATH without a test split, held out for testing
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 100
    batch_size: int = 100
    optimizer: str = "adam"  # adam | adamax
    lr: float = 1e-3
    lr_decay: float = 1.0  # lr ×= lr_decay after every lr_patience epochs without a better
    lr_patience: int = 10  # validation -ELBO (lr_decay = 1, the default: never)
    warmup_epochs: float = 0.0  # KL weight β rises linearly from 0 to 1 over this many epochs
    free_bits: float = 0.0  # nats per free-bits unit of each KL group (0: off)
    patience: int = 20  # early stopping on validation -ELBO (0: off)
    max_minutes: float | None = None  # wall-clock budget for the training loop
    grad_clip: float = 0.0  # clip the gradient norm (0: off)
    grad_skip: float = 50.0  # skip an update whose gradient norm is non-finite or above this many
    # times its running level (0: skip only non-finite ones)
    ema: float = 0.0  # decay of an exponential moving average of the weights used for
    # evaluation (e.g. 0.999; 0: off)
    eval_samples: int = 5000  # K for the test -log p(x)
    eval_batch_size: int = 100
    seed: int = 0
    threads: int = 0  # CPU threads for torch (0: torch's default)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; densities accumulate in fp32)
    compile: bool = False  # torch.compile the model
    tf32: bool = False  # CUDA fp32: TF32 matmuls and convolutions (faster, ~1e-3 relative)
    deterministic: bool = False  # deterministic algorithms (CUDA: cuBLAS workspace, cuDNN deterministic)
    progress: bool = True  # progress bars
    tensorboard: bool = False  # also log to RUN/tensorboard (pip install "flowvae[tensorboard]")
    out: str = "runs/default"
    objective: str = field(
        default="elbo",
        metadata={
            "help": "training bound: elbo (mean over the K samples) or iwae (log (1/K) Σ_k w_k, Burda et al. 2016)"
        },
    )
    train_samples: int = field(default=1, metadata={"help": "K posterior samples per data point in training"})
    gradient: str = field(
        default="reparam",
        metadata={
            "help": "gradient estimator: reparam, stl (sticking the landing) or dreg (doubly reparameterized); "
            "stl/dreg need a Gaussian posterior without a flow"
        },
    )
    weight_decay: float = field(
        default=0.0,
        metadata={"help": "decoupled weight decay (AdamW-style, for adam and adamax): w -= lr·λ·w per step (0: off)"},
    )
    input_noise: float = field(
        default=0.0,
        metadata={
            "help": "std of Gaussian noise added to the encoder's input only in training (Shu et al. 2018; 0: off)"
        },
    )
    output_bias_init: bool = field(
        default=False,
        metadata={
            "help": "start the decoder's output bias at logit(mean training pixel) (Bernoulli; arch mlp, ladder)"
        },
    )
    lr_schedule: str = field(
        default="constant",
        metadata={
            "help": "constant (plus --lr-decay on plateaus), cosine or exponential decay to --lr-floor over --epochs "
            "or --max-minutes, whichever ends first"
        },
    )
    lr_floor: float = field(default=1e-5, metadata={"help": "the learning rate a cosine/exponential schedule ends at"})

    def validate(self) -> TrainConfig:
        from flowvae.data import available_datasets

        m = self.model
        from flowvae.data.files import ARRAYS, is_data_path

        path = isinstance(self.dataset, str) and is_data_path(self.dataset)
        if path:  # recorded absolute, so that a resume from another directory finds the same data
            self.dataset = str(Path(self.dataset).expanduser().absolute())
        elif isinstance(self.dataset, str):  # names are case-insensitive, '-' and '_' alike
            self.dataset = self.dataset.strip().lower().replace("-", "_")
        # Non-finite numbers first: NaN fails every comparison, so "lr must be > 0" would be misleading.
        checks = [
            (math.isfinite(_get(self, f.name)), f.name, "must be finite")
            for f in config_fields()
            if field_type(f) is float and _get(self, f.name) is not None
        ]
        checks += [
            (
                path or self.dataset in (*available_datasets(), ARRAYS),
                "dataset",
                f"must be one of {', '.join(available_datasets())}, or a folder of images, a .npy or a .npz file",
            ),
            (self.data_kind in (None, "binary", "grayscale", "8bit"), "data_kind", "must be binary, grayscale or 8bit"),
            (0 < self.valid_fraction < 1, "valid_fraction", "must be in (0, 1)"),
            (0 < self.test_fraction < 1, "test_fraction", "must be in (0, 1)"),
            (self.valid_fraction + self.test_fraction < 1, "test_fraction", "plus valid_fraction must be below 1"),
            (m.arch in MODELS, "arch", f"must be one of {', '.join(MODELS.names())}"),
            (
                m.flow in ARCHITECTURE_FLOWS.get(m.arch, FLOW_NAMES),
                "flow",
                f"must be one of {', '.join(ARCHITECTURE_FLOWS.get(m.arch, FLOW_NAMES))} for arch {m.arch}",
            ),
            (
                m.likelihood is None or m.likelihood in LIKELIHOODS,
                "likelihood",
                f"must be one of {', '.join(LIKELIHOODS)}",
            ),
            (m.prior in PRIORS, "prior", f"must be one of {', '.join(PRIORS)}"),
            (self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}"),
            (self.precision in PRECISIONS, "precision", "must be fp32, bf16 or fp16"),
            (_valid_device(self.device), "device", "must be auto, cpu, cuda or cuda:N"),
            (
                m.flow == "none" or 1 <= m.flow_steps <= MAX_FLOW_STEPS,
                "flow_steps",
                f"must be between 1 and {MAX_FLOW_STEPS} for a flow",
            ),
            (m.rank is None or 1 <= m.rank <= m.latent_dim, "rank", "must be between 1 and latent_dim"),
            (valid_seed(self.seed), "seed", f"must be between 0 and {MAX_SEED}"),
            (bool(self.out and self.out.strip()), "out", "must name a directory"),
            (self.max_minutes is None or self.max_minutes > 0, "max_minutes", "must be > 0"),
            (0 < self.lr_decay <= 1, "lr_decay", "must be in (0, 1]"),
            (0 <= self.ema < 1, "ema", "must be in [0, 1)"),
            (
                self.grad_skip == 0 or self.grad_skip > 1,
                "grad_skip",
                "must be 0 (skip only non-finite updates) or a factor > 1 over the gradient norm's running level",
            ),
            (self.threads <= MAX_THREADS, "threads", f"must be at most {MAX_THREADS}"),
            (self.eval_samples <= MAX_IMPORTANCE_SAMPLES, "eval_samples", f"must be at most {MAX_IMPORTANCE_SAMPLES}"),
            (
                self.free_bits <= MAX_FREE_BITS,
                "free_bits",
                f"must be at most {MAX_FREE_BITS:g} nats per unit (more would switch the KL term off)",
            ),
        ]
        checks += self._objective_checks()
        positive = [
            "latent_dim",
            "layers",
            "hidden",
            "channels",
            "feature_dim",
            "flow_hidden",
            "reflections",
            "prior_flow_steps",
            "pseudo_inputs",
            "epochs",
            "batch_size",
            "lr_patience",
            "eval_samples",
            "eval_batch_size",
            "lr",
        ]
        non_negative = ["threads", "flow_steps", "warmup_epochs", "free_bits", "patience", "grad_clip", "grad_skip"]
        checks += [(_get(self, n) > 0, n, "must be > 0") for n in positive]
        checks += [(_get(self, n) >= 0, n, "must be >= 0") for n in non_negative]
        for ok, name, message in checks:
            if not ok:
                raise ConfigError(f"bad config value {name}={_get(self, name)!r}: {name} {message}")
        return self

    def _objective_checks(self) -> list[tuple[bool, str, str]]:
        """The training objective, gradient estimator, regularisers and learning-rate schedule."""
        m = self.model
        problem = (
            gradient_problem(self.objective, self.train_samples, self.gradient, self.free_bits)
            if self.objective in OBJECTIVES and self.gradient in GRADIENTS
            else None
        )
        return [
            (self.objective in OBJECTIVES, "objective", f"must be one of {', '.join(OBJECTIVES)}"),
            (self.gradient in GRADIENTS, "gradient", f"must be one of {', '.join(GRADIENTS)}"),
            (problem is None, "gradient", (problem or "").replace(f"--gradient {self.gradient} ", "", 1)),
            (self.train_samples >= 1, "train_samples", "must be >= 1"),
            (
                not (self.gradient == "dreg" and self.compile),
                "gradient",
                (
                    "dreg does not work with --compile (its gradient hook on the samples would sit outside the "
                    "compiled graph); drop --compile"
                ),
            ),
            (0 <= self.weight_decay < 1, "weight_decay", "must be in [0, 1)"),
            (self.input_noise >= 0, "input_noise", "must be >= 0"),
            (
                not self.output_bias_init or m.arch in MLP_ARCHS,
                "arch",
                f"must be one of {', '.join(MLP_ARCHS)} for --output-bias-init",
            ),
            *m.option_checks(),
            (self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}"),
            (0 < self.lr_floor < self.lr or self.lr_schedule == "constant", "lr_floor", "must be in (0, lr)"),
            (
                self.lr_schedule == "constant" or self.lr_decay == 1,
                "lr_schedule",
                "must be constant when lr_decay < 1 (the plateau decay would fight the schedule)",
            ),
        ]

    def to_dict(self) -> dict[str, Any]:
        """Nested: the run's options with the model's under ``model``."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """One level: every field by its own name (model fields included)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        return values | self.model.to_dict()

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """From flat keys (``latent_dim: 40``) or a nested ``model:`` mapping, each value checked and
        converted to its field's type."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: the configuration must be a mapping of key: value")
        values = dict(values)
        nested = values.pop("model", None)
        nested = {} if nested is None else nested  # `model:` with nothing after it; [], 0, "" and false are refused
        if not isinstance(nested, dict):
            raise ConfigError(f"{source}: model must be a mapping of key: value, got {nested!r}")
        known = {f.name for f in config_fields()}
        unknown = sorted(set(values) - known) + [f"model.{k}" for k in sorted(set(nested) - set(MODEL_FIELDS))]
        if unknown:
            raise ConfigError(f"{source}: unknown config key(s) {', '.join(map(str, unknown))}")
        both = sorted(set(values) & set(nested))
        if both:
            raise ConfigError(f"{source}: {', '.join(both)} given both at the top level and under model")
        merged = {k: coerce(k, v, source) for k, v in (values | nested).items()}
        merged |= {k: _known_name(k, v) for k, v in merged.items() if isinstance(v, str)}
        model = ModelConfig(**{k: v for k, v in merged.items() if k in MODEL_FIELDS})
        return cls(model=model, **{k: v for k, v in merged.items() if k not in MODEL_FIELDS})


def _known_name(field: str, value: str) -> str:
    """A choice in its one spelling (``Resnet``, ``LADDER`` -> the registered name); any other value
    as given, so that its error shows what was typed."""
    flows = {*FLOW_NAMES, *IMAGE_FLOW_NAMES, *(name for names in ARCHITECTURE_FLOWS.values() for name in names)}
    choices = {
        "arch": MODELS,
        "flow": flows,
        "likelihood": LIKELIHOODS,
        "prior": PRIORS,
        "prior_flow": FLOW_PRIORS,
        "optimizer": OPTIMIZERS,
        "precision": PRECISIONS,
        "objective": OBJECTIVES,
        "gradient": GRADIENTS,
        "lr_schedule": LR_SCHEDULES,
    }.get(field, ())
    name = value.strip().lower()
    return name if name in choices else value


def _valid_device(name: str) -> bool:
    if name in ("auto", "cpu", "cuda"):
        return True
    prefix, _, index = name.partition(":")
    return prefix == "cuda" and index.isdigit()


def config_fields() -> list[dataclasses.Field]:
    """Every option's field in declaration order: the run's, then the model's (``TrainConfig.flat()``'s keys)."""
    return [f for f in fields(TrainConfig) if f.name != "model"] + list(fields(ModelConfig))


def _get(config: TrainConfig, name: str) -> Any:
    return getattr(config.model, name) if name in MODEL_FIELDS else getattr(config, name)


def field_type(f: dataclasses.Field) -> type:
    """The type of value a field holds (``int`` for an ``int | None`` field)."""
    owner = ModelConfig if f.name in MODEL_FIELDS else TrainConfig
    hint = typing.get_type_hints(owner)[f.name]
    if isinstance(hint, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _optional(f: dataclasses.Field) -> bool:
    """Whether the field may hold None (``int | None``)."""
    owner = ModelConfig if f.name in MODEL_FIELDS else TrainConfig
    hint = typing.get_type_hints(owner)[f.name]
    return isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)


_FIELDS_BY_NAME = {f.name: f for f in config_fields()}


def coerce(name: str, value: Any, source: str) -> Any:
    """A YAML or command-line ``value`` as field ``name``'s type, or a one-line :class:`ConfigError`
    that names ``source``.

    Booleans are not numbers, numbers and lists are not strings, and a string becomes a number
    or a boolean only if it spells one."""
    kind = field_type(_FIELDS_BY_NAME[name])
    bad = ConfigError(f"{source}: {name} must be {'a boolean' if kind is bool else kind.__name__}, got {value!r}")
    if value is None:
        if _optional(_FIELDS_BY_NAME[name]):
            return None
        raise bad
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad
    if kind is str:
        if not isinstance(value, str):
            raise bad
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise bad from None
    if kind is int:
        if not number.is_integer() or (isinstance(value, str) and not value.strip().lstrip("+-").isdigit()):
            raise bad
        return int(value) if isinstance(value, (int, str)) else int(number)
    return number
