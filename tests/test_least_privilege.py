"""Least privilege on the real servers (issue #5).

Redis: a private redis-server that speaks TLS only, with the users of
configs/redis/users.acl.example (default user off). SeaweedFS: a private S3
gateway with the identities of configs/seaweedfs/s3-identities.example.json and
the raw bucket's policy from configs/seaweedfs/raw-bucket-policy.example.json.
The example files are what is tested: only their password and key placeholders
are filled in. Last, the real edge agent and cloud deployment run across both.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import botocore
import pytest
import ray
import redis.asyncio as aioredis
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from cloud_ingest import admin
from cloud_ingest.processor import LOCK_SCRIPT, UNLOCK_SCRIPT
from cloud_ingest.totals import read_totals
from devstack.s3 import S3
from devstack.servers import RedisServer, SeaweedS3, free_port
from devstack.tls import issue, make_ca
from edge_agent.segmenter import ClosedChunk
from shared.keys import (
    chunk_lock_key,
    consumer_totals_key,
    dlq_stream,
    handoff_stream,
    readable_object_key,
    recent_hashes_key,
    redis_probe_key,
)
from shared.queue import Acks, GroupConsumer, ReapCursor, ensure_group, publish, status
from shared.s3 import is_not_found, s3_config
from tests.support import (
    BIN,
    Daemon,
    Edge,
    Stack,
    actor_stats,
    base_env,
    cloud_ingest,
    edge_agent,
    eventually,
    holds,
    ingest_settings,
    queue_state,
    report_figures,
    start_consumer,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RAW, OUT = "cctv-raw", "cctv-processed"  # the bucket names the example files name
STREAM = "chunks"  # EDGE_STREAM / INGEST_STREAM: the stream the example ACL names

# -- Redis: TLS + ACL users -------------------------------------------------------


@dataclass(frozen=True)
class SecureRedis:
    server: RedisServer
    ca_file: Path
    passwords: dict[str, str]

    def url(self, user: str, *, ca_file: Path | None = None, password: str | None = None) -> str:
        secret = self.passwords[user] if password is None else password
        ca = ca_file or self.ca_file
        return (
            f"rediss://{user}:{secret}@127.0.0.1:{self.server.port}/0"
            f"?ssl_ca_certs={ca}&ssl_cert_reqs=required"
        )

    def client(self, user: str, **kwargs: Any) -> aioredis.Redis:
        return aioredis.from_url(self.url(user, **kwargs), socket_timeout=5)


def render_acl(passwords: dict[str, str]) -> str:
    """The example ACL with its password placeholders filled in (as SHA-256, as Redis
    stores them), plus a test-only ``housekeeper`` that empties the database between
    tests; the example's own users are used as they are."""
    text = (CONFIGS / "redis" / "users.acl.example").read_text()
    for user in ("edge", "cloud"):
        digest = hashlib.sha256(passwords[user].encode()).hexdigest()
        placeholder = f"#{user.upper()}_PASSWORD_SHA256"
        assert placeholder in text
        text = text.replace(placeholder, f"#{digest}")
    return text + f"user housekeeper on >{passwords['housekeeper']} ~* &* +@all\n"


@pytest.fixture(scope="module")
def redis_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRedis]:
    workdir = tmp_path_factory.mktemp("least-privilege-redis")
    ca = make_ca(workdir / "pki")
    leaf = issue(ca, workdir / "pki", "redis", dns=("localhost",), ips=("127.0.0.1",))
    passwords = {u: secrets.token_hex(16) for u in ("edge", "cloud", "housekeeper")}
    aclfile = workdir / "users.acl"
    aclfile.write_text(render_acl(passwords))
    aclfile.chmod(0o600)
    server = RedisServer(workdir, tls=leaf, aclfile=aclfile)
    server.start()
    yield SecureRedis(server, ca.cert_file, passwords)
    server.stop()


@pytest.fixture
async def secure_redis(redis_tls: SecureRedis) -> SecureRedis:
    keeper = redis_tls.client("housekeeper")
    await keeper.flushall()
    await keeper.aclose()
    return redis_tls


async def permitted(client: aioredis.Redis, commands: list[tuple[str, ...]]) -> list[str]:
    """The commands that were NOT refused with NOPERM (any other error propagates)."""
    allowed = []
    for command in commands:
        try:
            await client.execute_command(*command)  # type: ignore[no-untyped-call]
        except NoPermissionError:
            continue
        allowed.append(" ".join(command))
    return allowed


async def test_redis_refuses_the_default_user_and_wrong_passwords(
    secure_redis: SecureRedis,
) -> None:
    """`default` is off: no unauthenticated session, no password makes it usable."""
    port = secure_redis.server.port
    ca = secure_redis.ca_file
    anonymous = aioredis.from_url(
        f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required"
    )
    with pytest.raises(AuthenticationError, match=r"NOAUTH|Authentication required|authenticated"):
        await anonymous.ping()
    await anonymous.aclose()
    as_default = aioredis.from_url(secure_redis.url("edge").replace("edge:", "default:", 1))
    with pytest.raises(AuthenticationError):
        await as_default.ping()
    await as_default.aclose()
    wrong = secure_redis.client("edge", password="not-the-password")
    with pytest.raises(AuthenticationError):
        await wrong.ping()
    await wrong.aclose()


