"""Micro-benchmark of one step of every flow in ``flowvae.flows``, against linear-layer yardsticks.

For each latent size D (``--dims``) and batch B (``--batches``) and each flow of
``flows.FLOW_NAMES`` (one step, ``steps=1``), with global parameters and with a context h of
``--context-dim`` features, it times:

- ``fwd``: the posterior direction z₀ → z₁ under ``torch.no_grad()``;
- ``train``: the same call plus the backward pass to the flow's parameters, z and h;
- ``inv``: ``flow.inverse`` under ``torch.no_grad()`` where the flow has one.

Yardsticks at the same D and B: ``nn.Linear(D, D)``, and the three linear layers of an IAF/MAF
MADE without masks (D → 320 → 320 → 2D, no activations), so the table shows the ratio
"IAF step / its 3 linears".  With a context the amortized flows (planar, radial, Householder,
Sylvester) include their linear head h → parameters, and IAF/MAF/coupling a fourth, unmasked
linear layer h → 320; the yardstick stays the three linears.

IAF's inverse and MAF's forward solve the autoregressive equations one degree at a time: D MADE
passes.  A call that takes longer than ``--budget`` seconds is timed once (no repeats), so at
D=784 those cells are one call each (after one warm-up call).  MAF's training step runs that
sequential forward under autograd, which keeps D copies of the MADE activations (~27 GB at D=784,
B=1000), so it is timed only where D·B <= ``--max-sequential-train``.  Amortized Sylvester flows
are full rank (M = D), so their head emits ~2D² numbers per example; configurations whose amortized parameters exceed
``--max-amortized`` floats in a batch are skipped and listed.

    python benchmarks/flows_speed.py                                   # full run (~10 min on 2 cores)
    python benchmarks/flows_speed.py --quick                           # smoke run
    python benchmarks/flows_speed.py --dims 40 784 --batches 100 1000 --threads 2
    python benchmarks/flows_speed.py --profile --dims 40 784 --batches 100   # torch.profiler of IAF

Writes ``benchmarks/results/flows_speed.json`` and ``flows_speed.md`` (``--out`` to change the name).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from torch import nn

from flowvae import flows
from flowvae.flows.base import FlowParameters

from common import Timing, machine_line, markdown_table, measure, report, save, start

MADE_HIDDEN = 320


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[40, 784])
    p.add_argument("--batches", type=int, nargs="+", default=[100, 1000])
    p.add_argument(
        "--flows",
        nargs="+",
        default=[n for n in flows.FLOW_NAMES if n != "none"],
        choices=[n for n in flows.FLOW_NAMES if n != "none"],
    )
    p.add_argument("--context-dim", type=int, default=64, help="size of h for the conditioned variants")
    p.add_argument("--no-context", action="store_true", help="time only the global-parameter variants")
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
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per cell")
    p.add_argument(
        "--max-amortized",
        type=float,
        default=5e7,
        help="skip configurations whose amortized flow parameters exceed this many floats per batch",
    )
    p.add_argument(
        "--max-sequential-train",
        type=int,
        default=40_000,
        help="time MAF's sequential forward+backward only when D*B is at most this (memory grows ~D²B)",
    )
    p.add_argument("--quick", action="store_true", help="few repeats, for a smoke run (results not saved unless --out)")
    p.add_argument("--profile", action="store_true", help="profile one IAF step with torch.profiler instead")
    p.add_argument("--out", default=None, help="result name under benchmarks/results/ (default flows_speed)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def amortized_floats(flow: nn.Module, batch: int) -> int:
    """How many flow parameters the linear heads produce for a batch (0 for global parameters)."""
    return batch * sum(
        sum(math.prod(s) for s in m.shapes.values())
        for m in flow.modules()
        if isinstance(m, FlowParameters) and m.context_dim is not None
    )


def sequential_directions(name: str) -> dict[str, bool]:
    """Which directions of a one-step flow take D passes."""
    return {"fwd": name == "maf", "inv": name == "iaf"}


def linear_timings(dim: int, batch: int, budget: float) -> dict[str, dict[str, Timing]]:
    z = torch.randn(batch, dim)
    single = nn.Linear(dim, dim)
    made3 = nn.Sequential(
        nn.Linear(dim, MADE_HIDDEN), nn.Linear(MADE_HIDDEN, MADE_HIDDEN), nn.Linear(MADE_HIDDEN, 2 * dim)
    )
    out = {}
    for key, net in (("linear", single), ("made3", made3)):
        params = list(net.parameters())
        leaf = z.detach().requires_grad_(True)

        def no_grad(net=net):
            with torch.no_grad():
                net(z)

        def train(net=net, params=params, leaf=leaf):
            torch.autograd.grad(net(leaf).sum(), params + [leaf])

        out[key] = {"fwd": measure(no_grad, budget), "train": measure(train, budget)}
    return out


def time_flow(
    name: str, dim: int, batch: int, context_dim: int | None, budget: float, max_sequential_train: int
) -> dict:
    flow = flows.build_flow(name, dim, steps=1, context_dim=context_dim, hidden=MADE_HIDDEN)
    z = torch.randn(batch, dim)
    context = torch.randn(batch, context_dim) if context_dim is not None else None
    params = [p for p in flow.parameters() if p.requires_grad]
    leaves = [z.clone().requires_grad_(True)] + ([context.clone().requires_grad_(True)] if context is not None else [])
    ctx_leaf = leaves[1] if context is not None else None

    def fwd():
        with torch.no_grad():
            flow(z, context)

    def train():
        z_new, log_abs_det = flow(leaves[0], ctx_leaf)
        torch.autograd.grad(z_new.sum() + log_abs_det.sum(), params + leaves)

    def inv():
        with torch.no_grad():
            flow.inverse(z, context)

    row = {"fwd": measure(fwd, budget)}
    if sequential_directions(name)["fwd"] and dim * batch > max_sequential_train:
        row["train"] = None  # backward through D sequential passes keeps ~D copies of the MADE activations
    else:
        row["train"] = measure(train, budget)
    if flow.has_inverse:
        row["inv"] = measure(inv, budget)
    row["parameters"] = sum(p.numel() for p in params)
    row["sequential"] = [k for k, v in sequential_directions(name).items() if v]
    return row


def fmt(t: Timing | None) -> str:
    if t is None:
        return "—"
    text = f"{t.ms:.3g}" if t.ms < 100 else f"{t.ms:.0f}"
    return text + ("¹" if t.repeats == 1 else "")


def ratio(a: Timing | None, b: Timing | None) -> str:
    return "—" if a is None or b is None else f"{a.median / b.median:.2f}"


def one_pass_key(name: str) -> str:
    """The direction that is one MADE pass: IAF's forward, MAF's inverse."""
    return "inv" if name == "maf" else "fwd"


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    contexts = [None] if args.no_context else [None, args.context_dim]
    results = {"yardsticks": [], "flows": [], "skipped": []}
    for dim in args.dims:
        for batch in args.batches:
            yard = linear_timings(dim, batch, args.budget)
            results["yardsticks"].append({"dim": dim, "batch": batch, **yard})
            print(
                f"D={dim} B={batch}: Linear(D,D) fwd {yard['linear']['fwd'].ms:.3g} ms, "
                f"3 MADE linears fwd {yard['made3']['fwd'].ms:.3g} ms",
                file=sys.stderr,
            )
            for name in args.flows:
                for context_dim in contexts:
                    probe = flows.build_flow(name, dim, steps=1, context_dim=context_dim, hidden=MADE_HIDDEN)
                    need = amortized_floats(probe, batch)
                    del probe
                    if need > args.max_amortized:
                        results["skipped"].append(
                            {
                                "flow": name,
                                "dim": dim,
                                "batch": batch,
                                "context_dim": context_dim,
                                "amortized_floats": need,
                            }
                        )
                        print(f"  skip {name} h={context_dim}: {need:.3g} amortized floats", file=sys.stderr)
                        continue
                    row = time_flow(name, dim, batch, context_dim, args.budget, args.max_sequential_train)
                    row.update(flow=name, dim=dim, batch=batch, context_dim=context_dim)
                    results["flows"].append(row)
                    print(
                        f"  {name:22s} h={context_dim}: fwd {fmt(row['fwd'])} train {fmt(row['train'])} "
                        f"inv {fmt(row.get('inv'))} ms",
                        file=sys.stderr,
                    )
    return results


def render(results: dict, info: dict, args: argparse.Namespace) -> str:
    yard = {(y["dim"], y["batch"]): y for y in results["yardsticks"]}
    header = [
        "D",
        "B",
        "flow",
        "h",
        "fwd ms",
        "train ms",
        "inv ms",
        "fwd / Linear",
        "1-pass / 3 linears",
        "train / 3 linears",
    ]
    rows = []
    for r in results["flows"]:
        y = yard[(r["dim"], r["batch"])]
        made = r["flow"] in ("iaf", "maf")
        rows.append(
            [
                r["dim"],
                r["batch"],
                r["flow"],
                r["context_dim"] or "—",
                fmt(r["fwd"]),
                fmt(r["train"]),
                fmt(r.get("inv")),
                ratio(r["fwd"], y["linear"]["fwd"]),
                ratio(r.get(one_pass_key(r["flow"])), y["made3"]["fwd"]) if made else "",
                ratio(r["train"], y["made3"]["train"]) if made and r["flow"] == "iaf" else "",
            ]
        )
    y_header = ["D", "B", "Linear(D,D) fwd ms", "Linear train ms", "3 MADE linears fwd ms", "3 linears train ms"]
    y_rows = [
        [
            y["dim"],
            y["batch"],
            fmt(y["linear"]["fwd"]),
            fmt(y["linear"]["train"]),
            fmt(y["made3"]["fwd"]),
            fmt(y["made3"]["train"]),
        ]
        for y in results["yardsticks"]
    ]
    lines = [
        "# flows_speed: one flow step vs linear yardsticks",
        "",
        f"Machine: {machine_line(info)}.",
        f"Command: `python benchmarks/flows_speed.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "Yardsticks (3 MADE linears = D→320→320→2D, unmasked, no activations):",
        "",
        markdown_table(y_header, y_rows),
        "",
        f"One step of each flow (steps=1, MADE hidden 320×2, float32; h = context of {args.context_dim} "
        "features, '—' = global parameters). fwd and inv under no_grad; train = forward + backward to "
        f"parameters, z and h. Clock: {args.clock}. Medians of repeated blocks; ¹ = timed once (a sequential "
        "D-pass solve "
        "longer than the per-cell budget). '1-pass / 3 linears': IAF forward or MAF inverse (one MADE "
        "pass) over the 3 unmasked linears; with h the MADE has a fourth linear h→320. MAF train '—': "
        f"sequential forward under autograd not timed where D·B > {args.max_sequential_train}.",
        "",
        markdown_table(header, rows),
    ]
    if results["skipped"]:
        lines += [
            "",
            "Skipped (amortized parameters for the whole batch above --max-amortized="
            f"{args.max_amortized:.3g} floats; amortized Sylvester flows here are full rank, M = D):",
            "",
        ]
        lines += [
            f"- {s['flow']} D={s['dim']} B={s['batch']} h={s['context_dim']}: {s['amortized_floats']:.3g} floats"
            for s in results["skipped"]
        ]
    return "\n".join(lines)


def iaf_breakdown(dim: int, batch: int, context_dim: int | None, budget: float) -> dict[str, dict[str, Timing]]:
    """Time an IAF step in cumulative pieces, so that differences attribute its cost.

    plain: the 3 linears D→320→320→2D, unmasked (the yardstick); masked: the MADE's own 3
    MaskedLinear layers (weight · mask each call), plus h→320 with a context; made: the MADE with
    its ELUs; step: the whole IAF step (checks, gate, soft clamp, exp, log-det).
    """
    flow = flows.IAF(dim, (MADE_HIDDEN, MADE_HIDDEN), context_dim)
    made = flow.made
    plain = nn.Sequential(
        nn.Linear(dim, MADE_HIDDEN), nn.Linear(MADE_HIDDEN, MADE_HIDDEN), nn.Linear(MADE_HIDDEN, 2 * dim)
    )
    z = torch.randn(batch, dim)
    context = torch.randn(batch, context_dim) if context_dim is not None else None

    def masked(x, c):
        h = made.hidden_layers[0](x)
        if made.context_layer is not None:
            h = h + made.context_layer(c)
        for layer in made.hidden_layers[1:]:
            h = layer(h)
        return made.output_layer(h)

    pieces = {
        "plain": (lambda x, c: plain(x), list(plain.parameters())),
        "masked": (masked, list(made.parameters())),
        "made": (made, list(made.parameters())),
        "step": (lambda x, c: torch.cat([t.reshape(batch, -1) for t in flow(x, c)], -1), list(flow.parameters())),
    }
    out = {}
    for key, (fn, params) in pieces.items():
        leaf = z.clone().requires_grad_(True)

        def fwd(fn=fn):
            with torch.no_grad():
                fn(z, context)

        def train(fn=fn, params=params, leaf=leaf):
            torch.autograd.grad(fn(leaf, context).sum(), params + [leaf])

        out[key] = {"fwd": measure(fwd, budget), "train": measure(train, budget)}
    return out


def profile_iaf(args: argparse.Namespace) -> str:
    """Attribute the cost of one IAF step: a cumulative breakdown, then torch.profiler's top operators."""
    from torch.profiler import ProfilerActivity, profile

    contexts = [None] if args.no_context else [None, args.context_dim]
    rows = []
    for dim in args.dims:
        for batch in args.batches:
            for context_dim in contexts:
                b = iaf_breakdown(dim, batch, context_dim, args.budget)
                for mode in ("fwd", "train"):
                    base = b["plain"][mode].median
                    rows.append(
                        [dim, batch, context_dim or "—", mode]
                        + [
                            f"{b[k][mode].ms:.3g} ({b[k][mode].median / base:.2f})"
                            for k in ("plain", "masked", "made", "step")
                        ]
                    )
    header = ["D", "B", "h", "mode", "3 plain linears ms (×)", "+ masks (+ h→320)", "+ ELU = MADE", "IAF step"]
    out = [
        "Cumulative breakdown (ms, and × the 3 plain linears): each column adds one part of the step.\n\n"
        + markdown_table(header, rows)
    ]
    for dim in args.dims:
        for batch in args.batches:
            for context_dim in contexts:
                flow = flows.build_flow("iaf", dim, steps=1, context_dim=context_dim, hidden=MADE_HIDDEN)
                z = torch.randn(batch, dim)
                context = torch.randn(batch, context_dim) if context_dim else None
                params = list(flow.parameters())
                leaf = z.clone().requires_grad_(True)
                for mode in ("fwd", "train"):

                    def step(mode=mode, flow=flow, z=z, context=context, leaf=leaf, params=params):
                        if mode == "fwd":
                            with torch.no_grad():
                                flow(z, context)
                        else:
                            z_new, lad = flow(leaf, context)
                            torch.autograd.grad(z_new.sum() + lad.sum(), params + [leaf])

                    for _ in range(5):
                        step()
                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        for _ in range(50):
                            step()
                    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
                    out.append(f"### IAF D={dim} B={batch} h={context_dim} {mode} (50 calls)\n\n```\n{table}\n```")
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.budget = min(args.budget, 0.1)
    threads, info, load = start(args)
    if args.profile:
        text = profile_iaf(args)
        print(text)
        name = args.out or "flows_speed_profile"
        save(
            name,
            {"machine": info, "args": vars(args), "profile": text},
            f"# IAF profile\n\nMachine: {machine_line(info)}.\n\n{text}",
        )
        return
    report("flows_speed", args, info, threads, run(args), render, load)


if __name__ == "__main__":
    main()
