"""Dataset-level evaluation: negative ELBO, its parts, importance-weighted -log p(x), posterior diagnostics."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import platform
from typing import Any

import torch
from tqdm.auto import tqdm

from flowvae import objectives
from flowvae.distributed import Context
from flowvae.interrupts import raise_pending
from flowvae.models.base import LatentVariableModel, draw_noise

# While importance sampling, at most this many elements of decoder output (times an activation
# factor for convolutional decoders) and at most MAX_ROWS latent samples are held at once.
DECODE_BUDGET = 2**25
# On a CPU: float32 decoder outputs of at most 3/4 of the mmap threshold that reuse_freed_memory
# sets (24 MiB), so that each chunk's largest temporaries come from reused heap memory.
MMAP_THRESHOLD_BYTES = 32 * 2**20
CPU_DECODE_BUDGET = MMAP_THRESHOLD_BYTES * 3 // 4 // 4
MAX_ROWS = 2**14


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the networks: 'bf16' or 'fp16' autocast, or nothing for 'fp32'."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def reuse_freed_memory() -> bool:
    """Keep freed CPU memory in the process for reuse (glibc only; the ``flowvae`` command calls it).

    By default glibc maps every allocation above a sliding threshold (at most 32 MiB) afresh from
    the OS and returns freed memory at the top of the heap, so the large temporaries that every
    importance-sampling chunk and training step allocate page-fault on each first touch. Fixing
    the mmap threshold at 32 MiB and the trim threshold at 1 GiB made the eager importance-weighted
    evaluation of the MLP + IAF×4 model about 10 % faster at the CPU chunk size
    (``benchmarks/iw_eval.py --default-allocator`` for the comparison). A process-wide setting,
    hence opt-in for library users; returns whether it was applied.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD_BYTES)) and bool(mallopt(m_trim_threshold, 2**30))


