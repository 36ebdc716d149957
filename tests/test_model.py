"""GPT4RoIForCausalLM: region tokens, packing, batching, loss, gradients, generation."""

import pytest
import torch
from PIL import Image

from gpt4roi_sft.constants import IGNORE_INDEX
from gpt4roi_sft.model.loading import load_model
from quickstart.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)
    model, processor = load_model(path, attn_implementation="sdpa")
    return model.eval(), processor


def _image(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(96, 128, 3, generator=g) * 255).byte().numpy())


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _bbox_positions(batch, processor):
    return (batch["input_ids"][0] == processor.bbox_token_id).nonzero().flatten().tolist()


def test_moving_a_box_changes_logits_from_its_bbox_token_on_and_nothing_before(tiny):
    model, proc = tiny
    text = "<image> What is region1 <bbox> doing?"
    a = proc(images=[_image()], texts=[text], boxes=[[[0, 0, 40, 40]]])
    b = proc(images=[_image()], texts=[text], boxes=[[[60, 40, 120, 90]]])
    la, lb = _logits(model, a), _logits(model, b)
    pos = _bbox_positions(a, proc)[0]
    torch.testing.assert_close(la[:, :pos], lb[:, :pos], atol=1e-6, rtol=0)  # CPU kernels may differ in the last bit
    assert (la[:, pos:] - lb[:, pos:]).abs().amax(-1).min() > 1e-5


def test_two_regions_in_one_sample_are_not_interchangeable(tiny):
    model, proc = tiny
    text = "<image> region1 <bbox> and region2 <bbox>"
    boxes = [[0, 0, 40, 40], [60, 40, 120, 90]]
    a = proc(images=[_image()], texts=[text], boxes=[boxes])
    b = proc(images=[_image()], texts=[text], boxes=[boxes[::-1]])
    assert (_logits(model, a)[:, -1] - _logits(model, b)[:, -1]).abs().max() > 1e-5


def test_batch_mixing_0_1_and_15_regions_matches_each_sample_alone(tiny):
    model, proc = tiny
    texts = ["<image> a plain picture",
             "<image> region1 <bbox> please",
             "<image> " + " ".join(f"region{i} <bbox>" for i in range(1, 16))]
    boxes = [[], [[10, 10, 60, 50]], [[4 * i, 3 * i, 4 * i + 30, 3 * i + 20] for i in range(15)]]
    images = [_image(0), _image(1), _image(2)]
    batch = proc(images=images, texts=texts, boxes=boxes, padding_side="left")
    together = _logits(model, batch)
    for i in range(3):
        alone = proc(images=[images[i]], texts=[texts[i]], boxes=[boxes[i]])
        n = alone["input_ids"].shape[1]
        torch.testing.assert_close(together[i, -n:], _logits(model, alone)[0], atol=1e-4, rtol=1e-4)


