"""The benchmarks: FLOP accounting checked by hand and against the real modules, and the throughput CLI's CPU mode.

Timings are never asserted (they depend on the machine); only that the script runs both arms and writes a
well-formed result.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from conftest import REPO, free_port

sys.path.insert(0, str(REPO))  # `bench` is a folder of scripts, not an installed package

from bench.flops import FlopModel, LLMShape, RegionShape, VisionShape, mfu, peak_flops_for  # noqa: E402
from bench.throughput.engine import real_config, tiny_bench_config  # noqa: E402
from bench.throughput.report import summary_table  # noqa: E402
from bench.throughput.samples import SampleShape, synthetic_sample  # noqa: E402

# The GPU tests below time the liger lever; without the package (bench/run_gpu.sh installs its carried wheel) that
# arm could only be dropped, which says nothing about this code.
NEEDS_LIGER = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

# A shape small enough to count on paper.
LLM = LLMShape(layers=2, hidden=8, heads=2, head_dim=4, kv_heads=2, intermediate=16, vocab=10)
VISION = VisionShape(layers=1, hidden=4, intermediate=8, patch=2, image_size=4)
REGION = RegionShape(vision_hidden=4, hidden=4, llm_hidden=8, grid=2, roi=2, fuse_rounds=1)


def linear_weights(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def test_llm_matmul_params_by_hand():
    # per block: q, k, v, o 8x8 = 64 each; gate, up, down 8x16 = 128 each -> 640; two blocks + head 8x10
    assert LLM.matmul_params() == 2 * 640 + 80


def test_lora_params_by_hand():
    # rank 2, per block: 4 x 2(8+8) + 3 x 2(8+16) = 128 + 144 = 272; two blocks
    assert LLM.lora_params(2) == 544


def test_vision_forward_flops_by_hand():
    # grid 2 -> 5 tokens with CLS; N_v = 4*16 + 2*4*8 + 3*2*2*4 = 176; 2*176*5 + 4*1*4*5^2
    assert VISION.tokens == 5
    assert VISION.matmul_params() == 176
    assert VISION.forward_flops() == 1760 + 400


def test_region_encoder_forward_flops_by_hand():
    # maps 16^2 + 8^2 + 4^2 + 2^2 = 340 pixels; 1x1 convs 6 -> 4, one round of 3x3 convs 4 -> 4
    assert REGION.map_pixels() == 340
    assert REGION.per_image_forward_flops() == 2 * 340 * 4 * 6 + 2 * 340 * 9 * 4 * 4
    # per box: four 3x3 convs on 2x2, flatten 16 -> 4, box MLP 4 -> 4 -> 4, output 4 -> 8
    assert REGION.per_region_forward_flops() == 4 * 2 * 4 * 9 * 16 + 2 * 16 * 4 + 2 * (16 + 16) + 2 * 4 * 8


def test_sample_flops_lora_by_hand():
    model = FlopModel(LLM, VISION, REGION, projector_params=32, llm_frozen=1360, llm_trained=544)
    flops = model.sample_flops(seq_len=5, num_images=1, num_regions=2)
    assert flops["llm_dense"] == 5 * (4 * 1360 + 6 * 544)
    assert flops["llm_attention"] == 12 * 2 * 2 * 4 * 5 * 5
    assert flops["vision_tower"] == 2160  # forward only: frozen, under no_grad
    assert flops["projector"] == 6 * 32 * 4  # trained, one LLM token per patch
    assert flops["region_encoder"] == 3 * (REGION.per_image_forward_flops() + 2 * REGION.per_region_forward_flops())
    total = model.batch_flops([{"seq_len": 5, "num_images": 1, "num_regions": 2}] * 3)
    assert total["total"] == pytest.approx(3 * sum(flops.values()))


def test_attention_term_uses_each_packed_sample_length():
    model = FlopModel(LLM, VISION, REGION, projector_params=32, llm_frozen=1360, llm_trained=0)
    packed = model.batch_flops([{"seq_len": 3, "num_images": 0, "num_regions": 0}, {"seq_len": 7, "num_images": 0, "num_regions": 0}])
    assert packed["llm_attention"] == 12 * 2 * 2 * 4 * (3 * 3 + 7 * 7)  # not (3 + 7)^2: no attention across samples


def test_full_ft_counts_every_llm_weight_as_trained():
    cfg = tiny_bench_config("sdpa")
    full, lora = FlopModel.from_config(cfg, full_ft=True), FlopModel.from_config(cfg, lora_rank=8)
    n = LLMShape.from_config(cfg.text_config).matmul_params()
    assert (full.llm_frozen, full.llm_trained) == (0, n)
    assert (lora.llm_frozen, lora.llm_trained) == (n, LLMShape.from_config(cfg.text_config).lora_params(8))


def test_shapes_match_the_tiny_model_modules():
    from peft import LoraConfig, get_peft_model

    from gpt4roi_sft.model.modeling import GPT4RoIForCausalLM
    from gpt4roi_sft.train.modes import lora_target_regex

    cfg = tiny_bench_config("sdpa")
    model = GPT4RoIForCausalLM(cfg)
    assert linear_weights(model.language_model) == LLMShape.from_config(cfg.text_config).matmul_params()
    vision = VisionShape.from_config(cfg.vision_config)
    patch = sum(m.weight.numel() for m in model.vision_tower.modules() if isinstance(m, nn.Conv2d))
    assert linear_weights(model.vision_tower) + patch == vision.matmul_params()
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=lora_target_regex(model, "all-linear")))
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert lora == LLMShape.from_config(cfg.text_config).lora_params(8)


def test_region_encoder_flops_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from gpt4roi_sft.model.modeling import GPT4RoIForCausalLM

    cfg = tiny_bench_config("sdpa")
    encoder = GPT4RoIForCausalLM(cfg).region_encoder
    grid, width = cfg.patch_grid, cfg.vision_config.hidden_size
    feats = [torch.randn(2, grid * grid, width) for _ in range(4)]
    boxes = [torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.2, 0.3, 0.9, 0.8]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]])]
    with FlopCounterMode(display=False) as counter:
        encoder(feats, boxes)
    shape = RegionShape.from_config(cfg)
    assert counter.get_total_flops() == 2 * shape.per_image_forward_flops() + 3 * shape.per_region_forward_flops()


def test_real_shapes_match_vicuna_7b_and_clip_vit_l():
    from gpt4roi_sft.model.modeling import GPT4RoIForCausalLM

    cfg = real_config(336, "sdpa")
    with torch.device("meta"):
        model = GPT4RoIForCausalLM(cfg)
    llm = LLMShape.from_config(cfg.text_config)
    assert linear_weights(model.language_model) == llm.matmul_params() == 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 32000
    vision = VisionShape.from_config(cfg.vision_config)
    assert vision.tokens == 577
    assert vision.forward_flops() == pytest.approx(0.38e12, rel=0.03)  # ViT-L/14-336, perf_anchors.md
    assert VisionShape.from_config(real_config(224, "sdpa").vision_config).forward_flops() == pytest.approx(0.16e12, rel=0.05)


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12)])
def test_peak_flops_by_device_name(name, peak):
    assert peak_flops_for(name) == peak


def test_mfu_is_null_without_a_peak():
    assert peak_flops_for("CPU: Intel(R) Xeon(R)") is None
    assert mfu(1e12, 1.0, None) is None
    assert mfu(400e12, 1.0, 1000e12) == pytest.approx(0.4)


def test_synthetic_sample_is_pix2cap_shaped():
    import numpy as np

    shape = SampleShape(num_image_tokens=64, image_size=112, vocab_size=1200, image_token_id=3, bbox_token_id=4,
                        min_len=120, max_len=320)
    rng = np.random.default_rng(0)
    for i in range(20):
        item = synthetic_sample(shape, rng, i)
        ids, labels = item["input_ids"], item["labels"]
        assert 120 <= len(ids) <= 320
        assert int((ids == 3).sum()) == 64
        assert int((ids == 4).sum()) == len(item["boxes"]) >= 1
        trained = labels != -100
        assert torch.equal(labels[trained], ids[trained])
        assert not trained[ids == 3].any() and not trained[ids == 4].any()
        assert (item["boxes"][:, 2:] > item["boxes"][:, :2]).all() and item["boxes"].max() <= 1


def run_bench(*args, timeout=240):
    cmd = [sys.executable, str(REPO / "bench" / "train_throughput.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env={**ENV, "MASTER_PORT": str(free_port())}, capture_output=True, text=True,
                          timeout=timeout)


def test_tiny_cpu_run_writes_both_arms(tmp_path):
    out = tmp_path / "result.json"
    proc = run_bench("--tiny", "--warmup", "2", "--steps", "2", "--eval-generation", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    for key in ("device", "tokens_per_s", "mfu", "peak_mem_gb", "baseline_tokens_per_s", "speedup_vs_baseline", "settings",
                "mfu_vs_matmul", "flops_per_token", "matmul_tflops", "arms", "generation"):
        assert key in result, key
    assert result["device"].startswith("CPU")
    assert result["mfu"] is None and result["baseline_mfu"] is None  # no peak table entry for a CPU
    assert result["tokens_per_s"] > 0 and result["baseline_tokens_per_s"] > 0
    assert result["speedup_vs_baseline"] == pytest.approx(result["tokens_per_s"] / result["baseline_tokens_per_s"])
    assert result["mfu_vs_matmul"] > 0
    ours, base = result["arms"]["ours"], result["arms"]["baseline"]
    assert ours["steps"] == base["steps"] == 2
    assert result["engine_steps"] == {"optimizer": 8, "micro": 8}  # 2 warm-up + 2 timed optimizer steps per arm
    assert result["torch_compile"] == {"unique_graphs": 0, "graph_breaks": 0, "recompile_limit_hit": False}  # no compile arm
    assert ours["tokens"] == base["tokens"]  # same samples, real tokens only
    assert ours["model_flops"] == pytest.approx(base["model_flops"])
    assert result["generation"]["regions_per_s"] > 0
    assert result["settings"]["tiny"] and result["settings"]["zero"] == "2"
    assert "ours" in proc.stdout and "baseline" in proc.stdout and "speedup vs baseline" in proc.stdout
    table = summary_table([result]).splitlines()
    assert len(table) == 3 and result["settings"]["label"] in table[2]


def test_tiny_cpu_run_times_lever_arms_with_medians_shapes_outliers_and_a_budget_search(tmp_path):
    out = tmp_path / "levers.json"
    proc = run_bench("--tiny", "--warmup", "1", "--steps", "3", "--pack-tokens", "1024", "--arm", "baseline=padded",
                     "--arm", "packed=packed", "--arm", "nodrop=packed+nodrop+channels_last+ds_sync_free",
                     "--arm", "liger=packed+nodrop+liger", "--arm", "varlen=packed+varlen", "--arm", "big=packed+nodrop@2048",
                     "--max-budget-search", "--search-levers", "nodrop", "--search-limit", "1024", "--search-memory-gb", "50",
                     "--search-checkpointing", "off,2,1",
                     "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    arms = result["arms"]
    assert "needs a CUDA GPU" in arms["liger"]["failed"]  # dropped with its reason; the others ran
    base, packed, fast, big = arms["baseline"], arms["packed"], arms["nodrop"], arms["big"]
    assert base["tokens"] == packed["tokens"] == fast["tokens"] != big["tokens"]  # same grouping, same samples
    assert arms["varlen"]["levers"]["model.attn_implementation"] == "torch_varlen"
    assert "failed" not in arms["varlen"] and arms["varlen"]["tokens"] == packed["tokens"]  # CPU: per-sample sdpa
    assert max(packed["tokens_per_step_mean"], fast["tokens_per_step_mean"]) <= 1024 < big["tokens_per_step_mean"]
    for arm in (base, packed, fast, big):
        assert arm["steps"] == 3 and len(arm["step_times_s"]) == 3
        assert arm["step_time_s_median"] == pytest.approx(sorted(arm["step_times_s"])[1], abs=1e-4)
        assert arm["distinct_shapes"] == len(arm["shapes"]) >= 1
        assert all(o["seconds"] > 1.5 * arm["step_time_s_median"] for o in arm["outlier_steps"])
        assert arm["speedup_vs_baseline_median"] == pytest.approx(arm["tokens_per_s_median"] / base["tokens_per_s_median"])
        assert 0 < arm["host_issue_s_median"] <= arm["step_time_s_median"] and arm["device_tail_s_median"] >= 0
        assert "profiled_step" not in arm  # --profile-busy was not asked for (and needs a GPU)
    assert all(w % 128 == 0 for _, w in packed["shapes"])  # packed rows rounded to --pad-to-multiple
    assert fast["levers"]["lora.dropout=0"] and fast["levers"]["model.channels_last"] and fast["levers"]["deepspeed.overrides"]
    assert result["ours_arm"] in ("packed", "nodrop", "varlen", "big") and result["levers"] == arms[result["ours_arm"]]["levers"]
    for key in ("tokens_per_s_median", "speedup_vs_baseline_median", "mfu_median", "mfu_vs_matmul_median"):
        assert key in result, key
    assert result["settings"]["pack_tokens"] == 1024 and result["settings"]["fused_adamw"] is False  # CPU: plain AdamW
    searches = result["budget_search"]
    assert [(s["gradient_checkpointing"], s["checkpoint_every"]) for s in searches] == [(False, None), (True, 2), (True, 1)]
    assert all(s["max_pack_tokens"] == 1024 and s["first_oom"] is None and s["levers"] == ["nodrop"] for s in searches)
    assert all(s["memory_cap_gb"] is None for s in searches) and "--search-memory-gb caps CUDA memory" in proc.stderr
    assert "largest data.pack_tokens that fits" in proc.stdout


def assert_refused(capsys, argv, message):
    """bench/train_throughput.py's argument checks (exit 2, the reason on stderr) before it builds anything."""
    from bench.train_throughput import parse_args

    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_gradient_accumulation_times_one_optimizer_step_over_that_many_micro_batches(tmp_path, capsys):
    """--grad-accum 2: each timed step is the trainer's optimizer_step over two micro-batches (one optimizer step
    of the engine), its tokens and FLOPs those of both; a step's samples are the same in every arm, and the same
    for the DeepSpeed-free engine."""
    out = tmp_path / "accum.json"
    common = ("--tiny", "--warmup", "1", "--steps", "2", "--pack-tokens", "1024", "--pack-length", "512", "--grad-accum", "2")
    proc = run_bench(*common, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    arms = 2  # baseline and ours, 1 warm-up + 2 timed steps each
    assert result["engine_steps"] == {"optimizer": arms * 3, "micro": arms * 3 * 2}
    assert result["settings"]["gradient_accumulation_steps"] == 2 and "accum 2" in result["settings"]["label"]
    for arm in result["arms"].values():
        assert arm["micro_batches_per_step"] == 2 and arm["steps"] == 2 and len(arm["step_times_s"]) == 2
        assert 1024 < arm["tokens_per_step_mean"] <= 2048  # two micro-batches of at most 1024 real tokens
    assert result["arms"]["ours"]["tokens"] == result["arms"]["baseline"]["tokens"]
    assert result["arms"]["ours"]["model_flops"] == pytest.approx(result["arms"]["baseline"]["model_flops"])
    assert_refused(capsys, [*common, "--max-budget-search"], "without --grad-accum")  # the search's step is one micro-batch

    # --engine torch: the DeepSpeed-free step trains the same samples to the same losses (fp32 here: exactly the
    # same update, its loss scaled by 1 / accumulation, clipped, AdamW) in as many optimizer and micro-steps.
    without_ds = tmp_path / "torch_engine.json"
    proc = run_bench(*common, "--engine", "torch", "--out", str(without_ds))
    assert proc.returncode == 0, proc.stderr[-4000:]
    plain = json.loads(without_ds.read_text())
    assert plain["engine_steps"] == result["engine_steps"]
    assert plain["settings"]["engine"] == "torch" and plain["settings"]["zero"] is None
    assert "no-DeepSpeed" in plain["settings"]["label"]
    for name, arm in result["arms"].items():
        assert plain["arms"][name]["final_loss"] == pytest.approx(arm["final_loss"], rel=1e-6), name
        assert plain["arms"][name]["tokens"] == arm["tokens"]
    assert_refused(capsys, ["--tiny", "--engine", "torch", "--arm", "x=packed+ds_sync_free"], "drop the ds_sync_free lever")


def test_search_checkpointing_variants_run_from_the_least_saving_to_the_most():
    from bench.train_throughput import parse_checkpointing_variants

    assert parse_checkpointing_variants("both") == [None, 1]
    assert parse_checkpointing_variants("off,4,2,1") == [None, 4, 2, 1]
    for bad, words in (("1,off", "least saving to the most"), ("off,off", "twice"), ("off,0", "neither off"),
                       ("half", "neither off")):
        with pytest.raises(ValueError, match=words):
            parse_checkpointing_variants(bad)


def test_budget_search_past_its_deadline_tries_nothing_and_says_why():
    from bench.throughput.arms import find_max_budget

    class Switch:
        def set(self, levers):
            self.levers = levers

    found = find_max_budget(None, None, Switch(), frozenset(), 512, 128, torch.device("cpu"), torch.float32, 512, 2048,
                            deadline=time.monotonic() - 1)
    assert found["max_pack_tokens"] == 0 and found["first_oom"] is None
    assert found["stopped_by"] == "time limit reached before trying 512 tokens"


def dispatch_count(out, *args):
    """``bench/dispatch_count.py`` on the tiny engine at 1 and 2 LLM layers (2 vision layers, LoRA r=4): its JSON
    and its printed report."""
    cmd = [sys.executable, str(REPO / "bench" / "dispatch_count.py"), "--layers", "1", "2", "--vision-layers", "2",
           "--lora-r", "4", "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=REPO, env={**ENV, "MASTER_PORT": str(free_port())}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_dispatch_count_counts_each_phase_per_layer_and_sees_the_host_levers(tmp_path):
    """Counts per phase grow by a fixed number per decoder layer, and the levers that remove host work show it
    (LoRA dropout 0 in the forward, DeepSpeed's overflow check in the step, contiguous gradients in the backward's
    hooks), and so do gradient accumulation and the DeepSpeed-free step."""
    result, report = dispatch_count(tmp_path / "dispatch.json", "--arm", "plain=packed", "--arm", "nodrop=packed+nodrop",
                                    "--arm", "sync_free=packed+ds_sync_free", "--arm", "nocontig=packed+ds_nocontig")
    assert [d["layers"] for d in result["depths"]] == [1, 2] and result["zero_stage"] == 2
    fit = result["per_layer"]
    plain = fit["plain"]
    for phase in ("forward", "backward", "step"):
        assert plain[phase]["per_layer"] > 0 and plain[phase]["linear"], phase
    assert plain["total"]["at_7b_depth"] == round(plain["total"]["fixed"] + 32 * plain["total"]["per_layer"])
    assert fit["nodrop"]["forward"]["per_layer"] < plain["forward"]["per_layer"]
    assert fit["nodrop"]["backward"]["per_layer"] <= plain["backward"]["per_layer"]
    assert fit["sync_free"]["step"]["per_layer"] < plain["step"]["per_layer"]
    assert fit["nocontig"]["backward"]["per_layer"] < plain["backward"]["per_layer"]
    assert fit["nocontig"]["forward"] == plain["forward"]
    deepest = result["depths"][-1]["arms"]["plain"]["by_source"]
    assert {"deepspeed", "autograd"} <= set(deepest["backward"]) and "peft" in deepest["forward"]
    assert "per layer" in report and "nocontig" in report

    # --grad-accum 2: a decoder layer's forward is the same per micro-step; the optimizer step's work (the same
    # operations as without accumulation) counts half per micro-step. (The fixed forward part depends on the
    # counted micro-batch's images and regions, so it is not compared.)
    two, report = dispatch_count(tmp_path / "accum2.json", "--grad-accum", "2", "--arm", "plain=packed")
    assert two["gradient_accumulation_steps"] == 2 and "optimizer step of 2 micro-steps" in report
    halved = two["per_layer"]["plain"]
    assert halved["forward"]["per_layer"] == plain["forward"]["per_layer"]
    assert halved["step"]["per_layer"] == plain["step"]["per_layer"] / 2 > 0
    assert halved["step"]["fixed"] == plain["step"]["fixed"] / 2

    # --engine torch: the same forward per decoder layer as DeepSpeed's, a backward without its gradient hooks, and
    # an optimizer step of multi-tensor ops whose count does not grow with the layers.
    plain_torch, report = dispatch_count(tmp_path / "torch_engine.json", "--engine", "torch", "--arm", "nodrop=packed+nodrop")
    assert plain_torch["engine"] == "torch" and plain_torch["zero_stage"] is None and "no DeepSpeed" in report
    no_ds = plain_torch["per_layer"]["nodrop"]
    assert no_ds["forward"]["per_layer"] == fit["nodrop"]["forward"]["per_layer"]
    assert no_ds["backward"]["per_layer"] < fit["nocontig"]["backward"]["per_layer"]
    assert no_ds["step"]["per_layer"] == 0 < no_ds["step"]["fixed"]
    sources = plain_torch["depths"][-1]["arms"]["nodrop"]["by_source"]
    assert not any("deepspeed" in sources[phase] for phase in sources)


def test_busy_length_counts_overlapping_device_intervals_once():
    from bench.throughput.arms import busy_length

    assert busy_length([]) == 0
    assert busy_length([(0, 10), (20, 25)]) == 15  # a gap is not busy
    assert busy_length([(0, 10), (5, 15), (2, 4)]) == 15  # overlap and nesting (two streams) count once
    assert busy_length([(30, 40), (0, 10), (10, 12)]) == 22  # unsorted, touching


def test_arm_specs_name_their_levers_and_budget():
    from bench.throughput.levers import parse_arm

    arm = parse_arm("fast=packed+nodrop+liger@8192")
    assert (arm.name, arm.collate, arm.levers, arm.budget) == ("fast", "packed", {"nodrop", "liger"}, 8192)
    assert arm.describe() == "packed+liger+nodrop@8192"
    for bad, message in (("x=packed+turbo", "unknown lever"), ("x=padded+nodrop", "without levers"), ("packed", "NAME=COLLATE"),
                         ("x=rows", "collate 'rows'"), ("x=packed@lots", "not a number")):
        with pytest.raises(ValueError, match=message):
            parse_arm(bad)


def test_lever_switch_turns_lora_dropout_and_channels_last_off_again(tiny_model_dir):
    from types import SimpleNamespace

    from bench.throughput.levers import LeverSwitch
    from gpt4roi_sft import load_model
    from gpt4roi_sft.config import load_config
    from gpt4roi_sft.model.region_encoder import RegionEncoder
    from gpt4roi_sft.train.modes import apply_training_mode

    model, _ = load_model(tiny_model_dir)
    model = apply_training_mode(model, load_config(None, ["lora.enabled=true", "lora.r=4", "lora.dropout=0.1", "model.freeze=stage2"]))
    switch = LeverSwitch(SimpleNamespace(module=model, optimizer=object()), torch.device("cpu"))

    def dropouts():
        return sum(isinstance(m, nn.Dropout) for n, m in model.named_modules() if "lora_dropout" in n)

    def channels_last():
        return {m.channels_last for m in model.modules() if isinstance(m, RegionEncoder)}

    before = dropouts()
    assert before > 0 and channels_last() == {False}
    switch.set(frozenset({"nodrop", "channels_last"}))
    assert dropouts() == 0 and channels_last() == {True}
    switch.set(frozenset({"channels_last"}))
    assert dropouts() == before and channels_last() == {True}
    switch.set(frozenset())
    assert dropouts() == before and channels_last() == {False}
    switch.set(frozenset({"varlen"}))
    assert {model.get_base_model().language_model.config._attn_implementation} == {"torch_varlen"}
    switch.set(frozenset())
    assert model.get_base_model().language_model.config._attn_implementation == "sdpa"


def test_real_shape_mode_refuses_to_run_on_cpu(tmp_path):
    proc = run_bench("--out", str(tmp_path / "x.json"), timeout=120)
    assert proc.returncode != 0
    assert "needs a CUDA GPU" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def run_eval_bench(*args, timeout=300):
    cmd = [sys.executable, str(REPO / "bench" / "eval_throughput.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_eval_bench_tiny_cpu_run_times_both_arms_through_the_vg_harness(tmp_path):
    out = tmp_path / "eval.json"
    proc = run_eval_bench("--tiny", "--regions", "6", "--eager-regions", "4", "--eager-batch-size", "2",
                          "--unshared-regions", "4", "--new-tokens", "3", "--images", "2", "--repeats", "1",
                          "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["device"].startswith("CPU") and result["new_tokens_per_region"] == 3
    assert result["regions_per_s"] == result["arms"]["fast"]["regions_per_s"] > 0
    fast, eager = result["arms"]["fast"], result["arms"]["eager"]
    assert (fast["regions"], eager["regions"], eager["batch_size"]) == (6, 4, 2)
    assert fast["batch_size"] == 8  # --batch-size auto on the CPU
    assert fast["new_tokens"] == 6 * 3 and eager["new_tokens"] == 4 * 3  # min_new_tokens forces the length
    for key in ("new_tokens_per_s", "ms_per_decode_step", "prefill_s_per_batch", "prepare_s_per_batch", "peak_mem_gb"):
        assert isinstance(fast[key], float) and isinstance(eager[key], float), key
    assert result["answers_equal_fraction"] == 1.0  # fp32 on the CPU: the fast path answers as eager does
    unshared = result["arms"]["fast_unshared"]
    assert unshared["regions"] == 4 and result["regions_per_s_unshared"] == unshared["regions_per_s"] > 0
    assert fast["regions_per_image"] == 3.0  # 6 regions of 2 synthetic images
    assert "fast vs eager" in proc.stdout


def test_eval_bench_7b_mode_refuses_to_run_on_cpu(tmp_path):
    proc = run_eval_bench("--out", str(tmp_path / "x.json"), timeout=120)
    assert proc.returncode != 0 and "needs a CUDA GPU" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_data_loading_bench_writes_samples_per_second(tmp_path):
    out = tmp_path / "loading.json"
    cmd = [sys.executable, str(REPO / "bench" / "data_loading.py"), "--images", "4", "--workers", "0", "--passes", "1",
           "--micro-batch", "2", "--image-size", "224", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["workers"] == 0 and run["samples"] == result["settings"]["records"] >= 4
    assert run["samples_per_s"] > 0


def test_segcap_eval_bench_writes_seconds_stages_and_counts(tmp_path):
    out = tmp_path / "segcap.json"
    cmd = [sys.executable, str(REPO / "bench" / "segcap_eval.py"), "--images", "6", "--width", "96", "--height", "72",
           "--workers", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["settings"]["images"] == 6 and result["seconds"] > 0
    assert set(result["stages_s"]) == {"images", "captions", "mAP"}
    assert result["counts"]["TP"] > 0 and result["counts"]["FP"] + result["counts"]["FN"] > 0


def test_quickstart_spread_refuses_to_measure_over_an_earlier_run(tmp_path):
    (tmp_path / "seed1").mkdir()
    (tmp_path / "seed1" / "report.json").write_text("{}")
    cmd = [sys.executable, str(REPO / "bench" / "quickstart_seeds.py"), "--seeds", "1", "--runs", str(tmp_path),
           "--out", str(tmp_path / "spread.json")]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (tmp_path / "seed1" / "report.json").exists() and not (tmp_path / "spread.json").exists()


def test_quickstart_spread_rows_give_accuracy_with_chance_and_ratio():
    from bench.quickstart_seeds import table_rows

    run = {"seed": 2, "wall_s": 301.4, "after": {"Bleu_4": 0.5, "METEOR": 0.4, "ROUGE_L": 0.6, "CIDEr": 3.5},
           "attribute_accuracy": 0.45, "chance": 0.09, "ratio_to_chance": 5.0}
    assert table_rows([run]) == ["| 2 | 301 s | 50.0 | 40.0 | 60.0 | 350.0 | 45.0 (9.0; 5.0x) |"]


def test_attention_switch_sets_and_restores_every_config():
    from bench.throughput.arms import attention_implementation
    from gpt4roi_sft.model.modeling import GPT4RoIForCausalLM

    model = GPT4RoIForCausalLM(tiny_bench_config("sdpa"))
    configs = [model.config, model.config.text_config, model.language_model.config]
    with attention_implementation(model, "eager"):
        assert all(c._attn_implementation == "eager" for c in configs)
    assert all(c._attn_implementation == "sdpa" for c in configs)


def test_padding_a_packed_batch_adds_one_untrained_tail_sequence():
    import numpy as np

    from bench.throughput.samples import pad_packed_batch
    from gpt4roi_sft.data.collator import PackingCollator, packed_sequence_lengths

    shape = SampleShape(num_image_tokens=64, image_size=112, vocab_size=1200, image_token_id=3, bbox_token_id=4,
                        min_len=120, max_len=320)
    rng = np.random.default_rng(1)
    items = [synthetic_sample(shape, rng, i) for i in range(3)]
    packed = PackingCollator(1000, 0)(items)
    width = packed["input_ids"].shape[1]
    wide = pad_packed_batch(packed, 1024)
    assert wide["input_ids"].shape == wide["labels"].shape == wide["position_ids"].shape == (1, 1024)
    assert torch.equal(wide["input_ids"][:, :width], packed["input_ids"])
    assert (wide["labels"][:, width:] == -100).all()
    assert packed_sequence_lengths(wide["position_ids"]) == [len(it["input_ids"]) for it in items] + [1024 - width]
    assert wide["cu_seq_lens_q"].tolist()[-2:] == [width, 1024] and wide["max_length_q"] == max(
        max(len(it["input_ids"]) for it in items), 1024 - width)
    assert wide["num_tokens"] == packed["num_tokens"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_gpu_run_has_a_peak_and_a_working_flex_arm(tmp_path):
    out = tmp_path / "result.json"
    env = {k: v for k, v in ENV.items() if k != "DS_ACCELERATOR"}
    cmd = [sys.executable, str(REPO / "bench" / "train_throughput.py"), "--tiny", "--precision", "bf16", "--warmup", "2",
           "--steps", "2", "--flex-arm", "--out", str(out), "--port", str(free_port())]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert not result["device"].startswith("CPU")
    assert "failed" not in result["arms"]["ours_flex"], result["arms"]["ours_flex"]
    assert result["arms"]["ours_flex"]["tokens"] == result["arms"]["baseline"]["tokens"]
    if result["peak_tflops"] is not None:
        assert 0 < result["mfu"] < 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@NEEDS_LIGER
def test_tiny_gpu_run_accumulates_two_micro_batches_per_optimizer_step(tmp_path):
    """accum4-224's path on CUDA: the trainer's optimizer_step (its NCCL loss-denominator sum included) over two
    micro-batches, with every lever and the lever without contiguous gradients switched between steps."""
    out = tmp_path / "accum.json"
    env = {k: v for k, v in ENV.items() if k != "DS_ACCELERATOR"}
    every = "packed+nodrop+liger+channels_last+ds_sync_free"
    cmd = [sys.executable, str(REPO / "bench" / "train_throughput.py"), "--tiny", "--precision", "bf16", "--warmup", "1",
           "--steps", "2", "--pack-tokens", "1024", "--grad-accum", "2", "--skip-baseline", f"--arm=every={every}",
           f"--arm=nocontig={every}+ds_nocontig", "--out", str(out), "--port", str(free_port())]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert not {k: a["failed"] for k, a in result["arms"].items() if "failed" in a}
    assert result["engine_steps"] == {"optimizer": 6, "micro": 12}
    assert all(a["micro_batches_per_step"] == 2 and a["tokens_per_step_mean"] > 1024 for a in result["arms"].values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@NEEDS_LIGER
def test_tiny_gpu_run_trains_without_deepspeed_as_deepspeed_does(tmp_path):
    """torch-224's path on CUDA: train.engine=torch (fused AdamW on fp32 masters, multi-tensor clip) with
    every lever that is not DeepSpeed's, against the ZeRO-2 engine on the same samples: the same optimizer and
    micro-steps, final losses within bf16 noise."""
    env = {k: v for k, v in ENV.items() if k != "DS_ACCELERATOR"}
    results = {}
    for engine in ("deepspeed", "torch"):
        out = tmp_path / f"{engine}.json"
        cmd = [sys.executable, str(REPO / "bench" / "train_throughput.py"), "--tiny", "--precision", "bf16", "--warmup", "1",
               "--steps", "2", "--pack-tokens", "1024", "--grad-accum", "2", "--skip-baseline",
               "--arm=every=packed+nodrop+liger+channels_last+varlen", "--engine", engine, "--out", str(out),
               "--port", str(free_port())]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        results[engine] = json.loads(out.read_text())
        assert "failed" not in results[engine]["arms"]["every"], results[engine]["arms"]["every"]
    ds, plain = results["deepspeed"], results["torch"]
    assert plain["engine_steps"] == ds["engine_steps"] == {"optimizer": 3, "micro": 6}
    assert plain["settings"]["fused_adamw"] is True and not plain["device"].startswith("CPU")
    assert plain["arms"]["every"]["final_loss"] == pytest.approx(ds["arms"]["every"]["final_loss"], rel=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@NEEDS_LIGER
def test_tiny_gpu_run_times_every_lever(tmp_path):
    """The levers of the 7B benchmark run on this GPU (the tiny model), so the real run drops none.

    (compile is checked by tests/test_speedups.py; here it would only add its compile time.)"""
    out = tmp_path / "levers.json"
    env = {k: v for k, v in ENV.items() if k != "DS_ACCELERATOR"}
    arms = ["baseline=padded", "packed=packed", "fast=packed+nodrop+liger+channels_last+ds_sync_free+varlen+ds_nocontig"]
    cmd = [sys.executable, str(REPO / "bench" / "train_throughput.py"), "--tiny", "--precision", "bf16", "--warmup", "2",
           "--steps", "2", "--pack-tokens", "1024", *[f"--arm={a}" for a in arms], "--max-budget-search",
           "--search-limit", "2048", "--search-memory-gb", "20", "--profile-busy", "--out", str(out), "--port", str(free_port())]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    dropped = {k: a["failed"] for k, a in result["arms"].items() if "failed" in a}
    assert not dropped, dropped
    for arm in result["arms"].values():  # the profiled step saw the device's kernels
        busy = arm["profiled_step"]
        assert busy["device_kernel_s"] > 0 and 0 < busy["device_busy_fraction"] <= 1, arm["arm"]
        assert busy["device_busy_s"] is None or 0 < busy["device_busy_s"] <= min(busy["device_kernel_s"], busy["seconds"]) + 1e-6
        assert 0 < arm["host_issue_s_median"] <= arm["step_time_s_median"]
    assert result["settings"]["fused_adamw"] is True
    assert all(s["max_pack_tokens"] >= 1024 for s in result["budget_search"])
    assert all(s["memory_cap_gb"] == 20 and s["peak_mem_gb"] <= 20 for s in result["budget_search"])
