"""Where a command finds its cortex, and one blocking call to it (for the operator CLIs).

URL and admin token come from the flags (`--url`, `--token`), else the
environment (`CORTEX_URL`, `CORTEX_ADMIN_TOKEN`), else a config file
(`-c cortex.toml`: its host, port and admin_token), else the local fleet that
`make run` starts (`run/cortex.toml`, written by `cortex fleet --dir run`),
else http://127.0.0.1:9400. Every command that talks to a running cortex
(status, models, preview, load, unload, doctor, bench, linktest, restart, trace,
events) finds it here, and reports errors through `run`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs

from shared.blocking_http import request_json

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:9400"
# Where `make run` (`cortex fleet --dir run`) writes the local fleet's config.
LOCAL_FLEET_DIR = "run"

CONNECTION_HELP = """\
connection: --url/--token, else $CORTEX_URL/$CORTEX_ADMIN_TOKEN, else -c cortex.toml
(its port and admin_token), else the local fleet of `make run` (run/cortex.toml),
else http://127.0.0.1:9400."""


class Unreachable(Exception):
    """Cortex did not answer (refused, timed out, not HTTP): exit 2."""


class ApiFailure(Exception):
    """Cortex answered with an error envelope."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.code = status, message, code

    @property
    def exit_code(self) -> int:
        # A wrong token, an unknown name or a malformed ask is the caller's mistake, like a
        # usage error; a refusal on the merits (a placement that does not fit) is a failure.
        usage = self.status in (401, 403, 404) or self.code == "invalid_request"
        return EXIT_USAGE if usage else EXIT_FAILED

    @classmethod
    def of(cls, status: int, body: Any) -> ApiFailure:
        """The failure an error answer describes."""
        return cls(status, error_message(body), error_code(body))


@attrs.frozen
class Target:
    """One cortex to talk to; `source` says where the URL came from (for messages)."""

    url: str
    token: str | None = attrs.field(default=None, repr=False)
    source: str = "default"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def call(
        self, method: str, path: str, body: Any = None, timeout: float = 30.0
    ) -> tuple[int, Any]:
        """(status, parsed body); Unreachable when cortex does not answer at all."""
        try:
            status, answer, _ = request_json(
                method, self.url + path, body, timeout, headers=self.headers
            )
        except (OSError, ValueError) as exc:  # ValueError: an answer that is not JSON
            raise Unreachable(f"cannot reach cortex at {self.url} ({self.source}): {exc}") from exc
        return status, answer

    def get_ok(self, path: str, timeout: float = 30.0) -> Any:
        """The body of a 200 answer; ApiFailure for any other status."""
        status, answer = self.call("GET", path, None, timeout)
        if status != 200:
            raise ApiFailure.of(status, answer)
        return answer


def run(args: argparse.Namespace, name: str, body: Callable[[Target], int]) -> int:
    """Resolve the target and run `body(target)`, with the errors every command shares:
    cortex unreachable (or its config unreadable) exits 2, an error answer by its status."""
    try:
        return body(resolve(args))
    except Unreachable as exc:
        print(f"cortex {name}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ApiFailure as exc:
        print(f"cortex {name}: {exc}", file=sys.stderr)
        return exc.exit_code


def follow(
    poll: Callable[[], T | None],
    step: Callable[[T], int | None],
    *,
    started: float,
    timeout_s: float,
    interval_s: float,
) -> int | None:
    """Poll until `step` gives an exit code; None once `timeout_s` has passed since
    `started`. A poll that gives None (nothing to look at yet) is waited out."""
    while time.monotonic() - started < timeout_s:
        got = poll()
        rc = None if got is None else step(got)
        if rc is not None:
            return rc
        time.sleep(interval_s)
    return None


def add_connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="cortex base URL (default: see 'connection' above)")
    p.add_argument("--token", help="admin token (default: see 'connection' above)")
    p.add_argument("-c", "--config", help="cortex.toml to take the port and admin_token from")


def resolve(
    args: argparse.Namespace | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Target:
    """The cortex a command means, by the order in the module docstring."""
    env = dict(os.environ) if env is None else env
    url = getattr(args, "url", None)
    token = getattr(args, "token", None)
    source = "--url"
    if not url and env.get("CORTEX_URL"):
        url, source = env["CORTEX_URL"], "$CORTEX_URL"
    token = token or env.get("CORTEX_ADMIN_TOKEN") or None
    config = getattr(args, "config", None)
    path: Path | None = Path(config) if config else None
    if path is None and (not url or not token):
        local = (cwd or Path.cwd()) / LOCAL_FLEET_DIR / "cortex.toml"
        path = local if local.is_file() else None
    if path is not None:
        file_url, file_token = read_config(path)
        if not url:
            url, source = file_url, str(path)
        token = token or file_token
    if not url:
        url, source = DEFAULT_URL, "default"
    return Target(url=url.rstrip("/"), token=token, source=source)


def read_config(path: Path) -> tuple[str, str | None]:
    """(URL, admin token) of a cortex.toml; only the keys we need, so a partial file works."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise Unreachable(f"cannot read {path}: {exc}") from exc
    host = str(data.get("host", "127.0.0.1"))
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # listening everywhere: reach it on loopback
    if ":" in host:
        host = f"[{host}]"
    port = int(data.get("port", 9400))
    token = data.get("admin_token")
    return f"http://{host}:{port}", token if isinstance(token, str) else None


def error_message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body))
    return str(body)[:500]


def error_code(body: Any) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = body["error"].get("code")
        return None if code is None else str(code)
    return None


def dump_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; a person's table, not a parser's."""
    cells = [headers, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def gib(n: Any) -> str:
    """Bytes as GiB with one decimal; '-' for unknown."""
    if not isinstance(n, int | float):
        return "-"
    return f"{n / 2**30:.1f}G"
