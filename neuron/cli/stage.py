"""`neuron stage`: stage a model's weights on a running neuron and follow the job.

Blocking stdlib HTTP (urllib): a CLI with one request at a time needs no event
loop, and a Ctrl-C lands between two polls, where the cancel is sent.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, TextIO

import attrs

from shared.progress import StageProgress, duration, size

POLL_S = 0.5
# Plain (non-TTY) output: one line this often, and on every change of state.
PLAIN_EVERY_S = 5.0
# How long polls may fail in a row (a neuron busy or restarting) before giving up: a
# restarted neuron resumes the stage by itself, and the CLI follows it there.
LOST_AFTER_S = 30.0
BAR_WIDTH = 24

EXIT_STAGED, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

HELP = """\
Ask a running neuron to stage MODEL_ID's weights from SOURCE (POST /store/stage),
then follow the job until the copy is verified and in the store.

SOURCE is a hub repo (org/name): the neuron copies it from the --peer neurons
that hold it (file by file, sha256-verified, resuming where a cut transfer
stopped) and falls back to the hub. A local model directory is used in place
and needs no stage. Staging again a copy already staged returns at once.

On a terminal one progress line updates in place (bytes done / total, percent,
rate, ETA); otherwise, as in a log, a plain line every few seconds.
Ctrl-C cancels the stage on the neuron (POST /store/cancel; the partial files
are kept, so staging again resumes). A neuron restarted mid-stage (or killed and
started again) resumes the stage by itself, and this command keeps following it
across the restart. A disk that fills mid-stage fails it as insufficient_storage
with the numbers; its partial files are kept, so once space is freed, staging
again (or the neuron's next start) resumes it.

exit status: 0 staged, 1 the stage failed (the error is printed),
             2 usage error, neuron unreachable or request refused, 130 Ctrl-C

example:
  neuron stage qwen3-8b mlx-community/Qwen3-8B-4bit \\
      --url http://10.0.0.12:9410 --token-file ~/.cortex/fleet-token \\
      --peer http://10.0.0.11:9410"""


class CliError(Exception):
    """One line for the operator, and the exit status it means."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


@attrs.frozen
class Client:
    url: str
    token: str | None
    timeout_s: float = 30.0

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token is not None:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return resp.status, _json(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _json(exc.read())
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CliError(f"cannot reach the neuron at {self.url}: {reason}") from exc


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _error_message(body: Any) -> str:
    err = body.get("error") if isinstance(body, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    return message if isinstance(message, str) else "no error message"


def read_token_file(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = path.expanduser().read_text().strip()
    except OSError as exc:
        raise CliError(f"cannot read the token file {path}: {exc.strerror}") from exc
    if not token:
        raise CliError(f"the token file {path} is empty")
    return token


@attrs.define
class Printer:
    """One line rewritten in place on a TTY; plain lines now and then otherwise."""

    out: TextIO
    tty: bool
    _width: int = 0
    _last_at: float = float("-inf")
    _last_state: str | None = None

    def progress(self, model_id: str, p: StageProgress) -> None:
        line = f"{model_id}: {p.state:<9} {_bar(p)} {p.summary()}{_files(p)}"
        if self.tty:
            pad = " " * max(0, self._width - len(line))
            self.out.write(f"\r{line}{pad}")
            self._width = len(line)
            self.out.flush()
            return
        now = time.monotonic()
        if p.state != self._last_state or now - self._last_at >= PLAIN_EVERY_S:
            print(line, file=self.out, flush=True)
            self._last_at, self._last_state = now, p.state

    def done(self, line: str) -> None:
        """The final line (ending the in-place one first)."""
        if self.tty and self._width:
            self.out.write("\n")
        print(line, file=self.out, flush=True)
        self._width = 0


def _bar(p: StageProgress) -> str:
    frac = p.fraction
    if frac is None:
        return "[" + "." * BAR_WIDTH + "]"
    filled = round(frac * BAR_WIDTH)
    return "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"


def _files(p: StageProgress) -> str:
    return "" if p.files_total is None else f"  files {p.files_done}/{p.files_total}"


def run(
    *,
    url: str,
    model_id: str,
    source: str,
    peers: list[str],
    token_file: Path | None,
    out: TextIO,
    err: TextIO,
) -> int:
    try:
        client = Client(url=url.rstrip("/"), token=read_token_file(token_file))
        return _stage(client, model_id, source, peers, Printer(out=out, tty=out.isatty()))
    except CliError as exc:
        print(f"neuron stage: {exc}", file=err, flush=True)
        return exc.code


def _stage(client: Client, model_id: str, source: str, peers: list[str], pr: Printer) -> int:
    # A Ctrl-C from the POST on: the job may exist already, so it is cancelled.
    try:
        return _start_and_follow(client, model_id, source, peers, pr)
    except KeyboardInterrupt:
        return _cancel(client, model_id, pr)


def _start_and_follow(
    client: Client, model_id: str, source: str, peers: list[str], pr: Printer
) -> int:
    started = time.monotonic()
    status, body = client.call(
        "POST", "/store/stage", {"model_id": model_id, "source": source, "peers": peers}
    )
    if status == 507:  # the free-space floor: the arithmetic is in the message
        raise CliError(f"refused: {_error_message(body)}", EXIT_FAILED)
    if status >= 400 or not isinstance(body, dict):
        raise CliError(f"POST /store/stage answered {status}: {_error_message(body)}")
    if body.get("in_place"):
        pr.done(f"{model_id}: a local model, used in place: {body.get('path')}")
        return EXIT_STAGED
    name = body.get("name")
    if not isinstance(name, str):
        raise CliError("POST /store/stage answered no job name (is this a neuron?)")
    if body.get("state") == "staged":
        pr.done(f"{model_id}: already staged at {body.get('path')}")
        return EXIT_STAGED
    return _follow(client, model_id, name, pr, started)


def _storage(
    client: Client, lost_since: float | None
) -> tuple[dict[str, Any] | None, float | None]:
    """GET /store/storage, or None (and since when) while the neuron does not answer."""
    try:
        status, body = client.call("GET", "/store/storage")
    except CliError:
        status, body = 0, None
    if status == 200 and isinstance(body, dict):
        return body, None
    now = time.monotonic()
    since = now if lost_since is None else lost_since
    if now - since >= LOST_AFTER_S:
        raise CliError(
            f"lost the neuron at {client.url} for {LOST_AFTER_S:g} s while following the stage"
        )
    return None, since


def _follow(client: Client, model_id: str, name: str, pr: Printer, started: float) -> int:
    lost_since: float | None = None
    last: StageProgress | None = None
    while True:
        body, lost_since = _storage(client, lost_since)
        if body is None:
            time.sleep(POLL_S)
            continue
        jobs = [j for j in body.get("staging") or () if isinstance(j, dict)]
        job = next((j for j in jobs if j.get("name") == name), None)
        p = StageProgress.from_json(job)
        if p is None:
            # A finished stage leaves the job list for the list of copies.
            copies = [c for c in body.get("staged") or () if isinstance(c, dict)]
            copy = next((c for c in copies if c.get("name") == name), None)
            if copy is None:
                raise CliError(f"the stage of {name} is gone: neither under way nor staged", 1)
            total = copy.get("size_bytes")
            total = total if isinstance(total, int) else 0
            took = time.monotonic() - started
            if last is not None and last.bytes_total:
                pr.progress(model_id, attrs.evolve(last, bytes_done=last.bytes_total, eta_s=0))
            pr.done(f"{model_id}: staged {size(total)} in {duration(took)} at {copy.get('path')}")
            return EXIT_STAGED
        if p.state == "failed":
            pr.progress(model_id, p)
            pr.done(f"{model_id}: stage failed: {p.error}")
            return EXIT_FAILED
        pr.progress(model_id, p)
        last = p
        time.sleep(POLL_S)


def _cancel(client: Client, model_id: str, pr: Printer) -> int:
    pr.done(f"{model_id}: interrupted, cancelling the stage ...")
    try:
        status, body = client.call("POST", "/store/cancel", {"model_id": model_id})
    except (CliError, KeyboardInterrupt) as exc:
        print(f"neuron stage: the cancel may not have reached the neuron: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if status == 200 and isinstance(body, dict) and body.get("cancelled"):
        job = StageProgress.from_json(body.get("job"))
        at = "" if job is None else f" at {job.summary()}"
        pr.done(f"{model_id}: stage cancelled{at} (staging again resumes)")
    else:
        pr.done(f"{model_id}: nothing to cancel (the stage had ended)")
    return EXIT_INTERRUPTED
