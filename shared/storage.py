"""Object storage over the S3 API (aioboto3): SeaweedFS locally, any S3 in production.

One client per process, opened at start-up (creating one costs tens of milliseconds). Clients
of the platform move large files through presigned URLs, straight to storage."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aioboto3
from botocore.config import Config
from botocore.exceptions import ClientError

from shared.errors import Invalid
from shared.settings import Settings

PRESIGN_SECONDS = 3600


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> (`bucket`, `some/key`): the one place `s3://` locations are
    read. The key may be empty (the bucket itself); `..` segments are refused."""
    if not uri.startswith("s3://"):
        raise Invalid(f"{uri} is not an s3:// location")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or ".." in key.split("/"):
        raise Invalid(f"{uri} is not a valid s3:// location")
    return bucket, key


class ObjectStore:
    def __init__(self, client: Any, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    @classmethod
    async def open(cls, settings: Settings, stack: AsyncExitStack) -> ObjectStore:
        session = aioboto3.Session()
        client = await stack.enter_async_context(
            session.client(
                "s3",
                endpoint_url=settings.s3_endpoint_url,
                aws_access_key_id=settings.s3_access_key.get_secret_value() or None,
                aws_secret_access_key=settings.s3_secret_key.get_secret_value() or None,
                region_name=settings.s3_region,
                config=Config(
                    signature_version="s3v4",
                    s3={"addressing_style": "path"},
                    retries={"max_attempts": 3, "mode": "standard"},
                ),
            )
        )
        return cls(client, settings.s3_bucket)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def key_of(self, uri: str) -> str:
        """The key of an `s3://` location in this store's bucket; anything else (another
        bucket, not a location, a `..` segment) is a 400 naming it."""
        bucket, key = parse_s3_uri(uri)
        if bucket != self.bucket:
            raise Invalid(f"{uri} is not a path in this platform's bucket (s3://{self.bucket}/...)")
        return key

    async def ensure_bucket(self) -> None:
        try:
            await self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            await self.client.create_bucket(Bucket=self.bucket)

    # --- presigned URLs ---

    async def presign_get(self, key: str, expires: int = PRESIGN_SECONDS) -> str:
        return await self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires
        )

    async def presign_put(self, key: str, expires: int = PRESIGN_SECONDS) -> str:
        return await self.client.generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires
        )

    async def presign_part(self, key: str, upload_id: str, part: int, expires: int = PRESIGN_SECONDS) -> str:
        return await self.client.generate_presigned_url(
            "upload_part",
            Params={"Bucket": self.bucket, "Key": key, "UploadId": upload_id, "PartNumber": part},
            ExpiresIn=expires,
        )

    # --- multipart uploads ---

    async def start_multipart(self, key: str) -> str:
        reply = await self.client.create_multipart_upload(Bucket=self.bucket, Key=key)
        return reply["UploadId"]

    async def upload_part(self, key: str, upload_id: str, part: int, body: bytes) -> str:
        reply = await self.client.upload_part(
            Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=part, Body=body
        )
        return reply["ETag"]

    async def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> None:
        await self.client.complete_multipart_upload(
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": number, "ETag": etag} for number, etag in sorted(parts)]},
        )

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            await self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError:
            pass  # already completed or aborted

    # --- objects ---

    async def put(self, key: str, body: bytes, content_type: str = "application/octet-stream") -> None:
        await self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)

    async def get(self, key: str) -> bytes:
        reply = await self.client.get_object(Bucket=self.bucket, Key=key)
        async with reply["Body"] as stream:
            return await stream.read()

    async def stream(self, key: str, chunk: int = 8 * 1024 * 1024) -> AsyncIterator[bytes]:
        reply = await self.client.get_object(Bucket=self.bucket, Key=key)
        body = reply["Body"]
        try:
            while data := await body.read(chunk):
                yield data
        finally:
            body.close()

    async def download_to(self, key: str, path: Path) -> Path:
        """Write an object to a local file, atomically: processes sharing a cache folder never
        see half a file, and a failed download leaves nothing behind."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            with open(partial, "wb") as out:
                async for chunk in self.stream(key):
                    out.write(chunk)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, path)
        return path

    async def size(self, key: str) -> int | None:
        try:
            reply = await self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError:
            return None
        return reply["ContentLength"]

    async def keys(self, prefix: str) -> list[str]:
        found: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            found.extend(item["Key"] for item in page.get("Contents", ()))
        return found

    async def delete_prefix(self, prefix: str) -> int:
        keys = await self.keys(prefix)
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            await self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True}
            )
        return len(keys)
