"""Random-weight Stable Diffusion checkpoints for tests and benchmarks, written as real files.

No weights can be downloaded here, so tests make their own: a tiny SD-1.5-shaped model (a few
MB, fast on a CPU) saved as one `.safetensors` file in the original single-file layout, plus a
LoRA, a VAE and an embedding made for it. The tiny architecture and its tokenizer travel in the
file's metadata, since the shipped full-size configs don't fit it. `make_sd15_checkpoint` writes
the full-size architecture with random weights, for speed measurements. For the extras and rembg:
tiny upscalers of real architectures (RealESRGAN's compact net, ESRGAN) as state dicts spandrel
recognises, and a tiny U^2-Net-shaped background remover exported to ONNX.

    python -m diffusion.testing --out tiny.safetensors [--seed N]
    python -m diffusion.testing --out sd15.safetensors --full-size
    python -m diffusion.testing --out tiny-sdxl.safetensors --sdxl
    python -m diffusion.testing --out 2x-tiny.pth --upscaler compact   # or esrgan
    python -m diffusion.testing --out u2net-tiny.onnx --rembg
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffusion import layout
from diffusion.checkpoints import TINY_METADATA_KEY, TINY_SDXL_METADATA_KEY, tiny_metadata
from diffusion.configs import SD15_CONFIGS, SDXL_CONFIGS, read_config
from diffusion.controlnets import TINY_CONTROLNET_METADATA_KEY, controlnet_config_for

CONTEXT_LENGTH = 77

# Words that become single tokens in the tiny vocabulary, so that prompts in tests look real.
_TINY_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "and",
    "with",
    "in",
    "on",
    "at",
    "by",
    "photo",
    "painting",
    "portrait",
    "picture",
    "of",
    "cat",
    "dog",
    "horse",
    "bird",
    "astronaut",
    "riding",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "sky",
    "sea",
    "forest",
    "city",
    "mountain",
    "house",
    "beautiful",
    "detailed",
    "high",
    "quality",
    "best",
    "worst",
    "low",
    "blurry",
    "ugly",
    "lowres",
    "man",
    "woman",
    "girl",
    "boy",
    "face",
    "tree",
    "flower",
    "sunset",
    "night",
    "day",
    "light",
    "dark",
    "style",
    "art",
    "anime",
    "realistic",
    "masterpiece",
]


def tiny_tokenizer_merges() -> list[tuple[str, str]]:
    """Byte-pair merges learnt on `_TINY_WORDS` until each word is one token: the most frequent
    adjacent pair is merged first (ties broken alphabetically), as BPE training does, so that
    applying the merges by rank gives back whole words."""
    words = [list(word[:-1]) + [word[-1] + "</w>"] for word in dict.fromkeys(_TINY_WORDS)]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in words:
            for pair in zip(symbols, symbols[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for index, symbols in enumerate(words):
            merged: list[str] = []
            position = 0
            while position < len(symbols):
                if tuple(symbols[position : position + 2]) == best:
                    merged.append(symbols[position] + symbols[position + 1])
                    position += 2
                else:
                    merged.append(symbols[position])
                    position += 1
            words[index] = merged


def tiny_configs(vocab_size: int) -> dict[str, dict]:
    """The tiny architecture: SD 1.5's shape (4 VAE levels, cross-attention in all UNet levels
    but the deepest, CLIP text encoder) with tiny widths."""
    return {
        "unet": {
            "_class_name": "UNet2DConditionModel",
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": [32, 64],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 32,
            "attention_head_dim": 4,
            "norm_num_groups": 32,
        },
        "vae": {
            "_class_name": "AutoencoderKL",
            "sample_size": 64,
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": [16, 16, 32, 32],
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "norm_num_groups": 8,
            "scaling_factor": 0.18215,
        },
        "text_encoder": {
            "model_type": "clip_text_model",
            "architectures": ["CLIPTextModel"],
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "max_position_embeddings": CONTEXT_LENGTH,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-05,
            "projection_dim": 32,
            "bos_token_id": vocab_size - 2,
            "eos_token_id": vocab_size - 1,
            "pad_token_id": vocab_size - 1,
        },
        "scheduler": read_config(SD15_CONFIGS / "scheduler" / "scheduler_config.json"),
    }


def _random_models(configs: dict[str, dict], seed: int):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(configs["unet"])
    vae = AutoencoderKL.from_config(configs["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    _trained_looking_norm(text_encoder)
    return unet, vae, text_encoder


def _trained_looking_norm(text_encoder: torch.nn.Module) -> None:
    """A freshly made final layer norm (weight 1, bias 0) gives every token a hidden state of
    mean 0; a trained CLIP's does not, and A1111's prompt emphasis rescales to that mean. A
    random bias makes the tiny encoder's output look like a trained one's."""
    norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    with torch.no_grad():
        norm.bias.normal_(0.0, 0.5)


def tiny_models(seed: int = 0) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """The tiny UNet, VAE and text encoder that `make_tiny_checkpoint(seed=seed)` saves."""
    return _random_models(tiny_configs(512 + len(tiny_tokenizer_merges()) + 2), seed)


def make_tiny_checkpoint(out_path: str | Path, seed: int = 0) -> Path:
    """Write a tiny SD-1.5-shaped checkpoint with random weights; the same seed gives the same
    file."""
    merges = tiny_tokenizer_merges()
    unet, vae, text_encoder = tiny_models(seed)
    # Saved configs come from the models, so that defaults filled in by diffusers travel too.
    metadata = {
        "unet": json.loads(unet.to_json_string()),
        "vae": json.loads(vae.to_json_string()),
        "text_encoder": json.loads(text_encoder.config.to_json_string()),
        "scheduler": read_config(SD15_CONFIGS / "scheduler" / "scheduler_config.json"),
        "tokenizer": {"merges": merges, "model_max_length": CONTEXT_LENGTH},
    }
    checkpoint = layout.sd_checkpoint(
        unet=unet.state_dict(),
        unet_config=unet.config,
        vae=vae.state_dict(),
        vae_config=vae.config,
        text_encoder=text_encoder.state_dict(),
        context_length=CONTEXT_LENGTH,
    )
    return _save(checkpoint, out_path, {TINY_METADATA_KEY: json.dumps(metadata)})


def tiny_sdxl_configs(vocab_size: int) -> dict[str, dict]:
    """The tiny SDXL architecture: SDXL's shape (no attention in the top level, text-time added
    conditioning, two text encoders whose penultimate states are concatenated, the second with a
    projection for the pooled embedding) with tiny widths."""
    base = tiny_configs(vocab_size)
    text_encoder_2 = {
        **base["text_encoder"],
        "architectures": ["CLIPTextModelWithProjection"],
        "hidden_act": "gelu",
        "pad_token_id": 0,
    }
    addition_time_embed_dim = 8
    unet = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2],
        "cross_attention_dim": base["text_encoder"]["hidden_size"] + text_encoder_2["hidden_size"],
        "attention_head_dim": [2, 4],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": addition_time_embed_dim,
        "projection_class_embeddings_input_dim": text_encoder_2["projection_dim"] + 6 * addition_time_embed_dim,
        "norm_num_groups": 32,
    }
    vae = {**base["vae"], "scaling_factor": 0.13025}
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": base["text_encoder"],
        "text_encoder_2": text_encoder_2,
        "scheduler": read_config(SDXL_CONFIGS / "scheduler" / "scheduler_config.json"),
    }


def tiny_sdxl_models(seed: int = 0):
    """The tiny SDXL UNet, VAE and two text encoders that `make_tiny_sdxl_checkpoint` saves."""
    configs = tiny_sdxl_configs(512 + len(tiny_tokenizer_merges()) + 2)
    unet, vae, text_encoder = _random_models(configs, seed)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    _trained_looking_norm(text_encoder_2)
    return unet, vae, text_encoder, text_encoder_2


def make_tiny_sdxl_checkpoint(out_path: str | Path, seed: int = 0) -> Path:
    """Write a tiny SDXL-shaped checkpoint (original SGM key layout) with random weights; its
    configs and tokenizer travel in the metadata, as for `make_tiny_checkpoint`."""
    merges = tiny_tokenizer_merges()
    unet, vae, text_encoder, text_encoder_2 = tiny_sdxl_models(seed)
    metadata = {
        "unet": json.loads(unet.to_json_string()),
        "vae": json.loads(vae.to_json_string()),
        "text_encoder": json.loads(text_encoder.config.to_json_string()),
        "text_encoder_2": json.loads(text_encoder_2.config.to_json_string()),
        "scheduler": read_config(SDXL_CONFIGS / "scheduler" / "scheduler_config.json"),
        "tokenizer": {"merges": merges, "model_max_length": CONTEXT_LENGTH},
    }
    checkpoint = layout.sdxl_checkpoint(
        unet=unet.state_dict(),
        unet_config=unet.config,
        vae=vae.state_dict(),
        vae_config=vae.config,
        text_encoder=text_encoder.state_dict(),
        text_encoder_2=text_encoder_2.state_dict(),
        context_length=CONTEXT_LENGTH,
    )
    return _save(checkpoint, out_path, {TINY_SDXL_METADATA_KEY: json.dumps(metadata)})


def make_sd15_checkpoint(out_path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write a full-size Stable Diffusion 1.5 checkpoint (about 2 GB in fp16) with random
    weights, for load and speed measurements; it needs no metadata, like a user's file."""
    configs = {name: read_config(SD15_CONFIGS / name / "config.json") for name in ("unet", "vae", "text_encoder")}
    unet, vae, text_encoder = _random_models(configs, seed)
    checkpoint = layout.sd_checkpoint(
        unet=unet.state_dict(),
        unet_config=unet.config,
        vae=vae.state_dict(),
        vae_config=vae.config,
        text_encoder=text_encoder.state_dict(),
        context_length=CONTEXT_LENGTH,
    )
    checkpoint = {key: tensor.to(dtype) if tensor.is_floating_point() else tensor for key, tensor in checkpoint.items()}
    return _save(checkpoint, out_path, {})