async def test_redis_tls_verifies_the_server_and_refuses_plaintext(
    secure_redis: SecureRedis, tmp_path: Path
) -> None:
    """The CA in the URL is what the client trusts; another CA or plaintext cannot connect."""
    edge = secure_redis.client("edge")
    kwargs = edge.connection_pool.connection_kwargs
    # redis-py passes the URL's query through to its SSL connection.
    assert kwargs["ssl_ca_certs"] == str(secure_redis.ca_file)
    assert kwargs["ssl_cert_reqs"] == "required"
    assert await edge.ping() is True
    await edge.aclose()

    stranger_ca = make_ca(tmp_path / "other-pki", "some other CA")
    untrusting = secure_redis.client("edge", ca_file=stranger_ca.cert_file)
    with pytest.raises(RedisConnectionError, match=r"(?i)certificate verify failed"):
        await untrusting.ping()
    await untrusting.aclose()

    plain = aioredis.from_url(
        f"redis://edge:{secure_redis.passwords['edge']}@127.0.0.1:{secure_redis.server.port}/0",
        socket_timeout=5,
        socket_connect_timeout=5,
    )
    with pytest.raises(RedisConnectionError):
        await plain.ping()
    await plain.aclose()


async def test_redis_edge_user_may_only_xadd_to_its_stream(secure_redis: SecureRedis) -> None:
    edge = secure_redis.client("edge")
    keeper = secure_redis.client("housekeeper")
    try:
        entry_id = await publish(edge, STREAM, {"manifest": b"{}", "sig": b"x"})
        assert await edge.ping() is True  # the agent's readiness check
        eid = entry_id.decode()
        allowed = await permitted(
            edge,
            [
                ("XRANGE", STREAM, "-", "+"),
                ("XREVRANGE", STREAM, "+", "-"),
                ("XREAD", "STREAMS", STREAM, "0"),
                ("XLEN", STREAM),
                ("XDEL", STREAM, eid),
                ("XTRIM", STREAM, "MAXLEN", "0"),
                ("DEL", STREAM),
                ("UNLINK", STREAM),
                ("XGROUP", "CREATE", STREAM, "thief", "0"),
                ("XREADGROUP", "GROUP", "ingest", "c", "STREAMS", STREAM, ">"),
                ("XADD", dlq_stream(STREAM), "*", "reason", "forged"),
                ("XADD", "another-stream", "*", "f", "v"),
                ("GET", chunk_lock_key("c1")),
                ("SET", chunk_lock_key("c1"), "mine"),
                ("SET", "anything", "1"),
                ("KEYS", "*"),
                ("SCAN", "0"),
                ("DBSIZE",),
                ("FLUSHALL",),
                ("FLUSHDB",),
                ("CONFIG", "GET", "*"),
                ("CONFIG", "SET", "appendonly", "no"),
                ("ACL", "LIST"),
                ("ACL", "SETUSER", "edge", "+@all"),
                ("EVAL", "return 1", "0"),
                ("MULTI",),
                ("PUBLISH", "events", "x"),
                ("SELECT", "1"),
                ("INFO",),
                ("CLIENT", "LIST"),
            ],
        )
        assert allowed == []
        # Nothing the edge tried did anything: one stream, with the one entry it added.
        assert await keeper.keys("*") == [STREAM.encode()]
        entries: Any = await keeper.xrange(STREAM)
        [(found_id, fields)] = entries
        assert found_id == entry_id
        assert fields == {b"manifest": b"{}", b"sig": b"x"}
    finally:
        await edge.aclose()
        await keeper.aclose()


