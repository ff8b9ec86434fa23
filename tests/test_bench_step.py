"""bench/step.py: its FLOP count against torch's FlopCounterMode, and one real step through it on the tiny model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from phi3v_ray.memory import Dims
from phi3v_ray.model import Phi3VForCausalLM
from phi3v_ray.modes import LoraSettings, apply_mode

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "bench" / "step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode,vision", [("full", True), ("frozen_vision", True), ("lora", True), ("lora", False)],
                         ids=["full", "frozen_vision", "lora", "lora_text_only"])
def test_step_flops_match_torchs_flop_counter(tiny_ckpt, mode, vision):
    """Every matmul of a forward + backward, counted by torch, against the analytic count.

    The math SDPA backend writes attention as matmuls, so torch counts it (over all T keys: causal=False)
    and its backward: this pins "attention backward = 2 × forward, trainable weights or not" and
    "no backward through a frozen CLIP". No checkpointing, so model FLOPs = hardware FLOPs.
    """
    bench = _bench()
    torch.manual_seed(0)
    model = apply_mode(Phi3VForCausalLM.from_pretrained(tiny_ckpt, attn_implementation="sdpa"), mode,
                       LoraSettings(rank=4, alpha=8, vision=vision))
    model.train()
    batch, crops, n_img = bench.synthetic_batch(2, 4, (320, 240), text_tokens=24, answer_tokens=6)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**batch, loss_only=True).loss.backward()
    counted = counter.get_total_flops()
    dims = Dims.from_config(model.config)
    ours = bench.step_flops(dims, mode, micro_batch=2, seq_len=batch["input_ids"].shape[1], image_tokens=n_img,
                            crops=crops, supervised=6, lora_rank=4, lora_vision=vision, causal=False)
    assert ours["model"] == ours["hardware"]
    assert ours["model"] == pytest.approx(counted, rel=0.01), (ours, counted)


def test_recompute_counts_only_towers_that_back_propagate():
    bench = _bench()
    from phi3v_ray.model import Phi3VConfig

    dims = Dims.from_config(Phi3VConfig.official())
    shape = dict(micro_batch=4, seq_len=2550, image_tokens=2509, crops=17, supervised=8)
    full = bench.step_flops(dims, "full", lm_checkpointed=32, clip_checkpointed=23, **shape)
    frozen = bench.step_flops(dims, "frozen_vision", lm_checkpointed=32, clip_checkpointed=23, **shape)
    lora = bench.step_flops(dims, "lora", lora_rank=64, lm_checkpointed=32, clip_checkpointed=23, **shape)
    assert 1.25 <= full["hardware"] / full["model"] <= 1.34  # issue #13: +25-32 % for checkpointing everything
    assert frozen["hardware"] - frozen["model"] < full["hardware"] - full["model"]  # no CLIP recompute
    assert 0.04 < lora["adapters"] / lora["model"] < 0.07  # issue #13: adapter FLOPs ~5.5 %
    assert full["hardware"] / 4 / 1e12 == pytest.approx(100, rel=0.1)  # issue #13: ~100 TFLOP executed per sample


def test_bench_runs_the_training_step_on_the_tiny_model(tiny_ckpt, tmp_path):
    bench = _bench()
    out = tmp_path / "step.jsonl"
    result = bench.main(["--config", str(tiny_ckpt), "--device", "cpu", "--mode", "lora", "--micro-batch", "1",
                         "--num-crops", "1", "--page", "336", "336", "--warmup", "0", "--steps", "1",
                         "--lora-rank", "4", "--activation-checkpointing", "lm", "--out", str(out)])
    assert result["engine"] == "ddp" and result["activation_checkpointing"].startswith("lm: 2/2 LM, 0/2 CLIP")
    assert result["fused_kernels"] == "none (no CUDA)"  # --fused-kernels auto, on a CPU
    assert result["hardware_tflops_per_step"] >= result["model_tflops_per_step"] > 0
    assert result["final_loss"] > 0 and json.loads(out.read_text())["mode"] == "lora"
    table = bench.table([result])
    assert "| lora | ddp |" in table and "img/s" in table and "HFU" in table
