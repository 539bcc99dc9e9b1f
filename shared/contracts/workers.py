"""What every worker (inference or training) and its service say to each other besides the
job itself: heartbeats, and the go-ahead a worker asks for before it runs a job."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel


class WorkerState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    STOPPING = "stopping"


class WorkerHeartbeat(BaseModel):
    """Beaten every few seconds to the pool's heartbeat queue (and once more when stopping)."""

    pool: str  # the endpoint's name, or `training`
    worker_id: str
    state: WorkerState
    at: float
    metrics_port: int | None = None  # where this worker serves /metrics, when it does


class GoAhead(BaseModel):
    """The service's answer to "I took this job: may I run it?"."""

    run: bool  # False: already finished (a redelivery), deleted, or given up
    reason: str | None = None
