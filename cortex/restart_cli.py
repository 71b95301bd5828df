"""`cortex restart NODE`: recycle a node (POST /admin/nodes/NODE/restart), optionally wait."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, TextIO

from shared.blocking_http import request_json

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_URL = "http://127.0.0.1:9400"
POLL_S = 0.5

HELP = """\
Recycle NODE: cortex stops routing to it, the neuron drains (requests in
flight finish, up to its drain_s), stops its runners and re-executes itself
(same node_id); cortex routes to it again once it answers as the new process,
and the reconciler loads back the models its wishes want there. Requests sent
meanwhile go to the other replicas.

With --wait, follow until the node is healthy and every model it served
before is ready on it again (models loaded only on demand come back on demand,
so --wait reports them but does not wait for them).

The admin token comes from --token, else $CORTEX_ADMIN_TOKEN.

exit status: 0 restarted (and back, with --wait), 1 failed or not back in time,
             2 usage error, unknown node or cortex unreachable, 130 Ctrl-C

example:
  cortex restart studio-2 --wait"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "restart",
        help="recycle a node: drain, restart its neuron, bring its models back",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("node", help="node name as in cortex.toml")
    p.add_argument("--url", default=DEFAULT_URL, help=f"cortex base URL (default {DEFAULT_URL})")
    p.add_argument("--token", help="admin token (default: $CORTEX_ADMIN_TOKEN)")
    p.add_argument("--wait", action="store_true", help="follow until the node serves again")
    p.add_argument("--timeout", type=float, default=900.0, help="give up waiting after this, s")
    p.set_defaults(func=main)


def main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    token = args.token or os.environ.get("CORTEX_ADMIN_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    base = args.url.rstrip("/")
    try:
        status, answer, _ = request_json(
            "POST", f"{base}/admin/nodes/{args.node}/restart", None, 30.0, headers
        )
    except OSError as exc:
        print(f"cortex restart: cannot reach cortex at {base}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if status != 202 or not isinstance(answer, dict):
        print(f"cortex restart: {status}: {_message(answer)}", file=sys.stderr)
        return EXIT_USAGE if status in (400, 401, 403, 404) else EXIT_FAILED
    models = [str(m) for m in answer.get("models", [])]
    print(
        f"{args.node}: restarting (drain up to {answer.get('drain_s')} s); "
        f"models on it: {', '.join(models) or 'none'}",
        file=out,
        flush=True,
    )
    if not args.wait:
        return EXIT_OK
    try:
        return _follow(base, headers, args.node, models, args.timeout, out)
    except KeyboardInterrupt:
        print("stopped following; the restart goes on", file=out)
        return EXIT_INTERRUPTED


def _follow(
    base: str, headers: dict[str, str], node: str, models: list[str], timeout_s: float, out: TextIO
) -> int:
    started = time.monotonic()
    said: set[str] = set()
    wanted: set[str] | None = None
    while time.monotonic() - started < timeout_s:
        try:
            status, state, _ = request_json("GET", f"{base}/admin/state", None, 10.0, headers)
        except OSError:
            time.sleep(POLL_S)
            continue
        if status != 200 or not isinstance(state, dict):
            time.sleep(POLL_S)
            continue
        n = next((x for x in state.get("nodes", []) if x.get("name") == node), None)
        if n is None:
            print(f"cortex restart: {node} is gone from cortex's state", file=sys.stderr)
            return EXIT_FAILED
        back = bool(n.get("healthy")) and not n.get("recycling")
        if back and "back" not in said:
            said.add("back")
            took = time.monotonic() - started
            print(f"{node}: back, healthy ({took:.1f} s)", file=out, flush=True)
        if back:
            if wanted is None:
                # Only models a wish keeps loaded come back by themselves.
                kept = {
                    m["id"]
                    for m in state.get("models", [])
                    if m.get("keep_loaded") or m.get("pinned_on")
                }
                wanted = {m for m in models if m in kept}
                for m in sorted(set(models) - wanted):
                    print(f"{m}: loaded on demand, comes back on its next request", file=out)
            ready = set()
            for m in state.get("models", []):
                for p in m.get("placements", []):
                    if p.get("node") == node and p.get("state") == "ready" and p.get("healthy"):
                        ready.add(m["id"])
            for m in sorted((wanted & ready) - said):
                said.add(m)
                took = time.monotonic() - started
                print(f"{m}: ready on {node} again ({took:.1f} s)", file=out, flush=True)
            if wanted <= ready:
                print(f"{node}: restarted and serving", file=out)
                return EXIT_OK
        time.sleep(POLL_S)
    print(f"cortex restart: {node} not back after {timeout_s:g} s", file=sys.stderr)
    return EXIT_FAILED


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body))
    return str(body)[:500]
