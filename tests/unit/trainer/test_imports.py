"""The trainer stands on the shared `diffusion` package, never on the inference engine, and the
shared package on nothing of the services."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _modules_after(statement: str, prefix: str) -> list[str]:
    check = (
        f"import sys; {statement}; "
        f"print('\\n'.join(sorted(name for name in sys.modules if name.startswith({prefix!r}))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    return done.stdout.split()


def test_the_trainer_imports_nothing_of_the_inference_service():
    assert _modules_after("import services.training.worker.trainer.training", "services.inference") == []


def test_the_diffusion_package_imports_no_service():
    assert _modules_after("import diffusion.components, diffusion.testing, diffusion.device", "services") == []
