"""The neuron says where it is: DNS-SD over multicast DNS, and GET /fleet/proof.

`neuron serve` announces the node under `_cortex-neuron._tcp.local.` (TXT: node
id, name, version, port) while it serves, and withdraws the announcement (mDNS
goodbye) as it stops, so a cortex with `discover = true` polls it without a
`[[neurons]]` entry. Announcing is on by default (`announce = true`), but only
takes effect once the neuron listens beyond loopback: a loopback-only neuron
(the default `host`) is reachable by no other host, so it announces nothing.

GET /fleet/proof?nonce=N answers without the fleet token: before cortex sends
its token to an address it heard of by multicast, the neuron there proves it
holds the same one (shared.fleet_discovery), or says it has none.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import attrs
from aiohttp import web

from neuron.config import NeuronConfig
from neuron.discovery import load_or_create_node_id, package_version
from shared.errors import InvalidRequest
from shared.fleet_discovery import (
    PROOF_PATH,
    SERVICE_TYPE,
    node_name,
    proof,
    txt_record,
    valid_nonce,
)

if TYPE_CHECKING:  # zeroconf is imported where it is used: only `neuron serve` announces
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

# The longest the goodbye may hold up a stop (it is three small packets).
GOODBYE_TIMEOUT_S = 3.0


@attrs.define
class _Identity:
    """The node id, read once from the store (after start-up has created it)."""

    node_id: str | None = None


_CONFIG = web.AppKey("announce_config", NeuronConfig)
_IDENTITY = web.AppKey("announce_identity", _Identity)


def setup(app: web.Application, config: NeuronConfig) -> None:
    """GET /fleet/proof on this app (its path is open in neuron.http.auth)."""
    app[_CONFIG] = config
    app[_IDENTITY] = _Identity()
    app.router.add_get(PROOF_PATH, get_proof)


def enable(app: web.Application, config: NeuronConfig) -> None:
    """`neuron serve`: the proof endpoint, and the announcement while the app serves."""
    setup(app, config)
    app.cleanup_ctx.append(_announcing)


async def get_proof(request: web.Request) -> web.Response:
    nonce = request.query.get("nonce", "")
    if not valid_nonce(nonce):
        raise InvalidRequest("'nonce' must be 32 to 128 lowercase hex characters", param="nonce")
    config = request.app[_CONFIG]
    node_id = await _node_id(request.app, config)
    body: dict[str, object] = {"node_id": node_id, "token": config.fleet_token is not None}
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    if config.fleet_token is not None and sock:
        # Signed with the address this connection reached: a relayed answer fails.
        body["proof"] = proof(
            config.fleet_token, nonce=nonce, node_id=node_id, host=sock[0], port=sock[1]
        )
    return web.json_response(body)


async def _node_id(app: web.Application, config: NeuronConfig) -> str:
    known = app[_IDENTITY]
    if known.node_id is None:
        known.node_id = await asyncio.to_thread(load_or_create_node_id, config.store_path)
    return known.node_id


def addresses(host: str) -> list[str]:
    """The IPv4 addresses to announce for a neuron listening on `host` (none: loopback)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            ip = ipaddress.ip_address(socket.gethostbyname(host))
        except OSError:
            return []
    if ip.is_unspecified:
        return _machine_addresses()
    if ip.version != 4 or ip.is_loopback:
        return []
    return [ip.compressed]


def _machine_addresses() -> list[str]:
    import ifaddr

    out = []
    for adapter in ifaddr.get_adapters():
        for a in adapter.ips:
            if isinstance(a.ip, str) and not ipaddress.ip_address(a.ip).is_loopback:
                out.append(a.ip)
    return out


async def _announcing(app: web.Application) -> AsyncIterator[None]:
    config = app[_CONFIG]
    task: asyncio.Task[object] | None = None
    if not config.announce:
        log.info("announce = false: not announced over mDNS")
    elif not config.port:
        log.info("not announced over mDNS: port 0 (any free port) is not known in advance")
    else:
        found = await asyncio.to_thread(addresses, config.host)
        if found:
            task = asyncio.create_task(_announce(app, config, found), name="neuron announce")
        else:
            log.info(
                "not announced over mDNS: listening on %s, which no other host can reach",
                config.host,
            )
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _announce(app: web.Application, config: NeuronConfig, found: list[str]) -> None:
    """Register, hold the announcement until cancelled, then say goodbye."""
    from zeroconf import InterfaceChoice, IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    node_id = await _node_id(app, config)
    name = node_name(config.node_name or socket.gethostname().split(".")[0])
    info = AsyncServiceInfo(
        SERVICE_TYPE,
        f"{name}-{node_id[:8]}.{SERVICE_TYPE}",
        port=config.port,
        properties=txt_record(
            node_id=node_id, name=name, version=package_version(), port=config.port
        ),
        server=f"neuron-{node_id[:12]}.local.",
        parsed_addresses=found,
    )
    # A specific listening address: multicast on its interface only.
    where = found if config.host not in ("0.0.0.0", "") else InterfaceChoice.All
    zc = AsyncZeroconf(interfaces=where, ip_version=IPVersion.V4Only)
    registered = False
    try:
        # The first await probes for the name; the second sends the announcements.
        await (await zc.async_register_service(info, allow_name_change=True))
        registered = True
        log.info("announced over mDNS as %s at %s port %d", info.name, ", ".join(found), info.port)
        await asyncio.Event().wait()  # until the neuron stops
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # multicast refused (no route, a firewall): serve all the same
        log.warning("mDNS announcement failed: %s (cortex needs a [[neurons]] entry)", exc)
    finally:
        await asyncio.shield(_goodbye(zc, info if registered else None))


async def _goodbye(zc: AsyncZeroconf, info: AsyncServiceInfo | None) -> None:
    try:
        async with asyncio.timeout(GOODBYE_TIMEOUT_S):
            if info is not None:
                await (await zc.async_unregister_service(info))
            await zc.async_close()
    except (TimeoutError, OSError) as exc:
        log.debug("mDNS goodbye incomplete: %s", exc)
