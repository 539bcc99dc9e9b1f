"""The one rule that sizes a worker pool: it follows the backlog between the endpoint's minimum
and maximum. Pure, so it is unit-tested; the autoscaler logs every change it makes."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PoolState:
    queued: int  # jobs waiting in the endpoint's queue
    busy: int  # workers running a job now
    current: int  # workers alive (or starting)
    idle_seconds: float  # how long the pool has had neither queued nor running jobs


@dataclass(frozen=True)
class PoolLimits:
    minimum: int
    maximum: int
    autoscaling: bool
    jobs_per_worker: int = 1  # backlog one worker is expected to absorb
    scale_down_after: float = 60.0  # idle seconds before giving workers back


def desired_workers(state: PoolState, limits: PoolLimits, initial: int) -> int:
    """How many workers the pool should have now.

    Without autoscaling the pool keeps its initial size. With it, the pool grows at once to
    cover the backlog (one worker per `jobs_per_worker` queued or running jobs) and shrinks
    only after it has been idle for `scale_down_after` seconds, never below the minimum (an
    Async pool may go to 0 and comes back when work arrives) nor above the maximum."""
    if not limits.autoscaling:
        return initial
    demand = math.ceil((state.queued + state.busy) / max(limits.jobs_per_worker, 1))
    wanted = max(demand, limits.minimum)
    if wanted < state.current and state.idle_seconds < limits.scale_down_after:
        wanted = state.current  # recently busy: keep the warm workers a while
    if demand > 0 and wanted == 0:
        wanted = 1
    return max(limits.minimum, min(wanted, limits.maximum))
