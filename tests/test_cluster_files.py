"""The cluster, Kubernetes and Docker definitions parse and carry what they must."""

import json
import os
import re

import ray
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _yaml(*parts):
    with open(os.path.join(REPO, *parts)) as f:
        return list(yaml.safe_load_all(f))


def test_cluster_launcher_yaml_is_valid_against_the_installed_ray_schema():
    import jsonschema

    schema_path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    schema = json.load(open(schema_path))
    (cfg,) = _yaml("cluster", "aws-gpu.yaml")
    jsonschema.validate(cfg, schema)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    gpu = cfg["available_node_types"]["ray.worker.gpu"]
    assert gpu["min_workers"] <= gpu["max_workers"] <= cfg["max_workers"]
    assert any("shm-size" in o for o in cfg["docker"]["run_options"])
    typo = dict(cfg, max_workerz=1)  # the schema does reject what it does not know
    try:
        jsonschema.validate(typo, schema)
        raise AssertionError("a misspelt key passed the schema")
    except jsonschema.ValidationError:
        pass


def _pinned(package: str) -> SpecifierSet:
    """The versions pyproject.toml allows of `package`: the one place a release is named."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    (requirement,) = [r for r in map(Requirement, dependencies) if r.name == package]
    return requirement.specifier


def _containers(spec):
    return [c for c in spec["template"]["spec"]["containers"]]


def test_kuberay_manifests_have_gpus_token_auth_matching_ray_and_the_mlflow_uri():
    (cluster,) = _yaml("cluster", "kuberay", "raycluster.yaml")
    (job,) = _yaml("cluster", "kuberay", "rayjob.yaml")
    for kind, spec in [("RayCluster", cluster["spec"]), ("RayJob", job["spec"]["rayClusterSpec"])]:
        assert Version(spec["rayVersion"]) in _pinned("ray"), kind
        assert spec["authOptions"]["mode"] == "token", kind
        for group in spec["workerGroupSpecs"]:
            for c in _containers(group):
                assert c["resources"]["limits"]["nvidia.com/gpu"] == "1", kind
    assert cluster["kind"] == "RayCluster" and job["kind"] == "RayJob"
    env = {e["name"]: e["value"] for c in _containers(cluster["spec"]["headGroupSpec"]) for e in c["env"]}
    assert env["MLFLOW_TRACKING_URI"].startswith("http://mlflow")
    runtime = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http://mlflow")
    assert job["spec"]["entrypoint"].startswith("mtml ")
    config = job["spec"]["entrypoint"].split("--config ")[1].split()[0]
    assert os.path.exists(os.path.join(REPO, config))


def test_mlflow_server_manifest_uses_postgres_and_an_object_store():
    deployment, service = _yaml("cluster", "mlflow-server.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = " ".join(container["args"])
    assert "--backend-store-uri" in command and "--artifacts-destination s3://" in command
    assert "postgresql://" in open(os.path.join(REPO, "cluster", "mlflow-server.yaml")).read()
    assert service["spec"]["ports"][0]["port"] == 5000


def test_docker_images_pin_our_ray_version_and_copy_only_what_exists():
    for name, flavour in [("Dockerfile.gpu", "gpu"), ("Dockerfile.cpu", "cpu")]:
        text = open(os.path.join(REPO, "docker", name)).read()
        (tag,) = re.findall(rf"^FROM rayproject/ray:([0-9.]+)-py311-{flavour}$", text, re.M)
        assert Version(tag) in _pinned("ray"), name
        for line in re.findall(r"^COPY (.+)$", text, re.M):
            sources = [p for p in line.split()[:-1] if not p.startswith("--")]
            for source in sources:
                assert os.path.exists(os.path.join(REPO, source)), (name, source)
    (compose,) = _yaml("docker", "compose.yaml")
    assert {"mlflow", "ray-head", "ray-worker"} <= set(compose["services"])
    for service in compose["services"].values():
        build = service["build"]
        assert os.path.exists(os.path.join(REPO, "docker", build["context"], build["dockerfile"]))


def test_runtime_env_ships_the_repo_and_the_tracking_uri():
    (env,) = _yaml("jobs", "runtime_env.yaml")
    assert env["working_dir"] == "." and "MLFLOW_TRACKING_URI" in env["env_vars"]
