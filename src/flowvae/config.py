"""Training configuration: a typed dataclass, read from YAML and overridden by command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from flowvae.flows import FLOW_NAMES
from flowvae.models import ARCHITECTURES, LIKELIHOODS


class ConfigError(ValueError):
    """A bad configuration value, as one line naming the field."""


@dataclass
class TrainConfig:
    """Everything that defines a training run.  ``flowvae train --help`` lists each field as a flag."""

    dataset: str = "digits"            # see flowvae.data.available_datasets()
    data_dir: str | None = None        # default: $FLOWVAE_DATA or ~/.cache/flowvae
    arch: str = "mlp"                  # mlp | conv | gated
    latent_dim: int = 32
    hidden: int = 300                  # MLP widths
    feature_dim: int = 256             # conv encoders' h size
    likelihood: str | None = None      # default from the data: bernoulli (binary) or categorical256 (8-bit)
    flow: str = "none"
    flow_steps: int = 4
    flow_hidden: int = 320             # MADE / coupling widths
    reflections: int = 8               # Householder-Sylvester
    flow_context: bool = True          # condition the flow on the encoder's h (False: global flow parameters)
    epochs: int = 100
    batch_size: int = 100
    lr: float = 1e-3
    lr_decay: float = 1.0              # lr ×= lr_decay after every lr_patience epochs without a better
    lr_patience: int = 10              # validation -ELBO (lr_decay = 1: never)
    warmup_epochs: float = 0.0         # KL weight β rises linearly from 0 to 1 over this many epochs
    free_bits: float = 0.0             # nats per latent dimension (0: off)
    patience: int = 20                 # early stopping on validation -ELBO (0: off)
    max_minutes: float | None = None   # wall-clock budget for the training loop
    grad_clip: float = 0.0             # clip the gradient norm (0: off)
    eval_samples: int = 5000           # K for the test -log p(x)
    eval_batch_size: int = 100
    seed: int = 0
    threads: int = 0                   # CPU threads for torch (0: torch's default)
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    precision: str = "fp32"            # fp32 | bf16 | fp16 (autocast; densities accumulate in fp32)
    compile: bool = False              # torch.compile the model
    progress: bool = True              # progress bars
    out: str = "runs/default"

    def validate(self) -> "TrainConfig":
        from flowvae.data import available_datasets

        checks = [
            (self.dataset in available_datasets(), f"dataset must be one of {', '.join(available_datasets())}"),
            (self.arch in ARCHITECTURES, f"arch must be one of {', '.join(ARCHITECTURES)}"),
            (self.flow in FLOW_NAMES, f"flow must be one of {', '.join(FLOW_NAMES)}"),
            (self.likelihood is None or self.likelihood in LIKELIHOODS,
             f"likelihood must be one of {', '.join(LIKELIHOODS)}"),
            (self.precision in ("fp32", "bf16", "fp16"), "precision must be fp32, bf16 or fp16"),
            (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
             "device must be auto, cpu or cuda[:N]"),
        ]
        positive = ["latent_dim", "hidden", "feature_dim", "flow_hidden", "reflections", "epochs", "batch_size",
                    "lr_patience", "eval_samples", "eval_batch_size", "lr"]
        non_negative = ["threads", "flow_steps", "warmup_epochs", "free_bits", "patience", "grad_clip"]
        checks += [(getattr(self, n) > 0, f"{n} must be > 0") for n in positive]
        checks += [(getattr(self, n) >= 0, f"{n} must be >= 0") for n in non_negative]
        checks.append((self.max_minutes is None or self.max_minutes > 0, "max_minutes must be > 0"))
        checks.append((0 < self.lr_decay <= 1, "lr_decay must be in (0, 1]"))
        for ok, message in checks:
            if not ok:
                field = message.split()[0]
                raise ConfigError(f"bad config value {field}={getattr(self, field)!r}: {message}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown config key(s) {', '.join(unknown)}")
        return cls(**{k: _coerce(cls, k, v, source) for k, v in values.items()})


MODEL_FIELDS = ("dataset", "arch", "latent_dim", "hidden", "feature_dim", "likelihood", "flow", "flow_steps",
                "flow_hidden", "reflections", "flow_context")


def _field_type(cls, name: str) -> type:
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _coerce(cls, name: str, value: Any, source: str) -> Any:
    """Convert a YAML or command-line value to the field's type, with a one-line error."""
    kind = _field_type(cls, name)
    if value is None:
        return None
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name} must be {kind.__name__}, got {value!r}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        values = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value")
    return values


def add_config_arguments(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One flag per config field (``--latent-dim``); unset flags keep the YAML or default value."""
    parser.add_argument("--config", help="YAML file of config values (flags override it)")
    for f in fields(cls):
        kind = _field_type(cls, f.name)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"default: {f.default}"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=str, default=argparse.SUPPRESS, dest=f.name, metavar=kind.__name__.upper(),
                                help=help_text)


def config_from_args(args: argparse.Namespace, cls=TrainConfig) -> TrainConfig:
    """Defaults, then the YAML file of ``--config``, then the flags given on the command line."""
    path = getattr(args, "config", None)
    from_file = cls.from_dict(load_yaml(path), source=str(path)) if path else cls()
    names = {f.name for f in fields(cls)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    from_flags = cls.from_dict(flags, source="command line")
    merged = from_file.to_dict() | {k: getattr(from_flags, k) for k in flags}
    return cls(**merged).validate()
