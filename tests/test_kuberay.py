"""The KubeRay manifests parse, carry the required fields, and name only real settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cloud_ingest.config import IngestSettings

KUBERAY = Path(__file__).resolve().parent.parent / "configs" / "kuberay"


def load(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((KUBERAY / name).read_text())
    assert isinstance(doc, dict)
    return doc


def test_kuberay_cluster_has_head_and_autoscaling_cpu_workers() -> None:
    doc = load("raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    spec = doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    [workers] = spec["workerGroupSpecs"]
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    assert workers["maxReplicas"] >= 16


def test_kuberay_job_runs_our_cli_with_real_setting_names() -> None:
    doc = load("rayjob-cloud-ingest.yaml")
    cluster = load("raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["entrypoint"] == "cloud-ingest run"
    assert spec["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = [g["template"]["spec"]["containers"][0] for g in cluster["spec"]["workerGroupSpecs"]]
    head_env = [e["name"] for e in head["env"]]
    known = {f"INGEST_{name.upper()}" for name in IngestSettings.model_fields}
    ours = [n for n in [*env, *head_env] if n.startswith("INGEST_")]
    assert ours and set(ours) <= known, set(ours) - known
    assert "INGEST_OUTPUT_BUCKET" in env and "INGEST_RAW_BUCKET" in env
    # The driver runs on the head: it needs the queue and the keyring from secrets, never
    # from runtimeEnvYAML (shown in the dashboard); every pod that touches S3 has the chain.
    assert {"INGEST_REDIS_URL", "INGEST_KEYRING"} <= set(head_env)
    assert not {"INGEST_REDIS_URL", "INGEST_KEYRING"} & set(env)
    for container in [head, *workers]:
        names = {e["name"]: e for e in container.get("env", [])}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(names), container["name"]
        assert "secretKeyRef" in names["AWS_SECRET_ACCESS_KEY"]["valueFrom"]