async def test_redis_cloud_user_runs_the_consumer_side_and_nothing_more(
    secure_redis: SecureRedis,
) -> None:
    edge = secure_redis.client("edge")
    cloud = secure_redis.client("cloud")
    try:
        ids = [await publish(edge, STREAM, {"manifest": f"m{i}".encode()}) for i in range(3)]
        await ensure_group(cloud, STREAM, "ingest")
        await ensure_group(cloud, STREAM, "ingest")  # BUSYGROUP: kept as it is
        queue = GroupConsumer(cloud, STREAM, "ingest", "consumer-0")
        entries = await queue.read(10, 100)
        assert [e.id for e in entries] == ids
        held = chunk_lock_key("chunk-0")
        holder = f"{ids[0].decode()}/consumer-0"
        assert await cloud.eval(LOCK_SCRIPT, 1, held, holder, f"{ids[0].decode()}/", "60000") == 1
        lost = await queue.renew([e.id for e in entries], {held: holder}, 120_000)
        keeper = secure_redis.client("housekeeper")
        assert lost == [] and await keeper.pttl(held) > 60_000  # lock renewed with the lease
        await keeper.aclose()
        assert await queue.release(entries[:1]) == 1  # given back uncounted (XCLAIM IDLE)
        reclaimed = await queue.claim_stale(ReapCursor(), 0, 10)
        assert [e.id for e in reclaimed] == ids
        # XAUTOCLAIM counted a delivery; the released entry had gone back to its count before
        assert [e.deliveries for e in reclaimed] == [1, 2, 2]
        # The consumers' totals (the metrics' counters), in the owner-checked ack script,
        # with its flush token; the dead-letter script counts its letter.
        batch = Acks({ids[0]: ("processed",)}, {"reclaimed": 3}, {"download": 0.5}, "run:0")
        assert await queue.ack(batch) == 1
        assert await queue.ack(Acks(batch.entries, batch.counts, batch.seconds, "run:0")) == 0
        await queue.dead_letter(reclaimed[1], "test_reason", "detail")
        assert await read_totals(cloud, "ingest") == (
            {"processed": 1.0, "reclaimed": 3.0, "dead_lettered": 1.0, "rejected_test_reason": 1.0},
            {"download": 0.5},
        )
        # The environment probe: its canary write, a look at the totals hash, and the raw
        # object the group read lately; and XPENDING + XRANGE of entries a lost reply gave.
        assert await cloud.set(redis_probe_key("consumer-0"), "1", px=60_000)
        assert await cloud.hexists(consumer_totals_key("ingest", "consumer-0"), "-") is False
        assert await cloud.set(readable_object_key("ingest"), "raw\0k", ex=86400)
        assert await cloud.get(readable_object_key("ingest")) == b"raw\0k"
        rows = await cloud.xpending_range(STREAM, "ingest", "-", "+", 10, consumername="consumer-0")
        assert len(await cloud.xrange(STREAM, rows[0]["message_id"], rows[0]["message_id"])) == 1
        st = await status(cloud, STREAM, "ingest")
        assert (st.length, st.pending, st.dlq, st.added) == (1, 1, 1, 3)
        assert [c["name"] for c in st.consumers] == ["consumer-0"]
        # Operator commands on the dead letters run as the cloud user too.
        letters = [x async for page in admin.letters(cloud, STREAM) for x in page]
        assert [x.reason for x in letters] == ["test_reason"]
        assert await admin.requeue(cloud, STREAM, letters, {}) == 1  # no key: left untagged
        assert await cloud.xlen(dlq_stream(STREAM)) == 0
        await queue.ack([ids[2]])
        [again] = await queue.read(10, None)  # the requeued letter, delivered again
        assert again.fields == {b"manifest": b"m1"}
        # The chunk lock, released by the processor's own script (GET + DEL in Lua).
        lock = chunk_lock_key("chunk-1")
        assert await cloud.set(lock, "owner-a", nx=True, px=60_000)
        assert await cloud.eval(UNLOCK_SCRIPT, 1, lock, "owner-b") == 0
        assert await cloud.eval(UNLOCK_SCRIPT, 1, lock, "owner-a") == 1
        assert await cloud.get(lock) is None
        # Recent hashes (near-duplicate filter) and the hand-off stream's group.
        recent = recent_hashes_key("site-1", "cam1")
        async with cloud.pipeline(transaction=True) as pipe:
            pipe.lpush(recent, "chunk-1:abcd")
            pipe.ltrim(recent, 0, 15)
            pipe.expire(recent, 60)
            await pipe.execute()
        assert await cloud.lrange(recent, 0, -1) == [b"chunk-1:abcd"]
        await ensure_group(cloud, handoff_stream(STREAM), "handoff")

        allowed = await permitted(
            cloud,
            [
                ("FLUSHALL",),
                ("FLUSHDB",),
                ("CONFIG", "GET", "*"),
                ("CONFIG", "SET", "appendonly", "no"),
                ("KEYS", "*"),
                ("SCAN", "0"),
                ("DEL", STREAM),  # DEL is granted for lock keys only
                ("DEL", recent),
                ("UNLINK", lock),
                ("XTRIM", STREAM, "MAXLEN", "0"),
                ("XGROUP", "DESTROY", STREAM, "ingest"),
                ("XGROUP", "SETID", STREAM, "ingest", "$"),
                ("XADD", "another-stream", "*", "f", "v"),
                ("GET", "another-key"),
                ("SET", "another-key", "1"),
                ("EVAL", "return redis.call('get', KEYS[1])", "1", "another-key"),
                ("ACL", "LIST"),
                ("ACL", "SETUSER", "cloud", "+@all"),
                ("SCRIPT", "FLUSH"),
                ("FUNCTION", "FLUSH"),
                ("SELECT", "1"),
                ("PUBLISH", "events", "x"),
                ("CLIENT", "LIST"),
                ("BGSAVE",),
            ],
        )
        assert allowed == []
        # A script cannot reach past the ACL either.
        with pytest.raises(ResponseError, match="user executing the script can't run this command"):
            await cloud.eval("return redis.call('flushall')", 0)
        assert await cloud.xlen(STREAM) == 1
    finally:
        await edge.aclose()
        await cloud.aclose()


# -- SeaweedFS: S3 identities ----------------------------------------------------


