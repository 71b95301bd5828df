"""The metrics a real fleet exports, and a real Prometheus server scraping them.

One fleet for the module: cortex in front of two neurons (fleet token on), `demo`
kept loaded on node a, `cold` loaded by the first request for it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import NeuronProcess, free_port, wait_until
from tests.e2e.conftest import CortexProcess
from tests.support.clients import post_chat

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = shutil.which("prometheus")
TOKEN = "f" * 40


@attrs.frozen
class Fleet:
    cortex: CortexProcess
    a: NeuronProcess
    b: NeuronProcess


def _chat(cortex: CortexProcess, model: str) -> int:
    return post_chat(cortex.url, model, max_tokens=4)[0]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    (root / "token").write_text(TOKEN)
    settings = {"fleet_token_file": str(root / "token")}
    started: list[NeuronProcess] = []
    cortex: CortexProcess | None = None
    try:
        a = NeuronProcess.start(root / "a", settings)
        started.append(a)
        b = NeuronProcess.start(root / "b", settings)
        started.append(b)
        a.load_ready("demo", demo_model)
        models: list[dict[str, Any]] = [
            {"id": "demo", "source": str(demo_model), "keep_loaded": True, "replicas": 1},
            {"id": "cold", "source": str(demo_model)},
        ]
        cortex = CortexProcess.write(
            root / "cortex", [("a", a), ("b", b)], models, **settings
        ).start()
        c = cortex
        wait_until(lambda: _chat(c, "demo") == 200, 60, "a chat answer through cortex")
        # Not loaded anywhere: cortex loads it while the request waits.
        assert _chat(cortex, "cold") == 200
        yield Fleet(cortex=cortex, a=a, b=b)
    finally:
        if cortex is not None:
            cortex.stop()
        for n in started:
            n.stop()


def _samples(url: str) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def _value(url: str, name: str, **labels: str) -> float:
    found = [v for n, ls, v in _samples(url) if n == name and labels.items() <= ls.items()]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


def test_build_info_on_both(fleet: Fleet) -> None:
    """Each service says which versions it runs; the neuron names its MLX."""
    for url, name in ((fleet.cortex.url, "cortex_build_info"), (fleet.a.url, "neuron_build_info")):
        [(labels, value)] = [(ls, v) for n, ls, v in _samples(url) if n == name]
        assert value == 1
        assert labels["version"] and labels["python"].startswith("3.")
        assert set(labels) == {"version", "python", "mlx", "mlx_lm"}
    neuron = next(ls for n, ls, _ in _samples(fleet.a.url) if n == "neuron_build_info")
    assert neuron["mlx"] and neuron["mlx_lm"]


def test_neuron_memory_and_disk(fleet: Fleet) -> None:
    """Each neuron reports its own machine's memory and its store's disk."""
    total = _value(fleet.b.url, "neuron_memory_total_bytes")
    available = _value(fleet.b.url, "neuron_memory_available_bytes")
    disk_total = _value(fleet.b.url, "neuron_disk_total_bytes")
    disk_free = _value(fleet.b.url, "neuron_disk_free_bytes")

    assert 0 < available <= total
    assert 0 < disk_free <= disk_total
    assert disk_total == shutil.disk_usage(fleet.b.dir / "store").total


def test_tokens_counted_once_by_the_neuron(fleet: Fleet) -> None:
    """Tokens come from the runner's usage, on the neuron that served; cortex has none."""
    prompt = _value(fleet.a.url, "neuron_tokens_total", model="demo", kind="prompt")
    completion = _value(fleet.a.url, "neuron_tokens_total", model="demo", kind="completion")
    before = _value(fleet.a.url, "neuron_requests_total", model="demo", outcome="ok")

    assert _chat(fleet.cortex, "demo") == 200
    assert prompt > 0 and completion > 0
    assert _value(fleet.a.url, "neuron_requests_total", model="demo", outcome="ok") == before + 1
    later = _value(fleet.a.url, "neuron_tokens_total", model="demo", kind="completion")
    assert completion < later <= completion + 4
    assert not [n for n, _, _ in _samples(fleet.cortex.url) if "token" in n]