def make_tiny_lora(base_checkpoint: str | Path, out_path: str | Path, seed: int = 0, rank: int = 4) -> Path:
    """A LoRA for the tiny model in the kohya / AUTOMATIC1111 layout
    (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`) on every attention
    projection of the UNet and the text encoder, with weights large enough to change images."""
    metadata = tiny_metadata(base_checkpoint)
    if metadata is None:
        raise ValueError(f"{base_checkpoint} is not a tiny checkpoint")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(metadata["unet"])
    text_encoders = [("lora_te", CLIPTextModel(CLIPTextConfig(**metadata["text_encoder"])))]
    if "text_encoder_2" in metadata:  # SDXL: kohya numbers the two encoders
        text_encoders = [
            ("lora_te1", text_encoders[0][1]),
            ("lora_te2", CLIPTextModelWithProjection(CLIPTextConfig(**metadata["text_encoder_2"]))),
        ]
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}

    def add(prefix: str, module_name: str, module: torch.nn.Linear) -> None:
        name = f"{prefix}_{module_name.replace('.', '_')}"
        down = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
        up = torch.randn(module.out_features, rank, generator=generator)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))

    for module_name, module in unet.named_modules():
        if re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", module_name):
            add("lora_unet", module_name, module)
    for prefix, text_encoder in text_encoders:
        for module_name, module in text_encoder.named_modules():
            if isinstance(module, torch.nn.Linear) and module_name.split(".")[-1] in {
                "q_proj",
                "k_proj",
                "v_proj",
                "out_proj",
            }:
                # kohya names text encoder modules from the `text_model` level
                full_name = module_name if module_name.startswith("text_model.") else f"text_model.{module_name}"
                add(prefix, full_name, module)
    return _save(tensors, out_path, {"ss_network_dim": str(rank), "ss_network_alpha": str(rank)})


