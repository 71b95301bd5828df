"""The model catalogue (`models.toml`): what the fleet may serve and how.

A model's memory need is given (`memory_gb`) or estimated from its files: the
weights are the safetensors sizes, the KV cache comes from config.json's
layer and head counts at the model's context limit. A draft model (speculative
decoding) adds its own weights and KV cache on the same node.

Per-model runner options (`draft_model`, `adapters`, `chat_template_kwargs`,
`max_tokens`, `max_tokens_cap`, `extra_args`, `env`) are checked by
shared.runner_options, the same checks the neuron makes at load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import attrs

from shared.config import ConfigError, load_toml, structure
from shared.kinds import ModelKind
from shared.model_id import check as check_model_id
from shared.runner_options import OptionError, RunnerOptions, adapter_problem, draft_problem

GIB = 1024**3


@attrs.frozen
class ModelFacts:
    """What placement needs to know of a model's shape."""

    weights_bytes: int
    kv_bytes: int
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    # A draft model's weights and KV cache, held next to the model's on its node.
    draft_weights_bytes: int = 0
    draft_kv_bytes: int = 0

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
    # Runner options (shared.runner_options), set here only, never by a client.
    # Speculative decoding: a draft model sharing the tokenizer (a local directory,
    # relative to this file, or a hub id staged on the node) and its tokens per step.
    draft_model: str | None = None
    num_draft_tokens: int | None = None
    # The draft's weights in GiB when its files are not local to cortex (a hub id).
    draft_memory_gb: float | None = None
    # A LoRA adapter directory (mlx_lm's format), under the neuron's store or model_roots.
    adapters: str | None = None
    # Variables for the chat template (enable_thinking = false...); clients cannot set them.
    chat_template_kwargs: dict[str, Any] = attrs.field(factory=dict, hash=False)
    # max_tokens when a client names none (else the neuron's runner.max_tokens); the
    # most a request gets (a larger ask is lowered to it, as to the context left).
    max_tokens: int | None = None
    max_tokens_cap: int | None = None
    # Appended to this model's runner command line (after the neuron's runner.extra_args).
    extra_args: tuple[str, ...] = ()
    # Added to this model's runner environment (shared.runner_options.check_env: the
    # neuron's own group variables and code-loading ones like LD_PRELOAD are refused).
    env: dict[str, str] = attrs.field(factory=dict, hash=False)

    def __attrs_post_init__(self) -> None:
        # Ids and aliases reach URLs, labels and pages: one charset (shared.model_id).
        check_model_id(self.id)
        for alias in self.aliases:
            check_model_id(alias, f"model {self.id!r}: alias")
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
        try:
            self.runner_options().check_for(
                kind=self.kind, world_size=self.min_nodes, context_limit=self.context_limit
            )
        except OptionError as exc:
            raise ValueError(f"model {self.id!r}: {exc}") from exc
        if self.draft_memory_gb is not None and self.draft_model is None:
            raise ValueError(f"model {self.id!r}: draft_memory_gb needs a draft_model")
        if self.adapters is not None and not _is_path(self.adapters):
            # Adapters are never fetched: a directory the neurons hold already.
            raise ValueError(f"model {self.id!r}: adapters must be a local directory path")

    def runner_options(self) -> RunnerOptions:
        """The options the load request carries (OptionError if one is out of bounds)."""
        # The catalogue's TOML is flat: a spec carries every option under its own name.
        return RunnerOptions(**{f.name: getattr(self, f.name) for f in attrs.fields(RunnerOptions)})

    @property
    def single_node(self) -> bool:
        """mlx_lm takes a draft model or adapters only without distribution."""
        return self.kind == "embedding" or self.draft_model is not None or bool(self.adapters)

    @property
    def draft_is_local(self) -> bool:
        return self.draft_model is not None and _is_path(self.draft_model)

    @property
    def is_local(self) -> bool:
        return _is_path(self.source)

    def names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)

    def facts(self) -> ModelFacts:
        """Weights and KV need, from the catalogue entry or the model's own files."""
        config, weights = _read_local(self.source)
        if self.memory_gb is not None:
            weights = int(self.memory_gb * GIB)
        layers = self.layers or config.get("num_hidden_layers")
        heads = self.heads or config.get("num_attention_heads")
        kv_heads = self.kv_heads or config.get("num_key_value_heads") or heads
        if self.kv_gb is not None:
            kv = int(self.kv_gb * GIB)
        elif self.kind == "embedding":
            kv = 0  # an encoder keeps no cache between requests
        else:
            kv = _kv_bytes(config, self.context_limit, layers, heads, kv_heads)
        draft_weights = draft_kv = 0
        if self.draft_model is not None:
            draft_config, draft_weights = _read_local(self.draft_model)
            if self.draft_memory_gb is not None:
                draft_weights = int(self.draft_memory_gb * GIB)
            draft_kv = _kv_bytes(draft_config, self.context_limit)
        return ModelFacts(
            weights_bytes=weights,
            kv_bytes=kv,
            layers=layers,
            heads=heads,
            kv_heads=kv_heads,
            draft_weights_bytes=draft_weights,
            draft_kv_bytes=draft_kv,
        )

    def option_problems(self) -> list[str]:
        """What would make a load fail for sure in its draft model or adapters, as far
        as this host sees them (a neuron elsewhere may see other files)."""
        out: list[str] = []
        where = f"model {self.id!r}"
        if self.adapters is not None:
            problem = adapter_problem(Path(self.adapters).expanduser())
            if problem is not None:
                out.append(f"{where}: {problem}")
        if self.draft_is_local:
            assert self.draft_model is not None
            draft = Path(self.draft_model).expanduser()
            if not draft.exists():
                out.append(f"{where}: draft_model {str(draft)!r} does not exist")
            elif (problem := draft_problem(Path(self.source).expanduser(), draft)) is not None:
                out.append(f"{where}: {problem}")
        return out

    def to_json(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        for k in ("aliases", "pinned_on", "extra_args"):
            d[k] = list(d[k])
        return d


def _is_path(source: str) -> bool:
    return source.startswith(("/", ".", "~"))


def _read_local(source: str) -> tuple[dict[str, Any], int]:
    """(config.json, safetensors bytes) of a local model directory; ({}, 0) otherwise."""
    config: dict[str, Any] = {}
    path = Path(source).expanduser() if _is_path(source) else None
    if path is None or not path.is_dir():
        return config, 0
    cfg = path / "config.json"
    if cfg.is_file():
        config = json.loads(cfg.read_text())
    return config, sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _kv_bytes(
    config: dict[str, Any],
    context: int,
    layers: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
) -> int:
    """K and V, fp16, one sequence at the full context; 0 when the shape is unknown."""
    layers = layers or config.get("num_hidden_layers")
    heads = heads or config.get("num_attention_heads")
    kv_heads = kv_heads or config.get("num_key_value_heads") or heads
    if not (layers and kv_heads and heads and config.get("hidden_size")):
        return 0
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return int(2 * layers * kv_heads * head_dim * context * 2)


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
        models = tuple(_relative_to(base, m) for m in raw.models)
        try:
            return cls(models=models, path=str(p))
        except ValueError as exc:
            raise ConfigError(f"{p}: {exc}") from exc

    def resolve(self, name: str) -> ModelSpec | None:
        return self._by_name.get(name)

    def get(self, model_id: str) -> ModelSpec | None:
        m = self._by_name.get(model_id)
        return m if m is not None and m.id == model_id else None


def _relative_to(base: Path, m: ModelSpec) -> ModelSpec:
    """`m` with its relative paths (source, draft_model, adapters) made absolute from `base`."""
    changes: dict[str, Any] = {
        key: str((base / value).resolve())
        for key in ("source", "draft_model", "adapters")
        if isinstance(value := getattr(m, key), str) and value.startswith(".")
    }
    return attrs.evolve(m, **changes) if changes else m
