"""Typed application keys: where cortex keeps its state on the aiohttp app."""

from __future__ import annotations

import attrs
from aiohttp import web

from cortex.config import CortexConfig
from cortex.core.state import AffinityTable, Fleet
from cortex.core.tracing import Trace
from cortex.http.auth import Auth
from cortex.http.proxy import Proxy
from cortex.metrics import Metrics
from cortex.run.lifecycle import Lifecycle
from cortex.run.loader import Loader
from cortex.run.poller import Poller
from cortex.run.reconciler import Reconciler
from shared.catalogue import Catalogue
from shared.drain import Drain
from shared.journal import Journal


@attrs.frozen
class Started:
    """When this app was created, for uptime (monotonic) and display (wall clock)."""

    monotonic: float
    wall: float


CONFIG = web.AppKey("config", CortexConfig)
CATALOGUE = web.AppKey("catalogue", Catalogue)
FLEET = web.AppKey("fleet", Fleet)
METRICS = web.AppKey("metrics", Metrics)
AUTH = web.AppKey("auth", Auth)
AFFINITY = web.AppKey("affinity", AffinityTable)
STARTED = web.AppKey("started", Started)
DRAIN = web.AppKey("drain", Drain)
# Set while the app runs (they need its event loop).
POLLER = web.AppKey("poller", Poller)
LOADER = web.AppKey("loader", Loader)
PROXY = web.AppKey("proxy", Proxy)
RECONCILER = web.AppKey("reconciler", Reconciler)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
# Finished requests' traces (the events journal is the lifecycle's).
TRACES = web.AppKey("traces", Journal[Trace])
