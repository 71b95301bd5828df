"""The files under packaging/ parse, agree with the code, and pass their own tools."""

from __future__ import annotations

import configparser
import json
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
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


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (Debian: systemd)"
)
SYSUSERS = PKG / "systemd" / "cortex-neuron.sysusers"


def _runnable_units(tmp_path: Path) -> list[Path]:
    """Copies of the units whose ExecStart exists here (the real path is only there
    once installed, and verify insists on it)."""
    units = []
    for src in sorted((PKG / "systemd").glob("*.service")):
        text = re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", src.read_text(), flags=re.M)
        (tmp_path / src.name).write_text(text)
        units.append(tmp_path / src.name)
    return units


def test_systemd_units_own_state_and_sysusers_user() -> None:
    """Each unit has its own StateDirectory (its working directory); both run as the
    user the sysusers.d file makes, whose home is the neuron's state directory."""
    cortex, neuron = _unit("cortex.service")["Service"], _unit("neuron.service")["Service"]
    [line] = [ln for ln in SYSUSERS.read_text().splitlines() if ln and not ln.startswith("#")]
    kind, name, _, _, home, shell = shlex.split(line)

    assert cortex["StateDirectory"] != neuron["StateDirectory"]
    for service in (cortex, neuron):
        assert service["WorkingDirectory"] == f"/var/lib/{service['StateDirectory']}"
        assert service["User"] == service["Group"] == name
    assert (kind, home, shell) == ("u", f"/var/lib/{neuron['StateDirectory']}", "/usr/sbin/nologin")
    # The example config keeps the store in the neuron's state directory (writable there).
    store = tomllib.loads((PKG / "examples" / "neuron.toml").read_text())["store_dir"]
    assert Path(store).is_relative_to(neuron["WorkingDirectory"])
    assert neuron["Environment"].startswith(f"HF_HOME={neuron['WorkingDirectory']}/")


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_sysusers_creates_the_service_user(tmp_path: Path) -> None:
    """systemd-sysusers, on an empty root, makes the system user and its group."""
    (tmp_path / "etc").mkdir()

    done = _run("systemd-sysusers", f"--root={tmp_path}", SYSUSERS)

    assert done.returncode == 0, done.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text().split(":")
    assert passwd[0] == "cortex-neuron" and passwd[5:] == [
        "/var/lib/cortex-neuron",
        "/usr/sbin/nologin\n",
    ]
    assert int(passwd[2]) < 1000  # a system user
    assert (tmp_path / "etc" / "group").read_text().startswith("cortex-neuron:")


