"""Run a sweep: one Tune trial per sampled config, each a normal training run reporting to Tune.

    grid = run_sweep("docvqa-lora", num_samples=16, overrides={"checkpoint": ..., "train_file": ..., "use_gpu": True})

Each trial's driver (`train_trial`, a sliver of CPU) builds the TrainConfig (the space's preset and
mode + fixed settings + overrides + the trial's sample) and calls `run_training` with
`TuneReportCallback`, so every metric the workers report reaches Tune and ASHA can stop poor trials
on `step`. The workers ask for their own resources; `max_concurrent_trials` is derived from what one
trial asks for and what the cluster's nodes hold, so waiting trials never hold half a cluster.

Fail fast: every trial config is validated and checked against the cluster on the sweep driver
before Tune starts, and again by each trial before its trainer starts (ClusterCannotFit).
Resume: the experiment directory (storage_path/name) holds Tune's state; running the same sweep
again, or `resume=True`, restores it with `Tuner.restore` — finished trials keep their results and
are not run again, unfinished and errored ones run again.
Results: best_config.yaml (ready for `phi3v-ray train --config`), results.csv and sweep.png in the
experiment directory.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml
from ray import tune
from ray.tune.search.optuna import OptunaSearch  # imports optuna only when a search is built

from datasets_ray.pipeline import READ_NUM_CPUS
from phi3v_ray.config import ConfigError, Problem, TrainConfig, load_config, resolve_key
from phi3v_ray.launch import check_cluster_fits, ensure_ray, resolve_defaults, run_training
from phi3v_ray.storage import append_text, write_text

from .spaces import SweepSpace, apply_sample, candidate_values, get_space, to_tune

SWEEP_FILE = "sweep.json"  # what every trial shares (base config, storage) and how the sweep was run
TRIAL_CPU = 0.01  # the trial driver only waits on its trainer; Tune rejects 0
ASHA_MAX_T = 10**6  # steps; used when max_steps is 0 (ASHA stops any trial that reaches max_t)
RESOURCE_KEYS = ("accelerator_type", "worker_resource", "use_gpu", "num_workers", "cpus_per_worker", "preprocess_actors",
                 "preprocess_max_actors", "preprocess_cpus", "data_node_resource")  # sampled keys that change what a trial asks for


# ----------------------------------------------------------------------------- the trial
def train_trial(config: dict, sweep: dict) -> None:
    """One trial: the sweep's base config + this trial's sample → `run_training` reporting every metric to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg = apply_sample(sweep["base"], config).replace(name=trial_id, storage_path=sweep["train_storage"])
    events = f"{sweep['train_storage']}/{trial_id}.events.jsonl"
    _event(events, "start")
    cfg = resolve_defaults(cfg).validate()
    check_cluster_fits(cfg)  # an accelerator the cluster lacks fails this trial now, with the reason
    # A trial's driver is a Tune actor: what it prints goes to Ray's log files, beside rank 0's own lines, so
    # relaying them to it would only cost one more actor per trial.
    run_training(cfg, callbacks=[TuneReportCallback()], start_ray=False, relay=False)
    _event(events, "finished")  # never written for a trial ASHA stopped: Tune ends its actor


def _event(path: str, event: str) -> None:
    import ray

    line = {"event": event, "time": time.time(), "node_id": ray.get_runtime_context().get_node_id()}
    append_text(path, json.dumps(line) + "\n")


