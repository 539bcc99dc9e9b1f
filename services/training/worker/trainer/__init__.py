"""LoRA training for the training worker: kohya-style arguments (`TrainingConfig.from_esd`),
a kohya dataset folder, a Stable Diffusion 1.x single-file checkpoint in, a kohya-layout
`.safetensors` LoRA out.

    config = TrainingConfig.from_esd(config_params)
    result = train_lora(checkpoint, dataset_dir, config, out_dir, device="cuda", progress=report)
    result.final  # out_dir / f"{config.output_name}.safetensors"

`TrainingConfig` lives with the wire contracts (`shared.contracts.kohya`, pure pydantic) so that
the training service validates `config_params` without torch; it is re-exported here. The rest
(torch, diffusers, peft) is imported on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from shared.contracts.kohya import InvalidTrainingConfig, TrainingConfig

if TYPE_CHECKING:
    from services.training.worker.trainer.dataset import InvalidDataset, TrainingImage, read_dataset
    from services.training.worker.trainer.training import (
        Trainer,
        TrainingCancelled,
        TrainingDiverged,
        TrainingProgress,
        TrainingResult,
        train_lora,
    )

_LAZY = {
    "InvalidDataset": "dataset",
    "TrainingImage": "dataset",
    "read_dataset": "dataset",
    "Trainer": "training",
    "TrainingCancelled": "training",
    "TrainingDiverged": "training",
    "TrainingProgress": "training",
    "TrainingResult": "training",
    "train_lora": "training",
}

__all__ = [
    "InvalidDataset",
    "InvalidTrainingConfig",
    "Trainer",
    "TrainingCancelled",
    "TrainingConfig",
    "TrainingDiverged",
    "TrainingImage",
    "TrainingProgress",
    "TrainingResult",
    "read_dataset",
    "train_lora",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)
