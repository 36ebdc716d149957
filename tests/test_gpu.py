"""The real command lines on one CUDA device with the tiny model: train, resume, export, QLoRA, evaluate.

Every test here is ``gpu``-marked and skipped without CUDA. ``bench/gpu_check.sh`` runs them on a lent GPU and
writes ``bench/results/<date>_<gpu>_gpu_check.json``. Resume on CUDA is compared within 1e-3 relative, not
bitwise: torchvision's RoIAlign backward accumulates with atomics on CUDA and has no deterministic kernel
(``torch.use_deterministic_algorithms(True)`` refuses it), so the region encoder's gradients carry last-bit noise.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port

# GPT4ROI_GPU_TEST_DEVICE=cpu runs the same tests on the CPU: a dry run of the test code itself, not a GPU check.
DEVICE = os.environ.get("GPT4ROI_GPU_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")]

ENV = {**os.environ, "DS_ACCELERATOR": DEVICE, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4"), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
       # The eval scripts use the running Python as it is (the GPU machine has no project virtualenv): its
       # folder goes first on PATH, so their `python3` is this one (a virtualenv's, in a CPU dry run).
       "GPT4ROI_VENV": "system", "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
# On a GPU: 40 bf16 steps with checkpoints every 20. The CPU dry run keeps the same shape at a size a CPU can run.
STEPS, PRECISION = (40, "bf16") if DEVICE == "cuda" else (12, "fp32")
HALF = STEPS // 2
# bench/gpu_check.py runs these tests in parallel workers: the ones that read the one LoRA run stay on one worker.
LORA_GROUP = pytest.mark.xdist_group("cuda_lora_run")
LORA = ("lora.enabled=true", "lora.r=8", "lora.alpha=16", "lora.dropout=0.1", "model.freeze=stage2")


def recipe(model_dir, data, out_dir, *extra):
    return ["--config", str(REPO / "configs" / "quickstart.yaml"), f"model.path={model_dir}",
            f"data.train={data['train']}", f"data.image_root={data['root']}", f"train.output_dir={out_dir}",
            "train.micro_batch_size=4", "train.learning_rate=0.002", "train.warmup_steps=0",
            "train.lr_scheduler=constant", f"train.precision={PRECISION}", "data.validate_on_start=false", *extra]


def launch(args):
    """The DeepSpeed launcher in a session of its own, so :func:`finish` can stop it and its training process."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
           str(REPO / "train_sft.py"), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc, timeout=300) -> str:
    """``proc``'s output once it exits 0; whatever happens, nothing of its process group outlives the test (an
    interrupted GPU check must not leave trainings running beside the benchmarks that follow it)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, out[-4000:]
    return out


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def train(args, timeout=300):
    return finish(launch(args), timeout)


def losses(out_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out_dir) / "train_log.jsonl").read_text().splitlines())}


def run_module(*args, timeout=300, env=ENV):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def kill_9_after_the_half_way_checkpoint(proc, out_dir):
    """SIGKILL ``proc``'s process group once the step-HALF checkpoint of ``out_dir`` is complete."""
    marker = Path(out_dir) / "checkpoints" / f"step_{HALF}" / "COMPLETE"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not marker.is_file():
        time.sleep(0.01)
    assert proc.poll() is None, "training ended before it could be killed:\n" + proc.stdout.read()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, synthetic_pix2cap, tmp_path_factory):
    """LoRA + ZeRO-2, bf16, 40 steps on CUDA, a checkpoint at step 20: the uninterrupted reference."""
    out = tmp_path_factory.mktemp("cuda_lora")
    train(recipe(tiny_model_dir, synthetic_pix2cap, out, f"train.max_steps={STEPS}", f"train.save_steps={HALF}", *LORA,
                 "deepspeed.config=ds_configs/zero2.json"))
    return out


@LORA_GROUP
def test_cuda_lora_zero2_bf16_trains_and_loss_falls(lora_run):
    log = losses(lora_run)
    assert sorted(log) == list(range(1, STEPS + 1))
    assert sum(log[s] for s in range(STEPS - 2, STEPS + 1)) < sum(log[s] for s in (1, 2, 3)) - 0.3


