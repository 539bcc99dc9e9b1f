"""The `esd` command's decisions: where its configuration comes from and who may read it, what
its options become, how an interrupted upload resumes, how it reads event streams and errors."""

import json
import os
import stat
import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from cli import config as configuration
from cli import requests
from cli.api import Api, ApiError, parse_events, unwrap
from cli.main import app
from cli.uploads import MIN_PART, URL_LIFETIME, FileUpload, MiB, UploadState, part_size, parts_of, state_file

# --- configuration ---


def test_login_writes_a_file_only_its_owner_can_read(tmp_path):
    path = tmp_path / "esd" / "config.json"
    configuration.save(path, configuration.Config(url="http://gw:8080", api_key="k", user="dana"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert configuration.load(path, env={}) == configuration.Config("http://gw:8080", "k", "dana")


def test_an_existing_file_others_could_read_is_made_private_when_written_again(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{}")
    path.chmod(0o644)
    configuration.save(path, configuration.Config(api_key="k", user="u"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_config_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "config.json"
    configuration.save(path, configuration.Config(api_key="k", user="u"))
    path.chmod(0o640)
    with pytest.raises(configuration.ConfigError, match="chmod 600"):
        configuration.load(path, env={})


def test_the_environment_overrides_the_file_field_by_field(tmp_path):
    path = tmp_path / "config.json"
    configuration.save(path, configuration.Config(url="http://file:1", api_key="file-key", user="file-user"))
    loaded = configuration.load(path, env={"ESD_API_KEY": "env-key", "ESD_USER": ""})
    assert loaded == configuration.Config(url="http://file:1", api_key="env-key", user="file-user")
    assert configuration.load(tmp_path / "none.json", env={"ESD_URL": "http://env:2"}).url == "http://env:2"


def test_without_key_or_user_it_says_to_log_in(tmp_path):
    with pytest.raises(configuration.ConfigError, match="esd login.*ESD_API_KEY and ESD_USER"):
        configuration.load(tmp_path / "none.json", env={}).checked()


def test_a_bearer_token_from_the_environment_stands_for_the_user_and_is_sent(tmp_path):
    loaded = configuration.load(tmp_path / "none.json", env={"ESD_API_KEY": "k", "ESD_TOKEN": "esd_t"})
    assert loaded.checked().token == "esd_t"  # no user needed: the token names it
    api = Api(loaded)
    assert api.http.headers["authorization"] == "Bearer esd_t"
    assert "authorization" not in Api(configuration.Config(api_key="k", user="u")).http.headers


def test_a_refused_token_says_to_sign_in_again():
    request = httpx.Request("GET", "http://gw/users", headers={"authorization": "Bearer esd_old"})
    response = httpx.Response(
        401,
        json={"statusCode": 401, "message": "Unauthorized: the token is unknown, expired or revoked"},
        request=request,
    )
    with pytest.raises(ApiError, match=r"expired or revoked \(run `esd login --password` for a new token\)"):
        unwrap(response)


def test_config_path_follows_esd_config_then_xdg():
    assert str(configuration.config_path({"ESD_CONFIG": "/x/c.json", "XDG_CONFIG_HOME": "/y"})) == "/x/c.json"
    assert str(configuration.config_path({"XDG_CONFIG_HOME": "/y"})) == "/y/esd/config.json"


# --- options ---


@pytest.mark.parametrize(
    ("value", "size"), [("512x768", (512, 768)), ("64", (64, 64)), (" 1024 X 576 ", (1024, 576)), ("8*8", (8, 8))]
)
def test_sizes(value, size):
    assert requests.parse_size(value) == size


@pytest.mark.parametrize("value", ["512x", "big", "500x512", "0x0", "16384x8"])
def test_bad_sizes_say_how_to_write_them(value):
    with pytest.raises(requests.OptionError, match="--size"):
        requests.parse_size(value)


def test_loras_take_an_optional_weight():
    assert requests.parse_lora("detail:0.6") == requests.LoraChoice("detail", 0.6)
    assert requests.parse_lora("detail") == requests.LoraChoice("detail", 1.0)
    assert requests.parse_lora("C:name.safetensors:-1") == requests.LoraChoice("C:name.safetensors", -1.0)
    with pytest.raises(requests.OptionError, match="NAME:WEIGHT"):
        requests.parse_lora("detail:strong")


def test_checkpoints_are_named_by_file_name_or_stem():
    names = ["cube.safetensors", "sky.ckpt"]
    assert requests.pick_checkpoint("cube", names, "Lora") == "cube.safetensors"
    assert requests.pick_checkpoint("sky.ckpt", names, "Lora") == "sky.ckpt"
    with pytest.raises(requests.OptionError, match=r"no Active Lora checkpoint named 'sea' \(there are: cube"):
        requests.pick_checkpoint("sea", names, "Lora")


def test_endpoints_are_named_as_stored_or_as_created():
    names = ["esd-async-mine", "esd-real-time-fast"]
    assert requests.resolve_endpoint("mine", names) == "esd-async-mine"
    assert requests.resolve_endpoint("fast", names) == "esd-real-time-fast"
    assert requests.resolve_endpoint("esd-async-mine", names) == "esd-async-mine"
    with pytest.raises(requests.OptionError, match="no endpoint named 'other'"):
        requests.resolve_endpoint("other", names)


def test_checkpoint_ids_from_ids_or_file_names():
    listed = [{"id": "a1", "name": ["cube.safetensors"]}, {"id": "b2", "name": ["sky.ckpt"]}]
    assert requests.checkpoint_ids(["cube", "b2"], listed) == ["a1", "b2"]
    with pytest.raises(requests.OptionError, match="no checkpoint"):
        requests.checkpoint_ids(["sea"], listed)


def test_the_payload_is_an_a1111_body_with_the_loras_in_the_prompt():
    generation = requests.Generation("a cube", negative="blur", steps=8, size=(64, 96), seed=3, batch=2)
    loras = [("detail.safetensors", 0.6)]
    body = generation.payload(loras)
    assert body["prompt"] == "a cube <lora:detail:0.6>"
    assert (body["width"], body["height"], body["steps"], body["seed"], body["batch_size"]) == (64, 96, 8, 3, 2)
    assert "init_images" not in body
    assert requests.job_models("m.safetensors", loras) == {
        "Stable-diffusion": ["m.safetensors"],
        "Lora": ["detail.safetensors"],
    }
    img2img = requests.Generation("a cube", init_image=b"png", denoise=0.4).payload([])
    assert img2img["init_images"] == ["cG5n"] and img2img["denoising_strength"] == 0.4


def test_a_dataset_folder_is_its_images_and_captions(tmp_path):
    folder = tmp_path / "5_red cube"
    folder.mkdir()
    for name in ("a.png", "a.txt", "b.JPG", "notes.md"):
        (folder / name).write_bytes(b"x")
    data = requests.dataset_folder(folder, repeats=None, concept=None)
    assert [path.name for path in data.files] == ["a.png", "b.JPG", "a.txt"]
    assert data.prefix == "5_red_cube"  # kohya's repeats and concept from the folder's name
    assert [item["type"] for item in data.content()] == ["image", "image", "text"]
    assert requests.dataset_folder(folder, repeats=2, concept="cube").prefix == "2_cube"
    plain = tmp_path / "cubes"
    plain.mkdir()
    (plain / "x.png").write_bytes(b"x")
    assert requests.dataset_folder(plain, repeats=None, concept=None).prefix == "10_cubes"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(requests.OptionError, match="no images"):
        requests.dataset_folder(empty, repeats=None, concept=None)


def test_training_arguments_left_unset_are_not_sent():
    body = requests.training_body(
        base="m.safetensors",
        dataset="d",
        output_name="cube",
        fm_type="sd_1_5",
        epochs=3,
        learning_rate=1e-3,
        network_dim=None,
        network_alpha=None,
        resolution=64,
        batch_size=None,
        save_every=None,
        seed=None,
        optimizer=None,
    )
    assert body["params"]["config_params"] == {
        "training": {"output_name": "cube", "max_train_epochs": 3, "learning_rate": 1e-3, "resolution": 64}
    }
    assert body["params"]["training_params"]["model"] == "m.safetensors"


# --- uploads ---


def test_parts_are_at_least_min_part_and_at_most_a_hundred():
    assert part_size(1) == MIN_PART
    assert part_size(7 * 1024 * MiB) == 72 * MiB  # 7 GiB: 100 parts of whole MiBs at most
    assert len(parts_of(7 * 1024 * MiB, part_size(7 * 1024 * MiB))) <= 100
    parts = parts_of(20 * MiB, MIN_PART)
    assert [(p.number, p.offset, p.length) for p in parts] == [
        (1, 0, MIN_PART),
        (2, MIN_PART, MIN_PART),
        (3, 2 * MIN_PART, 4 * MiB),
    ]
    assert parts_of(0, MIN_PART) == [parts[0].__class__(1, 0, 0)]


def started_upload(tmp_path, created_at: float) -> tuple[UploadState, FileUpload]:
    model = tmp_path / "model.safetensors"
    model.write_bytes(os.urandom(1000))
    file = FileUpload.of(model)
    file.urls = ["http://storage/part1"]
    return UploadState("http://gw", "Lora", [file], checkpoint_id="c1", created_at=created_at), file


def test_an_interrupted_upload_resumes_with_the_missing_parts_only(tmp_path):
    state, file = started_upload(tmp_path, created_at=time.time())
    big = FileUpload("/f", "f", 3 * MIN_PART, 0, MIN_PART, etags={"2": '"e2"'})
    assert [part.number for part in big.missing()] == [1, 3]
    path = tmp_path / "state.json"
    state.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the URLs in it are credentials
    again = UploadState.load(path)
    assert again == state and again.resumable(time.time())


def test_an_upload_is_not_resumed_when_its_file_changed_or_its_urls_expire(tmp_path):
    state, file = started_upload(tmp_path, created_at=time.time())
    assert not state.resumable(time.time() + URL_LIFETIME)
    os.utime(file.path, ns=(0, 0))
    assert not state.resumable(time.time())
    assert not UploadState("http://gw", "Lora", [file]).resumable(time.time())  # never created


def test_upload_state_files_are_per_gateway_type_and_files(tmp_path):
    one = state_file(tmp_path, "http://gw/", "Lora", [tmp_path / "a"])
    assert one == state_file(tmp_path, "http://gw", "Lora", [tmp_path / "a"])
    assert one != state_file(tmp_path, "http://gw", "VAE", [tmp_path / "a"])
    assert one != state_file(tmp_path, "http://other", "Lora", [tmp_path / "a"])
    assert UploadState.load(tmp_path / "missing.json") is None
    (tmp_path / "broken.json").write_text("{")
    assert UploadState.load(tmp_path / "broken.json") is None


# --- the wire ---


def test_event_streams_are_parsed_event_by_event():
    lines = [": keep-alive", "", "id: 7", "event: inference.progress", 'data: {"step": 1}', "", "id: 8"]
    lines += ["event: inference.succeeded", 'data: {"inference_id": "j"}', ""]
    events = list(parse_events(iter(lines)))
    assert [(e.id, e.type, e.data) for e in events] == [
        (7, "inference.progress", {"step": 1}),
        (8, "inference.succeeded", {"inference_id": "j"}),
    ]


def response(status: int, body) -> httpx.Response:
    request = httpx.Request("GET", "http://gw/x", headers={"username": "dana"})
    return httpx.Response(status, content=json.dumps(body).encode(), request=request)


def test_errors_are_the_servers_message_in_one_line():
    assert unwrap(response(200, {"statusCode": 200, "data": {"a": 1}})) == {"a": 1}
    with pytest.raises(ApiError, match=r"^checkpoint not found with id x \(HTTP 404\)$"):
        unwrap(response(404, {"statusCode": 404, "message": "checkpoint not found with id x"}))
    with pytest.raises(ApiError, match="API key is wrong"):
        unwrap(response(403, {"message": "Forbidden"}))
    with pytest.raises(ApiError, match="no user 'dana'"):
        unwrap(response(401, {"statusCode": 401, "message": "Unauthorized"}))


def test_a_command_without_configuration_fails_in_one_line_with_a_non_zero_code(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("ESD_API_KEY", "ESD_USER", "ESD_URL")}
    env["ESD_CONFIG"] = str(tmp_path / "none.json")
    done = subprocess.run([sys.executable, "-m", "cli", "ping"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: not signed in: run `esd login` (or set ESD_API_KEY and ESD_USER)"
    ]


def test_arguments_are_parsed_by_the_commands():
    runner = CliRunner()
    assert runner.invoke(app, ["generate", "--steps", "0", "x"]).exit_code == 2  # out of range
    assert runner.invoke(app, ["checkpoints", "upload", "/no/such/file", "--type", "Lora"]).exit_code == 2
    help_text = runner.invoke(app, ["train", "--help"]).output
    assert "--base" in help_text and "--epochs" in help_text
