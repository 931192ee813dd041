"""The README and docs/ point at things that exist: relative links (with their #anchors),
repository paths and `clues_flwr.…` names; the commands CI copies from the README stay."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

import clues_flwr
from clues_flwr.config import key_of, sections

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Named by the migration note as moved: they must stay gone.
GONE = set(clues_flwr._MOVED)
MIGRATION = (ROOT / "docs" / "integration.md").read_text(encoding="utf-8").split("## Migrating", 1)[1]
# CI runs these two commands as the README writes them.
QUICKSTART = [
    "pip install torch==2.13.0 -e . && FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run . --stream "
    '--federation-config "num-supernodes=4"',
    'pip install torch==2.13.0 -e ".[test]" && pytest -q',
]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
PATH = re.compile(r"(?<![\w./-])((?:clues_flwr|simulation|conf|examples|tests|results|docs)/[\w./-]*[\w/])")
NAME = re.compile(r"(?<![\w./-])(clues_flwr(?:\.\w+)+)")


def prose(text: str) -> str:
    """The page without code, where a `[x](y)` is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as dashes."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        if match := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line):
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_slugs_follow_github():
    assert slug("The local SuperLink of `flwr run .`") == "the-local-superlink-of-flwr-run-"
    assert slug("1. Certificates (on the SuperLink machine)") == "1-certificates-on-the-superlink-machine"
    assert slug("Migrating from `CluesStrategy` and the old import paths") == (
        "migrating-from-cluesstrategy-and-the-old-import-paths"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no {file.relative_to(ROOT) if ROOT in file.parents else file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_paths_and_modules_exist(page):
    text = page.read_text(encoding="utf-8")
    missing = [p for p in PATH.findall(text) if not (ROOT / p).exists()]
    for name in sorted(set(NAME.findall(text)) - GONE):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr, None)
            if obj is None:
                missing.append(name)
            break
    assert not missing, f"{page.name} names what does not exist: {missing}"


def test_what_the_migration_notes_call_gone_is_gone():
    for name in GONE:
        relative = Path(*name.split("."))
        assert not (ROOT / f"{relative}.py").exists() and not (ROOT / relative).is_dir(), name


def test_the_migration_note_lists_every_moved_module_and_every_key_unlike_its_field():
    """A user who knows only the old path, or only the run-config key, finds the new name."""
    unlisted = [old for old in GONE if f"`{old}`" not in MIGRATION]
    for section in sections().values():
        for f in dataclasses.fields(section):
            if key_of(f) != f.name.replace("_", "-"):
                unlisted += [t for t in (f"`{key_of(f)}`", f"{section.__name__}({f.name}=") if t not in MIGRATION]
    assert not unlisted, f"the migration note in docs/integration.md misses {unlisted}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_python_fields_named_beside_keys_exist(page):
    """Every ``Section(field=...)`` a page writes is a field of that config section."""
    fields = {s.__name__: {f.name for f in dataclasses.fields(s)} for s in sections().values()}
    named = re.findall(r"\b(\w+)\((\w+)=", page.read_text(encoding="utf-8"))
    wrong = [f"{cls}({field}=" for cls, field in named if cls in fields and field not in fields[cls]]
    assert not wrong, f"{page.name} names fields that do not exist: {wrong}"


def test_the_readme_keeps_the_commands_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in QUICKSTART:
        assert command in readme, f"README.md lost the command CI runs: {command}"


def test_the_privacy_page_shows_the_protocol_modules_own_table():
    from clues_flwr.flower.protocol import wire_table

    page = (ROOT / "docs" / "privacy.md").read_text()
    block = page.split("<!-- wire-table -->\n", 1)[1].split("\n<!-- /wire-table -->", 1)[0]
    assert block == wire_table(), "regenerate the table from clues_flwr.flower.protocol.wire_table()"
