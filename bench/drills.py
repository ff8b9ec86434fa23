"""Reliability drills (issue #11): break a real run in each way the issue lists and show the outcome.

Every drill runs the real CLI (`python -m phi3v_ray.cli train --config demo ...`) in a subprocess on
a private local Ray: the demo preset, 2 CPU workers, 15 optimizer steps, a checkpoint every 3 steps.
Runs that recover are compared with an uninterrupted baseline: the same 15 losses and bit-identical
final weights.

    python bench/drills.py                                  # every drill, prints a table
    python bench/drills.py --only straight,killed_worker    # some of them
    python bench/drills.py --out bench/results/drills.json

Drills: straight (the baseline), killed_worker, killed_driver (SIGKILL the driver's process group
after checkpoint 6, rerun), corrupt_weights_random (4 KiB of random bytes in the newest checkpoint's
weights), corrupt_weights_truncated, corrupt_optimizer_truncated (the newest checkpoint is skipped,
the run resumes from the one before; export refuses the damaged one), crafted_pickle (ZeRO-2: a
pickle that would run code, with the manifest rewritten to match), crafted_pickle_ddp (the same in the
DDP engine's optimizer.pt), skip_decode_drops (on_bad_record=skip: 2 invalid training lines, 10
undecodable training images and 1 validation image), bad_record_fail (5 undecodable images, fail
mode), text_only_ddp / text_only_zero2 (records of 1 image and text-only ones, micro-batches of 1: the
steps where one rank had a text-only record are counted), same_name_twice.

Each drill's result is merged into --out as soon as it finishes, so drills can run one invocation at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEPS, EVERY = 15, 3
COMMON = [f"max_steps={STEPS}", f"checkpoint_every={EVERY}", "log_every=1", "eval_before=false",
          "eval_max_samples=8", "keep_checkpoints=3", "report_every_s=3600"]


class _RunsACommand:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


class Drills:
    def __init__(self, work: Path):
        self.work = work
        self.store = work / "runs"
        self.results: dict[str, dict] = {}
        self.baseline: dict | None = None
        self.startup_timeouts = 0  # CLI runs retried because the local Ray timed out while starting

    # ------------------------------------------------------------------ running the CLI
    def cli(self, name: str, *overrides: str, log: str | None = None, wait: bool = True, extra_env=None):
        args = [sys.executable, "-m", "phi3v_ray.cli", "train", "--config", "demo", f"name={name}",
                f"storage_path={self.store}", *COMMON, *overrides]
        env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TRAIN_V2_ENABLED": "1", **(extra_env or {})}
        env.pop("RAY_ADDRESS", None)
        path = self.work / f"{log or name}.log"
        for attempt in range(3):  # on an overloaded machine a local Ray can time out while starting: not a drill result
            out = open(path, "w")
            proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            if not wait:
                return proc
            rc = proc.wait()
            out.close()
            text = path.read_text()
            if "timed out during startup" not in text:
                break
            path.rename(path.with_suffix(f".startup-timeout{attempt + 1}.log"))  # kept, and counted in the result
            self.startup_timeouts += 1
        return rc, text

    @staticmethod
    def last_line(text: str) -> str:
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def run_dir(self, name: str) -> Path:
        return self.store / name

    def checkpoints(self, name: str) -> list[Path]:
        return sorted(p for p in self.run_dir(name).glob("checkpoint_*") if p.is_dir())  # not Ray's snapshot file

    def fresh(self, *names: str) -> None:
        for name in names:
            shutil.rmtree(self.run_dir(name), ignore_errors=True)

    def step_of(self, ckpt: Path) -> int | None:
        try:
            return json.loads((ckpt / "train_state.json").read_text())["state"]["step"]
        except (OSError, ValueError, KeyError):
            return None

    def losses(self, name: str) -> dict[int, float]:
        path = self.run_dir(name) / "artifacts" / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    def final(self, name: str) -> Path | None:
        finals = [c for c in self.checkpoints(name) if (c / "model").is_dir() and self.step_of(c) == STEPS]
        return finals[-1] if finals else None

    def compare(self, name: str) -> dict:
        """Against the baseline: same 15 losses, identical final weights, final eval present."""
        from safetensors.torch import load_file

        out = {"losses_equal": False, "weights_identical": False}
        final = self.final(name)
        out["final_checkpoint"] = final is not None
        out["final_eval"] = (self.run_dir(name) / "artifacts" / "eval" / "after.json").is_file()
        if self.baseline is None or final is None:
            return out
        mine = self.losses(name)
        out["losses_equal"] = sorted(mine) == list(range(1, STEPS + 1)) and all(
            mine[s] == self.baseline["losses"][s] for s in mine)
        a = load_file(str(final / "model" / "model.safetensors"))
        b = load_file(str(self.baseline["final"] / "model" / "model.safetensors"))
        out["weights_identical"] = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
        return out

    def interrupted(self, name: str, *overrides: str) -> None:
        """Train until step 7 (worker 0 exits, no retries): checkpoints 3 and 6 on disk."""
        self.fresh(name)
        marker = self.work / f"{name}.stopped"
        marker.unlink(missing_ok=True)
        rc, _ = self.cli(name, f"fault_injection=0:7:{marker}", "max_failures=0", *overrides, log=f"{name}.first")
        assert rc != 0 and marker.is_file(), f"{name}: the interrupted run did not stop at step 7"

    def resumed_from(self, log: str) -> str:
        return next((line.split("[phi3v-ray] ", 1)[1] for line in log.splitlines() if "resumed at step" in line), "")

    # ------------------------------------------------------------------ the drills
    def straight(self) -> dict:
        rc, reused = 0, self.final("straight") is not None
        if not reused:  # a finished baseline in --work is reused
            self.fresh("straight")
            rc, _ = self.cli("straight")
        final = self.final("straight")
        self.baseline = {"losses": self.losses("straight"), "final": final}
        return {"rc": rc, "steps": len(self.baseline["losses"]), "final_checkpoint": final is not None,
                **({"reused": True} if reused else {})}

    def killed_worker(self) -> dict:
        self.fresh("killed_worker")
        marker = self.work / "killed_worker.marker"
        rc, log = self.cli("killed_worker", f"fault_injection=1:7:{marker}", "max_failures=1")
        return {"rc": rc, "killed": marker.is_file(), "resumed": self.resumed_from(log), **self.compare("killed_worker")}

    def killed_driver(self) -> dict:
        self.fresh("killed_driver")
        proc = self.cli("killed_driver", log="killed_driver.first", wait=False)
        deadline = time.time() + 900
        while time.time() < deadline and not any(self.step_of(c) == 6 for c in self.checkpoints("killed_driver")):
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(2)
        rc, log = self.cli("killed_driver")
        return {"rc": rc, "resumed": self.resumed_from(log), **self.compare("killed_driver")}

    def _corrupt(self, name: str, victim: str, how: str) -> dict:
        self.interrupted(name)
        newest = self.checkpoints(name)[-1]
        path = newest / victim
        size = path.stat().st_size
        if how == "random":
            with open(path, "r+b") as f:
                f.seek(size // 2)
                f.write(os.urandom(4096))
        else:
            os.truncate(path, size // 2)
        export_out = self.work / f"{name}.export"  # before the rerun: Ray's rotation may delete the damaged one
        exp = subprocess.run([sys.executable, "-m", "phi3v_ray.cli", "export", "--checkpoint", str(newest), "--out",
                              str(export_out)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                             capture_output=True, text=True)
        damaged = f"{newest.name}/{victim} (step {self.step_of(newest)})"
        rc, log = self.cli(name)
        skipped = [line for line in log.splitlines() if "skipping checkpoint" in line]
        return {"rc": rc, "damaged": damaged,
                "skipped_line": skipped[0][:300] if skipped else "", "resumed": self.resumed_from(log),
                "export_of_damaged_refused": exp.returncode != 0 and not export_out.exists(),
                "export_error": self.last_line(exp.stderr)[:400], **self.compare(name)}

    def corrupt_weights_random(self) -> dict:
        return self._corrupt("corrupt_weights_random", "trainable.safetensors", "random")

    def corrupt_weights_truncated(self) -> dict:
        return self._corrupt("corrupt_weights_truncated", "trainable.safetensors", "truncate")

    def corrupt_optimizer_truncated(self) -> dict:
        return self._corrupt("corrupt_optimizer_truncated", "optimizer.pt", "truncate")

    def _crafted(self, name: str, victim: str, *overrides: str) -> dict:
        from phi3v_ray.checkpointing import write_manifest

        self.interrupted(name, *overrides)
        newest = self.checkpoints(name)[-1]
        marker = self.work / f"{name}.code_ran"
        marker.unlink(missing_ok=True)
        import torch

        torch.save({"optimizer_state_dict": _RunsACommand(str(marker))}, newest / victim)
        manifest = json.loads((newest / "manifest_rank0.json").read_text())
        write_manifest(newest, 0, manifest["world_size"])  # the attacker rewrites the manifest too
        t0 = time.time()
        rc, log = self.cli(name, *overrides)
        return {"rc": rc, "crafted": f"{newest.name}/{victim} (step {self.step_of(newest)})",
                "code_ran": marker.exists(), "seconds": round(time.time() - t0),
                "attempts": log.count("mode=full trainable"), "last_line": self.last_line(log)[:400]}

    def crafted_pickle(self) -> dict:  # ZeRO-2: DeepSpeed's loader, forced to weights-only
        return self._crafted("crafted_pickle", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_stage=2")

    def crafted_pickle_ddp(self) -> dict:
        return self._crafted("crafted_pickle_ddp", "optimizer.pt")

    def _broken_images_data(self, folder: str = "broken-data", n_bad: int = 5, n_invalid: int = 0,
                            n_bad_val: int = 0) -> Path:
        """The demo data with `n_bad` training images (and `n_bad_val` validation images) overwritten by bytes
        that are no image, and `n_invalid` training lines that fail validation (malformed JSON, a missing image)."""
        src = self.store / "demo-data"
        if not (src / "train.jsonl").is_file():
            from datasets_ray.demo import make_demo_dataset

            make_demo_dataset(src, seed=0)
        data = self.work / folder
        if not data.is_dir():
            shutil.copytree(src, data)
            for split, n in (("train", n_bad), ("test", n_bad_val)):
                records = [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines()]
                for rec in records[:n * 7:7]:
                    (data / "images" / rec["conversations"][0]["images"][0]).write_bytes(b"not an image" * 10)
            invalid = ['{"id": "broken-json", "conversations": [', json.dumps(
                {"id": "missing-image", "conversations": [{"images": ["train/no-such.png"], "user": "What colour?",
                                                           "assistant": "red"}]})]
            with open(data / "train.jsonl", "a") as f:
                f.writelines(line + "\n" for line in (invalid * n_invalid)[:n_invalid])
        return data

    def skip_decode_drops(self) -> dict:
        """Skip mode: 2 training records fail validation, 10 training images and 1 validation image fail to
        decode. 2 × 120 records feed 30 micro-batches of 4 per rank; 230 left feed 29, so the data runs out
        a step before the plan and the run must still end with its final checkpoint, weights and evaluation."""
        self.fresh("skip_decode_drops", "skip_decode_strict")
        data = self._broken_images_data("skip-data", n_bad=10, n_invalid=2, n_bad_val=1)
        files = [f"train_file={data / 'train.jsonl'}", f"val_file={data / 'test.jsonl'}", f"images_root={data / 'images'}"]
        rc, log = self.cli("skip_decode_drops", "on_bad_record=skip", *files, "max_steps=0", "epochs=1")
        run = self.run_dir("skip_decode_drops")
        dropped = json.loads((run / "artifacts" / "dropped.json").read_text()) \
            if (run / "artifacts" / "dropped.json").is_file() else {}
        rows = [json.loads(line) for line in (run / "artifacts" / "metrics.jsonl").read_text().splitlines()] \
            if (run / "artifacts" / "metrics.jsonl").is_file() else []
        finals = [c for c in self.checkpoints("skip_decode_drops") if (c / "model").is_dir()]
        rc_strict, log_strict = self.cli("skip_decode_strict", "on_bad_record=skip", *files, "max_steps=0", "epochs=1",
                                         "max_bad_fraction=0.01")
        return {"rc": rc, "dropped": dropped,
                "metrics_dropped_row": next(({k: v for k, v in r.items() if k.startswith("dropped/")}
                                             for r in rows if r.get("step") == -1), {}),
                "summary_dropped": next((line.strip() for line in log.splitlines()
                                         if line.strip().startswith("dropped")), ""),
                "planned_steps": next((line.split("records, ")[1].split(" optimizer")[0] for line in log.splitlines()
                                       if "optimizer steps of" in line), ""),
                "steps": len(self.losses("skip_decode_drops")),
                "final_step": max((self.step_of(c) or 0 for c in finals), default=None),
                "final_weights": bool(finals), "final_eval": (run / "artifacts" / "eval" / "after.json").is_file(),
                "ran_out_line": next((line for line in log.splitlines() if "ran out" in line), "")[:200],
                "strict_rc": rc_strict, "strict_last_line": self.last_line(log_strict)[:300]}

    def bad_record_fail(self) -> dict:
        self.fresh("bad_record_fail")
        data = self._broken_images_data()
        t0 = time.time()
        rc, log = self.cli("bad_record_fail", f"train_file={data / 'train.jsonl'}", f"val_file={data / 'test.jsonl'}",
                           f"images_root={data / 'images'}", "max_failures=2")
        return {"rc": rc, "seconds": round(time.time() - t0), "last_line": self.last_line(log)[:400],
                "attempts": log.count("mode=full trainable")}

    TEXT_ONLY = {"images": [], "user": "How many sides has a square, and how long is each?",
                 "assistant": "A square has four sides, and all four of them are of the same length."}

    def _text_only_data(self) -> Path:
        """The demo's records of one image (colour, digit), half of them, drawn at random, made text-only: each
        training record holds 1 image or none. At random, not by position: both ranks shuffle their shards with
        the same seed, so a pattern by position (the demo's tasks repeat every 4 records) puts records of the
        same kind on both ranks in every step, and no step would mix them."""
        import random

        src = self.store / "demo-data"
        if not (src / "train.jsonl").is_file():
            from datasets_ray.demo import make_demo_dataset

            make_demo_dataset(src, seed=0)
        data = self.work / "text-only-data-random"
        if not data.is_dir():
            shutil.copytree(src, data)
            rng, lines = random.Random(0), []
            for line in (data / "train.jsonl").read_text().splitlines():
                rec = json.loads(line)
                if sum(len(turn["images"]) for turn in rec["conversations"]) != 1:
                    continue
                if rng.random() < 0.5:
                    rec["conversations"] = [self.TEXT_ONLY]
                lines.append(json.dumps(rec))
            (data / "train.jsonl").write_text("\n".join(lines) + "\n")
        return data

    def _record_tokens(self, data: Path) -> dict[int, set[int]]:
        """{images of a record: its token counts}, built by the pipeline's own row builder."""
        from datasets_ray.pipeline import DataPaths, Phi3VPreprocessor
        from phi3v_ray.config import read_config

        cfg, _ = read_config("demo", [f"images_root={data / 'images'}"])
        builder = Phi3VPreprocessor(cfg.data, DataPaths(processor_dir=str(self.store / "tiny-checkpoint")), "train")
        sizes: dict[int, set[int]] = {}
        for line in (data / "train.jsonl").read_text().splitlines():
            row = builder.build_row(json.loads(line))
            sizes.setdefault(int(row["num_images"]), set()).add(int(row["num_tokens"]))
        return sizes

    def _text_only(self, name: str, *overrides: str) -> dict:
        """Micro-batches of 1 on 2 ranks: a step has 0, 1 or 2 images. A logged step's tokens/images ratio
        (its tokens_per_s / images_per_s) tells the two apart when it has images: ≤ the largest image
        record's tokens when both ranks had an image, image + text-only tokens when one rank had a text-only
        record (the steps this drill is about). Steps with no image had text-only records on both ranks."""
        self.fresh(name)
        data = self._text_only_data()
        rc, log = self.cli(name, f"train_file={data / 'train.jsonl'}", f"val_file={data / 'test.jsonl'}",
                           f"images_root={data / 'images'}", "max_failures=0", "micro_batch=1", *overrides)
        sizes = self._record_tokens(data)
        image, text = sizes.get(1, {0}), sizes.get(0, {0})
        path = self.run_dir(name) / "artifacts" / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        rows = {r["step"]: r for r in rows if "loss" in r}  # a step logged twice: the last
        ratio = {s: r["tokens_per_s"] / r["images_per_s"] for s, r in rows.items() if r["images_per_s"] > 0}
        return {"rc": rc, "steps": len(self.losses(name)), "final_checkpoint": self.final(name) is not None,
                "record_tokens": {"image": [min(image), max(image)], "text_only": [min(text), max(text)]},
                "separable": sorted(sizes) == [0, 1] and min(text) > max(image) - min(image),
                "mixed_steps": sorted(s for s, x in ratio.items() if x > max(image) + 0.5),
                "both_image_steps": sorted(s for s, x in ratio.items() if x <= max(image) + 0.5),
                "both_text_only_steps": sorted(s for s in rows if s not in ratio),
                "last_line": self.last_line(log)[:200]}

    def text_only_ddp(self) -> dict:
        return self._text_only("text_only_ddp")

    def text_only_zero2(self) -> dict:
        return self._text_only("text_only_zero2", "zero_stage=2")

    def same_name_twice(self) -> dict:
        self.fresh("same_name")
        first = self.cli("same_name", log="same_name.first", wait=False)
        lease = self.run_dir("same_name") / ".lease"
        deadline = time.time() + 300
        while time.time() < deadline and not lease.is_file():
            time.sleep(0.2)
        t0 = time.time()
        rc, log = self.cli("same_name", log="same_name.second")
        seconds = round(time.time() - t0)
        rc_first = first.wait()
        steps = sorted(self.step_of(c) for c in self.checkpoints("same_name"))
        logged = [s for s in (json.loads(line).get("step") for line in
                              (self.run_dir("same_name") / "artifacts" / "metrics.jsonl").read_text().splitlines())]
        return {"second_rc": rc, "second_seconds": seconds, "second_last_line": self.last_line(log)[:400],
                "first_rc": rc_first, "checkpoint_steps": steps,
                "metrics_steps_in_order": logged == sorted(logged) and len(set(logged)) == len(logged)}


ORDER = ["straight", "corrupt_weights_random", "crafted_pickle", "crafted_pickle_ddp", "text_only_ddp",
         "bad_record_fail", "skip_decode_drops", "same_name_twice", "killed_worker", "killed_driver",
         "text_only_zero2", "corrupt_weights_truncated", "corrupt_optimizer_truncated"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated drill names (default: all)")
    parser.add_argument("--work", default="", help="working directory (default: a new temporary one)")
    parser.add_argument("--out", default="", help="write the results as JSON here (merged with the drills it holds)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="phi3v-drills-"))
    work.mkdir(parents=True, exist_ok=True)
    drills = Drills(work)
    wanted = [d for d in (args.only.split(",") if args.only else ORDER) if d]
    needs_baseline = {"killed_worker", "killed_driver", "corrupt_weights_random", "corrupt_weights_truncated",
                      "corrupt_optimizer_truncated"}
    if needs_baseline & set(wanted) and "straight" not in wanted:
        wanted.insert(0, "straight")
    for name in wanted:
        t0, drills.startup_timeouts = time.time(), 0
        try:
            result = getattr(drills, name)()
        except Exception as err:  # a drill that broke is a result too
            result = {"error": f"{type(err).__name__}: {err}"}
        result["wall_s"] = round(time.time() - t0)
        if drills.startup_timeouts:
            result["ray_startup_timeouts_retried"] = drills.startup_timeouts
        drills.results[name] = result
        print(f"{name}: {json.dumps(result, default=str)}", flush=True)
        if args.out:  # after every drill, merged into what --out holds: drills run one invocation at a time add up
            out = Path(args.out)
            saved = json.loads(out.read_text()) if out.is_file() else {}
            fresh = {k: v for k, v in drills.results.items() if not (v.get("reused") and k in saved)}
            out.write_text(json.dumps({**saved, **fresh}, indent=1, default=str))
    print(f"logs in {work}")


if __name__ == "__main__":
    main()
