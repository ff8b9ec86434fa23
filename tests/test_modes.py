"""Which parameters train in each mode — asserted name by name, and by the gradients a step leaves."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from phi3v_ray.model import Phi3VForCausalLM
from phi3v_ray.modes import Mode, LoraSettings, apply_mode, checkpointable_layers, enable_gradient_checkpointing

UNUSED = re.compile(r"img_processor\.vision_model\.(post_layernorm|encoder\.layers\.2)\.")  # tiny CLIP has 3 layers
VISION = "model.vision_embed_tokens."


def _model(tiny_ckpt):
    return Phi3VForCausalLM.from_pretrained(tiny_ckpt)


def trainable_parameter_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _batch(model):
    """One example with one image (1 crop → 313 placeholder tokens) and a supervised answer."""
    torch.manual_seed(0)
    ids = torch.tensor([[1, 32010, 201] + [-1] * 313 + [1, 300, 301, 32007, 201, 32001, 201, 320, 32007, 201, 32000]])
    labels = torch.full_like(ids, -100)
    labels[0, -4:] = ids[0, -4:]
    return dict(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids),
                pixel_values=torch.randn(1, 2, 3, 336, 336), image_sizes=torch.tensor([[336, 336]]))


def test_full_trains_everything_but_the_unused_clip_layer(tiny_ckpt):
    model = apply_mode(_model(tiny_ckpt), Mode.FULL)
    names = {n for n, _ in model.named_parameters()}
    expected = {n for n in names if not UNUSED.search(n)}
    assert set(trainable_parameter_names(model)) == expected
    assert len(names - expected) == 2 + 16  # post_layernorm (w, b) + one CLIP layer's 16 tensors


def test_frozen_vision_freezes_clip_projector_and_separators(tiny_ckpt):
    model = apply_mode(_model(tiny_ckpt), Mode.FROZEN_VISION)
    trainable = set(trainable_parameter_names(model))
    assert not any(n.startswith(VISION) for n in trainable)
    assert "model.embed_tokens.weight" in trainable  # an explicit choice, unlike the recipe's accident
    model.train()
    model(**_batch(model), loss_only=True).loss.backward()
    for name, p in model.named_parameters():
        if name.startswith(VISION):
            assert p.grad is None, name
        elif p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name

    frozen_embed = apply_mode(_model(tiny_ckpt), Mode.FROZEN_VISION, freeze_text_embedding=True)
    assert "model.embed_tokens.weight" not in trainable_parameter_names(frozen_embed)


def _lora_targets(model) -> set[str]:
    return {n.split(".lora_A")[0] for n in trainable_parameter_names(model) if ".lora_A." in n}


def test_lora_trains_adapters_only_on_the_spec_targets(tiny_ckpt):
    model = apply_mode(_model(tiny_ckpt), Mode.LORA, LoraSettings(rank=4, alpha=8))
    trainable = trainable_parameter_names(model)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    targets = {re.sub(r"^base_model\.model\.", "", t) for t in _lora_targets(model)}
    lm = {f"model.layers.{i}.{m}" for i in range(2) for m in
          ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    clip = {f"model.vision_embed_tokens.img_processor.vision_model.encoder.layers.{i}.{m}" for i in range(2) for m in
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")}
    projector = {"model.vision_embed_tokens.img_projection.0", "model.vision_embed_tokens.img_projection.2"}
    assert targets == lm | {"lm_head"} | clip | projector

    text_only = apply_mode(_model(tiny_ckpt), Mode.LORA, LoraSettings(rank=4, alpha=8, vision=False))
    assert {re.sub(r"^base_model\.model\.", "", t) for t in _lora_targets(text_only)} == lm | {"lm_head"}

    model.train()
    enable_gradient_checkpointing(model)
    model(**_batch(model), loss_only=True).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable)  # every adapter, including CLIP's, receives a gradient


def test_qlora_is_lora_on_a_4bit_base(tiny_ckpt):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               llm_int8_skip_modules=["lm_head"])
    base = Phi3VForCausalLM.from_pretrained(tiny_ckpt, quantization_config=quant, dtype=torch.float32)
    model = apply_mode(base, Mode.QLORA, LoraSettings(rank=4, alpha=8))
    trainable = trainable_parameter_names(model)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    qkv = model.get_base_model().model.layers[0].self_attn.qkv_proj.base_layer
    assert isinstance(qkv.weight, bnb.nn.Params4bit) and qkv.weight.quant_type == "nf4"
    model.train()
    loss = model(**_batch(model), loss_only=True).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- no backward through frozen towers
CLIP_TOKENS = 577  # 1 class token + 24×24 patches per 336-px crop: only CLIP tensors have this length


class OpCounter(TorchDispatchMode):
    """Counts aten ops; `clip` counts those touching a CLIP-shaped tensor (… × 577 × width)."""

    def __init__(self):
        super().__init__()
        self.ops, self.clip = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] += 1
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(t.ndim >= 2 and CLIP_TOKENS in t.shape[-3:] for t in tensors):
            self.clip[name] += 1
        return func(*args, **(kwargs or {}))


def _attention_backward(counts: Counter) -> int:
    return sum(n for name, n in counts.items() if "attention" in name and "backward" in name)


def _todays_checkpointing(model) -> None:
    """What the code did before issue #13: transformers' enable (which hooks every input embedding) + a second set."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    target.enable_input_require_grads()


def _grads_and_backward_ops(tiny_ckpt, mode, lora, checkpointing):
    torch.manual_seed(0)
    model = apply_mode(_model(tiny_ckpt), mode, lora)
    model.train()
    checkpointing(model)
    loss = model(**_batch(model), loss_only=True).loss
    with OpCounter() as counter:
        loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, counter


@pytest.mark.parametrize("mode,lora", [(Mode.FROZEN_VISION, None), (Mode.LORA, LoraSettings(rank=4, alpha=8, vision=False))],
                         ids=["frozen_vision", "lora_text_only"])
def test_frozen_clip_runs_no_backward_and_the_gradients_are_unchanged(tiny_ckpt, mode, lora):
    before, old = _grads_and_backward_ops(tiny_ckpt, mode, lora, _todays_checkpointing)
    after, new = _grads_and_backward_ops(tiny_ckpt, mode, lora, enable_gradient_checkpointing)
    assert _attention_backward(old.clip) >= 2  # the two used tiny CLIP layers back-propagated before
    assert sum(new.clip.values()) == 0, new.clip  # no CLIP-shaped op at all in the backward now
    assert _attention_backward(new.ops) > 0  # the LM still back-propagates through its attention
    assert before.keys() == after.keys() and before
    for name, grad in before.items():
        assert torch.equal(grad, after[name]), name


def test_lora_with_vision_adapters_still_back_propagates_through_clip(tiny_ckpt):
    grads, counter = _grads_and_backward_ops(tiny_ckpt, Mode.LORA, LoraSettings(rank=4, alpha=8),
                                             enable_gradient_checkpointing)
    assert _attention_backward(counter.clip) >= 2
    assert all(g is not None for g in grads.values())


def test_checkpointing_can_be_chosen_per_layer(tiny_ckpt):
    model = apply_mode(_model(tiny_ckpt), Mode.FULL)
    enable_gradient_checkpointing(model, lm_layers=[1], clip_layers=[])
    lm, clip = checkpointable_layers(model)
    assert [layer.gradient_checkpointing for layer in lm] == [False, True]
    assert [layer.gradient_checkpointing for layer in clip] == [False, False]