@dataclass(frozen=True)
class SecureS3:
    server: SeaweedS3
    credentials_file: Path
    keys: dict[str, tuple[str, str]]  # profile -> (access key id, secret)

    async def client(self, stack: AsyncExitStack, profile: str | None) -> Any:
        """An S3 client whose credentials come from the AWS chain: a shared credentials
        file and a named profile (``None``: unsigned, anonymous requests)."""
        session = get_session()
        config: AioConfig = s3_config()
        if profile is None:
            config = config.merge(AioConfig(signature_version=botocore.UNSIGNED))
        else:
            session.set_config_variable("credentials_file", str(self.credentials_file))
            session.set_config_variable("config_file", str(self.credentials_file.parent / "none"))
            session.set_config_variable("profile", profile)
        return await stack.enter_async_context(
            session.create_client(
                "s3", endpoint_url=self.server.endpoint, region_name="us-east-1", config=config
            )
        )


# Test-only identities, added to the example's (as the Redis ACL's housekeeper is): one that
# may read everything but write no output, and one with the cloud's actions that a test's
# bucket policy denies GetObject on raw objects (HeadBucket passes for both).
MISCONFIGURED = {
    "noread": ["Read:cctv-raw", "List:cctv-raw", "Read:cctv-processed", "Write:cctv-processed"],
    "nowrite": ["Read:cctv-raw", "List:cctv-raw", "Read:cctv-processed"],
}


@asynccontextmanager
async def sender_while_denied(
    secure: SecureS3, stack: Stack, cloud: Any, edge_redis: Any, user: str, resource: str
) -> AsyncIterator[tuple[S3, Edge]]:
    """For the block, ``user`` may not GetObject ``resource`` (raw_policy_denying), and an
    Edge uploads as the admin and announces as the edge user to a group that exists."""
    async with raw_policy_denying(secure, user, resource), AsyncExitStack() as s3_stack:
        uploader = S3(stack.s3_endpoint)
        uploader.client = await secure.client(s3_stack, "admin")
        await ensure_group(cloud, STREAM, "ingest")
        yield uploader, Edge(stack, uploader, edge_redis)


@asynccontextmanager
async def raw_policy_denying(secure: SecureS3, user: str, resource: str) -> AsyncIterator[None]:
    """The example raw-bucket policy plus a Deny of GetObject on ``resource`` to ``user``,
    for the duration of a test; the example's own policy is put back after."""
    example = (CONFIGS / "seaweedfs" / "raw-bucket-policy.example.json").read_text()
    policy = json.loads(example)
    policy["Statement"].append(
        {
            "Sid": "TestDeniesGetObject",
            "Effect": "Deny",
            "Principal": {"AWS": [f"arn:aws:iam::000000000000:user/{user}"]},
            "Action": ["s3:GetObject"],
            "Resource": [f"arn:aws:s3:::{resource}"],
        }
    )
    async with AsyncExitStack() as stack:
        admin_s3 = await secure.client(stack, "admin")
        await admin_s3.put_bucket_policy(Bucket=RAW, Policy=json.dumps(policy))
        try:
            yield
        finally:
            await admin_s3.put_bucket_policy(Bucket=RAW, Policy=example)


def render_identities(keys: dict[str, tuple[str, str]]) -> str:
    text = (CONFIGS / "seaweedfs" / "s3-identities.example.json").read_text()
    for name, (access, secret) in keys.items():
        if name in MISCONFIGURED:
            continue
        for placeholder, value in (
            (f"{name.upper()}_ACCESS_KEY_ID", access),
            (f"{name.upper()}_SECRET_ACCESS_KEY", secret),
        ):
            assert placeholder in text
            text = text.replace(placeholder, value)
    doc = json.loads(text)
    for name, actions in MISCONFIGURED.items():
        if name in keys:
            access, secret = keys[name]
            credentials = [{"accessKey": access, "secretKey": secret}]
            doc["identities"].append({"name": name, "credentials": credentials, "actions": actions})
    return json.dumps(doc, indent=2)


@pytest.fixture(scope="module")
def s3_identities(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureS3]:
    workdir = tmp_path_factory.mktemp("least-privilege-s3")
    # The cloud identity holds the keys the session's Ray workers carry in their
    # environment (base_env): the consumer actors sign with those, not with whatever the
    # cloud-ingest driver process has.
    env = base_env()
    keys = {
        "admin": (f"admin-{secrets.token_hex(4)}", secrets.token_hex(20)),
        "edge": (f"edge-{secrets.token_hex(4)}", secrets.token_hex(20)),
        "cloud": (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]),
        **{n: (f"{n}-{secrets.token_hex(4)}", secrets.token_hex(20)) for n in MISCONFIGURED},
    }
    config = workdir / "s3-identities.json"
    config.write_text(render_identities(keys))
    config.chmod(0o600)
    credentials = workdir / "aws-credentials"
    stranger = (f"stranger-{secrets.token_hex(4)}", secrets.token_hex(20))  # no identity
    credentials.write_text(
        "".join(
            f"[{p}]\naws_access_key_id = {a}\naws_secret_access_key = {s}\n\n"
            for p, (a, s) in {**keys, "stranger": stranger}.items()
        )
    )
    credentials.chmod(0o600)
    server = SeaweedS3(workdir, s3_config=config)
    server.start()
    secure = SecureS3(server, credentials, keys)
    try:
        asyncio.run(_provision(secure))
        yield secure
    finally:
        server.stop()


