"""Per-model runner options end to end: catalogue -> cortex's load -> neuron -> a real
mlx_lm.server runner on the demo model, each option shown taking effect.

One fleet for the module (a neuron and cortex, three runners kept loaded):
  plain    the demo model with a chat template that reads a `preamble` variable
  tuned    the same files with adapters, chat_template_kwargs, max_tokens 5 / cap 9,
           context_limit 256 and extra_args
  drafted  the demo model drafting for itself with a second seed (speculative decoding)
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from neuron.store.demo_model import CHAT_TEMPLATE, build_demo_model
from tests.conftest import NeuronProcess, http_json, runner_pids, stop_quietly
from tests.e2e.conftest import CortexProcess

# The demo model's end-of-text token banned: an answer runs to its max_tokens.
NO_EOS = {"logit_bias": {"1": -100}}
PREAMBLE = "The fox jumps over the lazy dog. A fleet of small machines serves a model."
LORA_RANK = 4


def build_lora(model_dir: Path, out: Path, seed: int = 7) -> Path:
    """A LoRA adapter for the demo model in mlx_lm.tuner's format (adapter_config.json
    + adapters.safetensors); its B matrices random, not zero, so it changes answers."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    lora = {"rank": LORA_RANK, "scale": 20.0, "dropout": 0.0}
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora}
    model = load(str(model_dir))[0]
    linear_to_lora_layers(model, 2, lora)
    mx.random.seed(seed)
    flat: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    weights = {
        name: (mx.random.normal(value.shape) * 0.5 if name.endswith("lora_b") else value)
        for name, value in flat
        if name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")
    }
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def templated_copy(demo: Path, out: Path) -> Path:
    """The demo model whose chat template renders a `preamble` variable when given one."""
    shutil.copytree(demo, out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{% if preamble is defined %}{{ preamble }}{% endif %}" + CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    return out


@attrs.frozen
class Fleet:
    neuron: NeuronProcess
    cortex: CortexProcess

    def chat(self, model: str, text: str, **extra: Any) -> tuple[int, Any]:
        body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
        return http_json(self.cortex.url + "/v1/chat/completions", body, timeout=60)

    def complete(self, model: str, prompt: str, **extra: Any) -> tuple[int, Any]:
        body = {"model": model, "prompt": prompt, **extra}
        return http_json(self.cortex.url + "/v1/completions", body, timeout=60)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Fleet]:
    t0 = time.monotonic()
    root = tmp_path_factory.mktemp("runner-options")
    templated = templated_copy(demo_model, root / "templated")
    lora = build_lora(templated, root / "lora")
    draft = build_demo_model(root / "draft", seed=1)
    neuron = NeuronProcess.start(root / "neuron")
    models = [
        {"id": "plain", "source": str(templated), "keep_loaded": True},
        {
            "id": "tuned",
            "source": str(templated),
            "keep_loaded": True,
            "adapters": str(lora),
            "chat_template_kwargs": {"preamble": PREAMBLE},
            "max_tokens": 5,
            "max_tokens_cap": 9,
            "context_limit": 256,
            "extra_args": ["--prompt-cache-bytes", "64M"],
        },
        {
            "id": "drafted",
            "source": str(demo_model),
            "keep_loaded": True,
            "draft_model": str(draft),
            "num_draft_tokens": 2,
        },
    ]
    cortex = CortexProcess.write(root / "cortex", [("n1", neuron)], models).start()
    try:
        for model_id in ("plain", "tuned", "drafted"):
            neuron.wait_state(model_id, "ready")
        print(f"fleet of 3 runners ready in {time.monotonic() - t0:.1f} s")
        yield Fleet(neuron=neuron, cortex=cortex)
    finally:
        cortex.stop()
        stop_quietly(neuron)


def cmdline(model_id: str) -> list[str]:
    (pid,) = runner_pids(model_id)
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_extra_args_reach_the_runner(fleet: Fleet) -> None:
    """The model's extra_args and option flags are on its runner's command line only."""
    argv = cmdline("tuned")
    print("tuned runner:", " ".join(argv[argv.index("--log-level") :]))
    i = argv.index("--prompt-cache-bytes")
    assert argv[i + 1] == "64M"
    assert "--adapter-path" in argv and "--chat-template-args" in argv
    assert argv[argv.index("--max-tokens") + 1] == "5"
    plain = cmdline("plain")
    assert "--prompt-cache-bytes" not in plain and "--adapter-path" not in plain


