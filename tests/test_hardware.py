"""phi3v_ray.hardware: precision / attention / mode for each GPU kind we expect to meet."""

import logging

import pytest

from phi3v_ray.hardware import (
    GPUInfo,
    HardwareChoice,
    detect_gpu,
    log_choice,
    resolve_hardware,
)

# Names as torch.cuda.get_device_name reports them.
A100 = GPUInfo("NVIDIA A100-SXM4-80GB", (8, 0), 80.0)
H100 = GPUInfo("NVIDIA H100 80GB HBM3", (9, 0), 80.0)
V100 = GPUInfo("Tesla V100-SXM2-32GB", (7, 0), 32.0)
T4 = GPUInfo("Tesla T4", (7, 5), 16.0)
A10G = GPUInfo("NVIDIA A10G", (8, 6), 24.0)
L4 = GPUInfo("NVIDIA L4", (8, 9), 24.0)
RTX3090 = GPUInfo("NVIDIA GeForce RTX 3090", (8, 6), 24.0)
GTX1080TI = GPUInfo("NVIDIA GeForce GTX 1080 Ti", (6, 1), 11.0)
CPU = None

# gpu, precision, attention with flash-attn installed, attention without it, suggested mode
CASES = [
    ("A100", A100, "bf16", "flash_attention_2", "sdpa", "full"),
    ("H100", H100, "bf16", "flash_attention_2", "sdpa", "full"),
    ("V100", V100, "fp16", "sdpa", "sdpa", "full"),
    ("T4", T4, "fp16", "sdpa", "sdpa", "qlora"),
    ("A10G", A10G, "bf16", "flash_attention_2", "sdpa", "lora"),
    ("L4", L4, "bf16", "flash_attention_2", "sdpa", "lora"),
    ("RTX3090", RTX3090, "bf16", "flash_attention_2", "sdpa", "lora"),
    ("GTX1080Ti", GTX1080TI, "fp16", "sdpa", "sdpa", "lora"),
    ("CPU", CPU, "fp32", "sdpa", "sdpa", "lora"),
]


