"""POST /v1/embeddings on a neuron: the request checks, the encoder, and a real runner.

The demo encoder (random weights) is served by a real embedding runner under a
real `neuron serve`; vectors are checked for shape, unit length, determinism
and batching, not meaning. The encoder itself is checked against a numpy BERT
forward pass written here from the model's definition, on the same weights.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from openai import AsyncOpenAI, BadRequestError, NotFoundError
from safetensors.numpy import load_file

from neuron.runner.embed_main import INLINE_NUMBERS, PAD_RATIO, Batcher, micro_batches
from neuron.runner.embed_request import MAX_INPUTS, EmbedLimits, parse, token_ids
from neuron.store.demo_encoder import DEMO_DIMENSIONS, build_demo_encoder
from shared.assemble import WHOLE_PARSE_BYTES, answer_usage
from shared.errors import InvalidRequest
from tests.conftest import NeuronProcess, http_json, kill_pid, stop_quietly

# Unique: other test sessions on this machine may run runners for these ids too.
EMBED = f"embed-{uuid.uuid4().hex[:8]}"
CHAT = f"chat-{uuid.uuid4().hex[:8]}"
LIMITS = EmbedLimits(dimensions=8, vocab_size=100, max_tokens=16)
Array = np.ndarray[Any, Any]


# --- the request, as data ---------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "inputs"),
    [
        ("hello", ("hello",)),
        (["a", "b"], ("a", "b")),
        ([1, 2, 3], ((1, 2, 3),)),
        ([[1, 2], [3]], ((1, 2), (3,))),
        (["a", [4, 5]], ("a", (4, 5))),
    ],
)
def test_input_takes_openais_four_shapes(given: Any, inputs: tuple[Any, ...]) -> None:
    """A string, strings, a token array or token arrays: each input kept in order."""
    assert parse({"input": given}, LIMITS).inputs == inputs


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": [1.5]}, "input"),
        ({"input": [None]}, "input"),
        ({"input": {"text": "a"}}, "input"),
        ({"input": [100]}, "input"),  # out of the vocabulary
        ({"input": [-1]}, "input"),
        ({"input": [True]}, "input"),
        ({"input": list(range(17))}, "input"),  # over max_tokens
        ({"input": ["x"] * (MAX_INPUTS + 1)}, "input"),
        ({"input": "x" * 1000}, "input"),  # far over max_tokens, refused untokenized
        ({"input": "\ud800"}, "input"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "a", "dimensions": 4}, "dimensions"),
        ({"input": "a", "dimensions": "8"}, "dimensions"),
        ({"input": "a", "user": 3}, "user"),
    ],
)
def test_bad_fields_are_400_naming_them(body: dict[str, Any], param: str) -> None:
    """Each bad field is InvalidRequest naming it, before any runner work."""
    with pytest.raises(InvalidRequest) as caught:
        parse(body, LIMITS)
    assert caught.value.param == param, caught.value.message


def test_dimensions_equal_to_the_models_and_extras_are_accepted() -> None:
    """`dimensions` may name the model's own size; unknown fields are dropped."""
    req = parse({"input": "a", "dimensions": 8, "encoding_format": "base64", "x": 1}, LIMITS)
    assert req.encoding_format == "base64"


def test_limits_come_from_the_config_and_the_catalogue_only_lowers_them() -> None:
    """Tokens per input: max positions (less RoBERTa's offset), capped by the catalogue."""
    bert = {"model_type": "bert", "hidden_size": 8, "vocab_size": 9, "max_position_embeddings": 512}
    assert EmbedLimits.from_config(bert).max_tokens == 512
    assert EmbedLimits.from_config(bert, 4096).max_tokens == 512
    assert EmbedLimits.from_config(bert, 128).max_tokens == 128
    roberta = {
        **bert,
        "model_type": "xlm-roberta",
        "pad_token_id": 1,
        "max_position_embeddings": 514,
    }
    assert EmbedLimits.from_config(roberta).max_tokens == 512
    with pytest.raises(ValueError, match="hidden_size"):
        EmbedLimits.from_config({"model_type": "bert"})


