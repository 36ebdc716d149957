"""The GPT4RoI-style model: config, region encoder, causal-LM wrapper, processor and loaders."""

from gpt4roi_sft.model.configuration import GPT4RoIConfig
from gpt4roi_sft.model.modeling import GPT4RoIForCausalLM, default_attn_implementation
from gpt4roi_sft.model.processing import GPT4RoIProcessor
from gpt4roi_sft.model.region_encoder import RegionEncoder

# Registered so transformers' Auto* classes (AutoTokenizer reads config.json too) know the model type.
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

AutoConfig.register(GPT4RoIConfig.model_type, GPT4RoIConfig, exist_ok=True)
AutoModelForCausalLM.register(GPT4RoIConfig, GPT4RoIForCausalLM, exist_ok=True)

__all__ = ["GPT4RoIConfig", "GPT4RoIForCausalLM", "GPT4RoIProcessor", "RegionEncoder", "default_attn_implementation", "load_model"]


def load_model(*args, **kwargs):
    """See :func:`gpt4roi_sft.model.loading.load_model`."""
    from gpt4roi_sft.model.loading import load_model as _load_model

    return _load_model(*args, **kwargs)