def trial_events(train_storage: str, trial_id: str) -> list[dict]:
    """What a trial's driver wrote: one "start" per attempt, "finished" when its training ended."""
    text = _read_text(f"{train_storage}/{trial_id}.events.jsonl")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _read_text(path: str) -> str:
    if "://" not in path:
        p = Path(path)
        return p.read_text() if p.is_file() else ""
    import pyarrow.fs

    fs, p = pyarrow.fs.FileSystem.from_uri(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read().decode()
    except (FileNotFoundError, OSError):
        return ""


class ReleaseStoppedTrials(tune.Callback):
    """Remove the workers' placement group of a trial Tune has ended.

    A trial stopped early (ASHA) is ended mid-run: Tune terminates the trial's driver and with it the
    Ray Train controller, so the controller never releases its workers' placement group. Train's own
    cleaner needs the state API (the dashboard), which local clusters here run without; without this
    the reserved CPUs/GPUs leak and later trials wait for workers forever. Each worker's first report
    carries its `placement_group_id`.
    """

    def __init__(self):
        self._groups: dict[str, set[str]] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("placement_group_id"):
            self._groups.setdefault(trial.trial_id, set()).add(result["placement_group_id"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial.trial_id)

    def _release(self, trial_id: str) -> None:
        import ray
        from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

        for group_id in self._groups.pop(trial_id, ()):
            group = PlacementGroup(ray.PlacementGroupID.from_hex(group_id))
            try:
                if placement_group_table(group).get("state") != "REMOVED":
                    remove_placement_group(group)
            except Exception as err:  # already gone, or the cluster is going down
                print(f"[phi3v-ray tune] placement group {group_id} of trial {trial_id}: {err}", flush=True)


# ----------------------------------------------------------------------------- sweep setup
def base_config(space: SweepSpace, overrides: dict | None = None) -> TrainConfig:
    """Preset + mode + the space's fixed settings + overrides, with the tiny checkpoint/demo data resolved once."""
    over = {"mode": space.mode, **space.settings, **(overrides or {})}
    return resolve_defaults(load_config(space.preset, over))


def trial_variants(space: SweepSpace, base: TrainConfig) -> list[TrainConfig]:
    """One config per combination of sampled resource keys (e.g. each accelerator type), other keys at their first value."""
    first = {}
    for key, spec in space.params.items():
        values, _ = candidate_values(spec)
        first[key] = values[0]
    resource = [(k, candidate_values(spec)[0]) for k, spec in space.params.items() if resolve_key(k) in RESOURCE_KEYS]
    variants = []
    for combo in itertools.product(*[values for _, values in resource]) if resource else [()]:
        sample = {**first, **{k: v for (k, _), v in zip(resource, combo)}}
        variants.append(apply_sample(base.to_dict(), sample))
    return variants


def preflight(variants: list[TrainConfig]) -> None:
    """Validate every variant and check the cluster fits each, before Tune starts (ConfigError / ClusterCannotFit)."""
    for cfg in variants:
        cfg.validate()
        check_cluster_fits(cfg)


def trial_bundles(cfg: TrainConfig) -> list[dict[str, float]]:
    """Everything one trial holds while it trains: workers, preprocessing actors, a read task, its driver."""
    worker = cfg.worker_resources()
    pinned = {cfg.data.data_node_resource: 0.001} if cfg.data.data_node_resource else {}
    splits = ["train", "val"] if cfg.data.val_file else ["train"]  # each runs its own actor pool
    actors = sum(cfg.data.actor_pool(cfg.num_workers, split)[1] for split in splits)
    data = [{"CPU": cfg.data.preprocess_cpus, **pinned}] * actors
    return [worker] * cfg.num_workers + data + [{"CPU": READ_NUM_CPUS, **pinned}, {"CPU": TRIAL_CPU}]


def max_concurrent_trials(variants: list[TrainConfig], node_resources: list[dict[str, float]], limit: int) -> int:
    """How many trials the nodes hold at once: place whole trials (round-robin over variants) until none fits.

    Never less than 1 (a trial that cannot fit anywhere is caught by `preflight`), never more than limit.
    """
    free = [dict(r) for r in node_resources]
    placed, stuck = 0, set()
    for i in itertools.cycle(range(len(variants))):
        if placed >= limit or len(stuck) == len(variants):
            break
        if i in stuck:
            continue
        if _place(free, trial_bundles(variants[i])):
            placed += 1
        else:
            stuck.add(i)
    return max(1, placed)


def _place(free: list[dict[str, float]], bundles: list[dict[str, float]]) -> bool:
    """First-fit all bundles of one trial, or none of them."""
    trial = [dict(node) for node in free]
    for bundle in bundles:
        for node in trial:
            if all(node.get(k, 0.0) >= v - 1e-9 for k, v in bundle.items()):
                for k, v in bundle.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            return False
    free[:] = trial
    return True


def cluster_node_resources() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def total_trials(space: SweepSpace, num_samples: int) -> int:
    grids = [len(spec["grid"]) for spec in space.params.values() if isinstance(spec, dict) and "grid" in spec]
    return num_samples * math.prod(grids)


# ----------------------------------------------------------------------------- the sweep
def run_sweep(
    space_name: str | SweepSpace,
    num_samples: int | None = None,
    scheduler: str = "asha",
    search: str = "random",
    overrides: dict[str, Any] | list[str] | None = None,
    storage_path: str | None = None,
    name: str | None = None,
    resume: bool = False,
    grace_period: int | None = None,
    max_concurrent: int | None = None,
    precheck: bool = True,
    seed: int = 0,
    verbose: int = 1,
):
    """Run (or resume) a sweep and write its summary; returns the Tune ResultGrid.

    overrides: TrainConfig values for every trial (dict or key=value strings).
    storage_path/name: the experiment directory (default: the config's storage_path, "tune-<space>");
      if it already holds this sweep, the sweep resumes (as with resume=True) with its saved settings.
    precheck=False skips the driver-side cluster check (each trial still checks before it trains).
    """
    space = space_name if isinstance(space_name, SweepSpace) else get_space(space_name)
    problems = []
    if scheduler not in ("asha", "none"):
        problems.append(Problem("scheduler", scheduler, "use asha or none"))
    if search not in ("random", "optuna"):
        problems.append(Problem("search", search, "use random or optuna"))
    if problems:
        raise ConfigError(problems, what="sweep")
    over = _overrides(overrides)
    if storage_path:
        over["storage_path"] = storage_path
    ensure_ray()
    base = base_config(space, over)
    name = name or f"tune-{space.name}"
    exp_dir = f"{base.resolved_storage_path.rstrip('/')}/{name}"

    if resume or tune.Tuner.can_restore(exp_dir):
        saved = json.loads(_read_text(f"{exp_dir}/{SWEEP_FILE}") or "{}")
        if not saved or not tune.Tuner.can_restore(exp_dir):
            raise ConfigError([Problem("resume", True, f"no sweep to resume in {exp_dir}")], what="sweep")
        print(f"[phi3v-ray tune] resuming {exp_dir} with its saved settings: finished trials keep their results, "
              "unfinished and errored trials run again", flush=True)
        tuner = tune.Tuner.restore(exp_dir, trainable=_trainable(saved), resume_errored=True)
        grid = _fit(tuner)
        summarize_sweep(grid, saved, exp_dir)
        return grid

    num_samples = num_samples or space.num_samples
    variants = trial_variants(space, base)
    if precheck:
        preflight(variants)
    n_trials = total_trials(space, num_samples)
    concurrency = max_concurrent or max_concurrent_trials(variants, cluster_node_resources(), n_trials)
    print(f"[phi3v-ray tune] sweep {name}: space {space.name} ({space.preset}/{space.mode}), {n_trials} trials, "
          f"{space.metric_mode} {space.metric}, scheduler {scheduler}, search {search}, "
          f"{concurrency} at a time; results in {exp_dir}", flush=True)

    sched = None
    if scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        grace = grace_period or space.grace_period
        max_t = max(base.max_steps or ASHA_MAX_T, grace)
        sched = ASHAScheduler(time_attr="step", grace_period=grace, reduction_factor=space.reduction_factor, max_t=max_t)
    if search == "optuna":
        if any(isinstance(s, dict) and "grid" in s for s in space.params.values()):
            raise ConfigError([Problem("search", search, f"optuna cannot sample the grid specs of space {space.name!r}; "
                                                         "use search=random")], what="sweep")
        search_alg = _optuna_search(seed, concurrency)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=seed, max_concurrent=concurrency)

    sweep = {
        "name": name, "space": space.to_dict(), "metric": space.metric, "mode": space.metric_mode,
        "scheduler": scheduler, "search": search, "num_samples": num_samples, "max_concurrent_trials": concurrency,
        "overrides": over, "base": base.to_dict(), "train_storage": f"{exp_dir}/train_runs",
    }
    write_text(f"{exp_dir}/{SWEEP_FILE}", json.dumps(sweep, indent=1, default=str))
    tuner = tune.Tuner(
        _trainable(sweep),
        param_space=to_tune(space.params),
        tune_config=tune.TuneConfig(
            metric=space.metric, mode=space.metric_mode, num_samples=num_samples, scheduler=sched,
            search_alg=search_alg, trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=base.resolved_storage_path,
            failure_config=tune.FailureConfig(max_failures=0),  # Ray Train recovers workers itself (max_failures)
            callbacks=[ReleaseStoppedTrials()],
            verbose=verbose,
        ),
    )
    grid = _fit(tuner)
    summarize_sweep(grid, sweep, exp_dir)
    return grid


def _fit(tuner):
    """Evaluation metrics arrive only in the reports that ran an evaluation: the scheduler and the
    searcher act on the reports that carry the metric, instead of Tune failing the others."""
    before = os.environ.get("TUNE_DISABLE_STRICT_METRIC_CHECKING")
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    try:
        return tuner.fit()
    finally:
        if before is None:
            os.environ.pop("TUNE_DISABLE_STRICT_METRIC_CHECKING", None)
        else:
            os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = before


def _trainable(sweep: dict):
    """The trial driver with the sweep's shared settings bound, holding a sliver of CPU (its workers ask for theirs)."""
    return tune.with_resources(tune.with_parameters(train_trial, sweep=sweep), {"CPU": TRIAL_CPU})


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _overrides(overrides) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    from phi3v_ray.config import parse_overrides

    return parse_overrides(list(overrides))


def _optuna_search(seed: int, concurrency: int):
    from ray.tune.search import ConcurrencyLimiter

    return ConcurrencyLimiter(OptunaOnEvaluations(seed=seed), max_concurrent=concurrency)


class OptunaOnEvaluations(OptunaSearch):
    """OptunaSearch reads the metric from every result; evaluations arrive only in some reports."""

    def on_trial_result(self, trial_id: str, result: dict):
        if self.metric in result:
            super().on_trial_result(trial_id, result)


# ----------------------------------------------------------------------------- results
def results_table(grid, sweep: dict) -> list[dict[str, Any]]:
    """One row per trial: id, status (DONE, STOPPED early, ERROR), its sample, the metric, steps and reports."""
    metric, max_steps, rows = sweep["metric"], int(sweep["base"].get("max_steps") or 0), []
    for result in grid:
        sample = dict(result.config or {})
        if "lora_alpha_ratio" in sample:
            sample["lora_alpha"] = apply_sample(sweep["base"], sample).lora_alpha
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(str(result.path)).name.removeprefix("trial_")
        events = [e["event"] for e in trial_events(sweep["train_storage"], trial_id)]
        # A trial ASHA stops at its last step (max_t) has trained fully, though its driver never returned.
        full = "finished" in events or 0 < max_steps <= (metrics.get("step") or 0)
        rows.append({
            "trial_id": trial_id,
            "status": "ERROR" if result.error else "DONE" if full else "STOPPED",
            **sample,
            metric: last_value(result, metric),
            "step": metrics.get("step"),
            "reports": metrics.get("training_iteration"),
            "starts": events.count("start"),
            "error": str(result.error).strip().splitlines()[-1][:300] if result.error else "",
        })
    return rows


def last_value(result, metric: str) -> float | None:
    """The last reported value of metric (evaluations arrive only in some reports)."""
    history = result.metrics_dataframe
    if history is None or metric not in history:
        return None
    seen = history[metric].dropna()
    return float(seen.iloc[-1]) if len(seen) else None


def summarize_sweep(grid, sweep: dict, exp_dir: str) -> dict[str, Path]:
    """Print the table; write results.csv, sweep.png and best_config.yaml next to Tune's state."""
    out = Path(exp_dir) if "://" not in exp_dir else Path("runs").resolve() / sweep["name"]
    out.mkdir(parents=True, exist_ok=True)
    rows = results_table(grid, sweep)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    paths = {"table": out / "results.csv"}
    paths["table"].write_text(buffer.getvalue())
    print(format_table(rows, columns, sweep["metric"], sweep["mode"]), flush=True)
    png = plot_sweep(rows, sweep["metric"], out / "sweep.png")
    if png:
        paths["plot"] = png
    best = write_best_config(grid, sweep, out / "best_config.yaml")
    if best:
        paths["best config"] = best
    print("[phi3v-ray tune] " + ", ".join(f"{k}: {v}" for k, v in paths.items()), flush=True)
    return paths


def format_table(rows: list[dict], columns: list[str], metric: str, mode: str) -> str:
    shown = [c for c in columns if c != "error"]
    ranked = sorted(rows, key=lambda r: (r.get(metric) is None, (r.get(metric) or 0) * (1 if mode == "min" else -1)))

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)

    table = [shown] + [[cell(r.get(c)) for c in shown] for r in ranked]
    widths = [max(len(line[i]) for line in table) for i in range(len(shown))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in table]
    errors = [f"  {r['trial_id']}: {r['error']}" for r in ranked if r.get("error")]
    return "\n".join([f"[phi3v-ray tune] trials, best {metric} first"] + lines + (["errors:"] + errors if errors else []))


