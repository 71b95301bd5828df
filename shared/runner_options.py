"""A model's runner options: set per model in the catalogue, never by a client.

The catalogue (`models.toml`) names them per model; cortex sends them in the
load request (`LoadRequest.options`); the neuron checks them again, resolves
their paths under its store and model roots, and turns them into the runner's
command line (`neuron.runner.process.runner_argv`) and its request defaults
(`neuron.runner.request_check`). A client's `draft_model`, `adapters`,
`num_draft_tokens` or `chat_template_kwargs` never reach the runner.

One set of checks serves `cortex check`, cortex's start and the neuron's load
(`OptionError` names the key), so a bad value is refused before any runner starts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import attrs

# mlx_lm's speculative decoding drafts this many tokens per step by default (3).
MAX_DRAFT_TOKENS = 32
MAX_EXTRA_ARGS = 64
MAX_ARG_CHARS = 1024
MAX_PATH_CHARS = 4096
MAX_TEMPLATE_KWARGS_CHARS = 4096
# A template variable's name (it becomes a Jinja variable of the chat template).
TEMPLATE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# mlx_lm.server calls `apply_chat_template(messages, tools=..., tokenize=True,
# add_generation_prompt=True, **kwargs)`: these names would clash with its own.
TEMPLATE_RESERVED = frozenset(
    {
        "messages",
        "conversation",
        "tools",
        "tokenize",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template",
        "documents",
        "return_dict",
        "return_tensors",
        "padding",
        "truncation",
        "max_length",
        "tokenizer_kwargs",
        "return_assistant_tokens_mask",
    }
)
# Runner flags the neuron sets itself, or that have a catalogue key of their own:
# an `extra_args` entry naming one (or an abbreviation argparse would expand to one)
# is refused. `--host` above all: a runner listens on loopback only.
RESERVED_FLAGS: dict[str, str] = {
    "--model": "the model is the catalogue's `source`",
    "--host": "a runner listens on 127.0.0.1 only",
    "--port": "the neuron picks the runner's port",
    "--adapter-path": "use the catalogue key `adapters`",
    "--draft-model": "use the catalogue key `draft_model`",
    "--num-draft-tokens": "use the catalogue key `num_draft_tokens`",
    "--chat-template-args": "use the catalogue key `chat_template_kwargs`",
    "--max-tokens": "use the catalogue keys `max_tokens` and `max_tokens_cap`",
    "--pipeline": "set from the catalogue's `sharding`",
    "--help": "it prints help and exits",
    "--neuron-model-id": "the neuron's own marker",
}
NUMBER = re.compile(r"^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

# --- a model's runner environment (`env`) --------------------------------------------
MAX_ENV_VARS = 64
MAX_ENV_VALUE_CHARS = 4096
ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,127}$")
# Variables the neuron sets itself for a runner (neuron.runner.process `group_env`,
# its parent pid, watchdog fd and unbuffered output): a group whose rank, world size,
# coordinator or device file a catalogue entry could rewrite would join the wrong
# group, and a runner without its watchdog would outlive its neuron.
# MLX_METAL_FAST_SYNCH is the neuron's default for jaccl groups, not reserved: a
# model's env may set it otherwise. (tests/neuron/test_runner_env.py keeps this
# list in step with group_env.)
ENV_RESERVED = frozenset(
    {
        "MLX_RANK",
        "MLX_WORLD_SIZE",
        "MLX_HOSTFILE",
        "MLX_JACCL_COORDINATOR",
        "MLX_IBV_DEVICES",
        "NEURON_PIPELINE_SPLIT",
        "NEURON_PARENT_PID",
        "NEURON_WATCHDOG_FD",
    }
)
# Variables that change which code the runner executes rather than how it runs: the
# catalogue is a settings file, and must not become a way to run other code under
# the neuron's account. PATH picks the executables the runner spawns; LD_* / DYLD_*
# inject shared libraries (LD_PRELOAD, DYLD_INSERT_LIBRARIES); PYTHON* choose the
# interpreter's modules and start-up code (PYTHONPATH, PYTHONHOME, PYTHONSTARTUP...);
# BASH_ENV / ENV run a script in any shell the runner starts.
ENV_REFUSED = frozenset({"PATH", "BASH_ENV", "ENV", "IFS"})
ENV_REFUSED_PREFIXES = ("LD_", "DYLD_", "PYTHON")


class OptionError(ValueError):
    """A runner option out of bounds; `param` names its key."""

    def __init__(self, param: str, what: str) -> None:
        super().__init__(f"{param} {what}")
        self.param = param
        self.what = what


def _positive(value: int | None, param: str, hi: int = 2**31 - 1) -> None:
    if value is not None and (
        not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= hi
    ):
        raise OptionError(param, f"must be an integer in [1, {hi}]")


def _path(value: str | None, param: str) -> None:
    if value is not None and (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_PATH_CHARS
        or any(c in value for c in "\x00\r\n")
    ):
        raise OptionError(param, f"must be a path or hub id of 1..{MAX_PATH_CHARS} characters")


def template_kwargs_json(kwargs: dict[str, Any]) -> str:
    """`chat_template_kwargs` as the runner's `--chat-template-args` JSON, or OptionError."""
    param = "chat_template_kwargs"
    for name in kwargs:
        if not isinstance(name, str) or not TEMPLATE_NAME.match(name):
            raise OptionError(param, f"key {str(name)[:64]!r} is not a template variable name")
        if name in TEMPLATE_RESERVED:
            raise OptionError(param, f"key {name!r} is the runner's own template argument")
    try:
        # allow_nan=False: NaN is no JSON; a TOML date has no JSON form either.
        text = json.dumps(kwargs, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError, RecursionError) as exc:
        raise OptionError(
            param, "must hold strings, numbers, booleans, arrays and tables only"
        ) from exc
    if len(text) > MAX_TEMPLATE_KWARGS_CHARS:
        raise OptionError(param, f"is over {MAX_TEMPLATE_KWARGS_CHARS} characters as JSON")
    return text


