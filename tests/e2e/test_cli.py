"""The `esd` command against a running stack, as a person or a script runs it (`python -m cli`,
the same program as the `esd` console script): sign in, upload a checkpoint in parallel parts
(and resume an interrupted upload), create an endpoint, generate, train a LoRA, cancel a job,
follow events, and fail in one line."""

import json
import os
import stat
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from cli.api import Api, ApiError
from cli.config import Config
from cli.uploads import MIN_PART, CheckpointUpload
from deploy.local.stack import REPO_ROOT
from tests.support import wait_for

pytestmark = pytest.mark.e2e


class Esd:
    """Runs `esd` with the stack's key and user in its environment and nothing else of the
    caller's: a config file and upload states of its own."""

    def __init__(self, stack, home: Path) -> None:
        self.home = home
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("ESD_")},
            "ESD_URL": stack.gateway_url,
            "ESD_API_KEY": stack.api_key,
            "ESD_USER": "admin",
            "ESD_CONFIG": str(home / "config.json"),
            "XDG_CACHE_HOME": str(home / "cache"),
            "COLUMNS": "200",
        }

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "cli", *args]

    def __call__(self, *args: str, ok: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(
            self.argv(*args), cwd=REPO_ROOT, env=env or self.env, capture_output=True, text=True, timeout=300
        )
        if ok:
            assert done.returncode == 0, f"esd {' '.join(args)}: {done.stderr}"
        return done

    def json(self, *args: str):
        return json.loads(self("--json", *args).stdout)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def esd(stack, tmp_path_factory) -> Esd:
    return Esd(stack, tmp_path_factory.mktemp("esd-home"))


@pytest.fixture(scope="module")
def model(esd, tmp_path_factory) -> str:
    from diffusion.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("cli-models") / f"{unique('tiny')}.safetensors", seed=0)
    checkpoint = esd.json("checkpoints", "upload", str(path), "--type", "Stable-diffusion")
    assert checkpoint["id"]
    return path.name


@pytest.fixture(scope="module")
def endpoint(esd, model) -> str:
    name = unique("cli")[:20]
    # one worker that stays (an autoscaled pool may give it back between tests)
    created = esd.json("endpoints", "create", name, "--wait", "--instance-type", "cpu", "--no-autoscaling")
    assert created["endpoint_status"] == "InService"
    yield created["endpoint_name"]
    esd("endpoints", "rm", created["endpoint_name"], ok=False)


def test_login_keeps_the_key_in_a_file_only_its_owner_reads(esd, stack):
    env = {k: v for k, v in esd.env.items() if k not in ("ESD_API_KEY", "ESD_USER")}
    config = Path(env["ESD_CONFIG"])
    done = esd("login", "--url", stack.gateway_url, "--key", stack.api_key, "--user", "admin", env=env)
    assert "signed in" in done.stdout
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert esd("ping", env=env).stdout.startswith("pong from")  # the file alone signs it in
    wrong = esd("ping", ok=False, env={**env, "ESD_API_KEY": "wrong"})  # the environment wins
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == "error: Forbidden: the API key is wrong (see `esd login`) (HTTP 403)"


