"""One-process training without DeepSpeed (``train.engine: torch``): the same update in fewer host operations.

On one GPU about a third of a LoRA step's dispatched operations are DeepSpeed's bookkeeping: a gradient hook per
trained tensor, a norm and a bf16 write-back per tensor (``bench/dispatch_count.py``; 14,000 operations per
micro-step at 32 decoder layers here against 24,201 for ZeRO-2 with every lever). :class:`TorchEngine` does
DeepSpeed's bf16 update with multi-tensor operations only, and offers the methods of DeepSpeed's engine that the
training loop and the throughput benchmark call, so either engine runs the same loop. DeepSpeed stays the engine
for several processes, ZeRO-3 and optimizer offload.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from gpt4roi_sft.errors import UserError

ENGINE_STATE_FILE = "engine_state.pt"
STATE_FORMAT = 1


class TorchEngine:
    """DeepSpeed's one-process mixed-precision step, without DeepSpeed.

    The module's weights in ``dtype`` (cast as DeepSpeed's bf16 mode casts them: peft builds its adapters in fp32),
    fp32 master copies of the trained ones; :meth:`backward` scales each micro-batch loss by 1 / gradient
    accumulation steps as DeepSpeed's does (the loop's loss denominator assumes it); :meth:`step` adds the
    micro-batch's gradients into fp32 buffers in one multi-tensor op and, at the accumulation boundary, clips them to
    ``max_grad_norm`` (0: no clipping, as DeepSpeed's ``gradient_clipping: 0``), runs fused AdamW on the masters,
    steps the learning-rate schedule and copies the masters back in one multi-tensor op.

    "One op" is one dispatched operation for the host to issue. The bf16-into-fp32 add mixes dtypes, which CUDA's
    single-kernel multi-tensor path does not take, so PyTorch runs it as a loop of per-tensor kernels in C++
    (still no Python per tensor); flat gradient buffers would make it one kernel, if a GPU profile shows it matters.
    """

    def __init__(self, module: torch.nn.Module, *, dtype: torch.dtype, device: torch.device, lr: float,
                 weight_decay: float, max_grad_norm: float, grad_accum: int,
                 lr_lambda: Optional[Callable[[int], float]] = None):
        self.module = module.to(device=device, dtype=dtype)
        named = [(name, p) for name, p in self.module.named_parameters() if p.requires_grad]
        if not named:
            raise UserError("train.engine=torch: the model has no trainable parameter (check model.freeze and lora.*)")
        self.names: List[str] = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.masters = [p.detach().float().clone() for p in self.params]
        self.master_grads = [torch.zeros_like(m) for m in self.masters]
        for master, grad in zip(self.masters, self.master_grads):
            master.grad = grad
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, weight_decay=weight_decay, fused=True)
        self.lr_scheduler = (torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
                             if lr_lambda is not None else None)
        self.max_grad_norm, self.grad_accum = max_grad_norm, grad_accum
        self.micro_steps = self.global_steps = 0
        self.grad_norm: Optional[torch.Tensor] = None

    def __call__(self, **inputs):
        return self.module(**inputs)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum if self.grad_accum > 1 else loss).backward()

    @torch.no_grad()
    def step(self) -> None:
        pairs = [(m, p.grad) for m, p in zip(self.master_grads, self.params) if p.grad is not None]
        if pairs:  # a trained tensor the micro-batch did not reach has no gradient to add
            torch._foreach_add_([m for m, _ in pairs], [g for _, g in pairs])
        for p in self.params:
            p.grad = None
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum:
            return
        if self.max_grad_norm > 0:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.masters, self.max_grad_norm, foreach=True)
        else:
            self.grad_norm = torch.nn.utils.get_total_norm(self.master_grads, foreach=True)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        torch._foreach_copy_(self.params, self.masters)
        torch._foreach_zero_(self.master_grads)
        self.global_steps += 1

    def zero_grad(self) -> None:
        """After a failed step: drop what was accumulated, and count the micro-steps back to the last boundary."""
        for p in self.params:
            p.grad = None
        torch._foreach_zero_(self.master_grads)
        self.micro_steps -= self.micro_steps % self.grad_accum

    def get_global_grad_norm(self) -> Optional[torch.Tensor]:
        """The last optimizer step's gradient norm before clipping, on the device (not read here); ``None`` before
        the first step."""
        return self.grad_norm

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, save_dir, tag: str, client_state: Optional[Dict[str, Any]] = None,
                        save_latest: bool = False) -> None:
        """Masters, AdamW moments, schedule and step counts to ``save_dir/tag/engine_state.pt`` (written to a
        temporary name, then renamed). ``client_state`` and ``latest`` are the loop's (see
        :mod:`gpt4roi_sft.train.checkpoint`); accepted for DeepSpeed's signature."""
        if self.micro_steps % self.grad_accum:
            raise RuntimeError(f"save_checkpoint mid-step ({self.micro_steps % self.grad_accum} of {self.grad_accum} "
                               "micro-steps accumulated): checkpoints are taken at optimizer-step boundaries")
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "format": STATE_FORMAT,
            "masters": dict(zip(self.names, self.masters)),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "micro_steps": self.micro_steps,
            "global_steps": self.global_steps,
        }
        tmp = folder / f".{ENGINE_STATE_FILE}.tmp"
        torch.save(state, tmp)
        tmp.replace(folder / ENGINE_STATE_FILE)

    def load_checkpoint(self, load_dir, tag: str, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True) -> None:
        """Restore what :meth:`save_checkpoint` wrote; a file from another model or trained set is refused by name."""
        path = Path(load_dir) / tag / ENGINE_STATE_FILE
        if not path.is_file():
            raise UserError(f"{path.parent}: no {ENGINE_STATE_FILE}, so it was not saved by train.engine=torch; resume "
                            "it with the engine that saved it")
        state = torch.load(path, map_location=self.masters[0].device, weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise UserError(f"{path}: engine state format {state.get('format')!r}, this version reads {STATE_FORMAT}")
        saved = state["masters"]
        missing = [n for n in self.names if n not in saved]
        extra = [n for n in saved if n not in set(self.names)]
        if missing or extra:
            which = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this model does not train"
            raise UserError(f"{path}: the checkpoint's trained parameters differ from this run's ({which})")
        for name, master in zip(self.names, self.masters):
            if saved[name].shape != master.shape:
                raise UserError(f"{path}: {name} has shape {tuple(saved[name].shape)} in the checkpoint, "
                                f"{tuple(master.shape)} in this run")
        with torch.no_grad():
            torch._foreach_copy_(self.masters, [saved[n] for n in self.names])
            torch._foreach_copy_(self.params, self.masters)
            torch._foreach_zero_(self.master_grads)
        if load_optimizer_states:
            self.optimizer.load_state_dict(state["optimizer"])
        if load_lr_scheduler_states and self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.micro_steps, self.global_steps = int(state["micro_steps"]), int(state["global_steps"])
