"""How the code hangs together: imports run with the data (STYLE.md), and nothing reaches outside
the repository.

    phi3v_ray.constants                     pure Python; everything else imports it
    datasets_ray schema, converters, demo   no torch, no ray, no transformers
    phi3v_ray processor, examples           no ray, never the model (Ray Data actors import them)
    datasets_ray.pipeline (Ray Data)        uses processor and examples; nothing on the worker uses it
    phi3v_ray collate                       the worker's batch iterator; no datasets_ray, Ray on first use
    phi3v_ray config                        no torch (the driver validates before asking for GPUs)
    cluster/                                imported by nothing

Two checks per rule: every import statement in the source (including the ones inside functions,
which a plain import never runs), and the modules a fresh interpreter holds after importing the
layer (which catches what comes in through other modules).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("phi3v_ray", "datasets_ray", "tune_spaces")
HEAVY = ("torch", "numpy", "ray", "transformers")
# build the datasets, wire the convert CLI, sample a video's frames as the ucf101 converter does (predict)
DRIVER = {"phi3v_ray/launch.py", "phi3v_ray/cli.py", "phi3v_ray/predict.py"}


def _files(*patterns: str) -> list[Path]:
    files = sorted({p for pattern in patterns for p in ROOT.glob(pattern) if "__pycache__" not in p.parts})
    assert files, patterns
    return files


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module an import statement in `path` names, wherever the statement is, made absolute."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import x` names a module
    return names


def _hits(names, forbidden) -> list[str]:
    return sorted(n for n in names for f in forbidden if n == f or n.startswith(f + "."))


def _loaded_after_import(*modules: str) -> set[str]:
    """sys.modules of a fresh interpreter that imported `modules` (run from the repository root)."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


# ------------------------------------------------------------------------------------ source


# (files, forbidden module prefixes, why)
SOURCE_RULES = {
    "constants": (["phi3v_ray/constants.py"], HEAVY + PACKAGES, "pure Python, imported by every layer"),
    "data_format": (
        ["datasets_ray/schema.py", "datasets_ray/demo.py", "datasets_ray/convert_cli.py", "datasets_ray/converters/*.py"],
        ("torch", "ray", "transformers", "phi3v_ray.processor", "phi3v_ray.model", "datasets_ray.pipeline"),
        "converting and validating records needs neither torch nor ray",
    ),
    "processor": (
        ["phi3v_ray/processor.py", "phi3v_ray/examples.py"],
        ("ray", "phi3v_ray.model", "datasets_ray"),
        "Ray Data actors import these; they stay light",
    ),
    "collate": (["phi3v_ray/collate.py"], ("datasets_ray",), "the worker's side of the data needs no build module"),
    "data_side": (
        ["datasets_ray/**/*.py"],
        ("phi3v_ray.model", "phi3v_ray.collate", "phi3v_ray.train", "phi3v_ray.engine", "phi3v_ray.launch"),
        "the data side builds rows; batching them and the model belong to the training worker",
    ),
}


@pytest.mark.parametrize("rule", sorted(SOURCE_RULES))
def test_import_statements_follow_the_data(rule):
    patterns, forbidden, why = SOURCE_RULES[rule]
    bad = {str(f.relative_to(ROOT)): _hits(_imports(f), forbidden) for f in _files(*patterns)}
    assert not {f: h for f, h in bad.items() if h}, f"{rule}: {why}"


def test_the_worker_never_imports_the_ray_data_build():
    """Outside the driver, phi3v_ray takes from datasets_ray only its pure-Python record schema."""
    bad = {}
    for f in _files("phi3v_ray/**/*.py"):
        rel = f.relative_to(ROOT).as_posix()
        hits = [n for n in _hits(_imports(f), ("datasets_ray",)) if not n.startswith("datasets_ray.schema")]
        if hits and rel not in DRIVER:
            bad[rel] = hits
    assert bad == {}


def test_nothing_imports_cluster():
    bad = {}
    for f in _files(*(f"{p}/**/*.py" for p in PACKAGES), "tests/*.py", "bench/*.py"):
        hits = _hits(_imports(f), ("cluster",))
        if hits:
            bad[str(f.relative_to(ROOT))] = hits
    assert bad == {}


def test_constants_are_defined_once():
    """The shared constants are assigned in phi3v_ray/constants.py and nowhere else."""
    names = {"IGNORE_INDEX", "BOS_ID", "ENDOFTEXT_ID", "END_ID", "STOP_IDS", "CROP_SIZE", "CROP", "GRID",
             "MAX_NUM_CROPS", "CLIP_MEAN", "CLIP_STD", "IMAGE_TAG"}
    bad = {}
    for f in _files(*(f"{p}/**/*.py" for p in PACKAGES), "bench/*.py"):
        if f.relative_to(ROOT).as_posix() == "phi3v_ray/constants.py":
            continue
        tree = ast.parse(f.read_text(encoding="utf-8"))
        assigned = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                    if isinstance(t, ast.Name)}
        if assigned & names:
            bad[str(f.relative_to(ROOT))] = sorted(assigned & names)
    assert bad == {}


