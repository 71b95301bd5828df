"""Test hosts in network namespaces: one bridge, one namespace per node.

Each namespace gets its own address on a private /24 that exists only inside
this machine (a bridge we create), so ranks talk over a real network hop
instead of loopback. Multicast crosses the bridge as on a LAN switch (mDNS
discovery between namespaces: tests/e2e/test_discovery.py). Needs root and
iproute2; `available()` says whether.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import attrs


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *args] if ns is None else ["ip", "netns", "exec", ns, "ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=10)


def available() -> bool:
    """Root with iproute2 and permission to create a namespace."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        return False
    probe = f"cnprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return False
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return True


@attrs.frozen
class TestHost:
    name: str  # namespace name
    address: str

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """The command line that runs argv inside this host's namespace."""
        return ["ip", "netns", "exec", self.name, *argv]


@contextmanager
def hosts(count: int) -> Iterator[list[TestHost]]:
    """`count` namespaces on one bridge; the root namespace is .1 on it."""
    tag = os.getpid() % 100000
    subnet = f"10.203.{tag % 250}"
    bridge = f"cnbr{tag}"
    made: list[TestHost] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i in range(count):
            ns = f"cn{tag}h{i}"
            outer, inner = f"cn{tag}o{i}", f"cn{tag}i{i}"
            _ip("netns", "add", ns)
            made.append(TestHost(ns, f"{subnet}.{i + 2}"))
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", bridge)
            _ip("link", "set", outer, "up")
            _ip("link", "set", "lo", "up", ns=ns)
            _ip("addr", "add", f"{subnet}.{i + 2}/24", "dev", inner, ns=ns)
            _ip("link", "set", inner, "up", ns=ns)
            # Multicast leaves by the bridge: a socket that joins a group without naming
            # an interface (INADDR_ANY) needs a route for it, or gets ENODEV.
            _ip("route", "add", "224.0.0.0/4", "dev", inner, ns=ns)
        yield made
    finally:
        for h in made:
            subprocess.run(["ip", "netns", "del", h.name], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=10)
