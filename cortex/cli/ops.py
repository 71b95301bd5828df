"""Operator commands against a running cortex: status, models, unload, preview, doctor.

Each prints a table a person reads (or `--json`, the server's answer as is) and
exits 0 ok, 1 something failed or is unhealthy, 2 usage error or cortex
unreachable. Where cortex is comes from cortex.cli.remote (flags, env, config, the
local fleet).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO
from urllib.parse import quote

from cortex.cli.remote import (
    CONNECTION_HELP,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ApiFailure,
    Target,
    Unreachable,
    add_connection_args,
    dump_json,
    gib,
    resolve,
    run,
    table,
)
from shared.progress import StageProgress

EXIT_STATUS = """\
exit status: 0 ok, 1 something failed or is unhealthy, 2 usage error or cortex unreachable"""


def add_parsers(sub: Any) -> None:
    """Register status, models, unload, preview and doctor on `cortex`'s subparsers."""

    def parser(name: str, help: str, text: str, example: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name,
            help=help,
            description=f"{text}\n\n{CONNECTION_HELP}\n\n{EXIT_STATUS}\n\nexample:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_connection_args(p)
        p.add_argument("--json", action="store_true", help="print the server's JSON answer")
        return p

    p = parser(
        "status",
        "the fleet at a glance: nodes and models",
        "Nodes (health, memory, disk, runners, load) and models (state, replicas wanted/"
        "present, tok/s, requests, idle TTL, staging) from GET /admin/state. Exits 1 when a "
        "node is unhealthy or a model failed.",
        "cortex status --watch 2",
    )
    p.add_argument("--watch", type=float, metavar="SECONDS", help="redraw every SECONDS")
    p.set_defaults(func=status_main)
    p = parser(
        "models",
        "the catalogue: each model's wish, where it is, and why",
        "Every catalogued model: aliases, source, its wish (keep_loaded, replicas, "
        "pinned_on), where it is loaded and in what state, and cortex's 'why'.",
        "cortex models",
    )
    p.set_defaults(func=models_main)
    p = parser(
        "unload",
        "remove a model (everywhere, or from --nodes)",
        "POST /admin/models/MODEL/unload. A model the catalogue keeps loaded (keep_loaded,"
        " pinned_on) needs --force, and then stays unloaded until the next `cortex load`.",
        "cortex unload qwen2.5-7b --nodes studio-2 --force",
    )
    p.add_argument("model", help="catalogue id or alias")
    p.add_argument("--nodes", help="comma-separated node names: only the copies there")
    p.add_argument("--force", action="store_true", help="unload even a kept-loaded model")
    p.set_defaults(func=unload_main)
    p = parser(
        "preview",
        "where a model would go, with the memory arithmetic",
        "Every candidate node set from GET /admin/placements: 'here' when it serves the "
        "model already, else whether one more copy fits now, why not, and each member's "
        "arithmetic (share x overhead + kv + reserve against usable memory). Exits 1 when "
        "the model is loaded nowhere and no set can take it now.",
        "cortex preview qwen2.5-72b",
    )
    p.add_argument("model", help="catalogue id or alias")
    p.add_argument("--all", action="store_true", help="also list sets that could never fit")
    p.set_defaults(func=preview_main)
    p = parser(
        "doctor",
        "the morning checklist: pass / warn / fail with the fix to try",
        "GET /admin/doctor: cortex reachable; every node answering, healthy, discovery "
        "complete, clock in step; neuron / MLX / mlx-lm versions aligned; RAM (warn 70%, "
        "fail 85%), disk (warn 80%, fail 90%) and the store's free-space floor; RDMA ports "
        "and jaccl meshes; cpu load (warn at a 5-minute load of 1.0 a core), temperature "
        "(warn 80 °C, fail 90 °C; macOS: the thermal pressure level) and power (warn at "
        "95% of a device's cap), each 'not reported' where the node's platform does not "
        "tell; a 2-token probe of every ready replica (warn over 2 s, fail over 5 s); "
        "recent runner restarts; jaccl reload budgets (the advice: reboot the machine, "
        "which `cortex restart` does not). Exits 1 on any fail (warnings exit 0).",
        "cortex doctor --url http://10.0.0.10:9400",
    )
    p.set_defaults(func=doctor_main)


# -- status ------------------------------------------------------------------------------


def status_main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    def once(target: Target) -> int:
        state = target.get_ok("/admin/state")
        if args.json:
            print(dump_json(state), file=out)
        else:
            print(render_status(state, target), file=out, flush=True)
        return status_rc(state)

    if not args.watch:
        return run(args, "status", once)
    rc = EXIT_OK
    try:
        while True:
            if out.isatty():
                print("\x1b[H\x1b[2J", end="", file=out)
            rc = run(args, "status", once)
            print(f"\n(every {args.watch:g} s; Ctrl-C ends)", file=out, flush=True)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return rc


def status_rc(state: dict[str, Any]) -> int:
    # An announced node that is not in the poll set (a stranger) is no node of ours
    # failing; a configured one that refuses the token is.
    bad_node = any(
        not n.get("healthy")
        for n in state.get("nodes", [])
        if not (n.get("discovered") and n.get("status") in ("stranger", "unreachable"))
    )
    bad_model = any(
        m.get("last_failure") or any(p.get("state") == "failed" for p in m.get("placements", []))
        for m in state.get("models", [])
    )
    return EXIT_FAILED if bad_node or bad_model else EXIT_OK


def render_status(state: dict[str, Any], target: Target | None = None) -> str:
    now = time.time()
    lines = [] if target is None else [f"cortex {target.url}  ({target.source})", ""]
    lines.append(
        table(
            ["NODE", "HEALTH", "STATUS", "MEMORY USED", "DISK FREE", "RUNNERS", "LOAD", "NOTE"],
            [_node_row(n) for n in state.get("nodes", [])],
        )
    )
    lines.append("")
    lines.append(
        table(
            ["MODEL", "STATE", "REPLICAS", "WHERE", "TOK/S", "RUN/QUEUE", "TTL / IDLE", "STAGING"],
            [_model_row(m, now) for m in state.get("models", [])],
        )
    )
    return "\n".join(lines)


def _node_row(n: dict[str, Any]) -> list[str]:
    total = n.get("memory_total_bytes")
    free = n.get("memory_available_bytes")
    mem = "-"
    if isinstance(total, int) and total > 0 and isinstance(free, int):
        used = max(0, total - free)
        mem = f"{gib(used)}/{gib(total)} {used / total:.0%}"
    health = "healthy" if n.get("healthy") else f"DOWN ({n.get('failures', 0)} failed polls)"
    if n.get("draining"):
        # Out of routing on purpose (SIGTERM, a restart); its requests finish.
        health = "draining"
    elif n.get("recycling") and not n.get("healthy"):
        health = "recycling"
    if not n.get("seen"):
        health = "never seen" if not n.get("healthy") else health
    if n.get("stranger"):
        # It refuses the fleet token (or cannot show it holds it): never used.
        health = "stranger"
    elif n.get("status") == "unreachable":
        health = "announced, unreachable"
    # A stranger's reason says what to do about it: shown whole.
    width = 90 if n.get("stranger") else 60
    note = "; ".join(n.get("advice", [])) or (n.get("last_error") or "")[:width]
    if n.get("discovered") and not note:
        note = "found over mDNS"
    return [
        str(n.get("name")),
        health,
        str(n.get("status") or "-"),
        mem,
        _disk(n),
        str(len(n.get("models", []))),
        str(max(int(n.get("load", 0)), int(n.get("outstanding", 0)))),
        note,
    ]


def _model_row(m: dict[str, Any], now: float) -> list[str]:
    places = m.get("placements", [])
    life = m.get("life") or {}
    wish = life.get("wish") or {}
    tps = [p["decode_tps"] for p in places if isinstance(p.get("decode_tps"), int | float)]
    busy = sum(int(p.get("in_flight", 0)) for p in places)
    queued = sum(int(p.get("queue_depth", 0)) for p in places)
    ttl = wish.get("idle_ttl_s")
    last = max((float(p.get("last_used") or 0) for p in places), default=0.0)
    idle = f"{now - last:.0f}s" if last > 0 else "-"
    stage = [
        f"{p['node']} {s.summary()}"
        for p in places
        if (s := StageProgress.from_json(p.get("staging"))) is not None and s.active
    ]
    return [
        str(m.get("id")),
        model_state(m),
        _replicas(life, places),
        where(places),
        f"{sum(tps):.1f}" if tps else "-",
        f"{busy}/{queued}",
        f"{'never' if ttl is None else f'{ttl:g}s'} / {idle}",
        "; ".join(stage) or "-",
    ]


def where(places: list[dict[str, Any]]) -> str:
    """`a:ready, b:recovering (2 restarts)`: each copy's node and state."""
    out = []
    for p in places:
        text = f"{p['node']}:{p.get('state')}"
        if p.get("restarts"):
            text += f" ({p['restarts']} restarts)"
        out.append(text)
    return ", ".join(out) or "-"


def _replicas(life: dict[str, Any], places: list[dict[str, Any]]) -> str:
    """present/wanted; a model nobody keeps loaded is wanted only on demand."""
    present = life.get("present", sum(p.get("state") == "ready" for p in places))
    wanted = (life.get("wish") or {}).get("replicas")
    return f"{present}/{wanted}" if wanted else f"{present} (on demand)"


def _disk(n: dict[str, Any]) -> str:
    free, total = n.get("disk_free_bytes"), n.get("disk_total_bytes")
    if not isinstance(free, int):
        return "-"
    text = f"{free / 1e9:.1f}GB"
    if isinstance(total, int) and total > 0:
        text += f" ({1 - free / total:.0%} used)"
    floor = n.get("min_free_bytes")
    if isinstance(floor, int) and free < floor:
        text += " UNDER FLOOR"
    return text


def model_state(m: dict[str, Any]) -> str:
    """One word for a model: where it is furthest along, or what stops it."""
    life = m.get("life") or {}
    states = [p.get("state") for p in m.get("placements", []) if p.get("healthy")]
    for s in ("ready", "warming", "loading", "stalled", "recovering", "unloading", "failed"):
        if s in states:
            return s
    if life.get("job"):
        return str(life["job"].get("kind", "job")) + "ing"
    if life.get("hold"):
        return "held"
    if m.get("last_failure"):
        return "load failed"
    return "unloaded"


# -- models ------------------------------------------------------------------------------


def models_main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    def body(target: Target) -> int:
        state = target.get_ok("/admin/state")
        models = state.get("models", [])
        if args.json:
            print(dump_json(models), file=out)
            return EXIT_OK
        rows = []
        for m in models:
            wish = []
            if m.get("keep_loaded"):
                wish.append("keep_loaded")
            wish.append(f"replicas {m.get('replicas')}")
            if m.get("pinned_on"):
                wish.append("pinned " + ",".join(m["pinned_on"]))
            places = m.get("placements", [])
            rows.append(
                [
                    str(m.get("id")),
                    ",".join(m.get("aliases", [])) or "-",
                    model_state(m),
                    where(places),
                    " ".join(wish),
                    str(m.get("why", ""))[:70],
                ]
            )
        print(table(["MODEL", "ALIASES", "STATE", "WHERE", "WISH", "WHY"], rows), file=out)
        return EXIT_OK

    return run(args, "models", body)


# -- unload ------------------------------------------------------------------------------


def unload_main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    def body(target: Target) -> int:
        req: dict[str, Any] = {}
        if args.force:
            req["force"] = True
        if args.nodes:
            req["nodes"] = [n.strip() for n in args.nodes.split(",") if n.strip()]
        status, answer = target.call(
            "POST", f"/admin/models/{args.model}/unload", req or None, 120.0
        )
        if args.json:
            print(dump_json(answer), file=out)
        if status >= 400 and status != 502:
            raise ApiFailure.of(status, answer)
        if not args.json:
            for line in answer.get("did", []):
                print(f"  {line}", file=out)
            failed = answer.get("failed") or []
            if failed:
                print(f"{answer.get('model_id')}: unload failed on {', '.join(failed)}", file=out)
            else:
                print(
                    f"{answer.get('model_id')} unloaded from {', '.join(answer['unloaded'])}",
                    file=out,
                )
        return EXIT_FAILED if status == 502 else EXIT_OK

    return run(args, "unload", body)


# -- preview -----------------------------------------------------------------------------


def preview_main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    def body(target: Target) -> int:
        answer = target.get_ok(f"/admin/placements?model_id={quote(args.model)}")
        if args.json:
            print(dump_json(answer), file=out)
        else:
            print(render_preview(answer, show_all=args.all), file=out)
        return preview_rc(answer)

    return run(args, "preview", body)


def is_here(c: dict[str, Any]) -> bool:
    """The set already serves the model: every member holds a copy (loaded or loading)."""
    nodes = c.get("nodes") or []
    return bool(nodes) and set(c.get("holding") or []) == set(nodes)


def preview_rc(answer: dict[str, Any]) -> int:
    """0 when the model is here already or one more copy fits now; 1 when neither."""
    cands = answer.get("candidates", [])
    return EXIT_OK if any(c.get("feasible") or is_here(c) for c in cands) else EXIT_FAILED


def preview_summary(answer: dict[str, Any]) -> str:
    """One line: where the model is now, and where one more copy would go."""
    cands = answer.get("candidates", [])
    here = [_set_name(c) for c in cands if is_here(c)]
    fits = [_set_name(c) for c in cands if c.get("feasible")]
    now = f"on {', '.join(here)} now" if here else "loaded nowhere now"
    more = "one more copy" if here else "a copy"
    if fits:
        return f"{now}; {more} fits on: {', '.join(fits)} (best first)"
    if cands and len(here) == len(cands):
        return f"{now}; {more} has no node set left without one"
    return f"{now}; {more} fits on no node set now (WHY NOT says why)"


def _set_name(c: dict[str, Any]) -> str:
    nodes = c.get("nodes") or []
    return nodes[0] if len(nodes) == 1 else f"[{','.join(nodes)}]"


def _fits_cell(c: dict[str, Any]) -> str:
    if is_here(c):
        return "here"
    return "yes" if c.get("feasible") else "no"


def _preview_row(c: dict[str, Any]) -> list[str]:
    here = is_here(c)
    how = "-" if c.get("backend") is None else f"{c['backend']}/{c.get('sharding')}"
    head = c.get("headroom_bytes")
    # A set that serves the model needs no room for it: its headroom and refusals are
    # those of a second copy on the same nodes, which placement never makes.
    return [
        ",".join(c.get("nodes", [])),
        _fits_cell(c),
        how,
        gib(head) if isinstance(head, int) and not here else "-",
        "-" if here else "; ".join(c.get("reasons", []))[:90] or "-",
    ]


def _shown(cands: list[dict[str, Any]], show_all: bool) -> list[dict[str, Any]]:
    """Every set with --all; else the ones that serve it or fit now (else the best 8)."""
    if show_all:
        return cands
    return [c for c in cands if c.get("feasible") or is_here(c)] or cands[:8]


def render_preview(answer: dict[str, Any], *, show_all: bool = False) -> str:
    facts = answer.get("facts") or {}
    shown = _shown(answer.get("candidates", []), show_all)
    lines = [
        f"{answer.get('model_id')}: "
        + ", ".join(f"{k} {v}" for k, v in facts.items() if v is not None),
        preview_summary(answer),
        "",
        "now (FITS: here = a copy is on these nodes, loaded or loading; yes = one more fits):",
        table(
            ["NODES", "FITS", "BACKEND", "HEADROOM", "WHY NOT"], [_preview_row(c) for c in shown]
        ),
        "",
        "arithmetic of a new copy (per node, never summed):",
    ]
    new = [c for c in shown if not is_here(c)]
    for c in new:
        for f in c.get("fits", []):
            mark = "ok " if f.get("ok") else "NO "
            lines.append(
                f"  {mark}{','.join(c.get('nodes', []))} / {f.get('node')}: {f.get('arithmetic')}"
            )
    if not new:
        lines.append("  (none shown: every set listed serves the model already)")
    ever = answer.get("ever", [])
    if not any(c.get("feasible") for c in ever):
        lines += ["", "never fits (even on empty, healthy nodes):"]
        lines += [f"  {','.join(c['nodes'])}: {'; '.join(c.get('reasons', []))}" for c in ever[:8]]
    return "\n".join(lines)


# -- doctor ------------------------------------------------------------------------------

MARK = {"pass": "PASS", "warn": "WARN", "fail": "FAIL"}


def doctor_main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        target = resolve(args)
        status, answer = target.call("GET", "/admin/doctor", None, 120.0)
    except Unreachable as exc:
        fail = {
            "verdict": "fail",
            "checks": [
                {
                    "name": "cortex reachable",
                    "verdict": "fail",
                    "detail": str(exc),
                    "fix": "start cortex (systemctl start cortex / make run) or pass --url",
                }
            ],
        }
        print(dump_json(fail) if args.json else render_doctor(fail), file=out)
        return EXIT_USAGE
    if status != 200:
        failure = ApiFailure.of(status, answer)
        print(f"cortex doctor: {failure}", file=sys.stderr)
        return failure.exit_code
    print(dump_json(answer) if args.json else render_doctor(answer, target), file=out)
    return EXIT_FAILED if answer.get("verdict") == "fail" else EXIT_OK


def render_doctor(report: dict[str, Any], target: Target | None = None) -> str:
    lines = [] if target is None else [f"cortex {target.url}  ({target.source})", ""]
    checks = report.get("checks", [])
    width = max((len(c["name"]) for c in checks), default=0)
    for c in checks:
        lines.append(f"{MARK.get(c['verdict'], '?')}  {c['name'].ljust(width)}  {c['detail']}")
        if c["verdict"] != "pass" and c.get("fix"):
            lines.append(f"      {''.ljust(width)}  fix: {c['fix']}")
    counts = {v: sum(c["verdict"] == v for c in checks) for v in MARK}
    lines += [
        "",
        f"{report.get('verdict', '?').upper()}: "
        + ", ".join(f"{n} {v}" for v, n in counts.items()),
    ]
    return "\n".join(lines)
