"""What a neuron announces over DNS-SD/mDNS, and the proof it holds the fleet token.

Both ends read this one module: the neuron (neuron.announce) builds its TXT
record and answers GET /fleet/proof; cortex (cortex.run.discover) parses what it
hears and checks the proof before it ever sends the fleet token to an announced
address. An announcement is unauthenticated multicast: anyone on the link can
send one, so cortex must not take it at its word.

The proof is HMAC-SHA256 under the fleet token of cortex's fresh nonce, the
node id and the address the neuron saw the question arrive on. The address
binding means an impostor cannot pass a real neuron's answer off as its own:
the real neuron signs its own address, which is not the one cortex dialled.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Mapping

import attrs

# A service type of our own (RFC 6763: "_" + at most 15 characters).
SERVICE_TYPE = "_cortex-neuron._tcp.local."
TXT_VERSION = "1"
PROOF_PATH = "/fleet/proof"
# Node names cortex gives discovered nodes: they appear in URLs (/admin/nodes/{name})
# and logs, so they keep to a plain charset.
_NAME_OK = re.compile(r"[A-Za-z0-9._-]")
_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_NAME = 40


@attrs.frozen
class Announcement:
    """One neuron as heard over mDNS: who it says it is and where it listens."""

    # The DNS-SD instance name it was announced under.
    service: str
    node_id: str
    name: str
    version: str
    port: int
    addresses: tuple[str, ...]

    @property
    def urls(self) -> tuple[str, ...]:
        """http://address:port for each announced address, in the announced order."""
        return tuple(f"http://{_host(a)}:{self.port}" for a in self.addresses)


def txt_record(*, node_id: str, name: str, version: str, port: int) -> dict[str, str]:
    """The TXT record a neuron announces (each value far below DNS's 255 bytes)."""
    return {
        "txtvers": TXT_VERSION,
        "node_id": node_id,
        "name": node_name(name),
        "version": version[:64],
        "port": str(port),
    }


def parse_txt(
    service: str,
    properties: Mapping[bytes, bytes | None],
    *,
    port: int | None,
    addresses: tuple[str, ...],
) -> Announcement | str:
    """The announcement, or why it is unusable (a reason for the log).

    `port` is the SRV record's (the DNS-SD way); the TXT port stands in when a
    record arrives without one. Unknown TXT keys are ignored (later versions may
    add some); a different `txtvers` is refused.
    """
    txt = {
        k.decode("utf-8", "replace"): (v or b"").decode("utf-8", "replace")
        for k, v in properties.items()
    }
    if txt.get("txtvers") != TXT_VERSION:
        return f"{service}: TXT version {txt.get('txtvers')!r}, not {TXT_VERSION!r}"
    node_id = txt.get("node_id", "")
    if not _ID_RE.fullmatch(node_id):
        return f"{service}: no usable node_id in its TXT record"
    if port is None or port <= 0:
        text = txt.get("port", "")
        port = int(text) if text.isdigit() else 0
    if not 0 < port <= 65535:
        return f"{service}: no usable port"
    usable = tuple(a for a in addresses if _usable(a))
    if not usable:
        return f"{service}: no usable address (only {list(addresses)})"
    return Announcement(
        service=service,
        node_id=node_id,
        name=node_name(txt.get("name", "") or node_id[:8]),
        version=txt.get("version", "")[:64],
        port=port,
        addresses=usable,
    )


def node_name(text: str) -> str:
    """`text` within the node-name charset: other characters become '-'."""
    name = "".join(c if _NAME_OK.fullmatch(c) else "-" for c in text.strip())[:MAX_NAME]
    return name.strip("-.") or "node"


def _usable(address: str) -> bool:
    """An address another host can dial: IPv4, not loopback, unspecified or multicast."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.version == 4 and not ip.is_loopback and not ip.is_unspecified and not ip.is_multicast


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def normal_address(host: str) -> str:
    """An IP as both ends write it: IPv4-mapped IPv6 as IPv4, no zone, compressed."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.compressed


def proof(token: str, *, nonce: str, node_id: str, host: str, port: int) -> str:
    """HMAC-SHA256 (hex) under the fleet token of what binds one answer to one question."""
    message = f"cortex-neuron fleet proof v1\n{nonce}\n{node_id}\n{normal_address(host)}:{port}"
    return hmac.new(token.encode(), message.encode(), hashlib.sha256).hexdigest()


def valid_nonce(nonce: str) -> bool:
    """A nonce cortex sends: 32 to 128 hex characters."""
    return 32 <= len(nonce) <= 128 and all(c in "0123456789abcdef" for c in nonce)
