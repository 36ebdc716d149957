"""The DeepSpeed trainer on CPU: real launcher runs (two gloo processes), export, exact resume, modes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, free_port, run_module
from gpt4roi_sft.train import checkpoint as ckpt

pytestmark = pytest.mark.slow

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def recipe_args(model_dir, data, out_dir, *extra):
    return [
        "--config", str(REPO / "configs" / "quickstart.yaml"),
        f"model.path={model_dir}", f"data.train={data['train']}", f"data.image_root={data['root']}",
        f"train.output_dir={out_dir}", "train.micro_batch_size=2", "train.learning_rate=0.002",
        "train.warmup_steps=0", "train.lr_scheduler=constant", "data.validate_on_start=false", *extra,
    ]


def one_process(args, timeout=600):
    """``python train_sft.py`` without a launcher: a one-process group on a port the trainer picks free (runs of
    the test workers side by side)."""
    env = {k: v for k, v in ENV.items() if k not in ("MASTER_PORT", "GPT4ROI_MASTER_PORT", "WORLD_SIZE")}
    return subprocess.run([sys.executable, str(REPO / "train_sft.py"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def launch(args, nproc=2, port=None, launcher="torchrun", **popen):
    """``nproc`` training processes under ``torchrun`` or ``deepspeed --num_gpus`` (the README's command, which
    starts them through two more Python processes importing DeepSpeed: ~8 s more a launch on 2 cores; the
    ``zero2_lora_launch`` fixture runs it)."""
    port = str(port or free_port())
    if launcher == "deepspeed":
        cmd = [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", port]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
               "--master_port", port]
    cmd += [str(REPO / "train_sft.py"), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def run_training(args, nproc=2, timeout=600, port=None, launcher="torchrun"):
    """A training run to its end; its console (stdout and stderr). One process runs as ``python train_sft.py`` (a
    launcher would only add processes that start it); more, under ``launcher`` (:func:`launch`)."""
    if nproc == 1 and port is None:
        proc = one_process(args, timeout=timeout)
        out = proc.stdout + proc.stderr
    else:
        proc = launch(args, nproc, port=port, launcher=launcher)
        out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def losses(out_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out_dir) / "train_log.jsonl").read_text().splitlines())}


def tiny_batch(processor):
    from PIL import Image

    image = Image.new("RGB", (160, 120), (40, 120, 200))
    text = "The <image> provides an overview of the picture.\nWhat is in region1 <bbox>?"
    return processor(images=[image], texts=[text], boxes=[[[20, 20, 90, 100]]])


# LoRA dropout > 0 makes the losses depend on the restored RNG state, not only on weights and data order; the two
# processes fill micro-batches to a token budget, so each resumes from its own saved data position (the kill -9 test).
ZERO2_LORA = ("train.max_steps=20", "train.save_steps=10", "data.pack_tokens=1024", "lora.enabled=true", "lora.r=8",
              "lora.alpha=16", "lora.dropout=0.2", "model.freeze=stage2", "deepspeed.config=ds_configs/zero2.json")


@pytest.fixture(scope="module")
def zero2_lora_launch(tiny_model_dir, synthetic_pix2cap, tmp_path_factory):
    """Two processes, LoRA, ZeRO-2, 20 steps: the output dir, the launcher's master port and its console output."""
    out = tmp_path_factory.mktemp("zero2_lora")
    port = free_port()
    console = run_training(recipe_args(tiny_model_dir, synthetic_pix2cap, out, *ZERO2_LORA), port=port, launcher="deepspeed")
    return SimpleNamespace(out=out, port=port, console=console)


@pytest.fixture(scope="module")
def zero2_lora_run(zero2_lora_launch):
    return zero2_lora_launch.out


def test_a_cpu_run_builds_no_shared_memory_allreduce_and_leaves_nothing_in_dev_shm(zero2_lora_launch):
    """DeepSpeed's CPU shared-memory all-reduce (a minute of C++ compile, a ~69 MB /dev/shm file per process that
    it never removes) serves only tensor-parallel inference; a training run of two processes goes without it."""
    assert "deepspeed_shm_comm" not in zero2_lora_launch.console
    shm = Path("/dev/shm")
    if shm.is_dir():
        left = sorted(p.name for p in shm.glob(f"deepspeed_allreduce_buffer_*_{zero2_lora_launch.port}_*"))
        assert not left, left


