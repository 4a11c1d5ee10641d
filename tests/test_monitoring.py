"""configs/monitoring, tested like code: the alert rules with promtool (``check rules`` and
``test rules``, every alert made to fire and to stay silent), the scrape config with
``promtool check config``, the Grafana dashboard's queries parsed by promtool, and every
metric a rule or a panel names found in the live /metrics of a running edge agent, a
running cloud-ingest deployment and Ray's metrics agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import yaml  # type: ignore[import-untyped]

from devstack import daemons
from devstack.servers import RtspServer, free_port

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "configs" / "monitoring"
RULE_FILES = sorted(MONITORING.glob("*.rules.yml"))
UNIT_TESTS = sorted((MONITORING / "tests").glob("*.yml"))
DASHBOARD = MONITORING / "grafana-dashboard.json"
PROMETHEUS_YML = MONITORING / "prometheus.yml"
# Series Prometheus makes itself for every target: in no /metrics page.
SYNTHETIC = frozenset({"up"})
# Which live page exports a metric, by its prefix.
EXPORTERS = {"edge_agent_": "edge agent", "cloud_ingest_": "cloud-ingest", "ray_": "Ray"}
SEVERITIES = {"page", "ticket"}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        raise AssertionError("promtool missing: make deps installs Debian's prometheus package")
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, timeout=60, check=False, cwd=cwd
    )


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules() -> list[dict[str, Any]]:
    return [r for path in RULE_FILES for g in load_yaml(path)["groups"] for r in g["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in rules() if "alert" in r}


def recorded() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def dashboard() -> Any:
    return json.loads(DASHBOARD.read_text())


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def dashboard_exprs() -> list[str]:
    """Every panel query, and the selector of every ``label_values(selector, label)``
    template query."""
    doc = dashboard()
    exprs = [t["expr"] for p in panels(doc["panels"]) for t in p.get("targets", [])]
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"\s*label_values\((.+),\s*\w+\s*\)\s*", query)
            assert m, f"template variable {var['name']}: not a label_values() query: {query}"
            exprs.append(m.group(1))
    return exprs


# -- a PromQL tokenizer that finds the metric names an expression reads -------------------


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


FUNCTIONS = _words(
    """abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes
    clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year
    days_in_month deg delta deriv end exp floor histogram_count histogram_fraction
    histogram_quantile histogram_sum holt_winters hour idelta increase irate label_join
    label_replace last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute
    month pi predict_linear present_over_time quantile_over_time rad rate resets round scalar
    sgn sin sinh sort sort_desc sqrt start stddev_over_time stdvar_over_time sum_over_time tan
    tanh time timestamp vector year"""
)
AGGREGATIONS = _words(
    "avg bottomk count count_values group max min quantile stddev stdvar sum topk"
)
KEYWORDS = frozenset({"and", "or", "unless", "atan2", "bool"})
LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
LITERALS = frozenset({"inf", "nan"})
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
VARIABLE = re.compile(r"\$(?:\{[^}]*\}|\w+)")  # Grafana's $site, ${datasource}, $__interval
DURATION = re.compile(r"\s*-?(?:\d+(?:ms|[smhdwy]))+")
NAME_MATCHER = re.compile(r"""__name__\s*=\s*(["'`])(.*?)\1""")


def metric_names(expr: str) -> set[str]:
    """The metric (and recording rule) names ``expr`` selects: not function, aggregation
    or keyword names, not labels (inside ``{}``, in ``by (...)`` and the like), strings,
    numbers, durations (``[...]``, after ``offset``) or Grafana variables."""
    names: set[str] = set()
    pos = 0
    while pos < len(expr):
        pos = _step(expr, pos, names)
    return names


def _step(expr: str, pos: int, names: set[str]) -> int:
    """Consume one token at ``pos``; returns where the next one starts."""
    char = expr[pos]
    if char in "\"'`":
        return _string_end(expr, pos)
    if char == "{":
        end = _matchers_end(expr, pos)
        names.update(m.group(2) for m in NAME_MATCHER.finditer(expr, pos, end))
        return end
    if char == "[":
        return expr.index("]", pos) + 1
    if char == "#":
        newline = expr.find("\n", pos)
        return len(expr) if newline < 0 else newline
    for pattern in (VARIABLE, NUMBER):
        if m := pattern.match(expr, pos):
            return m.end()
    if m := IDENT.match(expr, pos):
        return _word(expr, m, names)
    return pos + 1


def _word(expr: str, m: re.Match[str], names: set[str]) -> int:
    word, end = m.group(), m.end()
    after = _skip_space(expr, end)
    opens = after < len(expr) and expr[after] == "("
    if word in LABEL_LISTS:
        return _paren_end(expr, after) if opens else end
    if word == "offset":
        duration = DURATION.match(expr, end)
        assert duration, f"no duration after offset in {expr!r}"
        return duration.end()
    if word.lower() in LITERALS or word in KEYWORDS:
        return end
    if word in AGGREGATIONS and (opens or IDENT.match(expr, after) is not None):
        return end  # sum(...), sum by (...) (...)
    if opens:
        assert word in FUNCTIONS, f"unknown PromQL function {word}() in {expr!r}"
        return end
    names.add(word)
    return end


def _skip_space(expr: str, pos: int) -> int:
    while pos < len(expr) and expr[pos].isspace():
        pos += 1
    return pos


def _string_end(expr: str, pos: int) -> int:
    quote, i = expr[pos], pos + 1
    while expr[i] != quote:
        i += 2 if expr[i] == "\\" and quote != "`" else 1
    return i + 1


def _matchers_end(expr: str, pos: int) -> int:
    i = pos + 1
    while expr[i] != "}":
        i = _string_end(expr, i) if expr[i] in "\"'`" else i + 1
    return i + 1


def _paren_end(expr: str, pos: int) -> int:
    return expr.index(")", pos) + 1  # a label list holds no parentheses


def exported_names(page: str) -> set[str]:
    """The series names a /metrics page (text format) exposes. ``# TYPE`` lines count:
    prometheus_client writes them for a labelled metric before any label set was seen;
    a histogram's or summary's TYPE stands for its ``_bucket``/``_count``/``_sum``."""
    names: set[str] = set()
    for line in page.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind in ("histogram", "summary"):
                names.update({f"{name}_count", f"{name}_sum"})
            if kind == "histogram":
                names.add(f"{name}_bucket")
        elif line and not line.startswith("#") and (m := IDENT.match(line)):
            names.add(m.group())
    return names


def used_metrics() -> dict[str, set[str]]:
    """Exported metric names the rules and the dashboard read -> where they are read."""
    used: dict[str, set[str]] = {}
    sources = [(f"rule {r.get('alert') or r.get('record')}", r["expr"]) for r in rules()]
    sources += [("dashboard", e) for e in dashboard_exprs()]
    derived = recorded() | SYNTHETIC
    for where, expr in sources:
        for name in metric_names(expr) - derived:
            used.setdefault(name, set()).add(where)
    return used


def test_metric_names_skips_functions_keywords_labels_strings_and_durations() -> None:
    expr = """
        label_replace(
          sum by (job, outcome) (increase(a_total{outcome=~"rejected_.+", x="}"}[15m] offset 5m)),
          "reason", "$1", "outcome", "rejected_(.+)"
        ) > 0 unless on (job) group_left () b_bucket{le="+Inf"} * 1e3
        or histogram_quantile(0.99, rate(c_seconds_bucket[$__rate_interval])) > bool Inf
        and sum(d) without (cause) / count without (x) (rec:rule:1d) + {__name__="e"} # f
    """
    assert metric_names(expr) == {
        "a_total",
        "b_bucket",
        "c_seconds_bucket",
        "d",
        "rec:rule:1d",
        "e",
    }
    assert metric_names("max_over_time(sum(x)[1h:5m]) - 0x1F") == {"x"}
    with pytest.raises(AssertionError, match="unknown PromQL function"):
        metric_names("rat(x[5m])")


def test_exported_names_include_type_lines_of_labelled_metrics_without_samples() -> None:
    page = "\n".join(
        [
            "# HELP a_total x",
            "# TYPE a_total counter",
            "# TYPE h_seconds histogram",
            'h_seconds_bucket{le="1.0"} 0.0',
            "g 1.0",
        ]
    )
    assert exported_names(page) == {
        "a_total",
        "h_seconds",
        "h_seconds_bucket",
        "h_seconds_count",
        "h_seconds_sum",
        "g",
    }


# -- the rules --------------------------------------------------------------------------


def test_monitoring_configs_are_all_here() -> None:
    assert [p.name for p in RULE_FILES] == ["cloud-ingest.rules.yml", "edge-agent.rules.yml"]
    assert UNIT_TESTS and DASHBOARD.is_file() and PROMETHEUS_YML.is_file()
    assert not (ROOT / "configs" / "prometheus").exists()  # moved here


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_rule_files_pass_promtool_check_rules(path: Path) -> None:
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rule_unit_tests_pass_promtool_test_rules() -> None:
    result = promtool("test", "rules", *map(str, UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(UNIT_TESTS), result.stdout


def test_every_alert_has_a_duration_a_severity_a_summary_and_a_description() -> None:
    names = [r["alert"] for r in rules() if "alert" in r]
    assert len(names) == len(set(names)), "alert names must be unique across the rule files"
    for name, rule in alerts().items():
        assert "for" in rule, f"{name}: no `for:` (write `for: 0m` to fire at once)"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        assert {"summary", "description"} <= set(rule.get("annotations", {})), name


def unit_test_cases() -> dict[str, dict[str, int]]:
    """alertname -> how many promtool checks expect it firing and silent."""
    cases: dict[str, dict[str, int]] = {}
    for path in UNIT_TESTS:
        for test in load_yaml(path)["tests"]:
            for check in test.get("alert_rule_test", []):
                kind = "firing" if check.get("exp_alerts") else "silent"
                counts = cases.setdefault(check["alertname"], {"firing": 0, "silent": 0})
                counts[kind] += 1
    return cases


def test_every_alert_fires_and_stays_silent_in_the_unit_tests() -> None:
    """Adding an alert without a promtool case where it fires and one where it does not
    fails here (and so does a case for an alert that does not exist: promtool would pass
    `exp_alerts: []` for any name)."""
    defined, cases = set(alerts()), unit_test_cases()
    assert sorted(set(cases) - defined) == [], "unit tests of alerts that are not defined"
    untested = {
        name: [kind for kind in ("firing", "silent") if not cases.get(name, {}).get(kind)]
        for name in sorted(defined)
    }
    assert {name: kinds for name, kinds in untested.items() if kinds} == {}
    loaded = {
        (path.parent / f).resolve() for path in UNIT_TESTS for f in load_yaml(path)["rule_files"]
    }
    assert loaded == {p.resolve() for p in RULE_FILES}


def test_prometheus_config_passes_promtool_check_config(tmp_path: Path) -> None:
    """The full check (rule files loaded and checked too), with the token files it names
    made in a temporary directory."""
    text = PROMETHEUS_YML.read_text()
    config = yaml.safe_load(text)
    assert sorted(config["rule_files"]) == sorted(p.name for p in RULE_FILES)
    jobs = {c["job_name"]: c for c in config["scrape_configs"]}
    assert set(jobs) == {"edge-agent", "cloud-ingest", "ray"}
    assert jobs["edge-agent"]["authorization"]["credentials_file"]
    assert jobs["cloud-ingest"]["authorization"]["credentials_file"]
    secrets = {
        c["authorization"]["credentials_file"] for c in jobs.values() if "authorization" in c
    }
    for path in RULE_FILES:
        shutil.copy(path, tmp_path / path.name)
    for n, secret in enumerate(sorted(secrets)):
        (tmp_path / f"token-{n}").write_text("test-token\n")
        text = text.replace(secret, str(tmp_path / f"token-{n}"))
    (tmp_path / "prometheus.yml").write_text(text)
    result = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in result.stdout


# -- the dashboard ------------------------------------------------------------------------


def test_dashboard_is_grafana_json_on_a_datasource_variable() -> None:
    doc = dashboard()
    assert doc["schemaVersion"] >= 39 and doc["uid"] and doc["title"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"site", "camera"} <= set(variables)
    every = list(panels(doc["panels"]))
    assert len({p["id"] for p in every}) == len(every)
    for panel in every:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and set(panel["gridPos"]) == {"h", "w", "x", "y"}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["refId"]


def test_dashboard_queries_parse_with_promtool(tmp_path: Path) -> None:
    """Each query, with Grafana's variables put in, as a recording rule that promtool
    parses."""
    values = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}

    def substitute(expr: str) -> str:
        return VARIABLE.sub(lambda m: values.get(m.group().strip("${}"), ".*"), expr)

    group = [
        {"record": f"dashboard:query{n}", "expr": substitute(e)}
        for n, e in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": group}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_covers_what_operators_look_at() -> None:
    read = set().union(*(metric_names(e) for e in dashboard_exprs()))
    for name in (
        "edge_agent_camera_up",
        "edge_agent_camera_reconnects_total",
        "edge_agent_camera_circuit_open",
        "camera:coverage_ratio:1d",
        "edge_agent_gap_seconds_total",
        "edge_agent_spool_bytes",
        "edge_agent_chunks_evicted_total",
        "edge_agent_oldest_unannounced_age_seconds",
        "edge_agent_upload_seconds_bucket",
        "cloud_ingest_stream_length",
        "cloud_ingest_pending",
        "cloud_ingest_lag",
        "cloud_ingest_chunks_total",
        "cloud_ingest_actor_restarts_total",
        "cloud_ingest_stage_seconds_total",
        "cloud_ingest_windows_closed_total",
        "cloud_ingest_media_seconds_total",
        "ray_node_cpu_utilization",
        "ray_node_mem_used",
        "ray_actors",
        "ray_tasks",
    ):
        assert name in read, name


# -- against the live /metrics of the real daemons and Ray ---------------------------------


async def _until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.25)


async def _page(http: aiohttp.ClientSession, url: str) -> str:
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            return await resp.text() if resp.status == 200 else ""
    except (aiohttp.ClientError, OSError, TimeoutError):
        return ""


async def _names_when_complete(
    http: aiohttp.ClientSession, url: str, wanted: set[str], timeout: float
) -> set[str]:
    """The names ``url`` exports once it exports all of ``wanted``, or at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        names = exported_names(await _page(http, url))
        if wanted <= names or time.monotonic() > deadline:
            return names
        await asyncio.sleep(0.5)


def _ray_metrics_url() -> str:
    import ray

    nodes = cast(Callable[[], list[dict[str, Any]]], ray.nodes)()
    [node] = [n for n in nodes if n["Alive"]]  # the session's one local node
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


async def test_rules_and_dashboard_name_only_exported_metrics(
    stack: Any, rtsp_server: RtspServer, ray_cluster: tuple[str, str], tmp_path: Path
) -> None:
    """An edge agent records a live camera (chunks: media seconds, uploads) and retries a
    missing one (reconnects, errors); a cloud-ingest deployment processes the chunks on the
    session's Ray. Every metric the rules and the dashboard read must be in their /metrics
    (or Ray's): a renamed metric or a typo fails here."""
    used = used_metrics()
    wanted = {
        exporter: {n for n in used if n.startswith(prefix)}
        for prefix, exporter in EXPORTERS.items()
    }
    unknown = {n: sorted(w) for n, w in used.items() if not n.startswith(tuple(EXPORTERS))}
    assert unknown == {}, "metrics no exporter of ours has"
    edge_port, cloud_port = free_port(), free_port()
    cameras = [
        {"id": "cam1", "url": rtsp_server.url("cam1")},
        {"id": "gone", "url": rtsp_server.url("no-such-mount")},
    ]
    edge = daemons.edge_agent(
        stack.edge_env(cameras, EDGE_HTTP_BIND=f"127.0.0.1:{edge_port}"), tmp_path / "edge.log"
    )
    cloud = daemons.cloud_ingest(
        stack.ingest_env(INGEST_HTTP_BIND=f"127.0.0.1:{cloud_port}"), tmp_path / "cloud.log"
    )
    edge_url = f"http://127.0.0.1:{edge_port}/metrics"
    cloud_url = f"http://127.0.0.1:{cloud_port}/metrics"
    try:
        async with aiohttp.ClientSession() as http:

            async def has(url: str, pattern: str) -> bool:
                return re.search(pattern, await _page(http, url), re.MULTILINE) is not None

            announced = r'^edge_agent_chunks_announced_total\{camera="cam1"\} [1-9]'
            await _until(lambda: has(edge_url, announced), 60, "a chunk announced")
            retried = r'^edge_agent_camera_reconnects_total\{camera="gone"\} [1-9]'
            await _until(lambda: has(edge_url, retried), 30, "the missing camera retried")
            processed = r'^cloud_ingest_chunks_total\{outcome="processed"\} [1-9]'
            await _until(lambda: has(cloud_url, processed), 90, "a chunk processed")
            exported = {
                "edge agent": await _names_when_complete(http, edge_url, wanted["edge agent"], 10),
                "cloud-ingest": await _names_when_complete(
                    http, cloud_url, wanted["cloud-ingest"], 10
                ),
                "Ray": await _names_when_complete(http, _ray_metrics_url(), wanted["Ray"], 60),
            }
    finally:
        for daemon in (edge, cloud):
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.terminate(30)
            daemon.kill()
    missing = {
        exporter: {name: sorted(used[name]) for name in sorted(names - exported[exporter])}
        for exporter, names in wanted.items()
    }
    assert {exporter: m for exporter, m in missing.items() if m} == {}, "not exported"
