"""One harness for every flow: exact log-det against autograd Jacobians (float64), round trips,
autoregressive structure, batch shapes, context broadcasting, clear errors and a numerical stress test."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from flowvae import flows as F
from flowvae.distributions import FlowDistribution, StandardNormal, diagonal_gaussian, standard_normal_log_prob

DIM, CTX, IMG = 5, 3, (4, 3, 3)


@dataclass
class Case:
    id: str
    make: Callable[[int | None], F.Flow]
    conditional: bool
    image: bool = False

    @property
    def event_shape(self) -> tuple[int, ...]:
        return IMG if self.image else (DIM,)


CASES = [
    Case("planar", lambda c: F.Planar(DIM, c), False),
    Case("planar-amortized", lambda c: F.Planar(DIM, c), True),
    Case("radial", lambda c: F.Radial(DIM, c), False),
    Case("radial-amortized", lambda c: F.Radial(DIM, c), True),
    Case("householder", lambda c: F.Householder(DIM, 3, c), False),
    Case("householder-amortized", lambda c: F.Householder(DIM, 3, c), True),
    Case("sylvester-orthogonal", lambda c: F.OrthogonalSylvester(DIM, 3, c), False),
    Case("sylvester-orthogonal-amortized", lambda c: F.OrthogonalSylvester(DIM, 3, c), True),
    Case("sylvester-householder", lambda c: F.HouseholderSylvester(DIM, 4, c), False),
    Case("sylvester-householder-amortized", lambda c: F.HouseholderSylvester(DIM, 4, c), True),
    Case("sylvester-triangular", lambda c: F.TriangularSylvester(DIM, False, c), False),
    Case("sylvester-triangular-reversed-amortized", lambda c: F.TriangularSylvester(DIM, True, c), True),
    Case("iaf", lambda c: F.IAF(DIM, (16, 16), c), False),
    Case("iaf-context", lambda c: F.IAF(DIM, (16, 16), c, order="reversed"), True),
    Case("maf", lambda c: F.MAF(DIM, (16, 16), c), False),
    Case("maf-context", lambda c: F.MAF(DIM, (16, 16), c, order=[2, 0, 4, 1, 3]), True),
    Case("coupling", lambda c: F.AffineCoupling(DIM, 16, c), False),
    Case("coupling-context-swap", lambda c: F.AffineCoupling(DIM, 16, c, swap=True), True),
    Case("actnorm-vector", lambda c: F.ActNorm(DIM, event_dim=1), False),
    Case("lu-linear-vector", lambda c: F.InvertibleConv1x1(DIM, event_dim=1), False),
    Case("permute", lambda c: F.Permute(DIM), False),
    Case("reverse", lambda c: F.Reverse(DIM), False),
    Case(
        "compose-mixed",
        lambda c: F.Compose(F.IAF(DIM, (8,), c), F.Reverse(DIM), F.Planar(DIM, c), F.AffineCoupling(DIM, 8, c)),
        True,
    ),
    Case("planar-steps", lambda c: F.Planar(DIM, c, steps=3), False),
    Case("planar-steps-amortized", lambda c: F.Planar(DIM, c, steps=3), True),
    Case("iaf-steps", lambda c: F.IAF(DIM, (16, 16), c, steps=3), False),
    Case("iaf-steps-context", lambda c: F.IAF(DIM, (16, 16), c, order=[2, 0, 4, 1, 3], steps=2), True),
    Case("maf-steps-context", lambda c: F.MAF(DIM, (16, 16), c, steps=3), True),
    Case("inverse-of-iaf", lambda c: F.Inverse(F.IAF(DIM, (8, 8), c)), True),
    Case("actnorm-image", lambda c: F.ActNorm(IMG[0]), False, image=True),
    Case("conv1x1-image", lambda c: F.InvertibleConv1x1(IMG[0]), False, image=True),
    Case("coupling-image", lambda c: F.AffineCoupling(IMG[0], 8, c, event_dim=3), False, image=True),
    Case("coupling-image-context", lambda c: F.AffineCoupling(IMG[0], 8, c, event_dim=3, swap=True), True, image=True),
    Case("permute-image", lambda c: F.Permute(IMG[0], event_dim=3), False, image=True),
    Case(
        "glow-step",
        lambda c: F.Compose(
            F.ActNorm(IMG[0]), F.InvertibleConv1x1(IMG[0]), F.AffineCoupling(IMG[0], 8, c, event_dim=3)
        ),
        True,
        image=True,
    ),
]
for name in F.FLOW_NAMES[1:]:
    CASES.append(
        Case(f"build-{name}", lambda c, name=name: F.build_flow(name, DIM, 2, c, hidden=12, reflections=3), True)
    )


def make_flow(case: Case, dtype=torch.float64, device="cpu", seed: int = 0) -> F.Flow:
    """The case's flow with every parameter perturbed, so no test passes by sitting at the identity."""
    torch.manual_seed(seed)
    flow = case.make(CTX if case.conditional else None).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    flow(
        torch.randn(8, *case.event_shape, dtype=dtype, device=device),
        torch.randn(8, CTX, dtype=dtype, device=device) if case.conditional else None,
    )  # data-dependent init
    return flow.eval()


