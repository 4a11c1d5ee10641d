"""The S3 client both sides use: one long-lived aiobotocore client per process."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError


def s3_config(max_connections: int = 10) -> AioConfig:
    # payload_signing_enabled=False: over plain http botocore would otherwise read every
    # request body on the event loop to sha256-sign it (an 8 MiB part: ~20 ms of loop time,
    # and a read that no bandwidth cap can pace). Integrity does not depend on it: uploads
    # carry Content-MD5 and a CRC32 the server checks (BadDigest), small bodies botocore's
    # own CRC32, and the cloud checks every chunk against its signed manifest's sha256.
    # (Over https botocore already sends UNSIGNED-PAYLOAD whenever a checksum is present.)
    # signature_version: presigned URLs (the webhook's) are SigV4 too, not botocore's
    # legacy SigV2 for S3 (which newer stores refuse, and which cannot expire in < 1 s).
    return AioConfig(
        signature_version="s3v4",
        s3={"addressing_style": "path", "payload_signing_enabled": False},
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=max_connections,
    )


async def open_s3(
    stack: AsyncExitStack, endpoint_url: str | None, region: str, *, max_connections: int = 10
) -> Any:
    """Enter one S3 client for the life of the process (or actor). ``max_connections``:
    its connection pool (botocore's default is 10; a request beyond waits for one)."""
    session = get_session()
    return await stack.enter_async_context(
        session.create_client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=s3_config(max_connections),
        )
    )


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def is_not_found(exc: ClientError) -> bool:
    """The *object* is not there. A missing bucket (``NoSuchBucket``), a redirect or a
    refusal is not: those say something about the caller's access or configuration, not
    about one object. (A HEAD has no body, so its 404 cannot tell a missing bucket from a
    missing key: callers that must know read the bucket first.)"""
    return error_code(exc) in ("404", "NoSuchKey", "NotFound")


async def object_exists(s3: Any, bucket: str, key: str) -> bool:
    try:
        await s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if is_not_found(exc):
            return False
        raise
    return True
