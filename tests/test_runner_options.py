"""Per-model runner options: the catalogue's checks, the load request's, placement's draft
memory, the runner's flags and the request defaults (pure: no runner starts)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from cortex.core.placement import OVERHEAD_FACTOR, RESERVE_BYTES, candidates
from neuron.config import RunnerConfig
from neuron.runner.model_options import LocalOptions
from neuron.runner.process import runner_argv
from neuron.runner.request_check import ModelInfo, finish, validate
from shared.catalogue import GIB, Catalogue, ModelFacts, ModelSpec
from shared.config import ConfigError
from shared.runner_options import OptionError, RunnerOptions
from shared.wire import FieldError, GroupSpec, LoadRequest
from tests.cortex.records import node


def catalogue(tmp_path: Path, **entry: Any) -> Catalogue:
    path = tmp_path / "models.toml"
    path.write_text(tomli_w.dumps({"models": [{"id": "m", "source": "org/m", **entry}]}))
    return Catalogue.load(path)


def refused(tmp_path: Path, **entry: Any) -> str:
    with pytest.raises(ConfigError) as info:
        catalogue(tmp_path, **entry)
    return str(info.value)


FULL = {
    "draft_model": "./draft",
    "num_draft_tokens": 4,
    "adapters": "./lora",
    "chat_template_kwargs": {"enable_thinking": False, "style": {"tone": "dry"}},
    "max_tokens": 128,
    "max_tokens_cap": 1024,
    "extra_args": ["--kv-bits", "8", "--top-k", "-1"],
}


def test_every_option_loads_and_travels_in_the_load_request(tmp_path: Path) -> None:
    """All options load; relative paths resolve beside models.toml; the load request
    carries them, and the neuron's parse gives back the same options."""
    (spec,) = catalogue(tmp_path, **FULL).models
    assert spec.draft_model == str(tmp_path / "draft")
    assert spec.adapters == str(tmp_path / "lora")
    opts = spec.runner_options()
    req = LoadRequest(model_id="m", source="org/m", context_limit=4096, options=opts)
    wire = req.to_json()
    assert wire["options"]["extra_args"] == ["--kv-bits", "8", "--top-k", "-1"]
    assert LoadRequest.from_json(json.loads(json.dumps(wire))).options == opts
    # No options: no key (a neuron that predates them still takes the load).
    assert "options" not in LoadRequest(model_id="m", source="org/m").to_json()


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ({"num_draft_tokens": 3}, "num_draft_tokens needs a draft_model"),
        ({"draft_model": "./d", "num_draft_tokens": 99}, "num_draft_tokens must be"),
        ({"max_tokens": 0}, "max_tokens must be an integer"),
        ({"max_tokens": 600, "max_tokens_cap": 500}, "is over max_tokens_cap"),
        ({"max_tokens_cap": 9000, "context_limit": 4096}, "is over context_limit"),
        ({"chat_template_kwargs": {"tools": []}}, "the runner's own template argument"),
        ({"chat_template_kwargs": {"bad-name": 1}}, "not a template variable name"),
        ({"extra_args": ["--host", "0.0.0.0"]}, "listens on 127.0.0.1 only"),
        ({"extra_args": ["--ho=0.0.0.0"]}, "'--ho' is refused (--host"),
        ({"extra_args": ["--draft-model", "/x"]}, "use the catalogue key `draft_model`"),
        ({"extra_args": ["-h"]}, "prints help"),
        ({"extra_args": ["--port", "1"]}, "picks the runner's port"),
        ({"draft_model": "./d", "min_nodes": 2}, "single-node model"),
        ({"adapters": "org/lora"}, "adapters must be a local directory"),
        ({"kind": "embedding", "max_tokens": 5}, "applies to chat models only"),
        ({"draft_memory_gb": 1.0}, "draft_memory_gb needs a draft_model"),
    ],
)
def test_catalogue_refuses_bad_options(tmp_path: Path, entry: dict[str, Any], named: str) -> None:
    """A bad option is a config error naming the model and the key."""
    message = refused(tmp_path, **entry)
    assert "'m'" in message and named in message, message


def test_template_kwargs_must_be_json(tmp_path: Path) -> None:
    """A TOML date has no JSON form: refused at load, not in the runner."""
    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nid = "m"\nsource = "org/m"\n[models.chat_template_kwargs]\n')
    path.write_text(path.read_text() + "today = 2026-01-01\n")
    with pytest.raises(ConfigError, match="strings, numbers, booleans"):
        Catalogue.load(path)


