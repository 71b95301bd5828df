"""GET /dashboard: the fleet on one page, for an operator's browser.

Server-side rendered HTML that reloads itself every 2 s (a meta refresh): no
JavaScript, no external assets, every value passed through `html.escape`. It
shows the same facts as /admin/state (and so sits behind the admin token), laid
out for reading: nodes, the models on each node, the catalogue, cortex's uptime.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Mapping, Sequence

import attrs
from aiohttp import web

from cortex.keys import CATALOGUE, LIFECYCLE, LOADER, STARTED
from cortex.lifecycle import replicas, wanted_replicas
from cortex.placement import candidates
from cortex.router import node_infos
from cortex.state import LOADING_STATES, FleetSnapshot, NodeModel, NodeState
from shared.catalogue import GIB, Catalogue
from shared.progress import ACTIVE_STATES, StageProgress

REFRESH_S = 2


@attrs.frozen
class CatalogueRow:
    """What the page says of one catalogued model, beyond the fleet snapshot."""

    model_id: str
    aliases: tuple[str, ...]
    # Node sets that could ever hold it (each a tuple of node names).
    feasible_on: tuple[tuple[str, ...], ...]
    # Why feasibility could not be worked out (the page must render regardless).
    feasible_error: str | None
    wanted: int
    present: int
    loading_on: tuple[str, ...] | None
    last_failure: str | None
    # The lifecycle's one line: why the model is (not) where its wish says.
    why: str = ""


async def dashboard(request: web.Request) -> web.Response:
    app = request.app
    life = app[LIFECYCLE]
    snap = life.snapshot()
    cat = app[CATALOGUE]
    loader = app[LOADER]
    infos = node_infos(snap, cat)
    rows = []
    for spec in cat.models:
        feasible: tuple[tuple[str, ...], ...] = ()
        error = None
        try:
            found = candidates(spec, loader.facts(spec), infos, now=False)
            feasible = tuple(c.nodes for c in found if c.feasible)
        except Exception as exc:  # a status page must render during any incident
            error = f"{type(exc).__name__}: {exc}"
        job = life.job(spec.id)
        failure = snap.failure(spec.id)
        rows.append(
            CatalogueRow(
                model_id=spec.id,
                aliases=spec.aliases,
                feasible_on=feasible,
                feasible_error=error,
                wanted=wanted_replicas(spec),
                present=replicas(snap, spec.id),
                loading_on=None if job is None or job.kind != "load" else job.nodes,
                last_failure=None if failure is None else failure.message,
                why=life.why(spec, snap, loader.facts(spec)),
            )
        )
    page = render(
        snap,
        rows,
        catalogue=cat,
        uptime_s=time.monotonic() - app[STARTED].monotonic,
        started_at=app[STARTED].wall,
        now=time.time(),
    )
    return web.Response(
        text=page,
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": "no-store"},
    )


# -- rendering (pure: data in, HTML out) ------------------------------------------------


def render(
    snap: FleetSnapshot,
    rows: Sequence[CatalogueRow],
    *,
    catalogue: Catalogue,
    uptime_s: float,
    started_at: float,
    now: float,
) -> str:
    healthy, total = len(snap.healthy), len(snap.nodes)
    overall = "ok" if total and healthy == total else "degraded"
    serving = {
        m.model_id for n in snap.healthy for m in n.models if m.state == "ready" and m.serves_http
    }
    summary = (
        f'<span class="badge {"ok" if overall == "ok" else "bad"}">{_e(overall)}</span> '
        f"<b>{healthy}</b>/{total} nodes healthy · "
        f"<b>{len(serving)}</b> models serving · {len(catalogue.models)} catalogued · "
        f"cortex up <b>{_e(_duration(uptime_s))}</b> "
        f'<span class="dim">(since {_e(_clock(started_at))})</span>'
    )
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en"><head>',
            '<meta charset="utf-8">',
            f'<meta http-equiv="refresh" content="{REFRESH_S}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>cortex · {healthy}/{total} healthy</title>",
            f"<style>{_CSS}</style>",
            "</head><body>",
            "<header><h1>cortex fleet</h1>",
            f'<div class="summary">{summary}</div>',
            f'<div class="dim">as of {_e(_clock(now))} · refreshes every {REFRESH_S} s</div>',
            "</header>",
            _section("Nodes", _nodes_table(snap.nodes, now)),
            _section("Models on nodes", _placements_table(snap)),
            _section("Catalogue", _catalogue_table(rows, snap)),
            "</body></html>",
        ]
    )


def _nodes_table(nodes: Iterable[NodeState], now: float) -> str:
    head = (
        "node",
        "health",
        "failures",
        "memory available / total",
        "chip",
        "MLX",
        "backends",
        "status",
        "last ok",
        "last error",
    )
    body = []
    for n in nodes:
        d = n.discovery
        if n.healthy:
            health = '<span class="badge ok">healthy</span>'
        elif not n.seen:
            health = '<span class="badge bad">unhealthy</span> <span class="dim">never seen</span>'
        else:
            health = '<span class="badge bad">unhealthy</span>'
        total = d.memory_total_bytes if d is not None else 0
        body.append(
            _tr(
                [
                    f"<b>{_e(n.name)}</b><br><span class='dim'>{_e(n.url)}</span>",
                    health,
                    _num(n.failures, warn=n.failures > 0),
                    _memory(n.memory_available_bytes, total, known=n.seen),
                    _e(d.chip) if d is not None else _NONE,
                    (
                        f"{_e(d.mlx_device)} <span class='dim'>{_e(d.mlx_version)}</span>"
                        if d is not None
                        else _NONE
                    ),
                    _e(", ".join(d.backends) or "none") if d is not None else _NONE,
                    _e(n.health.status) if n.health is not None else _NONE,
                    _num(_ago(now - n.last_ok)) if n.last_ok is not None else _NONE,
                    f'<span class="err">{_e(n.last_error)}</span>' if n.last_error else _NONE,
                ],
                cls="down" if not n.healthy else "",
                attrs=f'data-node="{_e(n.name)}" data-healthy="{"yes" if n.healthy else "no"}"',
            )
        )
    if not body:
        return '<p class="dim">No neurons configured.</p>'
    return _table(head, body)


def _placements_table(snap: FleetSnapshot) -> str:
    head = (
        "node",
        "model",
        "state",
        "staging",
        "in flight",
        "queue",
        "via cortex",
        "decode tok/s",
        "group rank / world",
        "memory",
        "error",
    )
    body = []
    for n in snap.nodes:
        for m in n.models:
            body.append(
                _tr(
                    [
                        _e(n.name) + ("" if n.healthy else ' <span class="badge bad">down</span>'),
                        f"<b>{_e(m.model_id)}</b>",
                        _state(m.state),
                        _staging(m.staging),
                        _num(m.in_flight),
                        _num(m.queue_depth, warn=m.queue_depth > 0),
                        _num(snap.outstanding_on(n.name, m.model_id)),
                        _num(f"{m.decode_tps:.1f}") if m.decode_tps is not None else _NONE,
                        _group(m),
                        _num(_gib(m.memory_bytes)) if m.memory_bytes else _NONE,
                        f'<span class="err">{_e(m.error)}</span>' if m.error else "",
                    ],
                    cls="down" if not n.healthy else "",
                )
            )
    if not body:
        return '<p class="dim">No model is loaded on any node.</p>'
    return _table(head, body)


def _catalogue_table(rows: Sequence[CatalogueRow], snap: FleetSnapshot) -> str:
    head = ("model", "loaded where", "feasible on", "replicas want / have", "status")
    body = []
    for r in rows:
        where = [
            f"{_e(n.name)} {_state(m.state)}"
            + ("" if n.healthy else " <span class='dim'>(down)</span>")
            for n, m in snap.locations(r.model_id)
        ]
        if r.feasible_error is not None:
            feasible = f'<span class="err">{_e(r.feasible_error)}</span>'
        elif r.feasible_on:
            feasible = ", ".join(_e(" + ".join(s)) for s in r.feasible_on)
        else:
            feasible = '<span class="err">no node set fits</span>'
        short = r.present < r.wanted
        status = []
        if r.loading_on is not None:
            status.append(
                f'<span class="badge warn">loading</span> on {_e(", ".join(r.loading_on))}'
            )
        if r.last_failure:
            status.append(f'<span class="err">last load failed: {_e(r.last_failure)}</span>')
        if r.why:
            status.append(f'<span class="why">{_e(r.why)}</span>')
        aliases = f"<br><span class='dim'>{_e(', '.join(r.aliases))}</span>" if r.aliases else ""
        body.append(
            _tr(
                [
                    f"<b>{_e(r.model_id)}</b>{aliases}",
                    "<br>".join(where) or '<span class="dim">nowhere</span>',
                    feasible,
                    _num(f"{r.wanted} / {r.present}", warn=short),
                    "<br>".join(status) or _NONE,
                ],
                attrs=f'data-model="{_e(r.model_id)}"',
            )
        )
    if not body:
        return '<p class="dim">The catalogue is empty.</p>'
    return _table(head, body)


# -- small pieces ---------------------------------------------------------------------

_NONE = '<span class="dim">&ndash;</span>'


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _section(title: str, inner: str) -> str:
    return f"<section><h2>{_e(title)}</h2>{inner}</section>"


def _table(head: Sequence[str], rows: Sequence[str]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _tr(cells: Sequence[str], *, cls: str = "", attrs: str = "") -> str:
    """A row of cells that are already HTML (each built from escaped values)."""
    opening = "<tr" + (f' class="{cls}"' if cls else "") + (f" {attrs}" if attrs else "") + ">"
    return opening + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _num(value: object, *, warn: bool = False) -> str:
    return f'<span class="num{" warnnum" if warn else ""}">{_e(value)}</span>'


_STATE_CLASS: Mapping[str, str] = {"ready": "ok", "failed": "bad", "unloading": "idle"}


def _state(state: str) -> str:
    busy = state in LOADING_STATES or state in ACTIVE_STATES
    cls = _STATE_CLASS.get(state, "warn" if busy else "idle")
    return f'<span class="badge {cls}" data-state="{_e(state)}">{_e(state)}</span>'


def _group(m: NodeModel) -> str:
    g = m.group
    if g is None or g.world_size < 2:
        return '<span class="dim">single</span>'
    return (
        f"{_num(f'{g.rank} / {g.world_size}')} <span class='dim'>{_e(g.backend)} "
        f"{_e(g.sharding)} · {_e(g.group_id[:8])}</span>"
    )


def _staging(p: StageProgress | None) -> str:
    """A bar of bytes done over total, with the figures; the error of a failed stage."""
    if p is None:
        return _NONE
    frac = p.fraction
    bar = (
        f'<progress max="100" value="{frac * 100:.0f}">{frac * 100:.0f}%</progress>'
        if frac is not None and p.active
        else ""
    )
    err = f'<br><span class="err">{_e(p.error)}</span>' if p.error else ""
    return (
        f'<div class="staging" data-stage-state="{_e(p.state)}">{_state(p.state)} {bar}'
        f'<br><span class="num">{_e(p.summary())}</span>{err}</div>'
    )


def _memory(available: int, total: int, *, known: bool) -> str:
    if not known and not total:
        return _NONE
    if not total:
        return _num(f"{_gib(available)} / ?")
    used = max(0.0, min(1.0, 1 - available / total))
    bar_cls = "bar hot" if used > 0.9 else "bar"
    return (
        f"{_num(f'{_gib(available)} / {_gib(total)}')}"
        f'<div class="{bar_cls}"><div style="width:{used * 100:.0f}%"></div></div>'
        f'<span class="dim">{used * 100:.0f}% used</span>'
    )


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {s:02d}s"
    return f"{s}s"


def _ago(seconds: float) -> str:
    return f"{_duration(seconds)} ago"


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 -apple-system, system-ui, "Segoe UI", Roboto, sans-serif;
  margin: 0; padding: 16px 24px 32px; color: #1d2330; background: #f4f6f9; }
header { margin-bottom: 12px; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 15px; margin: 20px 0 6px; color: #39445a;
  text-transform: uppercase; letter-spacing: .04em; }
.summary { font-size: 15px; margin-bottom: 2px; }
table { border-collapse: collapse; width: 100%; background: #fff;
  border: 1px solid #d8dde6; border-radius: 6px; overflow: hidden; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #e8ebf0;
  vertical-align: top; }
th { background: #eef1f6; font-size: 12px; color: #4a5568; font-weight: 600;
  white-space: nowrap; }
tbody tr:last-child td { border-bottom: none; }
tr.down td { background: #fdf1f1; }
.dim { color: #7a8599; font-size: 12px; }
.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
.warnnum { color: #b45309; font-weight: 600; }
.err { color: #b42318; font-size: 12px; word-break: break-word; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px;
  font-weight: 600; white-space: nowrap; }
.badge.ok { background: #dcfce7; color: #166534; }
.badge.bad { background: #fee2e2; color: #991b1b; }
.badge.warn { background: #fef3c7; color: #92400e; }
.badge.idle { background: #e5e7eb; color: #374151; }
.bar { width: 140px; height: 6px; background: #e5e7eb; border-radius: 3px; margin-top: 3px; }
.bar > div { height: 100%; background: #3b82f6; border-radius: 3px; }
progress { width: 140px; height: 8px; vertical-align: middle; }
.bar.hot > div { background: #dc2626; }
"""