def test_micro_batches_stay_within_the_padded_budget() -> None:
    """Shortest first; count x longest within the budget; a longer input goes alone;
    lengths within a group differ by at most PAD_RATIO."""
    lengths = [50, 10, 90, 30, 30, 200, 11, 12, 12, 60]
    groups = micro_batches(lengths, 100)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        sizes = [lengths[i] for i in g]
        assert len(g) == 1 or len(g) * max(sizes) <= 100
        assert max(sizes) <= PAD_RATIO * min(sizes)
    assert groups == [[1, 6, 7, 8], [3, 4], [0], [9], [2], [5]]  # 2 x 60 > 100


class _Compute:
    """The batcher's compute: row i of a batch is [batch number, i]; records batch sizes."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[int] = []
        self.fail_on = fail_on

    def __call__(self, seqs: list[tuple[int, ...]]) -> np.ndarray[Any, Any]:
        self.batches.append(len(seqs))
        if len(self.batches) == self.fail_on:
            raise RuntimeError("batch failed")
        return np.array([[len(self.batches), i] for i in range(len(seqs))], dtype=np.float32)


async def test_requests_that_queue_together_share_one_batch() -> None:
    """Queued while the compute was busy: one batch, each request its own rows, in order."""
    compute = _Compute()
    batcher = Batcher(compute, max_batch_tokens=1000)
    jobs = [asyncio.ensure_future(batcher.embed([(1, 2)] * (i + 1))) for i in range(4)]
    await asyncio.sleep(0)  # every request queued before the loop looks
    loop = asyncio.create_task(batcher.run())
    try:
        results = await asyncio.gather(*jobs)
    finally:
        loop.cancel()
    assert compute.batches == [1 + 2 + 3 + 4]
    assert [r[:, 1].tolist() for r in results] == [[0], [1, 2], [3, 4, 5], [6, 7, 8, 9]]


async def test_the_token_budget_splits_batches_and_a_failure_stays_in_its_batch() -> None:
    """Over the budget, the rest waits for the next batch; a failed batch fails only its
    requests; a request whose client left is dropped before its batch."""
    compute = _Compute(fail_on=1)
    batcher = Batcher(compute, max_batch_tokens=4)
    first, second, third = (asyncio.ensure_future(batcher.embed([(1, 2)])) for _ in range(3))
    gone = asyncio.ensure_future(batcher.embed([(9,)]))
    await asyncio.sleep(0)
    gone.cancel()
    loop = asyncio.create_task(batcher.run())
    try:
        with pytest.raises(RuntimeError, match="batch failed"):
            await first
        with pytest.raises(RuntimeError, match="batch failed"):
            await second
        assert (await third).tolist() == [[2.0, 0.0]]
    finally:
        loop.cancel()
    assert compute.batches == [2, 1]  # 2 + 2 tokens, then 2 (the 1-token one was gone)


# --- the encoder --------------------------------------------------------------------


def test_demo_encoder_is_deterministic(tmp_path: Path, demo_encoder: Path) -> None:
    """The same seed writes byte-identical files (the tokenizer's vocabulary included)."""
    again = build_demo_encoder(tmp_path / "again")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (demo_encoder / name).read_bytes(), name


def test_the_cli_writes_it_and_never_over_other_files(tmp_path: Path) -> None:
    """`neuron demo-encoder DIR` writes the encoder (again over itself), never over a
    directory that holds something else."""
    neuron = [sys.executable, "-m", "neuron.cli", "demo-encoder"]
    for _ in range(2):
        done = subprocess.run([*neuron, str(tmp_path / "enc")], capture_output=True, text=True)
        assert done.returncode == 0 and "written to" in done.stdout, done.stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    done = subprocess.run([*neuron, str(tmp_path / "mine")], capture_output=True, text=True)
    assert done.returncode == 2 and "is not a demo encoder" in done.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_strings_get_the_tokenizers_special_tokens(demo_encoder: Path) -> None:
    """[CLS] text [SEP] for strings; token arrays are taken as they are."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(demo_encoder / "tokenizer.json"))
    limits = EmbedLimits.load(demo_encoder)
    ids = token_ids(parse({"input": ["hello world", [7, 8]]}, limits), tok, limits)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    assert ids[0][0] == cls and ids[0][-1] == sep and len(ids[0]) == 4
    assert ids[1] == (7, 8)
    with pytest.raises(InvalidRequest, match=r"\[0\] has \d+ tokens; the model takes at most 8"):
        small = EmbedLimits(limits.dimensions, limits.vocab_size, 8)
        token_ids(parse({"input": ["one two three four five six seven", "a"]}, small), tok, small)


def _layer_norm(x: Array, weight: Array, bias: Array, eps: float) -> Array:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    out: Array = (x - mean) / np.sqrt(var + eps) * weight + bias
    return out


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _bert_reference(model_dir: Path, batch: list[list[int]]) -> Array:
    """BERT's forward pass in float64 numpy, from the definition (Devlin et al.; the
    transformers parameter names), then the masked mean over real tokens, L2-normalised."""
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "bert" and config["hidden_act"] == "gelu"
    w = {
        k: v.astype(np.float64) for k, v in load_file(str(model_dir / "model.safetensors")).items()
    }
    eps, heads = config["layer_norm_eps"], config["num_attention_heads"]

    def dense(x: Array, name: str) -> Array:  # torch's Linear: weight is (out, in)
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    def norm(x: Array, name: str) -> Array:
        return _layer_norm(x, w[f"{name}.weight"], w[f"{name}.bias"], eps)

    rows, length = len(batch), max(map(len, batch))
    ids = np.array([b + [config["pad_token_id"]] * (length - len(b)) for b in batch])
    real = np.array([[True] * len(b) + [False] * (length - len(b)) for b in batch])
    token_types = np.zeros_like(ids)

    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][np.arange(length)][None]
        + w["embeddings.token_type_embeddings.weight"][token_types]
    )
    x = norm(x, "embeddings.LayerNorm")
    hidden = x.shape[-1]
    head = hidden // heads
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}"

        def per_head(t: Array) -> Array:  # (rows, length, hidden) -> (rows, heads, length, head)
            return t.reshape(rows, length, heads, head).swapaxes(1, 2)

        q = per_head(dense(x, f"{p}.attention.self.query"))
        k = per_head(dense(x, f"{p}.attention.self.key"))
        v = per_head(dense(x, f"{p}.attention.self.value"))
        scores = q @ k.swapaxes(-1, -2) / math.sqrt(head)
        scores = np.where(real[:, None, None, :], scores, -np.inf)  # no attending to padding
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        context = (weights @ v).swapaxes(1, 2).reshape(rows, length, hidden)
        attended = norm(
            dense(context, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm"
        )
        inner = dense(attended, f"{p}.intermediate.dense")
        inner = 0.5 * inner * (1.0 + _erf(inner / math.sqrt(2.0)))  # exact GELU
        x = norm(dense(inner, f"{p}.output.dense") + attended, f"{p}.output.LayerNorm")

    mean = (x * real[..., None]).sum(axis=1) / real.sum(axis=1, keepdims=True)
    unit: Array = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
    return unit


def test_encoder_matches_a_numpy_bert_reference(demo_encoder: Path) -> None:
    """Mean-pooled vectors equal an independent numpy BERT's on the same weights and ids,
    inputs of different lengths padded together."""
    from neuron.runner.encoder import embed, load_encoder

    batch = [[2, 40, 41, 3], [2, 50, 51, 52, 53, 54, 3], [2, 3]]
    want = _bert_reference(demo_encoder, batch)
    got = np.asarray(embed(load_encoder(demo_encoder), batch, "mean"))
    assert got.shape == want.shape == (len(batch), DEMO_DIMENSIONS)
    # float32 against float64 differs by about 1e-7 here; tanh-approximated GELU for
    # erf, or LayerNorm's eps at 1e-5 for the config's, would differ by 3e-5 and 4e-6.
    assert np.abs(got - want).max() < 1e-6


# --- a real neuron and runner ---------------------------------------------------------


@pytest.fixture(scope="module")
def neuron(
    tmp_path_factory: pytest.TempPathFactory, demo_encoder: Path, demo_model: Path
) -> Iterator[NeuronProcess]:
    """One neuron: the encoder from its [[load]] (kind "embedding"), a chat model by POST."""
    load = [{"model_id": EMBED, "source": str(demo_encoder), "kind": "embedding"}]
    n = NeuronProcess.start(tmp_path_factory.mktemp("neuron-embed"), {"load": load})
    try:
        n.wait_state(EMBED, "ready")
        n.load_ready(CHAT, demo_model)
        yield n
    finally:
        stop_quietly(n)


def client(n: NeuronProcess) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=n.url + "/v1", api_key="unused", max_retries=0)


def vectors(answer: Any) -> np.ndarray[Any, Any]:
    assert [d.index for d in answer.data] == list(range(len(answer.data)))
    return np.array([d.embedding for d in answer.data], dtype=np.float64)


def embed_runner_pids(model_id: str) -> list[int]:
    marker = ["-m", "neuron.runner.embed_main", "--neuron-model-id", model_id]
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(argv[i : i + len(marker)] == marker for i in range(len(argv))):
            pids.append(int(entry.name))
    return pids


async def test_vectors_have_the_models_shape_and_unit_length(neuron: NeuronProcess) -> None:
    """n inputs give n vectors of the model's size, each of length 1, with usage counted."""
    async with client(neuron) as c:
        r = await c.embeddings.create(model=EMBED, input=["hello world", "a fleet", "x"])
    v = vectors(r)
    assert v.shape == (3, DEMO_DIMENSIONS)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert r.model == EMBED and r.object == "list"
    assert r.usage.prompt_tokens == r.usage.total_tokens >= 3 * 3  # [CLS] x [SEP] at least


