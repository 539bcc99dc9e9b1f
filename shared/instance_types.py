"""Instance types: what an endpoint's `instance_type` means where its workers run, and how many
instances of each type the deployment may hold (its quota).

The table is the operator's (`ESD_INSTANCE_TYPES`, JSON, or `ESD_INSTANCE_TYPES_FILE`, a JSON
file). Names are free: ESD's SageMaker names (`ml.g5.2xlarge`) are as good as any, so that
clients written for ESD keep working. With no table, one type exists: `local`, unlimited, with
no placement, which is what the local pools need.

An entry says, for each backend, where a worker goes and what it is given:
- `gpus`: GPUs per worker (Kubernetes: `nvidia.com/gpu` requests and limits; swarm: that many
  of the generic resource `gpu_resource`, as the nodes' engines announce it);
- `node_labels`: labels a node must carry (Kubernetes: `nodeSelector`; swarm: placement
  constraints `node.labels.<key>==<value>`);
- `cpus`, `memory`: per worker, requested and limited (Kubernetes) or reserved (swarm);
- `quota`: instances of this type all endpoints together may hold (None: no limit).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from shared.errors import Invalid

LOCAL = "local"


class InstanceType(BaseModel):
    model_config = ConfigDict(extra="forbid")

    quota: int | None = Field(None, ge=0)
    gpus: int = Field(0, ge=0)
    gpu_resource: str = "NVIDIA-GPU"  # swarm's generic resource kind for a GPU
    node_labels: dict[str, str] = Field(default_factory=dict)
    cpus: float | None = Field(None, gt=0)
    memory: str | None = Field(None, pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)?$")  # Kubernetes' quantity form


InstanceTable = dict[str, InstanceType]  # empty: no table (every name is `local`)
_TABLE = TypeAdapter(InstanceTable)
DEFAULT = InstanceType()


def load_table(inline: str = "", file: Path | None = None) -> InstanceTable:
    """The operator's table (inline JSON wins over the file), or none."""
    if inline.strip():
        return _TABLE.validate_json(inline)
    if file is not None:
        return _TABLE.validate_python(json.loads(file.read_text()))
    return {}


class UnknownInstanceType(Invalid):
    pass


class ResourceLimitExceeded(Invalid):
    pass


def instance_type(table: InstanceTable, name: str) -> InstanceType:
    if not table:
        return DEFAULT
    entry = table.get(name)
    if entry is None:
        raise UnknownInstanceType(f"instance_type {name} is not known here; known: {', '.join(sorted(table))}")
    return entry


def check_quota(table: InstanceTable, name: str, *, used: int, delta: int) -> None:
    """Refuses `delta` more instances of `name` when `used` are held already and the total would
    pass the type's quota, with ESD's (SageMaker's) message."""
    quota = instance_type(table, name).quota
    if quota is not None and used + delta > quota:
        raise ResourceLimitExceeded(
            f"ResourceLimitExceeded: The account-level service limit '{name} for endpoint usage' is {quota} "
            f"Instances, with current utilization of {used} Instances and a request delta of {delta} Instances."
        )
