"""Records for cortex unit tests: a node's discovery and placement's view of it."""

from __future__ import annotations

from typing import Any

from cortex.core.placement import NodeInfo
from shared.catalogue import GIB
from shared.wire import Discovery, RdmaPort


def disc(
    name: str,
    total_gib: float = 64,
    *,
    unified: bool = True,
    backends: tuple[str, ...] = ("ring",),
    rdma_active: int = 0,
    rdma_down: int = 0,
    ring_host: str | None = None,
    hostname: str | None = None,
    disk_gib: float = 100,
) -> Discovery:
    ports = tuple(RdmaPort(f"rdma_en{i}", 1, "PORT_ACTIVE") for i in range(rdma_active))
    ports += tuple(RdmaPort(f"rdma_dn{i}", 1, "PORT_DOWN") for i in range(rdma_down))
    return Discovery(
        node_id=f"id-{name}",
        hostname=hostname or name,
        version="0.1.0",
        os="Darwin",
        kernel="24.0",
        arch="arm64",
        chip="Apple M4 Max",
        memory_total_bytes=int(total_gib * GIB),
        memory_available_bytes=int(total_gib * GIB),
        unified_memory=unified,
        mlx_version="0.29",
        mlx_device="metal",
        recommended_working_set_bytes=None,
        backends=backends,
        rdma_ports=ports,
        disk_free_bytes=int(disk_gib * GIB),
        store_dir="/tmp/store",
        ring_host=ring_host if ring_host is not None else f"10.0.0.{sum(map(ord, name)) % 250}",
        started_at=0.0,
    )


def node(
    name: str,
    total_gib: float = 64,
    avail_gib: float | None = None,
    *,
    healthy: bool = True,
    reclaim_gib: float = 0,
    staged: tuple[str, ...] = (),
    loaded: tuple[str, ...] = (),
    **kw: Any,
) -> NodeInfo:
    return NodeInfo(
        name=name,
        healthy=healthy,
        discovery=disc(name, total_gib, **kw),
        memory_available_bytes=int((total_gib if avail_gib is None else avail_gib) * GIB),
        reclaimable_bytes=int(reclaim_gib * GIB),
        staged=frozenset(staged),
        loaded=frozenset(loaded),
    )
