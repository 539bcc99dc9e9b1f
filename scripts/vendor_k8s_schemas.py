"""Writes the schemas the Kubernetes tests validate against (tests/schemas/), from two PyPI
packages, offline afterwards:

- Kubernetes: the strict JSON schemas of Kubernetes 1.33 that `kubernetes-validate` 1.37.0
  ships (made from Kubernetes' OpenAPI document; strict: unknown fields are errors), for the
  kinds the manifests and the pool backend use, with the definitions they reach;
- KEDA: the JSON schemas of KEDA 2.16.1's ScaledObject, ScaledJob and TriggerAuthentication, from
  the pydantic models that `cloudcoil-models-keda` 2.16.1.0 generates from KEDA's CRDs, made
  strict here the same way (an object with known properties takes no others).

    python scripts/vendor_k8s_schemas.py        # needs pip and the package index, once
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path

KUBERNETES_VALIDATE = "kubernetes-validate==1.37.0"
KUBERNETES_VERSION = "v1.33.0"
KEDA_MODELS = "cloudcoil-models-keda==2.16.1.0"
OUT = Path(__file__).resolve().parents[1] / "tests" / "schemas"

# (apiVersion, kind) -> the schema file kubernetes-validate names it by
KINDS = {
    ("v1", "Namespace"): "namespace-v1.json",
    ("v1", "ConfigMap"): "configmap-v1.json",
    ("v1", "Secret"): "secret-v1.json",
    ("v1", "ServiceAccount"): "serviceaccount-v1.json",
    ("v1", "Service"): "service-v1.json",
    ("apps/v1", "Deployment"): "deployment-apps-v1.json",
    ("networking.k8s.io/v1", "Ingress"): "ingress-networking-v1.json",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscaler-autoscaling-v2.json",
    ("rbac.authorization.k8s.io/v1", "Role"): "role-rbac-v1.json",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebinding-rbac-v1.json",
}
KEDA_KINDS = ("ScaledObject", "ScaledJob", "TriggerAuthentication")


def _refs(node, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and "#/$defs/" in ref:
            found.add(ref.split("#/$defs/", 1)[1])
        for value in node.values():
            _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)


def _local_refs(node):
    """`/api/_definitions.json#/$defs/X` -> `#/$defs/X`: one self-contained document."""
    if isinstance(node, dict):
        return {
            key: ("#" + value.split("#", 1)[1] if key == "$ref" and "#" in value else _local_refs(value))
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_local_refs(value) for value in node]
    return node


def kubernetes_bundle(wheel: Path) -> dict:
    folder = f"kubernetes_validate/kubernetes-json-schema/{KUBERNETES_VERSION}-local-strict/"
    with zipfile.ZipFile(wheel) as archive:
        definitions = json.loads(archive.read(folder + "_definitions.json"))["$defs"]
        kinds = {
            f"{api}/{kind}": _local_refs(json.loads(archive.read(folder + name))) for (api, kind), name in KINDS.items()
        }
    definitions = _local_refs(definitions)
    needed: set[str] = set()
    _refs(kinds, needed)
    queue = list(needed)
    while queue:
        found: set[str] = set()
        _refs(definitions[queue.pop()], found)
        for name in found - needed:
            needed.add(name)
            queue.append(name)
    return {
        "$comment": f"Kubernetes {KUBERNETES_VERSION} strict schemas from {KUBERNETES_VALIDATE} (scripts/vendor_k8s_schemas.py)",
        "kinds": kinds,
        "$defs": {name: definitions[name] for name in sorted(needed)},
    }


def _strict(node):
    if isinstance(node, dict):
        node = {key: _strict(value) for key, value in node.items()}
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        node.pop("title", None)
        return node
    if isinstance(node, list):
        return [_strict(value) for value in node]
    return node


KEDA_SCRIPT = """
import json, sys
from cloudcoil.models.keda import v1alpha1
print(json.dumps({kind: getattr(v1alpha1, kind).model_json_schema(by_alias=True) for kind in sys.argv[1:]}))
"""


def keda_bundle(work: Path) -> dict:
    venv.create(work / "venv", with_pip=True)
    python = work / "venv" / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", KEDA_MODELS], check=True)
    schemas = json.loads(
        subprocess.run([python, "-c", KEDA_SCRIPT, *KEDA_KINDS], check=True, capture_output=True, text=True).stdout
    )
    return {
        "$comment": f"KEDA 2.16.1 schemas from the pydantic models of {KEDA_MODELS}, made strict (scripts/vendor_k8s_schemas.py)",
        "kinds": {f"keda.sh/v1alpha1/{kind}": _strict(schema) for kind, schema in schemas.items()},
    }


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", work, KUBERNETES_VALIDATE],
            check=True,
        )
        (wheel,) = Path(work).glob("kubernetes_validate-*.whl")
        (OUT / "kubernetes-1.33-strict.json").write_text(json.dumps(kubernetes_bundle(wheel), indent=0, sort_keys=True))
        (OUT / "keda-2.16.json").write_text(json.dumps(keda_bundle(Path(work)), indent=0, sort_keys=True))
    for path in sorted(OUT.glob("*.json")):
        print(f"{path}: {path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
