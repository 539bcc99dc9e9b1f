"""The engine generates A1111-style images from the tiny model on the CPU."""

from __future__ import annotations

import base64
import io
import os

import pytest
from PIL import Image, ImageChops

from services.inference.worker.engine import (
    Engine,
    GenerationCancelled,
    GenerationRequest,
    IncompatibleModel,
    InvalidPayload,
    ModelFiles,
    UnsupportedCheckpoint,
)
from shared.errors import Invalid

# diffusers' schedulers trip numpy 2 deprecations on every job; they are theirs, not ours

SMALL = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": 4, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(device="cpu")


def _txt2img(engine: Engine, models: ModelFiles, **payload):
    request = GenerationRequest.from_payload("txt2img", {**SMALL, **payload})
    return engine.generate(request, models)


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _difference(first: bytes, second: bytes) -> int:
    extrema = ImageChops.difference(_png(first).convert("RGB"), _png(second).convert("RGB")).getextrema()
    return max(high for _, high in extrema)


def test_txt2img_returns_every_image_with_its_parameters(engine, checkpoint):
    result = _txt2img(engine, ModelFiles(checkpoint=checkpoint), seed=100, batch_size=2, n_iter=2, width=64, height=96)
    assert len(result.images) == 4
    assert result.info["all_seeds"] == [100, 101, 102, 103]
    for data, seed in zip(result.images, result.info["all_seeds"], strict=True):
        image = _png(data)
        assert image.format == "PNG" and image.size == (64, 96)
        text = image.text["parameters"]
        assert text.startswith("a photo of a cat\nNegative prompt: blurry\nSteps: 4, Sampler: Euler a, CFG scale: 7,")
        assert f"Seed: {seed}, Size: 64x96, Model: tiny-a" in text
    assert result.info["infotexts"][0] == _png(result.images[0]).text["parameters"]
    assert result.parameters["steps"] == 4 and result.parameters["sampler_name"] == "Euler a"


def test_the_same_seed_gives_the_same_image(engine, checkpoint):
    models = ModelFiles(checkpoint=checkpoint)
    first = _txt2img(engine, models, seed=7)
    again = _txt2img(engine, models, seed=7)
    other = _txt2img(engine, models, seed=8)
    assert first.images == again.images
    assert first.images[0] != other.images[0]


def test_image_i_of_a_job_uses_seed_plus_i(engine, checkpoint):
    models = ModelFiles(checkpoint=checkpoint)
    batch = _txt2img(engine, models, seed=20, batch_size=2, n_iter=2)
    alone = _txt2img(engine, models, seed=23)
    neighbour = _txt2img(engine, models, seed=22)
    # a batch runs the same maths on other tensor shapes: equal up to rounding
    assert _difference(batch.images[3], alone.images[0]) <= 2
    assert _difference(batch.images[3], neighbour.images[0]) > 2


def test_a_random_seed_is_reported_and_reproduces_the_image(engine, checkpoint):
    models = ModelFiles(checkpoint=checkpoint)
    random_one = _txt2img(engine, models, seed=-1)
    seed = random_one.info["seed"]
    assert seed >= 0 and random_one.info["all_seeds"] == [seed]
    assert _txt2img(engine, models, seed=seed).images == random_one.images


@pytest.mark.parametrize(
    ("sampler_name", "scheduler"),
    [
        ("Euler", None),
        ("Euler a", None),
        ("DPM++ 2M", None),
        ("DPM++ 2M Karras", None),
        ("DPM++ 2M", "Karras"),
        ("DDIM", None),
        ("LMS", None),
        ("Heun", None),
        ("UniPC", None),
        ("DPM++ 2M SDE", None),
        ("DPM2 a", None),
        ("PLMS", None),
    ],
)
def test_each_sampler_runs(engine, checkpoint, sampler_name, scheduler):
    result = _txt2img(engine, ModelFiles(checkpoint=checkpoint), seed=1, sampler_name=sampler_name, scheduler=scheduler)
    image = _png(result.images[0])
    assert image.size == (64, 64)
    assert any(low != high for low, high in image.getextrema())  # not a blank (NaN) image
    assert f"Sampler: {result.info['sampler_name']}" in image.text["parameters"]


