"""Low-quality record generators: the paper's kinds of pollution.

Each generator takes a clean record and returns a polluted copy whose ``output`` is
damaged in one named way. ``pollute`` applies them to a chosen fraction of a pool and
labels every record, so selection can be measured against the truth.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Mapping, Sequence

Record = dict[str, str]

HIGH, LOW = "high", "low"


def cut(record: Record, rng: random.Random) -> Record:
    """Answer cut short: keep a prefix of 20-60% of its characters (at least one)."""
    out = record["output"]
    keep = max(1, int(len(out) * rng.uniform(0.2, 0.6)))
    return {**record, "output": out[:keep]}


def deletion(record: Record, rng: random.Random, rate: float = 0.5) -> Record:
    """Words deleted at ``rate``; a one-word answer loses characters instead."""
    words = record["output"].split()
    units, sep = (words, " ") if len(words) > 1 else (list(record["output"]), "")
    kept = [u for u in units if rng.random() >= rate]
    if len(kept) == len(units):
        kept.pop(rng.randrange(len(kept)))
    if not kept:
        kept = [units[rng.randrange(len(units))]]
    return {**record, "output": sep.join(kept)}


def exchange(record: Record, rng: random.Random, answers: Sequence[str]) -> Record:
    """Answer exchanged with another question's answer from ``answers``."""
    others = [a for a in answers if a != record["output"]]
    return {**record, "output": rng.choice(others)}


def mixed_language(record: Record, rng: random.Random, translations: Mapping[str, Sequence[str]]) -> Record:
    """Answer in another language: its own translation when one exists, else a foreign
    answer to some other question (the paper's example pairs a Spanish question with a
    Russian answer)."""
    own = translations.get(record["output"])
    if not own:
        own = translations[rng.choice(sorted(translations))]
    return {**record, "output": rng.choice([t for t in own if t != record["output"]])}


_NOISE_ALPHABET = string.ascii_letters + string.digits + string.punctuation + " "


def random_noise(record: Record, rng: random.Random) -> Record:
    """Random characters of a similar length in place of the answer."""
    n = max(3, int(len(record["output"]) * rng.uniform(0.8, 1.5)))
    return {**record, "output": "".join(rng.choice(_NOISE_ALPHABET) for _ in range(n))}


KINDS = ("cut", "deletion", "exchange", "mixed-language", "random-noise")


def pollute(
    records: Sequence[Record],
    ratio: float,
    seed: int,
    translations: Mapping[str, Sequence[str]],
    kinds: Sequence[str] = KINDS,
) -> list[Record]:
    """Pollute ``round(ratio * n)`` records chosen at random, the kinds taking turns.

    Every returned record carries ``quality`` (``high``/``low``) and ``pollution`` (the
    kind, or ``none``).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"pollution ratio must be in [0, 1], got {ratio}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(
            f"pollution-kinds: unknown {', '.join(map(repr, unknown)) or '(none given)'}; known: {', '.join(KINDS)}"
        )
    if "mixed-language" in kinds and not translations:
        raise ValueError("pollution-kinds: mixed-language needs translations, which only the demo data has")
    rng = random.Random(seed)
    answers = sorted({r["output"] for r in records})
    generators: dict[str, Callable[[Record], Record]] = {
        "cut": lambda r: cut(r, rng),
        "deletion": lambda r: deletion(r, rng),
        "exchange": lambda r: exchange(r, rng, answers),
        "mixed-language": lambda r: mixed_language(r, rng, translations),
        "random-noise": lambda r: random_noise(r, rng),
    }
    chosen = rng.sample(range(len(records)), round(ratio * len(records)))
    kind_of = {i: kinds[j % len(kinds)] for j, i in enumerate(chosen)}
    out = []
    for i, record in enumerate(records):
        if i in kind_of:
            polluted = generators[kind_of[i]](record)
            out.append({**polluted, "quality": LOW, "pollution": kind_of[i]})
        else:
            out.append({**record, "quality": HIGH, "pollution": "none"})
    return out