def test_zero2_lora_two_processes_loss_falls(zero2_lora_run):
    log = losses(zero2_lora_run)
    assert sorted(log) == list(range(1, 21))
    first, last = sum(log[s] for s in (1, 2, 3)) / 3, sum(log[s] for s in (18, 19, 20)) / 3
    assert last < first - 0.3, (first, last)


def test_training_writes_log_fields_tensorboard_and_loss_plot(zero2_lora_run):
    record = json.loads((zero2_lora_run / "train_log.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(record)
    assert record["tokens_per_s"] > 0
    assert any((zero2_lora_run / "tensorboard").iterdir())
    assert (zero2_lora_run / "loss.png").stat().st_size > 1000


def test_checkpoints_keep_the_last_k_and_latest_names_a_complete_one(zero2_lora_run):
    root = zero2_lora_run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_20"
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [10, 20]


@pytest.fixture(scope="module")
def zero2_exports(zero2_lora_run, tmp_path_factory):
    """The 20-step run exported twice: the LoRA adapter, and the weights merged."""
    from gpt4roi_sft.export import export_checkpoint  # the CLI's own function (tests/test_export.py runs the CLI)

    root = tmp_path_factory.mktemp("zero2_exports")
    exports = SimpleNamespace(adapter=root / "adapter", merged=root / "merged")
    for out, merge in ((exports.adapter, False), (exports.merged, True)):
        export_checkpoint(str(zero2_lora_run), str(out), merge=merge)
    return exports


def test_exported_adapter_through_plain_peft_matches_the_merged_export(zero2_exports, tiny_model_dir):
    from peft import PeftModel

    from gpt4roi_sft import load_model

    adapter_dir = zero2_exports.adapter
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter_dir.iterdir()}
    base, processor = load_model(tiny_model_dir)
    adapted = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    merged, _ = load_model(str(zero2_exports.merged))
    plain, _ = load_model(tiny_model_dir)
    batch = tiny_batch(processor)
    with torch.no_grad():
        a, m, p = adapted(**batch).logits, merged.eval()(**batch).logits, plain.eval()(**batch).logits
    torch.testing.assert_close(a, m, atol=1e-4, rtol=1e-4)
    assert (a - p).abs().max() > 1e-2, "the adapter changes nothing"


def test_evaluating_base_plus_adapter_generates_what_the_merged_export_generates(zero2_exports, tiny_model_dir,
                                                                                 synthetic_pix2cap):
    from gpt4roi_sft.infer import DecodeSettings, RegionRequest, load_captioner

    settings = DecodeSettings(max_new_tokens=12)
    with_adapter = load_captioner(tiny_model_dir, settings=settings, adapter_dir=str(zero2_exports.adapter), device="cpu")
    merged = load_captioner(str(zero2_exports.merged), settings=settings, device="cpu")
    images = sorted((synthetic_pix2cap["root"] / "val2017").glob("*.jpg"))[:3]
    prompt = "The <image> provides an overview of the picture.\nCan you give a description of the region mentioned by region1 <bbox>?"
    requests = [RegionRequest(str(img), prompt, [[4, 4, 60, 60]]) for img in images]
    assert with_adapter(requests) == merged(requests)
    assert type(with_adapter.model) is type(merged.model), "the adapter is merged in memory, not run through peft"


def test_zero3_full_finetune_two_processes_gathers_full_weights_and_exports(tiny_model_dir, synthetic_pix2cap, tmp_path):
    from safetensors.torch import load_file

    from gpt4roi_sft import load_model

    out = tmp_path / "zero3"
    run_training(recipe_args(tiny_model_dir, synthetic_pix2cap, out, "train.max_steps=20", "train.save_steps=20",
                             "model.freeze=stage2", "deepspeed.config=ds_configs/zero3.json"))
    log = losses(out)
    assert sum(log[s] for s in (18, 19, 20)) < sum(log[s] for s in (1, 2, 3)) - 0.9
    weights = load_file(str(out / "checkpoints" / "step_20" / ckpt.TRAINABLE_FILE))
    base, processor = load_model(tiny_model_dir)
    shapes = dict((n, p.shape) for n, p in base.named_parameters())
    assert weights and all(t.numel() > 0 and t.shape == shapes[n] for n, t in weights.items())
    assert not any(n.startswith("vision_tower.") for n in weights), "stage2 keeps the vision tower frozen"
    from gpt4roi_sft.export import export_checkpoint

    trained, _ = load_model(str(export_checkpoint(str(out), str(tmp_path / "full"))))
    batch = tiny_batch(processor)
    with torch.no_grad():
        assert (trained.eval()(**batch).logits - base.eval()(**batch).logits).abs().max() > 1e-2


def test_kill_9_after_a_checkpoint_then_rerun_gives_the_uninterrupted_losses(zero2_lora_run, tiny_model_dir,
                                                                            synthetic_pix2cap, tmp_path):
    """The 20-step run again (under torchrun, the fixture under the deepspeed launcher), killed with SIGKILL after
    its step-10 checkpoint, then rerun: every step's loss is the uninterrupted run's."""
    crashed = tmp_path / "crashed"
    args = recipe_args(tiny_model_dir, synthetic_pix2cap, crashed, *ZERO2_LORA)
    proc = launch(args, start_new_session=True)
    log_path = crashed / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log_path.is_file() and len(log_path.read_text().splitlines()) >= 11:  # step 10 saved before step 11 ran
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    step_dir = ckpt.find_latest(crashed)
    assert step_dir is not None and step_dir.name == "step_10" and max(losses(crashed)) < 20
    assert {p.name for p in step_dir.glob("data_position_rank*.json")} == {"data_position_rank0.json", "data_position_rank1.json"}

    run_training(args)
    ref, resumed = losses(zero2_lora_run), losses(crashed)
    assert sorted(resumed) == list(range(1, 21))
    for step in range(1, 21):
        assert resumed[step] == pytest.approx(ref[step], abs=1e-6), (step, resumed[step], ref[step])


def test_qlora_trains_on_cpu_and_exports(tiny_model_dir, synthetic_pix2cap, tmp_path):
    out = tmp_path / "qlora"
    run_training(recipe_args(tiny_model_dir, synthetic_pix2cap, out, "train.max_steps=3", "train.save_steps=3",
                             "lora.enabled=true", "lora.qlora=true", "lora.r=8", "model.freeze=stage2"), nproc=1)
    assert len(losses(out)) == 3
    ckpt_export = run_module("gpt4roi_sft.export", "--checkpoint", str(out), "--out", str(tmp_path / "adapter"))
    assert ckpt_export.returncode == 0, ckpt_export.stderr[-2000:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_two_nodes_on_loopback_train_together(tiny_model_dir, synthetic_pix2cap, tmp_path):
    out = tmp_path / "two_nodes"
    port = str(free_port())
    args = recipe_args(tiny_model_dir, synthetic_pix2cap, out, "train.max_steps=3", "train.save_steps=3")
    nodes = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port, str(REPO / "train_sft.py"), *args]
        nodes.append(subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert len(losses(out)) == 3
    saved = ckpt.read_client_state(out / "checkpoints" / "step_3")
    assert saved["world_size"] == 2


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tiny_model_dir, synthetic_pix2cap, tmp_path):
    out = tmp_path / "nan"
    args = recipe_args(tiny_model_dir, synthetic_pix2cap, out, "train.max_steps=40", "train.save_steps=1",
                       "train.learning_rate=1e12", "train.max_grad_norm=1e30")
    proc = one_process(args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "loss is nan" in proc.stderr.lower() or "loss is inf" in proc.stderr.lower()
    last_good = ckpt.find_latest(out)
    assert last_good is not None and all(v == v for v in losses(out).values())


def test_non_finite_loss_between_log_steps_stops_before_the_next_save(tiny_model_dir, synthetic_pix2cap, tmp_path):
    # No log step in the run: the device is read only before each save, and that check must catch the NaN.
    out = tmp_path / "nan_unlogged"
    args = recipe_args(tiny_model_dir, synthetic_pix2cap, out, "train.max_steps=40", "train.save_steps=1",
                       "train.log_steps=100", "train.learning_rate=1e12", "train.max_grad_norm=1e30")
    proc = one_process(args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = proc.stderr.lower()
    assert ("loss is nan" in message or "loss is inf" in message) and "before saving" in message
    bad_step = int(message.split(" at step ")[1].split()[0].strip("(")) if " at step " in message else None
    last_good = ckpt.find_latest(out)
    assert last_good is not None and bad_step is not None
    assert ckpt.read_client_state(last_good)["step"] == bad_step - 1  # every step before the NaN was saved, not the NaN one


PER_STEP_LORA = ("train.max_steps=7", "train.save_steps=7", "lora.enabled=true", "lora.r=8", "model.freeze=stage2",
                 "train.gradient_accumulation_steps=2")


@pytest.fixture(scope="module")
def per_step_lora_run(tiny_model_dir, synthetic_pix2cap, tmp_path_factory):
    """One process, LoRA, ZeRO-2 (the quickstart's), 7 steps of 2 micro-batches each, every step logged."""
    out = tmp_path_factory.mktemp("per_step_lora")
    run_training(recipe_args(tiny_model_dir, synthetic_pix2cap, out, *PER_STEP_LORA), nproc=1)
    return out


def test_log_steps_log_the_mean_loss_of_each_window_and_the_last_step(per_step_lora_run, tiny_model_dir,
                                                                      synthetic_pix2cap, tmp_path):
    windows = tmp_path / "windows"
    run_training(recipe_args(tiny_model_dir, synthetic_pix2cap, windows, *PER_STEP_LORA, "train.log_steps=3"), nproc=1)
    per_step, logged = losses(per_step_lora_run), losses(windows)
    assert sorted(logged) == [3, 6, 7]
    for step, first in ((3, 1), (6, 4), (7, 7)):
        expected = sum(per_step[s] for s in range(first, step + 1)) / (step - first + 1)
        assert logged[step] == pytest.approx(expected, rel=1e-6), step


def test_one_gpu_deepspeed_overrides_change_no_loss_or_grad_norm(per_step_lora_run, tiny_model_dir, synthetic_pix2cap,
                                                                  tmp_path):
    """The DeepSpeed switches the one-GPU recipes and the benchmark's ds_sync_free / ds_nocontig levers set (no
    throughput timer, no bf16 overflow check, no contiguous gradient buffers) change how ZeRO moves gradients, not
    what it computes: the same loss and grad norm at every step. With 2 micro-batches per step, ZeRO-2 without
    contiguous gradients accumulates each gradient where it lies instead of in its bucket."""
    fast = tmp_path / "fast"
    overrides = "deepspeed.overrides=" + json.dumps(["timers.throughput.enabled=false", "bf16.check_grad_overflow=false",
                                                     "zero_optimization.contiguous_gradients=false"])
    run_training(recipe_args(tiny_model_dir, synthetic_pix2cap, fast, *PER_STEP_LORA, overrides), nproc=1)
    assert (fast / "config.yaml").read_text().count("contiguous_gradients=false") == 1
    rows = {name: [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
            for name, out in (("plain", per_step_lora_run), ("fast", fast))}
    assert [r["step"] for r in rows["fast"]] == [r["step"] for r in rows["plain"]] == list(range(1, 8))
    for plain, got in zip(rows["plain"], rows["fast"]):
        assert (got["loss"], got["grad_norm"]) == (plain["loss"], plain["grad_norm"]), got["step"]
    assert rows["plain"][0]["loss"] != rows["plain"][1]["loss"]  # the steps trained different samples


def test_checkpointing_one_decoder_layer_in_two_trains_with_the_losses_of_no_checkpointing(per_step_lora_run, tiny_model_dir,
                                                                                           synthetic_pix2cap, tmp_path):
    half = tmp_path / "half"
    out = run_training(recipe_args(tiny_model_dir, synthetic_pix2cap, half, *PER_STEP_LORA, "model.gradient_checkpointing=true",
                                   "model.checkpoint_every=2"), nproc=1)
    assert "activation checkpointing: 1 of 2 decoder layers" in out
    plain, got = losses(per_step_lora_run), losses(half)
    assert sorted(got) == sorted(plain) == list(range(1, 8))
    for step in plain:
        assert got[step] == pytest.approx(plain[step], rel=1e-6), step


def test_the_torch_engine_trains_as_deepspeed_does_resumes_exactly_and_exports(per_step_lora_run, tiny_model_dir,
                                                                              synthetic_pix2cap, tmp_path):
    """train.engine=torch (plain `python train_sft.py`, no DeepSpeed): ZeRO-2's loss and grad norm at every step
    (fp32, 2 micro-batches per step, LoRA dropout 0.05, so the restored RNG state matters); a rerun after losing
    every checkpoint past step 3 continues with the uninterrupted losses; its checkpoint exports; and DeepSpeed
    refuses to continue it, in one line, changing nothing."""
    args = recipe_args(tiny_model_dir, synthetic_pix2cap, tmp_path / "torch", *PER_STEP_LORA, "train.engine=torch",
                       "train.save_steps=3", "train.save_total_limit=3")
    out = tmp_path / "torch"
    proc = one_process(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {name: {r["step"]: r for r in map(json.loads, (folder / "train_log.jsonl").read_text().splitlines())}
            for name, folder in (("deepspeed", per_step_lora_run), ("torch", out))}
    assert sorted(rows["torch"]) == sorted(rows["deepspeed"]) == list(range(1, 8))
    for step, plain in rows["deepspeed"].items():
        got = rows["torch"][step]
        assert got["loss"] == pytest.approx(plain["loss"], rel=1e-5), step
        assert got["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4), step
    assert [p.name for p in sorted((out / "checkpoints").glob("step_*"))] == ["step_3", "step_6", "step_7"]
    assert (out / "checkpoints" / "step_7" / "engine_state.pt").is_file()
    assert not list((out / "checkpoints" / "step_7").glob("*model_states.pt"))  # no DeepSpeed file

    uninterrupted = losses(out)
    for lost in ("step_6", "step_7"):  # what a crash right after the step-3 save leaves
        shutil.rmtree(out / "checkpoints" / lost)
    (out / "checkpoints" / "latest").write_text("step_3")
    proc = one_process(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step 3" in proc.stderr
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, 8))
    for step in range(4, 8):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-6), (step, resumed[step], uninterrupted[step])

    from gpt4roi_sft.export import export_checkpoint

    adapter = export_checkpoint(str(out), str(tmp_path / "adapter"))
    info = json.loads((adapter / "export_info.json").read_text())
    assert (info["kind"], info["step"]) == ("adapter", 7) and (adapter / "adapter_model.safetensors").is_file()

    before = snapshot(out)
    with_deepspeed = [a for a in args if a != "train.engine=torch"] + ["train.max_steps=9"]
    proc = one_process(with_deepspeed)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {out}: its checkpoint step_7 was saved by train.engine=torch, this run has "
                                   "train.engine=deepspeed; an engine resumes only its own checkpoints: set it back, "
                                   "or choose another train.output_dir")
    assert snapshot(out) == before


def test_missing_data_file_is_reported_in_one_line_before_launch(tiny_model_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_sft.py"), "--config", str(REPO / "configs" / "quickstart.yaml"),
         f"model.path={tiny_model_dir}", f"data.train={tmp_path / 'missing.jsonl'}", f"train.output_dir={tmp_path / 'o'}",
         "data.image_root="],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: data.train: file not found: {tmp_path / 'missing.jsonl'}"


def _complete_checkpoint(root, step):
    from safetensors.torch import save_file

    step_dir = root / f"step_{step}"
    step_dir.mkdir(parents=True)
    save_file({"w": torch.zeros(64)}, str(step_dir / ckpt.TRAINABLE_FILE))
    (step_dir / ckpt.COMPLETE_MARKER).write_text("ok\n")
    return step_dir


def test_an_interrupted_save_never_becomes_the_resume_point(tmp_path):
    root = tmp_path / "checkpoints"
    _complete_checkpoint(root, 4)
    (root / "step_8").mkdir()
    (root / "latest").write_text("step_8")
    assert ckpt.find_latest(tmp_path) == root / "step_4"
    (root / "latest").unlink()
    assert ckpt.find_latest(tmp_path) == root / "step_4"
    # export accepts the output dir, its checkpoints/ folder or a step dir, never an incomplete one
    assert ckpt.resolve_step_dir(tmp_path) == ckpt.resolve_step_dir(root) == root / "step_4"
    with pytest.raises(Exception, match="not a complete checkpoint"):
        ckpt.resolve_step_dir(root / "step_8")


def test_resume_passes_over_a_complete_checkpoint_whose_trainable_file_is_truncated(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    _complete_checkpoint(root, 4)
    broken = _complete_checkpoint(root, 8) / ckpt.TRAINABLE_FILE
    (root / "latest").write_text("step_8")
    broken.write_bytes(broken.read_bytes()[:-10])
    assert ckpt.find_latest(tmp_path) == root / "step_4"
    assert f"{broken}: truncated (318 bytes, its header describes 328)" in caplog.text


def test_resume_is_refused_naming_the_file_when_every_complete_checkpoint_is_damaged(tmp_path):
    root = tmp_path / "checkpoints"
    broken = _complete_checkpoint(root, 4) / ckpt.TRAINABLE_FILE
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(ckpt.UserError, match=rf"^{broken}: not a safetensors file .*move {root} aside"):
        ckpt.find_latest(tmp_path)


@pytest.mark.parametrize("text, reason", [('{"step": 2, "consu', "invalid JSON at line 1 column 13"),
                                          ("[1]", "not a client state")])
def test_resume_from_a_damaged_client_state_names_the_file(tmp_path, text, reason):
    path = _complete_checkpoint(tmp_path, 2) / ckpt.CLIENT_STATE_FILE
    path.write_text(text)
    with pytest.raises(ckpt.UserError, match=rf"^{path}: {reason}"):
        ckpt.read_client_state(path.parent)


def _one_batch(model_dir, data, n=2):
    from gpt4roi_sft import load_model
    from gpt4roi_sft.data.collator import PaddingCollator
    from gpt4roi_sft.data.dataset import ConversationDataset

    model, processor = load_model(model_dir)
    dataset = ConversationDataset(str(data["train"]), str(data["root"]), processor.tokenizer, processor.image_transform,
                                  model.config.image_token_id, processor.num_image_tokens, template="gpt4roi_v0")
    batch = PaddingCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(n)])
    records = [dataset.read_record(i) for i in range(n)]
    return model, processor, batch, records


def test_loss_counts_exactly_the_assistant_tokens(tiny_model_dir, synthetic_pix2cap):
    from gpt4roi_sft.data.model_inputs import MODEL_INPUT_KEYS

    model, processor, batch, records = _one_batch(tiny_model_dir, synthetic_pix2cap)
    labels = batch["labels"]
    for row, record in zip(labels, records):
        trained = processor.tokenizer.decode(row[row != -100].tolist())
        answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
        # Every answer, with its "### Assistant:" header and the "###" that closes it, and nothing of the human turns.
        squash = lambda text: "".join(text.split())  # noqa: E731 - compare without whitespace tokens
        assert squash(trained) == squash("".join(f"### Assistant: {a}\n###" for a in answers))
        assert "Human" not in trained and "region1" not in trained
    inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if batch.get(k) is not None}
    with torch.no_grad():
        loss = model.eval()(**inputs).loss
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    shifted = labels[:, 1:]
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1),
                                               ignore_index=-100, reduction="sum") / (shifted != -100).sum()
    torch.testing.assert_close(loss, manual, atol=1e-5, rtol=1e-5)


