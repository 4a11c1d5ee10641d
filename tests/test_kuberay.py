"""The Kubernetes manifests of configs/kuberay/: what a cluster would say about them, without one.

Three layers, each shown to catch a real mistake:

- strict schemas, as ``kubectl apply --validate=strict`` would apply them: the RayCluster
  against KubeRay v1.7.0's CRD, the PodMonitor against Prometheus Operator v0.93.0's
  (tests/data/kuberay/, see SOURCE there), the Deployment, the Ray pod templates and every
  object's metadata against Kubernetes' own (the ``kubernetes-validate`` package);
- the KubeRay operator's admission rules (``validation.go`` at v1.7.0, mirrored below), which
  the CRD schema does not express and which turn an accepted object into ValidationFailed;
- this project's production rules: hardened containers, requests and limits, images by
  digest, secrets only from mounted files, only real INGEST_* names, probes on the real port.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from cloud_ingest.config import IngestSettings
from devstack.servers import free_port
from shared.http import parse_bind, serve

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "configs" / "kuberay"
DATA = Path(__file__).resolve().parent / "data" / "kuberay"
# KubeRay v1.7.0 builds against k8s.io/api v0.36: validate core objects as Kubernetes 1.36.
K8S_VERSION = "1.36"
IMAGE = re.compile(r"^[a-z0-9.-]+(?::[0-9]+)?/[a-z0-9._/-]+@sha256:[0-9a-f]{64}$")

# Secrets that must never be given as a value, only as a mounted file.
SECRET_VALUES = {
    "INGEST_REDIS_PASSWORD",
    "INGEST_REDIS_SENTINEL_PASSWORD",
    "INGEST_KEYRING",
    "INGEST_REPLAY_KEY",
    "INGEST_HTTP_TOKEN",
    "INGEST_WEBHOOK_SECRET",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "RAY_AUTH_TOKEN",
}
# The one secret a manifest may hand over by secretKeyRef: KubeRay puts it into the head's
# REDIS_PASSWORD for `ray start --redis-password` (Ray reads no password file).
GCS_REDIS_PASSWORD = ("spec", "gcsFaultToleranceOptions", "redisPassword", "valueFrom")


# --- the manifests ------------------------------------------------------------------------


def documents() -> list[tuple[str, dict[str, Any]]]:
    """(file#index kind/name, object) for every YAML document of configs/kuberay/."""
    found = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is None:
                continue
            assert isinstance(doc, dict), f"{path.name}#{i}"
            found.append((f"{path.name}#{i} {doc['kind']}/{doc['metadata']['name']}", doc))
    return found


def only(kind: str) -> dict[str, Any]:
    [doc] = [d for _, d in documents() if d["kind"] == kind]
    return copy.deepcopy(doc)


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [copy.deepcopy(d) for _, d in documents() if d["kind"] == kind]


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    if doc["kind"] == "RayCluster":
        yield "head", doc["spec"]["headGroupSpec"]["template"]
        for group in doc["spec"].get("workerGroupSpecs", []):
            yield f"worker {group['groupName']}", group["template"]
    elif doc["kind"] == "Deployment":
        yield "pod", doc["spec"]["template"]


def containers(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, container, pod spec) for every container a manifest defines, the RayCluster's
    autoscaler sidecar included (KubeRay builds it from spec.autoscalerOptions)."""
    for where, template in pod_templates(doc):
        spec = template["spec"]
        for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            yield f"{doc['kind']} {where} {c['name']}", c, spec
    options = doc["spec"].get("autoscalerOptions") if doc["kind"] == "RayCluster" else None
    if doc["kind"] == "RayCluster" and doc["spec"].get("enableInTreeAutoscaling"):
        head = doc["spec"]["headGroupSpec"]["template"]["spec"]
        yield "RayCluster autoscaler sidecar", {"name": "autoscaler", **(options or {})}, head


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def all_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [c for _, doc in documents() for c in containers(doc)]


# --- strict schemas ------------------------------------------------------------------------


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """An openAPIV3Schema as ``--validate=strict`` applies it: an object with ``properties``
    admits no other field unless it says so (``additionalProperties`` or
    ``x-kubernetes-preserve-unknown-fields``); ``x-kubernetes-int-or-string`` takes both."""
    out = dict(schema)
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = strict(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [strict(s) for s in out[key]]
    if isinstance(out.get("not"), dict):
        out["not"] = strict(out["not"])
    return out


def _crd_v1(path: Path) -> dict[str, Any]:
    crd = yaml.safe_load(path.read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"]]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft202012Validator]:
    raycluster = json.loads((DATA / "ray.io_rayclusters.v1.openAPIV3Schema.json").read_text())
    podmonitor = _crd_v1(DATA / "prometheus-operator" / "monitoring.coreos.com_podmonitors.yaml")
    return {
        ("ray.io/v1", "RayCluster"): jsonschema.Draft202012Validator(strict(raycluster)),
        ("monitoring.coreos.com/v1", "PodMonitor"): jsonschema.Draft202012Validator(
            strict(podmonitor)
        ),
    }


def k8s_errors(obj: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Strict schema errors of one object: its CRD's (the CRDs leave ``metadata`` to the API
    server's ObjectMeta, checked here as Kubernetes'), or Kubernetes' for core kinds. The
    Ray pod templates are also checked as Kubernetes 1.36 Pods."""
    key = (doc["apiVersion"], doc["kind"])
    validator = crd_validators().get(key)
    if validator is None:
        return k8s_errors(doc)
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]
    # ObjectMeta, on an object whose schema is Kubernetes' (a ConfigMap has nothing else).
    meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata", {})}
    errors += k8s_errors(meta)
    for where, template in pod_templates(doc):
        pod = {"apiVersion": "v1", "kind": "Pod", **template}
        errors += [f"{where} as a Pod: {e}" for e in k8s_errors(pod)]
    return errors


