"""What a user types: did-you-mean, every problem at once, paths resolved on the driver, what `eval`
reads and with which settings, refused resumes, the console's tables and plain failure sentences.

The README's own `eval` and `export` lines run on a QLoRA run in tests/test_train.py (`_readme_lines` finds them).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from phi3v_ray.checkpointing import CheckpointCorrupt, write_manifest
from phi3v_ray.cli import main
from phi3v_ray.config import ConfigError, TrainConfig, load_config
from phi3v_ray.failures import out_of_memory_message
from phi3v_ray.metrics import score_table
from phi3v_ray.resolve import absolute_paths, check_resume, eval_config, eval_target, fetch_hub_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("typed, meant", [("learning_rate", "lr"), ("lernin_rate", "lr"), ("lora_r", "lora_rank"),
                                          ("per_device_train_batch_size", "micro_batch"), ("num_crop", "num_crops"),
                                          ("model_name_or_path", "checkpoint"), ("num_train_epochs", "epochs")])
def test_unknown_keys_name_the_setting_people_mean(typed, meant):
    with pytest.raises(ConfigError, match=rf"{typed}='1': unknown key \(did you mean '{meant}'\?\)"):
        load_config(None, [f"{typed}=1"])


def test_an_unknown_key_does_not_hide_a_missing_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "lernin_rate=1e-4", "train_file=missing.jsonl", "images_root=imgs", "lr=-1"])
    err = capsys.readouterr().err
    assert code == 2
    for expected in ("lernin_rate='1e-4': unknown key (did you mean 'lr'?)", f"train_file='{tmp_path}/missing.jsonl'",
                     "lr=-1.0: must be > 0", "images_root="):
        assert expected in err, err


def test_relative_paths_are_resolved_where_the_user_typed_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models/phi").mkdir(parents=True)  # an existing org/name-shaped folder is a folder, not a Hub id
    cfg = absolute_paths(TrainConfig.from_flat(train_file="data/train.jsonl", images_root="data/images",
                                               checkpoint="models/phi", storage_path="out", val_file=""))
    assert cfg.data.train_file == str(tmp_path / "data/train.jsonl")
    assert cfg.data.images_root == str(tmp_path / "data/images")
    assert cfg.checkpoint == str(tmp_path / "models/phi") and cfg.storage_path == str(tmp_path / "out")
    assert cfg.data.val_file == "" and absolute_paths(TrainConfig()).checkpoint == "tiny"
    remote = absolute_paths(TrainConfig.from_flat(storage_path="s3://bucket/runs"))
    assert remote.storage_path == "s3://bucket/runs"


def test_a_hub_id_is_never_looked_up_unless_downloads_are_allowed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(TrainConfig.from_flat(checkpoint="microsoft/Phi-3.5-vision-instruct"))
    assert cfg.checkpoint == "microsoft/Phi-3.5-vision-instruct"
    with pytest.raises(ConfigError, match="allow_download=true"):
        fetch_hub_checkpoint(cfg)


def _finished_checkpoint(run_dir: Path, tiny_ckpt: Path, **settings) -> Path:
    """A finished full-mode checkpoint as a run leaves it: model/, train_state.json, a manifest."""
    ckpt = run_dir / "checkpoint_2026-11-29_10-00-00.000000"
    shutil.copytree(tiny_ckpt, ckpt / "model")
    config = TrainConfig.from_flat(name=run_dir.name, storage_path=str(run_dir.parent), checkpoint=str(tiny_ckpt),
                                   mode="full", num_crops=1, max_length=4096, train_file="/data/train.jsonl",
                                   val_file="/data/test.jsonl", images_root="/data/images", **settings)
    state = {"state": {"step": 7, "epoch": 1, "batch_in_epoch": 0, "resumed_at": []}, "history": [],
             "config": config.to_dict()}
    (ckpt / "train_state.json").write_text(json.dumps(state))
    write_manifest(ckpt, 0, 1)
    return ckpt


def test_eval_reads_a_run_a_checkpoint_or_its_model_folder_alike(tmp_path, tiny_ckpt):
    ckpt = _finished_checkpoint(tmp_path / "runs" / "demo", tiny_ckpt)
    for given in (tmp_path / "runs" / "demo", ckpt, ckpt / "model"):
        target = eval_target(str(given))
        assert target.weights == str(ckpt / "model") and target.trained == ""
        assert target.settings["mode"] == "full" and target.run_name == "demo"
    plain = eval_target(str(tiny_ckpt))
    assert plain.weights == str(tiny_ckpt) and plain.settings is None
    with pytest.raises(ConfigError, match="neither a run, a checkpoint, nor a folder of weights"):
        eval_target(str(tmp_path))
    (ckpt / "model" / "config.json").write_text("{}")  # altered after the manifest was written
    with pytest.raises(CheckpointCorrupt, match="config.json"):
        eval_target(str(ckpt))


def test_eval_takes_the_settings_the_checkpoint_was_trained_with(tmp_path, tiny_ckpt, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = _finished_checkpoint(tmp_path / "runs" / "demo", tiny_ckpt, lora_rank=4)
    cfg, problems = eval_config(None, ["checkpoint=runs/demo", "eval_batch=2"], "runs/demo")
    assert problems == []
    assert (cfg.mode, cfg.data.num_crops, cfg.data.max_length) == ("full", 1, 4096)  # not the defaults lora/16/8192
    assert cfg.eval_only and cfg.eval_batch == 2 and cfg.checkpoint == str(ckpt / "model")
    assert cfg.data.val_file == "/data/test.jsonl"  # the run's own validation file unless given
    assert cfg.name == "demo-eval" and cfg.run_dir == str(tmp_path / "runs" / "demo-eval")  # never the run itself
    mine, _ = eval_config(None, ["checkpoint=runs/demo", "val_file=other.jsonl", "name=e"], "runs/demo")
    assert mine.data.val_file == "other.jsonl" and mine.name == "e"


def test_resuming_under_a_name_trained_with_other_settings_is_refused(tmp_path, tiny_ckpt):
    run = tmp_path / "runs" / "demo"
    _finished_checkpoint(run, tiny_ckpt)
    same = TrainConfig.from_flat(name="demo", storage_path=str(tmp_path / "runs"), checkpoint=str(tiny_ckpt),
                                 mode="full", train_file="/data/train.jsonl", lr=1e-3, epochs=9)
    check_resume(same)  # other optimisation settings: resuming is fine
    with pytest.raises(ConfigError) as err:
        check_resume(same.replace(mode="lora"))
    text = str(err.value)
    assert "mode='full'" in text and "mode='lora'" in text and "name=demo-lora" in text and str(run) in text
    check_resume(same.replace(name="other"))  # a fresh name starts fresh


def test_scores_print_as_a_table_per_task():
    before = {"accuracy": 0.0, "colour/accuracy": 0.0, "motion/accuracy": 0.5, "n": 8.0}
    after = {"accuracy": 0.75, "colour/accuracy": 1.0, "motion/accuracy": 0.5, "n": 8.0}
    lines = score_table({"before": before, "after": after}, ("accuracy",)).splitlines()
    assert lines[0].split() == ["task", "accuracy", "before", "accuracy", "after"]
    assert lines[1].split() == ["all", "0.000", "0.750"] and lines[2].split() == ["colour", "0.000", "1.000"]
    assert lines[3].split() == ["motion", "0.500", "0.500"]


def test_out_of_memory_ends_in_one_plain_sentence():
    class OutOfMemoryError(Exception):
        pass

    try:
        try:
            raise OutOfMemoryError("Task was killed due to the node running low on memory.")
        except OutOfMemoryError as inner:
            raise RuntimeError("Training failed") from inner
    except RuntimeError as err:
        message = out_of_memory_message(err)
    assert message.startswith("a worker ran out of memory") and "micro_batch" in message
    assert out_of_memory_message(ValueError("bad value")) is None


# ----------------------------------------------------------------------------- the README's own lines
def _readme_lines(command: str) -> list[str]:
    """Lines of the README's code blocks that start with `phi3v-ray <command>` (comments stripped)."""
    return [line.split("  #")[0].strip() for line in README.read_text().splitlines()
            if re.match(rf"phi3v-ray {command}\b", line.strip())]