def test_max_tokens_default_and_cap(fleet: Fleet) -> None:
    """No max_tokens: the catalogue's 5; asking 1000: lowered to the cap of 9."""
    status, body = fleet.chat("tuned", "hello", **NO_EOS)
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 5, body["usage"]
    status, body = fleet.chat("tuned", "hello", max_tokens=1000, **NO_EOS)
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 9, body["usage"]
    assert body["choices"][0]["finish_reason"] == "length"
    # A model without options keeps the neuron's default (512): 20 asked, 20 given.
    status, body = fleet.chat("plain", "hello", max_tokens=20, **NO_EOS)
    assert body["usage"]["completion_tokens"] == 20, body


def test_chat_template_kwargs_reach_the_template(fleet: Fleet) -> None:
    """The catalogue's preamble is rendered into tuned's prompt (the runner counts it);
    a client's own chat_template_kwargs change nothing."""
    _, plain = fleet.chat("plain", "hello", max_tokens=1)
    _, tuned = fleet.chat("tuned", "hello", max_tokens=1)
    _, client = fleet.chat("tuned", "hello", max_tokens=1, chat_template_kwargs={"preamble": ""})
    p, t, c = (b["usage"]["prompt_tokens"] for b in (plain, tuned, client))
    print(f"prompt tokens: plain {p}, tuned {t} (with the preamble), client-overridden {c}")
    assert t > p + 10
    assert c == t


def test_context_limit_refuses_a_long_prompt(fleet: Fleet) -> None:
    """tuned's context_limit of 256 refuses a prompt plain (4096 from config) takes."""
    long = " ".join(["fleet"] * 400)
    status, body = fleet.chat("tuned", long)
    assert status == 400, body
    assert body["error"]["code"] == "invalid_request"
    assert body["error"]["param"] == "messages"
    assert "256" in body["error"]["message"], body
    status, body = fleet.chat("plain", long, max_tokens=1)
    assert status == 200, body


def test_adapters_change_the_answer(fleet: Fleet) -> None:
    """Greedy completions (no chat template) of one prompt: plain twice the same,
    tuned (with the LoRA adapter) another."""
    args = {"temperature": 0.0, "max_tokens": 8, **NO_EOS}
    answers = [
        fleet.complete(m, "Once upon a time", **args)[1]["choices"][0]["text"]
        for m in ("plain", "plain", "tuned")
    ]
    print("greedy answers (plain, plain, tuned):", answers)
    assert answers[0] == answers[1]
    assert answers[2] != answers[0]


def test_draft_model_answers(fleet: Fleet) -> None:
    """A runner with a draft model (speculative decoding) answers, streamed and not."""
    argv = cmdline("drafted")
    assert argv[argv.index("--num-draft-tokens") + 1] == "2"
    assert "--draft-model" in argv
    t0 = time.monotonic()
    status, body = fleet.chat("drafted", "hello", max_tokens=24, **NO_EOS)
    seconds = time.monotonic() - t0
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 24
    print(f"drafted: 24 tokens in {seconds:.2f} s")


def test_neuron_refuses_bad_draft_and_adapters(fleet: Fleet, tmp_path: Path) -> None:
    """At load: a path outside the roots is 400 naming the option; a draft with another
    tokenizer fails the load before any runner starts, saying why."""
    n = fleet.neuron
    source = fleet_source(n, "plain")
    load = {"model_id": "bad", "source": source, "options": {"adapters": "/etc"}}
    status, body = n.post("/models/load", load)
    assert status == 400, body
    assert body["error"]["param"] == "options.adapters", body
    other = tmp_path / "other-tokenizer"
    shutil.copytree(source, other)
    (other / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"x": 0}}}))
    load = {"model_id": "bad-draft", "source": source, "options": {"draft_model": str(other)}}
    status, body = n.post("/models/load", load)
    assert status == 202, body
    failed = n.wait_state("bad-draft", "failed", timeout=30)
    assert "another tokenizer" in failed["error"], failed
    n.post("/models/unload", {"model_id": "bad-draft"})


def fleet_source(n: NeuronProcess, model_id: str) -> str:
    m = n.model(model_id)
    assert m is not None
    return str(m["source"])
