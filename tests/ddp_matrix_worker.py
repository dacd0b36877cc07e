"""Run by tests/test_gpu_readiness.py under torchrun (2 workers, gloo): for every model of the
matrix, DDP on half batches must end with the parameters of one process on the whole batch."""

from __future__ import annotations

import torch
import torch.distributed as dist

from flowvae import objectives
from flowvae.models import draw_noise, select_noise

from test_gpu_readiness import MODEL_MATRIX, tiny_model

STEPS, BATCH = 3, 6


def train(model: torch.nn.Module, step_model: torch.nn.Module, shard: slice, workers: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    data = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the ResNet's data-dependent initialisation (a no-op elsewhere), as the trainer does
        model.initialise(torch.bernoulli(torch.full((BATCH, 1, 8, 8), 0.5), generator=data))
    for _ in range(STEPS):
        x = torch.bernoulli(torch.full((BATCH, 1, 8, 8), 0.5), generator=data)
        noise = draw_noise(model, 1, BATCH, generator=data)
        ld = step_model(x[shard], noise=select_noise(noise, shard))
        loss = objectives.training_loss(ld, normalizer=BATCH / workers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def main() -> None:
    dist.init_process_group("gloo")
    rank, workers = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    for arch, flow, context in MODEL_MATRIX:
        torch.manual_seed(0)
        model, reference = tiny_model(arch, flow, context), tiny_model(arch, flow, context)
        reference.load_state_dict(model.state_dict())
        half = BATCH // workers
        train(reference, reference, slice(0, BATCH), 1)
        train(model, torch.nn.parallel.DistributedDataParallel(model), slice(rank * half, (rank + 1) * half), workers)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            where = f"{arch} {flow} {context}: {name}"
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=lambda m, where=where: f"{where}: {m}")
        if rank == 0:
            print(f"{arch} flow={flow} context={context}: same parameters", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