def test_native_stderr_goes_to_the_run_log_and_comes_back(tmp_path, capfd, monkeypatch):
    """What C++ code writes to fd 2 inside the block lands in logs/driver.log; after it, fd 2 is the console."""
    import os

    from phi3v_ray.console import native_stderr_to_log

    monkeypatch.delenv("PHI3V_VERBOSE", raising=False)
    run_dir = tmp_path / "runs" / "quiet"
    with native_stderr_to_log(str(run_dir)):
        os.write(2, b"core_worker.cc:2465: a native warning\n")
    os.write(2, b"after the block\n")
    err = capfd.readouterr().err
    assert "native warning" not in err and "after the block" in err
    assert "native warning" in (run_dir / "logs" / "driver.log").read_text()

    monkeypatch.setenv("PHI3V_VERBOSE", "1")  # -v: nothing is hidden
    with native_stderr_to_log(str(run_dir)):
        os.write(2, b"shown with -v\n")
    assert "shown with -v" in capfd.readouterr().err


def test_a_console_that_does_not_relay_starts_no_queue_and_still_files_library_logs(tmp_path, monkeypatch):
    """Console(relay=False), as a Tune trial's driver uses it: no queue actor, and the libraries' log lines
    still go to logs/driver.log, not to the console."""
    import logging

    from phi3v_ray.console import Console

    monkeypatch.delenv("PHI3V_VERBOSE", raising=False)
    run_dir = tmp_path / "runs" / "trial"
    with Console(str(run_dir), relay=False) as console:
        assert console.queue is None
        logging.getLogger("ray.tune").warning("a library warning")
    assert "a library warning" in (run_dir / "logs" / "driver.log").read_text()


def test_a_local_ray_that_times_out_starting_ends_in_one_line(tmp_path, monkeypatch, capsys):
    """Ray's bare 'node timed out during startup' (an overloaded machine) becomes one sentence, exit 3."""
    import ray

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def init(**kwargs):
        raise Exception("The current node timed out during startup. This could happen because some of the "
                        "raylet failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "init", init)
    assert main(["train", "max_steps=1"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("phi3v-ray: the private local Ray did not start") and "load average" in err[-1]
    assert "Traceback" not in "\n".join(err)
