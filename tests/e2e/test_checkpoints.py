"""Checkpoints through HTTP: multipart uploads through presigned URLs, downloads by URL, and
every rule of API.md's checkpoint section."""

import time
import uuid

import httpx
import numpy as np
import pytest
from safetensors.numpy import save

from tests.support import wait_for

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


def unique(name: str) -> str:
    return f"{uuid.uuid4().hex[:8]}-{name}"


def safetensors_bytes(megabytes: float, seed: int = 0) -> bytes:
    """A real safetensors file of about the given size."""
    rng = np.random.default_rng(seed)
    count = int(megabytes * MiB / 4)
    return save({"model.weight": rng.standard_normal(count, dtype=np.float32), "model.bias": np.zeros(8, np.float32)})


def upload_parts(urls: list[str], data: bytes) -> list[dict]:
    """PUT the parts as a client does: S3 wants at least 5 MiB in every part but the last."""
    size = 5 * MiB if len(urls) > 1 else len(data)
    assert -(-len(data) // size) == len(urls)
    tags = []
    for number, url in enumerate(urls, start=1):
        response = httpx.put(url, content=data[(number - 1) * size : number * size], timeout=60)
        assert response.status_code == 200, response.text
        tags.append({"ETag": response.headers["etag"], "PartNumber": number})
    return tags


def get_checkpoint(api, checkpoint_id: str) -> dict:
    response = api("GET", f"/checkpoints/{checkpoint_id}")
    assert response.status_code == 200, response.text
    return response.json()["data"]["checkpoint"]


def stored_bytes(storage, s3_location: str, name: str) -> bytes:
    bucket, _, prefix = s3_location.removeprefix("s3://").partition("/")
    return storage.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()


@pytest.fixture(scope="module")
def uploaded(api):
    """A Stable-diffusion checkpoint uploaded in 3 parts and activated."""
    name = unique("model.safetensors")
    data = safetensors_bytes(11)  # parts of 5 MiB, 5 MiB and the rest (S3's minimum but the last)
    response = api(
        "POST",
        "/checkpoints",
        json={
            "checkpoint_type": "Stable-diffusion",
            "filenames": [{"filename": name, "parts_number": 3}],
            "params": {"message": "three parts", "creator": "someone-else"},
        },
    )
    assert response.status_code == 201, response.text
    created = response.json()["data"]
    tags = upload_parts(created["s3PresignUrl"][name], data)
    response = api(
        "PUT",
        f"/checkpoints/{created['checkpoint']['id']}",
        json={"status": "Active", "multi_parts_tags": {name: tags}},
    )
    assert response.status_code == 200, response.text
    return {"name": name, "data": data, "created": created, "activated": response.json()["data"]["checkpoint"]}


def test_multipart_upload_lands_byte_identical(api, storage, uploaded):
    checkpoint = uploaded["created"]["checkpoint"]
    assert checkpoint["status"] == "Initial"
    assert len(checkpoint["id"]) == 36
    assert checkpoint["s3_location"].endswith(f"Stable-diffusion/checkpoint/custom/{checkpoint['id']}")
    assert checkpoint["params"]["creator"] == "admin"  # the acting user, not what the body claims
    assert checkpoint["params"]["message"] == "three parts"
    upload = checkpoint["params"]["multipart_upload"][uploaded["name"]]
    assert upload["key"].endswith(f"/{uploaded['name']}") and upload["upload_id"]
    assert len(uploaded["created"]["s3PresignUrl"][uploaded["name"]]) == 3
    assert uploaded["activated"]["status"] == "Active"
    assert stored_bytes(storage, checkpoint["s3_location"], uploaded["name"]) == uploaded["data"]


def test_activated_checkpoint_is_listed(api, uploaded):
    checkpoint_id = uploaded["created"]["checkpoint"]["id"]
    page = api(
        "GET", "/checkpoints", params={"types": "Stable-diffusion", "status": "Active", "per_page": 1000}
    ).json()["data"]
    (item,) = [item for item in page["checkpoints"] if item["id"] == checkpoint_id]
    assert item["name"] == [uploaded["name"]]
    assert item["type"] == "Stable-diffusion"
    assert item["status"] == "Active"
    assert item["allowed_roles_or_users"] == ["IT Operator"]
    assert item["s3Location"] == uploaded["created"]["checkpoint"]["s3_location"]
    assert float(item["created"]) > 0
    assert page["total"] >= 1 and page["pages"] >= 1


def test_pages_are_newest_first(api):
    ids = []
    for _ in range(3):
        response = api(
            "POST",
            "/checkpoints",
            json={"checkpoint_type": "VAE", "filenames": [{"filename": unique("v.pt"), "parts_number": 1}]},
        )
        ids.append(response.json()["data"]["checkpoint"]["id"])
    first = api("GET", "/checkpoints", params={"types": "VAE", "status": "Initial", "per_page": 2, "page": 1}).json()[
        "data"
    ]
    assert first["per_page"] == 2 and first["page"] == 1
    assert first["pages"] == -(-first["total"] // 2)
    assert [c["id"] for c in first["checkpoints"]] == ids[::-1][:2]
    api("DELETE", "/checkpoints", json={"checkpoint_id_list": ids})


def test_file_names_are_unique_across_checkpoints(api, uploaded):
    response = api(
        "POST",
        "/checkpoints",
        json={"checkpoint_type": "Lora", "filenames": [{"filename": uploaded["name"], "parts_number": 1}]},
    )
    assert response.status_code == 400
    assert (
        response.json()["message"] == f"{uploaded['name']} already exists, please use another or rename/delete exists"
    )


def test_tampered_and_expired_presigned_urls_are_refused_by_storage(api, stack):
    name = unique("t.safetensors")
    created = api(
        "POST", "/checkpoints", json={"checkpoint_type": "Lora", "filenames": [{"filename": name, "parts_number": 1}]}
    ).json()["data"]
    url = created["s3PresignUrl"][name][0]
    tampered = url.replace("partNumber=1", "partNumber=2")
    assert tampered != url
    assert httpx.put(tampered, content=b"x").status_code == 403
    signature = url.split("X-Amz-Signature=")[1][:8]
    assert httpx.put(url.replace(signature, "0" * 8), content=b"x").status_code == 403

    import boto3
    from botocore.config import Config

    signer = boto3.client(
        "s3",
        endpoint_url=stack.s3_endpoint_url,
        aws_access_key_id=stack.s3_access_key,
        aws_secret_access_key=stack.s3_secret_key,
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    upload = created["checkpoint"]["params"]["multipart_upload"][name]
    expiring = signer.generate_presigned_url(
        "upload_part",
        ExpiresIn=1,
        Params={"Bucket": upload["bucket"], "Key": upload["key"], "UploadId": upload["upload_id"], "PartNumber": 1},
    )
    time.sleep(2.5)
    assert httpx.put(expiring, content=b"x").status_code == 403
    api("DELETE", "/checkpoints", json={"checkpoint_id_list": [created["checkpoint"]["id"]]})


def test_download_by_url_follows_redirects_and_becomes_active(api, storage, file_server):
    name = unique("lora.safetensors")
    data = safetensors_bytes(6, seed=1)
    (file_server.folder / name).write_bytes(data)
    response = api(
        "POST",
        "/checkpoints",
        json={
            "checkpoint_type": "Lora",
            "urls": [f"{file_server.url}/redirect/{name}"],
            "params": {"message": "by url"},
        },
    )
    assert response.status_code == 202
    assert response.json()["message"] == "Checkpoint creation in progress, please check later"
    (queued,) = response.json()["data"]["checkpoints"]
    checkpoint = wait_for(
        lambda: (c := get_checkpoint(api, queued["id"]))["status"] != "Initial" and c, what="the download"
    )
    assert checkpoint["status"] == "Active", checkpoint.get("error")
    assert checkpoint["name"] == [name]
    assert checkpoint["progress"]["downloaded_bytes"] == len(data)
    assert stored_bytes(storage, checkpoint["s3Location"], name) == data


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/files/notes.txt", "notes.txt is not a model file"),
        ("/files/missing.safetensors", "answered 404"),
    ],
)
def test_download_of_a_wrong_file_fails_with_the_reason(api, file_server, path, expected):
    (file_server.folder / "notes.txt").write_text("not a model")
    response = api(
        "POST",
        "/checkpoints",
        json={"checkpoint_type": "Lora", "urls": [f"{file_server.url}{path}?{uuid.uuid4().hex}"]},
    )
    (queued,) = response.json()["data"]["checkpoints"]
    checkpoint = wait_for(
        lambda: (c := get_checkpoint(api, queued["id"]))["status"] != "Initial" and c, what="the failure"
    )
    assert checkpoint["status"] == "Failed"
    assert expected in checkpoint["error"]


def test_download_from_a_dead_address_fails_with_the_reason(api):
    from deploy.local.stack import free_port

    url = f"http://127.0.0.1:{free_port()}/{unique('dead.safetensors')}"
    (queued,) = api("POST", "/checkpoints", json={"checkpoint_type": "VAE", "urls": [url]}).json()["data"][
        "checkpoints"
    ]
    checkpoint = wait_for(
        lambda: (c := get_checkpoint(api, queued["id"]))["status"] != "Initial" and c, what="the failure"
    )
    assert checkpoint["status"] == "Failed"
    assert "could not download" in checkpoint["error"]


def test_rename_moves_the_file(api, storage):
    name, new = unique("old.safetensors"), unique("new")
    data = safetensors_bytes(0.1, seed=2)
    created = api(
        "POST", "/checkpoints", json={"checkpoint_type": "Lora", "filenames": [{"filename": name, "parts_number": 1}]}
    ).json()["data"]
    checkpoint_id = created["checkpoint"]["id"]

    response = api("PUT", f"/checkpoints/{checkpoint_id}", json={"name": new})
    assert response.status_code == 400
    assert response.json()["message"] == "only active can update name"

    tags = upload_parts(created["s3PresignUrl"][name], data)
    api("PUT", f"/checkpoints/{checkpoint_id}", json={"status": "Active", "multi_parts_tags": {name: tags}})
    response = api("PUT", f"/checkpoints/{checkpoint_id}", json={"name": name})
    assert (response.status_code, response.json()["message"]) == (200, "no need to update")

    response = api("PUT", f"/checkpoints/{checkpoint_id}", json={"name": new})
    assert (response.status_code, response.json()["message"]) == (202, "rename is processing, please wait")
    renamed = wait_for(lambda: (c := get_checkpoint(api, checkpoint_id))["name"] != [name] and c, what="the rename")
    assert renamed["name"] == [f"{new}.safetensors"]  # the extension is kept
    assert stored_bytes(storage, renamed["s3Location"], f"{new}.safetensors") == data
    # the old name is free again
    again = api(
        "POST", "/checkpoints", json={"checkpoint_type": "Lora", "filenames": [{"filename": name, "parts_number": 1}]}
    )
    assert again.status_code == 201
    api(
        "DELETE", "/checkpoints", json={"checkpoint_id_list": [checkpoint_id, again.json()["data"]["checkpoint"]["id"]]}
    )


def test_disable_and_enable(api, uploaded):
    checkpoint_id = uploaded["created"]["checkpoint"]["id"]
    assert (
        api("PUT", f"/checkpoints/{checkpoint_id}", json={"status": "Disabled"}).json()["data"]["checkpoint"]["status"]
        == "Disabled"
    )
    assert (
        api("PUT", f"/checkpoints/{checkpoint_id}", json={"status": "Active"}).json()["data"]["checkpoint"]["status"]
        == "Active"
    )


def test_delete_removes_objects_record_and_name(api, storage):
    name = unique("gone.pt")
    created = api(
        "POST",
        "/checkpoints",
        json={"checkpoint_type": "embeddings", "filenames": [{"filename": name, "parts_number": 1}]},
    ).json()["data"]
    tags = upload_parts(created["s3PresignUrl"][name], b"embedding bytes")
    checkpoint = created["checkpoint"]
    api("PUT", f"/checkpoints/{checkpoint['id']}", json={"status": "Active", "multi_parts_tags": {name: tags}})

    response = api("DELETE", "/checkpoints", json={"checkpoint_id_list": [checkpoint["id"], "no-such-id"]})
    assert response.status_code == 204
    assert api("GET", f"/checkpoints/{checkpoint['id']}").status_code == 404
    bucket, _, prefix = checkpoint["s3_location"].removeprefix("s3://").partition("/")
    assert storage.list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount", 0) == 0
    reuse = api(
        "POST",
        "/checkpoints",
        json={"checkpoint_type": "embeddings", "filenames": [{"filename": name, "parts_number": 1}]},
    )
    assert reuse.status_code == 201
    api("DELETE", "/checkpoints", json={"checkpoint_id_list": [reuse.json()["data"]["checkpoint"]["id"]]})


def test_checkpoints_need_checkpoint_permissions(api):
    user = unique("nocheck")
    api("POST", "/users", json={"username": user, "password": "pw", "roles": []})
    response = api("GET", "/checkpoints", user=user)
    assert response.status_code == 403
    assert response.json()["message"] == f"User {user} has no permissions: ['checkpoint:all', 'checkpoint:list']"
    assert api("POST", "/checkpoints", user=user, json={}).status_code == 400  # the body is checked first
    valid = {"checkpoint_type": "Lora", "urls": ["https://example.com/a.safetensors"]}
    assert api("POST", "/checkpoints", user=user, json=valid).status_code == 403
    assert api("DELETE", "/checkpoints", user=user, json={"checkpoint_id_list": ["x"]}).status_code == 403


def test_listing_for_an_unknown_user_is_refused(api):
    response = api("GET", "/checkpoints", params={"username": "ghost-user"})
    assert response.status_code == 400
    assert response.json()["message"] == 'user: "ghost-user" not exist'


@pytest.mark.parametrize(
    "body, expected",
    [
        (
            {"filenames": [{"filename": "a.pt", "parts_number": 1}]},
            'object has missing required properties (["checkpoint_type"])',
        ),
        ({"checkpoint_type": "Checkpoint", "urls": ["http://x/a.pt"]}, "checkpoint_type: Input should be"),
        ({"checkpoint_type": "Lora"}, "give either filenames (multipart upload) or urls (download), not both"),
        (
            {
                "checkpoint_type": "Lora",
                "urls": ["http://x/a.pt"],
                "filenames": [{"filename": "a.pt", "parts_number": 1}],
            },
            "not both",
        ),
        (
            {"checkpoint_type": "Lora", "filenames": [{"filename": "a.pt", "parts_number": 0}]},
            "filenames.0.parts_number",
        ),
        (
            {"checkpoint_type": "Lora", "filenames": [{"filename": "a.pt", "parts_number": 101}]},
            "filenames.0.parts_number",
        ),
        ({"checkpoint_type": "Lora", "filenames": []}, "required minimum: 1"),
        (
            {"checkpoint_type": "Lora", "filenames": [{"filename": "../../etc/passwd.pt", "parts_number": 1}]},
            "is not a plain file name",
        ),
        (
            {"checkpoint_type": "Lora", "filenames": [{"filename": "a/b.pt", "parts_number": 1}]},
            "is not a plain file name",
        ),
        ({"checkpoint_type": "Lora", "urls": []}, "required minimum: 1"),
        ({"checkpoint_type": "Lora", "urls": ["x"] * 21}, "maximum allowed: 20"),
        ({"checkpoint_type": "Lora", "urls": ["file:///etc/passwd"]}, "is not an http(s) URL"),
        (
            {
                "checkpoint_type": "Lora",
                "filenames": [{"filename": "same.pt", "parts_number": 1}, {"filename": "same.pt", "parts_number": 1}],
            },
            "same.pt is given twice",
        ),
    ],
)
def test_bad_checkpoint_bodies_get_400(api, body, expected):
    response = api("POST", "/checkpoints", json=body)
    assert response.status_code == 400, response.text
    assert expected in response.json()["message"]


def test_update_rules(api):
    response = api(
        "PUT",
        "/checkpoints/no-such-id",
        json={"status": "Active", "multi_parts_tags": {"a": [{"ETag": "x", "PartNumber": 1}]}},
    )
    assert response.status_code == 404
    assert response.json()["message"] == "checkpoint not found with id no-such-id"

    name = unique("r.pt")
    created = api(
        "POST", "/checkpoints", json={"checkpoint_type": "Lora", "filenames": [{"filename": name, "parts_number": 1}]}
    ).json()["data"]
    checkpoint_id = created["checkpoint"]["id"]
    for tags in (None, {}):
        response = api("PUT", f"/checkpoints/{checkpoint_id}", json={"status": "Active", "multi_parts_tags": tags})
        assert (response.status_code, response.json()["message"]) == (400, "multi parts tags is empty")
    response = api(
        "PUT",
        f"/checkpoints/{checkpoint_id}",
        json={"status": "Active", "multi_parts_tags": {name: [{"ETag": '"bogus"', "PartNumber": 1}]}},
    )
    assert response.status_code == 400
    assert f"could not complete the upload of {name}" in response.json()["message"]
    response = api("PUT", f"/checkpoints/{checkpoint_id}", json={"status": "Sleeping"})
    assert response.status_code == 400
    api("DELETE", "/checkpoints", json={"checkpoint_id_list": [checkpoint_id]})
