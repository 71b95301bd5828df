"""The model catalogue (`models.toml`): what the fleet may serve and how.

A model's memory need is given (`memory_gb`) or estimated from its files: the
weights are the safetensors sizes, the KV cache comes from config.json's
layer and head counts at the model's context limit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import attrs

from shared.config import ConfigError, load_toml, structure
from shared.kinds import ModelKind

GIB = 1024**3


@attrs.frozen
class ModelFacts:
    """What placement needs to know of a model's shape."""

    weights_bytes: int
    kv_bytes: int
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class ModelSpec:
    id: str
    source: str
    aliases: tuple[str, ...] = ()
    # Weights in GiB when the files are not local to cortex (hub models).
    memory_gb: float | None = None
    # KV cache in GiB at context_limit; estimated from config.json when absent.
    kv_gb: float | None = None
    pinned_on: tuple[str, ...] = ()
    replicas: int = 1
    keep_loaded: bool = False
    context_limit: int = 4096
    min_nodes: int = 1
    sharding: Literal["tensor", "pipeline"] = "tensor"
    backend: Literal["ring", "jaccl", "auto"] = "auto"
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    # Unload a copy idle this long (seconds; negative: never); None: the fleet default.
    idle_ttl_s: float | None = None
    # Stage the model's files on every node that could hold it, ahead of any request.
    prefetch: bool = False
    # Load `replicas` copies whenever memory is free for them (never evicting for it);
    # unlike keep_loaded, a default model may itself be evicted to make room.
    default: bool = False
    # "chat" (a decoder: chat, completions and the APIs translated onto them) or
    # "embedding" (an encoder: POST /v1/embeddings only).
    kind: ModelKind = "chat"

    def __attrs_post_init__(self) -> None:
        if self.kind == "embedding" and self.min_nodes != 1:
            # The embedding runner has no distributed mode: an encoder is small.
            raise ValueError(
                f"model {self.id!r}: an embedding model runs on one node (min_nodes 1)"
            )
        if self.replicas < 0:
            raise ValueError(f"model {self.id!r}: replicas must be >= 0")
        if self.min_nodes < 1:
            raise ValueError(f"model {self.id!r}: min_nodes must be >= 1")
        if self.context_limit < 1:
            raise ValueError(f"model {self.id!r}: context_limit must be >= 1")

    @property
    def is_local(self) -> bool:
        return self.source.startswith(("/", ".", "~"))

    def names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)

    def facts(self) -> ModelFacts:
        """Weights and KV need, from the catalogue entry or the model's own files."""
        config: dict[str, Any] = {}
        weights = 0
        path = Path(self.source).expanduser() if self.is_local else None
        if path is not None and path.is_dir():
            cfg = path / "config.json"
            if cfg.is_file():
                config = json.loads(cfg.read_text())
            weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        if self.memory_gb is not None:
            weights = int(self.memory_gb * GIB)
        layers = self.layers or config.get("num_hidden_layers")
        heads = self.heads or config.get("num_attention_heads")
        kv_heads = self.kv_heads or config.get("num_key_value_heads") or heads
        if self.kv_gb is not None:
            kv = int(self.kv_gb * GIB)
        elif self.kind == "embedding":
            kv = 0  # an encoder keeps no cache between requests
        elif layers and kv_heads and heads and config.get("hidden_size"):
            head_dim = config.get("head_dim") or config["hidden_size"] // heads
            # K and V, fp16, one sequence at the full context.
            kv = 2 * layers * kv_heads * head_dim * self.context_limit * 2
        else:
            kv = 0
        return ModelFacts(
            weights_bytes=weights, kv_bytes=kv, layers=layers, heads=heads, kv_heads=kv_heads
        )

    def to_json(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        for k in ("aliases", "pinned_on"):
            d[k] = list(d[k])
        return d


@attrs.frozen
class _CatalogueFile:
    models: tuple[ModelSpec, ...] = ()


@attrs.frozen
class Catalogue:
    models: tuple[ModelSpec, ...] = ()
    path: str | None = None
    # Every id and alias -> its entry: every routed request resolves a name.
    _by_name: dict[str, ModelSpec] = attrs.field(factory=dict, init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        seen: dict[str, ModelSpec] = {}
        for m in self.models:
            for name in m.names():
                if name in seen:
                    raise ValueError(f"name {name!r} used by both {seen[name].id!r} and {m.id!r}")
                seen[name] = m
        object.__setattr__(self, "_by_name", seen)

    @classmethod
    def load(cls, path: str | Path) -> Catalogue:
        p = Path(path)
        raw = structure(_CatalogueFile, load_toml(p), file=str(p))
        base = p.resolve().parent
        models = tuple(
            attrs.evolve(m, source=str((base / m.source).resolve()))
            if m.source.startswith(".")
            else m
            for m in raw.models
        )
        try:
            return cls(models=models, path=str(p))
        except ValueError as exc:
            raise ConfigError(f"{p}: {exc}") from exc

    def resolve(self, name: str) -> ModelSpec | None:
        return self._by_name.get(name)

    def get(self, model_id: str) -> ModelSpec | None:
        m = self._by_name.get(model_id)
        return m if m is not None and m.id == model_id else None