@LORA_GROUP
def test_cuda_kill_9_after_the_step_20_checkpoint_then_resume_follows_the_uninterrupted_run(lora_run, tiny_model_dir, synthetic_pix2cap, tmp_path):
    crashed = tmp_path / "crashed"
    args = recipe(tiny_model_dir, synthetic_pix2cap, crashed, f"train.max_steps={STEPS}", f"train.save_steps={HALF}", *LORA,
                  "deepspeed.config=ds_configs/zero2.json")
    kill_9_after_the_half_way_checkpoint(launch(args), crashed)
    train(args)
    ref, resumed = losses(lora_run), losses(crashed)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(HALF + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(ref[step], rel=1e-3), (step, resumed[step], ref[step])


@LORA_GROUP
def test_cuda_checkpointing_one_decoder_layer_in_two_follows_the_run_without(lora_run, tiny_model_dir, synthetic_pix2cap, tmp_path):
    """model.checkpoint_every=2 on CUDA in bf16: the recompute replays the same dropout masks, so the first 10 steps
    follow the uninterrupted run without checkpointing (within the RoIAlign atomics' noise)."""
    half = tmp_path / "half"
    out = train(recipe(tiny_model_dir, synthetic_pix2cap, half, "train.max_steps=10", "train.save_steps=10", *LORA,
                       "deepspeed.config=ds_configs/zero2.json", "model.gradient_checkpointing=true", "model.checkpoint_every=2"))
    assert "activation checkpointing: 1 of 2 decoder layers" in out
    ref, got = losses(lora_run), losses(half)
    assert sorted(got) == list(range(1, 11))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-3), (step, got[step], ref[step])


def one_process(args, stdout=subprocess.PIPE):
    """``python train_sft.py`` without a launcher (how a one-GPU train.engine=torch run starts), in its own session."""
    env = {k: v for k, v in ENV.items() if k not in ("MASTER_PORT", "GPT4ROI_MASTER_PORT", "WORLD_SIZE")}
    return subprocess.Popen([sys.executable, str(REPO / "train_sft.py"), *args], cwd=REPO, env=env,
                            stdout=stdout, stderr=subprocess.STDOUT, text=True, start_new_session=True)


