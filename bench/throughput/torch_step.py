"""The candidate DeepSpeed-free one-device step, for the benchmark's ``--engine torch`` (counted and timed only).

On one GPU about a third of a step's dispatched operations are DeepSpeed's bookkeeping (its gradient hooks per
trained tensor, its grad norm and bf16 write-back per tensor; ``bench/dispatch_count.py``). This step does the same
mixed-precision update with multi-tensor operations only, so that a GPU run can say what dropping DeepSpeed would
gain before the trainer gets such an engine (it would need its own checkpoint save and resume).
"""

from __future__ import annotations

import torch


class TorchOneDeviceStep:
    """DeepSpeed's bf16 one-process step without DeepSpeed: the module's weights in bf16 (as its bf16 mode casts
    them: peft builds adapters in fp32), fp32 master copies of the trained ones; each micro-step's loss scaled by
    1 / gradient-accumulation steps (as DeepSpeed's ``backward`` does, which the trainer's loss denominator
    assumes), its bf16 gradients added into fp32 buffers in one multi-tensor op; at the boundary a multi-tensor
    clip to ``max_grad_norm``, fused AdamW on the masters, and one multi-tensor copy back. The interface of the
    engine that ``optimizer_step``, the lever switch and the benchmark's arms use; the learning rate stays constant
    (the benchmark's schedule)."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype, lr: float, max_grad_norm: float, grad_accum: int,
                 weight_decay: float = 0.0):
        self.module = module.to(dtype)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.masters = [p.detach().float().clone() for p in self.params]
        self.master_grads = [torch.zeros_like(m) for m in self.masters]
        for m, g in zip(self.masters, self.master_grads):
            m.grad = g
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, weight_decay=weight_decay, fused=True)
        self.max_grad_norm, self.grad_accum = max_grad_norm, grad_accum
        self.micro_steps = self.global_steps = 0

    def __call__(self, **inputs):
        return self.module(**inputs)

    def train(self):
        self.module.train()

    def eval(self):
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
        torch.nn.utils.clip_grad_norm_(self.masters, self.max_grad_norm, foreach=True)
        self.optimizer.step()
        torch._foreach_copy_(self.params, self.masters)
        torch._foreach_zero_(self.master_grads)
        self.global_steps += 1

    def zero_grad(self) -> None:
        """After a failed step: drop what was accumulated, and count the micro-steps back to the last boundary."""
        for p in self.params:
            p.grad = None
        torch._foreach_zero_(self.master_grads)
        self.micro_steps -= self.micro_steps % self.grad_accum