async def _provision(secure: SecureS3) -> None:
    """As the admin: the two buckets, and the raw bucket's policy from the example."""
    policy = (CONFIGS / "seaweedfs" / "raw-bucket-policy.example.json").read_text()
    async with AsyncExitStack() as stack:
        s3 = await secure.client(stack, "admin")
        for bucket in (RAW, OUT):
            await s3.create_bucket(Bucket=bucket)
        await s3.put_bucket_policy(Bucket=RAW, Policy=policy)
        stored = await s3.get_bucket_policy(Bucket=RAW)
        assert json.loads(stored["Policy"])["Statement"][0]["Effect"] == "Deny"


async def error_code(call: Any) -> str:
    """The S3 error code a call fails with ('' if it succeeds)."""
    try:
        await call
    except ClientError as exc:
        return str(exc.response.get("Error", {}).get("Code"))
    return ""


async def body_of(s3: Any, bucket: str, key: str) -> bytes:
    resp = await s3.get_object(Bucket=bucket, Key=key)
    async with resp["Body"] as body:
        data: bytes = await body.read()
    return data


DENIED = {"AccessDenied", "403"}


async def test_s3_edge_identity_writes_raw_chunks_but_cannot_read_delete_or_touch_outputs(
    s3_identities: SecureS3,
) -> None:
    async with AsyncExitStack() as stack:
        edge = await s3_identities.client(stack, "edge")
        admin_s3 = await s3_identities.client(stack, "admin")
        key = f"raw/acl-test/{secrets.token_hex(4)}.mp4"
        await edge.put_object(Bucket=RAW, Key=key, Body=b"chunk bytes")
        # Multipart, as the uploader does above EDGE_MULTIPART_THRESHOLD_BYTES.
        big_key = f"raw/acl-test/{secrets.token_hex(4)}-big.mp4"
        parts_data = [os.urandom(5 * 1024 * 1024), b"tail"]
        upload = await edge.create_multipart_upload(Bucket=RAW, Key=big_key)
        parts = []
        for n, data in enumerate(parts_data, start=1):
            part = await edge.upload_part(
                Bucket=RAW, Key=big_key, UploadId=upload["UploadId"], PartNumber=n, Body=data
            )
            parts.append({"PartNumber": n, "ETag": part["ETag"]})
        await edge.complete_multipart_upload(
            Bucket=RAW, Key=big_key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
        )
        aborted = await edge.create_multipart_upload(Bucket=RAW, Key=big_key + ".aborted")
        await edge.abort_multipart_upload(
            Bucket=RAW, Key=big_key + ".aborted", UploadId=aborted["UploadId"]
        )
        await edge.head_bucket(Bucket=RAW)  # the agent's readiness check

        codes = {
            "get": await error_code(edge.get_object(Bucket=RAW, Key=key)),
            "head": await error_code(edge.head_object(Bucket=RAW, Key=key)),
            "list": await error_code(edge.list_objects_v2(Bucket=RAW)),
            "delete": await error_code(edge.delete_object(Bucket=RAW, Key=key)),
            "put outside raw/": await error_code(
                edge.put_object(Bucket=RAW, Key="elsewhere/x.mp4", Body=b"x")
            ),
            "put output": await error_code(edge.put_object(Bucket=OUT, Key="x", Body=b"x")),
            "get output": await error_code(edge.get_object(Bucket=OUT, Key="x")),
            "create bucket": await error_code(edge.create_bucket(Bucket="edge-own-bucket")),
            "delete policy": await error_code(edge.delete_bucket_policy(Bucket=RAW)),
        }
        assert {what: code in DENIED for what, code in codes.items()} == dict.fromkeys(
            codes, True
        ), codes
        multi = await edge.delete_objects(Bucket=RAW, Delete={"Objects": [{"Key": big_key}]})
        assert [e["Code"] for e in multi.get("Errors", [])] == ["AccessDenied"]
        assert multi.get("Deleted", []) == []
        # Everything the edge wrote is intact.
        assert await body_of(admin_s3, RAW, key) == b"chunk bytes"
        assert await body_of(admin_s3, RAW, big_key) == b"".join(parts_data)