# Its own worker (and its own copy of the ZeRO-2 run): beside the LoRA group's four tests, not after them.
@pytest.mark.xdist_group("cuda_torch_engine")
def test_cuda_training_without_deepspeed_follows_zero2_and_resumes_after_kill_9(lora_run, tiny_model_dir,
                                                                                 synthetic_pix2cap, tmp_path):
    """train.engine=torch on CUDA in bf16: the first step's loss is ZeRO-2's (same weights, same batch), the end of
    the run within 2% of it (bf16 updates summed in another order); killed after its step-20 checkpoint and rerun,
    it follows its own uninterrupted run within the RoIAlign atomics' noise. The reference and the run to crash
    train side by side (two tiny models on one GPU)."""
    runs = {name: tmp_path / name for name in ("reference", "crashed")}
    args = {name: recipe(tiny_model_dir, synthetic_pix2cap, out, f"train.max_steps={STEPS}", f"train.save_steps={HALF}",
                         *LORA, "train.engine=torch") for name, out in runs.items()}
    with open(tmp_path / "reference.log", "w") as log:  # a file: nobody reads its pipe while the other trains
        reference = one_process(args["reference"], stdout=log)
        try:
            kill_9_after_the_half_way_checkpoint(one_process(args["crashed"]), runs["crashed"])
            finish(one_process(args["crashed"]))
        finally:
            try:
                reference.wait(timeout=300)
            finally:
                kill_group(reference)
    assert reference.returncode == 0, (tmp_path / "reference.log").read_text()[-4000:]
    zero2, ref, resumed = losses(lora_run), losses(runs["reference"]), losses(runs["crashed"])
    assert sorted(ref) == sorted(resumed) == list(range(1, STEPS + 1))
    assert ref[1] == pytest.approx(zero2[1], rel=1e-3)
    tail = range(STEPS - 2, STEPS + 1)
    assert sum(ref[s] for s in tail) == pytest.approx(sum(zero2[s] for s in tail), rel=2e-2)
    for step in range(HALF + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(ref[step], rel=1e-3), (step, resumed[step], ref[step])
    assert (runs["crashed"] / "checkpoints" / f"step_{STEPS}" / "engine_state.pt").is_file()


@LORA_GROUP
def test_cuda_adapter_export_loads_in_plain_peft_and_equals_the_merged_export(lora_run, tiny_model_dir, tmp_path):
    from peft import PeftModel

    from gpt4roi_sft import load_model

    adapter, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    run_module("gpt4roi_sft.export", "--checkpoint", str(lora_run), "--out", str(adapter))
    run_module("gpt4roi_sft.export", "--checkpoint", str(lora_run), "--out", str(merged_dir), "--merge")
    base, processor = load_model(tiny_model_dir)
    with_adapter = PeftModel.from_pretrained(base, str(adapter)).to(DEVICE).eval()
    merged = load_model(str(merged_dir))[0].to(DEVICE).eval()
    from PIL import Image

    batch = processor(images=[Image.new("RGB", (160, 120), (40, 120, 200))],
                      texts=["The <image> provides an overview of the picture.\nWhat is in region1 <bbox>?"],
                      boxes=[[[20, 20, 90, 100]]])
    batch = {k: ([t.to(DEVICE) for t in v] if isinstance(v, list) else v.to(DEVICE)) for k, v in batch.items()
             if isinstance(v, (torch.Tensor, list))}
    with torch.no_grad():
        a, b = with_adapter(**batch).logits, merged(**batch).logits
    assert (a - b).abs().max().item() < 1e-3


def test_cuda_zero3_full_finetune_gathers_and_exports(tiny_model_dir, synthetic_pix2cap, tmp_path):
    from gpt4roi_sft import load_model

    out = tmp_path / "zero3"
    train(recipe(tiny_model_dir, synthetic_pix2cap, out, "train.max_steps=10", "train.save_steps=10",
                 "model.freeze=stage2", "deepspeed.config=ds_configs/zero3.json"))
    assert len(losses(out)) == 10
    run_module("gpt4roi_sft.export", "--checkpoint", str(out), "--out", str(tmp_path / "full"))
    model, _ = load_model(str(tmp_path / "full"))
    base, _ = load_model(tiny_model_dir)
    changed = [n for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()) if not torch.equal(p, q)]
    assert any(n.startswith("language_model.") for n in changed) and any(n.startswith("region_encoder.") for n in changed)