# --- KubeRay v1.7.0's admission rules (ray-operator/controllers/ray/utils/validation.go) ----

# constant.go: MaxRayClusterNameLength = 53 (63 - len("-serve-svc")); a RayJob's cluster
# name adds 6 characters (GenerateRayClusterName): MaxRayJobNameLength = 53 - 6.
MAX_RAYCLUSTER_NAME = 53
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
FT_ANNOTATION = "ray.io/ft-enabled"  # RayFTEnabledAnnotationKey
STORAGE_NS_ANNOTATION = "ray.io/external-storage-namespace"  # RayExternalStorageNSAnnotationKey
# features.go defaults at v1.7.0: only the gates that are on by default are on here.
GATES_ON = {"RayJobDeletionPolicy", "RayClusterStatusConditions"}
QUALIFIED_NAME = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")


def _version(text: str) -> tuple[int, ...] | None:
    match = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", text)
    return None if match is None else tuple(int(g or 0) for g in match.groups())


def _names(env: list[dict[str, Any]] | None) -> set[str]:
    return {e["name"] for e in env or []}


def _metadata_errors(kind: str, name: str, limit: int) -> list[str]:
    """ValidateRayClusterMetadata, ValidateRayJobMetadata."""
    errors = []
    if len(name) > limit:
        errors.append(f"{kind} name should be no more than {limit} characters")
    if len(name) > 63 or not DNS1035.match(name):
        errors.append(f"{kind} name should be a valid DNS1035 label")
    return errors


def _group_errors(group: str, params: dict[str, str], spec: dict[str, Any]) -> list[str]:
    """validateRayGroupResources and validateRayGroupLabels."""
    errors = []
    if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and spec.get(
        "resources"
    ):
        errors.append(
            f"resource fields should not be set in both rayStartParams and Resources "
            f"for {group} group"
        )
    if "labels" in params:
        errors.append(f"rayStartParams['labels'] is not supported for {group} group")
    for key, value in (spec.get("labels") or {}).items():
        if not QUALIFIED_NAME.match(key) or not LABEL_VALUE.match(value):
            errors.append(f"invalid label {key}={value} for {group} group")
    return errors


def _worker_errors(worker: dict[str, Any], spec: dict[str, Any], autoscaling: bool) -> list[str]:
    """ValidateRayClusterSpec's loop over workerGroupSpecs, validateWorkerGroupIdleTimeout."""
    name, errors = worker.get("groupName"), []
    if not worker["template"].get("spec", {}).get("containers"):
        errors.append("workerGroupSpec should have at least one container")
    low, high = worker.get("minReplicas"), worker.get("maxReplicas")
    if not autoscaling and (low is None or high is None):
        errors.append(
            f"worker group {name} must set both minReplicas and maxReplicas when "
            "autoscaling is disabled"
        )
    if (low is not None and low < 0) or (high is not None and high < 0):
        errors.append(f"worker group {name} has negative minReplicas or maxReplicas")
    if low is not None and high is not None and low > high:
        errors.append(f"worker group {name} has minReplicas {low} greater than maxReplicas {high}")
    errors += _group_errors(str(name), worker.get("rayStartParams") or {}, worker)
    idle = worker.get("idleTimeoutSeconds")
    v2 = (spec.get("autoscalerOptions") or {}).get("version") == "v2"
    if idle is not None and (idle < 0 or not v2):
        errors.append(
            f"worker group {name}: idleTimeoutSeconds is set, but autoscaler v2 is "
            "not enabled (or it is negative)"
        )
    if worker.get("suspend") and autoscaling:
        errors.append(f"worker group {name} cannot be suspended with Autoscaler enabled")
    return errors


def _ft_errors(spec: dict[str, Any], annotations: dict[str, str]) -> list[str]:
    """ValidateRayClusterSpec's GCS fault tolerance rules, validateGcsFaultToleranceBackend."""
    head = spec["headGroupSpec"]
    env = _names(head["template"]["spec"]["containers"][0].get("env"))
    params = head.get("rayStartParams") or {}
    options = spec.get("gcsFaultToleranceOptions")
    ft = annotations.get(FT_ANNOTATION, "").lower() == "true" or options is not None
    on = options is not None
    rules = [
        (
            bool(annotations.get(FT_ANNOTATION)) and on,
            f"{FT_ANNOTATION} annotation and GcsFaultToleranceOptions are both set",
        ),
        (
            not ft and "RAY_REDIS_ADDRESS" in env,
            "RAY_REDIS_ADDRESS is set which implicitly enables GCS fault tolerance, "
            "but GcsFaultToleranceOptions is not set",
        ),
        (
            on and bool(params.get("redis-password")),
            "cannot set `redis-password` in rayStartParams when GcsFaultToleranceOptions is "
            "enabled",
        ),
        (
            on and "REDIS_PASSWORD" in env,
            "cannot set `REDIS_PASSWORD` env var in head Pod when GcsFaultToleranceOptions is "
            "enabled",
        ),
        (
            on and "RAY_REDIS_ADDRESS" in env,
            "cannot set `RAY_REDIS_ADDRESS` env var in head Pod when GcsFaultToleranceOptions "
            "is enabled",
        ),
        (
            on and bool(annotations.get(STORAGE_NS_ANNOTATION)),
            f"cannot set `{STORAGE_NS_ANNOTATION}` annotation when GcsFaultToleranceOptions is "
            "enabled",
        ),
        (  # the GCSFaultToleranceEmbeddedStorage gate is off by default
            on and (options or {}).get("backend") == "rocksdb",
            "the embedded RocksDB GCS fault tolerance backend requires the "
            "GCSFaultToleranceEmbeddedStorage feature gate",
        ),
        (
            on and (options or {}).get("backend") != "rocksdb" and "storage" in (options or {}),
            "cannot set GcsFaultToleranceOptions.Storage when backend is 'redis'",
        ),
        (
            bool(params.get("redis-username")) or "REDIS_USERNAME" in env,
            "cannot set redis username in rayStartParams or environment variables",
        ),
    ]
    return [message for broken, message in rules if broken]


