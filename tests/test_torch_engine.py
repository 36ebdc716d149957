"""``train.engine: torch``: DeepSpeed's one-process bf16 update in multi-tensor ops, and its exact save / resume."""

import pytest
import torch

from gpt4roi_sft.errors import UserError
from gpt4roi_sft.train.torch_engine import ENGINE_STATE_FILE, TorchEngine

CPU = torch.device("cpu")


def engine_for(module, dtype=torch.bfloat16, **kw):
    options = dict(dtype=dtype, device=CPU, lr=0.1, weight_decay=0.01, max_grad_norm=0.5, grad_accum=2)
    options.update(kw)
    return TorchEngine(module, **options)


def two_layers(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def micro_step(engine, x):
    engine.backward(engine(input=x.to(next(engine.module.parameters()).dtype)).float().pow(2).sum())
    engine.step()


def test_it_accumulates_in_fp32_and_applies_clipped_adamw_on_the_boundary():
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    reference = [p.detach().to(torch.bfloat16).float().clone().requires_grad_(True) for p in module.parameters()]
    engine = engine_for(module)
    before = [p.detach().clone() for p in module.parameters()]
    batches = [torch.randn(5, 4) for _ in range(2)]
    for i, x in enumerate(batches):
        micro_step(engine, x)
        if i == 0:  # mid-step: the weights wait for the boundary, the gradient waits in fp32
            assert all(torch.equal(b, p) for b, p in zip(before, module.parameters()))
            assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in engine.master_grads)
            assert (engine.micro_steps, engine.global_steps) == (1, 0) and engine.get_global_grad_norm() is None
    assert (engine.micro_steps, engine.global_steps) == (2, 1)
    assert all(p.grad is None for p in module.parameters()) and all(g.abs().sum() == 0 for g in engine.master_grads)
    grads = [torch.zeros_like(r) for r in reference]
    for x in batches:  # the same two micro-batches (each loss / 2) through an fp32 copy of the bf16 weights
        w, b = (r.detach().to(torch.bfloat16).requires_grad_(True) for r in reference)
        (torch.nn.functional.linear(x.to(torch.bfloat16), w, b).float().pow(2).sum() / 2).backward()
        grads = [g + t.grad.float() for g, t in zip(grads, (w, b))]
    for r, g in zip(reference, grads):
        r.grad = g
    norm = torch.nn.utils.clip_grad_norm_(reference, 0.5)
    torch.optim.AdamW(reference, lr=0.1, weight_decay=0.01).step()
    torch.testing.assert_close(engine.get_global_grad_norm(), norm)  # before clipping, as DeepSpeed reports it
    for p, r, m in zip(module.parameters(), reference, engine.masters):
        torch.testing.assert_close(m, r.detach())
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), m.to(torch.bfloat16))
    micro_step(engine, batches[0])  # a step that fails after this micro-step: zero_grad drops it
    engine.zero_grad()
    assert engine.micro_steps == 2 and all(g.abs().sum() == 0 for g in engine.master_grads)


def test_max_grad_norm_0_trains_unclipped_and_still_reports_the_norm():
    clipped, unclipped = engine_for(two_layers(), grad_accum=1), engine_for(two_layers(), grad_accum=1, max_grad_norm=0)
    x = torch.randn(8, 4) * 10
    for engine in (clipped, unclipped):
        micro_step(engine, x)
    torch.testing.assert_close(clipped.get_global_grad_norm(), unclipped.get_global_grad_norm())
    assert unclipped.get_global_grad_norm() > 0.5  # so clipping at 0.5 changed the first engine's update
    assert any(not torch.equal(a, b) for a, b in zip(clipped.masters, unclipped.masters))


def test_the_learning_rate_schedule_steps_once_per_optimizer_step():
    engine = engine_for(two_layers(), lr_lambda=lambda step: 1.0 / (step + 1))
    for _ in range(6):  # 3 optimizer steps of 2 micro-steps
        micro_step(engine, torch.randn(3, 4))
    assert engine.lr_scheduler.get_last_lr() == [pytest.approx(0.1 / 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_resumed_engine_continues_exactly_as_the_uninterrupted_one(tmp_path, dtype):
    schedule = lambda step: 1.0 / (step + 1)  # noqa: E731
    batches = [torch.randn(3, 4) for _ in range(12)]
    straight = engine_for(two_layers(), dtype=dtype, lr_lambda=schedule)
    for x in batches:
        micro_step(straight, x)

    first = engine_for(two_layers(), dtype=dtype, lr_lambda=schedule)
    for x in batches[:6]:
        micro_step(first, x)
    first.save_checkpoint(tmp_path, "step_3", client_state={"step": 3}, save_latest=False)
    assert (tmp_path / "step_3" / ENGINE_STATE_FILE).is_file() and not list(tmp_path.glob("step_3/.*.tmp"))

    resumed = engine_for(two_layers(seed=1), dtype=dtype, lr_lambda=schedule)  # other initial weights: all must load
    resumed.load_checkpoint(tmp_path, "step_3", load_optimizer_states=True, load_lr_scheduler_states=True)
    assert (resumed.micro_steps, resumed.global_steps) == (6, 3)
    for x in batches[6:]:
        micro_step(resumed, x)
    for a, b in zip(straight.module.parameters(), resumed.module.parameters()):
        assert torch.equal(a, b)
    assert resumed.lr_scheduler.get_last_lr() == straight.lr_scheduler.get_last_lr()
    assert torch.equal(resumed.get_global_grad_norm(), straight.get_global_grad_norm())


def test_a_checkpoint_of_other_trained_parameters_or_engine_is_refused_by_name(tmp_path):
    saved = engine_for(two_layers(), grad_accum=1)
    micro_step(saved, torch.randn(3, 4))
    saved.save_checkpoint(tmp_path, "step_1")

    frozen_first = two_layers()
    frozen_first[0].weight.requires_grad_(False)
    with pytest.raises(UserError, match=r"engine_state.pt: the checkpoint's trained parameters differ .*has 0.weight"):
        engine_for(frozen_first, grad_accum=1).load_checkpoint(tmp_path, "step_1")

    wider = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5))
    with pytest.raises(UserError, match=r"2.weight has shape \(3, 6\) in the checkpoint, \(5, 6\) in this run"):
        engine_for(wider, grad_accum=1).load_checkpoint(tmp_path, "step_1")

    (tmp_path / "step_2").mkdir()  # what a DeepSpeed checkpoint looks like to this engine
    with pytest.raises(UserError, match=r"step_2: no engine_state.pt, so it was not saved by train.engine=torch"):
        engine_for(two_layers(), grad_accum=1).load_checkpoint(tmp_path, "step_2")


def test_a_save_between_micro_steps_is_refused():
    engine = engine_for(two_layers())
    micro_step(engine, torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="mid-step"):
        engine.save_checkpoint("unused", "step_0")


def test_a_model_with_nothing_to_train_is_refused():
    frozen = two_layers().requires_grad_(False)
    with pytest.raises(UserError, match="no trainable parameter"):
        engine_for(frozen)


def test_train_refuses_the_torch_engine_on_several_processes_before_any_process_waits(monkeypatch):
    from gpt4roi_sft.config import load_config
    from gpt4roi_sft.train.loop import train

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun / the deepspeed launcher set for a second process
    with pytest.raises(UserError, match="train.engine=torch trains on one process, this launch has 2; use "
                                        "train.engine=deepspeed for several GPUs"):
        train(load_config(None, ["train.engine=torch"]))
