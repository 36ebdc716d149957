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
    """torch.compile (inductor, gcc on the CPU) of the decoder layers, the region fusion and the vision tower's
    layers, on a fresh model."""
    from gpt4roi_sft import load_model

    _, batch = tiny
    model, _ = load_model(tiny_model_dir, attn_implementation="sdpa")
    model.eval()
    plain = loss_and_grads(model, batch)
    compiled = speedups.compile_regions(model, ["decoder_layers", "region_encoder", "vision_layers"])
    assert len(compiled["decoder_layers"]) == model.config.text_config.num_hidden_layers and compiled["region_encoder"]
    assert len(compiled["vision_layers"]) == model.config.vision_config.num_hidden_layers
    assert_same(loss_and_grads(model, batch), plain, rtol=1e-4, atol=1e-5)
    for p in model.vision_tower.parameters():  # GPT4RoI's frozen tower: the compiled layers under no_grad
        p.requires_grad_(False)
    frozen = loss_and_grads(model, batch)
    assert_same(frozen, (plain[0], {n: g for n, g in plain[1].items() if not n.startswith("vision_tower.")}),
                rtol=1e-4, atol=1e-5)
    assert all("_orig_mod" not in n for n, _ in model.named_parameters())  # checkpoints keep their names


# ------------------------------------------------------------------------------------ torch_varlen (CPU)
class _Attention(torch.nn.Module):
    is_causal = True