def _autoscaler_errors(spec: dict[str, Any]) -> list[str]:
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    options = spec.get("autoscalerOptions") or {}
    head = spec["headGroupSpec"]["template"]["spec"]
    v2_env = env_of(head["containers"][0]).get("RAY_enable_autoscaler_v2")
    errors = []
    if not autoscaling and v2_env and v2_env.get("value") in ("1", "true"):
        errors.append(
            "RAY_enable_autoscaler_v2 cannot be set when enableInTreeAutoscaling is false"
        )
    if autoscaling and options.get("version") and v2_env:
        errors.append("both .spec.autoscalerOptions.version and RAY_enable_autoscaler_v2 are set")
    if autoscaling and options.get("version") == "v2":
        pods = [head] + [w["template"]["spec"] for w in spec.get("workerGroupSpecs", [])]
        if any(p.get("restartPolicy", "Never") != "Never" for p in pods):
            errors.append("restartPolicy should be Never or unset when using autoscaler V2")
    if (options.get("idleTimeoutSeconds") or 0) < 0:
        errors.append("autoscalerOptions.idleTimeoutSeconds must be non-negative")
    if "KUBERAY_GEN_AUTOSCALER_START_CMD" in _names(options.get("env")):
        errors.append("autoscalerOptions.env must not contain KUBERAY_GEN_AUTOSCALER_START_CMD")
    return errors


def _auth_errors(spec: dict[str, Any]) -> list[str]:
    auth = spec.get("authOptions") or {}
    k8s_auth = bool(auth.get("enableK8sTokenAuth"))
    if auth.get("mode") != "token":  # IsAuthEnabled
        return (
            ["authOptions.enableK8sTokenAuth is enabled but authOptions.mode not set to 'token'"]
            if k8s_auth
            else []
        )
    version = _version(spec.get("rayVersion", ""))
    if version is None:
        return ["authOptions.mode is 'token' but RayVersion was not specified or is invalid"]
    errors = []
    if version < (2, 52, 0):
        errors.append("authOptions.mode is 'token' but minimum Ray version is 2.52.0")
    if k8s_auth and version < (2, 55, 0):
        errors.append("authOptions.enableK8sTokenAuth is enabled but minimum Ray version is 2.55.0")
    if k8s_auth and auth.get("secretName"):
        errors.append("authOptions.enableK8sTokenAuth is enabled and authOptions.secretName is set")
    return errors


def raycluster_spec_errors(spec: dict[str, Any], annotations: dict[str, str]) -> list[str]:
    """ValidateRayClusterSpec (all errors, where Go returns the first)."""
    head = spec["headGroupSpec"]
    if not head["template"].get("spec", {}).get("containers"):
        return ["headGroupSpec should have at least one container"]
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    errors = _group_errors("Head", head.get("rayStartParams") or {}, head)
    for worker in spec.get("workerGroupSpecs", []):
        errors += _worker_errors(worker, spec, autoscaling)
    errors += _ft_errors(spec, annotations) + _autoscaler_errors(spec) + _auth_errors(spec)
    for field, gate in (
        ("historyServerOptions", "RayClusterHistoryServer"),
        ("networkPolicy", "RayClusterNetworkPolicy"),
        ("tlsOptions", "RayClusterMTLS"),
    ):
        if spec.get(field) is not None and gate not in GATES_ON:
            errors.append(f"spec.{field} requires the {gate} feature gate to be enabled")
    return errors


