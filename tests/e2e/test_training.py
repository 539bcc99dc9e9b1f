"""LoRA training through HTTP: a dataset from images on disk, a training on the tiny model, and
generation with the new LoRA, over the real broker, database, storage and worker processes."""

import io
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from tests.e2e.test_inference import images_of, payload, run_async, upload_checkpoint, wait_endpoint
from tests.support import wait_for

pytestmark = pytest.mark.e2e


def unique(name: str) -> str:
    return f"{uuid.uuid4().hex[:6]}-{name}"


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def base_model(api, tmp_path_factory):
    from diffusion.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny.safetensors", seed=0)
    name = unique("base.safetensors")
    upload_checkpoint(api, path, "Stable-diffusion", name)
    return name


def make_dataset(api, name: str, count: int = 4) -> None:
    files = [f"img{i}.png" for i in range(count)] + [f"img{i}.txt" for i in range(count)]
    response = api(
        "POST",
        "/datasets",
        json={
            "dataset_name": name,
            "prefix": "2_cube",
            "content": [
                {"filename": f, "name": f, "type": "image" if f.endswith(".png") else "text", "params": {}}
                for f in files
            ],
            "params": {"description": "red cubes"},
        },
    )
    assert response.status_code == 201, response.text
    assert response.json()["data"]["datasetName"] == name
    urls = response.json()["data"]["s3PresignUrl"]
    assert api("PUT", f"/datasets/{name}", json={"status": "Enabled"}).status_code == 400  # nothing uploaded yet
    for i in range(count):
        assert httpx.put(urls[f"img{i}.png"], content=png(i)).status_code == 200
        assert httpx.put(urls[f"img{i}.txt"], content=b"a red cube, studio light").status_code == 200
    response = api("PUT", f"/datasets/{name}", json={"status": "Enabled"})
    assert response.status_code == 200, response.text


def test_train_a_lora_then_generate_with_it(api, storage, base_model):
    dataset, output_name = unique("cubes"), unique("cube-lora").replace("-", "_")
    make_dataset(api, dataset)
    listed = api("GET", "/datasets").json()["data"]["datasets"]
    assert any(d["datasetName"] == dataset and d["status"] == "Enabled" for d in listed)
    files = api("GET", f"/datasets/{dataset}").json()["data"]["data"]
    assert len(files) == 8 and all(f["preview_url"].startswith("http") for f in files)

    response = api(
        "POST",
        "/trainings",
        json={
            "lora_train_type": "kohya",
            "params": {
                "training_params": {
                    "training_instance_type": "local",
                    "fm_type": "sd_1_5",
                    "model": base_model,
                    "dataset": dataset,
                },
                "config_params": {
                    "saving_arguments": {"output_name": output_name, "save_every_n_epochs": 1},
                    "training_arguments": {"max_train_epochs": 2, "learning_rate": 1e-3, "train_batch_size": 1},
                    "additional_network_arguments": {"network_dim": 4, "network_alpha": 4},
                    "dataset_arguments": {"resolution": 64},
                },
            },
        },
    )
    assert response.status_code == 201, response.text
    training_id = response.json()["data"]["id"]
    assert response.json()["data"]["status"] == "Initial"

    training = wait_for(
        lambda: (
            (t := api("GET", f"/trainings/{training_id}").json()["data"])["job_status"] in ("Completed", "Failed") and t
        ),
        timeout=300,
        what="the training",
    )
    assert training["job_status"] == "Completed", training.get("error")
    assert training["checkpoint_id"]
    lora = api("GET", f"/checkpoints/{training['checkpoint_id']}").json()["data"]["checkpoint"]
    assert (lora["type"], lora["status"], lora["name"]) == ("Lora", "Active", [f"{output_name}.safetensors"])

    bucket, _, prefix = lora["s3Location"].removeprefix("s3://").partition("/")
    data = storage.get_object(Bucket=bucket, Key=f"{prefix}/{output_name}.safetensors")["Body"].read()
    keys = safe_open_bytes(data)
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_unet_") and k.endswith(".alpha") for k in keys)

    endpoint = api(
        "POST",
        "/endpoints",
        json={
            "endpoint_name": unique("tr")[:20],
            "endpoint_type": "Async",
            "instance_type": "cpu",
            "initial_instance_count": 1,
            "assign_to_roles": ["IT Operator"],
        },
    ).json()["data"]["endpoint_name"]
    try:
        wait_endpoint(api, endpoint)
        plain = run_async(api, endpoint, {"Stable-diffusion": [base_model]}, payload(seed=11))
        styled = run_async(
            api,
            endpoint,
            {"Stable-diffusion": [base_model], "Lora": [f"{output_name}.safetensors"]},
            payload(seed=11, prompt=f"a tiny red cube <lora:{output_name}:1>"),
        )
        assert styled["status"] == "succeed", styled.get("error")
        assert images_of(plain)[0].tobytes() != images_of(styled)[0].tobytes()
    finally:
        api("DELETE", "/endpoints", json={"endpoint_name_list": [endpoint]})
    assert training_id in {t["id"] for t in api("GET", "/trainings", params={"limit": 100}).json()["data"]["trainings"]}
    assert api("DELETE", "/trainings", json={"training_id_list": [training_id]}).status_code == 204
    assert api("GET", f"/trainings/{training_id}").status_code == 404


