"""The cluster launch configs (cluster/) are valid for the installed Ray and keep auth on.

No Ray is started and no cloud is called: the launcher configs go through the same offline
steps `ray up` runs before touching a cloud (defaults merged, then the JSON schema shipped
with Ray), and the KubeRay manifests are checked field by field.
"""

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER_CONFIGS = {"aws": CLUSTER / "aws.yaml", "gcp": CLUSTER / "gcp.yaml"}
AWS_GPU_FAMILIES = ("g4dn", "g5", "g6", "g6e", "p3", "p4d", "p4de", "p5")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def validate(config: dict) -> dict:
    """What `ray up` does offline: merge the provider defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def torch_pins() -> list[str]:
    """The lock's torch and torchvision: installed first, by name, on every node (the rest
    of the lock applies through `-c constraints.txt`)."""
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = [line.strip() for line in lines if line.startswith(("torch==", "torchvision=="))]
    assert len(pins) == 2, pins
    return pins


def rayjob() -> dict:
    docs = yaml.safe_load_all((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    (job,) = [d for d in docs if d and d.get("kind") == "RayJob"]
    return job


def pod_specs(job: dict) -> dict:
    spec = job["spec"]["rayClusterSpec"]
    groups = {"head": spec["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in spec["workerGroupSpecs"]})
    return {name: g["template"]["spec"] for name, g in groups.items()}


@pytest.mark.parametrize("provider", sorted(LAUNCHER_CONFIGS))
def test_launcher_config_passes_rays_own_validation(provider):
    config = load(LAUNCHER_CONFIGS[provider])
    prepared = validate(config)
    assert prepared["provider"]["type"] == provider


@pytest.mark.parametrize("provider", sorted(LAUNCHER_CONFIGS))
def test_validation_rejects_a_misspelt_key(provider):
    config = load(LAUNCHER_CONFIGS[provider])
    config["max_wokers"] = 8
    with pytest.raises(jsonschema.ValidationError, match="max_wokers"):
        validate(config)


def test_validation_rejects_a_node_type_without_resources():
    config = load(LAUNCHER_CONFIGS["aws"])
    del config["available_node_types"]["ray.worker.gpu"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        validate(config)


@pytest.mark.parametrize("provider", sorted(LAUNCHER_CONFIGS))
def test_launcher_config_autoscales_gpu_workers_from_zero(provider):
    config = load(LAUNCHER_CONFIGS[provider])
    workers = {
        name: t
        for name, t in config["available_node_types"].items()
        if name != config["head_node_type"]
    }

    def has_gpu(node_type):
        node = node_type["node_config"]
        family = node.get("InstanceType", "").split(".")[0]
        return (
            node_type["resources"].get("GPU", 0) >= 1
            or family in AWS_GPU_FAMILIES
            or bool(node.get("guestAccelerators"))
        )

    gpu_workers = [t for t in workers.values() if has_gpu(t)]
    assert gpu_workers, f"{provider}: no worker node type has a GPU"
    assert all(t.get("min_workers", 0) == 0 and t["max_workers"] >= 1 for t in gpu_workers)
    assert config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("provider", sorted(LAUNCHER_CONFIGS))
def test_every_node_installs_raysoup_with_the_pinned_torch(provider):
    config = load(LAUNCHER_CONFIGS[provider])
    setup = "\n".join(config["setup_commands"])
    assert config["file_mounts"]["~/raysoup"] == "."
    for pin in torch_pins():
        assert pin in setup, f"{provider}: setup_commands do not install {pin}"
    assert re.search(
        r"pip install -c ~/raysoup/constraints\.txt .*~/raysoup\s*$", setup, re.MULTILINE
    )
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"


@pytest.mark.parametrize("provider", sorted(LAUNCHER_CONFIGS))
def test_launcher_config_keeps_token_auth_and_a_local_dashboard(provider):
    config = load(LAUNCHER_CONFIGS[provider])
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    for start in (head, worker):
        assert "export RAY_AUTH_MODE=token" in start
    assert "--dashboard-host=127.0.0.1" in head
    # Workers get the same token as the head and the user: the one generated locally.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_rayjob_runs_raysoup_on_gpu_workers_with_shared_storage_and_token_auth():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert "raysoup run" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True

    claims = {
        d["metadata"]["name"]: d
        for d in yaml.safe_load_all((CLUSTER / "kuberay" / "shared-pvc.yaml").read_text())
        if d and d.get("kind") == "PersistentVolumeClaim"
    }
    for name, pod in pod_specs(job).items():
        (container,) = pod["containers"]
        assert container["image"], name
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        shared = [n for n, path in mounts.items() if path == "/mnt/shared"]
        assert shared, f"{name}: /mnt/shared not mounted"
        claim = volumes[shared[0]]["persistentVolumeClaim"]["claimName"]
        assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"]

    (worker,) = cluster["workerGroupSpecs"]
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert worker["minReplicas"] == 0 < worker["maxReplicas"]


def test_every_kuberay_manifest_parses():
    paths = sorted((CLUSTER / "kuberay").glob("*.yaml"))
    assert paths
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs and all("apiVersion" in d and "kind" in d for d in docs), path


def test_dockerfile_builds_on_the_installed_ray_with_the_torch_pins():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile
    for pin in torch_pins():
        assert pin in dockerfile
    assert "-c constraints.txt" in dockerfile  # the whole lock


def test_nothing_turns_token_auth_off():
    files = [
        *CLUSTER.glob("*.yaml"),
        *CLUSTER.glob("kuberay/*"),
        CLUSTER / "Dockerfile",
        ROOT / "README.md",
        *(ROOT / "docs").glob("*.md"),
    ]
    assert ROOT / "docs" / "cluster.md" in files  # the cluster guide's commands are checked too
    # RAY_AUTH_MODE=disabled, an env entry `name: RAY_AUTH_MODE / value: disabled`, or
    # KubeRay's `authOptions: {mode: disabled}`.
    off = re.compile(
        r"RAY_AUTH_MODE[\s\"'=:]*(value[\s\"':]*)?disabled|mode:\s*[\"']?disabled", re.IGNORECASE
    )
    for path in files:
        assert not off.search(path.read_text()), f"{path} turns token authentication off"
