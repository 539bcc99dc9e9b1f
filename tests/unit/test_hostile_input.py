"""Hostile input where the decision is pure or local: JSON nested or sized to exhaust a process,
URLs that resolvers read their own way, addresses that change between check and connection,
redirects inward, bodies without end, file names that are paths, pickles that carry code,
images that declare gigapixels, prompts of megabytes. Each is refused with a reason; nothing
runs and nothing crashes. The same over the real stack: tests/e2e/test_hostile_input.py."""

from __future__ import annotations

import http.server
import io
import logging
import struct
import threading
import zlib
from pathlib import Path

import hypothesis
import pytest
from PIL import Image

from services.checkpoint.downloads import Downloader
from shared import net
from shared.contracts.checkpoint import PLAIN_NAME_PATTERN, safe_file_name
from shared.errors import Invalid
from shared.untrusted import depth_over, load_json


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# --- JSON -----------------------------------------------------------------------------------


@pytest.mark.parametrize("document", [nested(10_000), '{"a":' * 10_000 + "1" + "}" * 10_000])
def test_json_nested_ten_thousand_deep_is_refused_by_its_depth(document):
    with pytest.raises(Invalid, match="deeper than 64 levels .ESD_MAX_JSON_DEPTH"):
        load_json(document, what="request body", max_depth=64)


def test_json_at_the_depth_limit_passes_and_one_deeper_does_not():
    assert load_json(nested(64), what="body", max_depth=64) == load_json(nested(64), what="body", max_depth=64)
    with pytest.raises(Invalid, match="deeper than 64"):
        load_json(nested(65), what="body", max_depth=64)
    assert not depth_over({"a": [1, {"b": 2}]}, 3) and depth_over({"a": [1, {"b": [2]}]}, 3)


def test_json_over_its_size_is_refused_before_it_is_parsed():
    with pytest.raises(Invalid, match="api_param.json is 101 bytes; at most 100 are accepted .ESD_MAX_PAYLOAD_BYTES"):
        load_json(b" " * 101, what="api_param.json", max_depth=64, max_bytes=100, setting="ESD_MAX_PAYLOAD_BYTES")


def test_json_keeps_a1111s_infinity_and_names_what_is_not_json():
    assert load_json('{"s_tmax": Infinity}', what="body", max_depth=4) == {"s_tmax": float("inf")}
    with pytest.raises(Invalid, match="body is not valid JSON"):
        load_json(b"{nope", what="body", max_depth=4)


# --- names and URLs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../model.safetensors", "/etc/passwd", "a\\..\\b.pt", "nul\x00.pt", "..", "é" * 128 + ".pt", "x" * 256]
)
def test_file_names_that_are_paths_or_too_long_are_refused(name):
    with pytest.raises(ValueError, match="not a plain file name|longer than 255 bytes"):
        safe_file_name(name)


def test_a_long_file_name_is_not_repeated_whole_in_the_refusal():
    with pytest.raises(ValueError) as refused:
        safe_file_name("x" * 100_000)
    assert len(str(refused.value)) < 200


@pytest.mark.parametrize("url", ["http://0177.0.0.1/x.pt", "http://exa\x00mple.com/x.pt", "ftp://example.com/x.pt"])
def test_urls_the_http_client_would_refuse_are_refused_up_front(url):
    with pytest.raises(Invalid):
        net.check_http_url(url)


# --- downloads: pinned addresses, redirects inward, endless bodies --------------------------


class FakeStorage:
    """Multipart uploads into memory."""

    def __init__(self) -> None:
        self.parts: dict[str, list[bytes]] = {}
        self.objects: dict[str, bytes] = {}
        self.aborted: list[str] = []

    async def start_multipart(self, key: str) -> str:
        self.parts[key] = []
        return key

    async def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        self.parts[key].append(data)
        return f"etag-{number}"

    async def complete_multipart(self, key: str, upload_id: str, parts) -> None:
        self.objects[key] = b"".join(self.parts.pop(key))

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        self.parts.pop(key, None)
        self.aborted.append(key)


