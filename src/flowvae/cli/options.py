"""The bridge between :class:`~flowvae.config.TrainConfig` and argparse: one flag per config field
(``--latent-dim``), the config read back from the flags and a ``--config`` YAML file, and the
notices for options that do nothing with the rest of the configuration."""

from __future__ import annotations

import argparse
from typing import Any

from flowvae.cli.option_help import option_help
from flowvae.config import TrainConfig, coerce, config_fields, field_type
from flowvae.config_yaml import load_yaml


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, model fields included (``--latent-dim``); unset flags keep the
    YAML or default value."""
    parser.add_argument("--config", help="YAML file of config values (flags override it)")
    defaults = TrainConfig().flat()
    for f in config_fields():
        kind = field_type(f)
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=option_help(f, defaults[f.name]),
            )
        else:
            parser.add_argument(
                flag,
                type=str,
                default=argparse.SUPPRESS,
                dest=f.name,
                metavar=kind.__name__.upper(),
                help=option_help(f, defaults[f.name]),
            )


def config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """``base`` (default: the defaults), then the YAML file of ``--config``, then the flags given on
    the command line."""
    path = getattr(args, "config", None)
    values = (base or TrainConfig()).flat()
    if path:
        raw = load_yaml(path)
        TrainConfig.from_dict(raw, source=str(path))  # unknown keys and bad values fail here, naming the file
        values |= {k: coerce(k, v, str(path)) for k, v in _explicit(raw).items()}
    names = {f.name for f in config_fields()}
    flags = {k: coerce(k, v, "command line") for k, v in vars(args).items() if k in names}
    return TrainConfig.from_dict(values | flags).validate()


def given_options(args: argparse.Namespace) -> set[str]:
    """The fields that the command line or the ``--config`` file set (not those left at their defaults)."""
    path = getattr(args, "config", None)
    names = {f.name for f in config_fields()}
    return {k for k in vars(args) if k in names} | (set(_explicit(load_yaml(path))) if path else set())


def no_effect(config: TrainConfig, given: set[str]) -> list[str]:
    """Why each option in ``given`` (set by the user) does nothing with the rest of ``config``
    (the trainer warns once the run has started, so that an error stays the only line)."""
    m = config.model
    applies = {  # option -> (does it act here?, where it acts)
        "layers": (m.arch in ("ladder", "resnet"), "--arch ladder or resnet"),
        "hidden": (m.arch in ("mlp", "ladder"), "--arch mlp or ladder"),
        "feature_dim": (m.arch in ("conv", "gated"), "--arch conv or gated"),
        "channels": (m.arch == "resnet", "--arch resnet"),
        "flow_steps": (m.flow != "none", "a posterior --flow"),
        "flow_hidden": (m.flow != "none" or m.prior == "flow", "a posterior --flow or --prior flow"),
        "flow_context": (m.flow != "none" and m.arch != "resnet", "a posterior --flow of a non-resnet model"),
        "reflections": ("householder" in m.flow, "--flow householder or sylvester-householder"),
        "rank": (m.flow == "sylvester-orthogonal", "--flow sylvester-orthogonal"),
        "prior_flow": (m.prior == "flow", "--prior flow"),
        "prior_flow_steps": (m.prior == "flow", "--prior flow"),
        "pseudo_inputs": (m.prior == "vamp", "--prior vamp"),
        "lr_patience": (config.lr_decay < 1, "--lr-decay below 1"),
    }
    return [
        f"--{name.replace('_', '-')} has no effect here; it acts only with {where}"
        for name, (acts, where) in applies.items()
        if name in given and not acts
    ]


def _explicit(values: dict[str, Any]) -> dict[str, Any]:
    """The keys a YAML file sets, flattened (so a file overrides ``base`` only where it speaks)."""
    nested = values.get("model") or {}
    return {k: v for k, v in values.items() if k != "model"} | dict(nested)
