"""Plumbing for tests that start whole local fleets as processes: ports, leftovers, pip.

`cortex fleet` and `neuron real-model` run as real commands; these helpers find
them a run of free ports, list what they left running, and give them an
environment in which pip can reach no package index.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path


def free_port_run(count: int) -> int:
    """A base port with `count` free ports after it (a fleet or a ring block takes
    consecutive ports), below Linux's ephemeral range (32768 on): a port there may be
    any test's outgoing connection by the time it is bound."""
    for _ in range(100):
        base = random.randrange(20000, 32000 - count)
        try:
            for p in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise AssertionError("no run of free ports")


def processes_of(root: Path) -> list[str]:
    """Live processes naming `root` or running in it ("pid: cmdline").

    The cwd counts too: a fleet's neurons are started with a relative `-c`.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cwd = os.readlink(entry / "cwd")
        except (OSError, IndexError):
            continue
        if state != "Z" and (str(root) in cmd or cwd.startswith(str(root))):
            found.append(f"{entry.name}: {cmd}")
    return found


def no_index_env(**extra: str) -> dict[str, str]:
    """This environment with pip pointed at nothing: no config file, no index, no links."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return env | {
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_INDEX": "1",
        "PIP_INDEX_URL": "http://127.0.0.1:9/",
        **extra,
    }
