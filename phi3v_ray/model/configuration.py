"""Phi3VConfig: reads the official Phi-3.5-vision config.json as it is.

The official file is a Phi-3 config plus two dicts, `embd_layer` and `img_processor`, and a rope
type "su" that transformers now calls "longrope". The CLIP tower's dimensions are not in the file
(the reference code hard-codes CLIP ViT-L/14-336); `img_processor.vision_config` may carry
CLIPVisionConfig fields to shrink the tower for tests.

A copy of that file (microsoft/Phi-3.5-vision-instruct's config.json, unchanged) ships next to
this module: `Phi3VConfig.official()` builds the full-size model's config without a download.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import torch

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig, Phi3Config

# CLIP ViT-L/14 at 336 px, as the official remote code builds it.
CLIP_VIT_L_14_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


def official_config_path() -> Path:
    """The shipped copy of the official Phi-3.5-vision config.json."""
    return Path(__file__).with_name("official_config.json")


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


@strict
class Phi3VConfig(Phi3Config):
    model_type = "phi3_v"

    embd_layer: dict | None = None
    img_processor: dict | None = None

    @classmethod
    def official(cls) -> "Phi3VConfig":
        """The config of microsoft/Phi-3.5-vision-instruct, from the shipped config.json."""
        return cls(**json.loads(official_config_path().read_text()))

    def convert_rope_params_to_dict(self, default_theta=10_000.0, ignore_keys=None, **kwargs):
        # The official file names LongRoPE "su" under rope_scaling["type"]; transformers only moves
        # original_max_position_embeddings into the rope dict when the type already reads "longrope".
        scaling = kwargs.get("rope_scaling")
        if isinstance(scaling, dict) and scaling.get("type", scaling.get("rope_type")) in ("su", "longrope"):
            scaling = {k: v for k, v in scaling.items() if k != "type"}
            scaling["rope_type"] = "longrope"
            kwargs["rope_scaling"] = scaling
        return super().convert_rope_params_to_dict(default_theta=default_theta, ignore_keys=ignore_keys, **kwargs)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self._attn_implementation == "flash_attention_2" and not flash_attn_available():
            # The official config.json names flash_attention_2; use sdpa where flash-attn cannot run.
            self._attn_implementation = "sdpa"
        if self.embd_layer is None:
            self.embd_layer = {
                "embedding_cls": "image",
                "hd_transform_order": "sub_glb",
                "projection_cls": "mlp",
                "use_hd_transform": True,
                "with_learnable_separator": True,
            }
        if self.img_processor is None:
            self.img_processor = {
                "image_dim_out": 1024,
                "model_name": "openai/clip-vit-large-patch14-336",
                "name": "clip_vision_model",
                "num_img_tokens": 144,
            }

    @property
    def vision_config(self) -> CLIPVisionConfig:
        """The CLIP tower's config: ViT-L/14-336 unless `img_processor.vision_config` overrides fields."""
        fields = dict(CLIP_VIT_L_14_336)
        fields.update(self.img_processor.get("vision_config") or {})
        return CLIPVisionConfig(**fields)

    @property
    def image_dim_out(self) -> int:
        return int(self.img_processor.get("image_dim_out", self.vision_config.hidden_size))

    def to_dict(self):
        # Write rope settings back in the official layout, so the official remote code reads our files.
        out = super().to_dict()
        rope = copy.deepcopy(out.pop("rope_parameters", None) or {})
        out.pop("rope_scaling", None)
        out["rope_theta"] = rope.get("rope_theta", 10000.0)
        if rope.get("rope_type") == "longrope":
            out["rope_scaling"] = {
                "long_factor": rope["long_factor"],
                "short_factor": rope["short_factor"],
                "type": "su",
            }
        else:
            out["rope_scaling"] = None
        # Keys the official remote code reads: its class map and the pre-5.x dtype name.
        out.setdefault("auto_map", {
            "AutoConfig": "configuration_phi3_v.Phi3VConfig",
            "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
        })
        if "dtype" in out and out["dtype"] is not None:
            out["torch_dtype"] = str(out["dtype"]).replace("torch.", "")
        return out