MODEL = b"weights" * 1000


@pytest.fixture(scope="module")
def origin():
    """An HTTP server on 127.0.0.1 (taken for a public address in these tests, see
    `resolver`): a model file, a redirect to an internal name, a body without end, and one
    that announces 10 GB."""
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            requests.append(self.path)
            port = self.server.server_address[1]
            if self.path == "/to-internal.safetensors":
                self.send_response(302)
                self.send_header("Location", f"http://internal.test:{port}/model.safetensors")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/to-octal.safetensors":
                self.send_response(302)
                self.send_header("Location", f"http://0177.0.0.1:{port}/model.safetensors")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/endless.safetensors":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = b"\0" * 65536
                try:
                    while True:
                        self.wfile.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                except OSError:
                    return
            elif self.path == "/huge.safetensors":
                self.send_response(200)
                self.send_header("Content-Length", str(10 * 1024**3))
                self.end_headers()
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(MODEL)))
                self.end_headers()
                self.wfile.write(MODEL)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.requests = requests
    yield server
    server.shutdown()


@pytest.fixture
def resolver(monkeypatch):
    """Names of these tests: `public.test` is 127.0.0.1 (counted as public here),
    `internal.test` 127.0.0.2, and `rebind.test` answers 127.0.0.1 once, then 127.0.0.2 (a
    DNS-rebinding server). Every lookup is recorded."""
    lookups: list[str] = []
    answers = {"public.test": ["127.0.0.1"], "internal.test": ["127.0.0.2"]}

    async def resolve(host: str) -> list[str]:
        lookups.append(host)
        if host == "rebind.test":
            return ["127.0.0.1"] if lookups.count(host) == 1 else ["127.0.0.2"]
        return answers.get(host, [host])

    monkeypatch.setattr(net, "resolve", resolve)
    monkeypatch.setattr(net, "public_address", lambda address: address == "127.0.0.1")
    return lookups


async def download(url: str, **limits):
    storage = FakeStorage()
    downloader = Downloader(storage, allow_private=False, part_bytes=0, timeout=10, **limits)

    async def name_found(name: str) -> str:
        return f"Lora/checkpoint/custom/c1/{name}"

    async def progress(done: int, total: int | None) -> None:
        pass

    name, size = await downloader.download(url, name_found=name_found, progress=progress)
    return storage, name, size


async def test_a_download_connects_to_the_address_it_checked_not_to_a_second_answer(origin, resolver):
    port = origin.server_address[1]
    storage, name, size = await download(f"http://rebind.test:{port}/model.safetensors")
    # one lookup, checked and connected to: the rebinding answer (127.0.0.2) is never asked for
    assert resolver == ["rebind.test"]
    assert (name, size) == ("model.safetensors", len(MODEL))
    assert storage.objects["Lora/checkpoint/custom/c1/model.safetensors"] == MODEL


async def test_an_internal_address_is_refused_before_any_connection(origin, resolver):
    port = origin.server_address[1]
    before = len(origin.requests)
    with pytest.raises(Invalid, match="refused to download from internal.test: it resolves to the internal address"):
        await download(f"http://internal.test:{port}/model.safetensors")
    assert len(origin.requests) == before


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/to-internal.safetensors", "refused to download from internal.test"),
        ("/to-octal.safetensors", "0177.0.0.1"),
    ],
)
async def test_a_redirect_inward_is_refused(origin, resolver, path, reason):
    port = origin.server_address[1]
    with pytest.raises(Invalid, match=reason):
        await download(f"http://public.test:{port}{path}")
    assert not origin.requests or origin.requests[-1] == path  # the inward hop was never made


async def test_a_body_without_end_is_cut_off_at_the_limit(origin, resolver):
    port = origin.server_address[1]
    with pytest.raises(Invalid, match="larger than 1048576 bytes.*ESD_CHECKPOINT_MAX_BYTES"):
        await download(f"http://public.test:{port}/endless.safetensors", max_bytes=1024 * 1024)