def test_queue_waits(fleet: Fleet) -> None:
    """cortex timed the wait for the cold load; the neuron times every admission."""
    cold_count = _value(fleet.cortex.url, "cortex_queue_wait_seconds_count", model="cold")
    cold_sum = _value(fleet.cortex.url, "cortex_queue_wait_seconds_sum", model="cold")
    # The load took real time: a runner started and warmed while the request waited.
    assert cold_count >= 1 and cold_sum > 0.1
    load = _value(fleet.cortex.url, "cortex_cold_load_duration_seconds_sum", model="cold")
    assert cold_sum <= load + 5
    before = _value(fleet.a.url, "neuron_queue_wait_seconds_count", model="demo")

    assert _chat(fleet.cortex, "demo") == 200
    assert _value(fleet.a.url, "neuron_queue_wait_seconds_count", model="demo") == before + 1


def test_replicas_wanted_and_present(fleet: Fleet) -> None:
    """demo is wished once (keep_loaded) and is there; cold is not wished, yet loaded."""

    def replicas() -> dict[tuple[str, str], float]:
        return {
            (n, ls["model"]): v
            for n, ls, v in _samples(fleet.cortex.url)
            if n.startswith("cortex_model_replicas_")
        }

    got = wait_until(
        lambda: (r := replicas()).get(("cortex_model_replicas_present", "cold")) == 1 and r,
        30,
        "cortex to see the cold load",
    )
    assert got == {
        ("cortex_model_replicas_wanted", "demo"): 1,
        ("cortex_model_replicas_present", "demo"): 1,
        ("cortex_model_replicas_wanted", "cold"): 0,
        ("cortex_model_replicas_present", "cold"): 1,
    }
    memory = _value(fleet.cortex.url, "cortex_node_memory_available_bytes", node="b")
    assert memory > 0


# -- a real Prometheus server ------------------------------------------------------------


def _query(base: str, promql: str) -> list[dict[str, Any]]:
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{promql}: {exc.read().decode()}") from exc
    assert body["status"] == "success", body
    return list(body["data"]["result"])


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian: prometheus)")
def test_prometheus_scrapes_the_fleet(fleet: Fleet, tmp_path: Path) -> None:
    """A real Prometheus scrapes cortex and both neurons (no token: /metrics is open) and
    holds their series: all three up, requests counted, build info, memory per node."""
    assert PROMETHEUS is not None
    targets = {
        "cortex": [f"127.0.0.1:{fleet.cortex.port}"],
        "neuron": [f"127.0.0.1:{fleet.a.port}", f"127.0.0.1:{fleet.b.port}"],
    }
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": t}]} for job, t in targets.items()
        ],
    }
    # JSON is YAML.
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "prometheus.log").read_text())
            try:
                with urllib.request.urlopen(base + "/-/ready", timeout=2) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        wait_until(ready, 60, "prometheus ready")

        def all_up() -> list[dict[str, Any]] | None:
            got = _query(base, "up == 1")
            return got if len(got) == 3 else None

        up = wait_until(all_up, 60, "prometheus to scrape all three targets")
        assert sorted(r["metric"]["instance"] for r in up) == sorted(
            t for ts in targets.values() for t in ts
        )
        assert _chat(fleet.cortex, "demo") == 200

        def served() -> list[dict[str, Any]] | None:
            got = _query(base, 'sum(cortex_requests_total{model="demo",code="200"}) > 0')
            return got or None

        wait_until(served, 30, "the demo requests in prometheus")
        build = _query(base, "neuron_build_info == 1")
        assert len(build) == 2 and all(r["metric"]["mlx"] for r in build)
        assert len(_query(base, "cortex_build_info == 1")) == 1
        assert len(_query(base, "neuron_memory_available_bytes > 0")) == 2
        tokens = _query(base, 'sum(neuron_tokens_total{kind="completion"}) > 0')
        assert tokens

        def p50() -> list[dict[str, Any]] | None:
            rate = "rate(cortex_request_duration_seconds_bucket[1m])"
            expr = f"histogram_quantile(0.5, sum by (le) ({rate}))"
            got = [r for r in _query(base, expr) if r["value"][1] != "NaN"]
            return got or None

        wait_until(p50, 30, "a latency percentile from the served requests")
        # Every dashboard query runs on this server (Grafana's variables filled in).
        dashboard = json.loads((ROOT / "packaging" / "grafana" / "cortex-neuron.json").read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", "1m").replace("$model", ".*")
                _query(base, expr)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
