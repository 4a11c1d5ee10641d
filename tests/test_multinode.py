"""The consumer deployment on a real multi-node Ray cluster: a head (no CPUs: consumers
and hand-off jobs run on workers) with GCS fault tolerance backed by its own
redis-server, and two worker nodes, each a raylet of its own (``ray.cluster_utils``).
``cloud-ingest run`` connects with ``RAY_ADDRESS`` as in production. Faults: a worker node
killed outright, the driver killed with SIGKILL and started again, the GCS killed and
restarted."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from cloud_ingest.totals import read_totals
from devstack.daemons import CloudIngest
from devstack.servers import RedisServer, free_port
from edge_agent.segmenter import ClosedChunk
from shared.keys import whereabouts_key
from tests.support import (
    S3,
    SLOW_WORK,
    Edge,
    Stack,
    cloud_ingest,
    eventually,
    metric_appears,
    queue_state,
    report_figures,
)

N = 36  # chunks per test: enough that a fault lands mid-run on two consumers
GCS_DOWN_S = 5.0  # the GCS outage lasts at least this


@dataclass
class MultiNode:
    cluster: Any
    gcs_redis: RedisServer
    dashboard: str
    client: str  # Ray Client address (ray://), what a driver in a pod of its own uses

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def workers(self) -> list[Any]:
        return list(self.cluster.worker_nodes)

    def add_worker(self) -> Any:
        return self.cluster.add_node(num_cpus=2)


@pytest.fixture(scope="module")
def multinode(session_dir: Any) -> Iterator[MultiNode]:
    from ray._private.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    gcs_redis = RedisServer(session_dir / "gcs-redis")
    gcs_redis.start()
    dashboard_port, client_port = free_port(), free_port()
    bootstrap = Path(get_ray_address_file(None))
    current = bootstrap.read_text() if bootstrap.exists() else None
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,  # as in configs/kuberay: nothing of ours runs on the head
            "gcs_server_port": free_port(),  # a restarted GCS comes back where it was
            "external_addresses": [f"127.0.0.1:{gcs_redis.port}"],  # GCS fault tolerance
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
            "dashboard_agent_listen_port": free_port(),  # the session's Ray holds the default
            "ray_client_server_port": client_port,  # Ray Client, as the KubeRay Deployment uses
            "_system_config": {
                # A dead node is declared dead in about 3 s instead of 15 s.
                "health_check_period_ms": 1000,
                "health_check_timeout_ms": 1000,
                "health_check_failure_threshold": 3,
            },
        },
        shutdown_at_exit=True,
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2)
        # Cluster() names itself the machine's current cluster, where a plain ray.init()
        # would connect: point that back at whatever was there.
        if current is None:
            bootstrap.unlink(missing_ok=True)
        else:
            bootstrap.write_text(current)
        yield MultiNode(
            cluster,
            gcs_redis,
            f"http://127.0.0.1:{dashboard_port}",
            f"ray://127.0.0.1:{client_port}",
        )
    finally:
        cluster.shutdown()
        gcs_redis.stop()


def alive_consumers(multinode: MultiNode) -> list[str]:
    from ray.util.state import list_actors

    alive = list_actors(address=multinode.dashboard, filters=[("state", "=", "ALIVE")])
    return sorted(a.name for a in alive if a.name.startswith("ingest-consumer-"))


def on_cluster(stack: Stack, multinode: MultiNode) -> Stack:
    return replace(stack, ray_address=multinode.address)


def deployment(stack: Stack, name: str, **extra: str) -> CloudIngest:
    env = {
        "INGEST_CONSUMERS": "2",
        "INGEST_ACTOR_CPUS": "0.5",  # both fit on one worker: SPREAD must keep them apart
        "INGEST_ACTOR_CONCURRENCY": "1",
        "INGEST_VISIBILITY_TIMEOUT_S": "5",
        "INGEST_FILTER_RECENT_CHUNKS": "0",
        **SLOW_WORK,  # a chunk takes a while: the faults land mid-run
        **extra,
    }
    daemon = cloud_ingest(stack, stack.workdir / f"{name}.log", **env)
    assert isinstance(daemon, CloudIngest)
    return daemon


async def where(redis: aioredis.Redis) -> dict[str, dict[str, str]]:
    placed: Any = await redis.hgetall(whereabouts_key("ingest"))
    return {k.decode(): json.loads(v) for k, v in placed.items()}


async def records(s3: S3, stack: Stack) -> list[int]:
    return sorted(r["manifest"]["seq"] for r in await s3.records(stack.out_bucket))


async def status_json(stack: Stack) -> list[dict[str, Any]]:
    """`cloud-ingest status --json`'s consumers, as an operator would see them."""
    from devstack.daemons import BIN

    proc = await asyncio.create_subprocess_exec(
        str(BIN / "cloud-ingest"),
        "status",
        "--json",
        env=stack.ingest_env(),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    consumers: list[dict[str, Any]] = json.loads(out)["consumers"]
    return consumers


async def send_all(edge: Edge, chunks: list[ClosedChunk], seqs: range) -> None:
    for seq in seqs:
        await edge.send(chunks[seq % len(chunks)], seq)


async def settled(stack: Stack, s3: S3) -> dict[str, Any]:
    """What the pass condition is made of: lost, unexpected, DLQ, pending."""
    seqs = await records(s3, stack)
    st = await queue_state(stack.redis_url)
    return {
        "lost": len(set(range(N)) - set(seqs)),
        "unexpected": len(set(seqs) - set(range(N))),
        "dlq": st["dlq"],
        "pending": st["pending"],
        "length": st["length"],
    }


def all_settled(stack: Stack, s3: S3) -> Any:
    async def check() -> bool:
        return await settled(stack, s3) == {
            "lost": 0,
            "unexpected": 0,
            "dlq": 0,
            "pending": 0,
            "length": 0,
        }

    return check


async def test_multinode_consumers_spread_and_come_back_after_their_node_is_killed(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk], multinode: MultiNode
) -> None:
    """Two consumers land on two different worker nodes (SPREAD), visible in
    `cloud-ingest status` and /metrics. The node hosting consumer-0 is killed outright
    (raylet and workers, no grace) mid-run: its entries are reclaimed, the actor comes
    back on the surviving node, and every chunk is processed once."""
    stack = on_cluster(stack, multinode)
    await send_all(edge, chunks, range(N))
    port = free_port()
    cloud = deployment(stack, "cloud", INGEST_HTTP_BIND=f"127.0.0.1:{port}")
    try:

        async def placed() -> bool:
            return len({w["node_id"] for w in (await where(edge.redis)).values()}) == 2

        await eventually(placed, 60, "two consumers on two nodes")
        before = await where(edge.redis)
        workers = {n.node_id: n for n in multinode.workers()}
        assert {w["node_id"] for w in before.values()} == set(workers)  # not the head

        async def some_done() -> bool:
            return len(await records(s3, stack)) >= 2

        await eventually(some_done, 120, "processing to start")
        victim = workers[before["consumer-0"]["node_id"]]
        survivor = next(i for i in workers if i != victim.node_id)
        done_at_kill = len(await records(s3, stack))
        killed_at = time.monotonic()
        multinode.cluster.remove_node(victim, allow_graceful=False)

        async def moved() -> bool:
            w = (await where(edge.redis)).get("consumer-0", {})
            return w.get("node_id") == survivor and w.get("pid") != before["consumer-0"]["pid"]

        await eventually(moved, 120, "consumer-0 back on the surviving node")
        back_in_s = time.monotonic() - killed_at
        line = f'cloud_ingest_consumer_node{{consumer="consumer-0",node_id="{survivor}"'
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{port}"
            await eventually(lambda: metric_appears(http, base, line), 30, "the node metric")
        shown = {c["name"]: c["where"] for c in await status_json(stack)}
        assert shown["consumer-0"]["node_id"] == survivor
        await eventually(all_settled(stack, s3), 180, "every chunk processed")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
        multinode.add_worker()  # two workers again for the next test
    counts, _ = await read_totals(edge.redis, "ingest")
    figures = await settled(stack, s3)
    report_figures(
        "worker_node_killed",
        {
            "chunks": N,
            **figures,
            "done_at_kill": done_at_kill,
            "actor_back_on_survivor_in_s": round(back_in_s, 1),
            "processed": counts.get("processed", 0),
            "duplicate": counts.get("duplicate", 0),
        },
    )
    assert done_at_kill < N, "the kill landed after the work was done"
    assert cloud.events("consumer.died"), "the supervisor did not see its actor die"


