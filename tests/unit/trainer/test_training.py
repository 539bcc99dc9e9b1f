"""A LoRA trained on the tiny model: progress every step, kohya's file layout, epoch files,
reproducibility, and a file the inference engine applies."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch
from PIL import Image, ImageChops
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusion.checkpoints import UnsupportedCheckpoint
from services.inference.worker.engine import Engine, GenerationRequest, ModelFiles
from services.training.worker.trainer import (
    InvalidDataset,
    InvalidTrainingConfig,
    Trainer,
    TrainingCancelled,
    TrainingConfig,
    TrainingDiverged,
    train_lora,
)
from shared.errors import Invalid
from tests.unit.trainer.conftest import SMALL

# diffusers' schedulers trip numpy 2 deprecations on every job; they are theirs, not ours

KOHYA_KEY = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def _config(**values) -> TrainingConfig:
    return TrainingConfig.from_esd({**SMALL, **values})


def test_progress_is_reported_every_step_with_a_finite_loss(trained):
    result, reports = trained
    # 6 images per epoch (2 + 2 x 2 repeats), batch 1, two epochs
    assert result.steps == 12 and result.epochs == 2 and result.seed == 7
    assert [report.step for report in reports] == list(range(1, 13))
    assert {report.steps for report in reports} == {12} and {report.epochs for report in reports} == {2}
    assert [report.epoch for report in reports] == [1] * 6 + [2] * 6
    assert result.losses == [report.loss for report in reports]
    assert all(math.isfinite(loss) and loss > 0 for loss in result.losses)
    assert result.warnings == [] and result.seconds > 0


def test_the_file_follows_kohyas_layout(trained):
    result, _ = trained
    assert result.final.name == "style.safetensors"
    tensors = load_file(str(result.final))
    assert all(KOHYA_KEY.match(key) for key in tensors), [key for key in tensors if not KOHYA_KEY.match(key)]
    modules = {key.split(".", 1)[0] for key in tensors}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0" in modules
    assert len(modules) == 32  # 8 attention layers x (to_q, to_k, to_v, to_out.0); no text encoder
    for module in modules:
        down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
        assert down.shape[0] == 8 and up.shape[1] == 8
        assert tensors[f"{module}.alpha"].item() == 8.0
    with safe_open(str(result.final), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_dim"] == "8" and metadata["ss_network_alpha"] == "8"
    assert metadata["ss_output_name"] == "style" and metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_epoch"], metadata["ss_steps"], metadata["ss_seed"]) == ("2", "12", "7")
    assert metadata["ss_resolution"] == "(64, 64)" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_sd_model_name"] == "tiny.safetensors"
    assert metadata["ss_num_train_images"] == "6" and metadata["ss_num_batches_per_epoch"] == "6"
    assert '"2_concept": {"n_repeats": 2, "img_count": 2}' in metadata["ss_dataset_dirs"]


def test_save_every_n_epochs_writes_the_epoch_files(trained):
    result, _ = trained
    # the last epoch is the final file, as in kohya
    assert [path.name for path in result.checkpoints] == ["style-000001.safetensors"]
    with safe_open(str(result.checkpoints[0]), framework="pt") as handle:
        assert (handle.metadata()["ss_epoch"], handle.metadata()["ss_steps"]) == ("1", "6")
    assert sorted(path.name for path in result.final.parent.iterdir()) == [
        "style-000001.safetensors",
        "style.safetensors",
    ]


def test_the_same_seed_trains_the_same_lora(checkpoint, dataset, tmp_path):
    config = _config(max_train_steps=3, learning_rate=1e-3)
    first = load_file(str(train_lora(checkpoint, dataset, config, tmp_path / "a").final))
    second = load_file(str(train_lora(checkpoint, dataset, config, tmp_path / "b").final))
    reseeded = _config(max_train_steps=3, learning_rate=1e-3, seed=8)
    other = load_file(str(train_lora(checkpoint, dataset, reseeded, tmp_path / "c").final))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first)


def test_a_missing_seed_is_drawn_and_reported(checkpoint, dataset, tmp_path):
    config = TrainingConfig.from_esd({"resolution": 64, "max_train_steps": 1})
    result = train_lora(checkpoint, dataset, config, tmp_path)
    with safe_open(str(result.final), framework="pt") as handle:
        assert handle.metadata()["ss_seed"] == str(result.seed)


def test_text_encoder_training_adds_kohya_text_encoder_keys(checkpoint, dataset, tmp_path):
    config = _config(max_train_steps=2, train_text_encoder=True, network_dim=4, network_alpha=1, save_precision="fp16")
    tensors = load_file(str(train_lora(checkpoint, dataset, config, tmp_path).final))
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert "lora_te_text_model_encoder_layers_2_self_attn_out_proj.alpha" in tensors
    assert tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"].dtype == torch.float16
    assert tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 1.0


def test_batches_accumulation_and_steps(checkpoint, dataset, tmp_path):
    # 6 images per epoch in batches of 2 (3 batches), 2 batches per update: 2 updates an epoch
    config = _config(train_batch_size=2, gradient_accumulation_steps=2, max_train_epochs=2, lr_scheduler="cosine")
    result = train_lora(checkpoint, dataset, config, tmp_path / "a")
    assert (result.steps, result.epochs) == (4, 2)
    # max_train_steps alone decides, the last epoch partly run
    result = train_lora(checkpoint, dataset, _config(max_train_steps=8), tmp_path / "b")
    assert (result.steps, result.epochs) == (8, 2)


def test_adamw8bit_and_mixed_precision_fall_back_on_the_cpu_with_warnings(checkpoint, dataset, tmp_path):
    config = _config(max_train_steps=1, optimizer_type="AdamW8bit", mixed_precision="fp16")
    result = train_lora(checkpoint, dataset, config, tmp_path)
    assert result.steps == 1 and result.final.is_file()
    assert any("AdamW8bit" in warning and "AdamW" in warning for warning in result.warnings)
    assert any("mixed_precision fp16 needs CUDA" in warning for warning in result.warnings)


def test_small_images_are_enlarged_with_a_warning(checkpoint, dataset, tmp_path):
    result = train_lora(checkpoint, dataset, _config(max_train_steps=1, resolution=128), tmp_path)
    assert any("4 of 4 images are smaller than 128x128" in warning for warning in result.warnings)


def test_the_trained_lora_changes_the_engines_images(checkpoint, dataset, tmp_path):
    # a high learning rate, so that a few steps move the tiny model visibly
    config = _config(max_train_steps=5, learning_rate=1e-2, output_name="mine")
    lora = train_lora(checkpoint, dataset, config, tmp_path).final
    engine = Engine(device="cpu")

    def generate(prompt: str) -> Image.Image:
        request = GenerationRequest.from_payload(
            "txt2img", {"prompt": prompt, "steps": 4, "width": 64, "height": 64, "seed": 11}
        )
        result = engine.generate(request, ModelFiles(checkpoint=checkpoint, loras={"mine": lora}))
        return Image.open(io.BytesIO(result.images[0])).convert("RGB")

    def difference(first: Image.Image, second: Image.Image) -> int:
        return max(high for _, high in ImageChops.difference(first, second).getextrema())

    plain = generate("a photo of a cat")
    with_lora = generate("<lora:mine:1> a photo of a cat")
    assert difference(plain, with_lora) > 10
    assert difference(plain, generate("a photo of a cat")) == 0  # the LoRA was removed after its job


def test_cancelling_stops_the_run(checkpoint, dataset, tmp_path):
    asked = []

    def cancelled() -> bool:
        asked.append(True)
        return len(asked) > 2

    with pytest.raises(TrainingCancelled, match="cancelled at step 2"):
        train_lora(checkpoint, dataset, _config(max_train_steps=10), tmp_path, cancelled=cancelled)
    assert not (tmp_path / "lora.safetensors").exists()


def test_the_step_can_be_run_and_timed_alone(checkpoint, dataset):
    trainer = Trainer(checkpoint, dataset, _config(max_train_steps=2))
    trainer.prepare()
    reports = [trainer.step() for _ in range(4)]  # past `steps`: the data keeps cycling
    assert [report.step for report in reports] == [1, 2, 3, 4]
    assert all(KOHYA_KEY.match(key) for key in trainer.lora_state_dict())
    trainer.release()


def test_fm_type_must_match_the_base_model(checkpoint, dataset, tmp_path):
    with pytest.raises(InvalidTrainingConfig, match="fm_type: sd_xl does not match the base model"):
        train_lora(checkpoint, dataset, _config(fm_type="sd_xl"), tmp_path)


SDXL_KOHYA_KEY = re.compile(r"^lora_(unet|te1|te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def test_an_sdxl_lora_is_trained_in_kohyas_sdxl_layout_and_changes_the_engines_images(dataset, tmp_path):
    from diffusion.testing import make_tiny_sdxl_checkpoint

    checkpoint = make_tiny_sdxl_checkpoint(tmp_path / "tiny-sdxl.safetensors", seed=0)
    with pytest.raises(InvalidTrainingConfig, match="fm_type: sd_1_5 does not match the base model, an SDXL"):
        train_lora(checkpoint, dataset, _config(max_train_steps=1), tmp_path / "wrong")
    config = _config(
        fm_type="sd_xl", max_train_steps=5, learning_rate=1e-2, output_name="mine", train_text_encoder=True
    )
    result = train_lora(checkpoint, dataset, config, tmp_path / "out")
    assert result.steps == 5 and all(math.isfinite(loss) for loss in result.losses)
    tensors = load_file(str(result.final))
    assert all(SDXL_KOHYA_KEY.match(key) for key in tensors), [k for k in tensors if not SDXL_KOHYA_KEY.match(k)]
    modules = {key.split(".", 1)[0] for key in tensors}
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k" in modules
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert "lora_te2_text_model_encoder_layers_2_self_attn_out_proj" in modules
    with safe_open(str(result.final), framework="pt") as handle:
        assert handle.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"

    engine = Engine(device="cpu")

    def generate(prompt: str) -> Image.Image:
        request = GenerationRequest.from_payload(
            "txt2img", {"prompt": prompt, "steps": 3, "width": 64, "height": 64, "seed": 11}
        )
        result = engine.generate(request, ModelFiles(checkpoint=checkpoint, loras={"mine": lora}))
        return Image.open(io.BytesIO(result.images[0])).convert("RGB")

    def difference(first: Image.Image, second: Image.Image) -> int:
        return max(high for _, high in ImageChops.difference(first, second).getextrema())

    lora = result.final
    plain = generate("a photo of a cat")
    assert difference(plain, generate("<lora:mine:1> a photo of a cat")) > 10
    assert difference(plain, generate("a photo of a cat")) == 0


def test_an_empty_dataset_fails_before_training(checkpoint, tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(InvalidDataset, match="no images"):
        train_lora(checkpoint, tmp_path / "data", _config(), tmp_path / "out")


def test_a_too_deep_clip_skip_is_refused(checkpoint, dataset, tmp_path):
    with pytest.raises(InvalidTrainingConfig, match="clip_skip: 5 is more than the text encoder's 3 layers"):
        train_lora(checkpoint, dataset, _config(clip_skip=5), tmp_path)


def test_clip_skip_and_noise_offset_train(checkpoint, dataset, tmp_path):
    result = train_lora(checkpoint, dataset, _config(max_train_steps=2, clip_skip=2, noise_offset=0.05), tmp_path)
    assert all(math.isfinite(loss) for loss in result.losses)


def test_a_diverging_run_fails_with_a_clear_reason(checkpoint, dataset, tmp_path):
    with pytest.raises(TrainingDiverged, match="lower the learning_rate"):
        train_lora(checkpoint, dataset, _config(max_train_steps=20, learning_rate=10, max_grad_norm=0), tmp_path)


def test_an_unsupported_base_model_is_the_users_mistake(dataset, tmp_path):
    base = tmp_path / "sd2.safetensors"
    save_file({"cond_stage_model.model.ln_final.weight": torch.zeros(2)}, str(base))
    with pytest.raises(UnsupportedCheckpoint, match="Stable Diffusion 2.x") as caught:
        train_lora(base, dataset, _config(), tmp_path / "out")
    assert isinstance(caught.value, Invalid)


def test_the_training_errors_are_invalid_ones():
    for error in (InvalidTrainingConfig, InvalidDataset, TrainingDiverged, UnsupportedCheckpoint):
        assert issubclass(error, Invalid) and not issubclass(error, ValueError)