def test_adapter_gradients_are_nonzero_after_step_one_with_gradient_checkpointing(tiny_model_dir, synthetic_pix2cap):
    from gpt4roi_sft.config import load_config
    from gpt4roi_sft.data.model_inputs import MODEL_INPUT_KEYS
    from gpt4roi_sft.train.modes import apply_training_mode

    model, _, batch, _ = _one_batch(tiny_model_dir, synthetic_pix2cap)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = load_config(None, ["lora.enabled=true", "lora.r=4", "model.freeze=stage2"])
    model = apply_training_mode(model, cfg).train()
    inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if batch.get(k) is not None}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in (1, 2):
        optimizer.zero_grad()
        model(**inputs).loss.backward()
        lora_b = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
        lora_a = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
        assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b), f"lora_B has no gradient at step {step}"
        if step == 2:  # lora_B starts at zero, so lora_A's gradient appears once B has moved
            assert all(g is not None and g.abs().sum() > 0 for g in lora_a)
        optimizer.step()
    frozen = [p for n, p in model.named_parameters() if "vision_tower" in n]
    assert all(p.grad is None for p in frozen)




def test_rerunning_a_finished_run_says_it_is_complete_with_its_last_logged_loss(zero2_lora_run, tiny_model_dir,
                                                                                synthetic_pix2cap):
    proc = one_process(recipe_args(tiny_model_dir, synthetic_pix2cap, zero2_lora_run, *ZERO2_LORA))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"already complete: step 20, last logged loss {losses(zero2_lora_run)[20]:.4f}; outputs in {zero2_lora_run}"
            in proc.stdout), proc.stdout
    assert sorted(losses(zero2_lora_run)) == list(range(1, 21))


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def test_a_resume_under_another_lora_rank_is_refused_in_one_line_and_changes_nothing(zero2_lora_run, tiny_model_dir,
                                                                                    synthetic_pix2cap):
    before = snapshot(zero2_lora_run)
    args = recipe_args(tiny_model_dir, synthetic_pix2cap, zero2_lora_run, *ZERO2_LORA, "train.max_steps=30", "lora.r=16")
    proc = one_process(args)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {zero2_lora_run}: its checkpoint step_20 was trained with lora.r=8, this run "
                                   f"has lora.r=16; the checkpoint cannot continue under another lora.r: set it back, "
                                   f"or choose another train.output_dir")
    assert snapshot(zero2_lora_run) == before


