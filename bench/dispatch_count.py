"""Host work of one training step: the aten operations dispatched per micro-step, by phase, source and lever.

The H200 profile found the GPU idle for much of a 7B LoRA step: the host could not issue kernels fast enough.
Every dispatched operation costs the host the same few microseconds whatever the tensor sizes, so the count
of operations per step is a machine-independent measure of that work, and it can be taken on a CPU. This tool
trains the tiny model through the benchmark's own engine (``bench/throughput``: ``apply_training_mode`` +
``build_engine``, DeepSpeed ZeRO, LoRA on every LLM linear, the region encoder and projector trained) and
counts, for one micro-step of each arm, the operations of its forward, backward and optimizer step, and which
library issued them (DeepSpeed's gradient hooks, peft, transformers, this project, or autograd itself).

It does so at two or more LLM depths (``--layers``): the LLM's decoder layers are the same code at any width,
so counts grow by a fixed number per layer, and ``per_layer`` x 32 + ``fixed`` is the count at Vicuna-7B's
depth (``at_7b_depth``; the vision tower has ``--vision-layers``, CLIP ViT-L's 24 by default, and a wider model adds no ops).
It does not time anything: how long one operation takes on the GPU machine's host is for a GPU run to say.
Regional ``torch.compile`` is not countable this way (compiled code dispatches no aten operations one by one),
and the ``varlen`` lever takes its CPU fallback here (each sample through sdpa), not the GPU kernel's path.

    python bench/dispatch_count.py                      # the default arms at 2 and 4 layers
    python bench/dispatch_count.py --zero 1 --arm every=packed+nodrop+channels_last+ds_sync_free
    python bench/dispatch_count.py --grad-accum 4       # per micro-step of a 4-micro-step optimizer step

``--engine torch`` counts, on the same model, batches and levers, a step without DeepSpeed: the trainer's
``train.engine=torch`` (``gpt4roi_sft/train/torch_engine.py``: bf16 module, fp32 master weights, multi-tensor
gradient accumulation and clipping, fused AdamW), what dropping DeepSpeed on one GPU saves.

With ``--grad-accum K`` each arm's counted optimizer step is K micro-steps (the engine built with
``train.gradient_accumulation_steps=K``), and every figure is that step's count / K: the optimizer step's
operations, run once per K micro-batches, spread over them.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable for `bench.*`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger("bench.dispatch_count")

DEFAULT_ARMS = ["packed=packed", "nodrop=packed+nodrop", "every=packed+nodrop+channels_last+ds_sync_free"]
PHASES = ("forward", "backward", "step")
SOURCES = ("deepspeed", "peft", "transformers", "gpt4roi_sft", "torchvision")  # first of these on the stack wins
TARGET_LAYERS = 32  # Vicuna-7B
STACK_DEPTH = 58  # frames searched for a source


class DispatchCounter(TorchDispatchMode):
    """Counts every aten operation dispatched inside the block, by ``(source, op)``.

    ``source`` is the innermost frame of one of :data:`SOURCES` on the Python stack; ``autograd`` when none
    (operations the autograd engine runs for a backward node have no Python caller).
    """

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[(_source(), str(func.overloadpacket))] += 1
        return func(*args, **(kwargs or {}))

    def total(self) -> int:
        return sum(self.counts.values())


def _source() -> str:
    """Walks the raw frames (not ``traceback.extract_stack``, whose line lookups cost ~10x more per operation),
    innermost first, from the caller of ``__torch_dispatch__``, through at most :data:`STACK_DEPTH` frames."""
    frame = sys._getframe(2)  # 0: here, 1: __torch_dispatch__
    for _ in range(STACK_DEPTH):
        if frame is None:
            break
        code = frame.f_code
        if code.co_name == "_engine_run_backward":  # run by the autograd engine, not by a hook it called
            return "autograd"
        for lib in SOURCES:
            if f"/{lib}/" in code.co_filename:
                return lib
        frame = frame.f_back
    return "autograd"


def run_micro_step(engine, batch: dict, device: torch.device, dtype: torch.dtype,
                   counters: Optional[Dict[str, DispatchCounter]] = None) -> None:
    """One micro-step (the trainer's ``micro_step``, phase by phase), each phase under its counter if given."""
    from gpt4roi_sft.data.model_inputs import move_to_device

    def phase(name):
        return counters[name] if counters is not None else contextlib.nullcontext()

    inputs = move_to_device(batch, device, dtype, non_blocking=True)
    with phase("forward"):
        out = engine(**inputs)
    with phase("backward"):
        engine.backward(out.loss)
    with phase("step"):
        engine.step()


def count_step(engine, batch: dict, device: torch.device, dtype: torch.dtype) -> Dict[str, DispatchCounter]:
    """One micro-step under a counter per phase."""
    counters = {phase: DispatchCounter() for phase in PHASES}
    run_micro_step(engine, batch, device, dtype, counters)
    return counters


def count_optimizer_step(engine, micro: List[dict], device: torch.device, dtype: torch.dtype) -> Dict[str, DispatchCounter]:
    """:func:`count_step` of every micro-batch of one optimizer step, the phases' counts summed over them."""
    summed = {phase: DispatchCounter() for phase in PHASES}
    for batch in micro:
        for phase, counter in count_step(engine, batch, device, dtype).items():
            summed[phase].counts.update(counter.counts)
    return summed


def summarize(counters: Dict[str, DispatchCounter], micro_steps: int = 1) -> dict:
    """Counts per micro-step: those of one optimizer step divided by its ``micro_steps`` (so the step phase's
    count is spread over the micro-steps it serves)."""
    by_source: Dict[str, Dict[str, float]] = {}
    top: Dict[str, List[list]] = {}
    for phase, counter in counters.items():
        sources = collections.Counter()
        for (source, _), n in counter.counts.items():
            sources[source] += n
        by_source[phase] = {s: n / micro_steps for s, n in sources.most_common()}
        top[phase] = [[source, op, n / micro_steps] for (source, op), n in counter.counts.most_common(12)]
    return {"total": sum(c.total() for c in counters.values()) / micro_steps,
            "by_phase": {phase: c.total() / micro_steps for phase, c in counters.items()},
            "by_source": by_source, "top_ops": top}


def count_at_depth(layers: int, arm_specs: Sequence[str], zero: str, precision: str, lora_r: int, port: int,
                   ds_overrides: Sequence[str] = (), vision_layers: int = 4, grad_accum: int = 1,
                   engine_kind: str = "deepspeed") -> dict:
    """Counts per micro-step of every arm's optimizer step after the engine's first (which warms caches and builds optimizer
    state), each of ``grad_accum`` micro-steps; ``engine_kind`` "torch" counts the DeepSpeed-free step (``--engine torch``)."""
    from bench import train_throughput as tt
    from bench.throughput.engine import build_model, prepare_engine, tiny_bench_config
    from bench.throughput.levers import LeverSwitch
    from bench.throughput.samples import SamplePool, SampleShape

    argv = ["--tiny", "--zero", zero, "--precision", precision, "--lora-r", str(lora_r), "--steps", "1", "--warmup", "1",
            "--pack-tokens", "1024", "--pack-length", "512", "--port", str(port), "--grad-accum", str(grad_accum),
            "--engine", engine_kind]
    for spec in arm_specs:
        argv += ["--arm", spec]
    for override in ds_overrides:
        argv += ["--ds-override", override]
    args = tt.parse_args(argv)
    if any("compile" in a.levers for a in args.arms):
        raise SystemExit("dispatch_count: compiled code dispatches no aten operations one by one; drop the compile lever")
    device, dtype = torch.device("cpu"), torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    config = tiny_bench_config("sdpa")
    config.text_config.num_hidden_layers = layers
    config.vision_config.num_hidden_layers = vision_layers
    model = build_model(config, device, dtype)
    shape = SampleShape(config.num_image_tokens, config.image_size, config.text_config.vocab_size, config.image_token_id,
                        config.bbox_token_id, min_len=args.min_len, max_len=args.max_len)
    arms = tt.build_arms(args, SamplePool(shape, 0), 2)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_dispatch_") as workdir:
        engine, stage, counts = prepare_engine(model, args, True, Path(workdir))
        switch = LeverSwitch(engine, device)
        engine.train()
        for i, (name, arm) in enumerate(arms.items()):
            switch.set(arm.spec.levers)
            # One uncounted warm-up step per engine (optimizer state, lazy caches): a warm-up per arm as well
            # changed no count (checked on the four levers the tests use), so it is not paid.
            for batch in arm.batches[:grad_accum] if i == 0 else []:
                run_micro_step(engine, batch, device, dtype)
            counted = arm.batches[grad_accum : 2 * grad_accum]
            results[name] = dict(spec=arm.spec.describe(), row_shape=list(counted[0]["input_ids"].shape),
                                 **summarize(count_optimizer_step(engine, counted, device, dtype), grad_accum))
        switch.set(frozenset())
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    return {"layers": layers, "vision_layers": vision_layers, "engine": engine_kind, "zero_stage": stage, "trainable_tensors": trainable,
            "gradient_accumulation_steps": grad_accum, "arms": results}


def per_layer_fit(depths: List[dict]) -> Dict[str, dict]:
    """Per arm and phase: ops added per decoder layer (between the shallowest and deepest run), the rest, and the
    count at Vicuna-7B's depth; ``linear`` says whether every depth in between lies on that line."""
    first, last = depths[0], depths[-1]
    span = last["layers"] - first["layers"]
    fits = {}
    for name in first["arms"]:
        arm = {}
        for phase in (*PHASES, "total"):
            def at(d):
                return d["arms"][name]["total"] if phase == "total" else d["arms"][name]["by_phase"][phase]
            slope = (at(last) - at(first)) / span
            fixed = at(first) - slope * first["layers"]
            arm[phase] = {"per_layer": slope, "fixed": fixed, "at_7b_depth": round(fixed + slope * TARGET_LAYERS),
                          "linear": all(abs(fixed + slope * d["layers"] - at(d)) < 0.5 for d in depths)}
        fits[name] = arm
    return fits


def format_report(result: dict) -> str:
    overrides = "".join(f", {o}" for o in result["ds_overrides"])
    accum = result.get("gradient_accumulation_steps", 1)
    per = "per micro-step" + (f" (an optimizer step of {accum} micro-steps / {accum})" if accum > 1 else "")
    engine = (f"ZeRO-{result['zero_stage']}" if result.get("engine", "deepspeed") == "deepspeed"
              else "no DeepSpeed (train.engine=torch)")
    lines = [f"dispatched aten ops {per} (tiny model, {result['vision_layers']} vision layers, CPU, {engine}{overrides}, "
             f"{result['precision']}; LLM depths {', '.join(str(d['layers']) for d in result['depths'])})",
             f"{'arm':<10} {'spec':<50} {'per layer':>9} {'fixed':>7} {'at 32 layers':>12}   forward/backward/step per layer"]
    for name, fit in result["per_layer"].items():
        spec = result["depths"][0]["arms"][name]["spec"]
        t = fit["total"]
        phases = "/".join(f"{fit[p]['per_layer']:.0f}" for p in PHASES)
        lines.append(f"{name:<10} {spec:<50} {t['per_layer']:>9.0f} {t['fixed']:>7.0f} {t['at_7b_depth']:>12}   {phases}")
    deepest = result["depths"][-1]
    lines.append(f"by source at {deepest['layers']} layers ({deepest['trainable_tensors']} trainable tensors):")
    for name, arm in deepest["arms"].items():
        parts = "; ".join(f"{p}: " + ", ".join(f"{s} {n:g}" for s, n in arm["by_source"][p].items()) for p in PHASES)
        lines.append(f"  {name}: {parts}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arm", action="append", default=None, metavar="NAME=COLLATE[+LEVER...]",
                   help=f"arms as bench/train_throughput.py takes them (default: {' '.join(DEFAULT_ARMS)})")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="LLM depths to count at (at least two)")
    p.add_argument("--vision-layers", type=int, default=24, help="layers of the (frozen) vision tower (24: CLIP ViT-L/14)")
    p.add_argument("--zero", choices=("1", "2", "3"), default="2")
    p.add_argument("--engine", choices=("deepspeed", "torch"), default="deepspeed",
                   help="the trainer's train.engine: deepspeed (build_engine) or torch (build_torch_engine, "
                        "gpt4roi_sft/train/torch_engine.py)")
    p.add_argument("--ds-override", action="append", default=[], metavar="KEY=VALUE",
                   help="DeepSpeed config override, as deepspeed.overrides takes it (e.g. zero_optimization.overlap_comm=false)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-steps per optimizer step (train.gradient_accumulation_steps): counts are per micro-step, "
                        "the optimizer step's spread over them")
    p.add_argument("--port", type=int, default=None, help="MASTER_PORT of the one-process group (default: $MASTER_PORT or a free port)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: print only)")
    args = p.parse_args(argv)
    layers = sorted(set(args.layers))
    if len(layers) < 2 or layers[0] < 1:
        p.error("--layers needs at least two distinct depths >= 1")
    if args.grad_accum < 1:
        p.error("--grad-accum must be >= 1")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from gpt4roi_sft.train.distributed import one_process_port

    port = args.port or int(one_process_port())
    from bench.throughput.engine import init_single_process_group

    init_single_process_group(True, port)
    arms = args.arm or DEFAULT_ARMS
    depths = [count_at_depth(n, arms, args.zero, args.precision, args.lora_r, port, args.ds_override, args.vision_layers,
                             args.grad_accum, args.engine) for n in layers]
    from bench.throughput.device import device_name

    result = {"tool": "bench/dispatch_count.py", "machine": device_name(torch.device("cpu")),
              "torch": torch.__version__, "deepspeed": _version("deepspeed"), "transformers": _version("transformers"),
              "peft": _version("peft"), "engine": args.engine, "zero_stage": depths[0]["zero_stage"], "ds_overrides": args.ds_override,
              "precision": args.precision, "gradient_accumulation_steps": args.grad_accum,
              "lora_r": args.lora_r, "vision_layers": args.vision_layers, "depths": depths, "per_layer": per_layer_fit(depths)}
    if args.out:
        from gpt4roi_sft.atomic import write_json_atomic

        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, result, indent=1)
    print(format_report(result))
    return 0


def _version(module: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    raise SystemExit(main())
