"""Every Kubernetes manifest in deploy/kubernetes/ and every object the `kubernetes` pool backend
generates, validated offline against Kubernetes 1.33's strict OpenAPI schemas and KEDA 2.16's
CRD schemas (tests/schemas/, written by scripts/vendor_k8s_schemas.py from PyPI packages), and
the rules the schemas cannot say: KEDA counts unacknowledged messages, workers outlive their
drain, selectors select their pods, names are DNS names."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import jsonschema_rs
import pytest
import yaml

from shared.instance_types import InstanceType, load_table
from shared.pools import PoolSpec
from shared.pools.kubernetes import KubernetesPoolConfig, deployment, object_name, scaled_object

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
SCHEMAS = ROOT / "tests" / "schemas"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@cache
def _bundles() -> tuple[dict, dict]:
    kubernetes = json.loads((SCHEMAS / "kubernetes-1.33-strict.json").read_text())
    keda = json.loads((SCHEMAS / "keda-2.16.json").read_text())
    return kubernetes, keda


@cache
def _validator(api_version: str, kind: str):
    kubernetes, keda = _bundles()
    key = f"{api_version}/{kind}"
    if key in keda["kinds"]:
        return jsonschema_rs.validator_for(keda["kinds"][key])
    if key in kubernetes["kinds"]:
        return jsonschema_rs.validator_for({**kubernetes["kinds"][key], "$defs": kubernetes["$defs"]})
    raise AssertionError(f"no schema for {key}: add it to scripts/vendor_k8s_schemas.py")


def problems(document: dict) -> list[str]:
    """What the schema of the document's kind finds wrong with it."""
    validator = _validator(document["apiVersion"], document["kind"])
    return [f"{'/'.join(map(str, error.instance_path))}: {error.message}" for error in validator.iter_errors(document)]


def manifests() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((f"{path.name}:{document['kind']}/{document['metadata']['name']}", document))
    return found


MANIFEST_LIST = manifests()


@pytest.mark.parametrize("document", [document for _, document in MANIFEST_LIST], ids=[n for n, _ in MANIFEST_LIST])
def test_every_manifest_is_valid_for_its_kind(document):
    assert problems(document) == []
    assert DNS_LABEL.match(document["metadata"]["name"])


