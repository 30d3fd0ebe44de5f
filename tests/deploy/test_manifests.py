"""Every file in deploy/ parses and says what it should: Kubernetes kinds and API versions, the
GPU worker group, the token on every Ray container, the RayJob and CronJob commands as the real
CLI parses them, the specs they carry as the real spec loader validates them, the cluster-launcher
YAML against Ray's own schema, and the Dockerfile's stages, pins and entrypoint.

No Docker engine or Kubernetes API runs here: building the image and applying the manifests are
checked by parsing only."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml

from jobs.kinds import load_spec
from services.http.settings import Settings
from services.scheduler.cron import check_cron, zone
from zfatlas_cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
API_VERSIONS = {
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
    "CronJob": "batch/v1",
    "Deployment": "apps/v1",
    "ConfigMap": "v1",
    "Service": "v1",
    "PersistentVolumeClaim": "v1",
}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_files() -> list[Path]:
    return sorted((DEPLOY / "kuberay").glob("*.yaml")) + sorted((DEPLOY / "kubernetes").glob("*.yaml"))


def by_kind(path: Path, kind: str) -> list[dict[str, Any]]:
    return [d for d in documents(path) if d["kind"] == kind]


def ray_containers(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def configmap_spec(path: Path, mount_path: str, pod: dict[str, Any], container: dict[str, Any]) -> str:
    """The text of the spec file at ``mount_path`` in ``container``, from a ConfigMap in ``path``."""
    folder, name = mount_path.rsplit("/", 1)
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    [configmap] = [
        c for c in by_kind(path, "ConfigMap") if c["metadata"]["name"] == volume["configMap"]["name"]
    ]
    return configmap["data"][name]


def test_every_kubernetes_document_has_a_known_kind_api_version_and_name():
    files = k8s_files()
    assert {f.name for f in files} >= {"raycluster.yaml", "rayjob-atlas.yaml", "cronjob-nightly-atlas.yaml"}
    for path in files:
        for doc in documents(path):
            assert doc["kind"] in API_VERSIONS, f"{path.name}: unexpected kind {doc['kind']}"
            assert doc["apiVersion"] == API_VERSIONS[doc["kind"]], path.name
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), path.name


@pytest.mark.parametrize("path", ["kuberay/raycluster.yaml", "kuberay/rayjob-atlas.yaml"])
def test_ray_clusters_have_a_gpu_worker_group_the_ports_and_the_token(path):
    [resource] = [d for d in documents(DEPLOY / path) if d["kind"] in ("RayCluster", "RayJob")]
    spec = resource["spec"] if resource["kind"] == "RayCluster" else resource["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} == {6379, 8265, 10001}
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
    ]
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        container = group["template"]["spec"]["containers"][0]
        assert container["image"].endswith(":cuda")
        assert group["rayStartParams"]["num-gpus"] == container["resources"]["limits"]["nvidia.com/gpu"]
    for container in ray_containers(spec):
        variables = env(container)
        assert variables["RAY_AUTH_MODE"] == "token", container["name"]
        assert variables["RAY_AUTH_TOKEN"]["secretKeyRef"] == {
            "name": "zfatlas-ray-token",
            "key": "auth_token",
        }


def test_the_rayjob_runs_zfatlas_run_on_a_valid_spec_mounted_in_the_head():
    path = DEPLOY / "kuberay" / "rayjob-atlas.yaml"
    [job] = by_kind(path, "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["zfatlas", "run"]
    args = build_parser().parse_args(argv[1:])  # the real CLI accepts it
    pod = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    spec = load_spec(configmap_spec(path, args.spec, pod, pod["containers"][0]))
    assert spec.kind == "atlas" and spec.output.startswith("s3://")
    assert env(job["spec"]["submitterPodTemplate"]["spec"]["containers"][0])["RAY_AUTH_MODE"] == "token"


def test_the_cronjob_submits_a_valid_spec_nightly_in_a_real_time_zone():
    path = DEPLOY / "kubernetes" / "cronjob-nightly-atlas.yaml"
    [cron] = by_kind(path, "CronJob")
    check_cron(cron["spec"]["schedule"])
    zone(cron["spec"]["timeZone"])
    assert cron["spec"]["concurrencyPolicy"] in ("Forbid", "Replace", "Allow")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["/bin/sh", "-c"]
    argv = shlex.split(container["args"][0].replace("$(date -u +%Y%m%d)", "20260105"))
    assert argv[:3] == ["exec", "zfatlas", "submit"]
    args = build_parser().parse_args(argv[2:])
    assert args.wait and args.address == "http://zfatlas-head-svc:8265"
    spec = load_spec(configmap_spec(path, args.spec, pod, container), args.overrides)
    assert spec.run_id == "atlas-nightly-20260105"
    assert env(container)["RAY_AUTH_MODE"] == "token"


def test_the_scheduler_deployment_serves_with_a_token_on_a_volume():
    path = DEPLOY / "kubernetes" / "scheduler.yaml"
    [deployment] = by_kind(path, "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(container["command"][1:])
    assert (args.scheduler_command, args.port) == ("serve", 8001)
    variables = env(container)
    assert variables["ZFATLAS_API_TOKEN"]["secretKeyRef"]["name"] == "zfatlas-api-token"  # non-loopback bind
    assert variables["ZFATLAS_SCHEDULER_DB"].startswith(container["volumeMounts"][0]["mountPath"] + "/")
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    # The probe and the in-cluster clients pass the Host check (a foreign Host is answered 400).
    settings = Settings(host="0.0.0.0", token="t" * 32, allowed_hosts=variables["ZFATLAS_API_ALLOWED_HOSTS"])
    [probe_host] = container["readinessProbe"]["httpGet"]["httpHeaders"]
    assert probe_host["name"] == "Host" and settings.host_allowed(probe_host["value"])
    assert settings.host_allowed("zfatlas-scheduler.default.svc:8001")
    assert not settings.host_allowed("attacker.example.org")


def test_the_cluster_launcher_config_matches_rays_schema_and_enables_token_auth():
    config = yaml.safe_load((DEPLOY / "ray-cluster.aws.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    gpu = config["available_node_types"]["gpu_worker"]
    assert (
        gpu["docker"]["worker_image"].endswith(":cuda")
        and "--gpus all" in gpu["docker"]["worker_run_options"]
    )
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token ray start" in command
    assert "~/.ray/auth_token" in config["file_mounts"]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    logical = re.sub(r"\\\n", " ", text)
    out = []
    for line in logical.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_stages_pins_and_entrypoint():
    instructions = dockerfile_instructions((DEPLOY / "Dockerfile").read_text())
    assert instructions[0][0] in ("ARG", "FROM")
    stages = {}
    for word, rest in instructions:
        if word == "FROM":
            image, _, name = rest.partition(" AS ")
            stages[name.strip()] = image.strip()
    # VARIANT picks torch-cpu or torch-cuda; both exist, and the default is cpu.
    assert stages["app"] == "torch-${VARIANT}" and {"torch-cpu", "torch-cuda"} <= set(stages)
    assert ("ARG", "VARIANT=cpu") in instructions
    # torch is installed at the versions pyproject.toml pins.
    torch_pins = set(re.findall(r'"((?:torch|torchvision)==[^"]+)"', (ROOT / "pyproject.toml").read_text()))
    assert len(torch_pins) == 2
    installs = [rest for word, rest in instructions if word == "RUN" and "torch==" in rest]
    assert len(installs) == 2 and all(torch_pins <= set(rest.split()) for rest in installs)
    assert any("whl/cu" in rest for rest in installs) and any("whl/cpu" in rest for rest in installs)
    # Everything COPYed exists; the image runs as a non-root user; exec-form entrypoint.
    for word, rest in instructions:
        if word == "COPY":
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), source
    assert ("USER", "ray") in instructions
    [entrypoint] = [json.loads(rest) for word, rest in instructions if word == "ENTRYPOINT"]
    assert entrypoint[0] == "/usr/bin/tini"
    [cmd] = [json.loads(rest) for word, rest in instructions if word == "CMD"]
    assert cmd[0] == "zfatlas"
    exposed = {int(p) for word, rest in instructions if word == "EXPOSE" for p in rest.split()}
    assert exposed == {6379, 8265, 10001, 8000, 8001}