async def test_s3_cloud_identity_reads_raw_and_writes_outputs_only(
    s3_identities: SecureS3,
) -> None:
    async with AsyncExitStack() as stack:
        edge = await s3_identities.client(stack, "edge")
        cloud = await s3_identities.client(stack, "cloud")
        anonymous = await s3_identities.client(stack, None)
        stranger = await s3_identities.client(stack, "stranger")
        admin_s3 = await s3_identities.client(stack, "admin")
        key = f"raw/acl-test/{secrets.token_hex(4)}.mp4"
        await edge.put_object(Bucket=RAW, Key=key, Body=b"raw chunk")

        assert await body_of(cloud, RAW, key) == b"raw chunk"
        await cloud.head_object(Bucket=RAW, Key=key)
        for bucket in (RAW, OUT):  # the consumer's probe of its own access
            await cloud.head_bucket(Bucket=bucket)
        listed = await cloud.list_objects_v2(Bucket=RAW, Prefix="raw/")  # reconcile lists
        assert key in [o["Key"] for o in listed.get("Contents", [])]
        out_key = f"lp-test/{secrets.token_hex(4)}.json"
        await cloud.put_object(Bucket=OUT, Key=out_key, Body=b"{}")
        assert await body_of(cloud, OUT, out_key) == b"{}"
        # A missing done record must read as "not found", not "forbidden".
        with pytest.raises(ClientError) as missing:
            await cloud.head_object(Bucket=OUT, Key="lp-test/none.json")
        assert is_not_found(missing.value)

        codes = {
            "put raw": await error_code(cloud.put_object(Bucket=RAW, Key=key, Body=b"forged")),
            "delete raw": await error_code(cloud.delete_object(Bucket=RAW, Key=key)),
            "create bucket": await error_code(cloud.create_bucket(Bucket="cloud-own-bucket")),
            "put policy": await error_code(
                cloud.put_bucket_policy(
                    Bucket=RAW, Policy=json.dumps({"Version": "2012-10-17", "Statement": []})
                )
            ),
            "anonymous get": await error_code(anonymous.get_object(Bucket=RAW, Key=key)),
            "anonymous put": await error_code(
                anonymous.put_object(Bucket=RAW, Key="raw/anon.mp4", Body=b"x")
            ),
        }
        assert await error_code(stranger.get_object(Bucket=RAW, Key=key)) == "InvalidAccessKeyId"
        assert {what: code in DENIED for what, code in codes.items()} == dict.fromkeys(
            codes, True
        ), codes
        assert await body_of(admin_s3, RAW, key) == b"raw chunk"
        stored = await admin_s3.get_bucket_policy(Bucket=RAW)
        assert json.loads(stored["Policy"])["Statement"] != []


# -- The pipeline across both ------------------------------------------------------


async def _readyz(port: int) -> dict[str, Any]:
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/readyz") as resp,
        ):
            doc: dict[str, Any] = await resp.json()
            return doc
    except (aiohttp.ClientError, OSError):
        return {}


async def test_pipeline_runs_with_least_privilege_users_over_tls(
    secure_redis: SecureRedis,
    s3_identities: SecureS3,
    ray_address: str,
    clip: Path,
    tmp_path: Path,
) -> None:
    """The real edge agent (edge user, edge identity) and the real cloud deployment
    (cloud user, cloud identity) process a replayed clip end to end, hand-off included,
    with no permission refused along the way."""
    cloud_url = secure_redis.url("cloud")
    stack = Stack(cloud_url, s3_identities.server.endpoint, ray_address, RAW, OUT, tmp_path)
    edge_key, edge_secret = s3_identities.keys["edge"]
    edge_port, cloud_port = free_port(), free_port()
    cloud = cloud_ingest(
        stack,
        tmp_path / "cloud.log",
        INGEST_HTTP_BIND=f"127.0.0.1:{cloud_port}",
        INGEST_WINDOW_S="1",
        INGEST_WINDOW_TIMEOUT_S="0",
    )
    edge: Daemon | None = None
    try:
        edge = edge_agent(
            stack,
            [{"id": "cam1", "url": f"file://{clip}"}],
            tmp_path / "edge.log",
            EDGE_REDIS_URL=secure_redis.url("edge"),
            EDGE_HTTP_BIND=f"127.0.0.1:{edge_port}",
            AWS_ACCESS_KEY_ID=edge_key,
            AWS_SECRET_ACCESS_KEY=edge_secret,
        )
        running_edge = edge

        async def edge_ready() -> bool:
            checks = (await _readyz(edge_port)).get("checks", {})
            return bool(checks.get("s3") and checks.get("redis"))

        await eventually(edge_ready, 30, "the edge's S3 and Redis checks to pass")

        async with AsyncExitStack() as s3_stack:
            observer = S3(stack.s3_endpoint)
            observer.client = await s3_identities.client(s3_stack, "admin")

            async def all_processed() -> bool:
                return (
                    len(running_edge.events("chunk")) == 3 and len(await observer.records(OUT)) == 3
                )

            await eventually(all_processed, 90, "3 chunks announced and processed")
            records = await observer.records(OUT)
            raw_keys = await observer.chunk_keys(RAW, "raw/site-1/")

        async def handed_off() -> bool:
            reader = aioredis.from_url(cloud_url)
            try:
                [group] = await reader.xinfo_groups(handoff_stream(STREAM))
                closed = int(await reader.xlen("windows.closed"))
            finally:
                await reader.aclose()
            return closed >= 1 and int(group["pending"]) == 0

        await eventually(handed_off, 30, "closed windows handed off to windows.closed")

        async def cloud_sees_redis() -> bool:
            return bool((await _readyz(cloud_port)).get("checks", {}).get("redis"))

        await eventually(cloud_sees_redis, 20, "the cloud's Redis check to pass")
        assert edge.terminate() == 0, edge.text()[-3000:]
        state = await queue_state(cloud_url)
        assert (state["pending"], state["dlq"], state["length"]) == (0, 0, 0), state
        assert cloud.terminate() == 0, cloud.text()[-3000:]
        [stopped] = cloud.events("deployment.stopped")
        assert stopped["processed"] == 3
        assert stopped.get("redis_errors", 0) == 0
        assert sorted(r["manifest"]["key"] for r in records) == raw_keys
        assert {r["manifest"]["bucket"] for r in records} == {RAW}
        for log in (edge.text(), cloud.text()):  # no refusal was retried past, either
            for refusal in (
                "no permissions",
                "can't run this command",
                "AccessDenied",
                "Forbidden",
            ):
                assert refusal not in log
    finally:
        if edge is not None:
            edge.kill()
        cloud.kill()