@pytest.mark.parametrize(
    "gpu, precision, attn_flash, attn_no_flash, mode",
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_auto_resolution(gpu, precision, attn_flash, attn_no_flash, mode):
    with_flash = resolve_hardware(gpu, flash_available=True)
    without_flash = resolve_hardware(gpu, flash_available=False)
    assert isinstance(with_flash, HardwareChoice)
    assert with_flash.precision == without_flash.precision == precision
    assert with_flash.attention == attn_flash
    assert without_flash.attention == attn_no_flash
    assert with_flash.suggested_mode == without_flash.suggested_mode == mode
    # The reason line names the hardware and every decision.
    for choice in (with_flash, without_flash):
        assert (gpu.name if gpu else "CPU") in choice.reason
        assert choice.precision in choice.reason
        assert choice.attention in choice.reason
        assert choice.suggested_mode in choice.reason


def test_reported_memory_of_24gb_cards_still_gets_lora():
    # What torch really reports for cards sold as 24 GB (GiB): they must not flip to QLoRA.
    for gpu in (GPUInfo("NVIDIA A10G", (8, 6), 22.0), GPUInfo("NVIDIA L4", (8, 9), 22.5)):
        assert resolve_hardware(gpu, flash_available=False).suggested_mode == "lora"


def test_datacenter_name_matching():
    assert GPUInfo("NVIDIA A800 80GB PCIe", (8, 0), 80.0).is_datacenter
    assert GPUInfo("NVIDIA H200", (9, 0), 141.0).is_datacenter
    assert GPUInfo("NVIDIA GH200 480GB", (9, 0), 95.0).is_datacenter
    assert GPUInfo("NVIDIA B200", (10, 0), 180.0).is_datacenter
    assert GPUInfo("NVIDIA H800", (9, 0), 80.0).is_datacenter
    # A1000 contains "A100" as text but is a small workstation card.
    assert not GPUInfo("NVIDIA RTX A1000", (8, 6), 8.0).is_datacenter
    assert not L4.is_datacenter and not T4.is_datacenter


def test_small_datacenter_gpu_is_not_full_finetuning():
    v100_16 = GPUInfo("Tesla V100-SXM2-16GB", (7, 0), 16.0)
    assert resolve_hardware(v100_16, flash_available=False).suggested_mode == "lora"


def test_capability_list_is_accepted():
    gpu = GPUInfo("NVIDIA A100-SXM4-40GB", [8, 0], 40.0)
    assert gpu.capability == (8, 0)
    assert resolve_hardware(gpu, flash_available=True).precision == "bf16"


# ---- explicit settings are respected ---------------------------------------------------------


def test_explicit_settings_are_respected():
    choice = resolve_hardware(A100, precision="fp16", attention="eager", flash_available=True)
    assert (choice.precision, choice.attention) == ("fp16", "eager")
    choice = resolve_hardware(H100, precision="fp32", flash_available=True)
    assert (choice.precision, choice.attention) == ("fp32", "sdpa")  # flash needs half precision
    choice = resolve_hardware(A100, attention="flash_attention_2", flash_available=True)
    assert choice.attention == "flash_attention_2"
    assert resolve_hardware(CPU, precision="bf16").precision == "bf16"
    assert resolve_hardware(V100, precision="fp32").precision == "fp32"
    assert resolve_hardware(T4, attention="sdpa", flash_available=True).attention == "sdpa"


# ---- explicit settings are validated ----------------------------------------------------------


def test_bf16_before_ampere_names_gpu_and_fix():
    with pytest.raises(ValueError) as err:
        resolve_hardware(V100, precision="bf16")
    msg = str(err.value)
    assert "V100" in msg and "bf16" in msg and "fp16" in msg  # the GPU, the setting, the fix
    with pytest.raises(ValueError, match="T4"):
        resolve_hardware(T4, precision="bf16")


def test_flash_not_installed():
    with pytest.raises(ValueError, match="flash-attn.*not installed.*sdpa"):
        resolve_hardware(A100, attention="flash_attention_2", flash_available=False)


def test_flash_on_old_gpu_or_cpu():
    with pytest.raises(ValueError, match="V100.*8.0"):
        resolve_hardware(V100, attention="flash_attention_2", flash_available=True)
    with pytest.raises(ValueError, match="CPU"):
        resolve_hardware(CPU, attention="flash_attention_2", flash_available=True)


def test_flash_needs_half_precision():
    with pytest.raises(ValueError, match="fp32"):
        resolve_hardware(
            A100, precision="fp32", attention="flash_attention_2", flash_available=True
        )


def test_fp16_on_cpu():
    with pytest.raises(ValueError, match="fp16.*CUDA GPU"):
        resolve_hardware(CPU, precision="fp16")


@pytest.mark.parametrize("kw", [{"precision": "float16"}, {"attention": "flash"}])
def test_unknown_values(kw):
    with pytest.raises(ValueError, match="not one of"):
        resolve_hardware(A100, flash_available=True, **kw)


# ---- detection and logging ------------------------------------------------------------------


def test_detect_gpu_on_this_machine():
    torch = pytest.importorskip("torch")
    gpu = detect_gpu()
    if not torch.cuda.is_available():
        assert gpu is None
    else:
        assert gpu.name and gpu.memory_gb > 0 and len(gpu.capability) == 2


def test_log_choice(caplog):
    choice = resolve_hardware(L4, flash_available=False)
    with caplog.at_level(logging.INFO, logger="phi3v_ray.hardware"):
        line = log_choice(choice)
    assert line == choice.reason
    assert "NVIDIA L4" in caplog.text and "bf16" in caplog.text


def test_torch_dtype():
    torch = pytest.importorskip("torch")
    assert resolve_hardware(A100, flash_available=False).torch_dtype is torch.bfloat16
    assert resolve_hardware(T4, flash_available=False).torch_dtype is torch.float16
    assert resolve_hardware(CPU, flash_available=False).torch_dtype is torch.float32