def rayjob_errors(job: dict[str, Any]) -> list[str]:
    """ValidateRayJobMetadata and ValidateRayJobSpec (validateDeletionConfiguration in part)."""
    spec, meta = job["spec"], job["metadata"]
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    selector = spec.get("clusterSelector") or {}
    mode = spec.get("submissionMode", "K8sJobMode")
    backoff = spec.get("backoffLimit")
    deletion_rules = (spec.get("deletionStrategy") or {}).get("deletionRules")
    rules = [
        (
            spec.get("suspend") and not shutdown,
            "a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended",
        ),
        (ttl < 0, "TTLSecondsAfterFinished must be a non-negative integer"),
        (
            not shutdown and ttl > 0,
            "a RayJob with shutdownAfterJobFinishes set to false cannot have "
            "TTLSecondsAfterFinished",
        ),
        (
            deletion_rules and shutdown,
            "spec.shutdownAfterJobFinishes and spec.deletionStrategy.deletionRules are "
            "mutually exclusive",
        ),
        (
            spec.get("suspend") and selector,
            "the ClusterSelector mode doesn't support the suspend operation",
        ),
        (
            spec.get("rayClusterSpec") is None and not selector,
            "one of RayClusterSpec or ClusterSelector must be set",
        ),
        (  # RayJobClusterSelectorKey
            selector and not selector.get("ray.io/cluster"),
            "cluster name in ClusterSelector should not be empty",
        ),
        (selector and mode == "SidecarMode", "ClusterSelector is not supported in SidecarMode"),
        (
            selector and backoff is not None and backoff > 0,
            "BackoffLimit is incompatible with ClusterSelector mode",
        ),
        (
            mode == "InteractiveMode" and backoff is not None and backoff > 0,
            "BackoffLimit is incompatible with InteractiveMode",
        ),
        (not _is_yaml(spec.get("runtimeEnvYAML") or ""), "runtimeEnvYAML is not valid YAML"),
        (
            spec.get("activeDeadlineSeconds", 1) <= 0,
            "activeDeadlineSeconds must be a positive integer",
        ),
        (
            spec.get("preRunningDeadlineSeconds", 1) <= 0,
            "preRunningDeadlineSeconds must be a positive integer",
        ),
        (backoff is not None and backoff < 0, "backoffLimit must be a positive integer"),
    ]
    errors = _metadata_errors("RayJob", meta["name"], MAX_RAYJOB_NAME)
    errors += [message for broken, message in rules if broken]
    if spec.get("rayClusterSpec") is not None:
        errors += raycluster_spec_errors(spec["rayClusterSpec"], meta.get("annotations") or {})
    return errors


def _is_yaml(text: str) -> bool:
    try:
        yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return True


def operator_errors(doc: dict[str, Any]) -> list[str]:
    if doc["kind"] == "RayCluster":
        meta = doc["metadata"]
        return _metadata_errors("RayCluster", meta["name"], MAX_RAYCLUSTER_NAME) + (
            raycluster_spec_errors(doc["spec"], meta.get("annotations") or {})
        )
    if doc["kind"] == "RayJob":
        return rayjob_errors(doc)
    return []


# --- production rules ----------------------------------------------------------------------

QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity(value: str | int) -> float:
    match = QUANTITY.match(str(value))
    assert match and match.group(2) in UNITS, value
    return float(match.group(1)) * UNITS[match.group(2)]


def hardening_problems(container: dict[str, Any]) -> list[str]:
    sc = container.get("securityContext") or {}
    wanted = {
        "runAsNonRoot": sc.get("runAsNonRoot") is True,
        "runAsUser non-zero": isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0,
        "allowPrivilegeEscalation false": sc.get("allowPrivilegeEscalation") is False,
        "capabilities drop ALL": "ALL" in (sc.get("capabilities") or {}).get("drop", []),
        "seccompProfile RuntimeDefault": (sc.get("seccompProfile") or {}).get("type")
        == "RuntimeDefault",
    }
    return [what for what, ok in wanted.items() if not ok]


def resource_problems(container: dict[str, Any]) -> list[str]:
    resources, problems = container.get("resources") or {}, []
    for resource in ("cpu", "memory"):
        request = (resources.get("requests") or {}).get(resource)
        limit = (resources.get("limits") or {}).get(resource)
        if request is None or limit is None:
            problems.append(f"{resource}: requests and limits both")
        elif quantity(request) > quantity(limit):
            problems.append(f"{resource}: request above limit")
    return problems


def mount_of(path: str, container: dict[str, Any], pod: dict[str, Any]) -> dict[str, Any] | None:
    """The volume (with the mount) that serves ``path`` in this container, if any."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"]))
    for mount in mounts:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix) and mount["name"] in volumes:
            return {**volumes[mount["name"]], "mount": mount, "file": path[len(prefix) :]}
    return None


def secret_problems(container: dict[str, Any], pod: dict[str, Any]) -> list[str]:
    """Secrets only from read-only mounted Secret files, named by *_FILE (or *_PATH) vars."""
    problems = []
    if container.get("envFrom"):
        problems.append("envFrom")
    for name, entry in env_of(container).items():
        if "valueFrom" in entry and "secretKeyRef" in entry["valueFrom"]:
            problems.append(f"{name}: secretKeyRef")
        if name in SECRET_VALUES:
            problems.append(f"{name}: a secret as a value (use the *_FILE variable)")
        if name == "INGEST_REDIS_URL" and urlsplit(entry.get("value", "")).password is not None:
            problems.append("INGEST_REDIS_URL carries a password")
        if name.endswith(("_FILE", "_TOKEN_PATH")):
            problems += _file_problems(name, entry.get("value", ""), container, pod)
    return problems


def _file_problems(
    name: str, path: str, container: dict[str, Any], pod: dict[str, Any]
) -> list[str]:
    volume = mount_of(path, container, pod)
    if volume is None:
        return [f"{name}: {path} is on no mounted volume"]
    source = volume.get("secret") or volume.get("configMap")
    problems = [] if volume["mount"].get("readOnly") else [f"{name}: mount not readOnly"]
    if name != "INGEST_CAMERA_CALIBRATION_FILE" and "secret" not in volume:
        problems.append(f"{name}: not from a Secret volume")
    if source is None:
        return [*problems, f"{name}: not a Secret or ConfigMap volume"]
    items = source.get("items")
    if items is not None and volume["file"] not in {i["path"] for i in items}:
        problems.append(f"{name}: {volume['file']} is not an item of its volume")
    return problems


def secret_key_refs(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "secretKeyRef":
                yield path
            yield from secret_key_refs(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from secret_key_refs(value, (*path, str(i)))


# --- tests: the schemas --------------------------------------------------------------------

DOCS = documents()


def test_kuberay_ships_the_decided_shape() -> None:
    kinds = sorted(doc["kind"] for _, doc in DOCS)
    assert kinds == ["Deployment", "PodMonitor", "PodMonitor", "RayCluster"], kinds
    # The consumer is a never-ending service: no RayJob (see README.md there).
    assert not (KUBERAY / "rayjob-cloud-ingest.yaml").exists()


@pytest.mark.parametrize(("where", "doc"), DOCS, ids=[w for w, _ in DOCS])
def test_kuberay_every_object_passes_its_strict_schema(where: str, doc: dict[str, Any]) -> None:
    assert schema_errors(doc) == [], where


@pytest.mark.parametrize(("where", "doc"), DOCS, ids=[w for w, _ in DOCS])
def test_kuberay_every_object_passes_the_operator_rules(where: str, doc: dict[str, Any]) -> None:
    assert operator_errors(doc) == [], where


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``doc`` with ``value`` at the dotted ``path`` (digits index lists)."""
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node: Any = doc
    for key in parents:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return doc