def inputs(case: Case, batch=(3,), dtype=torch.float64, device="cpu"):
    z = torch.randn(*batch, *case.event_shape, dtype=dtype, device=device)
    h = torch.randn(*batch, CTX, dtype=dtype, device=device) if case.conditional else None
    return z, h


def jacobian_log_det(flow: F.Flow, z: torch.Tensor, h: torch.Tensor | None, direction: str = "forward") -> torch.Tensor:
    """log|det J| of one example at a time via autograd: z (B, *event), h (B, CTX) -> (B,)."""
    fn = flow if direction == "forward" else flow.inverse
    out = []
    for i in range(z.shape[0]):
        ctx = None if h is None else h[i : i + 1]

        def f(x, ctx=ctx):
            return fn(x.view(1, *z.shape[1:]), ctx)[0].reshape(-1)

        jac = torch.autograd.functional.jacobian(f, z[i].reshape(-1), vectorize=True)
        out.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_log_det_matches_autograd_jacobian(case):
    flow = make_flow(case)
    z, h = inputs(case)
    _, log_abs_det = flow(z, h)
    assert log_abs_det.shape == (3,)
    torch.testing.assert_close(log_abs_det, jacobian_log_det(flow, z, h), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.make(CTX if c.conditional else None).has_inverse], ids=lambda c: c.id
)
def test_inverse_round_trip_and_log_dets_cancel(case):
    flow = make_flow(case)
    z, h = inputs(case, batch=(4,))
    y, ladj = flow(z, h)
    x, ladj_inverse = flow.inverse(y, h)
    torch.testing.assert_close(x, z, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(ladj + ladj_inverse, torch.zeros_like(ladj), rtol=0, atol=1e-8)
    torch.testing.assert_close(ladj_inverse, jacobian_log_det(flow, y, h, "inverse"), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_batch_shapes_and_context_broadcasting(case):
    flow = make_flow(case)
    z, _ = inputs(case, batch=(2, 3))
    h = torch.randn(3, CTX, dtype=torch.float64) if case.conditional else None  # broadcasts over the first axis
    y, ladj = flow(z, h)
    assert y.shape == z.shape and ladj.shape == (2, 3)
    h_full = None if h is None else h.expand(2, 3, CTX)
    y_flat, ladj_flat = flow(z.reshape(6, *case.event_shape), None if h is None else h_full.reshape(6, CTX))
    torch.testing.assert_close(y, y_flat.reshape(z.shape))
    torch.testing.assert_close(ladj, ladj_flat.reshape(2, 3))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_float32_keeps_dtype_and_device(case, device):
    flow = make_flow(case, dtype=torch.float32, device=device)
    z, h = inputs(case, batch=(7,), dtype=torch.float32, device=device)
    y, ladj = flow(z, h)
    assert y.dtype == ladj.dtype == torch.float32 and y.device == ladj.device == z.device
    ref = jacobian_log_det(flow.double(), z.double(), None if h is None else h.double())
    torch.testing.assert_close(ladj.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_wrong_shapes_raise_clear_errors(case):
    flow = make_flow(case)
    z, h = inputs(case)
    bad = list(z.shape)
    bad[-len(case.event_shape)] += 1
    with pytest.raises(ValueError, match="expects z of shape"):
        flow(torch.randn(*bad, dtype=torch.float64), h)
    if case.conditional:
        with pytest.raises(ValueError, match="context"):
            flow(z, None)
        with pytest.raises(ValueError, match="context"):
            flow(z, torch.randn(3, CTX + 1, dtype=torch.float64))
        with pytest.raises(ValueError, match="does not broadcast"):
            flow(z, torch.randn(4, CTX, dtype=torch.float64))


def degrees_jacobian(fn, dim: int) -> torch.Tensor:
    x = torch.randn(dim, dtype=torch.float64)
    return torch.autograd.functional.jacobian(fn, x)


@pytest.mark.parametrize("order", ["natural", "reversed", [3, 1, 4, 0, 2]])
def test_made_is_autoregressive(order):
    torch.manual_seed(0)
    made = F.MADE(DIM, (23, 17), n_params=3, context_dim=CTX, order=order).double()
    h = torch.randn(CTX, dtype=torch.float64)
    jac = degrees_jacobian(lambda x: made(x, h).reshape(-1), DIM).reshape(3, DIM, DIM)
    deg = made.degrees
    allowed = deg[None, :] < deg[:, None]  # output i may see input j only if deg j < deg i
    assert torch.all(jac[:, ~allowed] == 0)
    assert torch.all(jac[:, allowed].abs().sum(0) > 0), "MADE should use every allowed connection"


def test_made_with_spread_degrees_is_autoregressive_and_reaches_far_inputs_through_a_narrow_layer():
    torch.manual_seed(0)
    dim = 40
    made = F.MADE(dim, (8,), n_params=1, spread_degrees=True).double()
    jac = degrees_jacobian(lambda x: made(x).reshape(-1), dim)
    assert torch.all(jac.triu() == 0)
    assert torch.all(jac[-1, : dim - 5] != 0), "the last output reads the inputs far up the order"
    cycled = F.MADE(dim, (8,), n_params=1).double()
    assert torch.all(degrees_jacobian(lambda x: cycled(x).reshape(-1), dim)[:, 8:] == 0), "cycled: inputs 9.. unread"


@pytest.mark.parametrize("order", ["natural", [3, 1, 4, 0, 2]])
def test_each_network_of_a_stacked_made_is_autoregressive_in_its_own_order(order):
    torch.manual_seed(0)
    made = F.MADE(DIM, (23, 17), n_params=2, context_dim=CTX, order=order, steps=3).double()
    h = torch.randn(CTX, dtype=torch.float64)
    networks = made.networks(h)
    first = F.MADE(DIM, (4,), order=order).degrees
    assert len(networks) == 3 and torch.equal(made.degrees, torch.stack([first, DIM + 1 - first, first]))
    for network, deg in zip(networks, made.degrees):
        jac = degrees_jacobian(lambda x, network=network: network(x).reshape(-1), DIM).reshape(2, DIM, DIM)
        allowed = deg[None, :] < deg[:, None]
        assert torch.all(jac[:, ~allowed] == 0)
        assert torch.all(jac[:, allowed].abs().sum(0) > 0)
    with pytest.raises(ValueError, match="networks"):
        made(torch.randn(DIM, dtype=torch.float64), h)


def _one_step_flows(cls: type, context_dim: int | None, steps: int, order: str | list[int]) -> F.Compose:
    def reverse(o):
        return "reversed" if o == "natural" else o[::-1]

    return F.Compose(
        *(cls(DIM, (16, 12), context_dim, order=order if t % 2 == 0 else reverse(order)) for t in range(steps))
    ).double()


@pytest.mark.parametrize("cls", [F.IAF, F.MAF])
@pytest.mark.parametrize("context_dim", [None, CTX])
@pytest.mark.parametrize("order", ["natural", [1, 4, 0, 3, 2]])
def test_an_autoregressive_stack_is_its_one_step_modules_kept_together(cls, context_dim, order):
    """IAF/MAF(steps=T): the same initial weights as T one-step modules (order reversed between
    them), weights saved in that layout load into it, and values, log-dets and gradients agree
    both ways."""
    torch.manual_seed(3)
    steps = _one_step_flows(cls, context_dim, 3, order)
    torch.manual_seed(3)
    stack = cls(DIM, (16, 12), context_dim, order=order, steps=3).double()
    assert len(list(stack.parameters())) == len(list(steps.parameters())) // 3
    model = torch.nn.ModuleDict({"flow": stack})
    model.load_state_dict({f"flow.{key}": value for key, value in steps.state_dict().items()})  # the same numbers
    with torch.no_grad():
        for p in steps.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.load_state_dict({f"flow.{key}": value for key, value in steps.state_dict().items()})
    z = torch.randn(2, 3, DIM, dtype=torch.float64)
    h = torch.randn(3, CTX, dtype=torch.float64) if context_dim else None
    for direction in ("forward", "inverse"):
        results = []
        for flow in (stack, steps):
            flow.zero_grad()
            out, log_det = getattr(flow, direction)(z, h)
            (out.square().sum() + log_det.sum()).backward()
            results.append((out, log_det, {name: p.grad for name, p in flow.named_parameters()}))
        (out_a, det_a, grads_a), (out_b, det_b, grads_b) = results
        torch.testing.assert_close(out_a, out_b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(det_a, det_b, rtol=1e-10, atol=1e-12)
        for name, grad in grads_a.items():
            per_step = [grads_b[f"flows.{t}.{name}"] for t in range(3)]
            expected = torch.cat(per_step) if name == "made.context_layer.weight" else torch.stack(per_step)
            torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cls", [F.IAF, F.MAF])
def test_a_one_step_autoregressive_flow_reads_weights_saved_in_a_compose(cls):
    torch.manual_seed(4)
    old = _one_step_flows(cls, CTX, 1, "natural")
    fresh = cls(DIM, (16, 12), CTX).double()
    model = torch.nn.ModuleDict({"flow": fresh})
    model.load_state_dict({f"flow.{key}": value for key, value in old.state_dict().items()})
    z, h = torch.randn(4, DIM, dtype=torch.float64), torch.randn(4, CTX, dtype=torch.float64)
    for a, b in zip(fresh(z, h), old(z, h)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [F.IAF, F.MAF])
@pytest.mark.parametrize("order", ["natural", "reversed", [1, 4, 0, 3, 2]])
def test_autoregressive_flow_jacobian_is_triangular_in_its_order(cls, order):
    torch.manual_seed(0)
    flow = cls(DIM, (16, 16), CTX, order=order).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.5 * torch.randn_like(p))
    h = torch.randn(CTX, dtype=torch.float64)
    jac = degrees_jacobian(lambda x: flow(x.unsqueeze(0), h.unsqueeze(0))[0].squeeze(0), DIM)
    deg = flow.made.degrees
    later = deg[None, :] > deg[:, None]  # input j comes after output i
    assert torch.all(jac[later] == 0)
    assert torch.all(jac[deg[None, :] < deg[:, None]].abs() > 0)


def test_bernoulli_made_is_a_normalized_density():
    torch.manual_seed(0)
    model = BernoulliMADE = F.BernoulliMADE(4, (12,), order="reversed").double()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p))
    all_x = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4)), dtype=torch.float64)
    total = BernoulliMADE.log_prob(all_x).exp().sum()
    torch.testing.assert_close(total, torch.tensor(1.0, dtype=torch.float64))
    assert model.sample(6).shape == (6, 4)


