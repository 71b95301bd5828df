"""The model-id charset (shared.model_id) where ids enter: the catalogue, a neuron's
load request and its [[load]] entries; and every error code a client can see has its
row in the README's error table.

Cortex's admin API and the inference endpoints are tried through a real cortex in
tests/e2e/test_openai_details.py.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from neuron.config import NeuronConfig
from shared import model_id
from shared.catalogue import Catalogue
from shared.config import ConfigError
from shared.errors import ApiError
from shared.wire import FieldError, LoadRequest

README = Path(__file__).parents[1] / "README.md"
GOOD = [
    "demo",
    "qwen2.5:7b",
    "mlx-community/SmolLM2-135M-Instruct-8bit",
    "org/name@rev+q4_k",
    "a" * 128,
]
BAD = [
    "",
    "a b",
    "<script>alert(1)</script>",
    'm"><img src=x>',
    "it's",
    "tab\there",
    "demo\n",
    "nul\x00",
    "-leading-dash",
    ".hidden",
    "café",
    "a%2Fb",
    "back\\slash",
    "a" * 129,
]


@pytest.mark.parametrize("name", GOOD)
def test_ids_the_fleet_uses_pass(name: str) -> None:
    assert model_id.is_valid(name) and model_id.check(name) == name
    assert model_id.shown(name) == repr(name)


@pytest.mark.parametrize("name", BAD)
def test_ids_outside_the_charset_fail_and_are_never_echoed(name: str) -> None:
    assert not model_id.is_valid(name)
    with pytest.raises(ValueError, match="not a valid model id"):
        model_id.check(name)
    assert model_id.shown(name) == model_id.UNSHOWN


def _catalogue(tmp_path: Path, entry: str) -> Path:
    p = tmp_path / "models.toml"
    p.write_text(f'[[models]]\nsource = "/x"\n{entry}\n')
    return p


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ('id = "my model"', "'my model'"),
        ('id = "<b>x</b>"', "'<b>x</b>'"),
        ('id = "ok"\naliases = ["fine", "not fine"]', "alias 'not fine'"),
    ],
)
def test_a_catalogue_with_a_bad_id_or_alias_does_not_load(
    tmp_path: Path, entry: str, named: str
) -> None:
    """A config error naming the file and the id (escaped), and the rule."""
    with pytest.raises(ConfigError) as exc:
        Catalogue.load(_catalogue(tmp_path, entry))
    text = str(exc.value)
    assert str(tmp_path / "models.toml") in text and named in text, text
    assert model_id.RULE in text, text


def test_the_shipped_catalogue_and_slashed_ids_load(tmp_path: Path) -> None:
    shipped = Catalogue.load(README.parent / "models.toml")
    assert all(model_id.is_valid(n) for m in shipped.models for n in m.names())
    cat = Catalogue.load(_catalogue(tmp_path, 'id = "org/m:7b"\naliases = ["m@main"]'))
    assert cat.resolve("m@main") is not None


@pytest.mark.parametrize("name", ["<script>", "a b", "x" * 200, 5])
def test_a_neuron_load_with_a_bad_id_is_a_field_error(name: object) -> None:
    with pytest.raises(FieldError) as exc:
        LoadRequest.from_json({"model_id": name, "source": "/x"})
    assert exc.value.param == "model_id"
    assert "<script>" not in str(exc.value) and model_id.RULE in str(exc.value)
    assert LoadRequest.from_json({"model_id": "org/m:7b", "source": "/x"}).model_id == "org/m:7b"


def test_a_neuron_toml_load_entry_with_a_bad_id_does_not_load(tmp_path: Path) -> None:
    p = tmp_path / "neuron.toml"
    p.write_text('[[load]]\nmodel_id = "a b"\nsource = "/x"\n')
    with pytest.raises(ConfigError, match="model_id 'a b' is not a valid model id"):
        NeuronConfig.from_file(p)


def _subclasses(cls: type[ApiError]) -> list[type[ApiError]]:
    out: list[type[ApiError]] = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def test_every_error_code_has_a_row_in_the_readme() -> None:
    """Each code of the one error tree (both services' apps imported) is in the table."""
    for app in ("cortex.http.app", "neuron.http.app"):  # their modules define errors too
        importlib.import_module(app)
    text = README.read_text()
    table = text.split("## Error contract", 1)[1].split("\n\n| condition |", 1)[1]
    rows = table.split("\n\n", 1)[0].splitlines()[1:]  # the rows under the header line
    # The code column is the last: `a` or `a` / `b`.
    documented = {c for row in rows for c in re.findall(r"`([a-z_]+)`", row.split("|")[-2])}
    tree: list[type[ApiError]] = [ApiError, *_subclasses(ApiError)]
    codes = {c.code for c in tree}
    assert codes - documented == set(), f"codes without a README row: {codes - documented}"