def test_errors_are_one_line_and_a_non_zero_code(esd):
    done = esd("jobs", "show", "no-such-job", ok=False)
    assert done.returncode == 1
    assert done.stderr.strip() == "error: no inference job or training with id no-such-job (HTTP 404)"
    bad = esd("generate", "x", "--size", "100x100", ok=False)
    assert bad.returncode == 2 and "multiple of 8" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_upload_sends_parts_in_parallel_and_resumes_an_interrupted_upload(esd, stack, tmp_path):
    weights = np.random.default_rng(0).random(5 * MIN_PART // 2 // 4, dtype=np.float32)  # 2.5 parts
    path = tmp_path / f"{unique('big')}.safetensors"
    save_file({"w": weights}, str(path))

    class Interrupted(Exception):
        pass

    sent = 0

    def interrupt_in_the_second_part(count: int) -> None:
        nonlocal sent
        sent += count
        if sent > MIN_PART + MIN_PART // 2:
            raise Interrupted

    api = Api(Config(stack.gateway_url, stack.api_key, "admin"))
    first = CheckpointUpload(api, [path], "VAE", states=Path(esd.env["XDG_CACHE_HOME"]) / "esd" / "uploads", parallel=1)
    with pytest.raises(Interrupted):
        first.run(interrupt_in_the_second_part)
    assert list(first.state.files[0].etags) == ["1"]  # the first part is stored, the rest is not

    done = esd("--json", "checkpoints", "upload", str(path), "--type", "VAE", "--parallel", "4")
    assert f"resuming the upload of checkpoint {first.state.checkpoint_id}" in done.stderr
    checkpoint = json.loads(done.stdout)
    assert checkpoint["id"] == first.state.checkpoint_id
    listed = esd.json("checkpoints", "list", "--type", "VAE", "--status", "Active")
    assert path.name in [name for item in listed for name in item["name"]]
    assert not first.state_path.exists()  # done: nothing left to resume

    esd("checkpoints", "rm", path.name)
    with pytest.raises(ApiError):
        api.call("GET", f"/checkpoints/{checkpoint['id']}")


def test_generate_saves_the_images_and_prints_their_paths(esd, model, endpoint, tmp_path):
    done = esd("generate", "a red cube", "--steps", "4", "--size", "64x96", "--out", str(tmp_path / "defaults"))
    assert len(done.stdout.split()) == 1  # with the defaults of model and endpoint (the newest, the least busy)
    done = esd(
        "generate",
        "a red cube",
        "--negative",
        "blurry",
        "--steps",
        "4",
        "--size",
        "64x96",
        "--sampler",
        "DPM++ 2M",
        "--seed",
        "5",
        "--cfg",
        "6",
        "--batch",
        "2",
        "--model",
        Path(model).stem,
        "--endpoint",
        endpoint.removeprefix("esd-async-"),
        "--out",
        str(tmp_path),
    )
    paths = done.stdout.split()
    assert len(paths) == 2 and all(Path(p).parent == tmp_path for p in paths)
    for path in paths:
        with Image.open(path) as image:
            assert image.size == (64, 96)
            assert "Sampler: DPM++ 2M" in image.info["parameters"]

    result = esd.json("generate", "a blue cube", "--steps", "2", "--size", "64", "--out", str(tmp_path))
    assert result["status"] == "succeed" and len(result["images"]) == 1
    job = esd.json("jobs", "show", result["inference_id"])
    assert job["kind"] == "inference" and job["status"] == "succeed"
    listed = esd.json("jobs", "list", "--type", "txt2img")
    assert result["inference_id"] in [row["id"] for row in listed]

    source = Path(paths[0])
    again = esd.json(
        "img2img",
        str(source),
        "a red sphere",
        "--denoise",
        "0.5",
        "--steps",
        "4",
        "--size",
        "64x64",
        "--out",
        str(tmp_path),
    )
    assert again["status"] == "succeed"


def test_train_uploads_the_folder_and_prints_the_new_loras_name(esd, model, tmp_path):
    folder = tmp_path / "2_cube"
    folder.mkdir()
    for index in range(2):
        pixels = np.random.default_rng(index).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text("a red cube, studio light")
    name = unique("cube").replace("-", "_")
    done = esd(
        "train", str(folder), "--base", model, "--name", name, "--epochs", "2", "--resolution", "64", "--dim", "4"
    )
    assert done.stdout.strip() == f"{name}.safetensors"
    assert "on dataset cube-" in done.stderr
    loras = esd.json("checkpoints", "list", "--type", "Lora", "--status", "Active")
    assert f"{name}.safetensors" in [n for item in loras for n in item["name"]]
    trainings = esd.json("jobs", "list", "--type", "training")
    training = esd.json("jobs", "show", trainings[0]["id"])
    assert training["kind"] == "training" and training["job_status"] == "Completed"
    assert len(training["info"]["loss_curve"]) == training["info"]["steps"]


def test_a_running_job_is_canceled(esd, model, endpoint, tmp_path):
    running = subprocess.Popen(
        esd.argv(
            "generate", "slow", "--steps", "150", "--size", "256x256", "--endpoint", endpoint, "--out", str(tmp_path)
        ),
        cwd=REPO_ROOT,
        env=esd.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        job_id = wait_for(lambda: job_line(running), timeout=60, what="the job's id on standard error")
        wait_for(lambda: esd.json("jobs", "show", job_id).get("progress"), timeout=120, what="the job to run")
        assert esd("jobs", "cancel", job_id).stdout.strip() == f"{job_id} canceled"
        _, errors = running.communicate(timeout=60)
    finally:
        running.kill()
    assert running.returncode == 1
    assert errors.strip().splitlines()[-1] == f"error: job {job_id} canceled: no reason given"
    assert esd.json("jobs", "show", job_id)["status"] == "canceled"


def job_line(process: subprocess.Popen) -> str | None:
    line = process.stderr.readline()
    return line.split()[1] if line.startswith("job ") else None


def test_events_are_followed_and_resumed(esd, model, endpoint, tmp_path):
    result = esd.json(
        "generate", "a cube", "--steps", "3", "--size", "64", "--endpoint", endpoint, "--out", str(tmp_path)
    )
    job_id = result["inference_id"]
    follower = subprocess.Popen(
        esd.argv("--json", "events", "--type", "inference.*", "--last-event-id", "0"),
        cwd=REPO_ROOT,
        env=esd.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    seen: list[dict] = []
    watchdog = threading.Timer(60, follower.kill)  # a stream that never shows the end fails the test
    watchdog.start()
    try:

        def finished() -> bool:
            line = follower.stdout.readline()
            assert line, "the event stream ended"
            event = json.loads(line)
            if event["data"].get("inference_id") == job_id:
                seen.append(event)
            return event["type"] == "inference.succeeded" and event["data"]["inference_id"] == job_id

        wait_for(finished, timeout=60, interval=0, what="the job's events")
    finally:
        watchdog.cancel()
        follower.kill()
    kinds = [event["type"] for event in seen]
    assert kinds[:2] == ["inference.created", "inference.started"]
    assert kinds.count("inference.progress") == 3 and kinds[-1] == "inference.succeeded"
    assert all(event["type"].startswith("inference.") for event in seen)
    ids = [event["id"] for event in seen]
    assert ids == sorted(ids)
