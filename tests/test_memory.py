"""The memory estimate and the activation-checkpointing plan it gives, and load_model applying a plan."""

from __future__ import annotations

import pytest
import torch

from phi3v_ray.config import TrainConfig
from phi3v_ray.hardware import resolve_hardware
from phi3v_ray.memory import GiB, Dims, checkpoint_plan, fixed_bytes
from phi3v_ray.model import Phi3VConfig

DOCVQA = dict(micro_batch=4, tokens_per_sample=2550, zero_stage=2, precision="bf16")


@pytest.fixture(scope="module")
def dims() -> Dims:
    return Dims.from_config(Phi3VConfig.official())


def test_parameter_counts_match_the_official_model(dims):
    assert dims.total_params == pytest.approx(4.147e9, rel=0.01)  # bench/results: 4.147 B
    assert dims.layers == 32 and dims.clip_layers == 23


def test_activation_estimate_is_within_15_percent_of_the_h200_measurement(dims):
    """full, micro 4, DocVQA page: 106.3 GiB without checkpointing − 34.2 GiB with it = 72 GiB measured."""
    lm = 4 * 2550 * dims.layers * (dims.lm_layer_bytes - 2 * dims.hidden)
    clip = 4 * 17 * 577 * dims.clip_layers * (dims.clip_layer_bytes - 2 * dims.clip_hidden)
    assert (lm + clip) / GiB == pytest.approx(72, rel=0.15)


def test_fixed_memory_by_mode_and_backend(dims):
    n = dims.total_params
    assert fixed_bytes(dims, "full", 2, "bf16", 8) == pytest.approx(2 * n + 14 * n / 8 + 2 * GiB)
    assert fixed_bytes(dims, "frozen_vision", 2, "bf16", 8) < fixed_bytes(dims, "full", 2, "bf16", 8)
    assert fixed_bytes(dims, "frozen_vision", 0, "bf16", 8) / GiB > 55  # the 57 GiB/GPU DDP case of issue #13
    assert fixed_bytes(dims, "qlora", 0, "bf16", 1) < fixed_bytes(dims, "lora", 0, "bf16", 1) < 12 * GiB


def test_fixed_policies(dims):
    every = checkpoint_plan("every_n", dims, mode="full", every_n=4)
    assert every.lm == tuple(range(0, 32, 4)) and every.clip == tuple(range(0, 23, 4))
    assert checkpoint_plan("lm", dims, mode="full").clip == ()
    assert len(checkpoint_plan("all", dims, mode="full").lm) == 32
    assert checkpoint_plan("none", dims, mode="full").lm == ()
    with pytest.raises(ValueError, match="activation_checkpointing='some'"):
        checkpoint_plan("some", dims, mode="full")


def test_auto_checkpoints_less_the_more_memory_there_is(dims):
    assert len(checkpoint_plan("auto", dims, mode="full").lm) == 32  # no GPU: every layer
    counts = [sum(map(len, (p.lm, p.clip))) for p in
              (checkpoint_plan("auto", dims, mode="full", gpu_memory_gb=gb, **DOCVQA) for gb in (22, 40, 79.3, 139.8))]
    assert counts == sorted(counts, reverse=True) and counts[0] == 55 and counts[-1] < 10
    h200 = checkpoint_plan("auto", dims, mode="full", gpu_memory_gb=139.8, **{**DOCVQA, "micro_batch": 1})
    assert h200.lm == h200.clip == ()  # one page per step fits without any recompute
    a100 = checkpoint_plan("auto", dims, mode="full", gpu_memory_gb=79.3, **DOCVQA)
    assert len(a100.lm) > 0 and "of 79 GiB" in str(a100)
    small = checkpoint_plan("auto", dims, mode="full", gpu_memory_gb=22, **DOCVQA)
    assert "does not fit" in small.reason


def test_auto_never_checkpoints_a_frozen_clip(dims):
    for mode, vision in (("frozen_vision", True), ("lora", False)):
        plan = checkpoint_plan("auto", dims, mode=mode, gpu_memory_gb=22, lora_vision=vision, **DOCVQA)
        assert plan.clip == () and len(plan.lm) > 0  # nothing is saved for a CLIP backward that never runs
    lora = checkpoint_plan("auto", dims, mode="lora", gpu_memory_gb=139.8, **{**DOCVQA, "zero_stage": 0})
    assert lora.lm == lora.clip == ()  # LoRA's 17.7 GiB leaves room for every activation


@pytest.mark.parametrize("policy,lm,clip", [("lm", [True, True], [False, False]), ("every_n", [True, False], [True, False]),
                                            ("none", [False, False], [False, False]), ("auto", [True, True], [True, True])])
def test_load_model_applies_the_policy(tiny_ckpt, policy, lm, clip):
    from phi3v_ray.modes import checkpointable_layers
    from phi3v_ray.train import load_model

    cfg = TrainConfig.from_dict(dict(mode="full", precision="fp32", attention="sdpa", activation_checkpointing=policy))
    model = load_model(cfg, resolve_hardware(None, "fp32", "sdpa"), torch.device("cpu"), str(tiny_ckpt))
    lm_layers, clip_layers = checkpointable_layers(model)
    assert [bool(layer.gradient_checkpointing) for layer in lm_layers] == lm
    assert [bool(layer.gradient_checkpointing) for layer in clip_layers] == clip


def test_host_heap_trim_gives_freed_pages_back_and_the_worker_reports_its_shared_pages():
    """After a batch's host tensors are freed, glibc keeps their pages; trim_host_heap returns them
    (the training worker calls it after each evaluation and every few seconds), and the logged host memory
    names the object-store (shared-memory) part of the resident set."""
    import sys

    from phi3v_ray.train import _HostMemory, trim_host_heap

    memory = _HostMemory(uss_every_s=3600, trim_every_s=3600)
    first = memory.sample()
    assert set(first) == {"host_rss_gb", "host_uss_gb", "host_shm_gb"} and first["host_uss_gb"] > 0
    if not sys.platform.startswith("linux"):
        pytest.skip("malloc_trim and /proc are Linux's")
    # Many mid-sized blocks (below glibc's mmap threshold) freed out of order: the heap keeps them.
    blocks = [torch.empty(96 * 1024, dtype=torch.uint8).fill_(1) for _ in range(3000)]
    del blocks[::2]
    held = memory.sample()["host_rss_gb"]
    blocks.clear()
    kept = memory.sample()["host_rss_gb"]
    trim_host_heap()
    trimmed = memory.sample()["host_rss_gb"]
    assert trimmed < kept - 0.05, (held, kept, trimmed)  # ~0.28 GB were allocated; most comes back
