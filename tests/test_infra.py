"""infra/ as its tools read it, offline: the `ray up` configs against the schema Ray ships,
the Kubernetes manifests against Kubernetes' schemas (kubernetes-validate) and KubeRay's
field lists, the DeepSpeed presets in DeepSpeed's config parser, the compose file against
the operations guide, and the guide against the files it names."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_spec
from pipeline.presets import deepspeed_presets, node_fields

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
GUIDE = (INFRA / "README.md").read_text(encoding="utf-8")
K8S_VERSION = "1.33.0"  # the oldest Kubernetes these manifests target (CronJob.timeZone is GA)


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


# --------------------------------------------------------------------------- ray up

RAY_CONFIGS = sorted((INFRA / "ray").glob("*.yaml"))


def ray_schema() -> dict[str, Any]:
    path = Path(str(metadata.distribution("ray").locate_file("ray/autoscaler/ray-schema.json")))
    return json.loads(path.read_text(encoding="utf-8"))


def test_there_is_a_ray_config_per_cloud():
    providers = {yaml.safe_load(p.read_text())["provider"]["type"] for p in RAY_CONFIGS}
    assert providers == {"aws", "gcp"}


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_ray_config_validates_against_rays_schema(path):
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, ray_schema())  # raises with the offending path
    # and what `ray up` does before it calls the cloud: fill in the provider's defaults, check
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def test_rays_schema_is_strict_enough_to_catch_a_typo():
    config = yaml.safe_load(RAY_CONFIGS[0].read_text())
    config["head_start_ray_command"] = config.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_schema())


def start_commands(config: dict[str, Any], key: str) -> list[str]:
    return [c for c in config[key] if "ray start" in c]


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_every_ray_node_starts_with_token_auth_and_a_local_dashboard(path):
    config = yaml.safe_load(path.read_text())
    head, workers = (
        start_commands(config, k) for k in ("head_start_ray_commands", "worker_start_ray_commands")
    )
    assert head and workers
    for command in head + workers:
        assert "RAY_AUTH_MODE=token" in command
        assert "RAY_AUTH_TOKEN_PATH=/run/secrets/ray_auth_token" in command
        assert "0.0.0.0" not in command
    (head_command,) = head
    assert "--dashboard-host 127.0.0.1" in head_command
    # the same settings on the container, so `ray status` and every job authenticate too
    options = config["docker"]["run_options"]
    assert "-e RAY_AUTH_MODE=token" in options
    assert "-e RAY_AUTH_TOKEN_PATH=/run/secrets/ray_auth_token" in options
    mounts = [o.split()[1] for o in options if o.startswith("-v ")]
    (token_mount,) = [m for m in mounts if m.endswith(":/run/secrets/ray_auth_token:ro")]
    host_file = token_mount.split(":")[0]
    # ... and the mounted file is written on each node from the cloud's secret manager
    writers = [c for c in config["initialization_commands"] if host_file in c]
    assert len(writers) == 1
    assert re.search(r"secretsmanager get-secret-value|gcloud secrets versions access", writers[0])
    assert "set -o pipefail" in writers[0]  # a failed fetch must not leave an empty token


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_ray_configs_hold_no_secret(path):
    text = path.read_text()
    assert not re.search(r"RAY_AUTH_TOKEN=\S", text)
    assert not re.search(r"(?i)(password|secret_key|aws_secret)\s*[:=]\s*\S", text)


def test_aws_security_group_opens_nothing_beyond_rays_ssh_and_intra_cluster_rules():
    config = yaml.safe_load((INFRA / "ray" / "aws-gpu.yaml").read_text())
    assert config["provider"]["security_group"]["IpPermissions"] == []
    assert all(
        "SecurityGroupIds" not in t["node_config"] for t in config["available_node_types"].values()
    )


def test_gcp_nodes_carry_the_tag_the_documented_firewall_rules_select():
    config = yaml.safe_load((INFRA / "ray" / "gcp-gpu.yaml").read_text())
    for node_type in config["available_node_types"].values():
        assert node_type["node_config"]["tags"]["items"] == ["attnpipe-ray"]
    rules = re.findall(r"firewall-rules create (\S+).*?--target-tags=(\S+)", GUIDE, re.S)
    assert {name for name, tag in rules if tag == "attnpipe-ray"} == {
        "attnpipe-allow-ssh",
        "attnpipe-allow-internal",
    }
    assert "--allow=tcp:22 --source-ranges" in GUIDE


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_ray_config_has_gpu_workers_shared_storage_and_the_training_image(path):
    config = yaml.safe_load(path.read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types)
    assert sum(t["max_workers"] for t in gpu_types) <= config["max_workers"]
    assert "-v /mnt/attnpipe:/mnt/attnpipe" in config["docker"]["run_options"]
    assert any(
        "mount -t nfs" in c and "/mnt/attnpipe" in c for c in config["initialization_commands"]
    )
    assert config["docker"]["image"].endswith("/attnpipe-train:0.1.0")


SSM_AMI = (
    "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
)


def test_aws_nodes_boot_one_pinned_gpu_ami_not_rays_latest_dlami():
    path = INFRA / "ray" / "aws-gpu.yaml"
    config = yaml.safe_load(path.read_text())
    images = {t["node_config"]["ImageId"] for t in config["available_node_types"].values()}
    (image,) = images  # every node the same AMI, so the same NVIDIA driver
    assert re.fullmatch(r"ami-[0-9a-f]{17}", image), image
    # Ray 2.60 swaps `latest_dlami` (or no ImageId) for its fixed Ubuntu 18.04 Deep Learning
    # AMI of the region; a pinned id goes to EC2 as written
    from ray.autoscaler._private.aws.config import DEFAULT_AMI, _check_ami

    checked = json.loads(json.dumps(config))
    _check_ami(checked)
    assert checked["available_node_types"] == config["available_node_types"]
    assert image not in DEFAULT_AMI.values()
    # the config and the guide say how to resolve the current id
    assert SSM_AMI in path.read_text() and SSM_AMI in GUIDE
    table = GUIDE.split("| placeholder | where | what |", 1)[1].split("\n\n", 1)[0]
    assert f"`{image}`" in table


# --------------------------------------------------------------------------- Kubernetes

K8S_FILES = sorted(
    p
    for p in [*(INFRA / "kuberay").glob("*.yaml"), *(INFRA / "mlflow" / "k8s").glob("*.yaml")]
    if p.name != "operator-values.yaml"  # Helm values, not a manifest
)
MANIFESTS = [(p, d) for p in K8S_FILES for d in load_all(p)]
CORE = [(p, d) for p, d in MANIFESTS if not d["apiVersion"].startswith("ray.io/")]
KUBERAY = [(p, d) for p, d in MANIFESTS if d["apiVersion"].startswith("ray.io/")]


def manifest_id(item: tuple[Path, dict[str, Any]]) -> str:
    path, doc = item
    meta = doc["metadata"]
    return f"{path.name}:{doc['kind']}/{meta.get('name') or meta.get('generateName')}"


def validate_core(doc: dict[str, Any]) -> None:
    """Kubernetes' own schema, strict: an unknown key anywhere is an error."""
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("item", CORE, ids=manifest_id)
def test_core_kinds_validate_against_kubernetes_schemas(item):
    validate_core(item[1])


