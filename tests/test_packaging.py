"""The files under packaging/ parse, agree with the code, and pass their own tools."""

from __future__ import annotations

import configparser
import json
import plistlib
import re
import shutil
import subprocess
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from cortex.config import CortexConfig
from neuron.config import NeuronConfig
from tests.conftest import NeuronProcess, http_json, wait_until
from tests.e2e.conftest import CortexProcess

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "packaging"
PROM = PKG / "prometheus"

# The metric families the alerts and the dashboard are written against.
METRICS = {
    "cortex_node_healthy",
    "cortex_requests_total",
    "cortex_cold_loads_total",
    "neuron_model_state",
    "neuron_rejected_requests_total",
    "cortex_stream_errors_total",
}

PROMTOOL = shutil.which("promtool")
# The services' default drain on SIGTERM; a service manager must wait longer.
DRAIN_S = max(CortexConfig().drain_s, NeuronConfig().drain_s)
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")


def _yaml(path: Path) -> Any:
    # PyYAML comes with mlx-lm and huggingface-hub; the project adds no dependency for it.
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(path.read_text())


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=60, check=False
    )


def _unit(name: str) -> configparser.ConfigParser:
    # systemd allows repeated keys (Environment=); the last one wins here, which is enough.
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(PKG / "systemd" / name)
    return parser


@pytest.mark.parametrize(("unit", "config"), [("neuron", "neuron"), ("cortex", "cortex")])
def test_systemd_unit(unit: str, config: str) -> None:
    """Restart on failure, the whole cgroup killed on stop, a bounded stop, the /etc config."""
    service = _unit(f"{unit}.service")["Service"]

    assert service["Restart"] == "on-failure"
    assert service["KillMode"] == "control-group"
    # Longer than the default drain, so a stop never cuts a stream unterminated.
    assert int(service["TimeoutStopSec"]) > DRAIN_S
    exec_start = service["ExecStart"].split()
    assert exec_start[0].endswith(f"/bin/{unit}")
    assert exec_start[1:] == ["serve", "-c", f"/etc/cortex-neuron/{config}.toml"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd itself finds no unknown key or bad value in the units."""
    units = []
    for src in sorted((PKG / "systemd").glob("*.service")):
        # verify insists ExecStart exists; the real path is only there once installed.
        text = re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", src.read_text(), flags=re.M)
        (tmp_path / src.name).write_text(text)
        units.append(tmp_path / src.name)

    done = _run("systemd-analyze", "verify", *units)

    complaints = [line for line in done.stderr.splitlines() if str(tmp_path) in line]
    assert complaints == []


@pytest.mark.parametrize("name", ["neuron", "cortex"])
def test_launchd_plist(name: str) -> None:
    """A valid plist that keeps the service alive, logs to files and reads /etc config."""
    path = PKG / "launchd" / f"org.cortex-neuron.{name}.plist"
    plist = plistlib.loads(path.read_bytes())

    assert plist["Label"] == path.stem
    assert plist["KeepAlive"]
    assert plist["RunAtLoad"] is True
    assert plist["ProgramArguments"][0].endswith(f"/bin/{name}")
    assert plist["ProgramArguments"][1:] == ["serve", "-c", f"/etc/cortex-neuron/{name}.toml"]
    assert plist["StandardOutPath"].endswith(".log")
    assert plist["StandardErrorPath"].endswith(".log")
    assert plist["ExitTimeOut"] > DRAIN_S
    if shutil.which("plutil"):
        assert _run("plutil", "-lint", path).returncode == 0


def test_prometheus_scrapes_cortex_and_neurons() -> None:
    """cortex on :9400 and neurons on :9410, with the alert rules loaded."""
    config = _yaml(PROM / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {
        name: [t for sc in job["static_configs"] for t in sc["targets"]]
        for name, job in jobs.items()
    }

    assert targets["cortex"] and all(t.endswith(":9400") for t in targets["cortex"])
    assert targets["neuron"] and all(t.endswith(":9410") for t in targets["neuron"])
    assert config["rule_files"] == ["alerts.yml"]


def test_alert_rules_shape() -> None:
    """Every rule has a severity and a summary; every named metric family is covered."""
    groups = _yaml(PROM / "alerts.yml")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    exprs = " ".join(rule["expr"] for rule in rules)

    assert {r["alert"] for r in rules} >= {
        "CortexNodeUnhealthy",
        "NeuronModelFailed",
        "CortexQueueFull",
        "CortexColdLoadFailures",
        "NeuronQueueRejections",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    for metric in METRICS:
        assert metric in exprs


@needs_promtool
def test_promtool_check_config() -> None:
    """promtool accepts the scrape config and the rule file it loads."""
    done = _run(PROMTOOL or "promtool", "check", "config", PROM / "prometheus.yml")

    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_check_rules() -> None:
    """promtool accepts the alert rules."""
    done = _run(PROMTOOL or "promtool", "check", "rules", PROM / "alerts.yml")

    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_test_rules() -> None:
    """The alerts fire on the series in alerts_test.yml, and only there."""
    done = _run(PROMTOOL or "promtool", "test", "rules", PROM / "alerts_test.yml")

    assert done.returncode == 0, done.stdout + done.stderr


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((PKG / "grafana" / "cortex-neuron.json").read_text())
    return data


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", ())]


def test_grafana_dashboard() -> None:
    """A dashboard with a uid, panels with queries, on the fleet's metric families."""
    dash = _dashboard()
    exprs = _dashboard_exprs()

    assert dash["uid"] and dash["title"]
    assert all(p.get("targets") for p in dash["panels"])
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    assert all(metric in " ".join(exprs) for metric in METRICS)


@needs_promtool
def test_grafana_queries_are_promql(tmp_path: Path) -> None:
    """Every dashboard query parses as PromQL once Grafana's variables are filled in."""
    exprs = [
        e.replace("$__rate_interval", "5m").replace("$model", ".*") for e in _dashboard_exprs()
    ]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(exprs)],
            }
        ]
    }
    # JSON is YAML, so promtool reads this without a YAML writer here.
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(json.dumps(rules))

    done = _run(PROMTOOL or "promtool", "check", "rules", path)

    assert done.returncode == 0, done.stdout + done.stderr


