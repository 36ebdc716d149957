"""gpt4roi_sft: supervised fine-tuning of GPT4RoI-style region-level multimodal models."""

__version__ = "0.1.0"


def load_model(*args, **kwargs):
    """Open a model directory and return ``(model, processor)``; see :func:`gpt4roi_sft.model.loading.load_model`."""
    from gpt4roi_sft.model.loading import load_model as _load_model

    return _load_model(*args, **kwargs)


__all__ = ["load_model", "__version__"]
