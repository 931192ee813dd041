"""The demo's records, and the public sets and polluted pools every simulated federation draws.

The demo records are real ISO facts that ship inside the ``pycountry`` package (country,
currency, language and script codes, official names, subdivisions, and the names' gettext
translations), so the demo needs no hub. A simulation from a dataset (``partition.py``)
carves its public sets and pollutes its sites by the same two functions as the demo here.
"""

from __future__ import annotations

import gettext
import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from clues_flwr.config import DataConfig
from clues_flwr.core.data import Record, parse_ratios
from clues_flwr.core.pollution import KINDS, pollute

# Languages whose names of countries, currencies and languages are translation tasks and
# the source of "answer in another language" pollution.
TRANSLATION_LANGUAGES = {
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "it": "Italian",
    "nl": "Dutch",
    "pt": "Portuguese",
    "sv": "Swedish",
    "pl": "Polish",
    "ru": "Russian",
    "ja": "Japanese",
}

# Fractions of the demo universe, assigned by a stable hash of the question so that a
# record's split never depends on the number of clients or on the pool size.
PRETRAIN_FRACTION = 0.5
NUM_ANCHORS = 10
NUM_VALIDATION = 50

DEFAULTS = DataConfig()  # the demo's settings, for the keyword defaults of demo_splits


def _translators() -> dict[str, dict[str, gettext.NullTranslations]]:
    import pycountry

    domains = ("iso3166-1", "iso4217", "iso639-3")
    return {
        domain: {
            lang: gettext.translation(domain, pycountry.LOCALES_DIR, languages=[lang]) for lang in TRANSLATION_LANGUAGES
        }
        for domain in domains
    }


def _record(instruction: str, input_: str, output: str) -> Record:
    return {"instruction": instruction, "input": input_, "output": output}


@lru_cache(maxsize=1)
def demo_records() -> tuple[tuple[Record, ...], dict[str, tuple[str, ...]]]:
    """All clean demo records in a fixed order, and each English name's translations."""
    import pycountry

    tr = _translators()
    records: list[Record] = []
    translations: dict[str, set[str]] = {}

    def translate(domain: str, name: str) -> None:
        for lang, language in TRANSLATION_LANGUAGES.items():
            foreign = tr[domain][lang].gettext(name)
            if foreign != name:
                translations.setdefault(name, set()).add(foreign)
                records.append(_record(f"Translate this name into {language}.", name, foreign))

    for c in pycountry.countries:
        records.append(_record("Name the country with this ISO 3166-1 alpha-2 code.", c.alpha_2, c.name))
        records.append(_record("Give the ISO 3166-1 alpha-3 code of this country.", c.name, c.alpha_3))
        records.append(_record("Give the ISO 3166-1 numeric code of this country.", c.name, c.numeric))
        official = getattr(c, "official_name", None)
        if official and official != c.name:
            records.append(_record("What is the official name of this country?", c.name, official))
        translate("iso3166-1", c.name)
    for cur in pycountry.currencies:
        records.append(_record("Which currency has this ISO 4217 code?", cur.alpha_3, cur.name))
        records.append(_record("Give the ISO 4217 code of this currency.", cur.name, cur.alpha_3))
        translate("iso4217", cur.name)
    for lang in pycountry.languages:
        if hasattr(lang, "alpha_2"):
            records.append(_record("Name the language with this ISO 639-1 code.", lang.alpha_2, lang.name))
            records.append(_record("Give the ISO 639-3 code of this language.", lang.name, lang.alpha_3))
            translate("iso639-3", lang.name)
    for script in pycountry.scripts:
        records.append(_record("Name the writing system with this ISO 15924 code.", script.alpha_4, script.name))
    countries = {c.alpha_2: c.name for c in pycountry.countries}
    for i, sub in enumerate(sorted(pycountry.subdivisions, key=lambda s: s.code)):
        if i % 4 == 0:
            records.append(_record("In which country is this subdivision?", sub.name, countries[sub.country_code]))
        elif i % 4 == 1:
            records.append(_record("What kind of subdivision is this?", f"{sub.name} ({sub.code})", sub.type))
    unique = {(r["instruction"], r["input"]): r for r in records if len(r["output"]) >= 2}
    return tuple(unique.values()), {k: tuple(sorted(v)) for k, v in translations.items()}