# ------------------------------------------------------------------------------------ fresh interpreter


def test_constants_import_nothing_but_the_standard_library():
    new = _loaded_after_import("phi3v_ray.constants") - _loaded_after_import()  # less what startup loads
    assert {m for m in new if m.split(".")[0] in PACKAGES} == {"phi3v_ray", "phi3v_ray.constants"}
    assert {m.split(".")[0] for m in new} - set(sys.stdlib_module_names) - set(PACKAGES) == set()


def test_converters_and_schema_load_without_torch_or_ray():
    loaded = _loaded_after_import("datasets_ray.schema", "datasets_ray.converters", "datasets_ray.demo",
                                  "datasets_ray.convert_cli")
    assert _hits(loaded, ("torch", "ray", "transformers")) == []


def test_processor_and_examples_load_without_ray_or_the_model():
    loaded = _loaded_after_import("phi3v_ray.processor", "phi3v_ray.examples")
    assert _hits(loaded, ("ray", "phi3v_ray.model", "datasets_ray")) == []


def test_the_decoding_actor_loads_without_torch(tiny_ckpt):
    """A Ray Data actor imports the pipeline, loads the processor and builds rows of uint8 crops; torch
    is for the training worker (an actor importing it starts seconds later, and on a 2-core machine
    that is most of a small split's decode)."""
    code = ("import sys; from PIL import Image; import datasets_ray.pipeline\n"
            "from phi3v_ray.examples import build_example; from phi3v_ray.processor import Phi3VProcessor\n"
            "processor = Phi3VProcessor.from_pretrained(sys.argv[1], num_crops=1)\n"
            "turn = {'images': ['a.png'], 'user': '<|image_1|>\\nWhat colour is the shape?', 'assistant': 'red'}\n"
            "example = build_example(processor, [turn], [Image.new('RGB', (96, 96), 'red')], crops=True)\n"
            "assert example.pixel_crops.shape[0] == 1, example.pixel_crops.shape\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_ckpt)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_collate_loads_without_ray_or_datasets_ray():
    loaded = _loaded_after_import("phi3v_ray.collate")
    assert _hits(loaded, ("ray", "datasets_ray")) == []


def test_the_training_worker_loads_without_the_pipeline():
    loaded = _loaded_after_import("phi3v_ray.train")
    assert _hits(loaded, ("datasets_ray.pipeline",)) == []


def test_config_loads_without_torch():
    # The driver validates the config before asking for GPUs; it should not pay for torch to do so.
    loaded = _loaded_after_import("phi3v_ray.config")
    assert _hits(loaded, ("torch",)) == []


# ------------------------------------------------------------------------------------ self-contained

# A path that leaves the repository: an absolute one under the folder that holds this checkout, or
# a relative climb into one of that folder's other entries (a user's clone has neither).
_SIBLINGS = sorted(p.name for p in ROOT.parent.iterdir() if p != ROOT)
OUTSIDE = re.compile("|".join([re.escape(str(ROOT.parent)) + "/"]
                              + [r"\.\./" + re.escape(name) + r"\b" for name in _SIBLINGS]))
# A checkout directly in a system folder (/tmp, the home directory) shares it with scratch paths and
# unrelated entries the tests may name legitimately: there the check cannot tell, and is skipped.
_IN_SYSTEM_FOLDER = ROOT.parent.resolve() in {Path("/"), Path("/tmp"), Path(tempfile.gettempdir()).resolve(),
                                              Path.home().resolve()}


@pytest.mark.skipif(_IN_SYSTEM_FOLDER, reason="the checkout sits directly in a system folder")
def test_tests_and_bench_read_nothing_outside_the_repository():
    bad = []
    for f in _files("tests/**/*", "bench/**/*", *(f"{p}/**/*" for p in PACKAGES)):
        if not f.is_file() or f == Path(__file__).resolve():
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        bad += [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
                if OUTSIDE.search(line)]
    assert bad == []


def test_the_official_config_ships_with_the_package():
    from phi3v_ray.model.configuration import official_config_path

    path = official_config_path()
    assert path.is_file() and path.resolve().is_relative_to(ROOT / "phi3v_ray")
    config = json.loads(path.read_text())
    assert config["_name_or_path"] == "Phi-3.5-vision-instruct" and config["hidden_size"] == 3072
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"model/official_config.json"' in pyproject  # package-data, so an installed wheel has it too
