"""Fused kernels (phi3v_ray/kernels.py): which are chosen where, what the swap changes, and that liger's
ops give the unfused model's loss and gradients.

liger's kernels are Triton kernels. Without a GPU the `test_interpreted_*` tests run them under Triton's
interpreter, on CPU tensors, in fp32. That checks what the swap computes (the math, the casting mode, the
cos/sin layout, the autograd wiring under PEFT and activation checkpointing, the KV cache), not the speed
or the bf16 rounding of the compiled kernels, which need a GPU (bench/gpu_step_suite.sh).

The interpreter is chosen when a kernel is defined, and torch imports triton's own kernels as it loads
(torch/_native/ops, once triton is installed): TRITON_INTERPRET=1 has to be in the environment before
torch is imported. So the interpreted tests run in a pytest process of their own, started by
`test_liger_kernels_interpreted_in_a_process_of_their_own` (or by hand:
`TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py -k test_interpreted_`); the session that starts
it never interprets Triton.

Triton 3.9's interpreter runs liger 0.8.5's rope kernel as it is, and its RMSNorm, SwiGLU and LayerNorm
kernels after two gaps of the interpreter (not of the kernels) are filled, for those tests only
(`interpreted_liger`):
- a Python float argument (eps, the SwiGLU gate multiplier) stays a Python float, where compiled Triton
  passes an fp32 scalar: liger's `eps.to(tl.float32)` fails with "'float' object has no attribute 'to'"
  (RMSNorm, LayerNorm and SwiGLU forward kernels);
- `triton.language.extra.libdevice.rsqrt` is a stub that returns None under the interpreter (the compiler
  binds it to CUDA's libdevice): "cannot convert None of type <class 'NoneType'> to tensor" at the store
  of RMSNorm's and LayerNorm's rstd. There it is `tl.math.rsqrt`, which the interpreter implements.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phi3v_ray.config import ConfigError, TrainConfig, config_help, load_config
from phi3v_ray.hardware import resolve_hardware
from phi3v_ray.kernels import (FUSED, INSTALL, KernelChoice, apply_fused_kernels, fused_ops, liger_installed,
                               resolve_kernels)

CPU = torch.device("cpu")
FORCED = KernelChoice("liger", "forced by the test")  # what resolve_kernels gives on CUDA; here on the CPU
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_liger = pytest.mark.skipif(not liger_installed(), reason=f"liger-kernel not installed: {INSTALL} (or '.[test]')")


@pytest.mark.slow
@needs_liger
def test_liger_kernels_interpreted_in_a_process_of_their_own():
    """The `test_interpreted_*` tests, in a pytest process that has TRITON_INTERPRET=1 from its start."""
    if INTERPRETED:
        pytest.skip("this process interprets Triton: it runs the interpreted tests itself")
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_interpreted_",
                          str(Path(__file__).resolve())], cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "passed" in summary and "skipped" not in summary and "deselected" in summary, summary


@pytest.fixture(scope="module")
def interpreted_liger():
    """liger's kernels on CPU tensors through Triton's interpreter, with the two gaps above filled."""
    if not INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 from the process's start (see the module docstring)")
    if not liger_installed():
        pytest.skip(f"liger-kernel not installed: {INSTALL} (or '.[test]')")
    import numpy as np
    import triton.language as tl
    from liger_kernel.ops import layer_norm, rms_norm
    from triton.runtime import interpreter

    convert = interpreter._implicit_cvt

    def implicit_cvt(arg):
        if isinstance(arg, float):  # as compiled Triton passes it: an fp32 scalar
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return convert(arg)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(interpreter, "_implicit_cvt", implicit_cvt)
        for module in (rms_norm, layer_norm):
            patch.setattr(module, "rsqrt", lambda x: tl.math.rsqrt(x))  # looked up while the interpreter runs
        yield


# ----------------------------------------------------------------------------- the choice
def test_auto_on_cpu_is_none_and_says_why():
    choice = resolve_kernels("auto", CPU, installed=True)
    assert choice.name == "none"
    assert choice.line() == "fused kernels: none (no CUDA)"


def test_auto_on_cuda_is_liger_when_installed_else_names_the_install():
    assert resolve_kernels("auto", "cuda:0", installed=True).name == "liger"
    missing = resolve_kernels("auto", "cuda", installed=False)
    assert missing.name == "none"
    assert missing.line() == "fused kernels: none (liger-kernel not installed: pip install -e '.[gpu]')"
    assert resolve_kernels("none", "cuda", installed=True).line() == "fused kernels: none (set explicitly)"


def test_liger_without_cuda_or_without_the_package_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match=r"fused_kernels=liger on a worker without CUDA \(cpu\).*fused_kernels=auto"):
        resolve_kernels("liger", CPU, installed=True)
    with pytest.raises(ValueError, match=r"liger-kernel is not installed on this worker; pip install -e '\.\[gpu\]'"):
        resolve_kernels("liger", "cuda", installed=False)
    assert resolve_kernels("liger", "cuda", installed=True) == KernelChoice("liger", "set explicitly")
    with pytest.raises(ValueError, match="fused_kernels='triton' is not one of auto, liger, none"):
        resolve_kernels("triton", "cuda", installed=True)


def test_the_setting_is_validated_on_the_driver_and_reachable_from_the_command_line():
    assert TrainConfig().fused_kernels == "auto"
    assert load_config(None, ["fused_kernels=none"]).fused_kernels == "none"
    assert "fused_kernels" in config_help() and "pip install -e '.[gpu]'" in config_help()
    with pytest.raises(ConfigError) as err:
        load_config(None, ["fused_kernels=fast"]).validate()
    assert any(p.field == "fused_kernels" and "'liger'" in p.fix for p in err.value.problems)
    problems = TrainConfig.from_flat(fused_kernels="liger", use_gpu=False).value_problems()
    assert [p.field for p in problems] == ["fused_kernels"] and "use_gpu=true" in problems[0].fix
    assert TrainConfig.from_flat(fused_kernels="liger", use_gpu=True).value_problems() == []
    with pytest.raises(ConfigError, match="did you mean 'fused_kernels'"):
        load_config(None, ["use_liger_kernel=true"])


def test_a_worker_resolves_the_setting_and_stops_without_retries_when_liger_cannot_run(monkeypatch):
    from types import SimpleNamespace

    import ray.train

    from phi3v_ray.failures import DeterministicFailure, deterministic_message
    from phi3v_ray.train import _with_kernels, _worker_from_ray

    context = SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1)
    monkeypatch.setattr(ray.train, "get_context", lambda: context)
    cfg = TrainConfig.from_flat(use_gpu=False)
    worker = _worker_from_ray(cfg)
    assert worker.kernels is None  # resolved once the feed has started (the import takes seconds)
    assert _with_kernels(worker, cfg).kernels == KernelChoice("none", "no CUDA")
    liger = TrainConfig.from_flat(fused_kernels="liger", use_gpu=False)  # got past the driver somehow
    with pytest.raises(DeterministicFailure) as err:  # Ray Train's controller stops the run instead of retrying
        _with_kernels(_worker_from_ray(liger), liger)
    assert deterministic_message(err.value).startswith("fused_kernels=liger on a worker without CUDA (cpu)")


# ----------------------------------------------------------------------------- the model
def _cfg(mode: str, **extra) -> TrainConfig:
    return TrainConfig.from_flat(mode=mode, precision="fp32", attention="sdpa", lora_rank=4, lora_alpha=8,
                                 zero_stage=0, **extra)


def _load(tiny_ckpt, mode: str, kernels: KernelChoice | None, **extra):
    """The model train.py builds, on the CPU in fp32 (LoRA adapters seeded alike in every copy)."""
    from phi3v_ray.train import load_model

    torch.manual_seed(0)
    return load_model(_cfg(mode, **extra), resolve_hardware(None, "fp32", "sdpa"), CPU, str(tiny_ckpt), kernels=kernels)


def test_on_cpu_the_default_changes_nothing_and_says_so(tiny_ckpt, capfd):
    model = _load(tiny_ckpt, "full", resolve_kernels("auto", CPU))
    assert "[phi3v-ray] fused kernels: none (no CUDA)" in capfd.readouterr().out
    plain = _load(tiny_ckpt, "full", None)
    assert fused_ops(model) == () and [type(m) for m in model.modules()] == [type(m) for m in plain.modules()]
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, plain.eval()(**batch).logits)  # bit for bit


@needs_liger
@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_the_swap_keeps_parameters_names_and_lora_targets(tiny_ckpt, mode, capfd):
    plain = _load(tiny_ckpt, mode, None)
    fused = _load(tiny_ckpt, mode, FORCED)
    assert "[phi3v-ray] fused kernels: liger " in capfd.readouterr().out
    assert fused_ops(fused) == tuple(FUSED)  # rms_norm, swiglu, rope, layer_norm
    base = fused.get_base_model() if mode != "full" else fused
    layers = base.model.layers
    assert sum(isinstance(m, FUSED["rms_norm"]) for m in fused.modules()) == 2 * len(layers) + 1
    assert sum(isinstance(m, FUSED["swiglu"]) for m in fused.modules()) == len(layers)
    assert sum(isinstance(m, FUSED["rope"]) for m in fused.modules()) == len(layers)
    clip = base.model.vision_embed_tokens.img_processor
    assert sum(isinstance(m, FUSED["layer_norm"]) for m in clip.modules()) == sum(
        isinstance(m, torch.nn.LayerNorm) for m in clip.modules()) > 0
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert [n for n, p in fused.named_parameters() if p.requires_grad] == \
           [n for n, p in plain.named_parameters() if p.requires_grad]
    adapted = [n for n, m in fused.named_modules() if hasattr(m, "lora_A")]  # PEFT found the same Linear modules
    assert adapted == [n for n, m in plain.named_modules() if hasattr(m, "lora_A")]
    assert any(n.endswith("mlp.gate_up_proj") for n in adapted) == (mode != "full")


@needs_liger
def test_the_swap_shares_every_parameter():
    """The fused modules are the loaded modules with a new class: every tensor is the one that was loaded;
    and transformers is not patched: a model built afterwards has transformers' classes."""
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm

    from phi3v_ray.model import Phi3VConfig, Phi3VForCausalLM
    from phi3v_ray.tiny import tiny_config_dict

    torch.manual_seed(0)
    model = Phi3VForCausalLM(Phi3VConfig(**tiny_config_dict()))
    before = dict(model.named_parameters())
    modules = dict(model.named_modules())
    apply_fused_kernels(model, FORCED)
    after = dict(model.named_parameters())
    assert list(after) == list(before) and all(after[n] is p for n, p in before.items())  # the same Parameters
    assert list(dict(model.named_modules())) == list(modules)
    assert all(modules[n] is m for n, m in model.named_modules())
    assert isinstance(model.model.norm, FUSED["rms_norm"])
    assert model.model.norm.variance_epsilon == model.config.rms_norm_eps
    assert apply_fused_kernels(model, FORCED) == tuple(FUSED)  # a second call changes nothing more
    assert type(Phi3VForCausalLM(Phi3VConfig(**tiny_config_dict())).model.norm) is Phi3RMSNorm