async def test_a_body_announced_too_large_is_refused_before_it_is_read(origin, resolver):
    port = origin.server_address[1]
    with pytest.raises(Invalid, match="larger than 1048576 bytes"):
        await download(f"http://public.test:{port}/huge.safetensors", max_bytes=1024 * 1024)


# --- pickles that carry code ----------------------------------------------------------------


class Payload:
    """What a hostile `.ckpt` holds: unpickling it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def hostile_checkpoint(folder: Path, name: str) -> tuple[Path, Path]:
    import torch

    marker = folder / f"{name}.ran"
    path = folder / name
    torch.save({"state_dict": {"weight": torch.zeros(2), "hook": Payload(marker)}}, path)
    return path, marker


@pytest.mark.parametrize("name", ["evil.ckpt", "evil.pt", "evil.pth"])
def test_a_pickled_checkpoint_that_carries_code_is_refused_and_nothing_runs(tmp_path, name):
    from diffusion.checkpoints import UnsupportedCheckpoint, read_state_dict

    path, marker = hostile_checkpoint(tmp_path, name)
    with pytest.raises(UnsupportedCheckpoint, match=f"{name} could not be read as a checkpoint"):
        read_state_dict(path)
    assert not marker.exists()


def test_an_image_model_that_carries_code_is_refused_and_nothing_runs(tmp_path):
    import torch

    from diffusion.image_models import UnsupportedImageModel, load_image_model

    path, marker = hostile_checkpoint(tmp_path, "4x-evil.pt")
    with pytest.raises(UnsupportedImageModel, match="4x-evil.pt could not be read"):
        load_image_model(path, device=torch.device("cpu"))
    assert not marker.exists()


# --- images ---------------------------------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A few bytes of PNG whose header declares `width` x `height` pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


@pytest.mark.parametrize("size", [(6000, 5000), (100_000, 100_000)])
def test_an_image_declaring_too_many_pixels_is_refused_before_it_is_decoded(monkeypatch, size):
    import base64

    from services.inference.worker.engine.request import InvalidPayload, decode_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 25_000_000)
    with pytest.raises(InvalidPayload, match="pixels.*ESD_MAX_IMAGE_PIXELS"):
        decode_image(base64.b64encode(png_declaring(*size)).decode())


def test_a_training_image_declaring_too_many_pixels_fails_the_dataset(monkeypatch, tmp_path):
    from services.training.worker.trainer.dataset import InvalidDataset, TrainingImage, load_pixels

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 25_000_000)
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(100_000, 100_000))
    with pytest.raises(InvalidDataset, match="bomb.png: the image .*ESD_MAX_IMAGE_PIXELS"):
        load_pixels(TrainingImage(path=path, caption="", repeats=1, folder="1_x"), (64, 64))


def test_text_that_is_not_an_image_is_refused():
    from services.inference.worker.engine.request import InvalidPayload, decode_image

    with pytest.raises(InvalidPayload, match="not a base64-encoded PNG or JPEG image"):
        decode_image("aGVsbG8gd29ybGQ=")


# --- prompts --------------------------------------------------------------------------------


def test_a_prompt_of_100000_characters_is_refused_without_being_repeated():
    from services.inference.worker.engine.request import GenerationRequest, InvalidPayload

    prompt = "castle " * 14_286
    with pytest.raises(InvalidPayload) as refused:
        GenerationRequest.from_payload("txt2img", {"prompt": prompt}, max_prompt_chars=20_000)
    assert (
        "prompt is 100002 characters long; at most 20000 are accepted (ESD_MAX_PROMPT_CHARS)" in refused.value.message
    )
    assert "castle castle" not in refused.value.message


def test_a_field_error_quotes_a_users_text_only_in_part():
    from services.inference.worker.engine.request import GenerationRequest, InvalidPayload

    with pytest.raises(InvalidPayload) as refused:
        GenerationRequest.from_payload("txt2img", {"steps": "x" * 100_000})
    assert len(refused.value.message) < 300


def test_library_warnings_that_quote_users_are_off_and_library_lines_are_bounded(monkeypatch):
    from shared.logging import _bounded, configure_logging

    for variable in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        monkeypatch.delenv(variable, raising=False)
    levels = {name: logging.getLogger(name).level for name in ("transformers", "diffusers")}
    try:
        configure_logging("test")
        # a CLIP truncation warning quotes the prompt: only errors pass, now and once imported
        assert not logging.getLogger("transformers.tokenization_utils_base").isEnabledFor(logging.WARNING)
        assert not logging.getLogger("diffusers.pipelines").isEnabledFor(logging.WARNING)
        assert {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}.items() <= dict(
            __import__("os").environ
        ).items()
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    record = logging.LogRecord("aio_pika", logging.WARNING, __file__, 1, "%s", ("x" * 100_000,), None)
    assert _bounded(record)
    assert len(record.getMessage()) < 2100 and record.getMessage().endswith("(100000 characters)")


# --- a stalled storage: the caller told 503 has started nothing -----------------------------


async def test_a_start_whose_storage_stalls_answers_503_in_time_and_dispatches_nothing():
    import asyncio

    from services.inference.domain import InferenceJob
    from services.inference.jobs import Jobs
    from shared.contracts.identity import Principal
    from shared.contracts.inference import EndpointType, JobStatus, StartInference
    from shared.errors import Unavailable

    job = InferenceJob(
        id="job-1",
        task_type="txt2img",
        inference_type=EndpointType.ASYNC,
        status=JobStatus.CREATED,
        owner="alice",
        roles=[],
        endpoint_name="esd-async-a",
        endpoint_id="e1",
        instance_type="cpu",
        models=[],
        files=[],
        payload_key="txt2img/infer_v2/job-1/api_param.json",
        created=0.0,
    )
    transitions: list[str] = []

    class Store:
        async def job(self, inference_id):
            return job

        async def endpoint(self, name):
            return object()

        async def transition_job(self, inference_id, *args, **fields):
            transitions.append(inference_id)
            return True

    class StalledStorage:
        async def size(self, key):
            await asyncio.sleep(3600)  # S3 stalls past every caller's wait

    jobs = Jobs(Store(), StalledStorage(), None, None, None, live_within=6, storage_seconds=0.2)
    alice = Principal(username="alice", roles=[], permissions=[])
    with pytest.raises(Unavailable, match="object storage did not answer within 0.2 s .* nothing was started"):
        await jobs.start(StartInference(actor=alice, inference_id="job-1"))
    assert transitions == []  # not dispatched: the client's retry is the only run


def test_a_data_path_names_the_dataset_it_lies_in():
    from services.training.domain import dataset_of

    assert dataset_of("dataset/cats/") == ("cats", "")
    assert dataset_of("dataset/cats/5_cat/") == ("cats", "5_cat/")
    assert dataset_of("checkpoint/Lora/x/") == (None, "")
    assert dataset_of("dataset//") == (None, "")


def test_a_checkpoints_metadata_nested_thousands_deep_is_refused_not_a_recursion_error(tmp_path):
    import torch
    from safetensors.torch import save_file

    from diffusion.checkpoints import TINY_METADATA_KEY, tiny_metadata

    path = tmp_path / "deep.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={TINY_METADATA_KEY: "[" * 10_000 + "]" * 10_000})
    with pytest.raises(Invalid, match="deep.safetensors's metadata .* nests arrays and objects deeper than 32"):
        tiny_metadata(path)


@hypothesis.settings(max_examples=3000, deadline=None)
@hypothesis.given(
    hypothesis.strategies.from_regex(PLAIN_NAME_PATTERN, fullmatch=True).filter(lambda name: len(name) <= 255)
)
def test_every_name_the_document_allows_is_accepted_but_for_its_bytes(name):
    """The OpenAPI document's pattern and the validator agree (schemathesis found a DEL the
    pattern let through and the validator refused): only a byte length, which JSON Schema
    cannot state, may still refuse a name the pattern allows."""
    try:
        safe_file_name(name)
    except ValueError as error:
        assert "bytes" in str(error)
