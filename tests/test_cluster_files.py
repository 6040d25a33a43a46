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
    env = {e["name"]: e.get("value", e.get("valueFrom")) for c in _containers(cluster["spec"]["headGroupSpec"])
           for e in c["env"]}
    assert env["MLFLOW_TRACKING_URI"].startswith("http://mlflow")
    for login in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # from a secret, never written here
        assert env[login]["secretKeyRef"]["name"] == "mlflow-user"
    runtime = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http://mlflow")
    assert job["spec"]["entrypoint"].startswith("mtml ")
    config = job["spec"]["entrypoint"].split("--config ")[1].split()[0]
    assert os.path.exists(os.path.join(REPO, config))


def test_team_servers_run_the_one_server_script_on_postgres_with_secrets_only():
    """The cluster manifest and the compose file both start docker/mlflow-server.sh (the one the
    tests start for real) on PostgreSQL, with no password written in them and none installed at start."""
    deployment, service = _yaml("cluster", "mlflow-server.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["docker/mlflow-server.sh"] and service["spec"]["ports"][0]["port"] == 5000
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["MLFLOW_ARTIFACTS"].startswith("s3://")
    for key in ("MLFLOW_DB_URI", "MLFLOW_AUTH_DB_URI", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[key], key
    (compose,) = _yaml("docker", "compose.yaml")
    mlflow, postgres = compose["services"]["mlflow"], compose["services"]["postgres"]
    assert mlflow["command"].split()[0] == "docker/mlflow-server.sh"
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy" and "healthcheck" in postgres
    assert mlflow["environment"]["MLFLOW_DB_URI"].startswith("postgresql://")
    for value in [*mlflow["environment"].values(), *postgres["environment"].values()]:
        secrets = re.findall(r"\$\{(\w+)(:\?[^}]*)?\}", str(value))
        assert all(required for _, required in secrets), value  # ${VAR:?...}: no default password
    for text in (open(os.path.join(REPO, "cluster", "mlflow-server.yaml")).read(),
                 open(os.path.join(REPO, "docker", "compose.yaml")).read()):
        assert "pip install" not in text
    assert "tracking-server" in open(os.path.join(REPO, "docker", "Dockerfile.cpu")).read()


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
    assert {"postgres", "mlflow", "ray-head", "ray-worker"} <= set(compose["services"])
    for service in compose["services"].values():
        if "build" not in service:  # postgres: its own image
            continue
        build = service["build"]
        assert os.path.exists(os.path.join(REPO, "docker", build["context"], build["dockerfile"]))


def test_runtime_env_ships_the_repo_and_the_tracking_uri():
    (env,) = _yaml("jobs", "runtime_env.yaml")
    assert env["working_dir"] == "." and "MLFLOW_TRACKING_URI" in env["env_vars"]
