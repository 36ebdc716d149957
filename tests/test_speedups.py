"""Throughput levers (gpt4roi_sft.train.speedups): each changes how a step is computed, never its result.

On the CPU: channels-last convolutions, the fused-loss path (with a plain PyTorch stand-in for Liger's kernel),
regional torch.compile, LoRA dropout 0, Liger's refusal without CUDA and the undo of its patches. The Liger
kernels themselves need CUDA: the ``gpu`` tests compare them with the plain path within bf16 tolerance.
"""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from gpt4roi_sft.config import load_config
from gpt4roi_sft.errors import UserError
from gpt4roi_sft.train import speedups

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
CUDA = torch.cuda.is_available() and os.environ.get("GPT4ROI_GPU_TEST_DEVICE", "cuda") == "cuda"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, synthetic_pix2cap):
    from gpt4roi_sft import load_model
    from gpt4roi_sft.data.collator import PackingCollator
    from gpt4roi_sft.data.dataset import ConversationDataset

    model, processor = load_model(tiny_model_dir, attn_implementation="sdpa")
    dataset = ConversationDataset(str(synthetic_pix2cap["train"]), str(synthetic_pix2cap["root"]), processor.tokenizer,
                                  processor.image_transform, model.config.image_token_id, processor.num_image_tokens)
    batch = PackingCollator(1024, processor.tokenizer.pad_token_id, pad_to_multiple=128)([dataset[i] for i in range(3)])
    return model, batch


def inputs(batch, device="cpu", dtype=torch.float32):
    from gpt4roi_sft.data.model_inputs import move_to_device

    return move_to_device(batch, torch.device(device), dtype)


def loss_and_grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs(batch, **kw)).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same(a, b, **tol):
    torch.testing.assert_close(a[0], b[0], **tol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], **tol, msg=name)


def plain_linear_cross_entropy(hidden, weight, labels, ignore_index):
    return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=ignore_index, reduction="sum")


# --------------------------------------------------------------------------------------------------- CPU
def test_channels_last_region_convolutions_give_the_same_loss_and_gradients(tiny):
    model, batch = tiny
    model.eval()
    plain = loss_and_grads(model, batch)
    speedups.set_channels_last(model, True)
    try:
        assert_same(loss_and_grads(model, batch), plain, rtol=1e-5, atol=1e-6)
    finally:
        speedups.set_channels_last(model, False)


def test_fused_loss_path_gives_the_logits_loss_and_returns_no_logits_in_training(tiny):
    model, batch = tiny
    model.eval()
    plain = loss_and_grads(model, batch)
    n = torch.tensor(7.0)
    with torch.no_grad():
        plain_n = model(**inputs(batch), num_items_in_batch=n).loss
    model.linear_cross_entropy = plain_linear_cross_entropy
    model.train()
    try:
        out = model(**inputs(batch))
        assert out.logits is None
        fused = loss_and_grads(model, batch)
        with torch.no_grad():
            fused_n = model(**inputs(batch), num_items_in_batch=n).loss
        model.eval()
        assert model(**inputs(batch)).logits is not None  # evaluation keeps the logits
    finally:
        model.linear_cross_entropy = None
        model.eval()
    assert_same(fused, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_n, plain_n, rtol=1e-5, atol=1e-6)


def test_liger_kernel_switch_on_a_cpu_run_stops_with_one_line(tiny):
    model, _ = tiny
    cfg = load_config(None, ["model.liger_kernel=true"])
    with pytest.raises(UserError, match="needs a CUDA GPU") as err:
        speedups.apply_speedups(model, cfg, torch.device("cpu"))
    assert "\n" not in str(err.value)
    assert model.linear_cross_entropy is None


@pytest.mark.skipif(not HAS_LIGER, reason="liger-kernel is not installed")
def test_liger_patches_are_undone_completely(tiny):
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    from transformers.models.llama import modeling_llama

    model, batch = tiny
    llm = model.language_model
    rope, norm_cls = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm
    layer = llm.model.layers[0]
    apply_fn = MODEL_TYPE_TO_APPLY_LIGER_FN[llm.config.model_type]
    undo = speedups.patch_with_undo(lambda: apply_fn(model=llm, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                                     fused_linear_cross_entropy=False),
                                    modules=list(llm.modules()), namespaces=[modeling_llama])
    assert modeling_llama.apply_rotary_pos_emb is not rope and "forward" in vars(layer.mlp)
    undo()
    assert modeling_llama.apply_rotary_pos_emb is rope and modeling_llama.LlamaRMSNorm is norm_cls
    assert all("forward" not in vars(m) for m in llm.modules())
    assert not hasattr(layer.input_layernorm, "casting_mode")