async def test_multinode_a_driver_killed_and_started_again_adopts_its_consumers(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk], multinode: MultiNode
) -> None:
    """`cloud-ingest run` is SIGKILLed mid-run. Its detached consumers keep draining with
    no driver at all; a new driver with the same settings, scaled up to 3 consumers,
    adopts the two (same processes; INGEST_CONSUMERS is the driver's alone) and adds one,
    and every chunk is processed exactly once (no second drain loop beside the first).
    A driver with other settings, scaled down to 1, retires the extra two and replaces
    the first (drained, then a new process). The drivers connect through Ray Client
    (``ray://``), as the KubeRay Deployment does."""
    stack = replace(stack, ray_address=multinode.client)
    await send_all(edge, chunks, range(N))
    first = deployment(stack, "first")
    second = third = None
    try:

        async def two_placed() -> bool:
            return len(await where(edge.redis)) == 2

        async def some_done() -> bool:
            return len(await records(s3, stack)) >= 4

        await eventually(two_placed, 120, "two consumers")
        await eventually(some_done, 120, "processing to start")
        pids = {n: w["pid"] for n, w in (await where(edge.redis)).items()}
        first.crash()
        at_crash = len(await records(s3, stack))

        async def more_done() -> bool:
            return len(await records(s3, stack)) > at_crash

        await eventually(more_done, 60, "the orphaned consumers to keep draining")
        without_driver = len(await records(s3, stack)) - at_crash
        second = deployment(stack, "second", INGEST_CONSUMERS="3")

        async def adopted() -> bool:
            return len(second.events("consumer.adopted")) == 2

        await eventually(adopted, 120, "the new driver to adopt both consumers")
        await eventually(all_settled(stack, s3), 180, "every chunk processed")

        async def added() -> bool:
            return "consumer-2" in await where(edge.redis)

        await eventually(added, 60, "the third consumer to start")
        now = await where(edge.redis)
        assert {n: now[n]["pid"] for n in pids} == pids
        counts, _ = await read_totals(edge.redis, "ingest")
        second.crash()
        third = deployment(stack, "third", INGEST_CONSUMERS="1", INGEST_BATCH_SIZE="3")

        async def replaced() -> bool:
            now = await where(edge.redis)
            return (
                len(third.events("consumer.retired")) == 3  # 1 and 2, then 0 before its new one
                and len(third.events("consumer.replacing")) == 1
                and now["consumer-0"]["pid"] != pids["consumer-0"]
            )

        await eventually(replaced, 180, "the third driver to retire two and replace one")
        assert third.terminate() == 0
    finally:
        for d in (first, second, third):
            if d is not None:
                d.kill()
    figures = await settled(stack, s3)
    report_figures(
        "driver_killed",
        {
            "chunks": N,
            **figures,
            "done_at_crash": at_crash,
            "done_with_no_driver": without_driver,
            "adopted": len(second.events("consumer.adopted")),
            "processed": counts.get("processed", 0),
            "duplicate": counts.get("duplicate", 0),
            "replaced": len(third.events("consumer.replacing")),
        },
    )
    assert figures == {"lost": 0, "unexpected": 0, "dlq": 0, "pending": 0, "length": 0}
    assert counts.get("processed") == N and counts.get("duplicate", 0) == 0

    async def none_left() -> bool:  # an actor is DEAD a moment after ray.kill
        return alive_consumers(multinode) == []

    await eventually(none_left, 30, "a clean stop to leave no detached consumer behind")
    assert not third.events("consumer.retire_incomplete")  # the replaced ones drained


