"""Both workers run on the device their `worker_device` setting names; "auto" takes the GPU
when there is one."""

from __future__ import annotations

import torch

from diffusion.device import choose_device


def test_auto_takes_cuda_when_it_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto") == torch.device("cpu")
    assert choose_device() == torch.device("cpu")


def test_a_named_device_is_taken_as_it_is(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("cuda:1") == torch.device("cuda", 1)
    assert choose_device(" cpu ") == torch.device("cpu")