def test_values_and_allowed_flags_pass() -> None:
    """Values (negative numbers too) and the runner's other flags are not refused."""
    RunnerOptions(
        extra_args=("--prompt-cache-bytes", "1G", "--temp", "-0.5", "--trust-remote-code")
    )


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"extra_args": ["--host=0.0.0.0"]}, "options.extra_args[0]"),
        ({"draft_model": 5}, "options.draft_model"),
        ({"chat_template_kwargs": []}, "options.chat_template_kwargs"),
        ({"bogus": 1}, "options.bogus"),
        ({"max_tokens": 9000}, "options.max_tokens"),
    ],
)
def test_load_request_checks_options(options: dict[str, Any], param: str) -> None:
    """The neuron makes the catalogue's checks again: a FieldError naming the option."""
    body = {"model_id": "m", "source": "/x", "context_limit": 4096, "options": options}
    with pytest.raises(FieldError) as info:
        LoadRequest.from_json(body)
    assert info.value.param == param


def test_group_load_takes_no_draft() -> None:
    """A rank of a multi-node group with a draft is refused (mlx_lm refuses it there)."""
    group = GroupSpec(
        group_id="g", rank=0, world_size=2, backend="ring", sharding="tensor", hosts=("a:1", "b:2")
    ).to_json()
    body = {"model_id": "m", "source": "/x", "group": group, "options": {"draft_model": "/d"}}
    with pytest.raises(FieldError, match="single-node"):
        LoadRequest.from_json(body)


def _tokenizer(dir: Path, vocab: dict[str, int]) -> Path:
    dir.mkdir(parents=True, exist_ok=True)
    (dir / "config.json").write_text("{}")
    (dir / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}}))
    return dir


def test_check_finds_missing_files_and_another_tokenizer(tmp_path: Path) -> None:
    """`cortex check`'s view: a draft with another tokenizer, adapters without weights."""
    _tokenizer(tmp_path / "main", {"a": 0, "b": 1})
    _tokenizer(tmp_path / "same", {"a": 0, "b": 1})
    _tokenizer(tmp_path / "other", {"x": 0})
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    (spec,) = catalogue(tmp_path, source="./main", draft_model="./same").models
    assert spec.option_problems() == []
    (spec,) = catalogue(tmp_path, source="./main", draft_model="./other", adapters="./lora").models
    problems = spec.option_problems()
    assert any("no adapters.safetensors" in p for p in problems), problems
    assert any("another tokenizer" in p and "1 tokens against 2" in p for p in problems)
    (spec,) = catalogue(tmp_path, source="./main", draft_model="./gone").models
    assert "does not exist" in spec.option_problems()[0]


def test_placement_counts_the_draft() -> None:
    """need = (share + draft) x 1.3 + kv + draft kv + reserve; shown in the arithmetic."""
    spec = ModelSpec(id="m", source="org/m", draft_model="org/d", draft_memory_gb=2.0)
    f = ModelFacts(
        weights_bytes=10 * GIB,
        kv_bytes=GIB,
        draft_weights_bytes=2 * GIB,
        draft_kv_bytes=GIB // 2,
    )
    (c,) = candidates(spec, f, [node("a", 64, 60)])
    (fit,) = c.fits
    want = math.ceil(12 * GIB * OVERHEAD_FACTOR) + GIB + GIB // 2 + RESERVE_BYTES
    assert fit.need_bytes == want
    assert "(share 10.00 GiB + draft 2.00 GiB) x 1.3" in fit.arithmetic(), fit.arithmetic()
    assert "draft kv 0.50 GiB" in fit.arithmetic()


def test_a_model_with_a_draft_stays_on_one_node() -> None:
    """Too big for one node: no two-node set is offered (a group takes no draft)."""
    spec = ModelSpec(id="m", source="org/m", draft_model="org/d", heads=4, kv_heads=2)
    f = ModelFacts(weights_bytes=40 * GIB, kv_bytes=0, layers=32, heads=4, kv_heads=2)
    cands = candidates(spec, f, [node("a"), node("b")])
    assert [c.nodes for c in cands] == [("a",), ("b",)]
    assert not any(c.feasible for c in cands)


