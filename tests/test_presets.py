"""Every preset in conf/ parses, names only keys the app knows, with the defaults' types."""

import tomllib
from pathlib import Path

import pytest

from clues_flwr.local_grid import app_defaults

PRESETS = sorted((Path(__file__).resolve().parents[1] / "conf").glob("*.toml"))


def test_there_are_presets():
    assert any(p.name == "paper.toml" for p in PRESETS)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_keys_are_known(path):
    defaults = app_defaults()
    preset = tomllib.loads(path.read_text())
    unknown = sorted(set(preset) - set(defaults))
    assert not unknown, f"{path.name}: unknown keys {unknown}"
    for key, value in preset.items():
        expected = type(defaults[key])
        assert isinstance(value, expected) or (expected is float and isinstance(value, int)), f"{path.name}: {key} = {value!r} is not {expected.__name__}"
