"""Tiny random-weight models written once per session as real files, and a guard that fails
any attempt to reach a host other than this machine (loading must never need the hub).

The conftests of the test folders that need them import these fixtures by name.
"""

from __future__ import annotations

import os

# Read by huggingface_hub when it is first imported: set before diffusers is.
os.environ["HF_HUB_OFFLINE"] = "1"

import socket
from pathlib import Path

import pytest

from diffusion import testing

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


@pytest.fixture
def no_network(monkeypatch):
    """Any lookup or connection to a non-local host fails the test."""
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host not in LOCAL_HOSTS:
            raise AssertionError(f"the code under test tried to reach {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in LOCAL_HOSTS:
            raise AssertionError(f"the code under test tried to connect to {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def checkpoint(model_dir) -> Path:
    return testing.make_tiny_checkpoint(model_dir / "tiny-a.safetensors", seed=0)


@pytest.fixture(scope="session")
def other_checkpoint(model_dir) -> Path:
    return testing.make_tiny_checkpoint(model_dir / "tiny-b.safetensors", seed=1)


@pytest.fixture(scope="session")
def sdxl_checkpoint(model_dir) -> Path:
    return testing.make_tiny_sdxl_checkpoint(model_dir / "tiny-sdxl.safetensors", seed=0)


@pytest.fixture(scope="session")
def lora(model_dir, checkpoint) -> Path:
    return testing.make_tiny_lora(checkpoint, model_dir / "style.safetensors", seed=2)


@pytest.fixture(scope="session")
def sdxl_lora(model_dir, sdxl_checkpoint) -> Path:
    return testing.make_tiny_lora(sdxl_checkpoint, model_dir / "sdxl-style.safetensors", seed=2)


@pytest.fixture(scope="session")
def vae(model_dir, checkpoint) -> Path:
    return testing.make_tiny_vae(checkpoint, model_dir / "other-vae.safetensors", seed=3)


@pytest.fixture(scope="session")
def embedding(model_dir, checkpoint) -> Path:
    return testing.make_tiny_embedding(checkpoint, model_dir / "mystyle.safetensors", seed=4)


@pytest.fixture(scope="session")
def upscaler(model_dir) -> Path:
    """RealESRGAN's compact architecture, 2x, as a `.pth` state dict."""
    return testing.make_tiny_upscaler(model_dir / "2x-tiny-compact.pth", arch="compact", scale=2)


@pytest.fixture(scope="session")
def esrgan_upscaler(model_dir) -> Path:
    """ESRGAN's RRDBNet, 2x, as `.safetensors`."""
    return testing.make_tiny_upscaler(model_dir / "2x-tiny-esrgan.safetensors", arch="esrgan", scale=2)


@pytest.fixture(scope="session")
def rembg_model(model_dir) -> Path:
    """A tiny U^2-Net-shaped background remover in ONNX, 320x320 input."""
    return testing.make_tiny_rembg_model(model_dir / "u2netp.onnx")


@pytest.fixture(scope="session")
def controlnet(model_dir, checkpoint) -> Path:
    """A tiny ControlNet for the tiny SD 1.5 model, in the original (A1111 extension) layout."""
    return testing.make_tiny_controlnet(checkpoint, model_dir / "control_tiny_canny.safetensors", seed=5)


@pytest.fixture(scope="session")
def sdxl_controlnet(model_dir, sdxl_checkpoint) -> Path:
    """A tiny SDXL ControlNet in diffusers' layout, as SDXL ControlNets are mostly published."""
    return testing.make_tiny_controlnet(
        sdxl_checkpoint, model_dir / "control_tiny_sdxl.safetensors", seed=6, diffusers_layout=True
    )