def test_draft_facts_from_its_files(tmp_path: Path) -> None:
    """A local draft's weights and KV cache are read from its directory."""
    draft = tmp_path / "draft"
    draft.mkdir()
    (draft / "model.safetensors").write_bytes(b"\0" * 1000)
    config = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}
    (draft / "config.json").write_text(json.dumps(config))
    spec = ModelSpec(id="m", source="org/m", memory_gb=1.0, draft_model=str(draft))
    f = spec.facts()
    assert f.draft_weights_bytes == 1000
    assert f.draft_kv_bytes == 2 * 2 * 4 * 16 * 4096 * 2


def test_runner_flags() -> None:
    """The flags mlx_lm.server takes for each option, after the neuron's own extra_args."""
    opts = RunnerOptions(
        draft_model="/d",
        num_draft_tokens=5,
        adapters="/a",
        chat_template_kwargs={"enable_thinking": False},
        max_tokens=77,
        extra_args=("--kv-bits", "8"),
    )
    local = LocalOptions(options=opts, draft_dir=Path("/d"), adapter_dir=Path("/a"))
    config = RunnerConfig(extra_args=("--temp", "0.1"))
    argv = runner_argv(config, "m", Path("/m"), 1234, None, local)
    tail = argv[argv.index("--temp") :]
    assert tail == [
        "--temp",
        "0.1",
        "--draft-model",
        "/d",
        "--num-draft-tokens",
        "5",
        "--adapter-path",
        "/a",
        "--chat-template-args",
        '{"enable_thinking": false}',
        "--kv-bits",
        "8",
    ]
    assert argv[argv.index("--max-tokens") + 1] == "77"
    plain = runner_argv(config, "m", Path("/m"), 1234, None)
    assert plain[plain.index("--max-tokens") + 1] == str(config.max_tokens)


def test_max_tokens_default_and_cap() -> None:
    """No max_tokens: the catalogue's default; a larger ask: lowered to the cap."""
    info = ModelInfo(context_limit=4096, max_tokens=50, max_tokens_cap=200)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert finish(validate(body, "chat", info), 10, info, 512).max_tokens == 50
    asked = validate({**body, "max_tokens": 5000}, "chat", info)
    assert finish(asked, 10, info, 512).max_tokens == 200
    small = validate({**body, "max_tokens": 20}, "chat", info)
    assert finish(small, 10, info, 512).max_tokens == 20
    # A client's template variables, draft and adapters never reach the runner.
    sneaky = {**body, "chat_template_kwargs": {"x": 1}, "draft_model": "/d", "adapters": "/a"}
    out = finish(validate(sneaky, "chat", info), 10, info, 512).body
    assert not {"chat_template_kwargs", "draft_model", "adapters"} & set(out)


def test_option_error_names_the_key() -> None:
    with pytest.raises(OptionError) as info:
        RunnerOptions(max_tokens=-1)
    assert info.value.param == "max_tokens"


def test_speculative_replay() -> None:
    """bench.speculative's count of drafted tokens: leading agreements per K-token step,
    then one token of the model's own."""
    from bench.speculative import from_draft

    assert from_draft([True] * 9, 2) == 6  # steps of 2 drafted + 1 own
    assert from_draft([False] * 5, 3) == 0
    assert from_draft([True, False, True, True, True], 2) == 1 + 2


def test_cortex_check_names_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`cortex check`: an option out of bounds exits 2 naming it; a missing draft or
    adapter directory is a problem line (exit 1)."""
    from cortex.cli import main as cortex_cli

    config = tmp_path / "cortex.toml"
    config.write_text('catalogue = "models.toml"\n')
    models = tmp_path / "models.toml"
    bad = {"id": "m", "source": "org/m", "extra_args": ["--host", "0.0.0.0"]}
    models.write_text(tomli_w.dumps({"models": [bad]}))
    assert cortex_cli.main(["check", "-c", str(config)]) == 2
    assert "extra_args[0] '--host' is refused" in capsys.readouterr().err
    missing = {"id": "m", "source": "org/m", "draft_model": "./gone", "adapters": "./lora"}
    models.write_text(tomli_w.dumps({"models": [missing]}))
    assert cortex_cli.main(["check", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert "draft_model" in err and "does not exist" in err and "is not a directory" in err