# -- Misconfigured access: what HeadBucket cannot see --------------------------------------


async def test_s3_consumers_that_may_not_read_raw_or_write_outputs_pause(
    secure_redis: SecureRedis,
    s3_identities: SecureS3,
    ray_address: str,
    chunks: list[ClosedChunk],
    tmp_path: Path,
) -> None:
    """Two consumers whose S3 identity passes HeadBucket on both buckets (all the probe
    used to ask) but cannot do what every chunk needs: `nowrite` may read but write no
    output; `noread` has the cloud's actions but the raw bucket's policy denies it
    GetObject (as it denies the edge), so it may list the bucket but not read a chunk.
    `noread`'s raw
    reads fail with AccessDenied; after INGEST_RAW_FAILURES_TO_PAUSE=3 distinct chunks in
    a row it pauses (and its probe reads one of their objects until that works).
    `nowrite`'s probe PUTs and GETs a canary under the output prefix, fails, and it pauses
    on its first chunk. Nothing is dead-lettered; then a consumer with the real cloud
    identity processes every chunk. (Both used to burn the queue into the DLQ.)"""
    cloud_url = secure_redis.url("cloud")
    stack = Stack(cloud_url, s3_identities.server.endpoint, ray_address, RAW, OUT, tmp_path)
    prefix = f"lp-{secrets.token_hex(4)}"
    settings = ingest_settings(
        stack, output_prefix=prefix, visibility_timeout_s=2, max_deliveries=3, pause_max_s=2
    )
    cloud = secure_redis.client("cloud")
    edge_redis = secure_redis.client("edge")
    actors: list[Any] = []

    def consumer(name: str, profile: str | None) -> Any:
        env = None
        if profile is not None:
            access, secret = s3_identities.keys[profile]
            env = {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret}
        actor = start_consumer(settings, name, env=env)
        actor.run.remote()
        actors.append(actor)
        return actor

    try:
        async with sender_while_denied(
            s3_identities, stack, cloud, edge_redis, "noread", f"{RAW}/*"
        ) as (uploader, edge):
            for seq in range(6):
                await edge.send(chunks[seq % len(chunks)], seq, site_id="site-lp6")
            noread = consumer("consumer-noread", "noread")

            async def paused(actor: Any) -> bool:
                return (await actor_stats(actor)).get("paused") == 1

            await eventually(lambda: paused(noread), 60, "the consumer that cannot read")
            nowrite = consumer("consumer-nowrite", "nowrite")
            await eventually(lambda: paused(nowrite), 60, "the consumer that cannot write")

            async def both_paused_nothing_lost() -> bool:
                return (
                    await paused(noread)
                    and await paused(nowrite)
                    and not await cloud.xlen(dlq_stream(STREAM))
                )

            await holds(both_paused_nothing_lost, 3, "both paused, nothing dead-lettered")
            misconfigured = {
                "noread": await actor_stats(noread),
                "nowrite": await actor_stats(nowrite),
            }
            consumer("consumer-healthy", None)

            async def all_processed() -> bool:
                return len(await uploader.keys(OUT, f"{prefix}/records/")) == 6

            await eventually(all_processed, 60, "every chunk processed by the healthy one")
        state = await queue_state(cloud_url)
    finally:
        for actor in actors:
            ray.kill(actor)
        await cloud.aclose()
        await edge_redis.aclose()
    report_figures(
        "misconfigured_s3_access",
        {
            name: {k: s.get(k, 0) for k in ("failed_attempts", "released", "pauses")}
            for name, s in misconfigured.items()
        },
    )
    assert state["dlq"] == 0, state["dlq_reasons"]
    assert misconfigured["noread"].get("failed_attempts", 0) == 2  # the breaker's first two
    assert misconfigured["nowrite"].get("failed_attempts", 0) == 0  # the canary saw it at once


