"""A model's runner options on this node: their paths resolved, then its flags.

The catalogue's options arrive in the load request (shared.runner_options,
checked in its parse). Here their paths are held to the same rule as a model's
`source`: a draft model and an adapter directory must lie in the store or a
configured `model_roots` directory (after symlinks and `..`), or, for a draft
named by hub id, be a copy already staged here. A draft must share the model's
tokenizer. Then `flags` gives the runner's command line for them.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from neuron.store.sources import Store, copy_name, is_local_source
from shared.errors import InvalidModelPath
from shared.runner_options import (
    RunnerOptions,
    adapter_problem,
    draft_problem,
    template_kwargs_json,
)

DRAFT_PARAM = "options.draft_model"
ADAPTERS_PARAM = "options.adapters"


@attrs.frozen
class LocalOptions:
    """A model's runner options with their files found on this node."""

    options: RunnerOptions = attrs.Factory(RunnerOptions)
    draft_dir: Path | None = None
    adapter_dir: Path | None = None

    def flags(self) -> list[str]:
        """mlx_lm.server's flags for these options (each checked in mlx_lm 0.32's parser:
        --draft-model, --num-draft-tokens, --adapter-path, --chat-template-args)."""
        o = self.options
        out: list[str] = []
        if self.draft_dir is not None:
            out += ["--draft-model", str(self.draft_dir)]
            if o.num_draft_tokens is not None:
                out += ["--num-draft-tokens", str(o.num_draft_tokens)]
        if self.adapter_dir is not None:
            out += ["--adapter-path", str(self.adapter_dir)]
        if o.chat_template_kwargs:
            out += ["--chat-template-args", template_kwargs_json(o.chat_template_kwargs)]
        return [*out, *o.extra_args]


def draft_dir(store: Store, source: str) -> Path:
    """The draft's directory here: a local model directory, or a staged hub copy."""
    if not is_local_source(source):
        name = copy_name(source)
        if not store.has_copy(name):
            raise InvalidModelPath(
                f"draft_model {source!r} is not staged on this node: stage it first"
                " (`neuron stage`, or POST /store/stage), or name a local directory",
                param=DRAFT_PARAM,
            )
        return store.copy_dir(name).resolve()
    try:
        return store.local_model_dir(source)
    except InvalidModelPath as exc:
        raise InvalidModelPath(f"draft_model: {exc.message}", param=DRAFT_PARAM) from exc


def adapter_dir(store: Store, path: str) -> Path:
    """The adapter directory here (in the store or a model root), in mlx_lm's format."""
    if not is_local_source(path):
        raise InvalidModelPath(
            f"adapters {path!r} must be a local directory (in the store or a model root)",
            param=ADAPTERS_PARAM,
        )
    resolved = store.inside_roots(path, param=ADAPTERS_PARAM)
    problem = adapter_problem(resolved)
    if problem is not None:
        raise InvalidModelPath(problem, param=ADAPTERS_PARAM)
    return resolved


def resolve(store: Store, options: RunnerOptions, model_dir: Path | None = None) -> LocalOptions:
    """`options` with their files found (InvalidModelPath naming the option if not);
    with `model_dir`, a draft's tokenizer is checked against the model's (blocking)."""
    draft = None if options.draft_model is None else draft_dir(store, options.draft_model)
    adapters = None if options.adapters is None else adapter_dir(store, options.adapters)
    if draft is not None and model_dir is not None:
        problem = draft_problem(model_dir, draft)
        if problem is not None:
            raise InvalidModelPath(problem, param=DRAFT_PARAM)
    return LocalOptions(options=options, draft_dir=draft, adapter_dir=adapters)
