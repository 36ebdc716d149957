"""The training loop, top to bottom: set up the engine, resume if a checkpoint exists, step, log, save.

One call of :func:`train` per process (the ``deepspeed`` / ``torchrun`` launcher starts one per device;
on CPU, one per ``--num_gpus``/``--nproc_per_node`` over gloo). The engine is DeepSpeed's, or with
``train.engine: torch`` (one process) :class:`~gpt4roi_sft.train.torch_engine.TorchEngine`: the same methods.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from gpt4roi_sft.config import Config, apply_deepspeed_overrides, load_deepspeed_json, zero_stage
from gpt4roi_sft.constants import IGNORE_INDEX
from gpt4roi_sft.data.model_inputs import move_to_device
from gpt4roi_sft.errors import UserError
from gpt4roi_sft.model.modeling import check_multimodal_counts
from gpt4roi_sft.train import checkpoint as ckpt
from gpt4roi_sft.train.deepspeed_config import fill_auto_values
from gpt4roi_sft.train.data_stream import DataPosition
from gpt4roi_sft.train.distributed import Collectives, start_process_group, training_device
from gpt4roi_sft.train.speedups import apply_speedups
from gpt4roi_sft.train.modes import (
    apply_training_mode,
    enable_activation_checkpointing,
    load_model_from_config,
    model_dtype,
    trainable_parameter_count,
    unwrap_base_model,
)

log = logging.getLogger(__name__)

class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda_for(cfg: Config, total_steps: int):
    """Warm-up then cosine / linear decay to 0, or constant; a function of the optimizer step."""
    warmup = cfg.train.warmup_steps or int(round(cfg.train.warmup_ratio * total_steps))
    kind = cfg.train.lr_scheduler

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_engine(model, cfg: Config, world_size: int, hidden_size: int, total_steps: int, on_cpu: bool,
                 load_universal: bool = False):
    """``deepspeed.initialize`` with the recipe's DeepSpeed JSON (``"auto"`` filled, then ``deepspeed.overrides``
    set), AdamW and the LR schedule.

    A DeepSpeed JSON without an ``optimizer`` section gets a client ``torch.optim.AdamW`` (fused on GPU), which
    needs no compiled extension; one with it (e.g. zero3_offload: DeepSpeed's CPU Adam) is left to DeepSpeed.
    ``load_universal``: the engine will load a universal checkpoint (a resume on another number of processes).
    Returns ``(engine, lr_scheduler, zero_stage)``.
    """
    import deepspeed

    ds_config = fill_auto_values(load_deepspeed_json(cfg.deepspeed.config), cfg, world_size, hidden_size)
    apply_deepspeed_overrides(ds_config, cfg.deepspeed.overrides)
    if load_universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay, fused=not on_cpu)
        ds_config.setdefault("zero_allow_untested_optimizer", True)

    def scheduler_factory(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda_for(cfg, total_steps))

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler_factory, config=ds_config
    )
    return engine, scheduler, zero_stage(ds_config)


def build_torch_engine(model, cfg: Config, total_steps: int, device: torch.device):
    """:class:`TorchEngine` with the recipe's AdamW, clipping and LR schedule: what :func:`build_engine` returns,
    without DeepSpeed (ZeRO stage 0: every process holds everything, and there is one)."""
    from gpt4roi_sft.train.torch_engine import TorchEngine

    engine = TorchEngine(model, dtype=model_dtype(cfg.train.precision), device=device, lr=cfg.train.learning_rate,
                         weight_decay=cfg.train.weight_decay, max_grad_norm=cfg.train.max_grad_norm,
                         grad_accum=cfg.train.gradient_accumulation_steps, lr_lambda=lr_lambda_for(cfg, total_steps))
    return engine, engine.lr_scheduler, 0


def require_one_process_for_torch_engine(cfg: Config, world_size: int) -> None:
    if cfg.train.engine == "torch" and world_size > 1:
        raise UserError(f"train.engine=torch trains on one process, this launch has {world_size}; use "
                        "train.engine=deepspeed for several GPUs")


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def last_logged(out_dir: Path, step: int) -> Dict[str, Any]:
    """The last ``train_log.jsonl`` record at or before ``step`` (``{}`` when there is none)."""
    from gpt4roi_sft.train.metrics_log import read_log

    try:
        records = [r for r in read_log(out_dir) if r.get("step", 0) <= step]
    except ValueError:  # a torn last line from a crash
        return {}
    return records[-1] if records else {}


def warn_if_global_batch_changes(cfg: Config, resume_dir: Path, old_world: int, world: int, is_rank0: bool) -> None:
    """A resume on another number of processes keeps the recipe's per-process sizes; say if the global batch moves."""
    if old_world == world or not is_rank0:
        return
    saved = ckpt.saved_config(resume_dir)
    before = saved.train.micro_batch_size * saved.train.gradient_accumulation_steps * old_world
    now = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * world
    if before != now:
        log.warning("global batch changes from %d to %d samples per step (micro_batch_size x processes x "
                    "gradient_accumulation_steps); set train.gradient_accumulation_steps to keep it", before, now)


def load_resume_checkpoint(engine, root: Path, resume_dir: Path, regrid: bool, comm: Collectives) -> None:
    """``engine.load_checkpoint`` of ``resume_dir``; through a universal checkpoint when the world size changed.

    A checkpoint DeepSpeed cannot load is a one-line :class:`UserError` on every rank.
    """
    tag = resume_dir.name
    error = None
    if regrid:
        universal = ckpt.universal_dir(root, resume_dir)
        if comm.rank == 0:
            try:
                ckpt.convert_to_universal(resume_dir, universal)
            except UserError as exc:
                error = str(exc)
        error = comm.broadcast_object(error if comm.rank == 0 else None)
        if error:
            raise UserError(error)
        tag = universal.name
    try:
        engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    except Exception as exc:  # DeepSpeed raises its own exception types, assertions and RuntimeErrors alike
        reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {first_line(exc)}"
        error = f"{resume_dir}: the engine cannot resume from it ({reason})"
    finally:
        if regrid:
            comm.barrier()
            if comm.rank == 0:
                ckpt.remove_universal(root, resume_dir)
    # Rank 0's error on every rank, so all ranks stop together instead of hanging.
    error = comm.broadcast_object(error if comm.rank == 0 else None) or error
    if error:
        raise UserError(error)


def trained_token_count(batch: Dict[str, Any]) -> int:
    """Next-token targets of a host batch: labels after the first column that are not ``IGNORE_INDEX``."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def micro_step(engine, batch: Dict[str, Any], device: torch.device, dtype: torch.dtype,
               num_items_in_batch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Forward, backward and (at accumulation boundaries) optimizer step of one micro-batch; returns the loss.

    The batch travels in non-blocking copies and the loss stays on the device: nothing here waits for the GPU.
    ``num_items_in_batch`` (a device scalar) replaces the micro-batch's own count of trained tokens as the loss
    denominator (see :func:`loss_denominator`).
    """
    inputs = move_to_device(batch, device, dtype, non_blocking=True)
    if num_items_in_batch is not None:
        inputs["num_items_in_batch"] = num_items_in_batch
    out = engine(**inputs)
    engine.backward(out.loss)
    engine.step()
    return out.loss.detach()


def optimizer_step(engine, micro: List[Dict[str, Any]], comm: Collectives, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """The micro-steps of one optimizer step (``len(micro)`` = the engine's gradient accumulation steps).

    Returns the step's loss, the mean over every trained token of ``micro`` on this rank x world (a float64
    device tensor, never read here). The loop and the throughput benchmark time exactly this.
    """
    gas = len(micro)
    denominator = loss_denominator(comm, micro, gas)
    step_loss = torch.zeros((), dtype=torch.float64, device=device)
    for batch in micro:
        step_loss += micro_step(engine, batch, device, dtype, num_items_in_batch=denominator).double()
    # Each micro-batch loss is its token-loss sum x gas x world / N: the step's loss is their sum / (gas x world).
    return step_loss / gas


def loss_denominator(comm: Collectives, window: List[Dict[str, Any]], gas: int) -> torch.Tensor:
    """The ``num_items_in_batch`` that makes one optimizer step the mean over every trained token of its window.

    DeepSpeed divides each micro-batch loss by ``gas`` and averages gradients over ranks, so a micro-batch's
    summed token losses divided by ``N / (gas * world)`` (``N`` = trained tokens of all micro-batches of the step
    on all ranks) yield the gradient of (sum of all token losses) / ``N``, however the tokens are spread over
    micro-batches. ``N`` is summed on the device from the host batches' counts (no host sync).
    """
    (labelled,) = comm.sum([sum(trained_token_count(b) for b in window)])
    return labelled / (gas * comm.world_size)


class LogWindow:
    """What the loop accumulates between two log steps, on the device; read (one sync) at log and save steps."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset(0)

    def reset(self, step: int) -> None:
        self.first_step = step + 1
        self.checked = step  # the last step known to have a finite loss
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)  # sum over steps of each step's loss x world
        self.tokens = 0
        self.steps = 0
        self.started = time.perf_counter()
        self.grad_norm = None

    def add(self, step_loss: torch.Tensor, tokens: int, grad_norm) -> None:
        self.loss += step_loss
        self.tokens += tokens
        self.steps += 1
        self.grad_norm = grad_norm


def resume_position(stream, saved: Dict[str, Any], resume_dir: Path, rank: int, consumed: int) -> Optional[dict]:
    """Where ``stream`` continues after ``resume_dir``: the saved global position (or, from a checkpoint of an
    older version, the one its count of consumed micro-batches implies), or this rank's own position."""
    if stream.global_position:
        if "data_position" in saved:
            return saved["data_position"]
        return stream.advance(DataPosition(), consumed).to_dict()
    position = ckpt.load_data_position(resume_dir, rank)
    if position is None and consumed:
        raise UserError(f"{resume_dir}: a data.pack_tokens run needs this rank's data position "
                        f"(data_position_rank{rank}.json); resume it on the number of processes that saved it")
    return position


def train(cfg: Config, local_rank: int = 0) -> Dict[str, Any]:
    """Run (or resume) the training described by ``cfg``; returns a summary dict on every rank."""
    from deepspeed.accelerator import get_accelerator

    from gpt4roi_sft.train.data_stream import build_stream
    from gpt4roi_sft.train.metrics_log import MetricsLog, plot_loss

    require_one_process_for_torch_engine(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before any process waits
    accel = get_accelerator()
    on_cpu = accel.device_name() == "cpu"
    device = training_device(accel.device_name(), local_rank)
    if not on_cpu:
        accel.set_device(local_rank)
    comm = start_process_group(device, "gloo" if on_cpu else accel.communication_backend_name())
    rank, world = comm.rank, comm.world_size
    is_rank0 = rank == 0
    out_dir = Path(cfg.train.output_dir)
    root = ckpt.checkpoints_root(out_dir)
    # Nothing is written before every start-up check has passed: a refused run leaves the output dir as it was.
    resume_dir = ckpt.find_latest(out_dir)
    saved: Dict[str, Any] = {}
    if resume_dir is not None:
        saved = ckpt.read_client_state(resume_dir)
        ckpt.check_resumable(resume_dir, cfg)
        done_at = ckpt.completed_step(resume_dir, saved, cfg)
        if done_at is not None:
            last = last_logged(out_dir, done_at)
            if is_rank0:
                log.info("%s is already complete at step %d; nothing to train", out_dir, done_at)
            return {"step": done_at, "loss": last.get("loss"), "output_dir": str(out_dir), "already_complete": True}
        if int(saved["world_size"]) != world:
            if cfg.data.pack_tokens > 0:
                raise UserError(f"{resume_dir}: a data.pack_tokens run keeps one data position per process; resume "
                                f"it on the {saved['world_size']} processes that saved it (now {world})")
            if "data_position" not in saved:
                raise UserError(f"{resume_dir}: saved on {saved['world_size']} processes by an older version that did "
                                f"not record a global data position; resume it on {saved['world_size']} processes")
        warn_if_global_batch_changes(cfg, resume_dir, int(saved["world_size"]), world, is_rank0)
    seed_everything(cfg.train.seed)

    dtype = model_dtype(cfg.train.precision)
    try:
        model, processor = load_model_from_config(cfg, dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"model.path {cfg.model.path}: cannot load the model ({type(exc).__name__}: "
                        f"{first_line(exc)})") from None
    if cfg.lora.qlora:
        from gpt4roi_sft.train.qlora import quantize_language_model_4bit

        model = quantize_language_model_4bit(model, dtype, device)
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(model, cfg.model.checkpoint_every)
    model = apply_training_mode(model, cfg)
    apply_speedups(model, cfg, device)
    counts = trainable_parameter_count(model)
    if is_rank0:
        log.info("parameters: %d total, %d trainable (%.2f%%)", counts["total"], counts["trainable"], 100 * counts["trainable"] / max(1, counts["total"]))

    base = unwrap_base_model(model)
    stream = None
    error = None
    order_world = int(saved.get("data_order_world_size", saved.get("world_size", world)))
    try:
        stream = build_stream(cfg, processor, base.config.image_token_id, rank, world, order_world)
    except UserError as exc:
        error = str(exc)
    # Rank 0's start-up error on every rank, so all ranks stop together instead of hanging.
    error = comm.broadcast_object(error if is_rank0 else None) or error
    if error:
        raise UserError(error)

    gas = cfg.train.gradient_accumulation_steps
    total_steps = cfg.train.max_steps
    if total_steps < 1:
        total_steps = max(1, math.ceil(cfg.train.num_epochs * stream.micro_batches_per_epoch / gas))
    regrid = resume_dir is not None and int(saved["world_size"]) != world
    if cfg.train.engine == "torch":
        engine, scheduler, stage = build_torch_engine(model, cfg, total_steps, device)
    else:
        try:
            engine, scheduler, stage = build_engine(model, cfg, world, base.config.text_config.hidden_size,
                                                    total_steps, on_cpu, load_universal=regrid)
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            raise UserError(f"deepspeed.config {cfg.deepspeed.config}: DeepSpeed refused it ({type(exc).__name__}: "
                            f"{first_line(exc)})") from None

    start_step, consumed, data_position = 0, 0, None
    if resume_dir is not None:
        load_resume_checkpoint(engine, root, resume_dir, regrid, comm)
        start_step, consumed = int(saved["step"]), int(saved["consumed_micro_batches"])
        data_position = resume_position(stream, saved, resume_dir, rank, consumed)
        ckpt.load_rng_state(resume_dir, rank, device)
        if is_rank0:
            log.info("resumed from %s (step %d%s)", resume_dir, start_step,
                     f", saved on {saved['world_size']} processes, now {world}" if regrid else "")
    if is_rank0:
        root.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.yaml")

    metrics = MetricsLog(out_dir, resume_step=start_step, tensorboard=cfg.train.tensorboard) if is_rank0 else None
    progress = None
    if is_rank0:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def save(step: int) -> None:
        step_dir = root / ckpt.step_tag(step)
        client = {"step": step, "consumed_micro_batches": consumed, "world_size": world, "total_steps": total_steps,
                  "data_order_world_size": order_world}
        if stream.global_position:
            client["data_position"] = stream.position()
        if is_rank0:  # a damaged checkpoint passed over at resume is rewritten: it is not complete until re-marked
            (step_dir / ckpt.COMPLETE_MARKER).unlink(missing_ok=True)
        engine.save_checkpoint(str(root), tag=step_dir.name, client_state=client, save_latest=False)
        trainable = ckpt.gather_trainable_state_dict(engine.module, stage, is_rank0)
        ckpt.save_rng_state(step_dir, rank, device)
        if not stream.global_position:
            ckpt.save_data_position(step_dir, rank, stream.position())
        if is_rank0:
            ckpt.save_trainable(step_dir, trainable)
            ckpt.write_client_state(step_dir, client)
            cfg.save(step_dir / "config.yaml")
        comm.barrier()
        if is_rank0:
            ckpt.mark_complete_and_publish(root, step_dir, cfg.train.save_total_limit)
        comm.barrier()

    batches = stream.iterate_from(data_position)
    base.validate_counts_on_device = False  # checked on the host batches below: no device sync in the forward
    check_counts = functools.partial(check_multimodal_counts, base.config)
    last_loss = last_logged(out_dir, start_step).get("loss", float("nan")) if start_step else float("nan")
    step = start_step
    window = LogWindow(device)
    window.reset(start_step)

    def read_window(step: int, what: str) -> Tuple[float, Optional[float], float]:
        """Reduce the window over ranks and read it (the one host sync of a log or save step); stop on NaN/inf."""
        grad_norm = window.grad_norm
        values = [window.loss, window.tokens] + ([grad_norm] if grad_norm is not None else [])
        totals = comm.sum_to_host(values)
        loss = totals[0] / (world * max(window.steps, 1))
        if not math.isfinite(loss):
            first = window.checked + 1
            span = f"step {step}" if first == step else f"steps {first}-{step}"
            raise NonFiniteLossError(
                f"loss is {loss} at {span} (found {what}); stopping. The last good checkpoint is kept in {root}. "
                "Lower train.learning_rate, use bf16 rather than fp16, or check the data around this step."
            )
        window.checked = step
        return loss, (totals[2] / world if grad_norm is not None else None), totals[1]

    engine.train()
    try:
        for step in range(start_step + 1, total_steps + 1):
            lr = scheduler.get_last_lr()[0]
            micro = [next(batches) for _ in range(gas)]
            consumed += gas
            for batch in micro:
                check_counts(batch["input_ids"], batch.get("pixel_values"), batch.get("boxes"))
            step_loss = optimizer_step(engine, micro, comm, device, dtype)
            window.add(step_loss, sum(int(b.get("num_tokens", b["input_ids"].numel())) for b in micro),
                       engine.get_global_grad_norm())
            if is_rank0:
                progress.update(1)
            log_now = step % cfg.train.log_steps == 0 or step == total_steps
            save_now = step % cfg.train.save_steps == 0 or step == total_steps
            if log_now:
                loss, grad_norm, tokens_total = read_window(step, "at a log step")
                elapsed = time.perf_counter() - window.started
                last_loss = loss
                record = {
                    "step": step,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": tokens_total / max(elapsed, 1e-9),
                    "step_time_s": elapsed / window.steps,
                }
                if is_rank0:
                    metrics.log(record)
                    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                window.reset(step)
            elif save_now:
                read_window(step, "before saving")  # never save weights a non-finite step produced
            if save_now:
                save(step)
    finally:
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
    if is_rank0:
        plot_loss(out_dir)
        if cfg.model.compile:
            from gpt4roi_sft.train.speedups import warn_if_compile_gave_up

            warn_if_compile_gave_up()
    return {"step": step, "loss": last_loss, "output_dir": str(out_dir)}