async def test_same_input_same_vector_bit_for_bit(neuron: NeuronProcess) -> None:
    """Asked twice, as floats or as base64, one input gives the same bits."""
    async with client(neuron) as c:
        first = await c.embeddings.create(model=EMBED, input="the quick brown fox")
        second = await c.embeddings.create(model=EMBED, input="the quick brown fox")
        floats = await c.embeddings.create(
            model=EMBED, input="the quick brown fox", encoding_format="float"
        )
    assert first.data[0].embedding == second.data[0].embedding
    # The SDK asks for base64 unless told otherwise; float32 either way.
    as_base64 = np.array(first.data[0].embedding, dtype=np.float32)
    assert np.array_equal(as_base64, np.array(floats.data[0].embedding, dtype=np.float32))


async def test_a_batch_equals_its_inputs_one_by_one(neuron: NeuronProcess) -> None:
    """Many inputs of mixed lengths in one call: in order, each as if sent alone."""
    texts = [
        " ".join(["fox", "dog", "world"][i % 3] for _ in range(1 + i % 40)) for i in range(200)
    ]
    async with client(neuron) as c:
        batch = vectors(await c.embeddings.create(model=EMBED, input=texts))
        alone = [
            vectors(await c.embeddings.create(model=EMBED, input=texts[i]))[0]
            for i in (0, 1, 39, 199)
        ]
    assert batch.shape == (200, DEMO_DIMENSIONS)
    for i, v in zip((0, 1, 39, 199), alone, strict=True):
        assert np.abs(batch[i] - v).max() < 1e-5, i