def test_packed_row_gives_each_sample_its_unpacked_logits(tiny):
    model, proc = tiny
    s1 = proc(images=[_image(0)], texts=["<image> region1 <bbox> is red"], boxes=[[[0, 0, 50, 50]]])
    s2 = proc(images=[_image(1)], texts=["<image> region1 <bbox> region2 <bbox>"], boxes=[[[5, 5, 60, 60], [30, 20, 100, 90]]])
    n1, n2 = s1["input_ids"].shape[1], s2["input_ids"].shape[1]
    packed = {
        "input_ids": torch.cat([s1["input_ids"], s2["input_ids"]], dim=1),
        "position_ids": torch.cat([torch.arange(n1), torch.arange(n2)])[None],
        "pixel_values": torch.cat([s1["pixel_values"], s2["pixel_values"]]),
        "boxes": s1["boxes"] + s2["boxes"],
    }
    out = _logits(model, packed)[0]
    torch.testing.assert_close(out[:n1], _logits(model, s1)[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[n1:], _logits(model, s2)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_boxes", [0, 2])
def test_box_count_differing_from_bbox_tokens_names_both_counts(tiny, n_boxes):
    model, proc = tiny
    batch = proc(images=[_image()], texts=["<image> region1 <bbox>"], boxes=[[[0, 0, 40, 40]]])
    batch["boxes"] = [torch.tensor([[0.0, 0.0, 0.5, 0.5]] * n_boxes).reshape(-1, 4)]
    with pytest.raises(ValueError, match=rf"1 <bbox> tokens.*{n_boxes} boxes"):
        model(**batch)


def test_loss_is_mean_cross_entropy_over_labelled_next_tokens(tiny):
    model, proc = tiny
    batch = proc(images=[_image()], texts=["<image> region1 <bbox> is a red ball"], boxes=[[[0, 0, 40, 40]]])
    labels = batch["input_ids"].clone()
    labels[:, :-4] = IGNORE_INDEX
    out = model(**batch, labels=labels)
    logits = out.logits[0, -5:-1]
    expected = torch.nn.functional.cross_entropy(logits, labels[0, -4:])
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def test_gradients_reach_region_encoder_only_through_bbox_positions_and_not_the_frozen_tower(tiny):
    model, proc = tiny
    batch = proc(images=[_image()], texts=["<image> look at region1 <bbox> now"], boxes=[[[0, 0, 40, 40]]])
    pos = _bbox_positions(batch, proc)[0]
    model.zero_grad(set_to_none=True)
    model(**batch).logits[0, :pos].sum().backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.region_encoder.parameters())
    model.zero_grad(set_to_none=True)
    model(**batch).logits[0, pos:].sum().backward()
    assert model.region_encoder.to_llm.weight.grad.abs().max() > 0
    assert all(p.grad is None for p in model.vision_tower.parameters())
    model.zero_grad(set_to_none=True)


def test_region_path_runs_with_zero_weight_when_a_batch_has_no_regions(tiny):
    # ZeRO-3 ranks must touch the same parameters: the region encoder gets (zero) gradients anyway.
    model, proc = tiny
    batch = proc(texts=["no image and no region here"])
    model.zero_grad(set_to_none=True)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = [p.grad for p in model.region_encoder.parameters()]
    assert all(g is not None and g.abs().max() == 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_gradient_checkpointing_gives_the_same_loss(tiny):
    model, proc = tiny
    batch = proc(images=[_image()], texts=["<image> region1 <bbox> is blue"], boxes=[[[0, 0, 40, 40]]])
    ref = model(**batch, labels=batch["input_ids"]).loss
    model.train()
    model.gradient_checkpointing_enable()
    try:
        out = model(**batch, labels=batch["input_ids"]).loss
        out.backward()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert model.region_encoder.to_llm.weight.grad is not None
    finally:
        model.gradient_checkpointing_disable()
        model.zero_grad(set_to_none=True)
        model.eval()


def _saved_activation_bytes(model, batch):
    """Bytes the forward keeps for the backward outside checkpointed layers (parameters and inputs excluded),
    then the backward's gradients of the trained tensors."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    inputs = {t.untyped_storage().data_ptr() for t in batch.values() if isinstance(t, torch.Tensor)}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in inputs:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), sum(kept.values()), grads


def test_checkpointing_one_decoder_layer_in_two_gives_the_same_loss_and_gradients_and_keeps_fewer_activations(tiny):
    """model.checkpoint_every: the layers picked by their index in the LLM, the exact gradients of no checkpointing,
    and activation memory between none and all."""
    from gpt4roi_sft.train.modes import decoder_layers, enable_activation_checkpointing

    model, proc = tiny
    batch = proc(images=[_image()], texts=["<image> region1 <bbox> is blue and region2 <bbox> is red"],
                 boxes=[[[0, 0, 40, 40], [50, 30, 110, 90]]])
    model.train()
    try:
        loss_none, kept_none, grads_none = _saved_activation_bytes(model, batch)
        layers = decoder_layers(model, "test")
        assert enable_activation_checkpointing(model, 2) == 1
        assert [layer.gradient_checkpointing for layer in layers] == [True, False]
        loss_half, kept_half, grads_half = _saved_activation_bytes(model, batch)
        assert enable_activation_checkpointing(model, 1) == len(layers)
        loss_all, kept_all, grads_all = _saved_activation_bytes(model, batch)
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    assert kept_all < kept_half < kept_none
    for loss, grads in ((loss_half, grads_half), (loss_all, grads_all)):
        torch.testing.assert_close(loss, loss_none, atol=1e-6, rtol=1e-6)
        assert grads.keys() == grads_none.keys() and grads_none
        for name in grads_none:
            torch.testing.assert_close(grads[name], grads_none[name], atol=1e-6, rtol=1e-5, msg=name)


def test_generate_with_regions_matches_greedy_forward_and_left_padding(tiny):
    model, proc = tiny
    texts = ["<image> describe region1 <bbox>", "<image> a much longer prompt about region1 <bbox> here"]
    boxes = [[[0, 0, 40, 40]], [[30, 30, 90, 80]]]
    batch = proc(images=[_image(0), _image(1)], texts=texts, boxes=boxes, padding_side="left")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 3)
    for i in range(2):
        single = proc(images=[[_image(0), _image(1)][i]], texts=[texts[i]], boxes=[boxes[i]])
        first = _logits(model, single)[0, -1].argmax()
        assert out[i, 0] == first
        torch.testing.assert_close(model.generate(**single, max_new_tokens=3, do_sample=False)[0], out[i])