def check_env(env: dict[str, str]) -> None:
    """OptionError for a runner environment entry out of bounds (see ENV_RESERVED)."""
    if not isinstance(env, dict):
        raise OptionError("env", "must be a table of strings")
    if len(env) > MAX_ENV_VARS:
        raise OptionError("env", f"has more than {MAX_ENV_VARS} variables")
    for name, value in env.items():
        if not isinstance(name, str) or not ENV_NAME.match(name):
            raise OptionError(
                "env", f"name {str(name)[:64]!r} is not a variable name ([A-Z_][A-Z0-9_]*)"
            )
        param = f"env.{name}"
        if name in ENV_RESERVED:
            raise OptionError(param, "is set by the neuron itself for every runner or group")
        if name in ENV_REFUSED or name.startswith(ENV_REFUSED_PREFIXES):
            raise OptionError(param, "is refused: it would change which code the runner runs")
        if not isinstance(value, str) or len(value) > MAX_ENV_VALUE_CHARS:
            raise OptionError(
                param, f"must be a string of at most {MAX_ENV_VALUE_CHARS} characters"
            )
        if "\x00" in value:
            raise OptionError(param, "holds a NUL byte")


def check_extra_args(args: tuple[str, ...]) -> None:
    """OptionError for an entry the runner must not get (see RESERVED_FLAGS)."""
    if len(args) > MAX_EXTRA_ARGS:
        raise OptionError("extra_args", f"has more than {MAX_EXTRA_ARGS} entries")
    for i, arg in enumerate(args):
        param = f"extra_args[{i}]"
        if not isinstance(arg, str) or not 0 < len(arg) <= MAX_ARG_CHARS:
            raise OptionError(param, f"must be a string of 1..{MAX_ARG_CHARS} characters")
        if any(c in arg for c in "\x00\r\n"):
            raise OptionError(param, "holds a control character")
        if not arg.startswith("-") or NUMBER.match(arg):
            continue  # a value (a negative number too), not a flag
        name = arg.split("=", 1)[0]
        if not name.startswith("--"):
            if name.startswith("-h"):
                raise OptionError(param, f"{name!r}: {RESERVED_FLAGS['--help']}")
            continue
        # argparse expands an unambiguous prefix (`--ho` is `--host`): refuse those too.
        for flag, why in RESERVED_FLAGS.items():
            if len(name) > 2 and flag.startswith(name):
                raise OptionError(param, f"{name!r} is refused ({flag}: {why})")


