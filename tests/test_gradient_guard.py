"""The gradient guard decides on the device: a bad update is skipped (parameters, Adam's moments and
step count and the EMA untouched) without reading anything on the host, and the counters that reach
the host on a sync are those of the old host-side guard."""

import math

import pytest
import torch

from flowvae.training import gradient_guard
from flowvae.training.gradient_guard import GradientGuard


def _setup(optimizer: str = "adam", ema_decay: float = 0.0, fp16: bool = False, skip_factor: float = 50.0):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    else:
        opt = torch.optim.Adamax(model.parameters(), lr=1e-2, foreach=True)
    scaler = torch.amp.GradScaler("cpu", enabled=fp16, init_scale=2.0**8)
    ema = None
    if ema_decay:
        from torch.optim.swa_utils import AveragedModel

        ema = AveragedModel(model, use_buffers=True)
    guard = GradientGuard(
        model,
        opt,
        scaler,
        max_norm=0.0,
        skip_factor=skip_factor,
        device=torch.device("cpu"),
        ema=ema,
        ema_decay=ema_decay,
    )
    return model, opt, scaler, ema, guard


def _loss(model: torch.nn.Module, scale: float = 1.0) -> torch.Tensor:
    x = torch.linspace(-1, 1, 40).reshape(8, 5)
    return model(x).square().mean() * scale


def _snapshot(model, opt, ema):
    tensors = [p.detach().clone() for p in model.parameters()]
    tensors += [v.clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    if ema is not None:
        tensors += [p.detach().clone() for p in ema.module.parameters()]
    return tensors


class _NoHostReads:
    """Make every Python-level read of a tensor's value on the host raise."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def __enter__(self):
        def refuse(*_args, **_kwargs):
            raise AssertionError("the guard read a tensor on the host")

        for name in self.NAMES:
            self.monkeypatch.setattr(torch.Tensor, name, refuse)

    def __exit__(self, *exc):
        self.monkeypatch.undo()


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_a_nan_gradient_is_skipped_on_the_device_with_fused_adam(monkeypatch, ema_decay):
    model, opt, _, ema, guard = _setup(ema_decay=ema_decay)
    for step in range(3):
        guard.step(_loss(model), step)
    before = _snapshot(model, opt, ema)
    loss = _loss(model, scale=math.nan)
    with _NoHostReads(monkeypatch):
        made = guard.step(loss, 3)
    assert made.dtype == torch.bool and not made
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model, opt, ema))), (
        "parameters, Adam's moments and step count and the EMA are unchanged"
    )
    assert guard.sync()[1:] == (1, 1)
    with _NoHostReads(monkeypatch):
        made = guard.step(_loss(model), 4)
    assert made and guard.sync()[1:] == (1, 0), "the next good step updates and resets the run of skips"
    after = _snapshot(model, opt, ema)
    assert not torch.equal(before[0], after[0])
    if ema is not None:
        assert int(ema.n_averaged) == 4, "the EMA counts the updates it averaged"


def test_a_spike_is_skipped_after_the_warm_up_and_the_level_follows_a_lasting_change(monkeypatch):
    monkeypatch.setattr(gradient_guard, "WARMUP_STEPS", 3)
    model, opt, _, _, guard = _setup(skip_factor=50.0)
    made = [bool(guard.step(_loss(model), step)) for step in range(5)]
    level = guard.sync()[0]
    assert all(made) and level is not None
    made = [bool(guard.step(_loss(model, scale=1e4), step)) for step in range(5, 1000)]
    assert not made[0], "a gradient 1e4 times the running level is skipped"
    assert made[-1], "a lasting change of scale is absorbed: the guard does not stall"


def test_adamax_without_a_fused_kernel_skips_the_same_way():
    model, opt, _, ema, guard = _setup(optimizer="adamax")
    guard.step(_loss(model), 0)
    before = _snapshot(model, opt, ema)
    assert not guard.step(_loss(model, scale=math.inf), 1)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model, opt, ema)))
    assert guard.sync()[1] == 1


def test_fp16_overflow_is_skipped_and_lowers_the_loss_scale(monkeypatch):
    model, opt, scaler, ema, guard = _setup(fp16=True)
    guard.step(_loss(model), 0)
    scale, before = scaler.get_scale(), _snapshot(model, opt, ema)
    with _NoHostReads(monkeypatch):
        made = guard.step(_loss(model, scale=math.inf), 1)
    assert not made and scaler.get_scale() == scale / 2
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model, opt, ema)))


def test_load_and_sync_round_trip_the_counters():
    *_, guard = _setup()
    assert guard.sync() == (None, 0, 0), "no level is learnt before the first step"
    guard.load(-1.25, 7, 3)
    assert guard.sync() == (-1.25, 7, 3)
