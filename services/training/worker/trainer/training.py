"""LoRA training of a Stable Diffusion 1.x or SDXL checkpoint on a kohya dataset folder.

The base model's parts are loaded by the shared `diffusion` package (the same single-file
checkpoints the inference engine reads; no hub, no pipeline). peft adds LoRA layers to the
UNet's attention projections (and, if asked, the text encoder's); the loss is the usual
noise-prediction MSE under the checkpoint's DDPM noise schedule. The VAE is frozen, so every
image is encoded once before training, and so is the text encoder unless it is trained, so
every caption is encoded once as well: a training step is then only the UNet's forward and
backward pass and the optimizer's update.

`Trainer` holds one run: `prepare()` does the loading and caching, each `step()` one optimizer
update. `train_lora` drives it through the epochs, reports progress, honours cancellation and
writes the kohya-layout files; a benchmark can time `Trainer.step()` alone.
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from peft import LoraConfig, inject_adapter_in_model

from diffusion.components import load_components
from services.training.worker.trainer import kohya_format
from services.training.worker.trainer.dataset import load_pixels, read_dataset
from shared.contracts.kohya import InvalidTrainingConfig, TrainingConfig
from shared.errors import Invalid

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
_ENCODE_BATCH = 8  # images per VAE pass, and captions per text encoder pass, while caching
_PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TrainingProgress:
    epoch: int  # 1-based, the epoch the step belongs to
    epochs: int
    step: int  # optimizer updates done so far
    steps: int
    loss: float  # the step's loss (mean over its accumulated batches)


@dataclass
class TrainingResult:
    final: Path  # <output_name>.safetensors
    checkpoints: list[Path]  # <output_name>-<epoch:06d>.safetensors, every save_every_n_epochs
    steps: int
    epochs: int
    seed: int
    losses: list[float]  # one per step
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


class TrainingCancelled(Exception):
    """`cancelled()` answered True; the run stopped and its final file was not written."""


class TrainingDiverged(Invalid):
    """The loss or the weights became NaN or infinite: the user's learning rate is too high."""


