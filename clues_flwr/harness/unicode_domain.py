"""A setting from another domain: facts of the Unicode Character Database, which ships with
Python (``unicodedata``), so like the demo it needs no hub.

    python -m clues_flwr.harness.unicode_domain --out /tmp/unicode [--seed 0]
    python -m clues_flwr.harness.pretrain --corpus /tmp/unicode/corpus.jsonl --out /tmp/unicode/backbone
    python simulation/selection_table.py --set dataset=/tmp/unicode/records.jsonl \\
        --set model-name=/tmp/unicode/backbone --set pollution-kinds=cut,deletion,exchange,random-noise

Writes ``records.jsonl`` (the facts the sites and the public sets are split from),
``corpus.jsonl`` (the backbone's reading: the same relations about other characters of the
same blocks) and ``info.json``. The demo's backbone has read every fact it is fine-tuned on;
this one knows the domain (how names are built, which blocks hold which categories, what a
code point looks like) but none of the sites' facts. Several relations per character keep
an exchanged answer in the domain. No character the records are about is named in the
corpus; records may name corpus characters (a decomposition's parts), as a fine-tuning set
mentions what a base model knows. Deterministic: a seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import unicodedata
from pathlib import Path

from clues_flwr.core.data import Record

RECORDS = 1500
CORPUS_PER_RECORD = 2.5
MAX_PARTS = 3  # longer decompositions make answers too long for the default max-seq-len

BLOCKS = {
    "Basic Latin": (0x0000, 0x007F),
    "Latin-1 Supplement": (0x0080, 0x00FF),
    "Latin Extended-A": (0x0100, 0x017F),
    "Latin Extended-B": (0x0180, 0x024F),
    "Greek and Coptic": (0x0370, 0x03FF),
    "Cyrillic": (0x0400, 0x04FF),
    "Armenian": (0x0530, 0x058F),
    "Hebrew": (0x0590, 0x05FF),
    "Arabic": (0x0600, 0x06FF),
    "Devanagari": (0x0900, 0x097F),
    "General Punctuation": (0x2000, 0x206F),
    "Superscripts and Subscripts": (0x2070, 0x209F),
    "Currency Symbols": (0x20A0, 0x20CF),
    "Letterlike Symbols": (0x2100, 0x214F),
    "Number Forms": (0x2150, 0x218F),
    "Arrows": (0x2190, 0x21FF),
    "Mathematical Operators": (0x2200, 0x22FF),
}
# Only the decimal digits of these: the scripts from Bengali to Mongolian, and fullwidth.
DIGIT_BLOCKS = {"Bengali to Mongolian": (0x0980, 0x18AF), "Halfwidth and Fullwidth Forms": (0xFF10, 0xFF19)}

PHRASINGS = {
    "name": (
        "What is the Unicode name of this character?",
        "Name this Unicode character.",
        "Give the official Unicode name of this character.",
    ),
    "code point": (
        "What is the code point of this character?",
        "Give the Unicode code point of this character.",
        "Write this character's code point in U+ notation.",
    ),
    "name at code point": (
        "Name the character at this Unicode code point.",
        "What is the name of the character with this code point?",
        "Which character has this code point? Give its Unicode name.",
    ),
    "character": (
        "Write the character with this Unicode name.",
        "Which character has this name?",
        "Give the character this Unicode name denotes.",
    ),
    "general category": (
        "What is the general category of this character?",
        "Give the Unicode general category of this character.",
        "Which general category does this character belong to?",
    ),
    "bidirectional class": (
        "What is the bidirectional class of this character?",
        "Give the Unicode bidi class of this character.",
        "How does this character behave in bidirectional text?",
    ),
    "decomposition": (
        "Give the decomposition of this character.",
        "Into which characters does this character decompose?",
        "What is the Unicode decomposition mapping of this character?",
    ),
    "uppercase": (
        "Name the uppercase form of this character.",
        "What is the name of the capital form of this letter?",
        "Give the Unicode name of the uppercase counterpart of this character.",
    ),
    "lowercase": (
        "Name the lowercase form of this character.",
        "What is the name of the small form of this letter?",
        "Give the Unicode name of the lowercase counterpart of this character.",
    ),
    "digit value": (
        "What is the value of this digit?",
        "Which number does this digit stand for?",
        "Give the numeric value of this digit in words.",
    ),
}

CATEGORIES = {
    "Lu": "uppercase letter",
    "Ll": "lowercase letter",
    "Lt": "titlecase letter",
    "Lm": "modifier letter",
    "Lo": "other letter",
    "Mn": "nonspacing mark",
    "Mc": "spacing combining mark",
    "Me": "enclosing mark",
    "Nd": "decimal digit number",
    "Nl": "letter number",
    "No": "other number",
    "Pc": "connector punctuation",
    "Pd": "dash punctuation",
    "Ps": "open punctuation",
    "Pe": "close punctuation",
    "Pi": "initial quote punctuation",
    "Pf": "final quote punctuation",
    "Po": "other punctuation",
    "Sm": "math symbol",
    "Sc": "currency symbol",
    "Sk": "modifier symbol",
    "So": "other symbol",
}
BIDI_CLASSES = {
    "L": "left to right",
    "R": "right to left",
    "AL": "right to left Arabic",
    "EN": "European number",
    "ES": "European number separator",
    "ET": "European number terminator",
    "AN": "Arabic number",
    "CS": "common number separator",
    "NSM": "nonspacing mark",
    "ON": "other neutral",
}
# Decomposition tags, as the answer's first words: "superscript form of DIGIT TWO".
FORMS = {
    "compat": "compatibility",
    "font": "font variant",
    "sub": "subscript",
    "super": "superscript",
    "fraction": "fraction",
    "wide": "fullwidth",
    "noBreak": "no-break",
}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def pool() -> list[str]:
    """The characters of the chosen blocks that can stand alone in a prompt (no controls,
    formats or spaces), in code point order."""
    chars = [
        chr(i)
        for first, last in BLOCKS.values()
        for i in range(first, last + 1)
        if unicodedata.name(chr(i), None) and unicodedata.category(chr(i))[0] not in "CZ"
    ]
    digits = [chr(i) for first, last in DIGIT_BLOCKS.values() for i in range(first, last + 1)]
    return chars + [c for c in digits if unicodedata.category(c) == "Nd"]


def parts(char: str) -> tuple[str | None, list[str]]:
    """The decomposition's tag (None when canonical) and the characters it maps to."""
    fields = unicodedata.decomposition(char).split()
    tag = fields.pop(0)[1:-1] if fields and fields[0].startswith("<") else None
    return tag, [chr(int(code, 16)) for code in fields]