def test_img2img_starts_from_the_init_image(engine, checkpoint):
    source = Image.new("RGB", (80, 80), (200, 30, 30))
    buffer = io.BytesIO()
    source.save(buffer, format="JPEG")
    request = GenerationRequest.from_payload(
        "img2img",
        {
            **SMALL,
            "seed": 3,
            "init_images": ["data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()],
            "denoising_strength": 0.5,
        },
    )
    weak = engine.generate(request, ModelFiles(checkpoint=checkpoint))
    strong = engine.generate(request.model_copy(update={"denoising_strength": 1.0}), ModelFiles(checkpoint=checkpoint))
    image = _png(weak.images[0])
    assert image.size == (64, 64)
    assert "Denoising strength: 0.5" in image.text["parameters"]
    assert weak.images[0] != strong.images[0]


def test_a_lora_changes_the_image_for_its_job_only(engine, checkpoint, lora):
    models = ModelFiles(checkpoint=checkpoint, loras={"style": lora})
    plain = _txt2img(engine, models, seed=11)
    styled = _txt2img(engine, models, seed=11, prompt="a photo of a cat <lora:style:1>")
    half = _txt2img(engine, models, seed=11, prompt="a photo of a cat <lora:style:0.4>")
    after = _txt2img(engine, models, seed=11)
    assert styled.images[0] != plain.images[0]
    assert half.images[0] not in (plain.images[0], styled.images[0])
    assert _png(after.images[0]).tobytes() == _png(plain.images[0]).tobytes()
    assert styled.info["all_prompts"] == ["a photo of a cat <lora:style:1>"]


def test_an_unknown_lora_is_refused(engine, checkpoint):
    with pytest.raises(InvalidPayload, match="LoRA 'missing' is not among the job's LoRA models"):
        _txt2img(engine, ModelFiles(checkpoint=checkpoint), prompt="a cat <lora:missing:1>")


def test_a_broken_lora_fails_the_job_and_leaves_the_engine_clean(engine, checkpoint, lora, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    models = ModelFiles(checkpoint=checkpoint, loras={"style": lora, "broken": broken})
    before = _txt2img(engine, models, seed=5)
    with pytest.raises(IncompatibleModel, match="LoRA 'broken' could not be applied"):
        _txt2img(engine, models, seed=5, prompt="a photo of a cat <lora:style:1> <lora:broken>")
    assert _txt2img(engine, models, seed=5).images == before.images


def test_a_vae_override_is_loaded_once_and_used(checkpoint, vae):
    engine = Engine()
    own = _txt2img(engine, ModelFiles(checkpoint=checkpoint), seed=2)
    models = ModelFiles(checkpoint=checkpoint, vae=vae)
    overridden = _txt2img(engine, models, seed=2, override_settings={"sd_vae": vae.name})
    again = _txt2img(engine, models, seed=2)
    assert overridden.images[0] != own.images[0]
    assert again.images == overridden.images
    assert f"VAE: {vae.name}" in overridden.info["infotexts"][0]
    assert (engine.loads, engine.vae_loads) == (1, 1)
    assert _txt2img(engine, ModelFiles(checkpoint=checkpoint), seed=2).images == own.images


def test_a_vae_named_in_the_settings_must_come_with_the_job(engine, checkpoint):
    with pytest.raises(InvalidPayload, match="override_settings.sd_vae"):
        _txt2img(engine, ModelFiles(checkpoint=checkpoint), override_settings={"sd_vae": "pastel.safetensors"})


def test_an_embedding_named_in_the_prompt_is_used_for_that_job(engine, checkpoint, embedding):
    models = ModelFiles(checkpoint=checkpoint, embeddings={"mystyle": embedding})
    plain = _txt2img(engine, ModelFiles(checkpoint=checkpoint), seed=4, prompt="a cat mystyle")
    with_embedding = _txt2img(engine, models, seed=4, prompt="a cat mystyle")
    without_word = _txt2img(engine, models, seed=4, prompt="a cat")
    assert with_embedding.images[0] != plain.images[0]
    assert with_embedding.info["embeddings"] == ["mystyle"] and without_word.info["embeddings"] == []
    assert _txt2img(engine, ModelFiles(checkpoint=checkpoint), seed=4, prompt="a cat mystyle").images == plain.images


def test_a_cached_model_is_never_loaded_again(checkpoint, other_checkpoint):
    engine = Engine(max_pipelines=2)
    for path in (checkpoint, other_checkpoint, checkpoint, other_checkpoint):
        _txt2img(engine, ModelFiles(checkpoint=path), steps=1)
    assert engine.loads == 2
    assert engine.cached_checkpoints == [checkpoint.resolve(), other_checkpoint.resolve()]


def test_the_least_recently_used_model_makes_room(checkpoint, other_checkpoint):
    engine = Engine(max_pipelines=1)
    for path in (checkpoint, other_checkpoint, checkpoint):
        _txt2img(engine, ModelFiles(checkpoint=path), steps=1)
    assert engine.loads == 3
    assert engine.cached_checkpoints == [checkpoint.resolve()]


def test_progress_is_reported_for_every_step_of_every_batch(engine, checkpoint):
    seen: list[tuple[int, int]] = []
    request = GenerationRequest.from_payload("txt2img", {**SMALL, "steps": 3, "n_iter": 2})
    engine.generate(request, ModelFiles(checkpoint=checkpoint), progress=lambda step, total: seen.append((step, total)))
    assert seen == [(step, 6) for step in range(1, 7)]


def test_a_cancelled_job_stops_and_the_next_one_runs(engine, checkpoint):
    steps: list[int] = []
    request = GenerationRequest.from_payload("txt2img", {**SMALL, "steps": 10, "n_iter": 3})
    with pytest.raises(GenerationCancelled):
        engine.generate(
            request,
            ModelFiles(checkpoint=checkpoint),
            progress=lambda step, total: steps.append(step),
            cancelled=lambda: len(steps) >= 2,
        )
    assert max(steps) < 10
    assert len(_txt2img(engine, ModelFiles(checkpoint=checkpoint)).images) == 1


def test_a_missing_checkpoint_is_a_readable_error(engine, tmp_path):
    # the worker's files, not the user's: not an Invalid
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _txt2img(engine, ModelFiles(checkpoint=tmp_path / "nowhere.safetensors"))


def test_an_unsupported_checkpoint_fails_as_the_users_mistake(engine, tmp_path):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UnsupportedCheckpoint, match="corrupt.safetensors could not be read") as caught:
        _txt2img(engine, ModelFiles(checkpoint=path))
    assert isinstance(caught.value, Invalid)


def test_clip_skip_from_override_settings_runs_and_changes_the_image(checkpoint):
    from services.inference.worker.engine import Engine, GenerationRequest, ModelFiles

    engine = Engine()

    def image(settings):
        request = GenerationRequest.from_payload(
            "txt2img",
            {"prompt": "a red cube", "steps": 3, "width": 64, "height": 64, "seed": 3, "override_settings": settings},
        )
        return engine.generate(request, ModelFiles(checkpoint=checkpoint)).images[0]

    assert image({"CLIP_stop_at_last_layers": 2}) != image({})


@pytest.mark.skipif(
    os.environ.get("ESD_FULL_SIZE_TESTS") != "1",
    reason="writes a 2 GB checkpoint: set ESD_FULL_SIZE_TESTS=1",
)
def test_a_full_size_sd15_checkpoint_loads_and_runs_offline(tmp_path, no_network):
    from diffusion.testing import make_sd15_checkpoint

    path = make_sd15_checkpoint(tmp_path / "sd15.safetensors", seed=0)
    request = GenerationRequest.from_payload("txt2img", {"prompt": "a cat", "steps": 1, "width": 64, "height": 64})
    result = Engine().generate(request, ModelFiles(checkpoint=path))
    assert len(result.images) == 1
