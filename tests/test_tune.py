"""Ray Tune sweeps: search spaces as data, concurrency from cluster resources, and real sweeps.

The slow test runs real Ray Tune + Ray Train trials on the tiny checkpoint and the demo data: a sweep whose
driver is SIGKILLed and restored. ASHA stopping poor trials, and trials placed by accelerator type on a
heterogeneous (simulated) cluster, are in tests/test_multinode.py, on its cluster.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phi3v_ray.config import ConfigError, Problem, TrainConfig, load_config
from tune_spaces.run import max_concurrent_trials, trial_bundles, trial_variants, base_config
from tune_spaces.spaces import (DERIVED_KEYS, SPACES, SweepSpace, apply_sample, candidate_problems, candidate_values,
                                get_space, to_tune, validate_space)

FIELDS = set(TrainConfig.setting_names())


def _overrides(tmp_path, demo_data, tiny_ckpt, **changes) -> dict:
    """A trial of a few seconds: tiny model, one worker, 2 examples per step, no evaluation."""
    return {
        "storage_path": str(tmp_path / "runs"),
        "checkpoint": str(tiny_ckpt),
        "train_file": str(demo_data / "train.jsonl"),
        "val_file": "",
        "images_root": str(demo_data / "images"),
        "num_crops": 1,
        "precision": "fp32",
        "attention": "sdpa",
        "micro_batch": 2,
        "grad_accum": 1,
        "num_workers": 1,
        "cpus_per_worker": 1,
        "max_steps": 4,
        "warmup_steps": 0,
        "eval_before": False,
        "max_failures": 0,
        "preprocess_cpus": 0.5,
        "log_every": 1,
        "report_every_s": 0,  # one report per step: ASHA's rung at step 2 sees every trial there
        "preprocess_actors": 1,  # one decoding actor is plenty for 32 small rows; each more starts an interpreter
        # The demo preset caches the decoded rows before training, for its 4 epochs; a trial of a few steps
        # streams, decoding its first rows while its worker starts instead of all of them before.
        "cache_data": False,
        **changes,
    }


# ----------------------------------------------------------------------------- spaces as data
@pytest.mark.parametrize("name", sorted(SPACES))
def test_every_named_space_validates_against_the_config(name, tmp_path):
    space = get_space(name)
    assert set(space.params) | set(space.settings) <= FIELDS | set(DERIVED_KEYS)
    assert space.metric_mode in ("min", "max") and space.num_samples >= 1
    base = load_config(space.preset, {"mode": space.mode, **space.settings})
    if space.metric.startswith("val/"):  # ASHA's first rung falls on an evaluation
        assert base.eval_every and space.grace_period % base.eval_every == 0 and not base.eval_before
    # Every edge of every spec makes a config that passes the full validation (with stand-in data files).
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    files = {"train_file": str(data), "val_file": str(data), "images_root": str(tmp_path)}
    for key, spec in space.params.items():
        values, problem = candidate_values(spec)
        assert problem is None, (key, problem)
        for value in values:
            apply_sample(base.replace(**files), {key: value}).validate()
    lr = space.params["lr"]["loguniform"]
    if space.mode in ("full", "frozen_vision"):
        assert 5e-6 <= lr[0] < lr[1] <= 5e-5  # SPEC §5: published 1e-5..2e-5
    elif not name.startswith("demo"):
        assert lr[0] < 2e-4 < lr[1]  # the recipe's LoRA learning rate sits inside
        assert set(space.params["lora_rank"]["choice"]) <= set(range(8, 129))


def test_specs_convert_to_tune_domains_and_alpha_follows_rank():
    from ray.tune.search.sample import Categorical, Float

    domains = to_tune(get_space("docvqa-lora").params)
    assert isinstance(domains["lr"], Float) and isinstance(domains["lora_rank"], Categorical)
    lrs = [domains["lr"].sample() for _ in range(200)]
    assert all(5e-5 <= x <= 1e-3 for x in lrs) and min(lrs) < 1e-4 < max(lrs)
    assert to_tune({"accelerator_type": {"grid": ["H100", "L4"]}})["accelerator_type"] == {"grid_search": ["H100", "L4"]}
    cfg = apply_sample(TrainConfig().to_dict(), {"lora_rank": 32, "lora_alpha_ratio": 0.5, "lr": 3e-4})
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lr) == (32, 16.0, 3e-4)  # the published DocVQA r32 α16


def test_a_bad_space_lists_every_problem(tmp_path):
    bad = SweepSpace(name="bad", preset="nlvr2", mode="lora", metric="val/bleu", metric_mode="up", num_samples=1,
                     params={"lr": {"loguniform": [1e-3, 1e-5]}, "lora_rnak": {"choice": [8]},
                             "num_crops": {"choice": [4, 32]}, "lora_alpha": 16, "lora_alpha_ratio": 2})
    with pytest.raises(ConfigError) as err:
        validate_space(bad)
    text = str(err.value)
    for expected in ("mode='lora'", "metric='val/bleu'", "metric_mode='up'", "low < high", "lora_rnak=",
                     "did you mean 'lora_rank'", "num_crops=32", "not both"):
        assert expected in text, expected
    assert all(isinstance(p, Problem) for p in err.value.problems)

    path = tmp_path / "mine.yaml"
    path.write_text("preset: demo\nmode: full\nmetric: loss\nmetric_mode: min\nnum_samples: 2\n"
                    "params:\n  lr: {loguniform: [1.0e-4, 1.0e-2]}\n  micro_batch: {choice: [2, 4]}\n")
    space = get_space(str(path))
    assert space.name == "mine" and space.params["micro_batch"] == {"choice": [2, 4]}


def test_concurrency_follows_what_one_trial_asks_for_and_what_the_nodes_hold():
    cpu = TrainConfig.from_flat(num_workers=1, cpus_per_worker=1, preprocess_cpus=0.5, preprocess_actors=1)
    # 1 CPU worker + 0.5 preprocessing + 0.25 read + 0.01 driver = 1.76 CPUs per trial.
    assert max_concurrent_trials([cpu], [{"CPU": 4}], limit=10) == 2
    assert max_concurrent_trials([cpu], [{"CPU": 4}], limit=1) == 1
    assert max_concurrent_trials([cpu.replace(val_file="v.jsonl")], [{"CPU": 4}], limit=10) == 1  # val pool too
    assert max_concurrent_trials([cpu.replace(num_workers=8)], [{"CPU": 4}], limit=10) == 1  # never less than 1

    h100 = TrainConfig(num_workers=4, use_gpu=True, accelerator_type="H100", cpus_per_worker=8)
    l4 = h100.replace(accelerator_type="L4", num_workers=2)
    nodes = [{"CPU": 16}] + [{"CPU": 96, "GPU": 8, "accelerator_type:H100": 1}] * 2 + [{"CPU": 48, "GPU": 4, "accelerator_type:L4": 1}]
    assert trial_bundles(h100)[0] == {"CPU": 8, "GPU": 1, "accelerator_type:H100": 0.001}
    assert max_concurrent_trials([h100], nodes, limit=64) == 4  # 16 H100s / 4 per trial
    assert max_concurrent_trials([l4], nodes, limit=64) == 2
    assert max_concurrent_trials([h100, l4], nodes, limit=64) == 6  # a space sampling the accelerator uses both pools
    pooled = TrainConfig(num_workers=2, worker_resource="h100_pool")
    assert max_concurrent_trials([pooled], [{"CPU": 32, "h100_pool": 3}], limit=64) == 1
    autoscaled = cpu.replace(preprocess_actors=1, preprocess_max_actors=3, data_node_resource="data_node")
    assert trial_bundles(autoscaled)[1:4] == [{"CPU": 0.5, "data_node": 0.001}] * 3  # room for the largest pool
    auto = TrainConfig.from_flat(num_workers=2, preprocess_cpus=0.5, val_file="v.jsonl")  # preprocess_actors=0
    assert trial_bundles(auto).count({"CPU": 0.5}) == 4 + 4  # train and val pools each grow to 2 per worker


def test_every_candidate_value_is_checked_against_the_trainers_validation():
    def space(**kw) -> SweepSpace:
        return SweepSpace(**{"name": "s", "preset": "demo", "mode": "lora", "metric": "loss", "metric_mode": "min",
                             "num_samples": 1, "params": {"lr": {"loguniform": [1e-4, 1e-2]}}, **kw})

    # A range whose upper end the trainer would reject, and a fixed value it would reject.
    with pytest.raises(ConfigError) as err:
        validate_space(space(params={"adam_beta1": {"uniform": [0.8, 1.5]}, "lora_dropout": {"choice": [0.1, 1.0]}},
                             settings={"preprocess_cpus": 0, "max_steps": 10}))
    problems = {p.field: p for p in err.value.problems}
    assert set(problems) == {"adam_beta1", "lora_dropout", "preprocess_cpus"}, err.value
    assert problems["adam_beta1"] == Problem("adam_beta1", 1.5, "must be in [0, 1)")
    assert problems["lora_dropout"].value == 1.0 and problems["preprocess_cpus"].value == 0.0
    assert "search space 's'" in str(err.value)

    # Values that break a rule between settings: a 64-example global batch vs micro_batch × 2 workers.
    with pytest.raises(ConfigError) as err:
        validate_space(space(params={"micro_batch": {"choice": [2, 3]}}, settings={"grad_accum": 0, "num_workers": 2}))
    assert [p.field for p in err.value.problems] == ["global_batch"] and "= 6" in err.value.problems[0].fix

    # Choices and types come from TrainConfig too; dotted data keys are settings like the short ones.
    with pytest.raises(ConfigError) as err:
        validate_space(space(params={"data.overflow": {"choice": ["reject", "cut"]}, "num_crops": {"choice": [4, "x"]}}))
    assert {(p.field, p.value) for p in err.value.problems} == {("overflow", "cut"), ("num_crops", "x")}
    ok = validate_space(space(params={"data.num_crops": {"choice": [1, 16]}}, settings={"data.max_length": 2048}))
    cfg = apply_sample(load_config("demo").to_dict(), {"data.num_crops": 16, "lora_rank": 8, "lora_alpha_ratio": 2})
    assert (cfg.data.num_crops, cfg.lora_alpha) == (16, 16.0) and ok.params

    base = load_config("demo")
    assert candidate_problems(base, "lr", 1e-3) == []
    assert candidate_problems(base, "lora_alpha_ratio", -1) == [Problem("lora_alpha_ratio", -1, "must be a number > 0")]


def test_sampled_accelerator_types_each_get_a_config(tmp_path, demo_data, tiny_ckpt):
    space = SweepSpace(name="mixed", preset="demo", mode="lora", metric="loss", metric_mode="min", num_samples=1,
                       params={"lr": {"loguniform": [1e-4, 1e-2]}, "accelerator_type": {"grid": ["H100", "L4"]}})
    variants = trial_variants(space, base_config(space, _overrides(tmp_path, demo_data, tiny_ckpt)))
    assert [v.accelerator_type for v in variants] == ["H100", "L4"]


def test_optuna_searcher_learns_only_from_reports_that_carry_the_metric():
    from tune_spaces.run import _optuna_search

    space = get_space("hateful_memes-lora")
    searcher = _optuna_search(seed=0, concurrency=2)
    assert searcher.set_search_properties(space.metric, space.metric_mode, to_tune(space.params))
    config = searcher.suggest("t1")
    assert 5e-5 <= config["lr"] <= 1e-3 and config["lora_rank"] in (8, 16, 32, 64, 128)
    searcher.on_trial_result("t1", {"step": 1, "loss": 2.0, "training_iteration": 1})  # a training report: no metric
    searcher.on_trial_result("t1", {"step": 100, "val/accuracy": 0.6, "training_iteration": 2})
    searcher.on_trial_complete("t1", {"step": 200, "loss": 1.0, "val/accuracy": 0.7, "training_iteration": 3})


def test_cli_lists_the_spaces(capsys):
    from phi3v_ray.cli import main

    assert main(["tune", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SPACES)


# ----------------------------------------------------------------------------- real sweeps
def _trial_status(exp_dir: Path) -> dict[str, str]:
    """trial id → status in Tune's latest experiment snapshot (empty while none is written)."""
    states = sorted(glob.glob(str(exp_dir / "experiment_state-*.json")))
    if not states:
        return {}
    try:
        data = json.loads(Path(states[-1]).read_text())
    except (OSError, ValueError):  # caught mid-write
        return {}
    trials = [json.loads(t[0]) if isinstance(t[0], str) else t[0] for t in data["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials}


@pytest.mark.slow
def test_a_killed_sweep_driver_resumes_without_rerunning_finished_trials(ray_local, tmp_path, demo_data, tiny_ckpt):
    from tune_spaces.run import run_sweep, trial_events

    # Two trials, one after the other (a 1-step one, then a 2-step one). The driver is killed once Tune's
    # snapshot shows the first finished and the second created: pending, or starting, which is as far as it
    # gets in the seconds before the kill (a trial's start takes ~20 s here).
    space = {"name": "resume", "preset": "demo", "mode": "lora", "metric": "loss", "metric_mode": "min",
             "num_samples": 1, "params": {"max_steps": {"grid": [1, 2]}, "lr": 1e-3, "lora_rank": 4}}
    overrides = _overrides(tmp_path, demo_data, tiny_ckpt)
    script = tmp_path / "sweep.py"
    script.write_text(
        "import json, sys\n"
        "from tune_spaces.run import run_sweep\n"
        "from tune_spaces.spaces import SweepSpace\n"
        "run_sweep(SweepSpace(**json.loads(sys.argv[1])), scheduler='none', overrides=json.loads(sys.argv[2]),\n"
        "          name='resume', max_concurrent=1, verbose=0)\n"
    )
    # The driver joins the shared local Ray (this process's environment carries its auth mode);
    # when the driver dies, Ray ends its job's trial actors, trainers and workers.
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "TUNE_GLOBAL_CHECKPOINT_S": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    exp = tmp_path / "runs" / "resume"
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen([sys.executable, str(script), json.dumps(space), json.dumps(overrides)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def first_done_second_created(status: dict[str, str]) -> bool:
        return len(status) == 2 and "TERMINATED" in status.values()

    try:
        deadline = time.time() + 300
        while time.time() < deadline and not first_done_second_created(_trial_status(exp)):
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.5)
        at_kill = _trial_status(exp)
        os.kill(driver.pid, signal.SIGKILL)  # the sweep's driver dies with one trial finished and one not
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    finished = {t for t, s in at_kill.items() if s == "TERMINATED"}
    assert len(finished) == 1 and len(at_kill) == 2, at_kill

    time.sleep(3)  # let Ray end the dead driver's actors
    t0 = time.time()
    grid = run_sweep(SweepSpace(**space), scheduler="none", overrides=overrides, name="resume", verbose=0)
    print(f"restored sweep: {time.time() - t0:.0f} s")

    assert len(grid) == 2 and grid.num_errors == 0
    assert {r.metrics["trial_id"] for r in grid} == set(at_kill)
    assert sorted(r.metrics["step"] for r in grid) == [1, 2]
    train_runs = str(exp / "train_runs")
    starts = {t: sum(e["event"] == "start" for e in trial_events(train_runs, t)) for t in at_kill}
    # The finished trial did not run again; the other ran to its end after the restore, whether or not its
    # training had started before the kill.
    assert all((starts[t] == 1) if t in finished else (starts[t] in (1, 2)) for t in at_kill), starts
    rows = list(csv.DictReader((exp / "results.csv").open()))
    assert {r["status"] for r in rows} == {"DONE"}