def _packed_qkv(rows_positions, heads=2, head_dim=4, seed=0):
    """Random (B, H, T, D) query/key/value and (B, T) position ids restarting at 0 per sample."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.tensor(rows_positions)
    b, t = positions.shape
    return [torch.randn(b, heads, t, head_dim, generator=g) for _ in range(3)], positions


def test_torch_varlen_attends_within_each_packed_sample_only():
    """Two rows of several samples each: the result equals sdpa under the block-diagonal causal mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from gpt4roi_sft.data.collator import varlen_fields
    from gpt4roi_sft.model.varlen_attention import varlen_attention_forward

    (q, k, v), positions = _packed_qkv([[0, 1, 2, 3, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    sample = (positions == 0).cumsum(-1)
    causal = torch.ones(9, 9).tril().bool()
    mask = ((sample[:, :, None] == sample[:, None, :]) & causal)[:, None]
    expected, _ = sdpa_attention_forward(_Attention(), q, k, v, mask, scaling=0.3)
    got, _ = varlen_attention_forward(_Attention(), q, k, v, None, scaling=0.3, **varlen_fields(positions))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    whole_rows, _ = sdpa_attention_forward(_Attention(), q, k, v, None, scaling=0.3)  # what ignoring the samples gives
    assert not torch.allclose(got, whole_rows, atol=1e-3)


def test_torch_varlen_packed_rows_give_the_sdpa_loss_and_gradients_without_building_a_mask(tiny_model_dir, tiny,
                                                                                          monkeypatch):
    """The tiny model loaded with attn_implementation=torch_varlen, on PackingCollator's rows (their
    cu_seq_lens/max_length fields), against the same rows under sdpa's block-diagonal mask. The varlen forward
    never asks transformers for a mask: its packed-row detection (a device-to-host read) is made to fail."""
    import transformers.masking_utils as masking_utils

    from gpt4roi_sft import load_model

    sdpa_model, batch = tiny
    sdpa_model.eval()
    assert batch["cu_seq_lens_q"].tolist()[-1] == batch["input_ids"].numel()
    expected = loss_and_grads(sdpa_model, batch)
    varlen_model, _ = load_model(tiny_model_dir, attn_implementation="torch_varlen")
    varlen_model.eval()
    assert varlen_model.language_model.config._attn_implementation == "torch_varlen"

    def no_mask_building(*args, **kwargs):
        raise AssertionError("find_packed_sequence_indices called: transformers is building the packed mask")

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", no_mask_building)
    with pytest.raises(AssertionError, match="building the packed mask"):  # sdpa does need the mask
        loss_and_grads(sdpa_model, batch)
    assert_same(loss_and_grads(varlen_model, batch), expected, rtol=1e-4, atol=1e-5)


def test_torch_varlen_without_sample_boundaries_is_sdpa(tiny_model_dir, synthetic_pix2cap):
    """Padded batches and generation (left padding, then a cache) carry no cu_seq_lens: they run sdpa itself."""
    from gpt4roi_sft import load_model
    from gpt4roi_sft.data.collator import PaddingCollator
    from gpt4roi_sft.data.dataset import ConversationDataset
    from gpt4roi_sft.infer import DecodeSettings, RegionCaptioner, RegionRequest

    models = {attn: load_model(tiny_model_dir, attn_implementation=attn) for attn in ("sdpa", "torch_varlen")}
    model, processor = models["sdpa"]
    dataset = ConversationDataset(str(synthetic_pix2cap["train"]), str(synthetic_pix2cap["root"]), processor.tokenizer,
                                  processor.image_transform, model.config.image_token_id, processor.num_image_tokens)
    batch = PaddingCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    assert batch["attention_mask"].min() == 0  # some padding
    image = sorted(synthetic_pix2cap["root"].rglob("*.jpg"))[0]
    requests = [RegionRequest(str(image), "<image>\nWhat is in <bbox>?", [[2, 2, 30, 30]]),
                RegionRequest(str(image), "<image>\nDescribe the region <bbox> in a few words, please.", [[5, 8, 40, 36]])]
    settings = DecodeSettings(max_new_tokens=6, min_new_tokens=6)
    out = {}
    for attn, (m, proc) in models.items():
        m.eval()
        with torch.no_grad():
            logits = m(**inputs(batch)).logits
        out[attn] = logits, RegionCaptioner(m, proc, settings=settings).new_tokens(requests)
    torch.testing.assert_close(out["torch_varlen"][0], out["sdpa"][0], rtol=0, atol=0)
    assert torch.equal(out["torch_varlen"][1], out["sdpa"][1])


@pytest.mark.parametrize("signature", ["is_causal", "window_size"])
def test_varlen_kernel_calls_either_varlen_attn_signature_causally(monkeypatch, signature):
    """torch 2.10 took is_causal (and no scale); later releases take window_size and scale."""
    import torch.nn.attention.varlen as varlen_module

    from gpt4roi_sft.model import varlen_attention

    calls = []
    if signature == "is_causal":
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            calls.append(dict(q=query, max_q=max_q, is_causal=is_causal))
            return query
    else:
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1), enable_gqa=False):
            calls.append(dict(q=query, max_q=max_q, window_size=window_size, scale=scale))
            return query
    monkeypatch.setattr(varlen_module, "varlen_attn", fake)
    varlen_attention.varlen_kernel.cache_clear()
    try:
        q = torch.ones(6, 2, 4)
        cu = torch.tensor([0, 4, 6], dtype=torch.int32)
        out = varlen_attention.varlen_kernel()(q, q, q, cu, 4, True, 0.25)
    finally:
        varlen_attention.varlen_kernel.cache_clear()
    (call,) = calls
    assert call["max_q"] == 4
    if signature == "is_causal":
        assert call["is_causal"] is True
        torch.testing.assert_close(out, q * 0.25 * 2)  # no scale argument: the scale is folded into the queries
    else:
        assert call["window_size"] == (-1, 0) and call["scale"] == 0.25
        assert out is q


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
    speedups.compile_regions(model, ["decoder_layers", "region_encoder", "vision_layers"])
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


@pytest.mark.gpu
@needs_cuda
def test_cuda_torch_varlen_kernel_matches_per_sample_sdpa_in_bf16():
    from gpt4roi_sft.data.collator import varlen_fields
    from gpt4roi_sft.model.varlen_attention import per_sample_sdpa, varlen_attention

    positions = torch.tensor([list(range(700)) + list(range(324)), list(range(100)) + list(range(900)) + list(range(24))])
    fields = varlen_fields(positions)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(positions.numel(), 8, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    cu = fields["cu_seq_lens_q"].to("cuda")
    fast = varlen_attention(q, k, v, cu, fields["max_length_q"], True, 64 ** -0.5)
    reference = per_sample_sdpa(q.float(), k.float(), v.float(), cu, True, 64 ** -0.5)
    torch.testing.assert_close(fast.float(), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_cuda_torch_varlen_gives_the_sdpa_loss_and_gradients_within_bf16_tolerance(tiny_model_dir, tiny):
    from gpt4roi_sft import load_model

    _, batch = tiny
    results = {}
    for attn in ("sdpa", "torch_varlen"):
        model, _ = load_model(tiny_model_dir, attn_implementation=attn, torch_dtype=torch.bfloat16)
        model = model.to("cuda").train()
        results[attn] = loss_and_grads(model, batch, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(results["torch_varlen"][0].float(), results["sdpa"][0].float(), rtol=2e-2, atol=2e-2)
    for name, plain in results["sdpa"][1].items():
        a, b = results["torch_varlen"][1][name].float(), plain.float()
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-3, name


@pytest.mark.gpu
@needs_cuda
def test_cuda_compiled_decoder_layers_with_torch_varlen_give_the_sdpa_loss(tiny_model_dir, synthetic_pix2cap):
    """Regional compile over the varlen path, on packed batches whose row widths and longest samples differ
    (each a new shape / max_length for the compiled layers): the same loss as eager sdpa within bf16 tolerance."""
    import torch._dynamo

    from gpt4roi_sft import load_model
    from gpt4roi_sft.data.collator import PackingCollator
    from gpt4roi_sft.data.dataset import ConversationDataset

    models = {}
    for attn in ("sdpa", "torch_varlen"):
        model, processor = load_model(tiny_model_dir, attn_implementation=attn, torch_dtype=torch.bfloat16)
        models[attn] = model.to("cuda").train()
    dataset = ConversationDataset(str(synthetic_pix2cap["train"]), str(synthetic_pix2cap["root"]), processor.tokenizer,
                                  processor.image_transform, model.config.image_token_id, processor.num_image_tokens)
    collate = PackingCollator(1024, processor.tokenizer.pad_token_id, pad_to_multiple=128)
    # more distinct (row width, longest sample) pairs than dynamo's recompile limit (8): shapes and max_length_q
    # must turn dynamic, or the layers would silently run eagerly after the 8th
    spans = [(0, 3), (3, 4), (4, 8), (8, 10), (10, 11), (11, 16), (16, 17), (17, 19), (19, 20), (20, 24), (24, 25)]
    batches = [collate([dataset[i] for i in range(a, b)]) for a, b in spans]
    assert len({(tuple(b["input_ids"].shape), b["max_length_q"]) for b in batches}) > 8
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    speedups.compile_regions(models["torch_varlen"], ["decoder_layers"])
    for batch in batches:
        plain = loss_and_grads(models["sdpa"], batch, device="cuda", dtype=torch.bfloat16)[0]
        fast = loss_and_grads(models["torch_varlen"], batch, device="cuda", dtype=torch.bfloat16)[0]
        torch.testing.assert_close(fast.float(), plain.float(), rtol=2e-2, atol=2e-2)
    health = speedups.compile_health()
    assert not health["recompile_limit_hit"] and health["unique_graphs"] <= 4, health


def test_compile_health_reports_when_dynamo_stops_compiling_after_the_recompile_limit(caplog):
    """A region that recompiles past dynamo's limit runs eagerly from then on, silently slower: the report and the
    trainer's warning say so; a function compiled once does not trigger it."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    once = torch.compile(lambda x: x * 2, backend="eager")
    once(torch.ones(3))
    assert speedups.compile_health() == {"unique_graphs": 1, "graph_breaks": 0, "recompile_limit_hit": False}
    assert not speedups.warn_if_compile_gave_up()

    @torch.compile(backend="eager", dynamic=False)
    def scaled(x, k):
        return x * k

    for k in range(torch._dynamo.config.recompile_limit + 2):  # a new constant each call: one graph per value
        scaled(torch.ones(3), k)
    health = speedups.compile_health()
    assert health["recompile_limit_hit"] and health["unique_graphs"] >= torch._dynamo.config.recompile_limit
    with caplog.at_level("WARNING"):
        assert speedups.warn_if_compile_gave_up()
    assert "recompile limit" in caplog.text
    torch._dynamo.reset()
    counters.clear()