def safe_open_bytes(data: bytes):
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as file:
        file.write(data)
        file.flush()
        with safe_open(file.name, "np") as tensors:
            return list(tensors.keys())


def test_a_bad_config_is_refused_when_the_training_is_created(api, base_model):
    dataset = unique("badconfig")
    make_dataset(api, dataset, count=1)
    response = api(
        "POST",
        "/trainings",
        json={
            "params": {
                "training_params": {"model": base_model, "dataset": dataset},
                "config_params": {"training": {"max_train_epochs": "forever"}},
            }
        },
    )
    assert response.status_code == 400
    assert "config_params.max_train_epochs" in response.json()["message"]


def test_an_output_name_that_an_existing_checkpoint_has_is_refused(api, base_model):
    dataset = unique("taken")
    make_dataset(api, dataset, count=1)
    taken = base_model.removesuffix(".safetensors")
    response = api(
        "POST",
        "/trainings",
        json={
            "params": {
                "training_params": {"model": base_model, "dataset": dataset},
                "config_params": {"training": {"output_name": taken}},
            }
        },
    )
    assert response.status_code == 400
    assert f"{base_model} already exists" in response.json()["message"]


def test_a_training_that_breaks_while_running_ends_failed_with_the_reason(api, base_model):
    dataset = unique("bad")
    make_dataset(api, dataset, count=1)
    # the base model is SD 1.x: only loading it tells that it is not the SDXL the job says
    response = api(
        "POST",
        "/trainings",
        json={
            "params": {
                "training_params": {"model": base_model, "dataset": dataset, "fm_type": "sd_xl"},
                "config_params": {"training": {"resolution": 64}},
            }
        },
    )
    training_id = response.json()["data"]["id"]
    training = wait_for(
        lambda: (
            (t := api("GET", f"/trainings/{training_id}").json()["data"])["job_status"] in ("Completed", "Failed") and t
        ),
        timeout=120,
    )
    assert training["job_status"] == "Failed"
    assert "fm_type" in training["error"]


@pytest.mark.parametrize(
    "training_params, expected",
    [
        (
            {"model": "no-such-model.safetensors", "dataset": "x"},
            "checkpoint with name no-such-model.safetensors, type Stable-diffusion is not found",
        ),
        ({"dataset": "x"}, "needs the base model"),
        ({"model": "m", "dataset": "x", "fm_type": "sd_3"}, "fm_type sd_3 should be in"),
    ],
)
def test_a_training_without_its_model_or_data_is_refused(api, training_params, expected):
    response = api(
        "POST", "/trainings", json={"lora_train_type": "kohya", "params": {"training_params": training_params}}
    )
    assert response.status_code == 400
    assert expected in response.json()["message"]


def test_a_training_on_an_unknown_dataset_is_refused(api, base_model):
    response = api(
        "POST", "/trainings", json={"params": {"training_params": {"model": base_model, "dataset": "no-such-dataset"}}}
    )
    assert (response.status_code, response.json()["message"]) == (400, "dataset no-such-dataset is not found")