HEAD = "spec.headGroupSpec"
HEAD_C = f"{HEAD}.template.spec.containers.0"
WORKER = "spec.workerGroupSpecs.0"


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        ("spec.workerGroupSpec", [], "'workerGroupSpec' was unexpected"),  # workerGroupSpecs
        ("spec.gcsFaultToleranceOptions.redisPasword", {"value": "x"}, "'redisPasword' was"),
        ("spec.authOptions.token", "x", "'token' was unexpected"),
        (f"{HEAD_C}.resource", {}, "'resource' was unexpected"),  # a typo of resources
        (f"{HEAD_C}.securityContext.runAsNonroot", True, "'runAsNonroot' was unexpected"),
        (f"{WORKER}.template.spec.volumes.0.emptyDir.size", "1Gi", "'size' was unexpected"),
        ("metadata.label", {"a": "b"}, "'label' was unexpected"),  # ObjectMeta: Kubernetes'
        (f"{WORKER}.replicas", "4", "is not of type 'integer'"),
        (f"{WORKER}.template.spec.containers.0.ports.0.containerPort", "80", "is not of type"),
        ("spec.authOptions.mode", "password", "is not one of"),
    ],
)
def test_kuberay_strict_schema_rejects_a_broken_raycluster(
    path: str, value: Any, reason: str
) -> None:
    errors = schema_errors(_set(only("RayCluster"), path, value))
    assert any(reason in e for e in errors), errors


def test_kuberay_strict_schema_takes_int_or_string_both_ways() -> None:
    cluster = only("RayCluster")
    assert schema_errors(_set(cluster, f"{HEAD_C}.resources.limits.cpu", 2)) == []
    assert schema_errors(_set(cluster, f"{HEAD_C}.resources.limits.cpu", "2")) == []
    assert schema_errors(_set(cluster, f"{HEAD_C}.resources.limits.cpu", [2]))


@pytest.mark.parametrize(
    ("index", "path", "value", "reason"),
    [
        (0, "spec.template.spec.containers.0.livenesProbe", {}, "'livenesProbe' was unexpected"),
        (0, "spec.strategy.type", 1, "is not of type 'string'"),
        (0, "spec.replica", 1, "'replica' was unexpected"),
        (1, "spec.podMetricsEndpoints.0.bearerToken", "x", "'bearerToken' was unexpected"),
        (2, "spec.selectors", {}, "'selectors' was unexpected"),
    ],
)
def test_kuberay_strict_schema_rejects_a_broken_core_object(
    index: int, path: str, value: Any, reason: str
) -> None:
    """The Deployment (Kubernetes 1.36's schema) and the PodMonitors (the operator's CRD)."""
    doc = [only("Deployment"), *by_kind("PodMonitor")][index]
    errors = schema_errors(_set(doc, path, value))
    assert any(reason in e for e in errors), errors


# --- tests: the operator's rules -----------------------------------------------------------


def test_kuberay_checker_rejects_the_old_rayjob() -> None:
    """The RayJob this replaced: ValidationFailed at v1.7.0, never started."""
    job = yaml.safe_load((DATA / "rejected-rayjob.yaml").read_text())
    assert "BackoffLimit is incompatible with ClusterSelector mode" in rayjob_errors(job)


REDIS_ADDRESS = {"name": "RAY_REDIS_ADDRESS", "value": "redis:6379"}


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        (
            "metadata.annotations",
            {FT_ANNOTATION: "true"},
            "annotation and GcsFaultToleranceOptions",
        ),
        ("metadata.annotations", {STORAGE_NS_ANNOTATION: "x"}, "external-storage-namespace"),
        (f"{HEAD}.rayStartParams.redis-password", "x", "`redis-password` in rayStartParams"),
        (f"{HEAD_C}.env", [{"name": "REDIS_PASSWORD", "value": "x"}], "`REDIS_PASSWORD` env"),
        (f"{HEAD_C}.env", [REDIS_ADDRESS], "`RAY_REDIS_ADDRESS` env"),
        (f"{HEAD}.rayStartParams.redis-username", "x", "redis username"),
        ("spec.gcsFaultToleranceOptions.backend", "rocksdb", "GCSFaultToleranceEmbeddedStorage"),
        ("metadata.name", "c" * 54, "no more than 53 characters"),
        ("metadata.name", "Cctv_ingest", "DNS1035"),
        (f"{HEAD}.template.spec.containers", [], "headGroupSpec should have at least one"),
        (f"{WORKER}.template.spec.containers", [], "workerGroupSpec should have at least one"),
        (f"{WORKER}.minReplicas", 17, "greater than maxReplicas"),
        (f"{WORKER}.maxReplicas", -1, "negative"),
        (f"{WORKER}.idleTimeoutSeconds", 60, "autoscaler v2 is not enabled"),
        (f"{HEAD}.resources", {"CPU": "1"}, "both rayStartParams and Resources"),
        (f"{HEAD}.rayStartParams.labels", "a=b", "rayStartParams['labels']"),
        ("spec.rayVersion", "2.50.0", "minimum Ray version is 2.52.0"),
        ("spec.authOptions.enableK8sTokenAuth", True, "secretName"),
        ("spec.networkPolicy", {}, "RayClusterNetworkPolicy"),
    ],
)
def test_kuberay_checker_rejects_a_broken_raycluster(path: str, value: Any, reason: str) -> None:
    errors = operator_errors(_set(only("RayCluster"), path, value))
    assert any(reason in e for e in errors), errors