def test_kubernetes_validation_is_offline_and_strict():
    deployment = next(d for _, d in CORE if d["kind"] == "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(broken)


# KubeRay's field names, ray.io/v1, as of KubeRay 1.6, from ray-project/kuberay:
# ray-operator/config/crd/bases/ray.io_raycronjobs.yaml (the v1.6 CRD, which embeds RayJobSpec
# in spec.jobTemplate and RayClusterSpec in spec.jobTemplate.rayClusterSpec) and
# ray-operator/apis/ray/v1/raycluster_types.go (HeadGroupSpec, WorkerGroupSpec,
# AutoscalerOptions). A dict maps each allowed key to what is below it: None for a value or a
# free-form map, POD for a core PodTemplateSpec (checked against Kubernetes' own schema), a
# one-item list for a list of such objects.
POD = "PodTemplateSpec"


def leaves(names: str) -> dict[str, Any]:
    return dict.fromkeys(names.split())


AUTOSCALER_OPTIONS = leaves(
    "env envFrom idleTimeoutSeconds image imagePullPolicy resources securityContext "
    "upscalingMode volumeMounts"
)
HEAD_GROUP_SPEC = {
    "template": POD,
    **leaves("headService enableIngress rayStartParams serviceType"),
}
WORKER_GROUP_SPEC = {
    "template": POD,
    **leaves(
        "groupName replicas minReplicas maxReplicas idleTimeoutSeconds rayStartParams "
        "scaleStrategy numOfHosts suspend"
    ),
}
RAY_CLUSTER_SPEC = {
    "authOptions": leaves("mode"),
    "autoscalerOptions": AUTOSCALER_OPTIONS,
    "headGroupSpec": HEAD_GROUP_SPEC,
    "workerGroupSpecs": [WORKER_GROUP_SPEC],
    **leaves(
        "enableInTreeAutoscaling gcsFaultToleranceOptions headServiceAnnotations managedBy "
        "rayVersion suspend"
    ),
}
RAY_JOB_SPEC = {
    "rayClusterSpec": RAY_CLUSTER_SPEC,
    "submitterPodTemplate": POD,
    **leaves(
        "activeDeadlineSeconds backoffLimit clusterSelector deletionStrategy entrypoint "
        "entrypointNumCpus entrypointNumGpus entrypointResources jobId managedBy metadata "
        "runtimeEnvYAML shutdownAfterJobFinishes submissionMode submitterConfig suspend "
        "ttlSecondsAfterFinished"
    ),
}
RAY_CRON_JOB_SPEC = {"jobTemplate": RAY_JOB_SPEC, **leaves("schedule suspend")}
KUBERAY_SPECS = {
    "RayCluster": RAY_CLUSTER_SPEC,
    "RayJob": RAY_JOB_SPEC,
    "RayCronJob": RAY_CRON_JOB_SPEC,
}
# required by the CRDs (`required:` lists)
REQUIRED = {
    "RayCronJob": {"": {"jobTemplate", "schedule"}},
    "RayCluster": {"": {"headGroupSpec"}},
}
WORKER_REQUIRED = {"groupName", "maxReplicas", "minReplicas", "template"}


def field_errors(value: Any, tree: Any, path: str) -> list[str]:
    """Every key in `value` that `tree` does not allow, as YAML paths; pod templates are
    validated against Kubernetes' PodTemplate schema."""
    if tree is None:
        return []
    if tree == POD:
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
        try:
            validate_core({**wrapped, "template": value})
        except kubernetes_validate.ValidationError as exc:
            return [f"{path}.{'.'.join(map(str, list(exc.path)[1:]))}: {exc.message}"]
        return []
    if isinstance(tree, list):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [
            e for i, item in enumerate(value) for e in field_errors(item, tree[0], f"{path}[{i}]")
        ]
    if not isinstance(value, dict):
        return [f"{path}: expected a mapping"]
    errors = [
        f"{path}.{key}: not a field of this KubeRay object" for key in value if key not in tree
    ]
    for key, child in value.items():
        if key in tree:
            errors += field_errors(child, tree[key], f"{path}.{key}")
    return errors


def kuberay_errors(doc: dict[str, Any]) -> list[str]:
    kind = doc["kind"]
    errors = [
        f"{k}: not a top-level field"
        for k in doc
        if k not in ("apiVersion", "kind", "metadata", "spec")
    ]
    errors += field_errors(doc["spec"], KUBERAY_SPECS[kind], "spec")
    errors += [
        f"spec.{k}: required" for k in REQUIRED.get(kind, {}).get("", set()) - set(doc["spec"])
    ]
    for spec in cluster_specs(doc):
        errors += ["rayClusterSpec.headGroupSpec: required"] * ("headGroupSpec" not in spec)
        for group in spec.get("workerGroupSpecs", []):
            errors += [f"workerGroupSpecs.{k}: required" for k in WORKER_REQUIRED - set(group)]
    if doc["apiVersion"] != "ray.io/v1":
        errors.append(f"apiVersion {doc['apiVersion']!r}: KubeRay serves ray.io/v1")
    return errors


def cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        return [spec]
    if doc["kind"] == "RayJob":
        return [spec["rayClusterSpec"]]
    return [spec["jobTemplate"]["rayClusterSpec"]]


def embedded_rayjobs() -> list[tuple[Path, dict[str, Any]]]:
    """RayJobs kept as text in ConfigMaps (the CronJob fallback's template)."""
    found = []
    for path, doc in CORE:
        if doc["kind"] == "ConfigMap":
            for text in doc.get("data", {}).values():
                if re.search(r"^kind: RayJob$", text, re.M):
                    found.append((path, yaml.safe_load(text)))
    return found


@pytest.mark.parametrize("item", KUBERAY + embedded_rayjobs(), ids=manifest_id)
def test_kuberay_kinds_use_only_fields_their_crds_define(item):
    assert kuberay_errors(item[1]) == []


def test_kuberay_field_check_catches_a_misplaced_key():
    _, cluster = next(i for i in KUBERAY if i[1]["kind"] == "RayCluster")
    broken = json.loads(json.dumps(cluster))
    broken["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    broken["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "x"
    errors = kuberay_errors(broken)
    assert any("workerGroupSpecs[0].maxReplica" in e for e in errors)
    assert any("imagePullPolcy" in e for e in errors)


def test_kuberay_manifests_cover_cluster_job_cron_and_fallback():
    kinds = {d["kind"] for _, d in MANIFESTS}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob"} <= kinds
    cluster = next(d for _, d in KUBERAY if d["kind"] == "RayCluster")
    gpu_groups = [
        g
        for g in cluster["spec"]["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
        if "nvidia.com/gpu" in c["resources"]["limits"]
    ]
    assert gpu_groups


@pytest.mark.parametrize("item", KUBERAY + embedded_rayjobs(), ids=manifest_id)
def test_every_ray_cluster_uses_token_auth_and_stays_inside(item):
    for spec in cluster_specs(item[1]):
        assert spec["authOptions"] == {"mode": "token"}
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"
        assert not head.get("enableIngress", False)
        for group in [head, *spec.get("workerGroupSpecs", [])]:
            for container in group["template"]["spec"]["containers"]:
                # secrets come from Secrets, never as literal values
                for env in container.get("env", []):
                    if re.search("PASSWORD|TOKEN|SECRET|KEY", env["name"]):
                        assert "valueFrom" in env and "value" not in env, env["name"]


def test_nothing_is_published_outside_the_cluster():
    for _, doc in CORE:
        assert doc["kind"] != "Ingress"
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"
    policy = next(d for _, d in CORE if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/node-type": "head"}


def test_raycronjob_runs_the_rayjob_and_needs_the_alpha_feature_gate():
    rayjob = next(d for _, d in KUBERAY if d["kind"] == "RayJob")
    cron = next(d for _, d in KUBERAY if d["kind"] == "RayCronJob")
    assert cron["spec"]["jobTemplate"] == rayjob["spec"]
    assert cron["spec"]["suspend"] is True  # applying it launches nothing by surprise
    gates = yaml.safe_load((INFRA / "kuberay" / "operator-values.yaml").read_text())["featureGates"]
    assert {"name": "RayCronJob", "enabled": True} in gates
    text = (INFRA / "kuberay" / "raycronjob.yaml").read_text()
    for where in (text, GUIDE):
        assert (
            "RayCronJob" in where and "feature gate" in where.lower() and "alpha" in where.lower()
        )


def test_cronjob_fallback_forbids_overlap_and_may_only_create_and_get_rayjobs():
    docs = {d["kind"]: d for d in load_all(INFRA / "kuberay" / "cronjob-fallback.yaml")}
    cron = docs["CronJob"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert docs["Role"]["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}
    ]
    binding = docs["RoleBinding"]
    assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": "attnpipe"}
    ]
    # the pod creates the RayJob kept in the ConfigMap, and waits for it (so Forbid holds
    # for as long as the training runs)
    (script,) = pod["containers"][0]["args"]
    assert "kubectl create -f /templates/rayjob.yaml" in script and "while true" in script
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/templates"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    # the template is rayjob.yaml with a generated name per firing
    ((_, template),) = embedded_rayjobs()
    rayjob = next(d for _, d in KUBERAY if d["kind"] == "RayJob")
    assert template["spec"] == rayjob["spec"]
    assert template["metadata"]["generateName"] and "name" not in template["metadata"]


def test_committed_secrets_are_placeholders():
    secrets = [d for _, d in CORE if d["kind"] == "Secret"]
    assert secrets
    for secret in secrets:
        values = secret.get("stringData", {})
        for key, value in values.items():
            if re.search("PASSWORD|SECRET|KEY|password", key):
                assert value.startswith("change-me"), key
        assert "data" not in secret


# --------------------------------------------------------------------------- MLflow

COMPOSE = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())
ENV_EXAMPLE = dict(
    line.split("=", 1)
    for line in (INFRA / "mlflow" / ".env.example").read_text().splitlines()
    if line and not line.startswith("#")
)


def documented_compose_services() -> set[str]:
    """The services named in the guide's `| compose service | role |` table."""
    table = GUIDE.split("| compose service |", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"^\| `([\w-]+)` \|", table, re.M))


def test_compose_runs_every_service_the_guide_names():
    assert set(COMPOSE["services"]) == documented_compose_services()
    assert {"mlflow", "postgres", "minio"} <= set(COMPOSE["services"])


def mlflow_command() -> list[str]:
    shell = COMPOSE["services"]["mlflow"]["command"]
    assert shell[:2] == ["sh", "-c"]
    return shlex.split(shell[2].replace("$$", "$"))


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_compose_mlflow_server_has_postgres_s3_and_basic_auth():
    argv = mlflow_command()
    assert argv[:3] == ["exec", "mlflow", "server"]
    assert option(argv, "--backend-store-uri").startswith("postgresql://")
    assert "@postgres:5432/" in option(argv, "--backend-store-uri")
    assert option(argv, "--artifacts-destination").startswith("s3://")
    assert option(argv, "--app-name") == "basic-auth"
    assert option(argv, "--host") == "0.0.0.0"  # inside the compose network ...
    mlflow = COMPOSE["services"]["mlflow"]
    assert mlflow["ports"] == ["${MLFLOW_BIND:-127.0.0.1}:5000:5000"]  # ... published locally
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
    assert "./basic_auth.ini:/etc/mlflow/basic_auth.ini:ro" in mlflow["volumes"]
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert mlflow["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    for name, service in COMPOSE["services"].items():
        if name != "mlflow":
            assert "ports" not in service, f"{name} must not be published"


def test_compose_secrets_come_from_an_uncommitted_env_file_with_an_example():
    used = set()
    for service in COMPOSE["services"].values():
        assert service.get("env_file") == ".env"
        for text in map(str, [service.get("command", ""), service.get("healthcheck", "")]):
            used |= set(re.findall(r"\$\$\{?(\w+)", text))
    assert used <= set(ENV_EXAMPLE), used - set(ENV_EXAMPLE)
    for needed in (
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "AWS_SECRET_ACCESS_KEY",
    ):
        assert ENV_EXAMPLE[needed].startswith("change-me")
    assert ".env" in (INFRA / "mlflow" / ".gitignore").read_text().split()
    for name, service in COMPOSE["services"].items():
        for value in (service.get("environment") or {}).values():
            assert not re.search(r"(?i)password|secret", str(value)), name


def mlflow_auth_module(name: str) -> Any:
    import importlib.util

    path = Path(str(metadata.distribution("mlflow").locate_file(f"mlflow/server/auth/{name}.py")))
    spec = importlib.util.spec_from_file_location(f"_attnpipe_test_mlflow_auth_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_basic_auth_config_is_read_by_mlflow_and_holds_no_password(monkeypatch):
    path = INFRA / "mlflow" / "basic_auth.ini"
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    # MLflow's own reader and permission table, loaded by file: the package's __init__ needs
    # Flask-WTF (mlflow[auth]), which the server image has and this environment need not
    config = mlflow_auth_module("config").read_auth_config()
    get_permission = mlflow_auth_module("permissions").get_permission
    assert config.admin_password is None  # from MLFLOW_AUTH_ADMIN_PASSWORD only
    get_permission(config.default_permission)  # a permission MLflow knows
    assert config.database_uri == "sqlite:////var/lib/mlflow-auth/basic_auth.db"
    assert "mlflow-auth:/var/lib/mlflow-auth" in COMPOSE["services"]["mlflow"]["volumes"]


def test_kubernetes_mlflow_matches_compose():
    docs = {
        (d["kind"], d["metadata"]["name"]): d
        for d in load_all(INFRA / "mlflow" / "k8s" / "mlflow.yaml")
    }
    ini = (INFRA / "mlflow" / "basic_auth.ini").read_text()
    assert docs["ConfigMap", "mlflow-auth-config"]["data"]["basic_auth.ini"] == ini
    container = docs["Deployment", "mlflow"]["spec"]["template"]["spec"]["containers"][0]
    argv = container["command"] + container["args"]
    assert argv[:2] == ["mlflow", "server"]
    assert option(argv, "--backend-store-uri").startswith("postgresql://$(POSTGRES_USER):")
    assert option(argv, "--artifacts-destination") == "s3://$(MLFLOW_ARTIFACTS_BUCKET)"
    assert option(argv, "--app-name") == "basic-auth"
    # the Service name the Ray pods use is a Host MLflow accepts
    assert "mlflow.attnpipe.svc.cluster.local:*" in option(argv, "--allowed-hosts").split(",")
    env = {e["name"]: e for e in container["env"]}
    for name in (
        "POSTGRES_PASSWORD",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    ):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-secrets"
    for var in re.findall(r"\$\((\w+)\)", " ".join(argv)):
        assert var in env  # Kubernetes expands $(VAR) only from the container's env
    secret_keys = set(
        next(d for _, d in CORE if d["metadata"]["name"] == "mlflow-secrets")["stringData"]
    )
    assert secret_keys == set(ENV_EXAMPLE) - {"MLFLOW_BIND"}  # one env file feeds both


# --------------------------------------------------------------------------- DeepSpeed

PRESET_FILES = sorted((INFRA / "deepspeed").glob("*.json"), key=lambda p: p.stem)
PACKAGED = ROOT / "pipeline" / "presets" / "deepspeed"


def test_deepspeed_presets_are_the_four_named_and_match_the_packaged_copies():
    assert [p.stem for p in PRESET_FILES] == ["zero1", "zero2", "zero3", "zero3-offload"]
    assert sorted(p.name for p in PACKAGED.glob("*.json")) == sorted(p.name for p in PRESET_FILES)
    for path in PRESET_FILES:
        assert path.read_bytes() == (PACKAGED / path.name).read_bytes(), path.name
    assert set(deepspeed_presets()) == {p.stem for p in PRESET_FILES}


EXPECTED = {
    "zero1": (1, False, False),
    "zero2": (2, False, False),
    "zero3": (3, False, False),
    "zero3-offload": (3, True, True),
}


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_deepspeed_preset_loads_in_deepspeeds_config_parser(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    preset = json.loads(path.read_text())
    batch = {
        "train_batch_size": 16,
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 2,
    }
    # no process group here: DeepSpeedConfig takes a world size of 1
    parsed = DeepSpeedConfig(
        {**preset, **batch, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    )
    stage, offload_optimizer, offload_params = EXPECTED[path.stem]
    assert parsed.zero_optimization_stage == stage
    assert parsed.world_size == 1 and parsed.train_batch_size == 16
    zero = parsed.zero_config
    assert (
        zero.offload_optimizer is not None and zero.offload_optimizer.device == "cpu"
    ) == offload_optimizer
    assert (zero.offload_param is not None and zero.offload_param.device == "cpu") == offload_params
    assert node_fields(preset) == dict(
        zero_stage=stage, offload_optimizer=offload_optimizer, offload_params=offload_params
    )


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_spec_naming_a_preset_builds_a_deepspeed_config_with_exactly_its_zero_settings(name):
    from deepspeed.runtime.config import DeepSpeedConfig

    from pipeline.train.deepspeed_config import deepspeed_config

    spec = load_spec(ROOT / "jobs" / "decoder-tiny.yaml", [f"deepspeed.preset={name}"])
    config = deepspeed_config(spec, world_size=1)
    preset = json.loads((PACKAGED / f"{name}.json").read_text())
    assert config["zero_optimization"] == preset["zero_optimization"]
    assert DeepSpeedConfig(config).zero_optimization_stage == EXPECTED[name][0]


def test_validate_resolves_a_deepspeed_preset():
    result = CliRunner().invoke(
        app,
        [
            "validate",
            "jobs/decoder-tiny.yaml",
            "deepspeed.preset=zero3-offload",
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["deepspeed"] == {
        "preset": "zero3-offload",
        "zero_stage": 3,
        "offload_optimizer": True,
        "offload_params": True,
    }


def test_validate_rejects_an_unknown_deepspeed_preset_in_one_line():
    result = CliRunner().invoke(
        app, ["validate", "jobs/decoder-tiny.yaml", "deepspeed.preset=zero3-ofload"]
    )
    assert result.exit_code == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert "deepspeed.preset: unknown preset 'zero3-ofload'" in line
    assert "did you mean 'zero3-offload'?" in line


def test_job_file_keys_beat_the_deepspeed_preset(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("deepspeed:\n  preset: zero3-offload\n  offload_params: false\n")
    ds = load_spec(path).deepspeed
    assert (ds.zero_stage, ds.offload_optimizer, ds.offload_params) == (3, True, False)


# --------------------------------------------------------------------------- Docker


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


DOCKERFILES = [INFRA / "docker" / "Dockerfile", INFRA / "mlflow" / "Dockerfile"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_pins_its_base_runs_as_a_user_and_holds_no_secret(path):
    steps = instructions(path)
    bases = [args.split()[0] for word, args in steps if word == "FROM"]
    for base in bases:
        name, _, tag = base.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, base
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    for word, args in steps:
        if word in ("ENV", "ARG"):
            assert not re.search(r"(?i)(token|password|secret|access_key)\w*=\S", args), args
        if word in ("COPY", "ADD"):
            assert ".env" not in args.split() and "auth_token" not in args


def test_training_image_is_cuda_with_attnpipe_installed():
    steps = instructions(INFRA / "docker" / "Dockerfile")
    (base,) = [args for word, args in steps if word == "FROM"]
    assert base.startswith("nvidia/cuda:") and "cudnn" in base
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert re.search(r"pip install \. ", runs + " ")  # the project itself, not editable
    assert "attnpipe --help" in runs
    for word, args in steps:
        if word == "COPY":
            *sources, _ = [a for a in args.split() if not a.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), source
    ignored = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", ".env", "attnpipe-work"} <= set(ignored)


def deepspeed_install(steps: list[tuple[str, str]]) -> str:
    (run,) = [args for word, args in steps if word == "RUN" and '"deepspeed==' in args]
    return run


def test_training_image_builds_cpu_adam_ahead_for_any_x86_node():
    steps = instructions(INFRA / "docker" / "Dockerfile")
    run = deepspeed_install(steps)
    install = run.split("&&")[0]
    # compiled at install time, for the accelerator the nodes run (a GPU is not visible to
    # `docker build`, and DeepSpeed JIT-builds an op recorded for another accelerator again)
    for setting in ("DS_BUILD_CPU_ADAM=1", "DS_ACCELERATOR=cuda", "CXX=portable-cxx"):
        assert setting in install.split(), setting
    assert "pip install --no-build-isolation" in install
    # and the build fails unless the op is in the image
    assert "installed_ops['cpu_adam']" in run and "deepspeed.ops.adam.cpu_adam_op" in run
    copies = [args.split() for word, args in steps if word == "COPY"]
    assert ["--chmod=0755", "infra/docker/portable-cxx", "/usr/local/bin/portable-cxx"] in copies
    (base,) = [args for word, args in steps if word == "FROM"]
    assert "-devel-" in base  # nvcc and the CUDA headers for DeepSpeed's CUDA ops
    assert any("ninja-build" in args for word, args in steps if word == "RUN")


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_portable_cxx_compiles_for_avx2_whatever_the_build_machine():
    wrapper = INFRA / "docker" / "portable-cxx"
    # the flags DeepSpeed's CPU op builder passes on an AVX-512 build machine
    result = subprocess.run(
        [str(wrapper), "-march=native", "-D__AVX512__", "-dM", "-E", "-x", "c++", "-"],
        input="",
        capture_output=True,
        text=True,
        check=True,
    )
    macros = set(re.findall(r"#define (\w+)", result.stdout))
    assert {"__AVX2__", "__FMA__", "__AVX256__"} <= macros
    assert not macros & {"__AVX512F__", "__AVX512__"}


def test_guide_says_what_multi_node_nccl_lacks_without_efa_or_tcpx():
    for text in (GUIDE, (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")):
        for needed in ("aws-ofi-nccl", "EFA", "TCPX", "NCCL_DEBUG=INFO", "NET/Socket"):
            assert needed in text, needed


# --------------------------------------------------------------------------- the guide


def test_guide_names_only_files_that_exist():
    for ref in set(re.findall(r"infra/[\w./-]+\w", GUIDE)) - {"infra/mlflow/.env"}:
        assert (ROOT / ref).exists(), ref  # (.env is the one the guide has you create)
    for ref in set(re.findall(r"\bjobs/[\w.-]+\.yaml", GUIDE)):
        assert (ROOT / ref).exists(), ref


def test_guide_walks_through_the_operations():
    for needed in (
        "ray up -y infra/ray/aws-gpu.yaml",
        "ray up -y infra/ray/gcp-gpu.yaml",
        "ray dashboard infra/ray/aws-gpu.yaml",
        "kubectl apply -f infra/kuberay/raycluster.yaml",
        "--address http://127.0.0.1:8265",
        "attnpipe status ID",
        "attnpipe logs ID --follow",
        "attnpipe stop ID",
        "attnpipe list",
        "attnpipe schedule add",
        "attnpipe schedule list",
        "attnpipe schedule remove NAME",
        "attnpipe scheduler",
        "ssh -N -L 5000:127.0.0.1:5000",
        "port-forward svc/mlflow 5000:5000",
        "## 6. Rotate the Ray token",
        "RAY_AUTH_TOKEN_PATH",
    ):
        assert needed in GUIDE, needed
    commands = set(re.findall(r"^\s*attnpipe (\w+)", GUIDE, re.M))
    assert commands <= {
        "submit",
        "status",
        "logs",
        "stop",
        "list",
        "schedule",
        "scheduler",
        "validate",
    }