def _unit_hash(record: Record) -> float:
    key = f"{record['instruction']}\x00{record['input']}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64


@dataclass(frozen=True)
class DemoSplits:
    """Disjoint public and private sets of a simulated federation (``pretrain``: the demo's only)."""

    pretrain: list[Record]
    validation: list[Record]
    anchors: list[Record]
    test: list[Record]
    pools: list[list[Record]]


def carve(
    shuffled: list[Record], test_size: int, private: int, source: str
) -> tuple[list[Record], list[Record], list[Record], list[Record]]:
    """(anchors, validation, test, rest) off the front of a shuffled pool: the public sets are
    drawn before any site's records, so they do not depend on the sites. ``private`` records
    must remain for the sites; ``source`` names the pool in the error when they do not."""
    cut = NUM_ANCHORS + NUM_VALIDATION
    public = cut + test_size
    if public + private > len(shuffled):
        raise ValueError(
            f"{source} has {len(shuffled)} records, but anchors and validation ({cut}), test-size {test_size} "
            f"and {private} records for the sites need {public + private}"
        )
    return shuffled[:NUM_ANCHORS], shuffled[NUM_ANCHORS:cut], shuffled[cut:public], shuffled[public:]


def pollute_partitions(
    partitions: Sequence[Sequence[Record]],
    ratios: Sequence[float],
    seed: int,
    translations: Mapping[str, Sequence[str]] | None = None,
    kinds: Sequence[str] = (),
) -> list[list[Record]]:
    """Site ``i`` polluted at ``ratios[i % len(ratios)]`` with seed ``seed * 1000 + i``, the
    one rule of the demo and of a simulation from a dataset. ``kinds`` (default: all) take
    turns; without translations there is nothing to answer in another language, so that kind
    is then left out of the default and refused if named."""
    if not ratios:
        raise ValueError("pollution ratios: need at least one")
    kinds = tuple(kinds) or (KINDS if translations else tuple(k for k in KINDS if k != "mixed-language"))
    return [
        pollute(
            records,
            ratios[i % len(ratios)],
            seed=seed * 1000 + i,
            translations=translations or {},
            kinds=kinds,
        )
        for i, records in enumerate(partitions)
    ]


def demo_splits(
    num_clients: int,
    pool_size: int = DEFAULTS.demo_pool_size,
    pollution_ratios: Sequence[float] = tuple(parse_ratios(DEFAULTS.pollution)),
    test_size: int = DEFAULTS.test_size,
    seed: int = DEFAULTS.seed,
    kinds: Sequence[str] = DEFAULTS.pollution_kinds,
) -> DemoSplits:
    """Split the demo deterministically, each setting defaulting to its run-config default.

    The pretraining corpus is fixed by hash; anchors, validation and test come first from
    the shuffled rest, then one pool of ``pool_size`` per client, polluted.
    """
    records, translations = demo_records()
    pretrain = [r for r in records if _unit_hash(r) < PRETRAIN_FRACTION]
    rest = [r for r in records if _unit_hash(r) >= PRETRAIN_FRACTION]
    random.Random(seed).shuffle(rest)
    source = f"the demo ({num_clients} clients x demo-pool-size {pool_size})"
    anchors, validation, test, rest = carve(rest, test_size, num_clients * pool_size, source)
    chunks = [rest[i * pool_size : (i + 1) * pool_size] for i in range(num_clients)]
    pools = pollute_partitions(chunks, pollution_ratios, seed, translations, kinds)
    return DemoSplits(pretrain, validation, anchors, test, pools)
