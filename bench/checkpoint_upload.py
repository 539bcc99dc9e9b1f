"""Throughput of a checkpoint upload through the platform's presigned multipart flow, beside a
direct aioboto3 multipart upload of the same bytes to the same storage (the limit).

The platform flow is what an ESD client does: POST /checkpoints (one presigned URL per part),
PUT every part straight to storage, PUT /checkpoints/{id} with the ETags to complete. Both
upload the same parts with the same concurrency; the ratio is the cost of the platform's calls
around the transfer.

    .venv/bin/python bench/checkpoint_upload.py [--mib 256] [--parts 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import aioboto3
import httpx
from botocore.config import Config


async def gather_limited(limit: int, jobs):
    gate = asyncio.Semaphore(limit)

    async def run(job):
        async with gate:
            return await job

    return await asyncio.gather(*(run(job) for job in jobs))


def split(data: bytes, parts: int) -> list[bytes]:
    size = -(-len(data) // parts)
    return [data[i * size : (i + 1) * size] for i in range(parts)]


async def through_platform(stack, data: bytes, parts: int, concurrency: int) -> float:
    headers = {"x-api-key": stack.api_key, "username": stack.admin_username}
    name = f"bench-{uuid.uuid4().hex[:8]}.safetensors"
    async with (
        httpx.AsyncClient(base_url=stack.gateway_url, headers=headers, timeout=300) as api,
        httpx.AsyncClient(timeout=300) as storage,
    ):
        started = time.perf_counter()
        response = await api.post(
            "/checkpoints",
            json={"checkpoint_type": "Stable-diffusion", "filenames": [{"filename": name, "parts_number": parts}]},
        )
        created = response.json()["data"]
        urls = created["s3PresignUrl"][name]

        async def put(number: int, url: str, chunk: bytes) -> dict:
            reply = await storage.put(url, content=chunk)
            reply.raise_for_status()
            return {"ETag": reply.headers["etag"], "PartNumber": number}

        tags = await gather_limited(
            concurrency,
            [put(n, url, chunk) for n, (url, chunk) in enumerate(zip(urls, split(data, parts), strict=True), start=1)],
        )
        response = await api.put(
            f"/checkpoints/{created['checkpoint']['id']}", json={"status": "Active", "multi_parts_tags": {name: tags}}
        )
        assert response.status_code == 200, response.text
        elapsed = time.perf_counter() - started
        await api.request("DELETE", "/checkpoints", json={"checkpoint_id_list": [created["checkpoint"]["id"]]})
    return elapsed


async def direct(stack, data: bytes, parts: int, concurrency: int) -> float:
    session = aioboto3.Session()
    async with session.client(
        "s3",
        endpoint_url=stack.s3_endpoint_url,
        aws_access_key_id=stack.s3_access_key,
        aws_secret_access_key=stack.s3_secret_key,
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    ) as s3:
        key = f"bench/{uuid.uuid4().hex}.safetensors"
        started = time.perf_counter()
        upload_id = (await s3.create_multipart_upload(Bucket="esd", Key=key))["UploadId"]

        async def put(number: int, chunk: bytes) -> dict:
            reply = await s3.upload_part(Bucket="esd", Key=key, UploadId=upload_id, PartNumber=number, Body=chunk)
            return {"ETag": reply["ETag"], "PartNumber": number}

        tags = await gather_limited(concurrency, [put(n, chunk) for n, chunk in enumerate(split(data, parts), start=1)])
        await s3.complete_multipart_upload(Bucket="esd", Key=key, UploadId=upload_id, MultipartUpload={"Parts": tags})
        elapsed = time.perf_counter() - started
        await s3.delete_object(Bucket="esd", Key=key)
    return elapsed


async def run(stack, mib: int, parts: int, rounds: int, concurrency: int) -> None:
    data = os.urandom(mib * 1024 * 1024)
    await direct(stack, data[: 8 * 1024 * 1024], 1, 1)  # warm up connections
    platform_times, direct_times = [], []
    for _ in range(rounds):  # interleaved, so drift in the machine's load hits both alike
        direct_times.append(await direct(stack, data, parts, concurrency))
        platform_times.append(await through_platform(stack, data, parts, concurrency))
    d, p = statistics.median(direct_times), statistics.median(platform_times)
    print(f"{mib} MiB in {parts} parts, {concurrency} at a time, median of {rounds} rounds")
    print(f"  direct aioboto3 multipart upload   {d:7.2f} s  {mib / d:8.1f} MiB/s")
    print(f"  platform presigned flow (API+S3)   {p:7.2f} s  {mib / p:8.1f} MiB/s")
    print(f"  platform / direct throughput       {d / p:7.2f}x   (overhead {1000 * (p - d):.0f} ms per upload)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--parts", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    from deploy.local.stack import LocalStack, free_port

    with tempfile.TemporaryDirectory(prefix="esd-bench-") as var:
        stack = LocalStack(
            Path(var),
            gateway_port=free_port(),
            mongo_port=free_port(),
            s3_port=free_port(),
            env={"ESD_BROKER_PREFIX": f"bench-{uuid.uuid4().hex[:6]}.", "ESD_LOG_LEVEL": "WARNING"},
            quiet=True,
        )
        stack.up()
        try:
            asyncio.run(run(stack, args.mib, args.parts, args.rounds, args.concurrency))
        finally:
            stack.down()


if __name__ == "__main__":
    main()
