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