def test_the_kustomization_lists_every_manifest_and_sets_the_image():
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    files = {path.name for path in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert kustomization["namespace"] == "esd"
    images = {image["name"] for image in kustomization["images"]}
    used = {
        container["image"]
        for _, document in MANIFEST_LIST
        for container in _containers(document)
    }  # fmt: skip
    assert used == images == {"esd-platform"}


def _containers(document: dict) -> list[dict]:
    spec = document.get("spec", {})
    template = spec.get("template") or spec.get("jobTargetRef", {}).get("template")
    return template["spec"]["containers"] if template else []


def test_deployments_select_their_own_pods_and_probe_them():
    deployments = [document for _, document in MANIFEST_LIST if document["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {
        "esd-gateway",
        "esd-identity",
        "esd-checkpoint",
        "esd-inference",
        "esd-training",
        "esd-webhooks",
    }
    for document in deployments:
        selector = document["spec"]["selector"]["matchLabels"]
        labels = document["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        (container,) = document["spec"]["template"]["spec"]["containers"]
        assert container["readinessProbe"]["exec"]["command"][0] == "esd-healthcheck"
        assert container["livenessProbe"]["exec"]["command"][0] == "esd-healthcheck"


def test_only_the_inference_service_may_manage_pools():
    deployments = {d["metadata"]["name"]: d for _, d in MANIFEST_LIST if d["kind"] == "Deployment"}
    inference = deployments["esd-inference"]["spec"]["template"]["spec"]
    assert inference["serviceAccountName"] == "esd-inference"
    env = {item["name"]: item for item in inference["containers"][0]["env"]}
    assert env["ESD_POOL_BACKEND"]["value"] == "kubernetes"
    bindings = [d for _, d in MANIFEST_LIST if d["kind"] == "RoleBinding"]
    assert [s["name"] for b in bindings for s in b["subjects"]] == ["esd-inference"]
    (role,) = [d for _, d in MANIFEST_LIST if d["kind"] == "Role"]
    granted = {
        (group, resource) for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"]
    }
    assert granted == {("apps", "deployments"), ("apps", "deployments/scale"), ("keda.sh", "scaledobjects")}
    for name in ("esd-gateway", "esd-identity", "esd-checkpoint", "esd-training", "esd-webhooks"):
        assert deployments[name]["spec"]["template"]["spec"].get("serviceAccountName") is None


def test_keda_reads_the_queues_through_the_management_api():
    triggers = [
        trigger
        for _, document in MANIFEST_LIST
        if document["kind"] in ("ScaledObject", "ScaledJob")
        for trigger in document["spec"]["triggers"]
    ]
    assert triggers
    for trigger in triggers:
        assert trigger["type"] == "rabbitmq"
        assert trigger["metadata"]["protocol"] == "http"
        assert trigger["metadata"]["mode"] == "QueueLength"


def test_the_training_workers_run_as_one_job_per_training():
    (job,) = [document for _, document in MANIFEST_LIST if document["kind"] == "ScaledJob"]
    (container,) = _containers(job)
    assert container["command"] == ["esd-training-worker", "--once"]
    assert job["spec"]["jobTargetRef"]["template"]["spec"]["restartPolicy"] == "Never"


def test_the_instance_types_in_the_config_map_are_a_valid_table():
    (config,) = [document for _, document in MANIFEST_LIST if document["kind"] == "ConfigMap"]
    table = load_table(config["data"]["ESD_INSTANCE_TYPES"])
    assert table["ml.g5.2xlarge"].gpus == 1


# --- what the backend generates ----------------------------------------------------------

CONFIG = KubernetesPoolConfig(namespace="esd", image="registry.example.com/esd-platform:1.0", drain_seconds=300)
PLACEMENTS = {
    "cpu": InstanceType(),
    "ml.g5.2xlarge": InstanceType(gpus=1, quota=8, node_labels={"nvidia.com/gpu.product": "NVIDIA-A10G"}),
    "ml.g5.12xlarge": InstanceType(gpus=4, cpus=40, memory="160Gi", node_labels={"pool": "big"}),
}


def spec(name: str, instance_type: str, *, minimum=0, maximum=3, autoscaling=True) -> PoolSpec:
    return PoolSpec(
        name=name,
        queue=f"prod.inference.{name}",
        instance_type=instance_type,
        placement=PLACEMENTS[instance_type],
        minimum=minimum,
        maximum=maximum,
        initial=1,
        autoscaling=autoscaling,
    )


SPECS = [
    spec("esd-async-a1", "cpu"),
    spec("esd-async-Mixed-Case", "ml.g5.2xlarge"),
    spec("esd-real-time-big", "ml.g5.12xlarge", minimum=1, maximum=10),
]


@pytest.mark.parametrize("pool", SPECS, ids=[s.name for s in SPECS])
def test_the_generated_deployment_and_scaled_object_are_valid(pool):
    made = deployment(pool, CONFIG)
    scaler = scaled_object(pool, CONFIG)
    assert problems(made) == []
    assert problems(scaler) == []
    name = made["metadata"]["name"]
    assert DNS_LABEL.match(name) and scaler["spec"]["scaleTargetRef"]["name"] == name
    assert made["spec"]["selector"]["matchLabels"].items() <= made["spec"]["template"]["metadata"]["labels"].items()
    (trigger,) = scaler["spec"]["triggers"]
    assert trigger["metadata"] == {
        "protocol": "http",  # unacknowledged messages count: busy workers are never scaled away
        "mode": "QueueLength",
        "value": "1",
        "queueName": pool.queue,
    }
    assert (scaler["spec"]["minReplicaCount"], scaler["spec"]["maxReplicaCount"]) == (pool.minimum, pool.maximum)
    pod = made["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > CONFIG.drain_seconds  # the worker drains first
    (container,) = pod["containers"]
    assert container["command"] == ["esd-inference-worker", "--endpoint", pool.name]
    assert container["image"] == CONFIG.image


def test_an_instance_type_places_and_sizes_the_workers():
    big = deployment(spec("esd-real-time-big", "ml.g5.12xlarge", minimum=1, maximum=10), CONFIG)
    pod = big["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "big"}
    resources = pod["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "40", "memory": "160Gi", "nvidia.com/gpu": "4"}
    assert resources["limits"] == {"memory": "160Gi", "nvidia.com/gpu": "4"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    cpu = deployment(spec("esd-async-a1", "cpu"), CONFIG)["spec"]["template"]["spec"]
    assert "nodeSelector" not in cpu and "tolerations" not in cpu and cpu["containers"][0]["resources"] == {}


def test_names_that_differ_only_in_case_get_different_objects():
    assert object_name("esd-", "esd-async-Mixed") != object_name("esd-", "esd-async-mixed")
    assert object_name("esd-", "esd-async-mixed") == "esd-pool-esd-async-mixed"
    assert len(object_name("esd-", "esd-real-time-" + "x" * 60)) <= 63


def test_the_validation_catches_a_broken_object():
    made = deployment(SPECS[0], CONFIG)
    made["spec"]["replicas"] = "two"
    made["spec"]["template"]["spec"]["containers"][0]["comand"] = ["typo"]
    found = problems(made)
    assert any("replicas" in problem for problem in found)
    assert any("comand" in problem for problem in found)
    scaler = scaled_object(SPECS[0], CONFIG)
    del scaler["spec"]["scaleTargetRef"]
    scaler["spec"]["triggers"][0]["metadata"]["value"] = 1  # KEDA's metadata are strings
    assert len(problems(scaler)) == 2


def _pod_templates() -> list[tuple[str, dict]]:
    found = []
    for name, document in MANIFEST_LIST:
        spec = document.get("spec", {})
        template = spec.get("template") or spec.get("jobTargetRef", {}).get("template")
        if template:
            found.append((name, template))
    found.append(("generated pool", deployment(SPECS[0], CONFIG)["spec"]["template"]))
    return found


def test_every_pod_serves_its_metrics_where_its_annotations_say():
    (config,) = [document for _, document in MANIFEST_LIST if document["kind"] == "ConfigMap"]
    port = int(config["data"]["ESD_METRICS_PORT"])
    assert config["data"]["ESD_METRICS_HOST"] == "0.0.0.0"  # reachable from Prometheus' pod
    templates = _pod_templates()
    assert len(templates) == 8  # gateway, five services, training workers, an endpoint's pool
    for name, template in templates:
        annotations = template["metadata"].get("annotations", {})
        assert annotations == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(port),
            "prometheus.io/path": "/metrics",
        }, name
        (container,) = template["spec"]["containers"]
        assert {"name": "metrics", "containerPort": port} in container["ports"], name