def _batch(rows: int = 1, length: int = 16) -> dict:
    """Text-only training rows (a chat turn of random words), the last 5 tokens supervised.

    Short and text only, because the interpreter runs one Triton program per row (token) of a kernel's
    input, at 3–40 ms each on the tiny model (rope the slowest): one image puts 313 tokens in the LM, and
    every CLIP LayerNorm over a crop and its global view has 1154 rows, ~6 s a call. A text-only batch
    still runs the tower in full mode (`_touch_vision_tower`), so its LayerNorms stay transformers' here
    and are tested on their own.
    """
    g = torch.Generator().manual_seed(3)
    text = torch.randint(3, 500, (rows, length - 8), generator=g)
    head, tail = torch.tensor([[1, 32010, 201]] * rows), torch.tensor([[32007, 201, 32001, 201, 32007]] * rows)
    input_ids = torch.cat([head, text[:, :-4], tail[:, :4], text[:, -4:], tail[:, 4:]], dim=1)  # (rows, length)
    labels = torch.full_like(input_ids, -100)
    labels[:, -5:] = input_ids[:, -5:]
    return dict(input_ids=input_ids, labels=labels)


def _unfuse_clip_layer_norms(model) -> None:
    for module in model.modules():
        if type(module) is FUSED["layer_norm"]:
            module.__class__ = torch.nn.LayerNorm