def test_bernoulli_made_learns_correlated_bits():
    torch.manual_seed(0)
    first = torch.bernoulli(torch.full((512, 1), 0.5))
    data = torch.cat([first, first, 1 - first, torch.bernoulli(torch.full((512, 1), 0.9))], 1)
    model = F.BernoulliMADE(4, (32,))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = -model.log_prob(data).mean()
        loss.backward()
        opt.step()
    entropy = math.log(2) + -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert loss.item() < entropy + 0.05


@pytest.mark.parametrize(
    "flow",
    [
        F.build_flow("iaf", DIM, 8, CTX, hidden=32),
        F.build_flow("planar", DIM, 32, CTX),
        F.build_flow("planar", DIM, 32),
        F.build_flow("radial", DIM, 16, CTX),
        F.build_flow("sylvester-orthogonal", DIM, 8, CTX),
        F.build_flow("maf", DIM, 4, CTX, hidden=32),
    ],
    ids=["iaf8", "planar32-amortized", "planar32", "radial16", "o-snf8", "maf4"],
)
def test_deep_stacks_stay_finite_under_extreme_inputs(flow):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in flow.parameters():
            p.mul_(10.0).add_(10.0 * torch.randn_like(p))
    z = torch.cat([torch.randn(50, DIM) * 1e3, torch.randn(50, DIM), torch.zeros(1, DIM)]).requires_grad_()
    h = torch.randn(101, CTX) * 100
    y, ladj = flow(z, h)
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    (y.sum() + ladj.sum()).backward()
    assert torch.isfinite(z.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in flow.parameters() if p.grad is not None)


