"""The training config (presets, overrides, validation) and the evaluation metrics."""

from __future__ import annotations

import pytest

from phi3v_ray.config import ConfigError, TrainConfig, load_config, preset_names
from phi3v_ray.metrics import anls_score, exact_match, roc_auc, summarize
from phi3v_ray.train import deepspeed_config
from phi3v_ray.hardware import resolve_hardware


# ----------------------------------------------------------------------------- config
def test_every_preset_and_every_published_mode_loads():
    assert {"demo", "docvqa", "hateful_memes", "nlvr2", "ucf101"} <= set(preset_names())
    from importlib import resources

    import yaml

    for name in preset_names():
        raw = yaml.safe_load(resources.files("phi3v_ray.presets").joinpath(f"{name}.yaml").read_text())
        for mode in raw.get("modes") or [raw.get("mode", "lora")]:
            cfg = load_config(name, [f"mode={mode}"])
            assert cfg.mode == mode
            # Everything but the data paths validates: the preset itself is consistent.
            with pytest.raises(ConfigError) as err:
                cfg.validate()
            assert all(p.split("=")[0] in {"train_file", "checkpoint", "images_root"} for p in err.value.problems), err.value


def test_preset_mode_sections_apply():
    lora = load_config("docvqa", ["mode=lora"])
    assert (lora.lr, lora.lora_rank, lora.lora_alpha) == (2e-4, 32, 16)
    full = load_config("docvqa", ["mode=full"])
    assert full.lr == 2e-5 and full.resolved_zero_stage == 2
    memes = load_config("hateful_memes", ["mode=lora"])
    assert (memes.lora_rank, memes.lora_alpha) == (128, 256)
    nlvr2 = load_config("nlvr2")
    assert (nlvr2.lr, nlvr2.epochs) == (1e-5, 3)
    with pytest.raises(ConfigError, match="publishes"):
        load_config("nlvr2", ["mode=qlora"])


def test_overrides_are_typed_and_unknown_keys_suggest_the_right_one():
    cfg = load_config(None, ["lr=3e-4", "epochs=2", "use_gpu=true", "name=x"])
    assert cfg.lr == 3e-4 and cfg.epochs == 2 and cfg.use_gpu is True and cfg.name == "x"
    with pytest.raises(ConfigError, match="did you mean 'lora_rank'"):
        load_config(None, ["lora_rnak=8"])
    with pytest.raises(ConfigError, match="epochs='two': expected int"):
        load_config(None, ["epochs=two"])
    with pytest.raises(ConfigError, match="write key=value"):
        load_config(None, ["epochs"])


def test_validation_reports_every_problem_at_once(tmp_path):
    cfg = TrainConfig(mode="big", precision="fp8", num_crops=17, lr=0, micro_batch=0, on_bad_record="drop",
                      train_file=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    text = str(err.value)
    for field in ("mode='big'", "precision='fp8'", "num_crops=17", "lr=0", "micro_batch=0", "on_bad_record='drop'",
                  "train_file=", "images_root="):
        assert field in text, field
    assert len(err.value.problems) >= 8


def test_global_batch_is_derived_once():
    cfg = TrainConfig(micro_batch=2, num_workers=8, global_batch=64)
    assert cfg.accumulation == 4 and cfg.effective_global_batch == 64
    assert TrainConfig(micro_batch=2, num_workers=8, grad_accum=3).effective_global_batch == 48
    with pytest.raises(ConfigError, match="multiple of micro_batch × num_workers = 12"):
        TrainConfig(micro_batch=3, num_workers=4, global_batch=64, train_file="x").validate()


def test_deepspeed_config_is_generated_from_the_training_config():
    cfg = TrainConfig(mode="full", micro_batch=2, num_workers=4, global_batch=64, max_grad_norm=1.0)
    ds = deepspeed_config(cfg, resolve_hardware(None, "fp32", "sdpa"), world_size=4)
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 8
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["overlap_comm"] is True
    assert ds["zero_optimization"]["reduce_bucket_size"] == 5e8
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


# ----------------------------------------------------------------------------- metrics
def test_anls_official_lowercases_and_the_recipe_form_is_case_sensitive():
    assert anls_score("Paris", ["paris"]) == 1.0
    assert anls_score("Paris", ["paris"], lowercase=False) == pytest.approx(0.8)
    assert anls_score("", ["x"]) == 0.0
    assert anls_score("abcdef", ["abcxyz"]) == 0.0  # NL = 0.5 is not < τ
    assert anls_score("abcdeX", ["abcdef", "zzz"]) == pytest.approx(1 - 1 / 6)  # best reference wins


def test_exact_match_cleans_like_the_recipe():
    assert exact_match(" Yes. ", ["yes"]) == 1.0
    assert exact_match("yes sir", ["yes"]) == 0.0
    assert exact_match("ApplyEyeMakeup", ["applyeyemakeup"]) == 1.0


def test_roc_auc_with_ties():
    assert roc_auc([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0]) == 1.0
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert roc_auc([0.5, 0.5], [1, 0]) == 0.5
    assert roc_auc([0.3, 0.4], [1, 1]) is None


def test_summarize_reports_overall_and_per_task():
    recs = [
        {"prediction": "yes", "answers": ["yes"], "task": "a", "p_yes": 0.9},
        {"prediction": "no", "answers": ["yes"], "task": "a", "p_yes": 0.4},
        {"prediction": "no", "answers": ["no"], "task": "a", "p_yes": 0.2},
        {"prediction": "7", "answers": ["7"], "task": "b"},
    ]
    s = summarize(recs)
    assert s["accuracy"] == 0.75 and s["a/accuracy"] == pytest.approx(2 / 3) and s["b/accuracy"] == 1.0
    assert s["a/roc_auc"] == 1.0 and s["n"] == 4