def plot_sweep(rows: list[dict], metric: str, out: Path) -> Path | None:
    """The metric against learning rate and LoRA rank, one point per trial (x = stopped early), coloured by the other."""
    rows = [r for r in rows if r.get(metric) is not None]
    keys = [k for k in ("lr", "lora_rank") if any(k in r for r in rows)]
    if not rows or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        other = ("lora_rank" if key == "lr" else "lr") if len(keys) == 2 else None
        shades = [r[other] for r in rows if other in r] if other else []
        norm = LogNorm(min(shades), max(shades) * 1.0001) if shades else None
        for status, marker in (("DONE", "o"), ("STOPPED", "x"), ("ERROR", "s")):
            pts = [r for r in rows if r["status"] == status and key in r]
            if pts:
                shade = {"c": [r[other] for r in pts], "cmap": "viridis", "norm": norm} if norm else {}
                art = ax.scatter([r[key] for r in pts], [r[metric] for r in pts], marker=marker, label=status.lower(),
                                 **shade)
        if norm is not None:
            fig.colorbar(art, ax=ax, label=other)
        ax.set_xscale("log", base=2 if key == "lora_rank" else 10)
        if key == "lora_rank":
            ax.set_xticks(sorted({r[key] for r in rows if key in r}))
            ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{metric} per trial (last reported value)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_best_config(grid, sweep: dict, out: Path) -> Path | None:
    """The best trial's full TrainConfig as YAML: `phi3v-ray train --config best_config.yaml`."""
    metric, mode = sweep["metric"], sweep["mode"]
    try:
        best = grid.get_best_result(metric, mode, scope="last")
    except RuntimeError:
        print(f"[phi3v-ray tune] no trial reported {metric}; no best_config.yaml", flush=True)
        return None
    if best.error or last_value(best, metric) is None:
        print(f"[phi3v-ray tune] no finished trial reported {metric}; no best_config.yaml", flush=True)
        return None
    base = sweep["base"]
    cfg = apply_sample(base, best.config).replace(name=f"{sweep['name']}-best", storage_path=base["storage_path"])
    sample = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.config.items())
    header = (
        f"# Best trial of sweep {sweep['name']} ({best.metrics.get('trial_id')}): {metric} "
        f"{last_value(best, metric):.4g} ({mode}) at step {best.metrics.get('step')}.\n"
        f"# Sampled: {sample}\n"
        "# Launch:  phi3v-ray train --config best_config.yaml [key=value ...]\n"
        "# The trial's settings are kept as they ran (e.g. max_steps, eval_max_samples); override them\n"
        "# for the full run, e.g. max_steps=0 eval_max_samples=0.\n"
    )
    out.write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    load_config(str(out))  # what was written must load
    return out