def test_iaf_step_starts_as_a_gated_pass_through():
    step = F.IAF(DIM, (32, 32), CTX, gate_bias=3.0)
    z, h = torch.randn(10, DIM), torch.randn(10, CTX)
    y, ladj = step(z, h)
    gate = torch.sigmoid(torch.tensor(3.0))
    torch.testing.assert_close(y, gate * z, atol=0.02, rtol=0)  # the shift (1 - σ) m starts near 0
    torch.testing.assert_close(ladj, torch.full((10,), DIM * gate.log().item()), atol=0.02, rtol=0)


@pytest.mark.parametrize("context_dim", [None, CTX])
def test_sylvester_triangular_factors_unpack_row_by_row_with_bounded_diagonal(context_dim):
    flow = F.TriangularSylvester(3, context_dim=context_dim)
    packed = torch.tensor([[0.5, 1.0, 2.0, -7.0, 3.0, 9.0]])  # rows (0,0) (0,1) (0,2) | (1,1) (1,2) | (2,2)
    r = flow._triangular(packed)
    expected = torch.tensor([[math.tanh(0.5), 1.0, 2.0], [0.0, math.tanh(-7.0), 3.0], [0.0, 0.0, math.tanh(9.0)]])
    assert torch.allclose(r, expected[None]) and r.shape == (1, 3, 3)
    sizes = dict(zip(flow.params.shapes, flow.params.sizes))
    assert sizes["r1"] == sizes["r2"] == 6  # an amortized head produces M(M+1)/2 entries, not M²


