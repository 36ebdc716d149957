"""One optimizer step's loss: the mean over every trained token of its accumulation window, however the window's
tokens are spread over micro-batches (token-budget packing gives micro-batches of different sizes)."""

import pytest
import torch

from gpt4roi_sft.data.collator import PaddingCollator
from gpt4roi_sft.train.loop import loss_denominator, trained_token_count


class OneRank:
    """Collectives of a one-process group: the sum over ranks is the values themselves."""

    world_size = 1

    def sum(self, values):
        return torch.tensor([float(v) for v in values], dtype=torch.float64)


@pytest.fixture(scope="module")
def model_and_items(tiny_model_dir, synthetic_pix2cap):
    from gpt4roi_sft import load_model
    from gpt4roi_sft.data.dataset import ConversationDataset

    model, processor = load_model(tiny_model_dir)
    dataset = ConversationDataset(str(synthetic_pix2cap["train"]), str(synthetic_pix2cap["root"]), processor.tokenizer,
                                  processor.image_transform, model.config.image_token_id, processor.num_image_tokens)
    items = [dataset[i] for i in range(4)]
    return model.eval(), processor.tokenizer.pad_token_id, items  # eval: no dropout, gradients still flow


def inputs(batch):
    from gpt4roi_sft.data.model_inputs import MODEL_INPUT_KEYS

    return {k: batch[k] for k in MODEL_INPUT_KEYS if batch.get(k) is not None}


def gradients(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def window_step(model, window, denominators):
    """What DeepSpeed does over a window: backward of each micro-batch loss / gas, gradients accumulated."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for batch, n in zip(window, denominators):
        loss = model(**inputs(batch), num_items_in_batch=n).loss / len(window)
        loss.backward()
        total += float(loss.detach())
    return total, gradients(model)


def test_uneven_micro_batches_give_the_gradient_of_the_whole_window_mean(model_and_items):
    model, pad, items = model_and_items
    collate = PaddingCollator(pad)
    model.zero_grad(set_to_none=True)
    whole = model(**inputs(collate(items)))
    whole.loss.backward()
    expected = gradients(model)

    window = [collate(items[:1]), collate(items[1:])]  # 1 sample, then 3
    assert trained_token_count(window[0]) != trained_token_count(window[1])
    n = loss_denominator(OneRank(), window, gas=2)
    loss, got = window_step(model, window, [n, n])
    assert loss == pytest.approx(float(whole.loss), rel=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)

    # each micro-batch's own mean (what the loop did before) weighs the lone sample's tokens three times over
    _, per_batch_mean = window_step(model, window, [None, None])
    assert not torch.allclose(per_batch_mean, expected, rtol=1e-3, atol=1e-5)
    model.zero_grad(set_to_none=True)


def test_trained_tokens_are_the_targets_after_the_first_column(model_and_items):
    _, pad, items = model_and_items
    batch = PaddingCollator(pad)(items[:2])
    labels = batch["labels"]
    assert trained_token_count(batch) == int((labels[:, 1:] != -100).sum())
