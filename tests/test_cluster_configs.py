"""The cluster configs in cluster/: Ray's launcher schema, the fields KubeRay needs, the image
and the job runtime env. Fast: no Ray cluster, no network, no Kubernetes.

Each file has one check function; the tests run it on the repository's file, and
``test_checks_catch_broken_configs`` runs it on a broken copy to show it would fail.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import re
import shlex

import jsonschema
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
AWS_CONFIG = CLUSTER / "aws-gpu.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob-link.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
CONFIG_FILES = (AWS_CONFIG, RAYCLUSTER, RAYJOB, DOCKERFILE, RUNTIME_ENV)

TOKEN_SECRET = "otmel-ray-token"
TOKEN_SECRET_KEY = "auth_token"  # the key KubeRay's authOptions.secretName expects
SERVICE_ACCOUNT = "otmel"
GPU = "nvidia.com/gpu"
RAY_MINOR = "2.60."


def project_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        return re.search(r'(?m)^version\s*=\s*"([^"]+)"', text).group(1)
    return tomllib.loads(text)["project"]["version"]


def torch_pin() -> str:
    """The torch version the Makefile installs first (the project's torch pin)."""
    return re.search(r"torch==([0-9][0-9.]*[0-9])", (ROOT / "Makefile").read_text()).group(1)


def ray_schema() -> dict:
    import ray

    return json.loads((pathlib.Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def documented_image_tag(dockerfile_text: str) -> str:
    """The tag the Dockerfile's build instructions give the image."""
    m = re.search(r"(?m)^#.*docker build\s+-f\s+cluster/Dockerfile\s+-t\s+(\S+)\s+\.", dockerfile_text)
    assert m, "the Dockerfile documents no `docker build -f cluster/Dockerfile -t TAG .`"
    return m.group(1)


def no_credentials(text: str, where: str) -> None:
    for pattern in (r"(?i)aws_secret_access_key", r"(?i)aws_access_key_id", r"(?i)aws_session_token",
                    r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", r"RAY_AUTH_TOKEN\s*[=:]"):
        assert not re.search(pattern, text), f"{where}: credentials in the file ({pattern})"


# --- cluster launcher ---------------------------------------------------------------------

def otmel_pins(commands: list[str]) -> list[tuple[set[str], str]]:
    """(extras, version) of every `otmel[extras]==version` / `otmel==version` requirement."""
    return [({e.strip() for e in (extras or "").split(",") if e.strip()}, version)
            for extras, version in re.findall(r"\botmel(?:\[([^\]]*)\])?==([0-9][^\s\"']*)", " ".join(commands))]


def check_aws_launcher(text: str, version: str) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    no_credentials(text, "aws-gpu.yaml")
    cfg = yaml.safe_load(text)
    jsonschema.validate(cfg, ray_schema())
    # what `ray up` does before it talks to AWS: merge the aws provider defaults, validate
    validate_config(prepare_config(copy.deepcopy(cfg)))

    assert cfg["cluster_name"] == "otmel", cfg["cluster_name"]
    assert (cfg["provider"]["type"], cfg["provider"]["region"]) == ("aws", "us-west-2"), cfg["provider"]
    assert cfg["provider"]["cache_stopped_nodes"] is False, "stopped nodes would be kept (and billed)"
    assert cfg["idle_timeout_minutes"] > 0, "idle_timeout_minutes"
    assert cfg["upscaling_speed"] > 0, "upscaling_speed"

    types = cfg["available_node_types"]
    head_name = cfg["head_node_type"]
    head = types[head_name]
    assert head["resources"].get("GPU", 0) == 0, "the head must not offer GPUs"
    assert not re.match(r"[gp]\d", head["node_config"]["InstanceType"]), "the head is a GPU instance type"
    workers = {name: t for name, t in types.items() if name != head_name}
    gpu_types = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no worker type declares GPU resources"
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name
    for name, t in types.items():
        assert "IamInstanceProfile" in t["node_config"], f"{name}: S3 access must come from an instance role"

    # the commands each node type runs: a type's worker_setup_commands replace the global lists
    setup = {head_name: cfg.get("setup_commands", []) + cfg.get("head_setup_commands", [])}
    for name, t in workers.items():
        setup[name] = t.get("worker_setup_commands",
                            cfg.get("setup_commands", []) + cfg.get("worker_setup_commands", []))
    for name, commands in setup.items():
        pins = otmel_pins(commands)
        assert pins, f"{name}: otmel is not installed at a pinned version"
        assert all(v == version for _, v in pins), f"{name}: otmel pinned to {pins}, pyproject says {version}"
        assert any("cluster" in extras for extras, _ in pins), f"{name}: otmel[cluster] dependencies missing"
        assert f"torch=={torch_pin()}" in " ".join(commands), f"{name}: torch not pinned to {torch_pin()}"
    for name in gpu_types:
        assert any("gpu" in extras for extras, _ in otmel_pins(setup[name])), f"{name}: otmel[gpu]=={version} missing"
        assert re.search(r"torch==\S+\s.*--index-url\s+\S+/whl/cu\d+", " ".join(setup[name])), \
            f"{name}: torch does not come from the PyTorch CUDA index"

    # token auth on every node, the token file shipped to the nodes, Jobs API on the head
    starts = {"head": cfg["head_start_ray_commands"], "worker": cfg["worker_start_ray_commands"]}
    for kind, commands in starts.items():
        ray_starts = [c for c in commands if "ray start" in c]
        assert ray_starts, f"no ray start in {kind}_start_ray_commands"
        for c in ray_starts:
            assert re.search(r"RAY_AUTH_MODE=token\s+ray start", c), f"{kind} ray start without RAY_AUTH_MODE=token"
    head_start = " ".join(starts["head"])
    assert "--dashboard-host=0.0.0.0" in head_start and "--dashboard-port=8265" in head_start, \
        "the head's Jobs API must listen on 0.0.0.0:8265"
    assert "~/.ray/auth_token" in cfg["file_mounts"], "the cluster token is not copied to the nodes"


def test_aws_launcher_config():
    check_aws_launcher(AWS_CONFIG.read_text(), project_version())


# --- KubeRay --------------------------------------------------------------------------------

def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"]["template"])] + \
        [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]


def check_ray_cluster_spec(spec: dict, image: str, where: str) -> None:
    assert spec["rayVersion"].startswith(RAY_MINOR), f"{where}: rayVersion {spec['rayVersion']}"
    assert spec["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}, where

    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), f"{where}: head rayStartParams"
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: the head must run no work"
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0", where
    assert head["template"]["spec"]["containers"], f"{where}: head template has no containers"

    groups = spec["workerGroupSpecs"]
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), f"{where}: duplicate groupName"
    assert "gpu-workers" in names, f"{where}: no gpu-workers group"
    for g in groups:
        assert isinstance(g["rayStartParams"], dict), f"{where}/{g['groupName']}: rayStartParams"
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}/{g['groupName']}: replicas"
        assert g["template"]["spec"]["containers"], f"{where}/{g['groupName']}: no containers"
        if "gpu" in g["groupName"]:
            pod = g["template"]["spec"]
            for c in pod["containers"]:
                res = c.get("resources", {})
                for part in ("requests", "limits"):
                    assert int(res.get(part, {}).get(GPU, 0)) >= 1, \
                        f"{where}/{g['groupName']}/{c['name']}: {GPU} missing from resources.{part}"
                assert res["requests"][GPU] == res["limits"][GPU], f"{where}/{g['groupName']}: GPU requests != limits"
            assert any(t.get("key") == GPU for t in pod.get("tolerations", [])), \
                f"{where}/{g['groupName']}: no toleration for {GPU}"
    for params in [head["rayStartParams"]] + [g["rayStartParams"] for g in groups]:
        assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams values must be strings"

    for name, template in pod_templates(spec):
        pod = template["spec"]
        assert pod.get("serviceAccountName") == SERVICE_ACCOUNT, f"{where}/{name}: AWS access through IRSA"
        for c in pod["containers"]:
            assert c["image"] == image, f"{where}/{name}: image {c['image']}, the Dockerfile builds {image}"
        ray_container = pod["containers"][0]
        env = {e["name"]: e for e in ray_container.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}/{name}: RAY_AUTH_MODE"
        token = env.get("RAY_AUTH_TOKEN")
        assert token is not None, f"{where}/{name}: no RAY_AUTH_TOKEN"
        assert "value" not in token, f"{where}/{name}: literal RAY_AUTH_TOKEN"
        assert token.get("valueFrom", {}).get("secretKeyRef") == {"name": TOKEN_SECRET, "key": TOKEN_SECRET_KEY}, \
            f"{where}/{name}: RAY_AUTH_TOKEN must come from Secret {TOKEN_SECRET}/{TOKEN_SECRET_KEY}"


def check_raycluster(text: str, image: str) -> None:
    no_credentials(text, "raycluster.yaml")
    doc = yaml.safe_load(text)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster"), (doc["apiVersion"], doc["kind"])
    assert doc["metadata"]["name"] == "otmel", doc["metadata"]["name"]
    spec = doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True, "raycluster.yaml: in-tree autoscaling off"
    opts = spec["autoscalerOptions"]
    assert isinstance(opts["idleTimeoutSeconds"], int) and opts["idleTimeoutSeconds"] > 0, "idleTimeoutSeconds"
    assert opts["upscalingMode"] in ("Default", "Aggressive", "Conservative"), opts["upscalingMode"]
    check_ray_cluster_spec(spec, image, "raycluster.yaml")


def check_runtime_env(runtime_env: dict, where: str, monkeypatch) -> None:
    """Ray's own parser accepts it, and a driver started under it can call otmel's init_ray:
    inside a job, Ray merges the job's runtime env with ray.init's and refuses overlapping
    env var keys unless RAY_OVERRIDE_JOB_RUNTIME_ENV=1 (ray/_private/worker.py)."""
    from ray.runtime_env import RuntimeEnv
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from otmel.jobs.common import worker_env

    job_env = RuntimeEnv(**runtime_env)
    env_vars = runtime_env.get("env_vars", {})
    assert all(isinstance(v, str) for v in env_vars.values()), f"{where}: env var values must be strings"
    with monkeypatch.context() as m:
        for k, v in env_vars.items():  # the job's env vars are in the driver's environment
            m.setenv(k, v)
        driver_env = {"env_vars": worker_env()}  # what otmel.jobs.common.init_ray passes to ray.init
        merged = _merge_runtime_env(job_env, driver_env, override=os.getenv("RAY_OVERRIDE_JOB_RUNTIME_ENV") == "1")
    assert merged is not None, f"{where}: ray.init in the otmel driver would fail to merge runtime envs"


def check_rayjob(text: str, image: str, monkeypatch) -> None:
    no_credentials(text, "rayjob-link.yaml")
    doc = yaml.safe_load(text)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob"), (doc["apiVersion"], doc["kind"])
    spec = doc["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["otmel", "link"], f"entrypoint {spec['entrypoint']!r}"
    for option in ("--model", "--index", "--input", "--output"):
        assert option in argv and argv[argv.index(option) + 1].startswith("s3://"), f"entrypoint {option} not s3://"
    assert spec["shutdownAfterJobFinishes"] is True, "the job's Ray cluster must be deleted when it finishes"
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0, \
        "ttlSecondsAfterFinished"
    assert spec["submissionMode"] == "K8sJobMode", spec["submissionMode"]
    check_runtime_env(yaml.safe_load(spec["runtimeEnvYAML"]), "rayjob-link.yaml runtimeEnvYAML", monkeypatch)
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True, "rayjob-link.yaml: in-tree autoscaling off"
    check_ray_cluster_spec(cluster, image, "rayjob-link.yaml")


def test_raycluster_manifest():
    check_raycluster(RAYCLUSTER.read_text(), documented_image_tag(DOCKERFILE.read_text()))


def test_rayjob_manifest(monkeypatch):
    check_rayjob(RAYJOB.read_text(), documented_image_tag(DOCKERFILE.read_text()), monkeypatch)


# --- image and runtime env ------------------------------------------------------------------

def check_dockerfile(text: str, version: str) -> None:
    no_credentials(text, "Dockerfile")
    instructions = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert re.match(r"FROM\s+rayproject/ray:2\.60\.\d+-py3\d+-(gpu|cu\d+)\s*$", instructions[0]), \
        f"not a Ray 2.60 GPU base image: {instructions[0]!r}"
    args = dict(re.findall(r"(?m)^ARG\s+(\w+)=(\S+)", text))
    assert args.get("OTMEL_VERSION") == version, f"ARG OTMEL_VERSION={args.get('OTMEL_VERSION')}, pyproject {version}"
    assert args.get("TORCH_VERSION") == torch_pin(), \
        f"ARG TORCH_VERSION={args.get('TORCH_VERSION')}, Makefile {torch_pin()}"
    assert re.search(r"/whl/cu\d+", args.get("TORCH_INDEX_URL", "")), "torch does not come from a CUDA index"
    assert re.search(r'pip install[^\n]*"torch==\$\{TORCH_VERSION\}"[^\n]*--index-url "\$\{TORCH_INDEX_URL\}"', text), \
        "torch is not installed from TORCH_INDEX_URL at TORCH_VERSION"
    assert re.search(r"(?m)^COPY\s.*dist/otmel-\$\{OTMEL_VERSION\}-py3-none-any\.whl", text), "the wheel is not COPYed"
    m = re.search(r"otmel-\$\{OTMEL_VERSION\}-py3-none-any\.whl\[([^\]]*)\]", text)
    assert m and "gpu" in m.group(1).split(","), "the wheel is not installed with its gpu extra"
    assert documented_image_tag(text) == f"otmel:{version}-gpu", documented_image_tag(text)


def test_dockerfile():
    check_dockerfile(DOCKERFILE.read_text(), project_version())


def check_runtime_env_file(text: str, monkeypatch) -> None:
    no_credentials(text, "runtime_env.yaml")
    cfg = yaml.safe_load(text)
    # production default: the image has otmel and its dependencies; nothing shipped or installed
    for key in ("working_dir", "py_modules", "pip", "conda", "uv"):
        assert key not in cfg, f"runtime_env.yaml sets {key}"
    excludes = cfg["excludes"]
    for pattern in (".venv", ".git", "*.parquet", "*.onnx", "*.safetensors", "demo-run"):
        assert pattern in excludes, f"{pattern} not excluded"
    check_runtime_env(cfg, "runtime_env.yaml", monkeypatch)


def test_runtime_env(monkeypatch):
    check_runtime_env_file(RUNTIME_ENV.read_text(), monkeypatch)


def test_no_credentials_in_cluster_files():
    for path in CONFIG_FILES:
        no_credentials(path.read_text(), str(path.relative_to(ROOT)))


# --- the checks fail on broken configs --------------------------------------------------------

def _edit_yaml(path: pathlib.Path, edit) -> str:
    doc = yaml.safe_load(path.read_text())
    edit(doc)
    return yaml.safe_dump(doc, sort_keys=False)


def _gpu_group(spec: dict) -> dict:
    return next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu-workers")


BROKEN = {
    "gpu limit missing": lambda mp, tag, v: check_raycluster(_edit_yaml(RAYCLUSTER, lambda d: _gpu_group(d["spec"])
        ["template"]["spec"]["containers"][0]["resources"]["limits"].pop(GPU)), tag),
    "literal token": lambda mp, tag, v: check_raycluster(_edit_yaml(RAYCLUSTER, lambda d: d["spec"]["headGroupSpec"]
        ["template"]["spec"]["containers"][0]["env"].__setitem__(1, {"name": "RAY_AUTH_TOKEN", "value": "x"})), tag),
    "replicas above max": lambda mp, tag, v: check_raycluster(_edit_yaml(RAYCLUSTER, lambda d: _gpu_group(d["spec"])
        .__setitem__("replicas", 99)), tag),
    "image tag drift": lambda mp, tag, v: check_raycluster(RAYCLUSTER.read_text(), "otmel:9.9.9-gpu"),
    "cluster kept": lambda mp, tag, v: check_rayjob(_edit_yaml(RAYJOB, lambda d: d["spec"]
        .__setitem__("shutdownAfterJobFinishes", False)), tag, mp),
    "job env conflict": lambda mp, tag, v: check_rayjob(_edit_yaml(RAYJOB, lambda d: d["spec"].__setitem__(
        "runtimeEnvYAML", "env_vars:\n  AWS_REGION: us-west-2\n")), tag, mp),
    "otmel pin drift": lambda mp, tag, v: check_aws_launcher(AWS_CONFIG.read_text().replace(f"=={v}", "==0.0.1"), v),
    "worker without token auth": lambda mp, tag, v: check_aws_launcher(_edit_yaml(AWS_CONFIG, lambda d: d.__setitem__(
        "worker_start_ray_commands", ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"])), v),
    "schema: GPU count as string": lambda mp, tag, v: check_aws_launcher(_edit_yaml(AWS_CONFIG, lambda d: d[
        "available_node_types"]["gpu_worker"]["resources"].__setitem__("GPU", "1")), v),
    "GPU on the head": lambda mp, tag, v: check_aws_launcher(_edit_yaml(AWS_CONFIG, lambda d: d[
        "available_node_types"]["ray.head.default"]["resources"].__setitem__("GPU", 1)), v),
    "access key in the file": lambda mp, tag, v: check_aws_launcher(
        AWS_CONFIG.read_text() + "# aws_secret_access_key: abc\n", v),
    "CPU base image": lambda mp, tag, v: check_dockerfile(DOCKERFILE.read_text().replace(
        "rayproject/ray:2.60.0-py311-gpu", "rayproject/ray:2.60.0-py311-cpu"), v),
    "wheel without gpu extra": lambda mp, tag, v: check_dockerfile(DOCKERFILE.read_text().replace(
        "whl[cluster,gpu]", "whl[cluster]"), v),
    ".venv shipped": lambda mp, tag, v: check_runtime_env_file(_edit_yaml(RUNTIME_ENV, lambda d: d["excludes"]
        .remove(".venv")), mp),
}


@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_checks_catch_broken_configs(breakage, monkeypatch):
    tag = documented_image_tag(DOCKERFILE.read_text())
    with pytest.raises((AssertionError, jsonschema.ValidationError)):
        BROKEN[breakage](monkeypatch, tag, project_version())


def test_cluster_down_finds_its_own_processes_only(tmp_path):
    """`otmel cluster down` stops the processes whose command line names its cluster's temp dir
    as a whole path: another local cluster's dir with a longer name (``...-6379`` vs
    ``...-63790``) is not its."""
    import subprocess
    import sys

    from otmel.cluster.local import _processes_under

    ours, other = str(tmp_path / "otmel-ray-6379"), str(tmp_path / "otmel-ray-63790")
    argvs = {"flag": [f"--temp-dir={ours}"], "path": [f"{ours}/session_1/logs"],
             "other-flag": [f"--temp-dir={other}"], "other-path": [f"{other}/session_1/logs"]}
    procs = {k: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *a]) for k, a in argvs.items()}
    try:
        found = set(_processes_under(ours))
        assert {procs["flag"].pid, procs["path"].pid} <= found
        assert not {procs["other-flag"].pid, procs["other-path"].pid} & found
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
