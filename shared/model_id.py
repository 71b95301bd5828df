"""The model-id charset: what a model id or alias may hold, on every service.

An id travels in URLs (`/admin/models/{id}/load`, `/v1/models/{id}`), metric
labels, log lines, the dashboard, CLI tables and error messages. So it holds
only characters that need no escaping in any of them: a letter or digit first,
then letters, digits and `. _ : / @ + -`, 128 characters at most. Hub names
("mlx-community/SmolLM2-135M-Instruct-8bit"), short names ("demo") and tagged
names ("qwen2.5:7b") pass; spaces, quotes, `<`, `>`, `%`, `\\`, control
characters and anything outside ASCII do not.

Enforced where an id enters the fleet: the catalogue (models.toml), cortex's
admin API, and the neuron's load request. A request whose `model` breaks it can
name no model, so it is only "model not found", and the name is never echoed
back (`shown`).
"""

from __future__ import annotations

import re
from typing import TypeGuard

MAX_CHARS = 128
PATTERN = "[A-Za-z0-9][A-Za-z0-9._:/@+-]{0," + str(MAX_CHARS - 1) + "}"
_ID = re.compile(PATTERN)
# In words, for error messages and the README.
RULE = f"a letter or digit, then letters, digits and . _ : / @ + - ({MAX_CHARS} characters at most)"
# How error messages name an id that breaks the rule, instead of echoing it.
UNSHOWN = "(a name outside the model-id charset)"


def is_valid(name: object) -> TypeGuard[str]:
    """Whether `name` is a string within the charset (fullmatch: no trailing newline)."""
    return isinstance(name, str) and _ID.fullmatch(name) is not None


def check(name: object, what: str = "model id") -> str:
    """`name` if valid, else ValueError saying the rule (and naming the id, escaped)."""
    if isinstance(name, str) and _ID.fullmatch(name) is not None:
        return name
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a string")
    # repr escapes quotes and control characters; the cut keeps a config error readable.
    named = repr(name[:64]) + ("..." if len(name) > 64 else "")
    raise ValueError(f"{what} {named} is not a valid model id: {RULE}")


def shown(name: str) -> str:
    """`name` quoted for a message, or a placeholder when it breaks the charset."""
    return repr(name) if is_valid(name) else UNSHOWN
