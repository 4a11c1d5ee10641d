"""Bad configuration: exit 78 (EX_CONFIG) with a message naming the variable."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support import BIN, base_env

GOOD_EDGE = {
    "EDGE_DEVICE_ID": "dev-1",
    "EDGE_SITE_ID": "site-1",
    "EDGE_CAMERAS": json.dumps([{"id": "cam1", "url": "rtsp://127.0.0.1:1/x"}]),
    "EDGE_S3_BUCKET": "raw-bucket",
    "EDGE_SIGNING_KEY": "s3cr3t-signing-value",
}
GOOD_INGEST = {
    "INGEST_OUTPUT_BUCKET": "out-bucket",
    "INGEST_RAW_BUCKET": "raw-bucket",
    "INGEST_KEYRING": json.dumps({"k1": "s3cr3t-keyring-value"}),
}


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env={**base_env(), **env}, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("override", "variable"),
    [
        ({"EDGE_CAMERAS": "[not json"}, "EDGE_CAMERAS"),
        ({"EDGE_CAMERAS": json.dumps([{"id": "../x", "url": "rtsp://h/x"}])}, "EDGE_CAMERAS"),
        ({"EDGE_CAMERAS": json.dumps([{"id": "c", "url": "ftp://h/x"}])}, "EDGE_CAMERAS"),
        ({"EDGE_SEGMENT_SECONDS": "-5"}, "EDGE_SEGMENT_SECONDS"),
        ({"EDGE_S3_BUCKET": ""}, "EDGE_S3_BUCKET"),
        ({"EDGE_SIGNING_KEY": ""}, "EDGE_SIGNING_KEY"),
        ({"EDGE_SPOOL_MAX_BYTES": "lots"}, "EDGE_SPOOL_MAX_BYTES"),
        ({"EDGE_MANIFEST_SCHEMA_VERSION": "3"}, "EDGE_MANIFEST_SCHEMA_VERSION"),
    ],
)
def test_config_edge_check_config_names_the_bad_variable(
    override: dict[str, str], variable: str
) -> None:
    env = {**GOOD_EDGE, **override}
    if override.get("EDGE_S3_BUCKET") == "":
        env.pop("EDGE_S3_BUCKET")
    result = run([str(BIN / "edge-agent"), "check-config", "--offline"], env)
    assert result.returncode == 78, result.stderr
    assert variable in result.stderr


@pytest.mark.parametrize("version", ["1", "2"])
def test_config_edge_manifest_schema_version_pins_from_the_environment(version: str) -> None:
    """As an operator sets it in the unit's environment file: a string."""
    env = {**GOOD_EDGE, "EDGE_MANIFEST_SCHEMA_VERSION": version}
    result = run([str(BIN / "edge-agent"), "check-config", "--offline"], env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["manifest_schema_version"] == int(version)


def test_config_edge_run_exits_78_on_bad_config() -> None:
    result = run([str(BIN / "edge-agent"), "run"], {**GOOD_EDGE, "EDGE_SEGMENT_SECONDS": "0"})
    assert result.returncode == 78
    assert "EDGE_SEGMENT_SECONDS" in result.stderr


def test_config_edge_check_config_prints_effective_config_without_secrets() -> None:
    env = {**GOOD_EDGE, "EDGE_REDIS_URL": "redis://:hunter2pass@127.0.0.1:6379/0"}
    result = run([str(BIN / "edge-agent"), "check-config", "--offline"], env)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["device_id"] == "dev-1"
    assert shown["cameras"][0]["id"] == "cam1"
    assert "s3cr3t-signing-value" not in result.stdout + result.stderr
    assert "hunter2pass" not in result.stdout + result.stderr


def test_config_edge_secret_and_cameras_from_files(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("from-file-secret\n")
    (tmp_path / "cams.json").write_text(json.dumps([{"id": "c9", "url": "file:///x.mp4"}]))
    env = {k: v for k, v in GOOD_EDGE.items() if k not in ("EDGE_SIGNING_KEY", "EDGE_CAMERAS")}
    env.update(
        {
            "EDGE_SIGNING_KEY_FILE": str(tmp_path / "key"),
            "EDGE_CAMERAS_FILE": str(tmp_path / "cams.json"),
        }
    )
    result = run([str(BIN / "edge-agent"), "check-config", "--offline"], env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["cameras"][0]["id"] == "c9"


def test_config_edge_signing_key_from_systemd_credentials(tmp_path: Path) -> None:
    (tmp_path / "signing_key").write_text("credential-secret")
    env = {k: v for k, v in GOOD_EDGE.items() if k != "EDGE_SIGNING_KEY"}
    env["CREDENTIALS_DIRECTORY"] = str(tmp_path)
    result = run([str(BIN / "edge-agent"), "check-config", "--offline"], env)
    assert result.returncode == 0, result.stderr


def test_config_edge_check_config_probe_reports_unreachable_services() -> None:
    env = {
        **GOOD_EDGE,
        "EDGE_REDIS_URL": "redis://127.0.0.1:1/0",
        "EDGE_S3_ENDPOINT_URL": "http://127.0.0.1:1",
        "EDGE_CAMERA_TIMEOUT_S": "2",
    }
    result = run([str(BIN / "edge-agent"), "check-config"], env)
    assert result.returncode == 78
    for variable in ("EDGE_REDIS_URL", "EDGE_S3_BUCKET", "EDGE_CAMERAS"):
        assert variable in result.stderr


CAL = {"width": 320, "height": 240, "K": [300.0, 0, 160, 0, 300, 120, 0, 0, 1]}


@pytest.mark.parametrize(
    ("override", "variable"),
    [
        ({"INGEST_KEYRING": "{oops"}, "INGEST_KEYRING"),
        ({"INGEST_KEYRING": "{}"}, "INGEST_KEYRING"),
        ({"INGEST_KEYRING": '{"k1": "short"}'}, "INGEST_KEYRING"),
        (
            {"INGEST_KEYRING": '{"k1": {"secret": "s3cr3t-keyring-value", "device_id": "../x"}}'},
            "INGEST_KEYRING",
        ),
        ({"INGEST_KEYRING": '{"k/1": "s3cr3t-keyring-value"}'}, "INGEST_KEYRING"),
        ({"INGEST_RAW_BUCKET": ""}, "INGEST_RAW_BUCKET"),
        ({"INGEST_OUTPUT_BUCKET": "Not_A_Bucket"}, "INGEST_OUTPUT_BUCKET"),
        ({"INGEST_CONSUMERS": "0"}, "INGEST_CONSUMERS"),
        ({"INGEST_MAX_DELIVERIES": "many"}, "INGEST_MAX_DELIVERIES"),
        ({"INGEST_CAMERA_CALIBRATION": "{oops"}, "INGEST_CAMERA_CALIBRATION"),
        ({"INGEST_CAMERA_CALIBRATION": '{"s": {"c": {"width": 2}}}'}, "INGEST_CAMERA_CALIBRATION"),
        (
            {"INGEST_CAMERA_CALIBRATION": json.dumps({"s": {"c": {**CAL, "K": [1.0] * 8}}})},
            "INGEST_CAMERA_CALIBRATION",
        ),
        (
            {
                "INGEST_CAMERA_CALIBRATION": json.dumps(
                    {"s": {"c": {**CAL, "rotation": [1, 1, 0, 0]}}}
                )
            },
            "INGEST_CAMERA_CALIBRATION",
        ),
        (
            {"INGEST_CAMERA_CALIBRATION_FILE": "/nonexistent/cal.json"},
            "INGEST_CAMERA_CALIBRATION_FILE",
        ),
    ],
)
def test_config_cloud_run_exits_78_naming_the_variable(
    override: dict[str, str], variable: str
) -> None:
    result = run([str(BIN / "cloud-ingest"), "run"], {**GOOD_INGEST, **override})
    assert result.returncode == 78, result.stderr
    assert variable in result.stderr
    assert "s3cr3t-keyring-value" not in result.stderr


def test_config_cloud_missing_output_bucket_exits_78() -> None:
    env = {k: v for k, v in GOOD_INGEST.items() if k != "INGEST_OUTPUT_BUCKET"}
    result = run([str(BIN / "cloud-ingest"), "status"], env)
    assert result.returncode == 78
    assert "INGEST_OUTPUT_BUCKET" in result.stderr


SENTINELS = {"REDIS_SENTINELS": "127.0.0.1:26379,127.0.0.1:26380", "REDIS_SENTINEL_MASTER": "m"}


@pytest.mark.parametrize("side", ["EDGE", "INGEST"])
@pytest.mark.parametrize(
    ("override", "variable"),
    [
        ({"REDIS_SENTINELS": "127.0.0.1:26379,sentinel-b"}, "REDIS_SENTINELS"),
        ({"REDIS_SENTINELS": "127.0.0.1:70000"}, "REDIS_SENTINELS"),
        ({"REDIS_SENTINEL_MASTER": ""}, "REDIS_SENTINEL_MASTER"),
        ({"REDIS_SENTINEL_MASTER": "bad name"}, "REDIS_SENTINEL_MASTER"),
        ({"REDIS_SENTINELS": "", "REDIS_SENTINEL_PASSWORD": "x" * 12}, "REDIS_SENTINELS"),
        ({"REDIS_URL": "unix:///run/redis.sock"}, "REDIS_URL"),
        ({"REDIS_PASSWORD_FILE": "/nonexistent/redis.pass"}, "REDIS_PASSWORD_FILE"),
        ({"REDIS_SENTINEL_PASSWORD_FILE": "/nonexistent/s.pass"}, "REDIS_SENTINEL_PASSWORD_FILE"),
        ({"HTTP_TOKEN_FILE": "/nonexistent/token"}, "HTTP_TOKEN_FILE"),
        (
            {"REDIS_URL": "redis://u:in-the-url@127.0.0.1/0", "REDIS_PASSWORD": "x" * 12},
            "REDIS_PASSWORD",
        ),
    ],
)
def test_config_redis_sentinels_and_secret_files_exit_78_naming_the_variable(
    side: str, override: dict[str, str], variable: str
) -> None:
    """Both daemons: a bad sentinel entry, a missing master, an unreadable secret file."""
    env = {**(GOOD_EDGE if side == "EDGE" else GOOD_INGEST)}
    env.update({f"{side}_{k}": v for k, v in {**SENTINELS, **override}.items() if v})
    if side == "EDGE":
        argv = [str(BIN / "edge-agent"), "check-config", "--offline"]
    else:
        argv = [str(BIN / "cloud-ingest"), "status"]
    result = run(argv, env)
    assert result.returncode == 78, result.stderr
    assert f"{side}_{variable}" in result.stderr, result.stderr
    assert "in-the-url" not in result.stderr


def test_config_cloud_webhook_secret_file_unreadable_exits_78() -> None:
    env = {**GOOD_INGEST, "INGEST_WEBHOOK_SECRET_FILE": "/nonexistent/webhook"}
    result = run([str(BIN / "cloud-ingest"), "status"], env)
    assert result.returncode == 78
    assert "INGEST_WEBHOOK_SECRET_FILE" in result.stderr


def test_config_edge_min_replicas_timeout_must_be_below_the_redis_timeout() -> None:
    env = {
        **GOOD_EDGE,
        "EDGE_REDIS_MIN_REPLICAS": "1",
        "EDGE_REDIS_MIN_REPLICAS_TIMEOUT_S": "10",
        "EDGE_REDIS_TIMEOUT_S": "5",
    }
    result = run([str(BIN / "edge-agent"), "check-config", "--offline"], env)
    assert result.returncode == 78
    assert "EDGE_REDIS_MIN_REPLICAS_TIMEOUT_S" in result.stderr


def test_config_secret_files_and_credentials_are_read_and_redacted(tmp_path: Path) -> None:
    """Every secret's file variant (and systemd credential) is read; check-config shows
    the sentinels and master but none of the secrets."""
    secrets = {
        "EDGE_REDIS_PASSWORD_FILE": "redis-pass-from-file",
        "EDGE_REDIS_SENTINEL_PASSWORD_FILE": "sentinel-pass-from-file",
        "EDGE_HTTP_TOKEN_FILE": "http-token-from-file",
    }
    env = {**GOOD_EDGE, "EDGE_REDIS_SENTINELS": " 10.0.0.5:26379, [::1]:26380 "}
    env["EDGE_REDIS_SENTINEL_MASTER"] = "queue"
    for name, value in secrets.items():
        (tmp_path / name).write_text(value + "\n")
        env[name] = str(tmp_path / name)
    result = run([str(BIN / "edge-agent"), "check-config", "--offline"], env)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["redis_sentinels"] == ["10.0.0.5:26379", "[::1]:26380"]
    assert shown["redis_sentinel_master"] == "queue"
    for name in ("redis_password", "redis_sentinel_password", "http_token"):
        assert set(shown[name]) == {"*"}, name  # masked
    assert not [s for s in secrets.values() if s in result.stdout + result.stderr]
    cred = tmp_path / "creds"
    cred.mkdir()
    for name, value in (("webhook_secret", "webhook-from-cred"), ("redis_password", "rp-cred")):
        (cred / name).write_text(value)
    cloud = {**GOOD_INGEST, "CREDENTIALS_DIRECTORY": str(cred)}
    code = (
        "from cloud_ingest.config import IngestSettings as S; s = S(); "
        "print(s.webhook_secret.get_secret_value(), s.redis_password.get_secret_value())"
    )
    result = run([str(BIN / "python"), "-c", code], cloud)
    assert result.stdout.split() == ["webhook-from-cred", "rp-cred"], result.stderr


@pytest.mark.parametrize(
    ("argv", "env", "variable"),
    [
        (["edge-agent", "check-config", "--offline"], GOOD_EDGE, "EDGE_SIGNING_KEY_FILE"),
        (["cloud-ingest", "status"], GOOD_INGEST, "INGEST_KEYRING_FILE"),
        (["cloud-ingest", "status"], GOOD_INGEST, "INGEST_REPLAY_KEY_FILE"),
    ],
)
def test_config_unreadable_secret_file_exits_78_naming_it(
    argv: list[str], env: dict[str, str], variable: str
) -> None:
    """A secret file that cannot be read is bad configuration (it used to be a traceback)."""
    given = {k: v for k, v in env.items() if k != variable.removesuffix("_FILE")}
    result = run([str(BIN / argv[0]), *argv[1:]], {**given, variable: "/nonexistent/secret"})
    assert result.returncode == 78, result.stderr
    assert f"{variable}: cannot read" in result.stderr
