"""GPU readiness checked on a CPU: every parameter is used (DDP), densities are summed in float32
under bf16 autocast, and no host read or CPU tensor enters a training step on (fake) CUDA."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowvae.evaluation import evaluate
from flowvae.models import ModelConfig, build_model
from flowvae.optimizers import build_optimizer

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

# Every architecture × no flow / a flow with context / a flow without (ResNet flows always read their context).
MODEL_MATRIX = [
    (arch, flow, context)
    for arch, flow, context in itertools.product(
        ("mlp", "conv", "gated", "ladder", "resnet"), ("none", "iaf"), (True, False)
    )
    if not (flow == "none" and not context) and not (arch == "resnet" and not context)
]


def tiny_model(arch: str, flow: str, context: bool) -> torch.nn.Module:
    config = ModelConfig(
        arch=arch,
        latent_dim=2 if arch == "resnet" else 4,
        layers=2,
        hidden=16,
        channels=8,
        feature_dim=16,
        flow=flow,
        flow_steps=1,
        flow_hidden=8,
        flow_context=context,
    )
    return build_model(config, (1, 8, 8), "binary")


@pytest.mark.parametrize("arch,flow,context", MODEL_MATRIX)
def test_every_parameter_gets_a_gradient(arch, flow, context):
    """A parameter outside the graph makes DDP (without find_unused_parameters) fail at its second step."""
    torch.manual_seed(0)
    model = tiny_model(arch, flow, context)
    x = torch.bernoulli(torch.full((3, 1, 8, 8), 0.5))
    (-model(x).log_weight.mean()).backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters outside the graph: {unused}"


def test_ladder_loads_a_checkpoint_with_unused_context_networks():
    """Earlier ladders without a conditioned flow saved context networks that nothing read."""
    torch.manual_seed(0)
    model = tiny_model("ladder", "none", True)
    state = model.state_dict() | {"contexts.0.0.weight": torch.zeros(16, 32), "contexts.0.0.bias": torch.zeros(16)}
    model.load_state_dict(state)
    assert not any(name.startswith("contexts.") for name in model.state_dict())


def test_ddp_matches_one_process_for_every_architecture_and_flow():
    """Two gloo workers take three steps on halves of the batch for each model of the matrix, and end
    with the parameters of one process stepping on the whole batch (the worker script asserts it)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(HERE / "ddp_matrix_worker.py"),
    ]
    env = os.environ | {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("same parameters") == len(MODEL_MATRIX), result.stdout


@pytest.mark.parametrize("extra", [("--flow", "none"), ("--no-flow-context",)], ids=["no-flow", "no-context"])
def test_torchrun_trains_a_ladder_without_flow_context_like_one_worker(tmp_path, extra):
    """flowvae train --arch ladder --flow none under torchrun failed at its second step."""
    from test_distributed import assert_same_params, flowvae_train

    extra = ("--arch", "ladder", "--layers", "2", *extra)
    flowvae_train(tmp_path / "one", epochs=2, workers=1, extra=extra)
    flowvae_train(tmp_path / "two", epochs=2, workers=2, extra=extra)
    assert_same_params(tmp_path / "one", tmp_path / "two")


def test_bf16_importance_weighted_nll_equals_fp32_on_the_same_noise():
    """Σ_pixels x·logit ≈ 800 nats summed in bf16 rounds by 4 nats a sample, and the log-mean-exp over K
    made that noise a 0.5 nats optimistic -log p(x); the likelihood now sums in float32."""
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(arch="mlp", latent_dim=32, hidden=300, flow="iaf", flow_steps=2, flow_hidden=320),
        (1, 28, 28),
        "binary",
    )
    g = torch.Generator().manual_seed(1)
    template = torch.bernoulli(torch.full((784,), 0.13), generator=g)
    with torch.no_grad():  # confident logits, as a trained model's: ±8 towards a template image
        model.decoder.net[-2].bias.copy_(8.0 * (2 * template - 1))
    x = ((template + torch.bernoulli(torch.full((20, 784), 0.02), generator=g)) % 2).view(20, 1, 28, 28)
    nll = {
        precision: evaluate(model, x, batch_size=20, samples=200, chunk_size=100, seed=0, precision=precision)["nll"]
        for precision in ("fp32", "bf16")
    }
    assert nll["bf16"] == pytest.approx(nll["fp32"], abs=0.05)