def test_litellm_config() -> None:
    """Each LiteLLM model is `openai/<id>` of the catalogue; addresses and keys from the env."""
    config = _yaml(PKG / "litellm" / "config.yaml")
    catalogue = tomllib.loads((ROOT / "models.toml").read_text())
    names = {n for m in catalogue["models"] for n in (m["id"], *m.get("aliases", ()))}
    models = {m["model_name"]: m["litellm_params"] for m in config["model_list"]}

    assert models["demo"]["model"] == "openai/demo"
    for name, params in models.items():
        provider, _, model = params["model"].partition("/")
        assert provider == "openai"
        assert model in names, f"{name}: {model} is not in models.toml"
        # Where cortex listens, and its keys, come from the environment, never the file.
        assert params["api_base"] == "os.environ/CORTEX_API_BASE"
        assert params["api_key"] == "os.environ/CORTEX_API_KEY"
    assert config["general_settings"]["master_key"] == "os.environ/LITELLM_MASTER_KEY"


def test_example_configs_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example configs pass the services' own strict loaders, with one fleet token."""
    monkeypatch.setenv("CORTEX_FLEET_TOKEN", "t" * 32)
    neuron = NeuronConfig.from_file(PKG / "examples" / "neuron.toml")
    cortex = CortexConfig.from_file(PKG / "examples" / "cortex.toml")

    assert neuron.fleet_token == cortex.fleet_token == "t" * 32
    assert neuron.port == 9410
    assert cortex.port == 9400
    assert cortex.neurons and all(n.url.endswith(":9410") for n in cortex.neurons)


_ASSIGNMENT = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")
_TABLE = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?")


def _uncommented_keys(text: str) -> list[str]:
    """Keys whose first appearance has no comment on the line above or at its end."""
    missing: list[str] = []
    documented: set[str] = set()
    table = ""
    previous = ""
    for line in text.splitlines():
        if m := _TABLE.match(line):
            table = m[1]
        elif m := _ASSIGNMENT.match(line):
            key = f"{table}.{m[1]}"
            if previous.lstrip().startswith("#") or re.search(r"\s#\s", line):
                documented.add(key)
            elif key not in documented:
                missing.append(key)
        previous = line
    return missing


@pytest.mark.parametrize("name", ["neuron.toml", "cortex.toml"])
def test_example_configs_comment_every_key(name: str) -> None:
    """Every key of an example config is explained where it first appears."""
    assert _uncommented_keys((PKG / "examples" / name).read_text()) == []


def test_example_configs_cover_every_key() -> None:
    """The examples show every top-level key the loaders know, so none stays hidden."""
    import attrs

    for cls, name in ((NeuronConfig, "neuron.toml"), (CortexConfig, "cortex.toml")):
        shown = tomllib.loads((PKG / "examples" / name).read_text())
        keys = {f.name for f in attrs.fields(cls) if f.metadata.get("toml", True)}
        assert keys - set(shown) == set(), name


# A name in PromQL: not a function, keyword or label (those are followed by `(` or `=`).
_NAME = re.compile(r"\b((?:cortex|neuron)_[a-zA-Z0-9_]*)\b(?!\s*[(=])")


def _used_names() -> set[str]:
    rules = [r["expr"] for g in _yaml(PROM / "alerts.yml")["groups"] for r in g["rules"]]
    return {m for e in [*rules, *_dashboard_exprs()] for m in _NAME.findall(e)}


def _exported(text: str) -> set[str]:
    """Sample names a /metrics page exports, with each family's suffixes from # TYPE."""
    names: set[str] = set()
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count"),
    }
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            # A counter with no sample yet is declared with its `_total` already.
            family = family.removesuffix("_total") if kind == "counter" else family
            names.update(family + s for s in suffixes.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_alerts_and_dashboard_use_only_names_live_services_export(
    tmp_path: Path, demo_model: Path
) -> None:
    """A real cortex and a real neuron with the demo model loaded serve a request; every
    metric name the alert rules and the dashboard query is in their live /metrics."""
    used = _used_names()
    assert {"neuron_rejected_requests_total", "cortex_requests_total"} <= used
    neuron = NeuronProcess.start(tmp_path / "neuron")
    cortex: CortexProcess | None = None
    try:
        neuron.load_ready("demo", demo_model)
        cortex = CortexProcess.write(
            tmp_path / "cortex", [("a", neuron)], [{"id": "demo", "source": str(demo_model)}]
        ).start()

        def served() -> bool:
            body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
            status, _ = http_json(cortex.url + "/v1/chat/completions", {**body, "max_tokens": 4})
            return status == 200

        wait_until(served, 60, "a chat answer through cortex")
        text = ""
        for base in (cortex.url, neuron.url):
            with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
                text += resp.read().decode() + "\n"
    finally:
        if cortex is not None:
            cortex.stop()
        neuron.stop()
    missing = sorted(used - _exported(text))
    assert missing == [], f"used by alerts/dashboard, exported by nobody: {missing}"
