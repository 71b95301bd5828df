"""The embedding runner: `python -m neuron.runner.embed_main --model DIR --port P`.

What `mlx_lm.server` is to chat models, this is to encoders (catalogue
`kind = "embedding"`): a loopback HTTP server the neuron starts, probes and
proxies to. It has the chat runner's guards (neuron.runner.main: it never
outlives its neuron) and its contract with the supervisor: GET /health answers
200 while it can serve and 503 once its compute thread is gone; a warmup is one
real request.

POST /v1/embeddings takes OpenAI's body (neuron.runner.embed_request). The
model (neuron.runner.encoder) runs in one thread, so the event loop keeps
answering /health while a batch computes. Requests are batched: whatever has
queued while a batch ran goes into the next one together, up to
`--max-batch-tokens`; inside a batch, inputs are sorted by length and cut into
padded micro-batches within that budget, each of lengths within PAD_RATIO of
one another, so padding stays small. A request
whose client left before its batch starts is dropped from it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import concurrent.futures
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
from aiohttp import web

from neuron.runner.embed_request import EmbedLimits, EmbedRequest, answer, parse, token_ids
from neuron.runner.main import MODEL_ID_FLAG, set_parent_death_signal, start_watchdog
from shared.errors import ServiceUnavailable, error_middleware, read_json_object

log = logging.getLogger("neuron.embed_runner")

DEFAULT_BATCH_TOKENS = 8192
# Inputs batched together differ in length by at most this factor (padding costs).
PAD_RATIO = 1.25
# The neuron bounds bodies itself; this only keeps a stray client from filling memory.
MAX_BODY_BYTES = 64 * 1024 * 1024
# Strings up to this many characters in all are tokenized on the event loop.
INLINE_CHARS = 2048
# Answers of up to this many numbers are written as JSON on the event loop.
INLINE_NUMBERS = 16384


def micro_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of inputs grouped for padded batches: shortest first, each group's
    padded size (count x longest) within `budget` tokens (a longer input goes alone),
    and its longest at most PAD_RATIO times its shortest (padding is work thrown away)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (
            (len(current) + 1) * lengths[i] > budget or lengths[i] > PAD_RATIO * lengths[current[0]]
        ):
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


@attrs.define(eq=False)
class _Job:
    seqs: list[tuple[int, ...]]
    done: asyncio.Future[np.ndarray[Any, Any]]

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.seqs)


@attrs.define
class Batcher:
    """One compute thread; requests that queue while it works go in its next batch."""

    # Token sequences -> float32 unit vectors (rows x dims); blocking.
    embed_fn: Callable[[list[tuple[int, ...]]], np.ndarray[Any, Any]]
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS
    # Why the compute loop ended, once it has (GET /health then answers 503).
    dead: str | None = None
    _pending: collections.deque[_Job] = attrs.Factory(collections.deque)
    _wake: asyncio.Event = attrs.Factory(asyncio.Event)
    _pool: concurrent.futures.ThreadPoolExecutor = attrs.Factory(
        lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embed")
    )

    async def embed(self, seqs: list[tuple[int, ...]]) -> np.ndarray[Any, Any]:
        if self.dead is not None:
            raise ServiceUnavailable(f"embedding runner broken: {self.dead}")
        job = _Job(seqs, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._wake.set()
        return await job.done

    def _next_batch(self) -> list[_Job]:
        """Queued jobs up to the token budget (at least one), oldest first."""
        jobs: list[_Job] = []
        tokens = 0
        while self._pending:
            job = self._pending[0]
            if jobs and tokens + job.tokens > self.max_batch_tokens:
                break
            self._pending.popleft()
            if not job.done.done():  # its client left while it waited
                jobs.append(job)
                tokens += job.tokens
        return jobs

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        jobs: list[_Job] = []
        try:
            while True:
                if not self._pending:
                    self._wake.clear()
                    await self._wake.wait()
                jobs = self._next_batch()
                if not jobs:
                    continue
                seqs = [s for j in jobs for s in j.seqs]
                try:
                    vectors = await loop.run_in_executor(self._pool, self.embed_fn, seqs)
                except Exception as exc:  # one batch's failure: its requests get a 500
                    log.exception("embedding batch of %d inputs failed", len(seqs))
                    for j in jobs:
                        if not j.done.done():
                            j.done.set_exception(exc)
                    continue
                start = 0
                for j in jobs:
                    if not j.done.done():
                        j.done.set_result(vectors[start : start + len(j.seqs)])
                    start += len(j.seqs)
        except BaseException as exc:
            self.dead = repr(exc)
            for j in [*jobs, *self._pending]:  # the batch under way too
                if not j.done.done():
                    j.done.set_exception(ServiceUnavailable("embedding runner stopping"))
            raise
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)


@attrs.define
class Runner:
    """The loaded model: tokenizer, limits, and the batcher in front of the encoder."""

    tokenizer: Any  # tokenizers.Tokenizer (no stubs)
    limits: EmbedLimits
    batcher: Batcher

    async def serve(self, request: EmbedRequest, model: str) -> dict[str, Any]:
        if sum(len(t) for t in request.texts()) <= INLINE_CHARS:
            ids = token_ids(request, self.tokenizer, self.limits)
        else:
            ids = await asyncio.to_thread(token_ids, request, self.tokenizer, self.limits)
        vectors = await self.batcher.embed(ids)
        encoded: list[Any]
        if request.encoding_format == "base64":
            little = vectors.astype("<f4")
            encoded = [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
        else:
            encoded = vectors.tolist()
        return answer(model, encoded, sum(len(t) for t in ids))


RUNNER = web.AppKey("runner", Runner)


async def _embeddings(request: web.Request) -> web.Response:
    runner = request.app[RUNNER]
    body = await read_json_object(request)
    checked = parse(body, runner.limits)
    model = body.get("model")
    out = await runner.serve(checked, model if isinstance(model, str) else "default_model")
    if len(checked.inputs) * runner.limits.dimensions <= INLINE_NUMBERS:
        return web.json_response(out)
    # Off the loop: floats for 2048 inputs of 1024 dimensions take seconds to write,
    # and /health must keep answering meanwhile.
    text = await asyncio.to_thread(json.dumps, out)
    return web.Response(text=text, content_type="application/json")


async def _health(request: web.Request) -> web.Response:
    dead = request.app[RUNNER].batcher.dead
    if dead is not None:
        return web.json_response({"status": "dead", "error": dead}, status=503)
    return web.json_response({"status": "ok"})


async def _models(request: web.Request) -> web.Response:
    limits = request.app[RUNNER].limits
    entry = {"id": "default_model", "object": "model", "dimensions": limits.dimensions}
    return web.json_response({"object": "list", "data": [entry]})


def create_app(runner: Runner) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES)
    app[RUNNER] = runner

    async def batching(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(runner.batcher.run(), name="embed batcher")
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    app.cleanup_ctx.append(batching)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/models", _models)
    return app


def load_runner(model_dir: Path, max_input_tokens: int | None, max_batch_tokens: int) -> Runner:
    """Read the model, its tokenizer and limits (blocking: seconds for a big model)."""
    from tokenizers import Tokenizer

    from neuron.runner.encoder import embed, load_encoder, pooling_of

    model = load_encoder(model_dir)
    how = pooling_of(model_dir)
    c = model.config
    limit = c.max_tokens if max_input_tokens is None else min(c.max_tokens, max_input_tokens)
    limits = EmbedLimits(dimensions=c.hidden_size, vocab_size=c.vocab_size, max_tokens=limit)

    def embed_fn(seqs: list[tuple[int, ...]]) -> np.ndarray[Any, Any]:
        out = np.empty((len(seqs), c.hidden_size), dtype=np.float32)
        for group in micro_batches([len(s) for s in seqs], max_batch_tokens):
            out[group] = np.asarray(embed(model, [seqs[i] for i in group], how))
        return out

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    log.info(
        "%s: %s pooling, %d dimensions, %d tokens per input", model_dir, how, c.hidden_size, limit
    )
    return Runner(tokenizer=tokenizer, limits=limits, batcher=Batcher(embed_fn, max_batch_tokens))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neuron.runner.embed_main")
    p.add_argument(MODEL_ID_FLAG, help="the model's id (a marker for operators; unused)")
    p.add_argument("--model", type=Path, required=True, help="the model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS)
    p.add_argument("--max-input-tokens", type=int, help="tokens per input (default: the model's)")
    p.add_argument("--log-level", default="WARNING")
    return p


def main(argv: list[str] | None = None) -> None:
    set_parent_death_signal()
    start_watchdog()
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    runner = load_runner(args.model, args.max_input_tokens, max(1, args.max_batch_tokens))
    web.run_app(
        create_app(runner),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        handler_cancellation=True,
    )


if __name__ == "__main__":
    main()