def make_tiny_vae(base_checkpoint: str | Path, out_path: str | Path, seed: int = 1) -> Path:
    """A standalone VAE for the tiny model, in the single-file VAE layout (`encoder.*`,
    `decoder.*`, `quant_conv.*`, `post_quant_conv.*`), with other random weights."""
    metadata = tiny_metadata(base_checkpoint)
    if metadata is None:
        raise ValueError(f"{base_checkpoint} is not a tiny checkpoint")
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(metadata["vae"])
    tensors = layout.vae_to_ldm(vae.state_dict(), vae.config)
    return _save({key: tensor.contiguous() for key, tensor in tensors.items()}, out_path, {})


def make_tiny_embedding(base_checkpoint: str | Path, out_path: str | Path, seed: int = 0, vectors: int = 2) -> Path:
    """A textual-inversion embedding for the tiny model in AUTOMATIC1111's safetensors layout
    (`emb_params`: one row per vector)."""
    metadata = tiny_metadata(base_checkpoint)
    if metadata is None:
        raise ValueError(f"{base_checkpoint} is not a tiny checkpoint")
    generator = torch.Generator().manual_seed(seed)
    width = metadata["text_encoder"]["hidden_size"]
    return _save({"emb_params": torch.randn(vectors, width, generator=generator)}, out_path, {})