def test_flow_distribution_log_prob_agrees_with_sampling_path():
    torch.manual_seed(0)
    flow = make_flow(CASES[[c.id for c in CASES].index("iaf-context")])
    mean, log_std, h = (
        torch.randn(6, DIM, dtype=torch.float64),
        0.1 * torch.randn(6, DIM, dtype=torch.float64),
        torch.randn(6, CTX, dtype=torch.float64),
    )
    q = FlowDistribution(diagonal_gaussian(mean, log_std), flow, h)
    z, log_q = q.rsample_and_log_prob((4,))
    assert z.shape == (4, 6, DIM) and log_q.shape == (4, 6)
    torch.testing.assert_close(q.log_prob(z), log_q)


def test_compose_rejects_mixed_event_dims_and_unknown_flow_names():
    with pytest.raises(ValueError, match="event_dim"):
        F.Compose(F.Planar(4), F.ActNorm(4))
    with pytest.raises(ValueError, match="unknown flow"):
        F.build_flow("nice", 4, 2)
    with pytest.raises(NotImplementedError, match="no inverse"):
        F.Planar(4).inverse(torch.randn(2, 4))


def test_standard_normal_base_moves_with_the_model_and_matches_the_closed_form():
    base = StandardNormal(DIM).double()
    z = base.sample((6,))
    assert z.shape == (6, DIM) and z.dtype == torch.float64
    torch.testing.assert_close(base.log_prob(z), standard_normal_log_prob(z))
    torch.testing.assert_close(
        base.log_prob(torch.zeros(DIM, dtype=torch.float64)),
        torch.tensor(-0.5 * DIM * math.log(2 * math.pi), dtype=torch.float64),
    )
    q = FlowDistribution(base.distribution(), F.Reverse(DIM))
    x, log_q = q.rsample_and_log_prob((4,))
    torch.testing.assert_close(q.log_prob(x), log_q)


