"""deploy/: what can be checked without a container daemon or Kubernetes. The cluster-launcher YAMLs
pass Ray's own config preparation and schema validation (as `ray up` does them); the KubeRay manifests
validate against KubeRay v1.7.0's CRD schemas and their RayJob's command is a valid `sacfleet train`;
the image's entry point runs sacfleet or any other command; the Dockerfile copies what exists."""

import copy
import gzip
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from sacfleet.cli import _parser
from sacfleet.common.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RAY_VERSION = next(line.split("==")[1].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()
                   if line.startswith("ray=="))


# ------------------------------------------------------------------------------- cluster launcher

def launcher_config(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.mark.parametrize("name", ["cluster-aws.yaml", "cluster-onprem.yaml"])
def test_cluster_launcher_yaml_passes_rays_own_validation(name):
    config = launcher_config(name)
    prepared = prepare_config(config)  # what `ray up` does before it validates: defaults, node types
    validate_config(prepared)
    # Ray's AWS defaults install a nightly Ray in setup_commands: ours must replace them, as the
    # image holds the pinned set.
    assert prepared["setup_commands"] == [] and prepared["worker_setup_commands"] == []
    images = [prepared["docker"]["image"]] + [t.get("docker", {}).get("worker_image")
                                              for t in prepared["available_node_types"].values()]
    assert all(i is None or i.rsplit(":", 1)[0].endswith("/sacfleet") for i in images), images
    starts = " ".join(prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"])
    assert "ray start --head" in starts and "ray start --address=$RAY_HEAD_IP:6379" in starts


def test_the_aws_cluster_has_a_light_head_cpu_workers_and_one_gpu_worker():
    prepared = prepare_config(launcher_config("cluster-aws.yaml"))
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == gpu[0]["max_workers"] == 1
    assert gpu[0]["docker"]["worker_image"].endswith("-cuda")
    assert sum(t.get("min_workers", 0) for t in types.values()) <= prepared["max_workers"]


@pytest.mark.parametrize("break_it", [
    lambda c: c["docker"].update(imagee="typo"),  # an unknown key
    lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"),  # a required one missing
    lambda c: c["available_node_types"]["cpu_worker"]["resources"].update(CPU="32"),  # a wrong type
    lambda c: c.update(max_workers=1),  # fewer than the node types' min_workers
])
def test_rays_validation_would_catch_a_broken_launcher_yaml(break_it):
    config = launcher_config("cluster-aws.yaml")
    break_it(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(config))


# ----------------------------------------------------------------------------------------- KubeRay

def kuberay_schemas() -> dict:
    return json.loads(gzip.decompress((ROOT / "tests" / "data" / "kuberay-v1.7.0-schemas.json.gz").read_bytes()))


def manifests(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / "kuberay" / name).read_text()) if doc]


def cluster_specs(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def pod_specs(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_validate_against_the_crd_schema(name):
    schemas = kuberay_schemas()
    ray_docs = [doc for doc in manifests(name) if doc["apiVersion"] == "ray.io/v1"]
    assert ray_docs, name
    for doc in ray_docs:
        jsonschema.validate(doc, schemas[doc["kind"]])
        spec = cluster_specs(doc)
        assert spec["rayVersion"] == RAY_VERSION  # the image's pinned Ray
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        for pod in pod_specs(spec):
            for container in pod["containers"]:
                assert container["image"].rsplit(":", 1)[0].endswith("/sacfleet"), container
        gpu_groups = [g for g in spec["workerGroupSpecs"]
                      if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
        assert len(gpu_groups) == 1 and gpu_groups[0]["template"]["spec"]["containers"][0]["image"].endswith("-cuda")


@pytest.mark.parametrize("break_it", [
    lambda spec: spec["workerGroupSpecs"][0].pop("groupName"),  # required by the CRD
    lambda spec: spec["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),  # params are strings
    lambda spec: spec["workerGroupSpecs"][0].update(replicas="two"),
])
def test_the_schema_would_catch_a_broken_manifest(break_it):
    doc = copy.deepcopy(manifests("raycluster.yaml")[0])
    break_it(cluster_specs(doc))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, kuberay_schemas()["RayCluster"])


def test_the_rayjob_runs_a_valid_sacfleet_train_into_a_persistent_volume():
    docs = manifests("rayjob.yaml")
    job = next(doc for doc in docs if doc["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "sacfleet"
    args = _parser().parse_args(argv[1:])
    assert args.command == "train" and args.address == "auto"
    load_config(args.config, args.overrides)  # every --set key and value is valid
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = head["containers"][0]["volumeMounts"][0]
    assert str(args.run_dir).startswith(mount["mountPath"] + "/")
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    claim = next(doc for doc in docs if doc["kind"] == "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True


# ------------------------------------------------------------------------------------------- image

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    lines, joined = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not joined and (not line or line.startswith("#")):
            continue
        joined += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            lines.append(joined.strip())
            joined = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_the_dockerfile_copies_what_exists_and_installs_the_pinned_set():
    instructions = dockerfile_instructions()
    assert instructions[0][0] in ("ARG", "FROM") and any(op == "FROM" for op, _ in instructions)
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for op, args in instructions:
        if op == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert not any(source == i or source.startswith(i + "/") for i in ignored), source
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert runs.count("-c constraints.txt") == 2 and "--index-url \"${TORCH_INDEX}\"" in runs
    entry = dict(instructions)["ENTRYPOINT"]
    assert json.loads(entry) == ["docker-entrypoint.sh"]


def test_the_entry_point_runs_sacfleet_or_the_command_given():
    script = DEPLOY / "docker-entrypoint.sh"
    assert os.access(script, os.X_OK) and os.access(DEPLOY / "local_cluster.sh", os.X_OK)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    help_ = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert help_.returncode == 0 and "usage: sacfleet" in help_.stdout
    train = subprocess.run([str(script), "train", "--config", "no-such-preset"], capture_output=True, text=True,
                           env=env, timeout=60)
    assert train.returncode == 2 and "neither a preset" in train.stderr  # sacfleet train answered
    other = subprocess.run([str(script), "sh", "-c", "echo ran $0", "as-given"], capture_output=True, text=True,
                           env=env, timeout=60)
    assert other.returncode == 0 and other.stdout.strip() == "ran as-given"
