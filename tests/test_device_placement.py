"""Every tensor the training loop hands to a collective lives on the device the loop trains on.

Under NCCL a collective refuses tensors that are not on the rank's CUDA device; gloo, which the CPU suite runs,
accepts anything. To see that class of bug on a CPU, the loop runs here as it would on a GPU, where a tensor made
without ``device=`` lands somewhere other than the training device: the loop's own modules get a ``torch`` whose
factory functions put device-less tensors on ``meta``, and every ``torch.distributed`` collective refuses a tensor
that is not on the loop's device.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO, free_port

STRICT_RUN = textwrap.dedent(
    """
    import sys, types
    import torch
    import torch.distributed as dist

    LOOP_DEVICE = torch.device("cpu")
    FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "as_tensor", "scalar_tensor", "randn", "rand")

    class ForeignDefaultDeviceTorch(types.ModuleType):
        # torch, except that factories called without device= build on 'meta' (GPU: the CPU, not the GPU)
        def __getattr__(self, name):
            attr = getattr(torch, name)
            if name not in FACTORIES:
                return attr
            def factory(*args, **kwargs):
                if kwargs.get("device") is None and not (args and isinstance(args[0], torch.Tensor)):
                    kwargs["device"] = "meta"
                return attr(*args, **kwargs)
            return factory

    def strict(collective):
        def run(*args, **kwargs):
            for value in list(args) + list(kwargs.values()):
                tensors = value if isinstance(value, (list, tuple)) else [value]
                for t in tensors:
                    if isinstance(t, torch.Tensor) and t.device != LOOP_DEVICE:
                        raise RuntimeError(f"{collective.__name__} got a tensor on {t.device}; the loop trains on {LOOP_DEVICE}")
            return collective(*args, **kwargs)
        return run

    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter",
                 "reduce_scatter_tensor", "gather", "scatter"):
        setattr(dist, name, strict(getattr(dist, name)))

    import importlib, pkgutil
    import gpt4roi_sft.train as train_pkg
    proxy = ForeignDefaultDeviceTorch("torch")
    patched = []
    for info in pkgutil.iter_modules(train_pkg.__path__):
        if info.name in ("loop", "checkpoint", "distributed"):
            module = importlib.import_module(f"gpt4roi_sft.train.{info.name}")
            module.torch = proxy
            patched.append(info.name)
    assert "loop" in patched, patched

    import train_sft
    sys.exit(train_sft.main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_training_loop_hands_collectives_only_tensors_on_its_training_device(tiny_model_dir, synthetic_pix2cap, tmp_path):
    out = tmp_path / "run"
    args = [
        "--config", str(REPO / "configs" / "quickstart.yaml"),
        f"model.path={tiny_model_dir}", f"data.train={synthetic_pix2cap['train']}",
        f"data.image_root={synthetic_pix2cap['root']}", f"train.output_dir={out}", "train.max_steps=3",
        "train.save_steps=2", "train.micro_batch_size=2", "train.gradient_accumulation_steps=2",
        "data.validate_on_start=false", "train.precision=fp32", "lora.enabled=true", "lora.r=4", "lora.alpha=8",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "GPT4ROI_MASTER_PORT": str(free_port())}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-c", STRICT_RUN, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (out / "checkpoints" / "step_3" / "COMPLETE").is_file()
    # CPU runs carry no notice about missing CUDA or bitsandbytes' CPU 4-bit kernels: nothing here uses them.
    assert "No CUDA runtime is found" not in proc.stderr and "gemm_4bit_forward" not in proc.stderr
    # Resuming (a broadcast at start-up, RNG state restored) passes the same guard.
    args[args.index("train.max_steps=3")] = "train.max_steps=4"
    env["GPT4ROI_MASTER_PORT"] = str(free_port())
    proc = subprocess.run([sys.executable, "-c", STRICT_RUN, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (out / "checkpoints" / "step_4" / "COMPLETE").is_file()


def test_collectives_build_their_tensors_on_the_declared_device(monkeypatch):
    from gpt4roi_sft.train import distributed

    seen = []
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t, op=None: seen.append(t))
    comm = distributed.Collectives("meta")
    total = comm.sum([1.5, 3, torch.tensor(2.0)])
    assert total.device == torch.device("meta") and total.dtype == torch.float64 and total.shape == (3,)
    assert seen and seen[0] is total


def test_a_one_process_group_takes_the_port_it_is_given_or_a_free_one():
    import socket

    from gpt4roi_sft.train.distributed import one_process_port

    assert one_process_port({"MASTER_PORT": "29611", "GPT4ROI_MASTER_PORT": "29612"}) == "29611"
    assert one_process_port({"GPT4ROI_MASTER_PORT": "29612"}) == "29612"
    with socket.socket() as held:  # another run holds a port: the one chosen is another, and binds
        held.bind(("127.0.0.1", 0))
        held.listen()
        chosen = int(one_process_port({}))
        assert chosen != held.getsockname()[1]
        with socket.socket() as s:
            s.bind(("127.0.0.1", chosen))


def test_training_device_names_the_local_rank():
    from gpt4roi_sft.train.distributed import training_device

    assert training_device("cpu", 3) == torch.device("cpu")
    assert training_device("cuda", 3) == torch.device("cuda", 3)


def test_rng_state_round_trip_restores_the_generators(tmp_path):
    import random

    import numpy as np

    from gpt4roi_sft.train import checkpoint as ckpt

    ckpt.save_rng_state(tmp_path, rank=1)
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    ckpt.load_rng_state(tmp_path, rank=1)
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_state_is_saved_per_device_and_restored(tmp_path):
    from gpt4roi_sft.train import checkpoint as ckpt

    device = torch.device("cuda", torch.cuda.current_device())
    ckpt.save_rng_state(tmp_path, rank=0, device=device)
    expected = torch.rand(4, device=device)
    torch.rand(100, device=device)
    ckpt.load_rng_state(tmp_path, rank=0, device=device)
    assert torch.equal(torch.rand(4, device=device), expected)
