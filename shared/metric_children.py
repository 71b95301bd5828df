"""Labelled metric children looked up once: the request path's `labels()` calls.

prometheus_client's `labels()` takes a lock, builds a tuple of str() and looks
it up, per call; a hop's request made five or six of them. Cached here by
(family, label values), so a call is one dict lookup. The label sets are
bounded (catalogue ids, codes); `forget` drops a model's when its series are
removed, so a removed child is never counted into again.
"""

from __future__ import annotations

from typing import TypeVar, cast

import attrs
from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)


@attrs.define
class Children:
    _cache: dict[tuple[object, tuple[str, ...]], MetricWrapperBase] = attrs.Factory(dict)

    def get(self, family: M, *values: str) -> M:
        """`family.labels(*values)`, cached."""
        key = (family, values)
        got = self._cache.get(key)
        if got is None:
            got = self._cache[key] = family.labels(*values)
        return cast(M, got)

    def forget(self, first: str) -> None:
        """Drop the cached children whose first label value is `first`."""
        for key in [k for k in self._cache if k[1] and k[1][0] == first]:
            del self._cache[key]