def test_cuda_qlora_nf4_trains_and_exports(tiny_model_dir, synthetic_pix2cap, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    train(recipe(tiny_model_dir, synthetic_pix2cap, out, "train.max_steps=10", "train.save_steps=10", *LORA,
                 "lora.qlora=true", "deepspeed.config=ds_configs/zero2.json"))
    log = losses(out)
    assert len(log) == 10 and all(v == v for v in log.values())
    run_module("gpt4roi_sft.export", "--checkpoint", str(out), "--out", str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_cuda_generation_runs_in_bf16_with_boxes_and_masks(tiny_model_dir, tmp_path):
    """Pixel values, boxes and region masks built on the host reach a bf16 model on CUDA (mask-aware encoder)."""
    from PIL import Image

    from gpt4roi_sft import load_model
    from gpt4roi_sft.infer import RegionCaptioner, RegionRequest, inference_dtype
    from quickstart.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "mask_model", region_mode="box+mask")
    model, processor = load_model(model_dir, torch_dtype=inference_dtype(DEVICE))
    model = model.to(DEVICE).eval()
    assert next(model.parameters()).dtype == (torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    image = Image.new("RGB", (160, 120), (40, 120, 200))
    prompt = "<image>\nWhat is region1 <bbox>?"
    batch = processor(images=[image], texts=[prompt], boxes=[[[20, 20, 90, 100]]])
    size = model.config.image_size
    masks = [torch.zeros(1, size, size)]
    masks[0][:, 10:50, 10:60] = 1
    with torch.inference_mode():
        new = model.generate(input_ids=batch["input_ids"].to(DEVICE), attention_mask=batch["attention_mask"].to(DEVICE),
                             pixel_values=batch["pixel_values"], boxes=batch["boxes"], region_masks=masks,
                             max_new_tokens=4, do_sample=False)
    assert new.shape[0] == 1 and new.device.type == DEVICE
    # two rows of one image, shared: the distinct images and their regions' order are found where the model runs
    batch = processor(images=[image, image], texts=[prompt, prompt], boxes=[[[20, 20, 90, 100]], [[30, 10, 80, 60]]])
    with torch.inference_mode():
        shared = model.generate(input_ids=batch["input_ids"].to(DEVICE), attention_mask=batch["attention_mask"].to(DEVICE),
                                pixel_values=batch["pixel_values"], boxes=batch["boxes"], region_masks=masks + masks,
                                max_new_tokens=4, do_sample=False, share_prefix=True)
    assert shared.shape[0] == 2 and shared.device.type == DEVICE
    box_model, box_processor = load_model(tiny_model_dir, torch_dtype=torch.bfloat16)
    captioner = RegionCaptioner(box_model.to(DEVICE).eval(), box_processor)
    assert len(captioner([RegionRequest(image, prompt, [[20, 20, 90, 100]])])) == 1


def test_cuda_eval_vg_generates_in_bf16_and_scores_later_without_a_model(tiny_model_dir, synthetic_pix2cap, tmp_path):
    # its own short LoRA run, so this test runs beside the 40-step one instead of after it
    trained, adapter = tmp_path / "lora", tmp_path / "adapter"
    train(recipe(tiny_model_dir, synthetic_pix2cap, trained, "train.max_steps=6", "train.save_steps=6", *LORA,
                 "deepspeed.config=ds_configs/zero2.json"))
    run_module("gpt4roi_sft.export", "--checkpoint", str(trained), "--out", str(adapter))
    out = tmp_path / "vg"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "eval_vg.sh"), "--model", tiny_model_dir, "--adapter", str(adapter),
                           "--annotations", str(synthetic_pix2cap["vg_test"]), "--image-root", str(synthetic_pix2cap["root"]),
                           "--out", str(out), "--max-new-tokens", "16", "--batch-size", "16"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions and all(isinstance(p["caption"], str) for p in predictions)
    if not (out / "metrics.json").is_file():  # no Java or pycocoevalcap on this machine: said in one line
        assert "--score-only" in proc.stdout + proc.stderr
    # Scoring needs neither the model nor a GPU.
    cpu_env = {**ENV, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    scored = subprocess.run([sys.executable, "-m", "eval.vg", "--score-only", "--annotations", str(synthetic_pix2cap["vg_test"]),
                             "--out", str(out)], cwd=REPO, env=cpu_env, capture_output=True, text=True, timeout=300)
    if (out / "metrics.json").is_file() or scored.returncode == 0:  # this machine can score
        assert scored.returncode == 0, scored.stderr[-3000:]
        assert "CIDEr" in json.loads((out / "metrics.json").read_text())
    else:  # it cannot: one line that says why, exit 2, predictions kept for a machine that can
        assert scored.returncode == 2 and "Traceback" not in scored.stderr, scored.stderr[-3000:]
        assert "--score-only: scoring needs" in scored.stderr.strip().splitlines()[-1]
        assert (out / "predictions.json").is_file()


def test_cuda_eval_vipbench_generates_in_bf16(tiny_model_dir, tmp_path):
    fixture = tmp_path / "vip"
    run_module("data_converters.synthetic_vipbench", "--out", str(fixture), "--questions", "4")
    out = tmp_path / "vip_out"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "eval_vipbench.sh"), "--model", tiny_model_dir, "--data", str(fixture),
                           "--split", "bbox", "--out", str(out), "--max-new-tokens", "16"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    answers = json.loads((out / "results.json").read_text())
    assert len(answers) == 4
