"""The one device choice of both workers: the `worker_device` setting, where "auto" takes the
GPU when there is one."""

from __future__ import annotations

import torch


def choose_device(setting: str = "auto") -> torch.device:
    """`"auto"`: CUDA when it is available, else the CPU; any other value names the device
    (`"cpu"`, `"cuda"`, `"cuda:1"`)."""
    if setting.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting.strip())


def limit_threads(threads: int) -> None:
    """Run torch's CPU work on this many threads (0: torch's own choice, every core). Workers
    sharing a host divide its cores: two workers each using every core run slower together
    than one alone."""
    if threads > 0:
        torch.set_num_threads(threads)