class Trainer:
    """One LoRA training run. Construction only checks the arguments; `prepare()` loads the
    model and the dataset; each `step()` makes one optimizer update and returns its progress.
    `step()` may be called past `steps` (the data keeps cycling), e.g. to time it."""

    def __init__(
        self,
        base_checkpoint: Path,
        dataset_dir: Path,
        config: TrainingConfig,
        *,
        device: str | torch.device = "cpu",
    ):
        self.base_checkpoint = Path(base_checkpoint)
        self.dataset_dir = Path(dataset_dir)
        self.config = config
        self.device = torch.device(device)
        self.seed = config.seed if config.seed is not None else random.randrange(2**32)
        self.warnings: list[str] = []
        self.weight_dtype = torch.float32
        if config.mixed_precision != "no":
            if self.device.type == "cuda":
                self.weight_dtype = _PRECISIONS[config.mixed_precision]
            else:
                self.warnings.append(
                    f"mixed_precision {config.mixed_precision} needs CUDA; trained in fp32 on the {self.device.type}"
                )
        self.global_step = 0
        self.epoch = 0
        self._prepared = False

    # Setting up.

    def prepare(self) -> None:
        """Read the dataset, load the model, add the LoRA layers, cache latents (and caption
        embeddings), build the optimizer. Bad data, a model that cannot be trained or arguments
        that do not fit it raise an Invalid (shared.errors) before any training."""
        config = self.config
        started = time.time()
        self.images = read_dataset(self.dataset_dir, config.caption_extension)
        uncaptioned = sum(1 for image in self.images if not image.caption)
        if uncaptioned:
            self.warnings.append(
                f"{uncaptioned} of {len(self.images)} images have no caption and no <repeats>_<concept> folder; "
                "they are trained with an empty prompt"
            )

        components = load_components(self.base_checkpoint, device=self.device, dtype=self.weight_dtype)
        self.sdxl = components.is_sdxl
        if self.sdxl != (config.fm_type == "sd_xl"):
            found = "an SDXL" if self.sdxl else "a Stable Diffusion 1.x"
            raise InvalidTrainingConfig(f"fm_type: {config.fm_type} does not match the base model, {found} checkpoint")
        self.unet = components.unet
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        # SDXL: the second (OpenCLIP bigG) encoder, whose pooled projection conditions the UNet too
        self.text_encoder_2 = components.text_encoder_2
        self.tokenizer_2 = components.tokenizer_2
        for model in (self.unet, self.text_encoder, self.text_encoder_2, components.vae):
            if model is not None:
                model.requires_grad_(False)
        layers = self.text_encoder.config.num_hidden_layers
        if config.clip_skip > layers:
            raise InvalidTrainingConfig(
                f"clip_skip: {config.clip_skip} is more than the text encoder's {layers} layers"
            )
        if self.sdxl:
            # (original size, crop top-left, target size) as SDXL's micro-conditioning wants them:
            # the training resolution, uncropped (diffusers' defaults at generation time)
            width, height = config.resolution
            self._time_ids = torch.tensor(
                [[height, width, 0, 0, height, width]], dtype=torch.float32, device=self.device
            )
        self._autocast = (
            (lambda: torch.autocast(device_type=self.device.type, dtype=self.weight_dtype))
            if self.weight_dtype != torch.float32
            else contextlib.nullcontext
        )

        # Noise schedule: the checkpoint's betas, as DDPM defines them for training.
        noise_scheduler = DDPMScheduler.from_config(components.scheduler_config)
        alphas_cumprod = noise_scheduler.alphas_cumprod.to(self.device, torch.float32)
        self._sqrt_alpha = alphas_cumprod.sqrt()
        self._sqrt_one_minus_alpha = (1 - alphas_cumprod).sqrt()
        self._timesteps = noise_scheduler.config.num_train_timesteps
        self._v_prediction = noise_scheduler.config.prediction_type == "v_prediction"

        self._cache_latents(components.vae)
        del components  # the VAE is not needed any more
        self._add_lora()
        self._cache_captions()
        self._plan_batches()
        self._build_optimizer()
        self._noise = torch.Generator(device=self.device).manual_seed(self.seed)
        self.metadata = kohya_format.training_metadata(
            config,
            seed=self.seed,
            images=self.images,
            batches_per_epoch=self.batches_per_epoch,
            epochs=self.epochs,
            steps=self.steps,
            base_model=self.base_checkpoint,
            optimizer=f"{type(self.optimizer).__module__}.{type(self.optimizer).__name__}",
            started_at=started,
            session_id=random.randrange(2**31),
        )
        self._prepared = True

    def _cache_latents(self, vae: torch.nn.Module) -> None:
        resolution = self.config.resolution
        latents = []
        enlarged = 0
        # SDXL's VAE overflows in fp16 (its config says `force_upcast`): encode in fp32 then
        vae_dtype = self.weight_dtype
        if self.weight_dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae_dtype = torch.float32
            vae.to(vae_dtype)
        autocast = self._autocast if vae_dtype == self.weight_dtype else contextlib.nullcontext
        for start in range(0, len(self.images), _ENCODE_BATCH):
            pixels = []
            for image in self.images[start : start + _ENCODE_BATCH]:
                tensor, was_enlarged = load_pixels(image, resolution)
                pixels.append(tensor)
                enlarged += was_enlarged
            batch = torch.stack(pixels).to(self.device, vae_dtype)
            with torch.no_grad(), autocast():
                # The mean, not a sample: one sample drawn once and reused is no augmentation.
                encoded = vae.encode(batch).latent_dist.mode()
            latents.append(encoded.float() * vae.config.scaling_factor)
        self.latents = torch.cat(latents)
        if enlarged:
            self.warnings.append(
                f"{enlarged} of {len(self.images)} images are smaller than {resolution[0]}x{resolution[1]} "
                "and were enlarged"
            )

    def _add_lora(self) -> None:
        config = self.config
        lora = {"r": config.network_dim, "lora_alpha": config.alpha, "init_lora_weights": True}
        # The LoRA's initial weights come from the run's seed, without disturbing the process's RNG.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            inject_adapter_in_model(LoraConfig(target_modules=UNET_TARGETS, **lora), self.unet)
            if config.train_text_encoder:
                for text_encoder in self._text_encoders():
                    inject_adapter_in_model(LoraConfig(target_modules=TEXT_ENCODER_TARGETS, **lora), text_encoder)
        self.unet_parameters = [p for p in self.unet.parameters() if p.requires_grad]
        self.text_encoder_parameters = (
            [p for text_encoder in self._text_encoders() for p in text_encoder.parameters() if p.requires_grad]
            if config.train_text_encoder
            else []
        )
        for parameter in (*self.unet_parameters, *self.text_encoder_parameters):
            parameter.data = parameter.data.float()  # trained in fp32 whatever the base model's dtype
        self.unet.train()
        if config.train_text_encoder:
            for text_encoder in self._text_encoders():
                text_encoder.train()
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if config.train_text_encoder:
                for text_encoder in self._text_encoders():
                    text_encoder.gradient_checkpointing_enable()

    def _text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    def _cache_captions(self) -> None:
        captions = list(dict.fromkeys(image.caption for image in self.images))
        index = {caption: position for position, caption in enumerate(captions)}
        self._image_caption = torch.tensor([index[image.caption] for image in self.images], device=self.device)
        tokenizers = [self.tokenizer] + ([self.tokenizer_2] if self.sdxl else [])
        # one row per caption: the ids of each tokenizer side by side
        ids = torch.cat(
            [
                tokenizer(
                    captions,
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
                for tokenizer in tokenizers
            ],
            dim=1,
        ).to(self.device)
        self._caption_pooled = None
        if self.config.train_text_encoder:
            self._caption_ids = ids
            self._caption_states = None
            return
        with torch.no_grad(), self._autocast():
            encoded = [self._encode_captions(chunk) for chunk in ids.split(_ENCODE_BATCH)]
        self._caption_states = torch.cat([states for states, _ in encoded])
        if self.sdxl:
            self._caption_pooled = torch.cat([pooled for _, pooled in encoded])

    def _encode_captions(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the UNet's cross-attention states, SDXL's pooled text embedding or None)."""
        if not self.sdxl:
            return self._encode_text(ids), None
        first, second = ids.split(ids.shape[1] // 2, dim=1)
        # As SDXL was trained and its pipeline generates: both encoders' penultimate layer
        # (clip_skip moves further back), concatenated; the pooled projection of the second.
        layer = -(self.config.clip_skip + 1)
        states_1 = self.text_encoder(first, output_hidden_states=True).hidden_states[layer]
        output_2 = self.text_encoder_2(second, output_hidden_states=True)
        return torch.cat([states_1, output_2.hidden_states[layer]], dim=-1), output_2.text_embeds

    def _encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        if self.config.clip_skip == 1:
            return self.text_encoder(ids, return_dict=False)[0]
        hidden = self.text_encoder(ids, output_hidden_states=True).hidden_states[-self.config.clip_skip]
        # as kohya and A1111 do: the earlier layer's output through the final layer norm
        return getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm(hidden)

    def _build_optimizer(self) -> None:
        config = self.config
        groups = [{"params": self.unet_parameters, "lr": config.unet_learning_rate}]
        if self.text_encoder_parameters:
            groups.append({"params": self.text_encoder_parameters, "lr": config.text_encoder_learning_rate})
        self.optimizer = None
        if config.optimizer_type == "AdamW8bit":
            self.optimizer = self._adamw_8bit(groups)
        if self.optimizer is None:
            # fused: one kernel for the whole update on CUDA
            self.optimizer = torch.optim.AdamW(groups, fused=self.device.type == "cuda")
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler,
            self.optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=self.steps,
        )
        self._scaler = torch.amp.GradScaler(self.device.type) if self.weight_dtype == torch.float16 else None

    def _adamw_8bit(self, groups: list[dict]) -> torch.optim.Optimizer | None:
        if self.device.type != "cuda":
            self.warnings.append(f"optimizer AdamW8bit needs CUDA; trained with AdamW on the {self.device.type}")
            return None
        try:
            import bitsandbytes
        except ImportError:
            self.warnings.append("optimizer AdamW8bit needs bitsandbytes, which is not installed; trained with AdamW")
            return None
        return bitsandbytes.optim.AdamW8bit(groups)

    def _plan_batches(self) -> None:
        config = self.config
        # One entry per image and repeat: an epoch sees each image `repeats` times.
        self._item_image = torch.tensor(
            [position for position, image in enumerate(self.images) for _ in range(image.repeats)]
        )
        self.batches_per_epoch = math.ceil(len(self._item_image) / config.train_batch_size)
        self.updates_per_epoch = math.ceil(self.batches_per_epoch / config.gradient_accumulation_steps)
        self.steps = config.max_train_steps or config.max_train_epochs * self.updates_per_epoch
        self.epochs = math.ceil(self.steps / self.updates_per_epoch)
        self._shuffle = torch.Generator().manual_seed(self.seed)
        self._plan = self._updates()

    def _updates(self) -> Iterator[tuple[int, tuple[torch.Tensor, ...]]]:
        """(epoch, the image indices of each batch of one update), epoch after epoch."""
        epoch = 0
        while True:
            epoch += 1
            order = self._item_image[torch.randperm(len(self._item_image), generator=self._shuffle)]
            batches = order.to(self.device).split(self.config.train_batch_size)
            accumulation = self.config.gradient_accumulation_steps
            for start in range(0, len(batches), accumulation):
                yield epoch, batches[start : start + accumulation]

    # Training.

    def step(self) -> TrainingProgress:
        """One optimizer update (over `gradient_accumulation_steps` batches)."""
        if not self._prepared:
            raise RuntimeError("Trainer.prepare() must be called before step()")
        epoch, batches = next(self._plan)
        total = None
        for images in batches:
            with self._autocast():
                loss = self._loss(images)
            share = loss / len(batches) if len(batches) > 1 else loss
            (self._scaler.scale(share) if self._scaler else share).backward()
            total = loss.detach() if total is None else total + loss.detach()
        if self._scaler:
            self._scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(
                (*self.unet_parameters, *self.text_encoder_parameters), self.config.max_grad_norm
            )
        if self._scaler:
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.epoch = epoch
        loss_value = (total / len(batches)).item()
        if not math.isfinite(loss_value) and self._scaler is None:
            raise TrainingDiverged(f"the loss became {loss_value} at step {self.global_step}; lower the learning_rate")
        return TrainingProgress(
            epoch=epoch, epochs=self.epochs, step=self.global_step, steps=self.steps, loss=loss_value
        )

    def _loss(self, images: torch.Tensor) -> torch.Tensor:
        latents = self.latents[images]
        captions = self._image_caption[images]
        if self._caption_states is not None:
            states = self._caption_states[captions]
            pooled = self._caption_pooled[captions] if self._caption_pooled is not None else None
        else:
            states, pooled = self._encode_captions(self._caption_ids[captions])
        noise = torch.randn(latents.shape, generator=self._noise, device=self.device)
        if self.config.noise_offset:
            offset = torch.randn((*latents.shape[:2], 1, 1), generator=self._noise, device=self.device)
            noise = noise + self.config.noise_offset * offset
        timesteps = torch.randint(0, self._timesteps, (latents.shape[0],), generator=self._noise, device=self.device)
        signal = self._sqrt_alpha[timesteps].view(-1, 1, 1, 1)
        spread = self._sqrt_one_minus_alpha[timesteps].view(-1, 1, 1, 1)
        noisy = signal * latents + spread * noise
        target = signal * noise - spread * latents if self._v_prediction else noise
        added = None
        if self.sdxl:
            added = {
                "text_embeds": pooled.to(states.dtype),
                "time_ids": self._time_ids.expand(latents.shape[0], -1).to(states.dtype),
            }
        prediction = self.unet(noisy, timesteps, states, added_cond_kwargs=added, return_dict=False)[0]
        return F.mse_loss(prediction.float(), target, reduction="mean")

    @property
    def epoch_finished(self) -> bool:
        return self.global_step > 0 and (
            self.global_step % self.updates_per_epoch == 0 or self.global_step == self.steps
        )

    # Results.

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA as it stands, in kohya's layout and the configured save precision."""
        train_text = self.config.train_text_encoder
        return kohya_format.lora_tensors(
            self.unet,
            self.text_encoder if train_text else None,
            text_encoder_2=self.text_encoder_2 if train_text else None,
            alpha=self.config.alpha,
            dtype=kohya_format.SAVE_DTYPES[self.config.save_precision],
        )

    def save(self, path: Path) -> Path:
        tensors = self.lora_state_dict()
        if not all(torch.isfinite(tensor).all() for tensor in tensors.values()):
            raise TrainingDiverged(
                f"the LoRA's weights became NaN or infinite by step {self.global_step}; lower the learning_rate"
            )
        return kohya_format.save_lora(path, tensors, self.metadata, epoch=self.epoch, steps=self.global_step)

    def release(self) -> None:
        """Drop the models, and give their memory back to the device."""
        for name in (
            "unet",
            "text_encoder",
            "text_encoder_2",
            "optimizer",
            "latents",
            "_caption_states",
            "_caption_pooled",
            "_plan",
        ):
            self.__dict__.pop(name, None)
        self._prepared = False
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def train_lora(
    base_checkpoint: Path,
    dataset_dir: Path,
    config: TrainingConfig,
    out_dir: Path,
    *,
    device: str | torch.device = "cpu",
    progress: Callable[[TrainingProgress], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> TrainingResult:
    """Train a LoRA and write `<output_name>.safetensors` (and the epoch files) into `out_dir`.

    `progress` is called after every step (throttling is the caller's business); `cancelled`
    is asked before every step and a True stops the run with `TrainingCancelled`. Arguments,
    data or models that cannot be used raise an Invalid (shared.errors: InvalidTrainingConfig,
    InvalidDataset, UnsupportedCheckpoint, TrainingDiverged) with a message meant for the user.
    """
    started = time.perf_counter()
    trainer = Trainer(base_checkpoint, dataset_dir, config, device=device)
    out_dir = Path(out_dir)
    try:
        trainer.prepare()
        checkpoints: list[Path] = []
        losses: list[float] = []
        every = config.save_every_n_epochs
        while trainer.global_step < trainer.steps:
            if cancelled is not None and cancelled():
                raise TrainingCancelled(f"the training was cancelled at step {trainer.global_step}")
            report = trainer.step()
            losses.append(report.loss)
            if progress is not None:
                progress(report)
            if every and trainer.epoch_finished and trainer.epoch % every == 0 and trainer.epoch < trainer.epochs:
                name = f"{config.output_name}-{trainer.epoch:06d}.safetensors"
                checkpoints.append(trainer.save(out_dir / name))
        final = trainer.save(out_dir / f"{config.output_name}.safetensors")
        return TrainingResult(
            final=final,
            checkpoints=checkpoints,
            steps=trainer.global_step,
            epochs=trainer.epoch,
            seed=trainer.seed,
            losses=losses,
            warnings=trainer.warnings,
            seconds=time.perf_counter() - started,
        )
    finally:
        trainer.release()
