"""Phi-3.5-vision on transformers' own Phi-3 and CLIP modules, no remote code."""

from .configuration import Phi3VConfig
from .image_embedding import Phi3VImageEmbedding, tokens_per_image
from .modeling import Phi3VForCausalLM, Phi3VModel, causal_lm_loss

__all__ = ["Phi3VConfig", "Phi3VImageEmbedding", "Phi3VForCausalLM", "Phi3VModel", "causal_lm_loss", "tokens_per_image"]
