"""Streaming a model file from a URL into object storage.

The file flows through in parts (a multipart upload), so memory holds one part, never the
file, and a file larger than the deployment's limit is cut off. Every connection, a redirect's
included, goes to an address that was checked as it was resolved (shared/net.py): addresses in
loopback, private, link-local or reserved ranges are refused unless the deployment allows them.
Redirects are followed by hand, each hop's URL checked as the first one is."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from urllib.parse import urljoin

import httpx

from services.checkpoint.domain import check_download_name, check_url, file_name_from_url
from shared.contracts.checkpoint import CheckpointType
from shared.errors import Invalid
from shared.net import public_transport
from shared.storage import ObjectStore

MAX_REDIRECTS = 10
PROGRESS_EVERY_SECONDS = 1.0

# Given the file's name (from the response), reserve it and answer the storage key to write.
NameFound = Callable[[str], Awaitable[str]]
Progress = Callable[[int, int | None], Awaitable[None]]


class Downloader:
    def __init__(
        self,
        storage: ObjectStore,
        *,
        allow_private: bool,
        part_bytes: int,
        timeout: float,
        max_bytes: int | None = None,
    ) -> None:
        self.storage = storage
        self.allow_private = allow_private
        self.max_bytes = max_bytes
        self.part_bytes = max(part_bytes, 5 * 1024 * 1024)  # S3's smallest part but the last
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 15.0))

    async def download(
        self,
        url: str,
        *,
        name_found: NameFound,
        progress: Progress,
        checkpoint_type: CheckpointType | None = None,
    ) -> tuple[str, int]:
        """Stream `url` into storage; returns the file name and its size in bytes. The file's
        kind must be one a checkpoint of `checkpoint_type` may hold."""
        transport = public_transport(
            allow_private=self.allow_private, doing="download from", setting="ESD_CHECKPOINT_ALLOW_PRIVATE_URLS"
        )
        async with httpx.AsyncClient(timeout=self.timeout, trust_env=False, transport=transport) as client:
            response = await self._open(client, url)
            try:
                name = file_name_from_url(str(response.url), response.headers.get("content-disposition"))
                check_download_name(name, checkpoint_type)
                key = await name_found(name)
                total = _content_length(response)
                if total is not None:
                    self._check_size(total)
                size = await self._upload(response, key, total, progress)
            finally:
                await response.aclose()
        return name, size

    async def _open(self, client: httpx.AsyncClient, url: str) -> httpx.Response:
        for _ in range(MAX_REDIRECTS + 1):
            check_url(url)  # a redirect's too
            try:
                response = await client.send(client.build_request("GET", url), stream=True)
            except (httpx.HTTPError, httpx.InvalidURL) as error:
                raise Invalid(f"could not download {url}: {_describe(error)}") from None
            if response.is_redirect and "location" in response.headers:
                await response.aclose()
                url = urljoin(url, response.headers["location"])
                continue
            if response.status_code != 200:
                await response.aclose()
                raise Invalid(f"could not download {url}: it answered {response.status_code} {response.reason_phrase}")
            return response
        raise Invalid(f"could not download {url}: more than {MAX_REDIRECTS} redirects")

    def _check_size(self, size: int) -> None:
        if self.max_bytes is not None and size > self.max_bytes:
            raise Invalid(
                f"the file is larger than {self.max_bytes} bytes, the most a checkpoint may hold "
                "(ESD_CHECKPOINT_MAX_BYTES)"
            )

    async def _upload(self, response: httpx.Response, key: str, total: int | None, progress: Progress) -> int:
        upload_id = await self.storage.start_multipart(key)
        parts: list[tuple[int, str]] = []
        buffer = bytearray()
        done = 0
        reported = time.monotonic()
        try:
            async for chunk in response.aiter_bytes(1024 * 1024):
                buffer += chunk
                done += len(chunk)
                self._check_size(done)  # a body that never ends, or a Content-Length that lied
                if len(buffer) >= self.part_bytes:
                    parts.append(
                        (len(parts) + 1, await self.storage.upload_part(key, upload_id, len(parts) + 1, bytes(buffer)))
                    )
                    buffer.clear()
                if time.monotonic() - reported >= PROGRESS_EVERY_SECONDS:
                    reported = time.monotonic()
                    await progress(done, total)
            if total is not None and done != total:
                raise Invalid(f"the download ended after {done} of {total} bytes")
            if buffer or not parts:
                parts.append(
                    (len(parts) + 1, await self.storage.upload_part(key, upload_id, len(parts) + 1, bytes(buffer)))
                )
            await self.storage.complete_multipart(key, upload_id, parts)
        except httpx.HTTPError as error:
            await self.storage.abort_multipart(key, upload_id)
            raise Invalid(f"the download broke off after {done} bytes: {_describe(error)}") from None
        except BaseException:
            await self.storage.abort_multipart(key, upload_id)
            raise
        await progress(done, done)
        return done


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


def _describe(error: httpx.HTTPError) -> str:
    return str(error) or type(error).__name__