def test_kuberay_checker_rejects_redis_address_without_ft_options() -> None:
    cluster = _set(only("RayCluster"), f"{HEAD_C}.env", [REDIS_ADDRESS])
    del cluster["spec"]["gcsFaultToleranceOptions"]
    assert any("implicitly enables GCS fault tolerance" in e for e in operator_errors(cluster))


def test_kuberay_checker_wants_min_and_max_replicas_without_autoscaling() -> None:
    cluster = _set(only("RayCluster"), "spec.enableInTreeAutoscaling", False)
    assert operator_errors(cluster) == []
    del cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"]
    assert any("must set both minReplicas and maxReplicas" in e for e in operator_errors(cluster))


GOOD_JOB: dict[str, Any] = {
    "apiVersion": "ray.io/v1",
    "kind": "RayJob",
    "metadata": {"name": "window-handoff"},
    "spec": {"clusterSelector": {"ray.io/cluster": "cctv-ingest"}, "entrypoint": "python x.py"},
}


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        ("spec.backoffLimit", 3, "BackoffLimit is incompatible with ClusterSelector mode"),
        ("spec.ttlSecondsAfterFinished", 60, "cannot have TTLSecondsAfterFinished"),
        ("spec.suspend", True, "doesn't support the suspend operation"),
        ("metadata.name", "j" * 48, "no more than 47 characters"),
        ("spec.clusterSelector", {}, "one of RayClusterSpec or ClusterSelector"),
        ("spec.clusterSelector", {"ray.io/cluster": ""}, "should not be empty"),
        ("spec.submissionMode", "SidecarMode", "not supported in SidecarMode"),
        ("spec.activeDeadlineSeconds", 0, "activeDeadlineSeconds must be a positive"),
    ],
)
def test_kuberay_checker_rejects_a_broken_rayjob(path: str, value: Any, reason: str) -> None:
    assert rayjob_errors(GOOD_JOB) == []
    errors = rayjob_errors(_set(GOOD_JOB, path, value))
    assert any(reason in e for e in errors), errors


def test_kuberay_checker_applies_cluster_rules_to_a_rayjobs_cluster() -> None:
    spec = only("RayCluster")["spec"]
    job = _set(GOOD_JOB, "spec.rayClusterSpec", spec)
    del job["spec"]["clusterSelector"]
    job["spec"]["shutdownAfterJobFinishes"] = True
    job["spec"]["ttlSecondsAfterFinished"] = 60
    assert rayjob_errors(job) == []
    job["metadata"]["annotations"] = {FT_ANNOTATION: "true"}
    assert any("annotation and GcsFaultToleranceOptions" in e for e in rayjob_errors(job))


# --- tests: production settings ------------------------------------------------------------

CONTAINERS = all_containers()
CONTAINER_IDS = [where for where, _, _ in CONTAINERS]


def test_kuberay_finds_every_container() -> None:
    assert sorted(CONTAINER_IDS) == [
        "Deployment pod cloud-ingest",
        "RayCluster autoscaler sidecar",
        "RayCluster head ray-head",
        "RayCluster worker cpu ray-worker",
    ]


@pytest.mark.parametrize(("where", "container", "pod"), CONTAINERS, ids=CONTAINER_IDS)
def test_kuberay_every_container_is_hardened(
    where: str, container: dict[str, Any], pod: dict[str, Any]
) -> None:
    assert hardening_problems(container) == [], where
    # A read-only root wants a writable /tmp (Ray's session directory, tempfiles).
    if (container.get("securityContext") or {}).get("readOnlyRootFilesystem"):
        tmp = mount_of("/tmp/x", container, pod)  # noqa: S108 (a path in the pod)
        assert tmp is not None and "emptyDir" in tmp and not tmp["mount"].get("readOnly"), where


@pytest.mark.parametrize(("where", "container", "pod"), CONTAINERS, ids=CONTAINER_IDS)
def test_kuberay_every_container_has_requests_and_limits(
    where: str, container: dict[str, Any], pod: dict[str, Any]
) -> None:
    assert resource_problems(container) == [], where


def test_kuberay_one_image_everywhere_pinned_by_digest() -> None:
    """Ray Client needs the same Ray and Python on the driver and the cluster: one image."""
    images = {where: c.get("image") for where, c, _ in CONTAINERS}
    assert all(isinstance(i, str) and IMAGE.match(i) for i in images.values()), images
    assert len(set(images.values())) == 1, images


@pytest.mark.parametrize(("where", "container", "pod"), CONTAINERS, ids=CONTAINER_IDS)
def test_kuberay_secrets_only_from_mounted_files(
    where: str, container: dict[str, Any], pod: dict[str, Any]
) -> None:
    assert secret_problems(container, pod) == [], where


