"""`cortex restart NODE`: recycle a node (POST /admin/nodes/NODE/restart), optionally wait."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO
from urllib.parse import urlsplit

import attrs

from cortex.cli.remote import (
    CONNECTION_HELP,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    ApiFailure,
    Target,
    Unreachable,
    add_connection_args,
    follow,
    run,
)

POLL_S = 0.5

HELP = f"""\
Recycle NODE: cortex stops routing to it, the neuron drains (it reports
`draining` while requests in flight finish, up to its drain_s), stops its
runners and re-executes itself (same node_id); cortex routes to it again once
it answers as the new process, and the reconciler loads back the models its
wishes want there. Requests sent meanwhile go to the other replicas.

With --wait, follow until the node is healthy and every model it served
before is ready on it again (models loaded only on demand come back on demand,
so --wait reports them but does not wait for them).

This recycles the neuron process, not the machine. After jaccl errno 16 or 96
(or past a node's jaccl reload budget) the runbooks say reboot: the RDMA queue
pairs leak until the machine itself reboots, and no restart here frees them.
Reboot it with `cortex reboot NODE --confirm NODE` where its neuron allows it
(allow_reboot), else from a shell: `ssh HOST sudo shutdown -r now` (Linux and
macOS; HOST as in the node's url); this command prints that for a node that ran
jaccl groups.

{CONNECTION_HELP}

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
    add_connection_args(p)
    p.add_argument("--wait", action="store_true", help="follow until the node serves again")
    p.add_argument("--timeout", type=float, default=900.0, help="give up waiting after this, s")
    p.set_defaults(func=main)


def main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    return run(args, "restart", lambda target: _restart(args, target, out))


def _restart(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    before = _state(target)  # for the reboot note: read before the count resets
    status, answer = target.call("POST", f"/admin/nodes/{args.node}/restart")
    if status != 202 or not isinstance(answer, dict):
        raise ApiFailure.of(status, answer)
    models = [str(m) for m in answer.get("models", [])]
    print(
        f"{args.node}: restarting (drain up to {answer.get('drain_s')} s); "
        f"models on it: {', '.join(models) or 'none'}",
        file=out,
        flush=True,
    )
    if (note := reboot_note(before, args.node)) is not None:
        print(note, file=out, flush=True)
    if not args.wait:
        return EXIT_OK
    try:
        return _follow(target, args.node, models, args.timeout, out)
    except KeyboardInterrupt:
        print("stopped following; the restart goes on", file=out)
        return EXIT_INTERRUPTED


def reboot_note(state: dict[str, Any] | None, node: str) -> str | None:
    """For a node that ran jaccl groups: a restart does not free RDMA queue pairs."""
    n = next((x for x in (state or {}).get("nodes", []) if x.get("name") == node), None)
    if n is None or not (n.get("jaccl_loads") or n.get("advice")):
        return None
    host = urlsplit(str(n.get("url", ""))).hostname or node
    return (
        f"note: this recycles the neuron process on {node} only, not the machine; RDMA queue "
        f"pairs its jaccl groups leaked ({n.get('jaccl_loads', 0)} jaccl load(s)) stay leaked "
        f"until it reboots: ssh {host} sudo shutdown -r now"
    )


def _state(target: Target) -> dict[str, Any] | None:
    """/admin/state, or None while cortex does not answer it (a poll to retry)."""
    try:
        status, state = target.call("GET", "/admin/state", timeout=10.0)
    except Unreachable:
        return None
    return state if status == 200 and isinstance(state, dict) else None


def _kept(state: dict[str, Any], models: list[str]) -> set[str]:
    """The models of `models` a wish keeps loaded: only those come back by themselves."""
    kept = {m["id"] for m in state.get("models", []) if m.get("keep_loaded") or m.get("pinned_on")}
    return {m for m in models if m in kept}


def _ready_on(state: dict[str, Any], node: str) -> set[str]:
    return {
        m["id"]
        for m in state.get("models", [])
        for p in m.get("placements", [])
        if p.get("node") == node and p.get("state") == "ready" and p.get("healthy")
    }


@attrs.define
class _Follower:
    """What `--wait` has said so far, so each line is printed once."""

    node: str
    models: list[str]
    out: TextIO
    started: float = attrs.Factory(time.monotonic)
    said: set[str] = attrs.Factory(set)
    wanted: set[str] | None = None

    def say(self, key: str, text: str) -> None:
        if key not in self.said:
            self.said.add(key)
            took = time.monotonic() - self.started
            print(f"{text} ({took:.1f} s)", file=self.out, flush=True)

    def step(self, state: dict[str, Any]) -> int | None:
        """One poll's worth of following: an exit code once done, else None."""
        n = next((x for x in state.get("nodes", []) if x.get("name") == self.node), None)
        if n is None:
            print(f"cortex restart: {self.node} is gone from cortex's state", file=sys.stderr)
            return EXIT_FAILED
        if n.get("draining"):
            # The node's own word (its /status), not a guess from a closed port.
            held = n.get("outstanding", 0)
            self.say("draining", f"{self.node}: draining, {held} request(s) through cortex on it")
            return None
        if not n.get("healthy") or n.get("recycling"):
            return None
        self.say("back", f"{self.node}: back, healthy")
        if self.wanted is None:
            self.wanted = _kept(state, self.models)
            for m in sorted(set(self.models) - self.wanted):
                print(f"{m}: loaded on demand, comes back on its next request", file=self.out)
        ready = _ready_on(state, self.node)
        for m in sorted(self.wanted & ready):
            self.say(m, f"{m}: ready on {self.node} again")
        if self.wanted <= ready:
            print(f"{self.node}: restarted and serving", file=self.out)
            return EXIT_OK
        return None


def _follow(target: Target, node: str, models: list[str], timeout_s: float, out: TextIO) -> int:
    follower = _Follower(node, models, out)
    rc = follow(
        lambda: _state(target),
        follower.step,
        started=follower.started,
        timeout_s=timeout_s,
        interval_s=POLL_S,
    )
    if rc is not None:
        return rc
    print(f"cortex restart: {node} not back after {timeout_s:g} s", file=sys.stderr)
    return EXIT_FAILED