def decode_budget(device: torch.device) -> int:
    """Elements of decoder output to hold at once: :data:`CPU_DECODE_BUDGET` on a CPU; on a GPU a
    quarter of its free memory (float32, with room for the activations), never less.  Free memory
    counts what torch's caching allocator holds but does not use.  The chunks only set the memory
    used: the importance samples drawn do not depend on them."""
    if device.type != "cuda":
        return CPU_DECODE_BUDGET
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(DECODE_BUDGET, free // (4 * 4 * 4))


def auto_chunk_size(
    model: LatentVariableModel, batch_size: int, samples: int, budget: int = DECODE_BUDGET
) -> tuple[int, int]:
    """(points, samples) per importance-sampling chunk, so that points · samples rows of decoder
    output stay within ``budget`` elements (× an activation factor for convolutional decoders) and
    :data:`MAX_ROWS` rows; a batch larger than the rows allowed is split into smaller sets of points."""
    per_image = model.likelihood.params_per_pixel * math.prod(model.image_shape)
    # The decoder runs once per sample; a model without a ``decoder`` (the ResNet VAE) is read whole.
    # Other convolutions (the encoder's, a PixelCNN term's that reads the images alone) run once per point.
    per_sample = getattr(model, "decoder", model)
    conv = any(isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) for m in per_sample.modules())
    per_image *= 64 if conv else 1
    rows = max(1, min(MAX_ROWS, budget // per_image))
    points = min(batch_size, rows)
    return points, max(1, min(samples, rows // points))


def _batch_generator(seed: int | None, index: int, device: torch.device) -> torch.Generator | None:
    """Batch ``index``'s own generator, so results do not depend on how batches are spread over workers."""
    return None if seed is None else torch.Generator(device).manual_seed(seed * 1_000_003 + index)


@torch.no_grad()
def evaluate(
    model: LatentVariableModel,
    data: torch.Tensor,
    *,
    batch_size: int = 100,
    samples: int = 0,
    chunk_size: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "eval",
    seed: int | None = None,
    context: Context = Context(),
    precision: str = "fp32",
    compile: bool = False,
) -> dict[str, Any]:
    """The one evaluation of a model on ``data`` (N, C, H, W), used by training, ``flowvae evaluate``
    and the benchmarks alike.

    Means over the data of -ELBO, its reconstruction and KL parts (one posterior sample each), the
    KL of each of the model's groups (``kl_groups``, Monte Carlo), and with ``samples`` = K > 0 the
    importance-weighted -log p(x) (``nll``) with its Monte Carlo standard error (``nll_mc_se``:
    √(Σ_i se_i²) / N from each image's delta-method error, see
    :class:`~flowvae.objectives.ImportanceWeightedEstimate`) and the mean effective sample size
    of the importance weights per image (``nll_ess``).  ``neg_elbo_data_se`` and ``nll_data_se``
    are the standard errors of the means over the N images (std / √N): how much the figure would
    move on another test set of the same size.  For 8-bit data (uint8) also bits/dim of both, after the
    likelihood's dequantization offset.  Sums accumulate in float64.

    With ``seed`` each batch draws its noise from its own generator seeded by (seed, batch index).
    Under DDP (``context``) worker r takes batches r, r + W, … and the sums are all-reduced once.
    ``precision`` runs the networks under autocast; the densities are summed in float32/64.
    ``compile`` scores the importance samples with ``torch.compile(model.log_densities)`` (worth
    its compilation time, about a minute on a CPU, for large K).

    Returns:
        A dict of means over the data in nats: ``neg_elbo``, ``reconstruction``, ``kl``,
        ``kl_groups``, and ``neg_elbo_data_se``; with K > 0 also ``nll``, ``nll_samples``,
        ``nll_mc_se``, ``nll_ess`` and ``nll_data_se``; for 8-bit data the bits/dim.

    Examples:
        >>> import torch
        >>> from flowvae.models import build_vae
        >>> model = build_vae("mlp", (1, 8, 8), latent_dim=2, hidden=16)
        >>> results = evaluate(model, torch.bernoulli(torch.full((20, 1, 8, 8), 0.3)), samples=10, seed=0)
        >>> results["nll"] <= results["neg_elbo"] + 1, results["nll_samples"]
        (True, 10)
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    group_names = model(data[:1].to(device)).group_names  # a one-point probe: every worker knows the groups
    names = ["neg_elbo", "reconstruction", "kl"] + (["nll"] if samples else [])
    # Sums behind the standard errors and the ESS, all-reduced with the means and then dropped.
    auxiliary = ["neg_elbo_squares"] + (["nll_squares", "nll_mc_variance", "nll_ess"] if samples else [])
    totals = torch.zeros(len(names) + len(auxiliary) + len(group_names), dtype=torch.float64, device=device)
    points = batch_size
    if samples:
        points, auto_chunk = auto_chunk_size(model, batch_size, samples, decode_budget(device))
        chunk_size = chunk_size or auto_chunk
    score = torch.compile(model.log_densities) if compile and samples else None
    starts = list(range(0, len(data), batch_size))[context.rank :: context.world_size]
    for start in tqdm(starts, desc=desc, disable=not progress or not context.is_main, leave=False, unit="batch"):
        raise_pending()
        x = data[start : start + batch_size].to(device)
        generator = _batch_generator(seed, start // batch_size, device)
        noise = None if generator is None else draw_noise(model, 1, len(x), generator=generator, device=device)
        with autocast(device, precision):
            ld = model(x, noise=noise)
            neg_elbo = objectives.negative_elbo(ld).double()
            batch = [neg_elbo.sum(), -ld.log_likelihood.double().sum(), ld.kl.double().sum()]
            extra = [neg_elbo.square().sum()]
            if samples:
                iw = objectives.importance_weighted_estimate(model, x, samples, chunk_size, generator, score, points)
                batch.append(iw.nll.sum())
                extra += [iw.nll.square().sum(), iw.mc_se.square().sum(), iw.ess.sum()]
        totals += torch.cat([torch.stack(batch + extra), ld.kl_groups.double().mean(0).sum(0)])
    context.all_reduce_sum(totals)
    model.train(was_training)
    n = len(data)
    values = (totals / n).tolist()
    results: dict[str, Any] = dict(zip(names, values))
    moments = dict(zip(auxiliary, values[len(names) : len(names) + len(auxiliary)]))
    results["neg_elbo_data_se"] = _standard_error(results["neg_elbo"], moments["neg_elbo_squares"], n)
    results["kl_groups"] = dict(zip(group_names, values[len(names) + len(auxiliary) :]))
    if samples:
        results["nll_samples"] = samples
        results["nll_mc_se"] = math.sqrt(moments["nll_mc_variance"] / n)
        results["nll_ess"] = moments["nll_ess"]
        results["nll_data_se"] = _standard_error(results["nll"], moments["nll_squares"], n)
    if not data.is_floating_point():  # 8-bit data: also in bits/dim (-log P of the discrete pixels)
        dim = math.prod(data.shape[1:])
        offset = model.likelihood.discrete_nats_offset(dim)
        results["neg_elbo_bits_per_dim"] = objectives.bits_per_dim(results["neg_elbo"] + offset, dim)
        if samples:
            results["bits_per_dim"] = objectives.bits_per_dim(results["nll"] + offset, dim)
    return results


def _standard_error(mean: float, mean_square: float, n: int) -> float:
    """Standard error of a mean over n data points, from the means of the values and their squares."""
    if n < 2:
        return float("nan")
    return math.sqrt(max(mean_square - mean**2, 0.0) * n / (n - 1) / n)


@torch.no_grad()
def posterior_diagnostics(
    model: LatentVariableModel,
    data: torch.Tensor,
    *,
    batch_size: int = 100,
    samples: int = 16,
    device: torch.device | str = "cpu",
    threshold: float = 0.01,
    seed: int = 0,
) -> dict[str, Any]:
    """Active units (Burda et al. 2016) of each latent variable of the model: unit u is active if
    Var_x(E_q[z_u | x]) > ``threshold``, with E_q estimated from ``samples`` posterior samples
    (flows make q non-Gaussian, hierarchies make it depend on the layers above)."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    means: dict[str, list[torch.Tensor]] = {}
    for index, start in enumerate(range(0, len(data), batch_size)):
        x = data[start : start + batch_size].to(device)
        noise = draw_noise(model, samples, len(x), generator=_batch_generator(seed, index, device), device=device)
        for name, z in model(x, samples, noise).latents.items():
            means.setdefault(name, []).append(z.double().mean(0).flatten(1))
    model.train(was_training)
    active = {name: int((torch.cat(m).var(0) > threshold).sum()) for name, m in means.items()}
    units = {name: int(m[0].shape[1]) for name, m in means.items()}
    return {
        "active_units": sum(active.values()),
        "units": sum(units.values()),
        "active_threshold": threshold,
        "active_units_per_latent": active,
        "units_per_latent": units,
    }