async def test_a_big_answer_in_floats(neuron: NeuronProcess) -> None:
    """A thousand vectors as JSON floats (written off the runner's loop), in order."""
    texts = [f"fox {i}" for i in range(1000)]
    async with client(neuron) as c:
        r = await c.embeddings.create(model=EMBED, input=texts, encoding_format="float")
        last = await c.embeddings.create(model=EMBED, input=texts[-1], encoding_format="float")
    v = vectors(r)
    assert v.shape == (1000, DEMO_DIMENSIONS) and v.shape[0] * v.shape[1] > INLINE_NUMBERS
    assert np.abs(v[-1] - vectors(last)[0]).max() < 1e-5


async def test_concurrent_requests_are_batched_and_each_gets_its_own(
    neuron: NeuronProcess,
) -> None:
    """Requests that queue together share the runner's batches; each answer is its own."""
    texts = [f"hello {'world ' * i}" for i in range(12)]
    async with client(neuron) as c:
        alone = [vectors(await c.embeddings.create(model=EMBED, input=t))[0] for t in texts]
        together = await asyncio.gather(*(c.embeddings.create(model=EMBED, input=t) for t in texts))
    for want, got in zip(alone, together, strict=True):
        assert np.abs(vectors(got)[0] - want).max() < 1e-5