def per_row_jacobian_condition(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """Condition number of the Jacobian of a row-wise map at each row of z (B, D) -> (B,)."""
    jac = torch.autograd.functional.jacobian(fn, z, vectorize=True)  # (B, D, B, D)
    rows = torch.arange(z.shape[0])
    return torch.linalg.cond(jac[rows, :, rows])


@pytest.mark.parametrize("cls", [F.IAF, F.MAF])
@pytest.mark.parametrize("order", ["natural", "reversed", "permutation"])
def test_sequential_direction_round_trips_at_every_well_conditioned_point(cls, order):
    """The D-pass solve (IAF inverse, MAF sampling) against the one-pass direction, with large weights.

    With weights perturbed by N(0, 0.5²) some gates are tiny and some points are ill-conditioned;
    every point whose Jacobian has condition number < 1e6 must come back to 1e-8 (float64).
    """
    checked = 0
    for seed in range(4):
        torch.manual_seed(seed)
        flow = cls(16, (64, 64), order=torch.randperm(16).tolist() if order == "permutation" else order).double()
        with torch.no_grad():
            for p in flow.parameters():
                p.add_(0.5 * torch.randn_like(p))
        one_pass, sequential = (flow.forward, flow.inverse) if cls is F.IAF else (flow.inverse, flow.forward)
        z = torch.randn(16, 16, dtype=torch.float64)
        y, ladj = one_pass(z)
        x, ladj_back = sequential(y)
        good = per_row_jacobian_condition(lambda v, one_pass=one_pass: one_pass(v)[0], z) < 1e6
        checked += int(good.sum())
        assert torch.isfinite(x[good]).all() and torch.isfinite(ladj_back[good]).all()
        torch.testing.assert_close(x[good], z[good], rtol=0, atol=1e-8)
        torch.testing.assert_close(ladj_back[good], -ladj[good], rtol=0, atol=1e-8)
    assert checked >= 20


def test_iaf_inverse_is_finite_at_a_well_conditioned_point():
    """Review repro: the Jacobian's condition number is 1.07, yet all D positions were updated on
    every pass and the unsolved ones overflowed the gate into NaN."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        flow = F.IAF(3, (16, 16))
        with torch.no_grad():
            for p in flow.parameters():
                p.add_(torch.randn_like(p))
        z = 2 * torch.randn(1, 3)
    finally:
        torch.set_default_dtype(torch.float32)
    assert per_row_jacobian_condition(lambda v: flow(v)[0], z) < 1.1
    y, ladj = flow(z)
    for x, ladj_inverse in (flow.inverse(y), F.Inverse(flow)(y)):
        torch.testing.assert_close(x, z, rtol=0, atol=1e-12)
        torch.testing.assert_close(ladj_inverse, -ladj, rtol=0, atol=1e-12)
    zero = torch.zeros(3, dtype=torch.float64)
    q = FlowDistribution(diagonal_gaussian(zero, zero), flow)
    torch.testing.assert_close(q.log_prob(y), standard_normal_log_prob(z) - ladj)


def test_orthogonal_sylvester_orthogonalises_in_float32_with_autocast_off(monkeypatch):
    """CUDA's QR has no 16-bit kernel: the head's bf16 output must reach it cast up, autocast off
    (CPU autocast upcasts QR by itself, so the call is recorded before autocast can hide it)."""
    seen = []
    qr = torch.linalg.qr

    def recording_qr(a: torch.Tensor, *args, **kwargs):
        seen.append((a.dtype, torch.is_autocast_enabled("cpu")))
        return qr(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "qr", recording_qr)
    torch.manual_seed(0)
    flow = F.OrthogonalSylvester(DIM, 3, CTX)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ladj = flow(torch.randn(4, DIM), torch.randn(4, CTX))
    assert seen == [(torch.float32, False)]
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_orthogonal_sylvester_under_16bit_autocast_matches_float32(dtype, device):
    torch.manual_seed(0)
    flow = F.OrthogonalSylvester(DIM, 3, CTX).to(device)
    z, h = torch.randn(6, DIM, device=device), torch.randn(6, CTX, device=device)
    with torch.autocast(device.type, dtype=dtype):
        y, ladj = flow(z, h)
    y_ref, ladj_ref = flow(z, h)
    torch.testing.assert_close(y.float(), y_ref, rtol=0, atol=0.05)
    torch.testing.assert_close(ladj.float(), ladj_ref, rtol=0, atol=0.05)


def test_amortized_flows_take_an_unbatched_context():
    """h of shape (H,) with z of shape (D,): scalar parameters (planar's b, radial's α and β) have shape ()."""
    for flow in (F.Planar(2, 3), F.Radial(2, 3)):
        z, ladj = flow(torch.randn(2), torch.randn(3))
        assert z.shape == (2,) and ladj.shape == ()


def _one_step_planars_like(stack: F.Planar) -> F.Compose:
    """A Compose of one-step Planar modules with the weights of the T-step ``stack`` (the layout
    flowvae used before it kept the steps together)."""
    steps = F.Compose(*(F.Planar(stack.dim, stack.context_dim) for _ in range(stack.steps))).to(torch.float64)
    if stack.steps == 1:
        old_layout = {f"flows.0.{name}": value for name, value in stack.state_dict().items()}
    else:
        old_layout = {
            f"flows.{t}.{name}": (value[t] if ".values." in name else value.chunk(stack.steps)[t])
            for name, value in stack.state_dict().items()
            for t in range(stack.steps)
        }
    steps.load_state_dict(old_layout)
    return steps


@pytest.mark.parametrize("context_dim", [None, CTX])
def test_a_planar_stack_matches_one_step_modules_in_values_and_gradients(context_dim):
    torch.manual_seed(0)
    stack = F.Planar(DIM, context_dim, steps=4).double()
    with torch.no_grad():
        for p in stack.parameters():
            p.normal_()
        if context_dim is None:
            stack.params.values["w"][1].zero_()  # w = 0: wᵀû = 0, det 1
    steps = _one_step_planars_like(stack)
    assert len(list(stack.parameters())) == (3 if context_dim is None else 2)
    z = torch.randn(2, 3, DIM, dtype=torch.float64)
    h = torch.randn(3, CTX, dtype=torch.float64) if context_dim else None
    results = []
    for flow in (stack, steps):
        out, log_det = flow(z, h)
        (out.square().sum() + log_det.sum()).backward()
        grads = {name: p.grad for name, p in flow.named_parameters()}
        results.append((out, log_det, grads))
    (out_a, det_a, grads_a), (out_b, det_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(det_a, det_b, rtol=1e-12, atol=1e-12)
    for name, grad in grads_a.items():  # the one-step modules' gradients, stacked step-major
        per_step = [grads_b[f"flows.{t}.{name}"] for t in range(4)]
        expected = torch.stack(per_step) if ".values." in name else torch.cat(per_step)
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("context_dim", [None, CTX])
@pytest.mark.parametrize("steps", [1, 3])
def test_a_planar_stack_reads_weights_saved_as_one_step_modules(context_dim, steps):
    """Checkpoints from before the steps were kept together load and give the same numbers."""
    torch.manual_seed(1)
    stack = F.Planar(DIM, context_dim, steps=steps).double()
    old = _one_step_planars_like(stack)
    fresh = F.Planar(DIM, context_dim, steps=steps).double()
    model = torch.nn.ModuleDict({"flow": fresh})
    model.load_state_dict({f"flow.{key}": value for key, value in old.state_dict().items()})
    z = torch.randn(4, DIM, dtype=torch.float64)
    h = torch.randn(4, CTX, dtype=torch.float64) if context_dim else None
    for a, b in zip(fresh(z, h), old(z, h)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