def make_tiny_controlnet(
    base_checkpoint: str | Path, out_path: str | Path, seed: int = 0, diffusers_layout: bool = False
) -> Path:
    """A ControlNet for a tiny checkpoint (SD 1.5- or SDXL-shaped: it follows the base's UNet),
    with random weights, saved in the original layout AUTOMATIC1111's extension reads
    (`input_hint_block.*`, `zero_convs.*`, `input_blocks.*`) or, with `diffusers_layout`, under
    diffusers' names. Its zero convolutions are not zero, so that it changes images."""
    metadata = tiny_metadata(base_checkpoint)
    if metadata is None:
        raise ValueError(f"{base_checkpoint} is not a tiny checkpoint")
    torch.manual_seed(seed)
    config = controlnet_config_for(UNet2DConditionModel.from_config(metadata["unet"]).config)
    controlnet = ControlNetModel.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in controlnet.named_parameters():
        if name.startswith(("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")):
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.5
    state = controlnet.state_dict()
    if not diffusers_layout:
        state = layout.controlnet_to_ldm(state, config)
    config_text = json.dumps({**json.loads(controlnet.to_json_string()), "_class_name": "ControlNetModel"})
    return _save(
        {key: tensor.contiguous() for key, tensor in state.items()},
        out_path,
        {TINY_CONTROLNET_METADATA_KEY: config_text},
    )


# --- image models of the extras and of rembg --------------------------------------------------


def tiny_upscaler_model(arch: str = "compact", scale: int = 2, seed: int = 0) -> torch.nn.Module:
    """An upscaler of a real architecture with random weights, small enough for a CPU:
    RealESRGAN's compact SRVGGNet (`compact`: 8 features, 2 convolutions, so it sees 4 pixels
    around each pixel) or ESRGAN's RRDBNet (`esrgan`: 8 filters, one block)."""
    from diffusion.image_models import import_spandrel

    import_spandrel()
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    if arch == "compact":
        return Compact(num_feat=8, num_conv=2, upscale=scale).eval()
    if arch == "esrgan":
        return ESRGAN(num_filters=8, num_blocks=1, scale=scale).eval()
    raise ValueError(f"unknown tiny upscaler architecture {arch!r} (compact or esrgan)")


def make_tiny_upscaler(out_path: str | Path, *, arch: str = "compact", scale: int = 2, seed: int = 0) -> Path:
    """A tiny upscaler's state dict, as spandrel recognises it: `.safetensors`, or a `.pth`
    pickle like the files people share."""
    model = tiny_upscaler_model(arch, scale, seed)
    tensors = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}
    out = Path(out_path)
    if out.suffix == ".safetensors":
        return _save(tensors, out, {})
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, out)
    return out


class _ConvBlock(torch.nn.Sequential):
    def __init__(self, channels_in: int, channels_out: int, dilation: int = 1) -> None:
        super().__init__(
            torch.nn.Conv2d(channels_in, channels_out, 3, padding=dilation, dilation=dilation),
            torch.nn.BatchNorm2d(channels_out),
            torch.nn.ReLU(inplace=True),
        )


