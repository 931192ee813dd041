"""Every preset in conf/ parses, names only keys the app knows, with the defaults' types."""

import tomllib
from pathlib import Path

import pytest

from clues_flwr.harness.local_grid import app_defaults

CONF = Path(__file__).resolve().parents[1] / "conf"
PRESETS = sorted(CONF.glob("*.toml"))


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
        assert isinstance(value, expected) or (expected is float and isinstance(value, int)), (
            f"{path.name}: {key} = {value!r} is not {expected.__name__}"
        )


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_a_preset_changes_some_default(path):
    """The defaults are the demo and live in the dataclasses; a preset that only restated them
    would be a second copy to keep in step, so each one must set something else."""
    defaults = app_defaults()
    preset = tomllib.loads(path.read_text())
    changed = sorted(key for key, value in preset.items() if value != defaults.get(key))
    assert changed, f"{path.name} only restates defaults: delete it, the defaults need no preset"


def test_mmedbench_preset_gives_each_site_one_language(tmp_path):
    import json

    from clues_flwr.config import DataConfig, from_mapping
    from clues_flwr.partition import splits_for

    languages = ["Chinese", "English", "French", "Japanese", "Russian", "Spanish"]
    for lang in languages:
        rows = [
            {
                "question": f"{lang} question {i}?",
                "options": {"A": "yes", "B": "no"},
                "answer_idx": "A",
                "answer": "yes",
                "rationale": "Because.",
            }
            for i in range(30)
        ]
        (tmp_path / "Train").mkdir(exist_ok=True)
        (tmp_path / "Train" / f"{lang}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        )
    preset = tomllib.loads((CONF / "mmedbench.toml").read_text())
    run = {**app_defaults(), **preset, "dataset": str(tmp_path), "client-samples": 12, "test-size": 20}
    pools = splits_for(from_mapping(DataConfig, run), 6).pools
    assert [len(p) for p in pools] == [12] * 6
    for lang, pool in zip(languages, pools):
        assert {r["input"].split()[0] for r in pool} == {lang}
        assert {r["pollution"] for r in pool} <= {"none", "random-noise"}
