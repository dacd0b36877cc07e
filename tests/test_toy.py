"""flowvae.toy: the energies against independent formulas, reverse-KL fitting, log Z estimates, the CLI."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from flowvae import flows
from flowvae.toy import (
    TARGETS,
    Target,
    beta_schedule,
    default_anneal_steps,
    evaluate,
    fit,
    flow_samples,
    gaussian_target,
    get_target,
    plot_grid,
    quadrature_log_z,
    sample_image,
    u1,
    u2,
    u3,
    u4,
)
from flowvae.toy import cli as toy_cli


# Independent scalar transcriptions of Rezende & Mohamed (2015), Table 1, with the math module.
def _w1(z1):
    return math.sin(2 * math.pi * z1 / 4)


def _w2(z1):
    return 3 * math.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)


def _w3(z1):
    return 3 / (1 + math.exp(-(z1 - 1) / 0.3))


def _reference(name, z1, z2):
    if name == "u1":
        r = math.hypot(z1, z2)
        return 0.5 * ((r - 2) / 0.4) ** 2 - math.log(
            math.exp(-0.5 * ((z1 - 2) / 0.6) ** 2) + math.exp(-0.5 * ((z1 + 2) / 0.6) ** 2)
        )
    if name == "u2":
        return 0.5 * ((z2 - _w1(z1)) / 0.4) ** 2
    if name == "u3":
        return -math.log(
            math.exp(-0.5 * ((z2 - _w1(z1)) / 0.35) ** 2) + math.exp(-0.5 * ((z2 - _w1(z1) + _w2(z1)) / 0.35) ** 2)
        )
    if name == "u4":
        return -math.log(
            math.exp(-0.5 * ((z2 - _w1(z1)) / 0.4) ** 2) + math.exp(-0.5 * ((z2 - _w1(z1) + _w3(z1)) / 0.35) ** 2)
        )
    raise KeyError(name)


POINTS = [(0.0, 0.0), (1.0, 1.0), (-1.3, 0.7), (2.1, -1.9), (0.4, -2.6), (-3.2, 3.1), (1.0, -2.0), (1.0, -0.5)]


@pytest.mark.parametrize("name, energy", [("u1", u1), ("u2", u2), ("u3", u3), ("u4", u4)])
def test_paper_energies_match_the_formulas(name, energy):
    z = torch.tensor(POINTS, dtype=torch.float64)
    expected = torch.tensor([_reference(name, *p) for p in POINTS], dtype=torch.float64)
    torch.testing.assert_close(energy(z), expected, rtol=1e-12, atol=1e-12)
    # The registry's targets are the same energies inside the window |z1| <= 4 ...
    torch.testing.assert_close(TARGETS[name](z), expected, rtol=1e-12, atol=1e-12)
    # ... and U2–U4 get a soft wall ½ ((|z1| − 4) / 0.2)² outside it.
    far = torch.tensor([[5.0, 0.3], [-4.5, -1.0]], dtype=torch.float64)
    wall = 0.0 if name == "u1" else torch.tensor([0.5 * 25.0, 0.5 * 2.5**2], dtype=torch.float64)
    torch.testing.assert_close(TARGETS[name](far), energy(far) + wall, rtol=1e-12, atol=1e-12)


def test_paper_energies_at_hand_computed_points():
    energies = {"u1": u1, "u2": u2, "u3": u3, "u4": u4}

    def u(name, z1, z2):
        return energies[name](torch.tensor([z1, z2], dtype=torch.float64)).item()

    # U1: on the ring at the lobe centre the first term is 0 and the second −ln(1 + e^{−(4/0.6)²/2}).
    assert u("u1", 2.0, 0.0) == pytest.approx(-math.log1p(math.exp(-0.5 * (4 / 0.6) ** 2)), abs=1e-14)
    # U1 at (0, 2): on the ring, both lobes at distance 2: −ln 2 + ½ (2/0.6)².
    assert u("u1", 0.0, 2.0) == pytest.approx(0.5 * (2 / 0.6) ** 2 - math.log(2), rel=1e-12)
    # U2: w1(1) = sin(π/2) = 1, so U2(1, 1) = 0; w1(0) = 0, U2(0, 1) = ½ (1/0.4)² = 3.125.
    assert u("u2", 1.0, 1.0) == pytest.approx(0.0, abs=1e-14)
    assert u("u2", 0.0, 1.0) == pytest.approx(3.125, rel=1e-12)
    assert u("u2", -1.0, 0.5) == pytest.approx(0.5 * (1.5 / 0.4) ** 2, rel=1e-12)
    # U3 at z1 = 1: w1 = 1, w2 = 3.  At z2 = −2 the *second* term is at its peak (z2 − w1 + w2 = 0):
    # the sign the paper prints; the flipped transcription (z2 − w1 − w2) would give ≈ 146.9.
    assert u("u3", 1.0, -2.0) == pytest.approx(-math.log1p(math.exp(-0.5 * (3 / 0.35) ** 2)), abs=1e-14)
    # U4 at z1 = 1: w3 = 3 σ(0) = 1.5, so the second term peaks at z2 = w1 − w3 = −0.5.
    assert u("u4", 1.0, -0.5) == pytest.approx(-math.log1p(math.exp(-0.5 * (1.5 / 0.4) ** 2)), abs=1e-14)


@pytest.mark.parametrize("name", list(TARGETS))
def test_energies_broadcast_and_keep_dtype(name):
    target = TARGETS[name]
    for dtype in (torch.float32, torch.float64):
        z = torch.randn(3, 4, 2, dtype=dtype)
        u = target(z)
        assert u.shape == (3, 4) and u.dtype == dtype and torch.isfinite(u).all()
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        target(torch.zeros(5, 3))


def test_closed_form_log_z_matches_quadrature():
    for name in ("mog2", "mog8", "banana", "ring", "gaussian"):
        target = TARGETS[name]
        assert target.proper
        assert quadrature_log_z(target, 1000) == pytest.approx(target.log_z, abs=3e-4), name
    for name in ("u1", "u2", "u3", "u4"):  # no closed form: the quadrature has converged and the box holds the mass
        target = TARGETS[name]
        wider = target.quadrature_box or target.box
        wider = (wider[0] - 1.0, wider[1] + 1.0, wider[2] - 1.0, wider[3] + 1.0)
        assert quadrature_log_z(target, 500) == pytest.approx(quadrature_log_z(target, 700, wider), abs=1e-5), name
    # The normalisers by hand: K · 2π s² for the mixtures, 2π s1 s2 for the banana, 2π √det Σ.
    assert TARGETS["mog2"].log_z == pytest.approx(math.log(2 * 2 * math.pi * 0.25))
    assert TARGETS["mog8"].log_z == pytest.approx(math.log(8 * 2 * math.pi * 0.09))
    assert TARGETS["banana"].log_z == pytest.approx(math.log(2 * math.pi * 0.5))
    assert TARGETS["gaussian"].log_z == pytest.approx(math.log(2 * math.pi * math.sqrt(0.5 * 0.6 - 0.3**2)))


def test_unknown_target_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown target 'u5'"):
        get_target("u5")


def test_beta_schedule_is_the_papers():
    assert beta_schedule(0, 10_000) == pytest.approx(0.01)
    assert beta_schedule(4_950, 10_000) == pytest.approx(0.505)
    assert beta_schedule(9_900, 10_000) == pytest.approx(1.0)
    assert beta_schedule(50_000, 10_000) == 1.0
    assert default_anneal_steps(500_000) == 10_000 and default_anneal_steps(2_000) == 1_000


def test_evaluate_is_exact_when_q_equals_p():
    # q = N(0, I) and p ∝ exp(−‖z‖²/2): every log weight equals log Z = log 2π.
    target = gaussian_target([0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]])
    m = evaluate(target, None, samples=2000)
    for key in ("elbo", "is_log_z", "log_z"):
        assert m[key] == pytest.approx(math.log(2 * math.pi), abs=1e-12)
    assert m["kl"] == pytest.approx(0.0, abs=1e-12) and m["ess_fraction"] == pytest.approx(1.0)


def test_fit_matches_a_correlated_gaussian():
    # Two affine couplings represent z ↦ μ + L z exactly (shear plus scales below 1), so the
    # optimum is q = p: KL → 0 and q's moments are the target's.
    target = TARGETS["gaussian"]
    torch.manual_seed(0)
    flow = flows.build_flow("coupling", 2, 2, hidden=16)
    kl_before = evaluate(target, flow, samples=20_000)["kl"]
    result = fit(target, flow, steps=500, batch_size=256, lr=1e-2, seed=0)
    assert result.flow is flow and result.skipped == 0
    assert result.history["beta"][0] < 0.25 and result.history["beta"][-1] == 1.0  # first entry: update 50
    assert result.history["elbo"][-1] > result.history["elbo"][0] + 0.5
    m = evaluate(target, flow, samples=100_000)
    assert kl_before > 0.5 and 0.0 <= m["kl"] < 0.01
    assert m["ess_fraction"] > 0.97 and abs(m["is_log_z_error"]) < 5e-3
    z = flow_samples(flow, 100_000, seed=3).double()
    torch.testing.assert_close(z.mean(0), torch.tensor([1.0, -0.5], dtype=torch.float64), atol=0.03, rtol=0)
    torch.testing.assert_close(
        torch.cov(z.T), torch.tensor([[0.5, 0.3], [0.3, 0.6]], dtype=torch.float64), atol=0.03, rtol=0
    )


def test_log_z_of_a_well_separated_mixture_by_importance_sampling():
    target = TARGETS["mog2"]  # modes at (±2, 0), std 0.5: log Z = log(2 · 2π · 0.25)
    torch.manual_seed(0)
    flow = flows.build_flow("planar", 2, 8)
    fit(target, flow, steps=500, batch_size=256, lr=1e-2, seed=0)
    m = evaluate(target, flow, samples=100_000)
    assert m["log_z_source"] == "exact"
    assert m["elbo"] < m["log_z"] and m["kl"] < 0.2
    assert m["is_log_z"] == pytest.approx(target.log_z, abs=0.01)
    assert m["ess_fraction"] > 0.5
    # The plain base as proposal covers both modes too, with a lower ESS and a looser estimate.
    base = evaluate(target, None, samples=200_000)
    assert base["is_log_z"] == pytest.approx(target.log_z, abs=0.03) and base["ess_fraction"] < m["ess_fraction"]


def test_improper_targets_report_no_kl():
    torch.manual_seed(0)
    m = evaluate(Target("u2-open", u2, proper=False), flows.build_flow("radial", 2, 1), samples=1000)
    assert m["log_z"] is None and m["kl"] is None and not m["proper"]
    assert math.isfinite(m["log_z_quadrature"]) and math.isfinite(m["is_log_z"])


def test_fit_rejects_bad_arguments():
    with pytest.raises(ValueError, match="no parameters"):
        fit(TARGETS["u1"], flows.Compose(flows.Reverse(2)), steps=1)
    with pytest.raises(ValueError, match="optimizer"):
        fit(TARGETS["u1"], flows.build_flow("planar", 2, 1), steps=1, optimizer="sgd")


def test_grid_plot_draws_every_panel():
    target = TARGETS["u1"]
    z = torch.randn(1000, 2)
    fig = plot_grid([target], ["a", "b"], {("u1", "a"): sample_image(z, target.box)})
    axes = fig.get_axes()
    assert len(axes) == 3 and not axes[2].axison


def _parse(argv):
    parser = argparse.ArgumentParser()
    toy_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_single_fit_writes_its_files(tmp_path):
    out = tmp_path / "run"
    args = _parse(
        [
            "--target",
            "mog2",
            "--flow",
            "planar",
            "--flow-steps",
            "2",
            "--iterations",
            "50",
            "--eval-samples",
            "2000",
            "--out",
            str(out),
        ]
    )
    assert args.no_anneal is False and args.grid is False
    assert toy_cli.run(args) == 0
    for name in ("metrics.json", "metrics.md", "density.png"):
        assert (out / name).stat().st_size > 0
    data = json.loads((out / "metrics.json").read_text())
    assert data["config"]["iterations"] == 50 and data["metrics"]["target"] == "mog2"
    assert math.isfinite(data["metrics"]["elbo"]) and len(data["history"]["elbo"]) == 1
    assert not list(out.glob(".*.tmp"))


def test_cli_grid_writes_a_figure_and_a_table(tmp_path):
    args = _parse(
        [
            "--grid",
            "--grid-targets",
            "u1",
            "u3",
            "--grid-flows",
            "radial",
            "--grid-steps",
            "1",
            "2",
            "--iterations",
            "20",
            "--eval-samples",
            "1000",
            "--workers",
            "1",
            "--no-anneal",
            "--out",
            str(tmp_path),
        ]
    )
    assert toy_cli.run(args) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0
    rows = json.loads((tmp_path / "metrics.json").read_text())["rows"]
    assert [(r["target"], r["flow_steps"]) for r in rows] == [("u1", 1), ("u1", 2), ("u3", 1), ("u3", 2)]
    table = (tmp_path / "metrics.md").read_text()
    assert "| u3 | radial | 2 |" in table and "†" not in table


def test_cli_rejects_bad_numbers(tmp_path, capsys):
    assert toy_cli.run(_parse(["--iterations", "0", "--out", str(tmp_path)])) == 2
    assert "must be >= 1" in capsys.readouterr().err