def test_a_cuda_checkpoint_holds_and_restores_the_device_global_generator(monkeypatch):
    """The Gaussian likelihood's dequantization noise draws from the device's global generator: on CUDA
    its state is saved and set again on resume (torch.cuda stood in for; only a GPU runs the real one)."""
    from flowvae.config import TrainConfig
    from flowvae.training import RunState
    from flowvae.training.checkpoint import device_rng_state, restore_rng

    restored = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.full((16,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.update(state=state, device=device))
    cuda = torch.device("cuda", 0)
    generators = {name: torch.Generator() for name in ("shuffle", "noise", "binarize")}
    saved = {
        "torch": torch.get_rng_state(),
        "noise_device": "cuda",
        **device_rng_state(cuda),
        **{name: g.get_state() for name, g in generators.items()},
    }
    restore_rng(saved, generators, cuda, TrainConfig(), RunState())
    assert torch.equal(restored["state"], torch.full((16,), 7, dtype=torch.uint8)) and restored["device"] == cuda
    assert device_rng_state(torch.device("cpu")) == {}


def _check_shared_out(rank: int, port: int, dirs: list[str], errors) -> None:
    import torch.distributed as dist

    from flowvae import distributed, training

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        training.require_shared_out(Path(dirs[rank]), distributed.Context(rank, 2, rank), torch.device("cpu"))
    except training.RunDirError as error:
        errors.put((rank, str(error)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shared", [True, False])
def test_workers_that_do_not_share_out_stop_before_any_work(tmp_path, shared):
    """Without a shared file system, a run trained to the end and then failed in finish(); every
    worker now checks at the start that it sees what worker 0 wrote in --out."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node0, node1 = tmp_path / "run", tmp_path / "other_node" / "run"  # one path, two "file systems"
    node0.mkdir()
    node1.mkdir(parents=True)
    dirs = [str(node0), str(node0 if shared else node1)]
    errors = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_check_shared_out, args=(port, dirs, errors), nprocs=2, start_method="spawn")
    found = []
    while not errors.empty():
        found.append(errors.get())
    if shared:
        assert found == []
    else:
        assert sorted(rank for rank, _ in found) == [0, 1]
        assert all("1 worker(s) cannot see" in message and "share" in message for _, message in found)
    assert list(node0.iterdir()) == [] and list(node1.iterdir()) == [], "the probe file is removed"


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_masked_adamax_step_is_adamax_when_made_and_a_no_op_when_skipped(weight_decay):
    """Adamax has no fused kernel taking a found_inf flag: the guard weights its update by the decision
    on the device instead of reading it on the host; with decoupled weight decay it is AdamaxW's step."""
    from flowvae.optimizers import AdamaxW, set_weight_decay
    from flowvae.training.gradient_guard import masked_adamax_step

    torch.manual_seed(0)
    ours, reference = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    reference.load_state_dict(ours.state_dict())
    opt = AdamaxW(ours.parameters(), lr=0.01, foreach=True)
    ref_opt = AdamaxW(reference.parameters(), lr=0.01, foreach=True)
    for optimizer in (opt, ref_opt):
        set_weight_decay(optimizer, weight_decay)
    for made in (False, True, True, False, True):  # a skipped first step too: t = 0, u = 0
        grads = [torch.randn_like(p) for p in ours.parameters()]
        before = {k: v.clone() for k, v in ours.state_dict().items()}
        state_before = [{k: v.clone() for k, v in opt.state[p].items()} for p in ours.parameters()]
        for p, g in zip(ours.parameters(), grads):
            p.grad = g.clone() if made else torch.full_like(g, float("nan"))
        masked_adamax_step(opt, torch.tensor(made))
        if made:
            for p, g in zip(reference.parameters(), grads):
                p.grad = g
            ref_opt.step()
            for p, q in zip(ours.parameters(), reference.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
                for key in ("exp_avg", "exp_inf", "step"):
                    torch.testing.assert_close(opt.state[p][key], ref_opt.state[q][key], rtol=1e-6, atol=1e-9)
        else:
            assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
            after = [dict(opt.state[p]) for p in ours.parameters()]
            assert all(torch.equal(a[k], b[k]) for a, b in zip(after, state_before) for k in b)
    assert int(opt.state[next(ours.parameters())]["step"]) == 3


# ------------------------------------------------------------------------- host reads and fake CUDA

CONFIGS = HERE.parent / "configs"
GPU_PRESETS = ("mnist_resnet_iaf_gpu", "cifar10_resnet_iaf", "mnist_ladder_cpu")


def preset_config(name: str, out: Path, **overrides):
    """The preset's optimizer, EMA, free bits, precision and architecture, at digits size on the CPU."""
    import yaml

    from flowvae.config import TrainConfig

    d = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    model = d.pop("model")
    model.pop("likelihood", None)  # digits are binary
    model |= dict(
        layers=2,
        channels=8,
        latent_dim=2 if model["arch"] == "resnet" else 4,
        hidden=16,
        flow_hidden=8,
        prior_flow_steps=1,
    )
    d |= dict(
        dataset="digits",
        device="cpu",
        compile=False,
        progress=False,
        epochs=1,
        max_minutes=0,
        threads=1,
        eval_samples=0,
        out=str(out),
        model=model,
    )
    return TrainConfig.from_dict(d | overrides)


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the reads of a tensor's value on the host (.item(), bool(), int(), float(): one op each)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_a_training_epoch_of_each_preset_reads_the_device_only_at_its_end(tmp_path, preset, monkeypatch):
    """Adamax's step, the EMA's counter and free bits each cost a pipeline drain per step; now an epoch
    reads 4 values on the host whatever its length: the guard's 3 counters and the summed loss."""
    from flowvae import distributed, training

    reads = []
    for batch_size in (100, 50):  # 13 and 26 steps
        config = preset_config(preset, tmp_path / str(batch_size), batch_size=batch_size)
        run = training.start_run(config, False, distributed.Context(), torch.device("cpu"))
        with monkeypatch.context() as patch, HostReads() as counter:
            patch.setattr(torch.Tensor, "tolist", lambda t: pytest.fail("tolist() in a training epoch"))
            training.train_epoch(run)
        reads.append(counter.count)
    assert reads == [4, 4]


def fake_cuda_mode():
    """A FakeTensorMode in which tensors can live on 'cuda' without a GPU, or a skip saying why not."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    try:
        with mode:
            (torch.zeros(2, device="cuda") * 2).sum()
    except Exception as error:  # noqa: BLE001 - any failure means no fake CUDA on this build
        pytest.skip(f"this torch build makes no fake CUDA tensors ({type(error).__name__}: {error})")
    return mode


def to_fake_cuda(module: torch.nn.Module) -> None:
    """``module.to('cuda')`` inside the fake mode: every parameter and buffer replaced by a fake CUDA
    tensor of its shape (on a CPU-only build ``.to`` itself fails: it copies through a device guard)."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device="cuda"), p.requires_grad
                )
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device="cuda")


def test_the_fake_cuda_harness_catches_host_reads_and_cpu_tensors():
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorDeviceMismatchError

    with fake_cuda_mode():
        x = torch.randn(3, 4, device="cuda")
        for read in (lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: x.tolist()):
            with pytest.raises(DataDependentOutputException):
                read()
        with pytest.raises(FakeTensorDeviceMismatchError):
            x + torch.ones(4)


# (arch, flow, prior, optimizer): every model family.  Not here: Householder and Householder-Sylvester
# flows and MAF, whose Python indexing (v[..., k, :]) fake CUDA tensors refuse on a CPU-only build.
FAKE_CUDA_MODELS = [
    ("mlp", "iaf", "standard", "adam"),
    ("mlp", "sylvester-orthogonal", "standard", "adam"),
    ("mlp", "sylvester-triangular", "standard", "adam"),
    ("mlp", "coupling", "standard", "adamax"),
    ("mlp", "planar", "vamp", "adam"),
    ("mlp", "radial", "flow", "adam"),
    ("conv", "iaf", "standard", "adam"),
    ("gated", "planar", "flow", "adamax"),
    ("ladder", "none", "flow", "adam"),
    ("ladder", "iaf", "vamp", "adamax"),
    ("ladder", "sylvester-orthogonal", "standard", "adam"),
    ("resnet", "none", "standard", "adam"),
    ("resnet", "iaf", "standard", "adamax"),
    ("resnet", "glow", "flow", "adamax"),
    ("resnet", "coupling", "standard", "adam"),
]


@pytest.mark.parametrize("arch,flow,prior,optimizer", FAKE_CUDA_MODELS)
def test_the_pieces_of_a_training_step_and_of_the_iw_evaluation_stay_on_cuda(tmp_path, arch, flow, prior, optimizer):
    """On fake CUDA: build → to cuda → optimizer, EMA and gradient guard → noise → training-mode forward
    → training_loss with free bits → importance_weighted_nll with an explicit chunk size.  A CPU tensor
    entering (beyond 0-dim ones) or a host read raises.  This torch build's fake CUDA tensors cannot run
    autograd, copy_ or Python indexing: backward and the guard's update are covered on the CPU by the
    host-read count above; CUDA generators, autocast and mem_get_info need a real GPU."""
    from flowvae.models import build_model, draw_noise
    from flowvae.objectives import importance_weighted_nll, training_loss
    from flowvae.training.gradient_guard import GradientGuard
    from flowvae.training.setup import build_ema

    config = preset_config("mnist_resnet_iaf_gpu", tmp_path, optimizer=optimizer)
    config.model = ModelConfig(
        arch=arch,
        flow=flow,
        prior=prior,
        latent_dim=2 if arch == "resnet" else 4,
        layers=2,
        hidden=16,
        channels=8,
        feature_dim=16,
        flow_steps=1,
        flow_hidden=8,
        pseudo_inputs=5,
        prior_flow_steps=1,
    )
    torch.manual_seed(0)
    model = build_model(config.model, (1, 8, 8), "binary")
    with torch.no_grad():  # as the trainer does; ActNorm then knows it is initialised
        model.initialise(torch.bernoulli(torch.full((6, 1, 8, 8), 0.5)))
    with fake_cuda_mode():
        to_fake_cuda(model)
        cuda = torch.device("cuda", 0)
        ema = build_ema(config, model)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        guard = GradientGuard(
            model,
            build_optimizer(config, model, cuda),
            scaler,
            max_norm=0,
            skip_factor=50,
            device=cuda,
            ema=ema,
            ema_decay=config.ema,
        )
        assert guard.fused == (optimizer == "adam") and guard.masked_adamax == (optimizer == "adamax")
        assert ema.n_averaged.device == cuda
        x = torch.bernoulli(torch.full((6, 1, 8, 8), 0.5, device="cuda"))
        model.train()
        with torch.no_grad():
            loss = training_loss(model(x, noise=draw_noise(model, 1, 6)), 0.5, config.free_bits, normalizer=6.0)
        model.eval()
        nll = importance_weighted_nll(model, x, samples=4, chunk_size=2)
    assert loss.device == nll.device == cuda and loss.shape == () and nll.shape == (6,)


def test_the_ladder_keeps_its_noise_in_float32_under_bf16_autocast():
    """The noise was cast to the 16-bit dtype of the bottom-up features, rounding z before any density."""
    torch.manual_seed(0)
    model = tiny_model("ladder", "none", True)
    x = torch.bernoulli(torch.full((3, 1, 8, 8), 0.5))
    noise = {name: torch.randn(1, 3, *shape) for name, shape in model.noise_shapes().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latents = model(x, noise=noise).latents
    assert {z.dtype for z in latents.values()} == {torch.float32}


@pytest.mark.parametrize("deterministic", [False, True])
def test_cudnn_autotunes_the_bf16_presets_unless_deterministic(tmp_path, deterministic, monkeypatch):
    """cudnn.benchmark was tied to --tf32, so the bf16 ResNet presets ran without autotuning."""
    from flowvae import training

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what --deterministic sets, undone after

    saved = (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
    )
    try:
        config = preset_config("mnist_resnet_iaf_gpu", tmp_path, deterministic=deterministic, threads=0)
        training.configure_backends(config, torch.device("cuda"))  # switches only: no GPU needed
        assert torch.backends.cudnn.benchmark is not deterministic
        assert not torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
        torch.use_deterministic_algorithms(saved[3])
        torch.backends.cudnn.deterministic = saved[4]


def test_maf_reads_its_autoregressive_order_on_the_host_once_not_every_pass(monkeypatch):
    """MAF as a posterior runs its sequential direction every step; its order is read when built or loaded."""
    from flowvae.flows import build_flow

    torch.manual_seed(0)
    maf = build_flow("maf", 4, 2, 8, 16)
    other = build_flow("maf", 4, 2, 8, 16)
    z, h = torch.randn(5, 4), torch.randn(5, 8)
    expected = maf(z, h)
    other.load_state_dict(maf.state_dict())
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: pytest.fail("tolist() in a MAF pass"))
    for flow in (maf, other):
        got = flow(z, h)
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