@pytest.mark.parametrize(("where", "doc"), DOCS, ids=[w for w, _ in DOCS])
def test_kuberay_no_secret_key_ref_but_the_gcs_redis_password(
    where: str, doc: dict[str, Any]
) -> None:
    allowed = [GCS_REDIS_PASSWORD] if doc["kind"] == "RayCluster" else []
    assert list(secret_key_refs(doc)) == allowed, where


@pytest.mark.parametrize(
    ("check", "path", "value"),
    [
        (hardening_problems, "securityContext.runAsUser", 0),
        (hardening_problems, "securityContext.capabilities", {"drop": ["NET_RAW"]}),
        (hardening_problems, "securityContext.seccompProfile", {"type": "Unconfined"}),
        (hardening_problems, "securityContext.allowPrivilegeEscalation", True),
        (resource_problems, "resources.limits", {"cpu": "1"}),
        (resource_problems, "resources.requests.memory", "64Gi"),
    ],
)
def test_kuberay_production_checks_catch_mistakes(check: Any, path: str, value: Any) -> None:
    container = only("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert check(container) == []
    assert check(_set(container, path, value))


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"name": "INGEST_KEYRING", "value": "{}"}, "a secret as a value"),
        ({"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}, "a secret as a value"),
        ({"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}, "secretKeyRef"),
        ({"name": "INGEST_REDIS_URL", "value": "redis://:pw@queue:6379/0"}, "carries a password"),
        ({"name": "INGEST_REPLAY_KEY_FILE", "value": "/var/replay.key"}, "on no mounted volume"),
        ({"name": "INGEST_REPLAY_KEY_FILE", "value": "/tmp/replay.key"}, "not readOnly"),  # noqa: S108
        ({"name": "INGEST_REPLAY_KEY_FILE", "value": "/etc/cloud-ingest/secrets/x"}, "not an item"),
        (
            {
                "name": "INGEST_REPLAY_KEY_FILE",
                "value": "/etc/cloud-ingest/config/calibration.json",
            },
            "not from a Secret volume",
        ),
    ],
)
def test_kuberay_secret_check_catches_mistakes(env: dict[str, Any], reason: str) -> None:
    pod = only("Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert secret_problems(container, pod) == []
    container["env"] = [e for e in container["env"] if e["name"] != env["name"]] + [env]
    assert any(reason in p for p in secret_problems(container, pod))


def known_settings() -> set[str]:
    return {f"INGEST_{name.upper()}" for name in IngestSettings.model_fields}


@pytest.mark.parametrize(("where", "container", "pod"), CONTAINERS, ids=CONTAINER_IDS)
def test_kuberay_ingest_variables_are_real_settings(
    where: str, container: dict[str, Any], pod: dict[str, Any]
) -> None:
    ours = {n for n in env_of(container) if n.startswith("INGEST_")}
    assert ours <= known_settings(), (where, ours - known_settings())


def test_kuberay_ingest_variable_check_catches_a_typo() -> None:
    assert "INGEST_CONSUMER" not in known_settings()
    assert "INGEST_CONSUMERS" in known_settings()


# --- tests: the deployment against the cluster ---------------------------------------------


def driver() -> tuple[dict[str, Any], dict[str, Any]]:
    pod = only("Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    return container, pod


def deployment_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> IngestSettings:
    """IngestSettings as the Deployment's environment makes them (its files made here)."""
    container, _ = driver()
    for name in [n for n in os.environ if n.startswith("INGEST_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    contents = {
        "INGEST_KEYRING_FILE": json.dumps({"box-0001-2026a": {"secret": "k" * 32}}),
        "INGEST_CAMERA_CALIBRATION_FILE": "{}",
    }
    for name, entry in env_of(container).items():
        value = entry["value"]
        if name.endswith("_FILE"):
            value = str(tmp_path / name)
            Path(value).write_text(contents.get(name, "s" * 32) + "\n")
        monkeypatch.setenv(name, value)
    return IngestSettings()


def test_kuberay_deployment_environment_is_valid_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = deployment_settings(tmp_path, monkeypatch)
    assert settings.keyring and settings.consumers == 16
    assert "ray_job" in settings.handoff_sinks


def test_kuberay_deployment_runs_one_driver_over_ray_client() -> None:
    deployment, cluster = only("Deployment"), only("RayCluster")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # never two drivers
    container, pod = driver()
    assert container["command"] == ["cloud-ingest", "run"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    service = f"{cluster['metadata']['name']}-head-svc"  # GenerateHeadServiceName
    env = {n: str(e.get("value")) for n, e in env_of(container).items()}
    assert env["RAY_ADDRESS"] == f"ray://{service}:{ports['client']}"
    assert env["INGEST_JOB_ADDRESS"] == f"http://{service}:{ports['dashboard']}"
    # Token auth: the driver reads the cluster's token from the Secret KubeRay uses.
    assert env["RAY_AUTH_MODE"] == "token"
    volume = mount_of(env["RAY_AUTH_TOKEN_PATH"], container, pod)
    assert volume is not None
    assert volume["secret"]["secretName"] == cluster["spec"]["authOptions"]["secretName"]
    assert volume["file"] == "auth_token"  # RAY_AUTH_TOKEN_SECRET_KEY
    assert {"key": "auth_token", "path": "auth_token"} in volume["secret"]["items"]


def test_kuberay_probes_on_the_http_bind_port() -> None:
    container, _ = driver()
    env = {n: str(e.get("value")) for n, e in env_of(container).items()}
    bind = env.get("INGEST_HTTP_BIND", IngestSettings.model_fields["http_bind"].default)
    host, port = parse_bind(bind)
    assert host == "0.0.0.0"  # reachable by the kubelet and by Prometheus
    assert "INGEST_HTTP_TOKEN_FILE" in env  # not loopback: /readyz and /metrics want a token
    [http] = [p for p in container["ports"] if p["name"] == "http"]
    assert http["containerPort"] == port
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, probe
    script = container["readinessProbe"]["exec"]["command"][2]
    assert f"http://127.0.0.1:{port}/readyz" in script


async def _probe(script: str, token_file: Path) -> int:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        env={"INGEST_HTTP_TOKEN_FILE": str(token_file)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), 30)


async def test_kuberay_readiness_probe_reads_the_token_file(tmp_path: Path) -> None:
    """The probe's own command against the real health server: ready, not ready, bad token."""
    container, _ = driver()
    command = container["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    port = free_port()
    script = command[2].replace(":9109/", f":{port}/")
    state = {"redis": True}

    async def ready() -> dict[str, bool]:
        return dict(state)

    runner = await serve(f"127.0.0.1:{port}", CollectorRegistry(), ready, token="t" * 32)
    try:
        token = tmp_path / "token"
        token.write_text("t" * 32 + "\n")
        assert await _probe(script, token) == 0
        state["redis"] = False
        assert await _probe(script, token) != 0
        state["redis"] = True
        token.write_text("wrong\n")
        assert await _probe(script, token) != 0
    finally:
        await runner.cleanup()


def test_kuberay_grace_period_covers_the_drain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cloud_ingest.consumer import drain_budget_s
    from cloud_ingest.supervisor import Supervisor

    settings = deployment_settings(tmp_path, monkeypatch)
    grace = only("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= drain_budget_s(settings) + Supervisor.RAY_LATENCY_S + 10


def test_kuberay_cluster_has_gcs_fault_tolerance_and_token_auth() -> None:
    spec = only("RayCluster")["spec"]
    ft = spec["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] and set(ft["redisPassword"]["valueFrom"]) == {"secretKeyRef"}
    assert ft.get("backend", "redis") == "redis"
    container, _ = driver()
    queue = urlsplit(env_of(container)["INGEST_REDIS_URL"]["value"]).hostname
    assert ft["redisAddress"].rpartition(":")[0] != queue  # a Redis of its own, not the queue's
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    version = _version(spec["rayVersion"])
    assert version is not None and version >= (2, 52, 0)


def test_kuberay_head_runs_no_work_and_the_workers_fit_the_consumers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = deployment_settings(tmp_path, monkeypatch)
    spec = only("RayCluster")["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # Hand-off jobs declare CPUs, so Ray schedules their drivers on workers, not the head.
    assert settings.job_entrypoint_num_cpus > 0
    cpus = 0.0
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["rayStartParams"].get("num-cpus") != "0"
        [worker] = group["template"]["spec"]["containers"]
        cpus += group["minReplicas"] * quantity(worker["resources"]["limits"]["cpu"])
    # Every consumer actor has a place without waiting for the autoscaler.
    assert cpus >= settings.consumers * settings.actor_cpus


def _ray_pods(cluster: dict[str, Any]) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """(labels, pod spec) of the Ray pods, with the labels KubeRay adds to them."""
    name = cluster["metadata"]["name"]
    pods = []
    for where, template in pod_templates(cluster):
        node = "head" if where == "head" else "worker"
        labels = {**template.get("metadata", {}).get("labels", {}), "ray.io/cluster": name}
        pods.append(({**labels, "ray.io/node-type": node}, template["spec"]))
    return pods


def test_kuberay_podmonitors_scrape_declared_ports() -> None:
    deployment, cluster = only("Deployment"), only("RayCluster")
    template = deployment["spec"]["template"]
    pods = [(template["metadata"]["labels"], template["spec"]), *_ray_pods(cluster)]
    for monitor in by_kind("PodMonitor"):
        wanted = monitor["spec"]["selector"]["matchLabels"]
        selected = [spec for labels, spec in pods if wanted.items() <= labels.items()]
        assert selected, monitor["metadata"]["name"]
        declared = {p["name"] for s in selected for c in s["containers"] for p in c["ports"]}
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in declared, (monitor["metadata"]["name"], endpoint["port"])
    # Ray's metrics agent: port 8080 (KubeRay's DefaultMetricsPort) on every Ray node.
    for labels, spec in _ray_pods(cluster):
        ports = {p["name"]: p["containerPort"] for p in spec["containers"][0]["ports"]}
        assert ports.get("metrics") == 8080, labels
    for group in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]:
        assert group["rayStartParams"].get("metrics-export-port", "8080") == "8080"
    # The consumer's /metrics wants the bearer token the driver reads from its file.
    [consumer] = [m for m in by_kind("PodMonitor") if m["metadata"]["name"] == "cloud-ingest"]
    [endpoint] = consumer["spec"]["podMetricsEndpoints"]
    container, pod = driver()
    token = mount_of(env_of(container)["INGEST_HTTP_TOKEN_FILE"]["value"], container, pod)
    assert token is not None
    assert endpoint["authorization"]["credentials"]["name"] == token["secret"]["secretName"]
    [item] = [i for i in token["secret"]["items"] if i["path"] == token["file"]]
    assert endpoint["authorization"]["credentials"]["key"] == item["key"]