def _seed_adapters(model) -> None:
    """PEFT starts lora_B at zero, which would leave lora_A without a gradient to compare."""
    g = torch.Generator().manual_seed(5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(0.1 * torch.randn(p.shape, generator=g))


def _largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest |a - b| of any tensor relative to that tensor's largest |a|, and its name."""
    return max(((a[n] - b[n]).abs().max() / a[n].abs().max().clamp_min(1e-30)).item() for n in a), max(
        a, key=lambda n: ((a[n] - b[n]).abs().max() / a[n].abs().max().clamp_min(1e-30)).item())


# Measured (fp32, Triton 3.9's interpreter, liger 0.8.5): the losses equal to the last bit, every gradient
# within 4.3e-7 (full) and 9.8e-7 (LoRA) of its tensor's largest entry (summation order: a kernel reduces a
# row in one block). The bounds leave 10× room for another numpy, BLAS or liger version.
LOSS_RTOL = 1e-6
GRAD_TOL = 1e-5


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_interpreted_fused_model_gives_the_unfused_loss_and_gradients(interpreted_liger, tiny_ckpt, mode):
    """The training step's forward (loss_only, every layer checkpointed: the recompute runs the kernels
    again) and backward, fp32: RMSNorm, SwiGLU and rope fused in every decoder layer."""
    plain = _load(tiny_ckpt, mode, None, activation_checkpointing="all")
    fused = _load(tiny_ckpt, mode, FORCED, activation_checkpointing="all")
    _unfuse_clip_layer_norms(fused)
    assert fused_ops(fused) == ("rms_norm", "swiglu", "rope")
    if mode == "lora":
        _seed_adapters(plain), _seed_adapters(fused)
    batch = _batch()
    losses = []
    for model in (plain, fused):
        out = model(**batch, loss_only=True)
        out.loss.backward()
        losses.append(out.loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=LOSS_RTOL)
    grads = [{n: p.grad for n, p in m.named_parameters() if p.grad is not None} for m in (plain, fused)]
    assert list(grads[1]) == list(grads[0])
    assert any("layers.0.mlp.gate_up_proj" in n for n in grads[0]) and any("input_layernorm" in n or "lora" in n
                                                                           for n in grads[0])
    worst, name = _largest_difference(*grads)
    assert worst < GRAD_TOL, f"{name}: {worst:.2e}"


def test_interpreted_clip_layer_norms_give_the_unfused_outputs_and_gradients(interpreted_liger):
    """pre_layrnorm and one CLIP encoder layer (layer_norm1, layer_norm2) on 14 tokens instead of a crop's 577."""
    import copy

    from phi3v_ray.model import Phi3VConfig, Phi3VForCausalLM
    from phi3v_ray.tiny import tiny_config_dict

    torch.manual_seed(0)
    model = Phi3VForCausalLM(Phi3VConfig(**tiny_config_dict()))
    plain = copy.deepcopy(model.model.vision_embed_tokens.vision_transformer)
    apply_fused_kernels(model, FORCED)
    fused = model.model.vision_embed_tokens.vision_transformer
    assert type(fused.encoder.layers[0].layer_norm1) is FUSED["layer_norm"]
    x = torch.randn(2, 7, plain.config.hidden_size, generator=torch.Generator().manual_seed(1))
    outputs, grads = [], []
    for tower in (plain, fused):
        xi = x.clone().requires_grad_()
        layer = tower.encoder.layers[0]
        out = layer(tower.pre_layrnorm(xi), None, None) if model.model.vision_embed_tokens._layer_takes_causal_mask \
            else layer(tower.pre_layrnorm(xi), None)
        out = out[0] if isinstance(out, tuple) else out
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        outputs.append(out.detach())
        grads.append({"input": xi.grad, **{n: p.grad for n, p in tower.named_parameters() if p.grad is not None}})
    assert torch.allclose(outputs[1], outputs[0], rtol=0, atol=1e-6 * outputs[0].abs().max().item())
    assert "pre_layrnorm.weight" in grads[0] and "encoder.layers.0.layer_norm2.bias" in grads[0]
    grads = [{n: g for n, g in gs.items() if not n.endswith("k_proj.bias")} for gs in grads]  # zero but for rounding:
    worst, name = _largest_difference(*grads)                                                # softmax ignores it
    assert worst < GRAD_TOL, f"{name}: {worst:.2e}"


def test_interpreted_generation_with_the_kv_cache_gives_the_same_tokens(interpreted_liger, tiny_ckpt):
    """Generation rotates one new query at a time against cached keys: rope at positions T, T+1, ..."""
    plain = _load(tiny_ckpt, "full", None).eval()
    fused = _load(tiny_ckpt, "full", FORCED).eval()
    prompt = {"input_ids": _batch(rows=1)["input_ids"][:, :-5]}
    with torch.no_grad():
        tokens = [m.generate(**prompt, max_new_tokens=4, do_sample=False) for m in (plain, fused)]
        logits = [m(**prompt).logits for m in (plain, fused)]
    assert torch.equal(tokens[1], tokens[0]) and tokens[0].shape[1] == prompt["input_ids"].shape[1] + 4
    assert torch.allclose(logits[1], logits[0], rtol=0, atol=1e-5 * logits[0].abs().max().item())