def test_lora_dropout_zero_leaves_no_dropout_in_the_adapters(tiny_model_dir):
    from gpt4roi_sft import load_model
    from gpt4roi_sft.train.modes import apply_training_mode

    model, _ = load_model(tiny_model_dir)
    peft_model = apply_training_mode(model, load_config(None, ["lora.enabled=true", "lora.r=4", "lora.dropout=0"]))
    drops = [m for n, m in peft_model.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
    assert not drops


@pytest.mark.slow
def test_regional_compile_gives_the_same_loss_and_gradients(tiny_model_dir, tiny):
    """torch.compile (inductor, gcc on the CPU) of the decoder layers and the region fusion, on a fresh model."""
    from gpt4roi_sft import load_model

    _, batch = tiny
    model, _ = load_model(tiny_model_dir, attn_implementation="sdpa")
    model.eval()
    plain = loss_and_grads(model, batch)
    compiled = speedups.compile_regions(model, ["decoder_layers", "region_encoder"])
    assert len(compiled["decoder_layers"]) == model.config.text_config.num_hidden_layers and compiled["region_encoder"]
    assert_same(loss_and_grads(model, batch), plain, rtol=1e-4, atol=1e-5)
    assert all("_orig_mod" not in n for n, _ in model.named_parameters())  # checkpoints keep their names


# --------------------------------------------------------------------------------------------------- GPU
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.mark.skipif(not HAS_LIGER, reason="liger-kernel is not installed (the gpu extra)")
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, dict(rtol=2e-2, atol=2e-2))])
@pytest.mark.gpu
@needs_cuda
def test_cuda_liger_kernels_give_the_plain_loss_and_gradients_within_bf16_tolerance(tiny_model_dir, tiny, dtype, tol):
    from gpt4roi_sft import load_model

    _, batch = tiny
    model, _ = load_model(tiny_model_dir, attn_implementation="sdpa", torch_dtype=dtype)
    model = model.to("cuda").train()
    model.config.use_cache = False
    plain = loss_and_grads(model, batch, device="cuda", dtype=dtype)
    undo = speedups.enable_liger_kernel(model, torch.device("cuda"))
    try:
        assert model(**inputs(batch, "cuda", dtype)).logits is None
        fused = loss_and_grads(model, batch, device="cuda", dtype=dtype)
    finally:
        undo()
    torch.testing.assert_close(fused[0].float(), plain[0].float(), **tol)
    for name in plain[1]:
        a, b = fused[1][name].float(), plain[1][name].float()
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-3, name  # bf16: compare gradients by relative norm
    again = loss_and_grads(model, batch, device="cuda", dtype=dtype)
    torch.testing.assert_close(again[0], plain[0], rtol=1e-3, atol=1e-3)  # undone: the plain path again


@pytest.mark.gpu
@needs_cuda
def test_cuda_compile_and_channels_last_give_the_plain_loss(tiny_model_dir, tiny):
    from gpt4roi_sft import load_model

    _, batch = tiny
    model, _ = load_model(tiny_model_dir, attn_implementation="sdpa", torch_dtype=torch.bfloat16)
    model = model.to("cuda").eval()
    plain = loss_and_grads(model, batch, device="cuda", dtype=torch.bfloat16)
    speedups.set_channels_last(model, True)
    speedups.compile_regions(model, ["decoder_layers", "region_encoder"])
    fast = loss_and_grads(model, batch, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(fast[0].float(), plain[0].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_cuda_engine_uses_fused_adamw(tiny_model_dir, tmp_path, monkeypatch):
    """build_engine hands DeepSpeed a fused torch AdamW on GPU (no DeepSpeed op is compiled)."""
    import deepspeed

    from gpt4roi_sft import load_model
    from conftest import free_port
    from gpt4roi_sft.train.loop import build_engine
    from gpt4roi_sft.train.modes import apply_training_mode

    import deepspeed.accelerator as ds_accelerator
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    # conftest sets DS_ACCELERATOR=cpu for the CPU suite; this test builds a CUDA engine in this process
    monkeypatch.setattr(ds_accelerator.real_accelerator, "ds_accelerator", CUDA_Accelerator())
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    deepspeed.init_distributed(dist_backend="nccl")
    cfg = load_config(None, ["lora.enabled=true", "lora.r=4", "train.precision=bf16", "deepspeed.config=ds_configs/zero2.json"])
    model, _ = load_model(tiny_model_dir, torch_dtype=torch.bfloat16)
    model = apply_training_mode(model.to("cuda"), cfg)
    engine, _, stage = build_engine(model, cfg, 1, model.get_base_model().config.text_config.hidden_size, 10, on_cpu=False)
    inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    assert stage == 2 and isinstance(inner, torch.optim.AdamW) and inner.defaults["fused"] is True