def test_a_run_refused_at_start_leaves_no_output_dir(tiny_model_dir, synthetic_pix2cap, tmp_path):
    bad = tmp_path / "bad.jsonl"
    record = json.loads(Path(synthetic_pix2cap["train"]).read_text().splitlines()[0])
    record["regions"] = record["regions"][1:]  # one <bbox> more than regions
    bad.write_text(json.dumps(record) + "\n")
    out = tmp_path / "out"
    args = recipe_args(tiny_model_dir, synthetic_pix2cap, out, "train.max_steps=2", f"data.train={bad}",
                       "data.validate_on_start=true")
    proc = one_process(args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


# One sample per micro-batch, and gradient accumulation on one process, give every step the same samples and the
# same per-sample losses on either world size; what may differ is the order in which gradients are summed
# (all-reduce across processes against accumulation in one), so the losses agree to float32 rounding, not bit
# for bit in general: tolerance 1e-4 on losses of about 4-6.
WORLD_SIZE_RUN = ("train.micro_batch_size=1", "train.save_steps=3", "train.learning_rate=0.002")


def accumulation(nproc):
    return f"train.gradient_accumulation_steps={2 // nproc}"  # 2 samples per optimizer step on any world size


@pytest.fixture(scope="module")
def two_process_reference(tiny_model_dir, synthetic_pix2cap, tmp_path_factory):
    """Six uninterrupted steps on two processes under ZeRO-2, saved at steps 3 and 6. ZeRO-1, -2 and -3 compute
    the same steps (they partition where the optimizer state, gradients and weights live, not what is summed), so
    this one run is the reference of all three stages below, and its step-3 checkpoint the ZeRO-2 2 -> 1 start."""
    out = tmp_path_factory.mktemp("two_process_reference")
    run_training(recipe_args(tiny_model_dir, synthetic_pix2cap, out, *WORLD_SIZE_RUN, "deepspeed.config=ds_configs/zero2.json",
                             "train.max_steps=6", accumulation(2)), nproc=2)
    return SimpleNamespace(out=out, losses=losses(out))


@pytest.mark.parametrize("stage, before, after", [("zero2", 2, 1), ("zero3", 1, 2), ("zero1", 2, 1)])
def test_a_resume_on_another_number_of_processes_follows_the_uninterrupted_losses(stage, before, after, tiny_model_dir,
                                                                                  synthetic_pix2cap, tmp_path,
                                                                                  two_process_reference):
    common = (*WORLD_SIZE_RUN, f"deepspeed.config=ds_configs/{stage}.json")
    moved = tmp_path / "moved"
    if (stage, before) == ("zero2", 2):  # the reference's first 3 steps are this run's: start from its step 3
        shutil.copytree(two_process_reference.out, moved)
        shutil.rmtree(moved / "checkpoints" / "step_6")
        (moved / "checkpoints" / "latest").write_text("step_3")
    else:
        run_training(recipe_args(tiny_model_dir, synthetic_pix2cap, moved, *common, "train.max_steps=3",
                                 accumulation(before)), nproc=before)
    out = run_training(recipe_args(tiny_model_dir, synthetic_pix2cap, moved, *common, "train.max_steps=6",
                                   accumulation(after)), nproc=after)
    assert f"saved on {before} processes, now {after}" in out
    ref, resumed = two_process_reference.losses, losses(moved)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(ref[step], abs=1e-4), (step, resumed[step], ref[step])
    assert ckpt.read_client_state(moved / "checkpoints" / "step_6")["world_size"] == after
    assert not [p.name for p in (moved / "checkpoints").iterdir() if "universal" in p.name]
