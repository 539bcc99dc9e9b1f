import pytest

from services.checkpoint import domain
from services.checkpoint.domain import Checkpoint
from shared.contracts.checkpoint import CheckpointStatus, CheckpointType, CreateCheckpointBody, safe_file_name
from shared.errors import Invalid
from shared.net import public_address


def checkpoint(status=CheckpointStatus.ACTIVE, names=("model.safetensors",), roles=("Designer",)) -> Checkpoint:
    return Checkpoint(
        id="0b5c0d8e-1111-2222-3333-444455556666",
        type=CheckpointType.LORA,
        status=status,
        names=list(names),
        bucket="esd",
        allowed_roles=list(roles),
    )


def test_keys_follow_esds_layout():
    item = checkpoint()
    assert item.prefix == "Lora/checkpoint/custom/0b5c0d8e-1111-2222-3333-444455556666"
    assert item.s3_location == f"s3://esd/{item.prefix}"
    assert item.key("a.pt") == f"{item.prefix}/a.pt"


@pytest.mark.parametrize("name", ["../x.pt", "a/b.pt", "..", ".", "a\\b.pt", "x\x00.pt", "", "   "])
def test_file_names_cannot_escape_their_folder(name):
    with pytest.raises(ValueError):
        safe_file_name(name)


def test_plain_file_names_pass():
    assert safe_file_name(" v1-5 pruned.safetensors ") == "v1-5 pruned.safetensors"


@pytest.mark.parametrize(
    "url, disposition, expected",
    [
        ("https://host/models/v1.safetensors?download=1", None, "v1.safetensors"),
        ("https://host/files/my%20lora.pt", None, "my lora.pt"),
        ("https://host/api/download/123", 'attachment; filename="real.ckpt"', "real.ckpt"),
        ("https://host/api/download/123", "attachment; filename*=UTF-8''na%C3%AFve.pt", "naïve.pt"),
        ("https://host/x/y.pt", 'attachment; filename="../../etc/evil.pt"', "evil.pt"),
    ],
)
def test_the_file_name_comes_from_the_response_or_the_url(url, disposition, expected):
    assert domain.file_name_from_url(url, disposition) == expected


def test_a_url_without_a_file_name_is_refused():
    with pytest.raises(Invalid, match="cannot tell a file name"):
        domain.file_name_from_url("https://host/")


def test_only_model_files_are_downloaded():
    domain.check_download_name("a.SafeTensors")
    with pytest.raises(Invalid, match="notes.zip is not a model file"):
        domain.check_download_name("notes.zip")


def test_rembg_checkpoints_hold_onnx_files_and_others_do_not():
    domain.check_download_name("u2net.onnx", CheckpointType.REMBG)
    domain.check_download_name("4x-UltraSharp.pth", CheckpointType.ESRGAN)
    with pytest.raises(Invalid, match=r"u2net.pth is not a model file: only \.onnx are accepted"):
        domain.check_download_name("u2net.pth", CheckpointType.REMBG)
    with pytest.raises(Invalid, match="u2net.onnx is not a model file"):
        domain.check_download_name("u2net.onnx", CheckpointType.LORA)
    rembg = checkpoint(names=("u2net.onnx",))
    rembg.type = CheckpointType.REMBG
    assert domain.renamed(rembg, "u2net-human") == "u2net-human.onnx"
    assert domain.renamed(rembg, "silueta.onnx") == "silueta.onnx"


@pytest.mark.parametrize("url", ["ftp://host/a.pt", "file:///etc/passwd", "http:///a.pt", "host/a.pt"])
def test_only_http_urls_are_fetched(url):
    with pytest.raises(Invalid, match="is not an http"):
        domain.check_url(url)


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.9", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
    ],
)
def test_internal_addresses_are_not_public(address, public):
    assert public_address(address) is public


def test_activation_needs_tags_for_every_file():
    item = checkpoint(status=CheckpointStatus.INITIAL, names=("a.pt", "b.pt"))
    for tags in (None, {}):
        with pytest.raises(Invalid, match="multi parts tags is empty"):
            domain.check_activation(item, tags)
    with pytest.raises(Invalid, match=r"missing for \['b.pt'\]"):
        domain.check_activation(item, {"a.pt": [1]})
    with pytest.raises(Invalid, match="not in the checkpoint"):
        domain.check_activation(item, {"a.pt": [1], "b.pt": [1], "c.pt": [1]})
    domain.check_activation(item, {"a.pt": [1], "b.pt": [1]})


def test_status_can_only_be_set_to_active_or_disabled():
    for wanted in (CheckpointStatus.INITIAL, CheckpointStatus.FAILED):
        with pytest.raises(Invalid):
            domain.check_status_change(checkpoint(), wanted)
    with pytest.raises(Invalid, match="only an uploaded checkpoint can be disabled"):
        domain.check_status_change(checkpoint(status=CheckpointStatus.INITIAL), CheckpointStatus.DISABLED)
    with pytest.raises(Invalid, match="failed"):
        domain.check_status_change(checkpoint(status=CheckpointStatus.FAILED), CheckpointStatus.ACTIVE)
    domain.check_status_change(checkpoint(), CheckpointStatus.DISABLED)


def test_rename_keeps_the_extension_and_needs_an_active_checkpoint():
    assert domain.renamed(checkpoint(), "better") == "better.safetensors"
    assert domain.renamed(checkpoint(), "other.ckpt") == "other.ckpt"
    assert domain.renamed(checkpoint(), "model") is None  # the same name
    with pytest.raises(Invalid, match="only active can update name"):
        domain.renamed(checkpoint(status=CheckpointStatus.DISABLED), "x")


def test_a_checkpoint_is_visible_to_its_roles_everyone_or_its_owner():
    assert domain.visible_to(checkpoint(roles=("Designer",)), ["Designer"], "dana")
    assert not domain.visible_to(checkpoint(roles=("Designer",)), ["Viewer"], "vic")
    assert domain.visible_to(checkpoint(roles=("*",)), [], "anyone")
    assert domain.visible_to(checkpoint(roles=("vic",)), [], "vic")


def test_page_count_rounds_up():
    assert [domain.page_count(total, 10) for total in (0, 1, 10, 11)] == [0, 1, 1, 2]


def test_a_body_names_one_source():
    CreateCheckpointBody.model_validate({"checkpoint_type": "VAE", "urls": ["http://h/a.pt"]})
    for body in (
        {"checkpoint_type": "VAE"},
        {"checkpoint_type": "VAE", "urls": ["u"], "filenames": [{"filename": "a.pt", "parts_number": 1}]},
    ):
        with pytest.raises(ValueError):
            CreateCheckpointBody.model_validate(body)