def counterparts(char: str) -> dict[str, str]:
    """``uppercase``/``lowercase`` -> the single other character that case maps ``char`` to."""
    cased = {"uppercase": char.upper(), "lowercase": char.lower()}
    return {relation: other for relation, other in cased.items() if len(other) == 1 and other != char}


def facts(char: str) -> dict[str, tuple[str, str]]:
    """Relation -> (input, output) for every relation that holds for ``char``."""
    name, code = unicodedata.name(char), f"U+{ord(char):04X}"
    found = {
        "name": (char, name),
        "code point": (char, code),
        "name at code point": (code, name),
        "character": (name, char),
        "general category": (char, CATEGORIES[unicodedata.category(char)]),
        "bidirectional class": (char, BIDI_CLASSES[unicodedata.bidirectional(char)]),
    }
    tag, mapped = parts(char)
    if 0 < len(mapped) <= MAX_PARTS:
        names = " + ".join(unicodedata.name(c) for c in mapped)
        found["decomposition"] = (char, f"{FORMS[tag]} form of {names}" if tag else names)
    for relation, other in counterparts(char).items():
        found[relation] = (char, unicodedata.name(other))
    digit = unicodedata.digit(char, None)
    if digit is not None:
        found["digit value"] = (char, NUMBERS[digit])
    return found


def units(chars: list[str]) -> list[list[str]]:
    """The characters grouped with their case counterparts, in code point order: a fact
    about one names the other, so a group goes to one file whole."""
    parent = {c: c for c in chars}

    def root(c: str) -> str:
        while parent.setdefault(c, c) != c:
            c = parent[c]
        return c

    for c in chars:
        for other in counterparts(c).values():
            parent[root(other)] = root(c)
    groups: dict[str, list[str]] = {}
    for c in chars:
        groups.setdefault(root(c), []).append(c)
    return sorted(groups.values(), key=min)


def build(seed: int = 0) -> tuple[list[Record], list[Record], dict]:
    """(records, corpus, info): groups of characters dealt by a seeded shuffle to the records
    until they hold ``RECORDS`` facts, then to the corpus until it holds ``CORPUS_PER_RECORD``
    times as many; characters that others decompose into are never records, since the
    corpus would name them."""
    chars = pool()
    known = {c: facts(c) for c in chars}
    mapped_into = {part for c in chars for part in parts(c)[1]}
    rng = random.Random(seed)
    order = units(chars)
    rng.shuffle(order)
    sides: dict[str, list[str]] = {"records": [], "corpus": []}
    counts = {"records": 0, "corpus": 0}
    for unit in order:
        if counts["records"] < RECORDS and mapped_into.isdisjoint(unit):
            side = "records"
        elif counts["corpus"] < CORPUS_PER_RECORD * RECORDS:
            side = "corpus"
        else:
            continue
        sides[side] += unit
        counts[side] += sum(len(known[c]) for c in unit)
    written = {
        side: [
            {"instruction": rng.choice(PHRASINGS[relation]), "input": input_, "output": output}
            for c in sorted(members)
            for relation, (input_, output) in known[c].items()
        ]
        for side, members in sides.items()
    }
    info = {
        "seed": seed,
        "records": len(written["records"]),
        "corpus": len(written["corpus"]),
        "record_characters": len(sides["records"]),
        "corpus_characters": len(sides["corpus"]),
        "relations": {
            relation: {side: sum(relation in known[c] for c in members) for side, members in sides.items()}
            for relation in PHRASINGS
        },
        "blocks": list(BLOCKS) + [f"{name} (decimal digits)" for name in DIGIT_BLOCKS],
        "python": platform.python_version(),
        "unidata_version": unicodedata.unidata_version,
    }
    return written["records"], written["corpus"], info


def _write_atomic(path: Path, text: str) -> None:
    """Write beside ``path``, then rename: a reader never sees half a file."""
    staging = path.with_name(f".{path.name}.partial")
    staging.write_text(text, encoding="utf-8")
    staging.replace(path)


def write(out: Path, seed: int = 0) -> dict:
    """Build the setting for ``seed`` into the folder ``out``; returns its info."""
    records, corpus, info = build(seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("records.jsonl", records), ("corpus.jsonl", corpus)):
        _write_atomic(out / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    _write_atomic(out / "info.json", json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for records.jsonl, corpus.jsonl, info.json")
    parser.add_argument("--seed", type=int, default=0, help="deals the characters and picks each fact's phrasing")
    args = parser.parse_args(argv)
    try:
        info = write(args.out, args.seed)
    except OSError as err:
        parser.error(f"--out {args.out} must be a folder that can be written: {err.strerror or err}")
    print(f"wrote {info['records']} records and a corpus of {info['corpus']} into {args.out}")


if __name__ == "__main__":
    main()
