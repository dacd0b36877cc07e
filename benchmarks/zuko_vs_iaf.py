"""flowvae's IAF posterior against a zuko neural spline flow (NSF) posterior, same VAE, same budget.

Both VAEs are README's "A flow posterior in your own VAE" model on the bundled 8x8 digits (MLP
64-H-D encoder and D-H-64 decoder, Bernoulli likelihood, Adam, KL warm-up); only the posterior flow
differs, both with 4 steps, conditioned on the encoder's h and with (hidden, hidden) hidden layers:

* flowvae: ``flows.build_flow("iaf", D, 4, context_dim=H, hidden=hidden)`` (σ-gated affine);
* zuko:    ``flows.from_transform(zuko.flows.NSF(D, context=H, transforms=4, hidden_features=(hidden,
  hidden)).transform, context_dim=H)``, monotonic rational-quadratic splines (8 bins) whose one-pass
  direction is used for sampling, as IAF's is.

They see the same batches in the same order. Training is interleaved epoch by epoch (the first model
alternates) so that both share the same machine load, and each epoch is timed with
``time.perf_counter``. Reported: training steps/s (all steps / all training seconds), test −ELBO
(K = 1) and importance-weighted test −log p(x) (K = ``--samples``, fixed noise).

    python benchmarks/zuko_vs_iaf.py                     # 40 epochs, about 2-3 minutes on 1 thread
    python benchmarks/zuko_vs_iaf.py --epochs 5 --samples 100   # smoke run

Measured 2026-11-23 with the defaults (AMD EPYC, 1 thread, while other processes kept about 1.4-1.5
of the 2 cores busy, so the steps/s are indicative), seeds 0 and 1:

| posterior | flow parameters | train steps/s | test -ELBO | test -log p(x), K = 1000 |
| --- | --- | --- | --- | --- |
| flowvae IAF | 62080 | 64.2, 61.6 | 19.77, 19.88 | 19.28, 19.34 |
| zuko NSF | 149440 | 29.8, 27.3 | 19.67, 19.75 | 19.15, 19.13 |
"""

from __future__ import annotations

import argparse
import time

import torch
import zuko
from torch import nn

from flowvae import flows, objectives
from flowvae.data import load_dataset
from flowvae.models import VAE, GaussianEncoder, build_likelihood, count_parameters

from common import OtherLoad, machine, machine_line, markdown_table, set_threads


def build(posterior: str, latent: int, hidden: int, flow_hidden: int, seed: int) -> VAE:
    """The same VAE (same initial encoder/decoder weights for a seed) with the named posterior flow."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ELU())
    decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ELU(), nn.Linear(hidden, 64), nn.Unflatten(1, (1, 8, 8)))
    encoder = GaussianEncoder(body, feature_dim=hidden, latent_dim=latent)
    if posterior == "flowvae IAF":
        flow = flows.build_flow("iaf", latent, 4, context_dim=hidden, hidden=flow_hidden)
    else:
        nsf = zuko.flows.NSF(latent, context=hidden, transforms=4, hidden_features=(flow_hidden, flow_hidden))
        flow = flows.from_transform(nsf.transform, context_dim=hidden, features=latent)
    return VAE(encoder, decoder, build_likelihood("bernoulli", "binary"), latent, (1, 8, 8), flow)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--warmup-epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128, help="encoder/decoder width H (the flows' context size)")
    parser.add_argument("--flow-hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=1000, help="K of the importance-weighted -log p(x)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    set_threads(args.threads)
    digits = load_dataset("digits")
    names = ["flowvae IAF", "zuko NSF"]
    models = {name: build(name, args.latent, args.hidden, args.flow_hidden, args.seed) for name in names}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=args.lr) for name, m in models.items()}
    seconds, steps = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
    order = torch.Generator().manual_seed(args.seed)
    load = OtherLoad().start()

    for epoch in range(args.epochs):
        batches = torch.randperm(len(digits.train), generator=order).split(args.batch_size)
        beta = min(1.0, (epoch + 1) / max(args.warmup_epochs, 1))
        for name in names if epoch % 2 == 0 else names[::-1]:  # interleaved, first one alternating
            model, optimizer = models[name].train(), optimizers[name]
            torch.manual_seed(args.seed + epoch)  # the same posterior noise stream for both
            start = time.perf_counter()
            for index in batches:
                loss = objectives.training_loss(model(digits.train[index]), beta=beta)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            seconds[name] += time.perf_counter() - start
            steps[name] += len(batches)
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            print(f"epoch {epoch + 1}: " + ", ".join(f"{n} {steps[n] / seconds[n]:.1f} steps/s" for n in names))

    rows = []
    for name in names:
        model = models[name].eval()
        with torch.no_grad():
            torch.manual_seed(args.seed)
            elbo = objectives.negative_elbo(model(digits.test)).mean().item()
        nll = (
            objectives.importance_weighted_nll(
                model, digits.test, samples=args.samples, generator=torch.Generator().manual_seed(args.seed)
            )
            .mean()
            .item()
        )
        rows.append(
            [name, count_parameters(model.flow), f"{steps[name] / seconds[name]:.1f}", f"{elbo:.2f}", f"{nll:.2f}"]
        )
    info = machine()
    info["other_processes_cores"] = load.stop()
    print()
    print(
        f"digits, {args.epochs} epochs x {steps[names[0]] // args.epochs} steps of {args.batch_size}, latent "
        f"{args.latent}, H = {args.hidden}, flows 4 steps with ({args.flow_hidden}, {args.flow_hidden}) hidden; "
        f"test set of {len(digits.test)}; -log p(x) with K = {args.samples}"
    )
    print(markdown_table(["posterior", "flow parameters", "train steps/s", "test -ELBO", "test -log p(x)"], rows))
    print(machine_line(info))


if __name__ == "__main__":
    main()