async def test_token_arrays_and_base64_on_the_wire(neuron: NeuronProcess) -> None:
    """Token ids are embedded as given; base64 is little-endian float32."""
    body = {"model": EMBED, "input": [[2, 40, 3], "hello"], "encoding_format": "base64"}
    status, answer = http_json(neuron.url + "/v1/embeddings", body)
    assert status == 200, answer
    raw = [base64.b64decode(d["embedding"]) for d in answer["data"]]
    assert [len(b) for b in raw] == [4 * DEMO_DIMENSIONS] * 2
    v = np.frombuffer(raw[0], dtype="<f4")
    assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-5
    assert answer["usage"]["prompt_tokens"] == 3 + 3  # [CLS] hello [SEP]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": []}, "input"),
        ({"input": [0.5]}, "input"),
        ({"input": "word " * 600}, "input"),  # over the encoder's 512 tokens
        ({"input": "a", "dimensions": 3}, "dimensions"),
        ({"input": "a", "encoding_format": "binary"}, "encoding_format"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "input"),
    ],
)
def test_bad_requests_are_400_naming_the_field(
    neuron: NeuronProcess, body: dict[str, Any], param: str
) -> None:
    """The neuron refuses them in our envelope, the field named."""
    status, answer = http_json(neuron.url + "/v1/embeddings", {"model": EMBED, **body})
    assert status == 400, answer
    assert answer["error"]["code"] == "invalid_request"
    assert answer["error"]["param"] == param, answer


async def test_a_model_asked_for_the_other_kinds_work_is_400(neuron: NeuronProcess) -> None:
    """Chat on the encoder and embeddings on the chat model: 400 naming the model and kind."""
    async with client(neuron) as c:
        with pytest.raises(BadRequestError) as chat:
            await c.chat.completions.create(
                model=EMBED, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        with pytest.raises(BadRequestError) as embed:
            await c.embeddings.create(model=CHAT, input="hi")
        with pytest.raises(NotFoundError):
            await c.embeddings.create(model="no-such-model", input="hi")
    assert "embedding model" in chat.value.message and chat.value.body["param"] == "model"  # type: ignore[index]
    assert "kind 'chat'" in embed.value.message


def test_models_show_the_kind_and_metrics_count_requests(neuron: NeuronProcess) -> None:
    """/v1/models says which kind each model is; requests and tokens are counted."""
    _, listing = neuron.get("/v1/models")
    kinds = {m["id"]: m["kind"] for m in listing["data"]}
    assert kinds[EMBED] == "embedding" and kinds[CHAT] == "chat"
    http_json(neuron.url + "/v1/embeddings", {"model": EMBED, "input": "count me"})
    with urllib.request.urlopen(neuron.url + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert f'neuron_requests_total{{model="{EMBED}",outcome="ok"}}' in metrics
    assert f'neuron_tokens_total{{kind="prompt",model="{EMBED}"}}' in metrics


def test_a_killed_runner_is_restarted_and_serves_again(neuron: NeuronProcess) -> None:
    """The embedding runner is supervised as a chat runner is: killed, it comes back."""
    (pid,) = embed_runner_pids(EMBED)
    kill_pid(pid)
    neuron.wait_state(EMBED, "recovering", "loading", "warming")
    model = neuron.wait_state(EMBED, "ready")
    assert model["restarts"] >= 1
    assert embed_runner_pids(EMBED) != [pid]
    status, answer = http_json(neuron.url + "/v1/embeddings", {"model": EMBED, "input": "back"})
    assert status == 200 and len(answer["data"][0]["embedding"]) == DEMO_DIMENSIONS


def test_usage_is_read_from_a_big_answers_tail() -> None:
    """A big one-piece answer's usage is found without parsing its body; a small one's too."""
    rows = [{"object": "embedding", "index": i, "embedding": [0.5] * 64} for i in range(400)]
    big = json.dumps({"data": rows, "usage": {"prompt_tokens": 7, "total_tokens": 7}}).encode()
    assert len(big) > WHOLE_PARSE_BYTES
    assert answer_usage(big) == {"prompt_tokens": 7, "total_tokens": 7}
    assert answer_usage(b'{"usage": {"prompt_tokens": 1}}') == {"prompt_tokens": 1}
    assert answer_usage(b"not json") is None and answer_usage(b"[1]") is None
    cut = big[: -len(b'7, "total_tokens": 7}}')]  # the tail unreadable: no usage, no error
    assert answer_usage(cut) is None