@attrs.frozen
class RunnerOptions:
    """What the catalogue sets for one model's runner (every field optional)."""

    # Speculative decoding: a small model with the same tokenizer (a local model
    # directory, or a hub id staged on the node), and tokens it drafts per step.
    draft_model: str | None = None
    num_draft_tokens: int | None = None
    # A LoRA adapter directory (adapter_config.json + adapters.safetensors).
    adapters: str | None = None
    # Variables for the chat template (e.g. enable_thinking = false).
    chat_template_kwargs: dict[str, Any] = attrs.field(factory=dict, hash=False)
    # Default max_tokens when a client names none; the most any request gets.
    max_tokens: int | None = None
    max_tokens_cap: int | None = None
    # Appended to this model's runner command line, after the neuron's own.
    extra_args: tuple[str, ...] = ()
    # Added to the runner's environment (checked by check_env); any model kind.
    env: dict[str, str] = attrs.field(factory=dict, hash=False)

    def __attrs_post_init__(self) -> None:
        _path(self.draft_model, "draft_model")
        _path(self.adapters, "adapters")
        _positive(self.num_draft_tokens, "num_draft_tokens", MAX_DRAFT_TOKENS)
        if self.num_draft_tokens is not None and self.draft_model is None:
            raise OptionError("num_draft_tokens", "needs a draft_model")
        _positive(self.max_tokens, "max_tokens")
        _positive(self.max_tokens_cap, "max_tokens_cap")
        if (
            self.max_tokens is not None
            and self.max_tokens_cap is not None
            and self.max_tokens > self.max_tokens_cap
        ):
            raise OptionError(
                "max_tokens", f"({self.max_tokens}) is over max_tokens_cap ({self.max_tokens_cap})"
            )
        if not isinstance(self.chat_template_kwargs, dict):
            raise OptionError("chat_template_kwargs", "must be a table")
        template_kwargs_json(self.chat_template_kwargs)
        check_extra_args(self.extra_args)
        check_env(self.env)

    @property
    def empty(self) -> bool:
        return self == RunnerOptions()

    def check_for(
        self, *, kind: str, world_size: int = 1, context_limit: int | None = None
    ) -> None:
        """OptionError for options this model cannot take: an embedding model takes
        none, a multi-node group no draft or adapters (mlx_lm refuses them there)."""
        # `env` is the runner's environment, which an embedding runner has too.
        if kind != "chat" and not attrs.evolve(self, env={}).empty:
            first = next(k for k, v in self.to_json().items() if v and k != "env")
            raise OptionError(first, "applies to chat models only")
        if world_size > 1:
            for key in ("draft_model", "adapters"):
                if getattr(self, key) is not None:
                    raise OptionError(key, "needs a single-node model (min_nodes = 1)")
        if context_limit is not None:
            for key in ("max_tokens", "max_tokens_cap"):
                value = getattr(self, key)
                if value is not None and value > context_limit:
                    raise OptionError(key, f"({value}) is over context_limit ({context_limit})")

    def to_json(self) -> dict[str, Any]:
        """Only the fields set (an older neuron takes a load without any of them)."""
        out: dict[str, Any] = {}
        for f in attrs.fields(RunnerOptions):
            value = getattr(self, f.name)
            if value is None or value == () or value == {}:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, d: Any) -> RunnerOptions:
        """Strictly (OptionError naming the key); None or absent is no options."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise OptionError("options", "must be an object")
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise OptionError(str(unknown[0])[:100], "is not a runner option")
        extra = d.get("extra_args", [])
        if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
            raise OptionError("extra_args", "must be an array of strings")
        kwargs = d.get("chat_template_kwargs", {})
        if not isinstance(kwargs, dict):
            raise OptionError("chat_template_kwargs", "must be an object")
        env = d.get("env", {})
        if not isinstance(env, dict):
            raise OptionError("env", "must be an object")
        return cls(
            draft_model=d.get("draft_model"),
            num_draft_tokens=d.get("num_draft_tokens"),
            adapters=d.get("adapters"),
            chat_template_kwargs=kwargs,
            max_tokens=d.get("max_tokens"),
            max_tokens_cap=d.get("max_tokens_cap"),
            extra_args=tuple(extra),
            env=env,
        )


# --- files: checked by `cortex check` (where they are local to it) and at load -------

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"


def adapter_problem(path: Path) -> str | None:
    """Why `path` is not an mlx_lm adapter directory (mlx_lm.tuner's format), or None."""
    if not path.is_dir():
        return f"adapters {str(path)!r} is not a directory"
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except OSError:
        return f"adapters {str(path)!r} has no readable {ADAPTER_CONFIG}"
    except ValueError:
        return f"adapters {str(path)!r}: {ADAPTER_CONFIG} is not JSON"
    if not isinstance(config, dict):
        return f"adapters {str(path)!r}: {ADAPTER_CONFIG} is not a JSON object"
    if not (path / ADAPTER_WEIGHTS).is_file():
        return f"adapters {str(path)!r} has no {ADAPTER_WEIGHTS}"
    return None


def _vocabulary(model_dir: Path) -> tuple[Any, Any] | None:
    """tokenizer.json's vocabulary and added tokens; None when there is none to read."""
    try:
        tok = json.loads((model_dir / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return None
    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict) or "vocab" not in model:
        return None
    added = tok.get("added_tokens") or []
    return model["vocab"], [(a.get("id"), a.get("content")) for a in added if isinstance(a, dict)]


def draft_problem(model_dir: Path, draft_dir: Path) -> str | None:
    """Why `draft_dir` cannot draft for `model_dir`, or None.

    Speculative decoding proposes the draft's token ids to the model: with
    another tokenizer every proposal is rejected (or out of range), so the
    vocabularies must be the same. mlx_lm itself only warns. A model without a
    tokenizer.json (sentencepiece) is not checked here.
    """
    if not (draft_dir / "config.json").is_file():
        return f"draft_model {str(draft_dir)!r} is not a model directory (no config.json)"
    mine, theirs = _vocabulary(model_dir), _vocabulary(draft_dir)
    if mine is None or theirs is None or mine == theirs:
        return None
    return (
        f"draft_model {str(draft_dir)!r} has another tokenizer than the model"
        f" ({len(theirs[0])} tokens against {len(mine[0])}): a draft must share the"
        " model's tokenizer"
    )