async def test_multinode_hand_off_jobs_run_on_workers_and_their_records_are_deleted(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk], multinode: MultiNode
) -> None:
    """A closed window's Ray job, submitted through the Job API with its declared
    entrypoint resources, runs on a worker node (the head has no CPUs). Once it has
    finished and INGEST_JOB_KEEP_S has passed, the hand-off deletes its record from the
    head's job table (thousands a day would pile up); its final state stays in Redis."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    stack = on_cluster(stack, multinode)
    for seq in range(5):  # one complete 10 s window of site-9
        await edge.send(chunks[seq % len(chunks)], seq, camera_id="cam7", site_id="site-9")
    cloud = deployment(
        stack,
        "cloud",
        INGEST_WINDOW_S="10",
        INGEST_WINDOW_TIMEOUT_S="600",
        INGEST_SITE_CAMERAS=json.dumps({"site-9": ["cam7"]}),
        INGEST_HANDOFF_SINKS='["ray_job"]',
        INGEST_JOB_ADDRESS=multinode.dashboard,
        INGEST_JOB_ENTRYPOINT="""python -c "print('reconstruct {revision_id}')" """,
        INGEST_JOB_KEEP_S="2",
    )
    client = JobSubmissionClient(multinode.dashboard)
    seen: dict[str, Any] = {}
    try:

        async def succeeded() -> bool:
            for j in client.list_jobs():
                if (j.submission_id or "").startswith("window-site-9-"):
                    seen[j.submission_id or ""] = j
            return any(j.status == JobStatus.SUCCEEDED for j in seen.values())

        await eventually(succeeded, 150, "the window's job to succeed")
        [(submission, job)] = seen.items()

        async def deleted() -> bool:
            return submission not in {j.submission_id for j in client.list_jobs()}

        await eventually(deleted, 60, "the finished job's record to be deleted")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    head = multinode.cluster.head_node.node_id
    workers = {n.node_id for n in multinode.workers()}
    assert job.driver_node_id in workers and job.driver_node_id != head
    assert await edge.redis.hget("ingest:jobs", submission) == b"SUCCEEDED"
    assert cloud.events("handoff.jobs_deleted")


async def test_multinode_consumers_keep_draining_while_the_gcs_restarts(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk], multinode: MultiNode
) -> None:
    """The GCS (the head's control plane) is killed with SIGKILL and started again on the
    same port; its state is in the external Redis (GCS fault tolerance). The consumers on
    the workers keep draining while it is down, and all of it completes. Last in this
    module: after a GCS-only restart the head's dashboard answers 500 and new drivers do
    not connect (on KubeRay the whole head pod restarts), so the cluster is not reused."""
    stack = on_cluster(stack, multinode)
    half = N // 2
    await send_all(edge, chunks, range(half))
    cloud = deployment(stack, "cloud")
    head = multinode.cluster.head_node
    try:

        async def some_done() -> bool:
            return len(await records(s3, stack)) >= 4

        await eventually(some_done, 120, "processing to start")
        await asyncio.to_thread(head.kill_gcs_server)
        down_at = time.monotonic()
        at_kill = len(await records(s3, stack))
        await send_all(edge, chunks, range(half, N))

        async def drained_meanwhile() -> bool:  # and an outage of a few seconds at least
            done = len(await records(s3, stack)) >= at_kill + 4
            return done and time.monotonic() - down_at >= GCS_DOWN_S

        await eventually(drained_meanwhile, 60, "consumers draining with the GCS down")
        while_down = len(await records(s3, stack)) - at_kill
        await asyncio.to_thread(head.start_gcs_server)
        down_s = time.monotonic() - down_at
        await eventually(all_settled(stack, s3), 180, "every chunk processed")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    figures = await settled(stack, s3)
    report_figures(
        "gcs_restart",
        {"chunks": N, **figures, "gcs_down_s": round(down_s, 1), "done_while_down": while_down},
    )
    assert figures == {"lost": 0, "unexpected": 0, "dlq": 0, "pending": 0, "length": 0}
