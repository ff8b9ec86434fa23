"""The training config (presets, overrides, validation) and the evaluation metrics."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys
from importlib import resources
from typing import Literal, get_args, get_origin, get_type_hints

import pytest
import yaml

from phi3v_ray.config import (ConfigError, DataConfig, Problem, TrainConfig, config_help, load_config, preset_names,
                              resolve_key)
from phi3v_ray.metrics import anls_score, exact_match, roc_auc, summarize


# ----------------------------------------------------------------------------- config
def _preset_yaml(name: str) -> dict:
    return yaml.safe_load(resources.files("phi3v_ray.presets").joinpath(f"{name}.yaml").read_text())


def test_every_preset_and_every_published_mode_loads_and_validates(tmp_path):
    assert {"demo", "docvqa", "hateful_memes", "nlvr2", "ucf101"} <= set(preset_names())
    for name in preset_names():
        raw = _preset_yaml(name)
        # The same preset written with flat keys (as presets were before `data:` existed) loads the same.
        flat = {k: v for k, v in raw.items() if k != "data"} | (raw.get("data") or {})
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(flat))
        for mode in raw.get("modes") or [raw.get("mode", "lora")]:
            cfg = load_config(name, [f"mode={mode}"])
            assert cfg.mode == mode
            assert load_config(str(tmp_path / f"{name}.yaml"), [f"mode={mode}"]) == cfg
            # Everything but the data paths validates: the preset itself is consistent.
            assert cfg.value_problems() == []
            with pytest.raises(ConfigError) as err:
                cfg.validate()
            assert {p.field for p in err.value.problems} <= {"train_file", "checkpoint", "images_root"}, err.value


def test_presets_keep_their_values():
    demo = load_config("demo")
    assert (demo.data.num_crops, demo.data.max_length, demo.data.preprocess_cpus) == (1, 4096, 0.5)
    assert (demo.mode, demo.num_workers, demo.cpus_per_worker, demo.micro_batch, demo.epochs, demo.lr, demo.precision) == \
        ("frozen_vision", 1, 2, 2, 4, 2e-3, "fp32")
    assert {n: load_config(n).data.num_crops for n in ("docvqa", "hateful_memes", "nlvr2", "ucf101")} == \
        {"docvqa": 16, "hateful_memes": 16, "nlvr2": 4, "ucf101": 4}
    assert load_config("docvqa").data == DataConfig(num_crops=16, max_length=8192)  # the rest are the defaults


def test_preset_mode_sections_apply():
    lora = load_config("docvqa", ["mode=lora"])
    assert (lora.lr, lora.lora_rank, lora.lora_alpha) == (2e-4, 32, 16)
    full = load_config("docvqa", ["mode=full"])
    assert full.lr == 2e-5 and full.resolved_zero_stage == 2
    # frozen_vision trains the 3.8 B-parameter LM: ZeRO-2 by default too; adapters need no sharding.
    assert load_config("docvqa", ["mode=frozen_vision"]).resolved_zero_stage == 2
    assert load_config("docvqa", ["mode=lora"]).resolved_zero_stage == 0
    assert load_config("docvqa", ["mode=frozen_vision", "zero_stage=0"]).resolved_zero_stage == 0
    memes = load_config("hateful_memes", ["mode=lora"])
    assert (memes.lora_rank, memes.lora_alpha) == (128, 256)
    nlvr2 = load_config("nlvr2")
    assert (nlvr2.lr, nlvr2.epochs) == (1e-5, 3)
    with pytest.raises(ConfigError, match="publishes"):
        load_config("nlvr2", ["mode=qlora"])


def test_overrides_are_typed_and_unknown_keys_suggest_the_right_one():
    cfg = load_config(None, ["lr=3e-4", "epochs=2", "use_gpu=true", "name=x", "max_pixels=2e6"])
    assert cfg.lr == 3e-4 and cfg.epochs == 2 and cfg.use_gpu is True and cfg.name == "x"
    assert cfg.data.max_pixels == 2_000_000 and isinstance(cfg.data.max_pixels, int)
    with pytest.raises(ConfigError, match="did you mean 'lora_rank'"):
        load_config(None, ["lora_rnak=8"])
    with pytest.raises(ConfigError, match="did you mean 'data.num_crops'"):
        load_config(None, ["data.num_crop=8"])
    with pytest.raises(ConfigError, match="epochs='two': expected int"):
        load_config(None, ["epochs=two"])
    with pytest.raises(ConfigError, match="write key=value"):
        load_config(None, ["epochs"])


def test_data_settings_take_their_short_or_dotted_name_and_a_data_mapping(tmp_path):
    short = load_config("docvqa", ["num_crops=4", "train_file=t.jsonl", "system=You read documents. Answer=short"])
    dotted = load_config("docvqa", ["data.num_crops=4", "data.train_file=t.jsonl",
                                    "data.system=You read documents. Answer=short"])
    assert short == dotted
    assert (short.data.num_crops, short.data.train_file, short.data.system) == (4, "t.jsonl", "You read documents. Answer=short")
    assert load_config("docvqa", {"data": {"num_crops": 4}}).data.num_crops == 4
    path = tmp_path / "mine.yaml"
    path.write_text("mode: lora\nlr: 1.0e-4\ndata:\n  num_crops: 8\n  on_bad_record: skip\nmax_length: 1024\n")
    mine = load_config(str(path), ["num_crops=2"])  # the command line overrides the file's data mapping
    assert (mine.lr, mine.data.num_crops, mine.data.on_bad_record, mine.data.max_length) == (1e-4, 2, "skip", 1024)
    with pytest.raises(ConfigError, match="given twice"):
        load_config(None, ["num_crops=2", "data.num_crops=4"])
    assert resolve_key("num_crops") == resolve_key("data.num_crops") == "num_crops"
    assert resolve_key("data.lr") is None and resolve_key("lr") == "lr"


def _other_value(name: str, hint, default):
    """A valid value of a setting that differs from its default."""
    if get_origin(hint) is Literal:
        return next(c for c in get_args(hint) if c != default)
    if hint is bool:
        return not default
    if hint is int:
        return {"num_crops": 4, "preprocess_max_actors": 3}.get(name, default + 1)
    if hint is float:
        return default / 2 if default else 0.5
    return f"{name}-value"


def test_every_setting_is_reachable_from_the_command_line():
    """Each setting, nested ones included, set by key=value under its short and its dotted name."""
    checked = 0
    for cls, prefix in ((TrainConfig, ""), (DataConfig, "data.")):
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "data":
                continue
            default = getattr(cls(), f.name)
            value = _other_value(f.name, hints[f.name], default)
            for key in {f.name, prefix + f.name}:
                cfg = load_config(None, [f"{key}={value}"])
                got = getattr(cfg.data if prefix else cfg, f.name)
                assert got == value and type(got) is type(value), (key, value, got)
            checked += 1
    assert checked == len(TrainConfig.setting_names()) and "max_pixels" in TrainConfig.setting_names()


def test_dicts_round_trip_nested_and_flat(tmp_path):
    cfg = TrainConfig.from_flat(name="rt", lr=3e-4, lora_rank=8, num_crops=4, system="be brief", max_pixels=10**6,
                                preprocess_actors=2, preprocess_max_actors=4, object_store_memory_limit=2**26)
    nested = cfg.to_dict()
    assert nested["data"]["num_crops"] == 4 and "num_crops" not in nested
    assert TrainConfig.from_dict(nested) == cfg  # what Ray hands to every worker
    assert TrainConfig.from_dict(cfg.to_flat()) == cfg  # Tune's flat keys
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(nested))
    assert load_config(str(tmp_path / "cfg.yaml")) == cfg
    assert cfg.data.actor_pool() == cfg.data.actor_pool(num_workers=8) == (2, 4)  # explicit numbers stay


def test_from_flat_and_replace_route_data_settings():
    cfg = TrainConfig.from_flat(name="t", train_file="a.jsonl", num_crops=1, lora_alpha=8, mode="lora")
    assert (cfg.data.train_file, cfg.data.num_crops, cfg.lora_alpha) == ("a.jsonl", 1, 8.0)
    other = cfg.replace(num_crops=4, lr=1e-3, **{"data.max_length": 512})
    assert (other.data.num_crops, other.lr, other.data.max_length, other.data.train_file) == (4, 1e-3, 512, "a.jsonl")
    assert cfg.data.num_crops == 1  # a copy, not a change
    assert cfg.replace(data=DataConfig(num_crops=2)).data == DataConfig(num_crops=2)
    with pytest.raises(ConfigError, match="did you mean 'num_crops'"):
        cfg.replace(num_crop=4)


def test_choices_come_from_the_literal_types():
    hints = {**get_type_hints(TrainConfig), **get_type_hints(DataConfig)}
    literal = {name: get_args(h) for name, h in hints.items() if get_origin(h) is Literal}
    assert set(literal) >= {"mode", "precision", "attention", "zero_stage", "overflow", "on_bad_record"}
    for name, choices in literal.items():
        bad = "nonsense" if isinstance(choices[0], str) else 7
        with pytest.raises(ConfigError) as err:
            TrainConfig.from_flat(**{name: bad}).validate()
        (problem,) = [p for p in err.value.problems if p.field == name]
        assert problem.value == bad and problem.fix == f"use one of {list(choices)}"


def test_validation_reports_every_problem_at_once(tmp_path):
    cfg = TrainConfig.from_flat(mode="big", precision="fp8", num_crops=17, lr=0, micro_batch=0, on_bad_record="drop",
                                adam_beta1=1.5, preprocess_cpus=0, train_file=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    text = str(err.value)
    for field in ("mode='big'", "precision='fp8'", "num_crops=17", "lr=0", "micro_batch=0", "on_bad_record='drop'",
                  "adam_beta1=1.5", "preprocess_cpus=0", "train_file=", "images_root="):
        assert field in text, field
    problems = {p.field: p for p in err.value.problems}
    assert problems["num_crops"] == Problem("num_crops", 17, "use an integer in 1..16")
    assert problems["adam_beta1"].fix == "must be in [0, 1)" and problems["preprocess_cpus"].fix == "must be > 0"
    assert str(problems["lr"]) == "lr=0.0: must be > 0"
    assert all(isinstance(p, Problem) for p in err.value.problems) and len(problems) >= 10


def test_one_command_line_reports_all_its_problems_together():
    with pytest.raises(ConfigError) as err:
        load_config("docvqa", ["lora_rnak=8", "epochs=two", "lr=-1", "num_crops=32", "bogus", "mode=big"])
    fields = [p.field for p in err.value.problems]
    assert fields.count("lora_rnak") == 1 and fields.count("epochs") == 1 and fields.count("override") == 1
    assert {"lr", "num_crops", "mode"} <= set(fields)  # the range checks ran despite the unknown key
    with pytest.raises(ConfigError) as err:
        load_config("no-such-preset", ["lr=-1"])
    assert {p.field for p in err.value.problems} == {"config", "lr"}


def test_global_batch_is_derived_once():
    cfg = TrainConfig(micro_batch=2, num_workers=8, global_batch=64)
    assert cfg.accumulation == 4 and cfg.effective_global_batch == 64
    assert TrainConfig(micro_batch=2, num_workers=8, grad_accum=3).effective_global_batch == 48
    with pytest.raises(ConfigError, match="multiple of micro_batch × num_workers = 12"):
        TrainConfig.from_flat(micro_batch=3, num_workers=4, global_batch=64, train_file="x").validate()


def test_batch_layout_settings_resolve_and_validate():
    from phi3v_ray.packing import use_packing

    assert TrainConfig(micro_batch=4).length_grouping_window == 0  # off by default: it unmixes mixed tasks
    assert TrainConfig(micro_batch=4, group_by_length=True).length_grouping_window == 64
    assert TrainConfig(micro_batch=1, group_by_length=True).length_grouping_window == 0
    assert load_config(None, ["packing=never", "group_by_length=false"]).packing == "never"
    assert [use_packing(p, a) for p in ("auto", "always", "never") for a in ("flash_attention_2", "sdpa", "eager")] == \
        [True, True, False, True, True, True, False, False, False]  # auto packs where attention needs no mask
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_flat(pack_tokens=4096, max_length=8192, length_window=0, train_file="x").validate()
    problems = {p.field: p for p in err.value.problems}
    assert problems["pack_tokens"].fix.startswith("use 0 (a micro-batch in one row) or at least max_length = 8192")
    assert problems["length_window"].fix == "must be ≥ 1"
    assert not TrainConfig.from_flat(pack_tokens=8192, max_length=8192).value_problems()


def test_help_config_lists_every_setting_with_type_and_default(capsys):
    from phi3v_ray.cli import main

    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == config_help().strip()
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    for name in TrainConfig.setting_names():
        key = f"data.{name}" if name in DataConfig.__dataclass_fields__ else name
        assert key in lines, key
    assert "reject | truncate" in lines["data.overflow"] and "default 'reject'" in lines["data.overflow"]
    assert "int" in lines["data.num_crops"] and "default 16" in lines["data.num_crops"]
    assert "full | frozen_vision | lora | qlora" in lines["mode"]


def test_config_and_sweep_spaces_import_without_torch():
    code = "import sys, phi3v_ray.config, tune_spaces.spaces; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_broken_subcommand_module_is_an_error_not_a_missing_command(monkeypatch):
    from phi3v_ray.cli import build_parser

    assert "tune" in build_parser()._subparsers._group_actions[0].choices
    monkeypatch.setitem(sys.modules, "tune_spaces.cli", None)  # what a failing import looks like to Python
    with pytest.raises(ImportError, match="tune_spaces.cli"):
        build_parser()


def test_driver_refuses_a_cluster_that_leaves_ray_data_no_cpu(ray_local, monkeypatch):
    from phi3v_ray.launch import check_cluster_fits

    cpus = ray_local.cluster_resources()["CPU"]
    check_cluster_fits(TrainConfig(num_workers=2, cpus_per_worker=1.0))  # 4 CPUs: 2 left for Ray Data
    starved = TrainConfig(num_workers=int(cpus), cpus_per_worker=1.0)
    with pytest.raises(ConfigError, match="wait forever") as err:
        check_cluster_fits(starved)
    assert err.value.problems[0].field == "cpus_per_worker"
    monkeypatch.setenv("PHI3V_AUTOSCALING", "1")  # nodes may still come up: skipped like the worker check
    check_cluster_fits(starved)


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


def test_fault_injection_takes_several_faults_and_names_a_bad_one():
    from phi3v_ray.faults import fault_hook, parse_faults

    assert parse_faults("1:2:/tmp/a; 0:4:/tmp/b:c") == [(1, 2, "/tmp/a"), (0, 4, "/tmp/b:c")]
    assert TrainConfig.from_flat(fault_injection="1:2:/tmp/a;0:4:/tmp/b").value_problems() == []
    problems = TrainConfig.from_flat(fault_injection="1:2:/tmp/a;rank0:4:/tmp/b").value_problems()
    assert [p.field for p in problems] == ["fault_injection"] and "'rank0:4:/tmp/b'" in problems[0].fix
    fault_hook(3, "1:2:/tmp/a")(2)  # another rank's fault: nothing happens
