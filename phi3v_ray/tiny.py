"""Tiny random-initialised Phi-3.5-vision checkpoints in the official directory layout.

Tests and the embedded default run on these: config.json (small dims, same keys as the official
file), model.safetensors, a small byte-level BPE tokenizer carrying Phi-3's special tokens at their
real ids, and preprocessor_config.json. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .constants import CLIP_MEAN, CLIP_STD

# (content, id) exactly as in the Phi-3.5-vision tokenizer (SPEC §4).
BASE_SPECIALS = [("<unk>", 0), ("<s>", 1), ("</s>", 2)]
ADDED_SPECIALS = [
    ("<|endoftext|>", 32000),
    ("<|assistant|>", 32001),
    ("<|placeholder1|>", 32002),
    ("<|placeholder2|>", 32003),
    ("<|placeholder3|>", 32004),
    ("<|placeholder4|>", 32005),
    ("<|system|>", 32006),
    ("<|end|>", 32007),
    ("<|placeholder5|>", 32008),
    ("<|placeholder6|>", 32009),
    ("<|user|>", 32010),
]
VOCAB_SIZE = 32064  # embedding rows, padded past the last special id as in the official config

TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
# Three CLIP layers so the feature layer (hidden_states[-2]) differs from the last one, as in ViT-L.
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)

# Words the tokenizer learns merges for, so demo prompts and answers are short token sequences.
_CORPUS = """
What colour is the shape? Answer with one word. red green blue yellow purple orange
Do both images show the same colour? Answer yes or no. yes no
Which way does the square move? Answer left or right. left right up down
What digit is written? Answer with the digit. 0 1 2 3 4 5 6 7 8 9
Classify the video into one of the following classes: Is this meme hateful? the a an of in on
image picture document page question answer video frame text number word left right
"""


def tiny_config_dict(**overrides) -> dict:
    """config.json contents: the official file's keys with tiny dimensions."""
    text = {**TINY_TEXT, **{k: v for k, v in overrides.items() if k in TINY_TEXT}}
    vision = {**TINY_VISION, **overrides.get("vision", {})}
    half_head = text["hidden_size"] // text["num_attention_heads"] // 2
    return {
        "architectures": ["Phi3VForCausalLM"],
        "model_type": "phi3_v",
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "embd_layer": {
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        "embd_pdrop": 0.0,
        "eos_token_id": 2,
        "hidden_act": "silu",
        **text,
        "img_processor": {
            "image_dim_out": vision["hidden_size"],
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": 144,
            "vision_config": vision,
        },
        "initializer_range": 0.02,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "pad_token_id": 32000,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "long_factor": [1.0 + 0.5 * i for i in range(half_head)],
            "short_factor": [1.0 + 0.1 * i for i in range(half_head)],
            "type": "su",
        },
        "rope_theta": 10000.0,
        "sliding_window": 262144,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }


def build_tiny_tokenizer():
    """Byte-level BPE with Phi-3's special tokens at their real ids; BOS is added to every encode."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=[t for t, _ in BASE_SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    # Fill the ids up to 32000 with unreachable entries so the added specials land on their real ids.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), ADDED_SPECIALS[0][1]):
        vocab[f"<|reserved_{i}|>"] = i
    tok = Tokenizer.from_str(json.dumps(spec))
    for content, expected_id in ADDED_SPECIALS:
        tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        assert tok.token_to_id(content) == expected_id, (content, tok.token_to_id(content))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        padding_side="right",
        model_max_length=131072,
    )


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0, num_crops: int = 4, max_shard_size: str | None = None, **overrides) -> Path:
    """Write a random-initialised checkpoint directory in the official layout and return its path."""
    from .model import Phi3VConfig, Phi3VForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = Phi3VConfig(**tiny_config_dict(**overrides))
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Phi3VForCausalLM(config)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    build_tiny_tokenizer().save_pretrained(out)
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Phi3VImageProcessor",
                "processor_class": "Phi3VProcessor",
                "num_crops": num_crops,
                "num_img_tokens": 144,
                "image_mean": list(CLIP_MEAN),
                "image_std": list(CLIP_STD),
                "do_convert_rgb": True,
            },
            indent=2,
        )
    )
    return out
