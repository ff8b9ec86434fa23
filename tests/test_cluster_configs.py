"""Every file under cluster/ parses, has the keys its kind needs, pins the Ray version of
pyproject.toml, keeps the dashboard / Jobs API private, and is bucket-first: runs, data and weights
on the cloud's object store, read as the nodes' own identity, with no shared volume required.
New YAML files are picked up by glob.
"""

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
YAML_FILES = sorted([*CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("*.yml")])
ALL_CLUSTER_FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file())

LAUNCHER_REQUIRED = (
    "cluster_name", "max_workers", "provider", "available_node_types", "head_node_type",
    "auth", "setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
)
KUBERAY_KINDS = ("RayCluster", "RayJob")
EXPOSED_SERVICE_TYPES = ("LoadBalancer", "NodePort")
PRIVATE_HOSTS = ("127.0.0.1", "localhost")
# The object store each launcher's cloud has (phi3v_ray.storage opens them); KubeRay runs on any of them.
OBJECT_STORE = {"aws": ("s3://",), "gcp": ("gs://",), "azure": ("abfs://", "abfss://")}
ANY_OBJECT_STORE = tuple(scheme for schemes in OBJECT_STORE.values() for scheme in schemes)


def _ray_pin() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        m = re.fullmatch(r"ray(\[[^\]]*\])?==([0-9][\w.]*)", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError("pyproject.toml must pin ray with ==")


RAY_PIN = _ray_pin()


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kind(doc) -> str:
    if not isinstance(doc, dict):
        return "unknown"
    if "available_node_types" in doc or "head_node_type" in doc:
        return "launcher"
    if doc.get("kind") in KUBERAY_KINDS:
        return "kuberay"
    if "apiVersion" in doc and "kind" in doc:
        return "k8s"
    return "unknown"


def _collect(kind: str) -> list:
    return [
        pytest.param(path, doc, id=f"{path.relative_to(CLUSTER)}#{i}")
        for path in YAML_FILES
        for i, doc in enumerate(_docs(path))
        if _kind(doc) == kind
    ]


LAUNCHER_DOCS = _collect("launcher")
KUBERAY_DOCS = _collect("kuberay")


def _walk(obj, path=()):
    """Yield (key path, key, value) for every mapping entry, depth first."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield path + (k,), k, v
            yield from _walk(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, path + (i,))


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---- inventory --------------------------------------------------------------------------------


def test_expected_files_exist():
    names = {p.relative_to(CLUSTER).as_posix() for p in YAML_FILES}
    for name in ("aws.yaml", "gcp.yaml", "azure.yaml", "kuberay/shared.yaml", "kuberay/nfs.yaml",
                 "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        assert name in names
    assert (CLUSTER / "README.md").is_file()
    assert LAUNCHER_DOCS and KUBERAY_DOCS


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_parses_into_known_documents(path):
    docs = _docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert _kind(doc) != "unknown", f"{path}: not a launcher config or Kubernetes object"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_top_level_keys_are_commented(path):
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not re.match(r"[A-Za-z_][\w.-]*:", line):
            continue
        above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        assert "#" in line or above.lstrip().startswith("#"), (
            f"{path.name}:{i + 1}: top-level key `{line.split(':')[0]}` has no comment"
        )


# ---- Ray cluster launcher files ---------------------------------------------------------------


@pytest.mark.parametrize("path, cfg", LAUNCHER_DOCS)
def test_launcher_required_keys(path, cfg):
    missing = [k for k in LAUNCHER_REQUIRED if k not in cfg]
    assert not missing, f"{path.name}: missing {missing}"
    assert isinstance(cfg["cluster_name"], str) and cfg["cluster_name"]
    assert isinstance(cfg["max_workers"], int) and cfg["max_workers"] >= 0
    assert cfg["provider"].get("type") in ("aws", "gcp", "azure", "kubernetes", "local")
    assert cfg["auth"].get("ssh_user")
    assert cfg["head_node_type"] in cfg["available_node_types"]
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert cfg[key] and all(isinstance(c, str) for c in cfg[key]), key
    total = 0
    for name, node_type in cfg["available_node_types"].items():
        assert "node_config" in node_type and "resources" in node_type, name
        if name == cfg["head_node_type"]:
            continue
        lo, hi = node_type.get("min_workers", 0), node_type["max_workers"]
        assert isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi, name
        total += hi
    assert total <= cfg["max_workers"], "pools can exceed the cluster's max_workers"


@pytest.mark.parametrize("path, cfg", LAUNCHER_DOCS)
def test_launcher_matches_ray_schema(path, cfg):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("ray")
    from importlib.resources import files

    schema = json.loads((files("ray.autoscaler") / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)


@pytest.mark.parametrize("path, cfg", LAUNCHER_DOCS)
def test_launcher_resources_and_labels(path, cfg):
    head = cfg["head_node_type"]
    gpu_types = 0
    for name, node_type in cfg["available_node_types"].items():
        resources = node_type["resources"]
        for key, value in resources.items():
            assert isinstance(key, str) and key, f"{name}: resource names are strings"
            assert isinstance(value, int) and not isinstance(value, bool) and value >= 0, (
                f"{name}: resource {key}={value!r} must be a non-negative int"
            )
        accel = [k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")]
        if "GPU" in resources:
            gpu_types += 1
            assert resources["GPU"] > 0, f"{name}: GPU count must be positive"
            assert len(accel) == 1, f"{name}: GPU pools name their accelerator_type:<GPU>"
            assert resources[f"accelerator_type:{accel[0]}"] == 1
            labels = node_type.get("labels", {})
            assert labels.get("phi3v.io/accelerator") == accel[0], name
            assert labels.get("phi3v.io/mode") in ("full", "lora", "qlora"), name
        else:
            assert not accel, f"{name}: accelerator_type without GPUs"
        for key, value in node_type.get("labels", {}).items():
            assert isinstance(value, str) and not key.startswith("ray.io/"), name
    assert gpu_types >= 2, "expect GPU pools of more than one kind"
    # The head is not used for training or data tasks.
    assert cfg["available_node_types"][head]["resources"].get("CPU") == 0
    assert "--num-cpus=0" in " ".join(cfg["head_start_ray_commands"])


def _is_spot(node_config: dict) -> bool:
    market = node_config.get("InstanceMarketOptions", {}) or {}
    if str(market.get("MarketType", "")).lower() == "spot":
        return True
    scheduling = node_config.get("scheduling", {}) or {}
    for block in scheduling if isinstance(scheduling, list) else [scheduling]:
        if block.get("preemptible") or str(block.get("provisioningModel", "")).upper() == "SPOT":
            return True
    arm = node_config.get("azure_arm_parameters", {}) or {}
    return str(arm.get("priority", "")).lower() in ("spot", "low")


@pytest.mark.parametrize("path, cfg", LAUNCHER_DOCS)
def test_launcher_spot_only_where_safe(path, cfg):
    types = cfg["available_node_types"]
    assert not _is_spot(types[cfg["head_node_type"]]["node_config"]), "head must be on-demand"
    for name, node_type in types.items():
        if node_type.get("labels", {}).get("phi3v.io/mode") == "full":
            assert not _is_spot(node_type["node_config"]), f"{name}: full fine-tuning on spot"
    assert any(_is_spot(t["node_config"]) for t in types.values()), "no spot pool at all"


@pytest.mark.parametrize("path, cfg", LAUNCHER_DOCS)
def test_launcher_dashboard_is_private_and_token_auth_on(path, cfg):
    head_start = " ".join(cfg["head_start_ray_commands"])
    hosts = re.findall(r"--dashboard-host[= ](\S+)", head_start)
    assert hosts and all(h in PRIVATE_HOSTS for h in hosts), hosts
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in " ".join(cfg[key]), key
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        assert rule.get("FromPort") == 22 and rule.get("ToPort") == 22, rule
    docker = cfg.get("docker") or {}
    for opt in docker.get("run_options", []) + docker.get("head_run_options", []):
        assert not re.search(r"(-p|--publish)\s*\S*(8265|6379|10001)", opt), opt


@pytest.mark.parametrize("path, cfg", LAUNCHER_DOCS)
def test_launcher_installs_pinned_ray_and_project(path, cfg):
    setup = " ".join(cfg["setup_commands"])
    assert f'ray[default,train,tune,data]=={RAY_PIN}' in setup
    assert "phi3v-ray" in setup  # the project itself is installed
    assert "PHI3V_STORAGE_PATH" in path.read_text()


# ---- KubeRay manifests ------------------------------------------------------------------------


def _cluster_spec(doc) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _pod_templates(spec):
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]


def _ray_start_resources(params: dict) -> dict:
    raw = params.get("resources")
    if raw is None:
        return {}
    text = raw.strip()
    if text.startswith('"') and text.endswith('"'):  # KubeRay's quoted-JSON form
        text = text[1:-1].replace('\\"', '"')
    return json.loads(text)


@pytest.mark.parametrize("path, doc", KUBERAY_DOCS)
def test_kuberay_structure(path, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    spec = _cluster_spec(doc)
    assert str(spec["rayVersion"]) == RAY_PIN
    assert spec.get("enableInTreeAutoscaling") is True
    assert spec.get("authOptions", {}).get("mode") == "token"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") not in EXPOSED_SERVICE_TYPES
    assert str(head["rayStartParams"].get("num-cpus")) == "0"
    assert head["rayStartParams"].get("dashboard-host", "") not in ("0.0.0.0", "::")
    groups = spec["workerGroupSpecs"]
    assert groups
    gpu_groups = 0
    for group in groups:
        lo, hi = group["minReplicas"], group["maxReplicas"]
        assert isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi, group["groupName"]
        assert lo <= group.get("replicas", lo) <= hi
        pod = group["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        extra = _ray_start_resources(group.get("rayStartParams", {}))
        for key, value in extra.items():
            assert isinstance(key, str) and _is_number(value) and value >= 0, (key, value)
        if "nvidia.com/gpu" in limits:
            gpu_groups += 1
            gpus = limits["nvidia.com/gpu"]
            assert isinstance(gpus, int) and not isinstance(gpus, bool) and gpus > 0
            assert pod.get("nodeSelector"), f"{group['groupName']}: no nodeSelector for the GPU"
            assert any(k.startswith("accelerator_type:") for k in extra), group["groupName"]
    assert gpu_groups >= 2, "expect GPU worker groups of more than one kind"


def _objects(kind: str) -> dict:
    """Every Kubernetes object of a kind defined under cluster/: name -> (file, object)."""
    return {d["metadata"]["name"]: (p, d) for p in YAML_FILES for d in _docs(p)
            if isinstance(d, dict) and d.get("kind") == kind}


@pytest.mark.parametrize("path, doc", KUBERAY_DOCS)
def test_kuberay_images_and_any_claim_they_mount(path, doc):
    claims = _objects("PersistentVolumeClaim")
    for name, template in _pod_templates(_cluster_spec(doc)):
        pod = template["spec"]
        for container in pod["containers"]:
            assert container["image"].split(":")[-1].startswith(RAY_PIN), (name, container["image"])
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert claim in claims, f"{name}: PVC {claim} is not defined under cluster/"
                assert "ReadWriteMany" in claims[claim][1]["spec"]["accessModes"]


# ---- bucket-first storage -----------------------------------------------------------------------


@pytest.mark.parametrize("path, doc", KUBERAY_DOCS)
def test_kuberay_pods_share_no_volume_and_run_as_a_storage_identity(path, doc):
    accounts = _objects("ServiceAccount")
    for name, template in _pod_templates(_cluster_spec(doc)):
        pod = template["spec"]
        shared = [v["name"] for v in pod.get("volumes", []) if {"persistentVolumeClaim", "nfs"} & set(v)]
        assert not shared, f"{path.name} {name}: mounts {shared} by default (a bucket needs no shared volume)"
        account = pod.get("serviceAccountName")
        assert account in accounts, f"{path.name} {name}: no ServiceAccount under cluster/ to bind a cloud identity to"
        assert accounts[account][0].name == "shared.yaml", "the identity is applied with shared.yaml, once"
        assert template["metadata"]["labels"].get("azure.workload.identity/use") == "true", name  # AKS needs it
        for container in pod["containers"]:
            for env in container.get("env", []):
                if env["name"] == "PHI3V_STORAGE_PATH":
                    assert env["value"].startswith(ANY_OBJECT_STORE), (name, env["value"])


def test_rayjob_trains_from_a_bucket():
    jobs = [doc for _, doc in (p.values for p in KUBERAY_DOCS) if doc["kind"] == "RayJob"]
    assert jobs
    for job in jobs:
        entry = job["spec"]["entrypoint"]
        assert entry.startswith("phi3v-ray train"), entry
        settings = dict(re.findall(r"(\w+)=(\S+)", entry))
        for key in ("storage_path", "checkpoint", "train_file", "val_file"):
            assert settings.get(key, "").startswith(ANY_OBJECT_STORE), f"{key}={settings.get(key)!r} is not in a bucket"
        runtime_env = yaml.safe_load(job["spec"].get("runtimeEnvYAML") or "{}") or {}
        value = (runtime_env.get("env_vars") or {}).get("PHI3V_STORAGE_PATH")
        assert value is None or value.startswith(ANY_OBJECT_STORE), value


def test_a_shared_volume_is_an_option_not_a_requirement():
    path, claim = _objects("PersistentVolumeClaim")["phi3v-checkpoints"]
    assert path.name == "nfs.yaml" and "ReadWriteMany" in claim["spec"]["accessModes"]
    assert not any(d.get("kind") == "PersistentVolumeClaim" for d in _docs(CLUSTER / "kuberay" / "shared.yaml"))
    for name in ("raycluster.yaml", "rayjob.yaml"):  # shown where it would go, commented out
        lines = (CLUSTER / "kuberay" / name).read_text().splitlines()
        uses = [line for line in lines if "claimName: phi3v-checkpoints" in line]
        assert uses and all(line.lstrip().startswith("#") for line in uses), name


@pytest.mark.parametrize("path, cfg", LAUNCHER_DOCS)
def test_launcher_storage_path_is_the_clouds_object_store_and_nothing_mounts_nfs(path, cfg):
    schemes = OBJECT_STORE[cfg["provider"]["type"]]
    exported = re.findall(r"export PHI3V_STORAGE_PATH=([^\s'\"]+)", " ".join(cfg["setup_commands"]))
    assert exported and all(v.startswith(schemes) for v in exported), exported
    commands = " ".join(c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                      "worker_setup_commands") for c in cfg.get(key) or [])
    assert not re.search(r"\bmount\b|\bnfs\b|/mnt/checkpoints", commands, re.I), "a shared file system is an option only"


def test_azure_nodes_run_as_a_managed_identity_that_outlives_the_cluster():
    """Storage roles are granted to one identity once; the one the launcher makes is deleted by `ray down`."""
    (azure,) = [doc for _, doc in (p.values for p in LAUNCHER_DOCS) if doc["provider"]["type"] == "azure"]
    assert azure["provider"].get("msi_name") and azure["provider"].get("msi_resource_group")
    assert azure["provider"]["msi_resource_group"] != azure["provider"]["resource_group"]


@pytest.mark.parametrize("path", [p for p in ALL_CLUSTER_FILES if p.suffix != ".md"],
                         ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_storage_credentials_in_any_file(path):
    """Keys, secrets and SAS tokens come from the node's or pod's identity, never from a file here."""
    text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    found = re.findall(r"AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|AWS_SESSION_TOKEN|AZURE_STORAGE_KEY|AZURE_CLIENT_SECRET|"
                       r"AZURE_STORAGE_SAS_TOKEN|AZURE_STORAGE_CONNECTION_STRING|GOOGLE_APPLICATION_CREDENTIALS|"
                       r"account_key|sas_token|AccountKey=", text)
    assert not found, f"{path.name}: {found}"


# ---- repository-wide checks ---------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_exposed_services(path):
    for doc in _docs(path):
        if isinstance(doc, dict) and doc.get("kind") == "Service":
            assert doc.get("spec", {}).get("type", "ClusterIP") not in EXPOSED_SERVICE_TYPES
        for keys, key, value in _walk(doc):
            if key == "serviceType":
                assert value not in EXPOSED_SERVICE_TYPES, (path.name, keys)
            if key in ("dashboard-host", "dashboard_host"):
                assert value not in ("0.0.0.0", "::"), (path.name, keys)
            # Firewall-style rules anywhere may only open SSH.
            if key == "IpPermissions":
                for rule in value:
                    assert rule.get("FromPort") == rule.get("ToPort") == 22, (path.name, rule)
            if key == "securityRules":
                for rule in value:
                    props = rule.get("properties", rule)
                    if str(props.get("direction", "Inbound")).lower() == "inbound":
                        assert str(props.get("destinationPortRange")) == "22", (path.name, rule)


@pytest.mark.parametrize("path", ALL_CLUSTER_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_public_dashboard_flag_in_any_file(path):
    text = path.read_text()
    assert not re.search(r"dashboard[-_]host[\"']?\s*[=:]?\s*[\"']?0\.0\.0\.0", text), path.name


@pytest.mark.parametrize("path", ALL_CLUSTER_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_ray_pins_equal_pyproject(path):
    text = path.read_text()
    found = (
        re.findall(r"ray\[[^\]]*\]==([0-9][\w.]*[0-9])", text)
        + re.findall(r"\bray==([0-9][\w.]*[0-9])", text)
        + re.findall(r"rayproject/ray(?:-ml|-llm)?:([0-9]+\.[0-9]+\.[0-9]+)", text)
        + re.findall(r"rayVersion:\s*[\"']?([0-9][\w.]*[0-9])", text)
    )
    for version in found:
        assert version == RAY_PIN, f"{path.name} pins Ray {version}, pyproject.toml has {RAY_PIN}"
    if path.suffix in (".yaml", ".yml") and any(_kind(d) in ("launcher", "kuberay")
                                                 for d in _docs(path)):
        assert found, f"{path.name} does not pin Ray"


def _repo_files(suffixes):
    skip = {"tests", "build", "dist", "node_modules", "__pycache__"}
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO).parts
        if any(part.startswith(".") or part in skip or part.endswith(".egg-info") for part in rel):
            continue
        if path.is_file() and path.suffix in suffixes:
            yield path


def test_nothing_enables_trust_remote_code():
    offenders = []
    for path in _repo_files({".py"}):
        if re.search(r"trust_remote_code\s*=\s*True", path.read_text(errors="replace")):
            offenders.append(str(path.relative_to(REPO)))
    for path in _repo_files({".yaml", ".yml", ".json"}):
        if re.search(r"trust_remote_code[\"']?\s*:\s*true", path.read_text(errors="replace"), re.I):
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, f"trust_remote_code enabled in: {offenders}"
