"""Reading the checkpoint layouts of older flowvae versions into today's flows.

Kept apart from the flow contract (:mod:`flowvae.flows.base`): only loading old weights needs it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def read_per_step_layout(
    module: nn.Module, state_dict: dict, prefix: str, *args: object, concatenated: Iterable[str] = ()
) -> None:
    """A load_state_dict pre-hook for a flow that keeps a stack's T steps in one module (``steps``):
    it reads the layout of T one-step modules in a ``Compose`` (``{prefix}flows.{t}.<name>``)
    saved before, so that such weights load unchanged.  Each name's T tensors are stacked along a
    new first dimension, or concatenated along the first where the name starts with one of
    ``concatenated`` (linear maps whose output rows hold the T steps' outputs one after another).
    """
    old = f"{prefix}flows."
    names = sorted(
        {
            key[len(old) :].split(".", 1)[1]
            for key in state_dict
            if key.startswith(old) and key[len(old) :].split(".", 1)[0].isdigit() and "." in key[len(old) :]
        }
    )
    for name in names:
        parts, t = [], 0
        while f"{old}{t}.{name}" in state_dict:
            parts.append(state_dict.pop(f"{old}{t}.{name}"))
            t += 1
        if module.steps == 1:
            state_dict[prefix + name] = parts[0]
        else:
            join = torch.cat if name.startswith(tuple(concatenated)) else torch.stack
            state_dict[prefix + name] = join(parts)