class _ResidualUBlock(torch.nn.Module):
    """U^2-Net's RSU block: a small U-Net of `height` levels inside a residual connection."""

    def __init__(self, height: int, channels_in: int, middle: int, channels_out: int) -> None:
        super().__init__()
        self.entry = _ConvBlock(channels_in, channels_out)
        self.down = torch.nn.ModuleList(
            [_ConvBlock(channels_out, middle)] + [_ConvBlock(middle, middle) for _ in range(height - 2)]
        )
        self.bottom = _ConvBlock(middle, middle, dilation=2)
        self.up = torch.nn.ModuleList(
            [_ConvBlock(2 * middle, middle) for _ in range(height - 2)] + [_ConvBlock(2 * middle, channels_out)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        entry = self.entry(x)
        skips, hidden = [], entry
        for index, block in enumerate(self.down):
            if index:
                hidden = torch.nn.functional.max_pool2d(hidden, 2, ceil_mode=True)
            hidden = block(hidden)
            skips.append(hidden)
        hidden = self.bottom(hidden)
        for block, skip in zip(self.up, reversed(skips), strict=True):
            hidden = torch.nn.functional.interpolate(hidden, size=skip.shape[2:], mode="bilinear")
            hidden = block(torch.cat([hidden, skip], dim=1))
        return hidden + entry


class TinyU2Net(torch.nn.Module):
    """U^2-Net's shape, shrunk: nested RSU blocks in a two-level U, one side output per decoder
    stage and a fused one, all through a sigmoid; the fused map comes first, as in the rembg
    family's ONNX files."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stage1 = _ResidualUBlock(4, 3, width // 2, width)
        self.stage2 = _ResidualUBlock(3, width, width // 2, width)
        self.stage3 = _ResidualUBlock(2, width, width // 2, width)
        self.decode2 = _ResidualUBlock(3, 2 * width, width // 2, width)
        self.decode1 = _ResidualUBlock(4, 2 * width, width // 2, width)
        self.sides = torch.nn.ModuleList([torch.nn.Conv2d(width, 1, 3, padding=1) for _ in range(3)])
        self.fuse = torch.nn.Conv2d(3, 1, 1)

    def forward(self, x: torch.Tensor):
        pool = torch.nn.functional.max_pool2d
        first = self.stage1(x)
        second = self.stage2(pool(first, 2, ceil_mode=True))
        third = self.stage3(pool(second, 2, ceil_mode=True))
        up = torch.nn.functional.interpolate(third, size=second.shape[2:], mode="bilinear")
        decoded2 = self.decode2(torch.cat([up, second], dim=1))
        up = torch.nn.functional.interpolate(decoded2, size=first.shape[2:], mode="bilinear")
        decoded1 = self.decode1(torch.cat([up, first], dim=1))
        sides = [
            torch.nn.functional.interpolate(side(stage), size=x.shape[2:], mode="bilinear")
            for side, stage in zip(self.sides, (decoded1, decoded2, third), strict=True)
        ]
        fused = self.fuse(torch.cat(sides, dim=1))
        return tuple(torch.sigmoid(map_) for map_ in (fused, *sides))


def make_tiny_rembg_model(out_path: str | Path, *, size: int = 320, seed: int = 0) -> Path:
    """A tiny U^2-Net-shaped background remover exported to ONNX with a fixed (1, 3, size,
    size) input, as the rembg family's files have (320 for u2net/u2netp, 1024 for isnet)."""
    import warnings

    torch.manual_seed(seed)
    model = TinyU2Net().eval()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter says it is the old one
        torch.onnx.export(
            model,
            (torch.rand(1, 3, size, size),),
            str(out),
            input_names=["input.1"],
            output_names=["d0", "d1", "d2", "d3"],
            opset_version=17,
            dynamo=False,
        )
    return out


def _save(tensors: dict[str, torch.Tensor], out_path: str | Path, metadata: dict[str, str]) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="the file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-size", action="store_true", help="SD 1.5's real size (fp16, ~2 GB)")
    parser.add_argument("--sdxl", action="store_true", help="the tiny SDXL-shaped model")
    parser.add_argument("--upscaler", choices=["compact", "esrgan"], help="a tiny 2x upscaler (.pth or .safetensors)")
    parser.add_argument("--rembg", action="store_true", help="a tiny U^2-Net-shaped rembg model (.onnx)")
    args = parser.parse_args(argv)
    if args.upscaler:
        path = make_tiny_upscaler(args.out, arch=args.upscaler, seed=args.seed)
    elif args.rembg:
        path = make_tiny_rembg_model(args.out, seed=args.seed)
    elif args.sdxl:
        path = make_tiny_sdxl_checkpoint(args.out, seed=args.seed)
    elif args.full_size:
        path = make_sd15_checkpoint(args.out, seed=args.seed)
    else:
        path = make_tiny_checkpoint(args.out, seed=args.seed)
    print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