@needs_systemd_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd itself finds no unknown key or bad value in the units."""
    units = _runnable_units(tmp_path)

    done = _run(SYSTEMD_ANALYZE or "systemd-analyze", "verify", *units)

    complaints = [line for line in done.stderr.splitlines() if str(tmp_path) in line]
    assert complaints == []
    assert done.returncode == 0, done.stderr


def _exposure(unit: Path) -> float:
    done = _run(SYSTEMD_ANALYZE or "systemd-analyze", "security", "--offline=yes", unit)
    assert done.returncode == 0, done.stderr
    m = re.search(rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d)", done.stdout)
    assert m, done.stdout
    return float(m[1])


# systemd-analyze security (0 = locked down, 10 = exposed) of the units before
# hardening (issue 11) was cortex 7.9 and neuron 8.7; now about 1.1 and 1.3.
@needs_systemd_analyze
@pytest.mark.parametrize(("unit", "below"), [("cortex.service", 4.0), ("neuron.service", 4.0)])
def test_systemd_security_exposure(tmp_path: Path, unit: str, below: float) -> None:
    """The sandbox as systemd scores it, offline on the unit file."""
    [path] = [u for u in _runnable_units(tmp_path) if u.name == unit]

    assert _exposure(path) < below


def _sandbox(service: configparser.SectionProxy) -> dict[str, str]:
    # What restricts the service, as opposed to how it is run (devices are compared
    # by the comment above DevicePolicy, as PrivateDevices).
    return {k: v for k, v in service.items() if k not in _NOT_SANDBOX}


_NOT_SANDBOX = {
    "Type", "User", "Group", "ExecStart", "StateDirectory", "WorkingDirectory",
    "Environment", "EnvironmentFile", "Restart", "RestartSec", "KillMode", "KillSignal",
    "TimeoutStopSec", "LimitNOFILE", "LimitMEMLOCK", "DeviceAllow", "DevicePolicy",
}  # fmt: skip


def test_neuron_says_why_for_each_relaxation() -> None:
    """Every sandbox setting the neuron has weaker than cortex (or lacks) is explained
    by a comment naming it, on the lines just above."""
    cortex = _sandbox(_unit("cortex.service")["Service"])
    neuron = _sandbox(_unit("neuron.service")["Service"])
    lines = (PKG / "systemd" / "neuron.service").read_text().splitlines()
    relaxed = sorted(k for k, v in cortex.items() if neuron.get(k) != v)

    assert {"PrivateDevices", "ProcSubset", "RestrictAddressFamilies"} <= set(relaxed)
    for key in relaxed:
        if key not in neuron:
            reasons = [ln for ln in lines if ln.startswith("# Relaxed") and key in ln]
            assert reasons, f"{key}: dropped with no reason given"
            continue
        at = next(i for i, ln in enumerate(lines) if ln.startswith(f"{key}="))
        comments = " ".join(ln for ln in lines[max(0, at - 6) : at] if ln.startswith("#"))
        assert "Relaxed" in comments, f"{key}={neuron[key]}: no reason given above it"


needs_mdwe = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="PR_SET_MDWE is Linux's"
)
MDWE = ROOT / "tests" / "support" / "mdwe.py"


def _under_mdwe(argv: list[str]) -> list[str]:
    return [sys.executable, str(MDWE), *argv]


@needs_mdwe
def test_mdwe_wrapper_refuses_writable_executable_memory() -> None:
    """The wrapper really applies W^X (else the test below proves nothing), and MLX's
    CPU JIT (mx.compile: g++ then dlopen) still works under it."""
    wx = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)"
    jit = (
        "import mlx.core as mx\n"
        "f = mx.compile(lambda x: mx.exp(x) * x + mx.sin(x))\n"
        "print(f(mx.arange(64, dtype=mx.float32)).sum().item())"
    )

    refused = _run(*_under_mdwe([sys.executable, "-c", wx]))
    if refused.returncode == 3:
        pytest.skip(f"this kernel has no PR_SET_MDWE: {refused.stderr.strip()}")
    compiled = _run(*_under_mdwe([sys.executable, "-c", jit]))

    assert refused.returncode != 0 and "Permission denied" in refused.stderr
    assert _run(sys.executable, "-c", wx).returncode == 0
    assert compiled.returncode == 0, compiled.stderr
    assert float(compiled.stdout) > 0


@needs_mdwe
def test_fleet_serves_under_memory_deny_write_execute(tmp_path: Path, demo_model: Path) -> None:
    """A real neuron, its runner and cortex all under W^X (MemoryDenyWriteExecute=yes in
    both units) load the demo model and answer a chat request."""
    neuron = NeuronProcess.start(tmp_path / "neuron", wrap=_under_mdwe)
    cortex = CortexProcess.write(
        tmp_path / "cortex", [("a", neuron)], [{"id": "demo", "source": str(demo_model)}]
    )
    try:
        neuron.load_ready("demo", demo_model)
        log = (cortex.dir / "cortex.log").open("ab")
        argv = [sys.executable, "-m", "cortex.cli", "serve", "-c", str(cortex.dir / "cortex.toml")]
        cortex.process = subprocess.Popen(
            _under_mdwe(argv), stdout=log, stderr=subprocess.STDOUT, cwd=cortex.dir
        )
        log.close()
        wait_until(cortex._up, 60, "cortex under W^X")

        def served() -> bool:
            body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
            status, _ = http_json(cortex.url + "/v1/chat/completions", {**body, "max_tokens": 4})
            return status == 200

        wait_until(served, 60, "a chat answer through cortex and the neuron under W^X")
    finally:
        cortex.stop()
        neuron.stop()


def test_launchd_cortex_is_a_daemon_and_neuron_has_hf_home() -> None:
    """cortex runs at boot as its own user (a LaunchDaemon); the neuron (a LaunchAgent,
    for Metal) keeps hub downloads beside its store."""
    cortex_path = PKG / "launchd" / "org.cortex-neuron.cortex.plist"
    cortex = plistlib.loads(cortex_path.read_bytes())
    neuron = plistlib.loads((PKG / "launchd" / "org.cortex-neuron.neuron.plist").read_bytes())

    assert cortex["UserName"] == cortex["GroupName"] == "_cortexneuron"
    assert cortex["Umask"] == 0o077
    assert "/Library/LaunchDaemons/" in cortex_path.read_text()
    assert "launchctl bootstrap system " in cortex_path.read_text()
    assert "UserName" not in neuron
    assert neuron["EnvironmentVariables"]["HF_HOME"].startswith("/Users/Shared/cortex-neuron/")


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
    # A crash loop (a config error) is bounded: launchd itself never gives up.
    assert plist["ThrottleInterval"] >= 30
    assert plist["KeepAlive"] == {"SuccessfulExit": False, "Crashed": True}
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


def _template_queries() -> list[str]:
    """The dashboard's variable queries (label_values(...)): names they read count too."""
    out = []
    for var in _dashboard()["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            out.append(str(query["query"]))
    return out


# What the dashboard must show (issue 11), by the series it reads.
DASHBOARD_NEEDS = {
    "latency percentiles": "cortex_request_duration_seconds_bucket",
    "TTFT percentiles": "neuron_time_to_first_token_seconds_bucket",
    "tokens/s": "neuron_tokens_total",
    "in flight (cortex)": "cortex_requests_in_flight",
    "in flight (neuron)": "neuron_model_in_flight_requests",
    "queue wait (cortex)": "cortex_queue_wait_seconds_bucket",
    "queue wait (neuron)": "neuron_queue_wait_seconds_bucket",
    "memory per node": "neuron_memory_available_bytes",
    "disk per node": "neuron_disk_free_bytes",
    "runner crashes": "neuron_runner_crashes_total",
    "cold loads": "cortex_cold_loads_total",
    "errors by class": "cortex_stream_errors_total",
    "replicas wanted": "cortex_model_replicas_wanted",
    "replicas present": "cortex_model_replicas_present",
    "versions": "neuron_build_info",
}


def test_grafana_dashboard() -> None:
    """A dashboard with a uid, panels with queries, on the fleet's metric families."""
    dash = _dashboard()
    exprs = _dashboard_exprs()

    assert dash["uid"] and dash["title"]
    assert all(p.get("targets") for p in dash["panels"])
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    assert all(metric in " ".join(exprs) for metric in METRICS)


def test_grafana_dashboard_covers_the_fleet() -> None:
    """Every panel reads at least one of our series; the panels the issue asks for are
    there; every percentile is a histogram_quantile over a `_bucket` rate."""
    for panel in _dashboard()["panels"]:
        names = {m for t in panel["targets"] for m in _names(t["expr"])}
        assert names, f"panel {panel['title']!r} reads none of our metrics"
    used = {m for e in _dashboard_exprs() for m in _names(e)}
    missing = {what: name for what, name in DASHBOARD_NEEDS.items() if name not in used}
    assert missing == {}
    for expr in _dashboard_exprs():
        if "histogram_quantile" in expr:
            assert re.search(r"rate\(\w+_bucket\{", expr), expr


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


# A name in PromQL: not a function (followed by `(`); label matchers are blanked first
# (`{...}`), so a name compared with `==` still counts.
_NAME = re.compile(r"\b((?:cortex|neuron)_[a-zA-Z0-9_]*)\b(?!\s*\()")


def _names(expr: str) -> list[str]:
    return _NAME.findall(re.sub(r"\{[^}]*\}", "{}", expr))


def test_metric_names_found_in_promql() -> None:
    """The name finder the live check relies on: comparisons count, matchers do not."""
    assert _names("cortex_build_info == 1") == ["cortex_build_info"]
    assert _names('sum by (le) (rate(neuron_x_bucket{model=~"cortex_y"}[5m]))') == [
        "neuron_x_bucket"
    ]
    assert _names("label_values(cortex_requests_total, model)") == ["cortex_requests_total"]


def _used_names() -> set[str]:
    rules = [r["expr"] for g in _yaml(PROM / "alerts.yml")["groups"] for r in g["rules"]]
    queries = [*rules, *_dashboard_exprs(), *_template_queries()]
    return {m for e in queries for m in _names(e)}


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
    assert set(DASHBOARD_NEEDS.values()) <= used
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