def test_dataset_rules(api):
    assert api("GET", "/datasets/nope").json() == {"statusCode": 404, "message": "dataset nope is not found"}
    assert api("GET", "/trainings/nope").json() == {"statusCode": 404, "message": "Job with id nope not found"}
    response = api("POST", "/datasets", json={"dataset_name": "../etc", "content": [{"filename": "a.png"}]})
    assert response.status_code == 400
    response = api("POST", "/datasets", json={"dataset_name": "ok", "content": [{"filename": "../a.png"}]})
    assert response.status_code == 400
    name = unique("gone")
    api("POST", "/datasets", json={"dataset_name": name, "content": [{"filename": "a.png"}]})
    assert (
        api("POST", "/datasets", json={"dataset_name": name, "content": [{"filename": "a.png"}]}).json()["message"]
        == f"dataset {name} already exists"
    )
    assert api("DELETE", "/datasets", json={"dataset_name_list": [name, "never"]}).status_code == 204
    assert api("GET", f"/datasets/{name}").status_code == 404


def test_a_killed_training_worker_loses_nothing_and_progress_is_announced(api, stack, base_model):
    import os
    import signal
    import subprocess

    from deploy.local.events import EventListener

    dataset, output_name = unique("long"), unique("long_lora").replace("-", "_")
    make_dataset(api, dataset, count=2)
    exchange = f"{stack.env['ESD_BROKER_PREFIX']}esd.events"
    with EventListener(stack.amqp_url, exchange, "training.#") as events:
        response = api(
            "POST",
            "/trainings",
            json={
                "params": {
                    "training_params": {"model": base_model, "dataset": dataset},
                    "config_params": {
                        "training": {"output_name": output_name, "max_train_steps": 1500, "resolution": 64}
                    },
                }
            },
        )
        training_id = response.json()["data"]["id"]
        wait_for(
            lambda: api("GET", f"/trainings/{training_id}").json()["data"].get("progress"),
            timeout=120,
            what="training to run",
        )
        found = subprocess.run(
            ["pgrep", "-f", "services.training.worker "], capture_output=True, text=True
        ).stdout.split()
        assert found, "no training worker process"
        for pid in found:
            os.kill(int(pid), signal.SIGKILL)
        seen = events.until(
            lambda key, body: key in ("training.completed", "training.failed") and body["training_id"] == training_id,
            timeout=300,
        )
    keys = [key for key, body in seen if body["training_id"] == training_id]
    assert "training.progress" in keys
    assert keys[-1] == "training.completed"
    training = api("GET", f"/trainings/{training_id}").json()["data"]
    assert training["job_status"] == "Completed"
    assert training["info"]["steps"] == 1500


def test_stop_a_running_training_keeps_its_saved_epochs_and_a_queued_one_never_runs(api, base_model):
    dataset = unique("stop")
    make_dataset(api, dataset, count=2)

    def start(epochs: int, name: str) -> str:
        response = api(
            "POST",
            "/trainings",
            json={
                "params": {
                    "training_params": {"model": base_model, "dataset": dataset},
                    "config_params": {
                        "training": {
                            "output_name": unique(name),
                            "max_train_epochs": epochs,
                            "save_every_n_epochs": 1,
                            "resolution": 64,
                        }
                    },
                }
            },
        )
        assert response.status_code == 201, response.text
        return response.json()["data"]["id"]

    running = start(500, "long")
    queued = start(1, "behind")  # the one training worker is busy with the first
    wait_for(
        lambda: (api("GET", f"/trainings/{running}").json()["data"].get("progress") or {}).get("epoch", 0) >= 3,
        timeout=180,
        what="a few epochs",
    )
    assert api("PUT", f"/trainings/{queued}/stop").json()["data"]["job_status"] == "Stopped"
    stopping = api("PUT", f"/trainings/{running}/stop")
    assert stopping.status_code == 200 and stopping.json()["message"] == "stop requested"
    training = wait_for(
        lambda: (t := api("GET", f"/trainings/{running}").json()["data"])["job_status"] != "Training" and t,
        timeout=120,
        what="the training to stop",
    )
    assert training["job_status"] == "Stopped"
    saved = training["saved_checkpoint_ids"]
    assert len(saved) >= 2  # the epochs finished before the stop
    for checkpoint_id in saved:
        checkpoint = api("GET", f"/checkpoints/{checkpoint_id}").json()["data"]["checkpoint"]
        assert (checkpoint["type"], checkpoint["status"]) == ("Lora", "Active")
    assert api("GET", f"/trainings/{queued}").json()["data"]["job_status"] == "Stopped"
    again = api("PUT", f"/trainings/{running}/stop")
    assert again.status_code == 400 and "already Stopped" in again.json()["message"]