async def test_s3_chunks_unreadable_on_their_own_do_not_keep_a_consumer_paused(
    secure_redis: SecureRedis,
    s3_identities: SecureS3,
    ray_address: str,
    chunks: list[ClosedChunk],
    tmp_path: Path,
) -> None:
    """A bucket policy denies the cloud identity GetObject under one camera's prefix (as a
    broken ACL on those objects would). A first consumer processes a chunk of a readable
    camera and is killed; a fresh one, which has read nothing yet, gets 4 chunks of the
    sealed camera in a row. Three denied reads in a row trip the read breaker and it
    pauses; then 2 more readable chunks come. Its probe reads the object the group last
    read fine (the first consumer named it), passes, and it resumes. Every readable chunk
    is processed and the sealed ones are dead-lettered `max_deliveries` after their
    attempts. (The probe read one of the denied objects: the only consumer stayed paused
    for good.)"""
    cloud_url = secure_redis.url("cloud")
    stack = Stack(cloud_url, s3_identities.server.endpoint, ray_address, RAW, OUT, tmp_path)
    prefix = f"lp-{secrets.token_hex(4)}"
    site = "site-lp7"
    settings = ingest_settings(
        stack, output_prefix=prefix, visibility_timeout_s=2, max_deliveries=2, pause_max_s=2
    )
    cloud = secure_redis.client("cloud")
    edge_redis = secure_redis.client("edge")
    actor: Any = None
    try:
        async with sender_while_denied(
            s3_identities, stack, cloud, edge_redis, "cloud", f"{RAW}/raw/{site}/cam-sealed/*"
        ) as (uploader, edge):

            async def records() -> int:
                return len(await uploader.keys(OUT, f"{prefix}/records/"))

            async def first() -> bool:
                return await records() == 1

            await edge.send(chunks[0], 0, site_id=site, camera_id="cam-open")
            actor = start_consumer(settings, "consumer-open")
            actor.run.remote()
            await eventually(first, 60, "the first readable chunk")
            ray.kill(actor)
            actor = start_consumer(settings, "consumer-sealed")
            actor.run.remote()
            for seq in range(1, 5):
                sealed = chunks[seq % len(chunks)]
                await edge.send(sealed, seq, site_id=site, camera_id="cam-sealed")

            async def tripped() -> bool:
                return bool((await actor_stats(actor)).get("pauses"))

            await eventually(tripped, 60, "the breaker to trip before anything read fine")
            for seq in (5, 6):
                await edge.send(chunks[seq % len(chunks)], seq, site_id=site, camera_id="cam-open")

            async def settled() -> bool:
                return await records() == 3 and await cloud.xlen(dlq_stream(STREAM)) == 4

            await eventually(settled, 90, "readable chunks processed, sealed ones dead-lettered")
            stats = await actor_stats(actor, 10)
        state = await queue_state(cloud_url)
    finally:
        if actor is not None:
            ray.kill(actor)
        await cloud.aclose()
        await edge_redis.aclose()
    report_figures(
        "chunks_unreadable_on_their_own",
        {k: stats.get(k, 0) for k in ("pauses", "failed_attempts", "released", "processed")},
    )
    assert state["dlq_reasons"] == ["max_deliveries"] * 4
    assert stats["pauses"] >= 1  # the breaker tripped, and the consumer came back
    assert (state["pending"], state["length"]) == (0, 0)


async def test_reconcile_goes_on_past_a_sidecar_it_may_not_read(
    secure_redis: SecureRedis, s3_identities: SecureS3, chunks: list[ClosedChunk], tmp_path: Path
) -> None:
    """A bucket policy denies the cloud identity GetObject under one camera's prefix: that
    chunk's sidecar is unreadable (AccessDenied) to `cloud-ingest reconcile`. It counts the
    error, with the key, requeues the other chunks, prints its report and exits 1. (One
    refusal cancelled the whole walk, without a report.)"""
    cloud_url = secure_redis.url("cloud")
    stack = Stack(cloud_url, s3_identities.server.endpoint, "", RAW, OUT, tmp_path)
    site = "site-lp8"
    async with AsyncExitStack() as s3_stack:
        admin_s3 = S3(stack.s3_endpoint)
        admin_s3.client = await s3_identities.client(s3_stack, "admin")
        edge = Edge(stack, admin_s3, secure_redis.client("edge"))
        for seq in range(3):
            await edge.send(
                chunks[seq], seq, site_id=site, camera_id="cam-open", sidecar=True, announce=False
            )
        sealed = await edge.send(
            chunks[0], 3, site_id=site, camera_id="cam-sealed", sidecar=True, announce=False
        )
        await edge.redis.aclose()
    async with raw_policy_denying(s3_identities, "cloud", f"{RAW}/raw/{site}/cam-sealed/*"):
        result = await asyncio.to_thread(
            subprocess.run,
            [str(BIN / "cloud-ingest"), "reconcile", "--prefix", f"raw/{site}"],
            env=stack.ingest_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    keeper = secure_redis.client("housekeeper")
    queued = await keeper.xlen(STREAM)
    await keeper.aclose()
    report = json.loads(result.stdout)
    report_figures("reconcile_past_an_error", report)
    assert result.returncode == 1, result.stderr
    assert (report["chunks"], report["requeued"], report["errors"]) == (4, 3, 1)
    [example_error] = report["error_examples"]
    assert sealed.key in example_error and "AccessDenied" in example_error
    assert queued == 3
