"""Only the workers import torch: the gateway and the services start fast and stay small."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "transformers", "peft")


@pytest.mark.parametrize(
    "module",
    [
        "services.gateway.app",
        "services.gateway.__main__",
        "services.identity.__main__",
        "services.checkpoint.__main__",
        "services.inference.__main__",
        "services.training.__main__",
        "shared.worker",
    ],
)
def test_importing_a_service_leaves_torch_out(module):
    probe = f"import importlib, json, sys; importlib.import_module({module!r}); print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    )
    assert [name for name in HEAVY if name in loaded] == []
