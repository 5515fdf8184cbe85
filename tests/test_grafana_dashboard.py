"""docs/grafana/jaxinfer.json only queries series that /metrics really exports.

Every PromQL expression in the dashboard (panel targets and template-variable queries) is
expanded for each value of its `prefix` variable (`vllm`, `jaxinfer`), and each metric name in
it must appear in a scrape of a live server on loopback over a fake engine, so renaming a series
in server/metrics.py without updating the dashboard fails here.
"""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jaxinfer.engine.metrics import EngineMetrics
from jaxinfer.tokenizer import Tokenizer
from jaxinfer.server import ServerSettings, create_app
from tests.server_fixtures import live_server, train_tokenizer

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "jaxinfer.json"
# Grafana's own interval variable, replaced by a plain PromQL duration.
BUILTINS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool"}
# What the dashboard must chart, as series of server/metrics.py, under each prefix.
REQUIRED = ["request_success_total", "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
            "prefix_cache_hits_total", "prefix_cache_queries_total", "time_to_first_token_seconds_bucket",
            "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_bucket", "prompt_tokens_total",
            "generation_tokens_total", "num_preemptions_total"]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels and strings left out)."""
    # Grafana's label_values(metric, label): the second argument is a label, not a metric.
    expr = re.sub(r"label_values\(\s*([^,()]+?)\s*,\s*\w+\s*\)", r"\1", expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, regexes)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery durations
    # Grouping and matching clauses with their label lists, so `sum by (le) (...)` reads as a call.
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        rest = expr[match.end():].lstrip()
        if rest.startswith("(") or match.group() in KEYWORDS:
            continue  # a function call or an operator keyword
        names.add(match.group())
    return names


def test_metric_names_on_hand_written_expressions():
    expr = ('histogram_quantile(0.9, sum by (le, model_name) (rate(vllm:a_seconds_bucket{model_name=~"x|y(z)", '
            'le!="1"}[5m:1m]))) / on (model_name) group_left (job) sum without (instance) (b_total offset 5m) > bool 1e3')
    assert metric_names(expr) == {"vllm:a_seconds_bucket", "b_total"}
    assert metric_names("label_values(jaxinfer:num_requests_running, model_name)") == {"jaxinfer:num_requests_running"}
    assert metric_names("sum(rate(x[1m])) / sum(rate(y[1m]))") == {"x", "y"}


def dashboard_panels(panels):
    for p in panels:
        yield p
        yield from dashboard_panels(p.get("panels", []))  # panels inside collapsed rows


def expressions(dashboard) -> list[str]:
    exprs = [t["expr"] for p in dashboard_panels(dashboard["panels"]) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return exprs


def expand(expr: str, values: dict[str, str]) -> str:
    out = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], expr)
    assert "$" not in out, out
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """Sample names of /metrics from a live server whose engine is a stand-in with fresh metrics."""
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(directory)
    tokenizer = Tokenizer.from_directory(directory)
    engine = SimpleNamespace(
        tokenizer=tokenizer, max_model_len=256, model_config=SimpleNamespace(vocab_size=tokenizer.vocab_size),
        metrics=EngineMetrics(), model=SimpleNamespace(path="fake"),
        scheduler=SimpleNamespace(num_running=0, num_waiting=0), block_manager=SimpleNamespace(usage=0.0))

    async def call(fn):
        return fn(engine)

    front = SimpleNamespace(engine=engine, call=call)
    with live_server(create_app(front, ServerSettings(served_model_names=("fake",)))) as server:
        r = httpx.get(server.base_url + "/metrics", timeout=10)
    assert r.status_code == 200
    return {s.name for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_every_queried_series_is_exported(exported):
    dashboard = json.loads(DASHBOARD.read_text())
    prefix = next(v for v in dashboard["templating"]["list"] if v["name"] == "prefix")
    prefixes = [o["value"] for o in prefix["options"]]
    assert sorted(prefixes) == ["jaxinfer", "vllm"]
    exprs = expressions(dashboard)
    assert exprs
    for p in prefixes:
        values = {**BUILTINS, "prefix": p, "model_name": ".*", "datasource": "prometheus"}
        used = set()
        for expr in exprs:
            names = metric_names(expand(expr, values))
            assert names, f"no metric in {expr!r}"
            missing = names - exported
            assert not missing, f"{expr!r} queries {sorted(missing)}, which /metrics does not export"
            used |= names
        assert {f"{p}:{name}" for name in REQUIRED} <= used


def test_panels_are_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(dashboard_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        here = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not cells & here, f"panel {p['title']!r} overlaps another"
        cells |= here
        if p["type"] != "row":
            # Every query goes to the data source the viewer picks.
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"]
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
