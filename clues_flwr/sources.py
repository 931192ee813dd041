"""Where records come from: local JSONL, JSON, CSV and Parquet files, local dataset
folders, and Hugging Face hub datasets, mapped onto ``{"instruction", "input", "output"}``.

The paper's datasets have built-in presets, so a site names only the dataset; any other
source takes a ``mapping`` from record fields to its own columns.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from clues_flwr.core.data import Record

log = logging.getLogger(__name__)

FIELDS = ("instruction", "input", "prompt", "output", "quality", "pollution")
REQUIRED = ("instruction", "output")
QUALITIES = ("high", "low")
FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# A preset is a mapping (record field -> column, ``=text`` for a literal) or a function
# from a source row to a record.
Preset = Mapping[str, str] | Callable[[Mapping], Record]

# Columns already named like the record's fields.
_ALPACA = {"instruction": "instruction", "input": "input", "output": "output"}

MMEDBENCH_INSTRUCTION = (
    "Answer this multiple-choice medical question: give the letter and text of the "
    "correct option, then explain the reasoning."
)


def _text(value: object) -> str:
    """A cell as text: missing is empty, and a multi-valued cell is comma-joined."""
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value)
    return str(value)


def mmedbench(row: Mapping) -> Record:
    """MMedBench: the question and its lettered options in, the answer and its rationale
    out. The instruction names no language, since the language is the file, not a column."""
    options = row["options"]
    if not isinstance(options, Mapping):
        raise ValueError(f"options is a {type(options).__name__}, expected letter -> text")
    # A folder loaded by datasets gives every row every letter, None where it has none.
    choices = "\n".join(f"{k}. {v}" for k, v in options.items() if v is not None)
    letter, answer = _text(row["answer_idx"]), _text(row["answer"]).strip()
    rationale = _text(row["rationale"]).strip()
    output = ""
    if answer:
        output = f"{letter}. {answer}" if letter else answer
        output += f"\n\n{rationale}" if rationale else ""
    return {
        "instruction": MMEDBENCH_INSTRUCTION,
        "input": f"{_text(row['question'])}\n\n{choices}",
        "output": output,
    }


# Keyed by hub name. The Alpaca-style columns follow each dataset card as best known, not
# checked against the hub from here. MMedBench's are those its authors' MMedLM code reads
# (question, options as letter -> text, answer_idx, a list where several options are
# right, answer, rationale); whether its hub repo loads by language subset, rather than
# only as the released archive to unpack into a folder, is likewise unchecked.
PRESETS: dict[str, Preset] = {
    # input = the flashcard's question, output = its answer, instruction = one fixed text.
    "medalpaca/medical_meadow_medical_flashcards": _ALPACA,
    "axiong/pmc_llama_instructions": _ALPACA,
    # Six languages, one subset (file) each: English, Chinese, Japanese, French, Russian,
    # Spanish.
    "Henrychur/MMedBench": mmedbench,
    "FinGPT/fingpt-fiqa_qa": _ALPACA,
}


def _from_mapping(mapping: Mapping[str, str]) -> Callable[[Mapping], Record]:
    """Record field -> column; an unmapped field reads its own name's column, where
    ``input`` defaults to empty and ``quality``/``pollution`` to absent."""
    bad = [k for k, v in mapping.items() if k not in FIELDS or not isinstance(v, str)]
    if bad:
        raise ValueError(
            f"mapping: {', '.join(map(repr, bad))} is not a record field mapped to a column "
            f"name; fields are {', '.join(FIELDS)}"
        )

    def convert(row: Mapping) -> Record:
        # a record with its own prompt needs no instruction; a column mapped to another field is not one
        prompt = mapping.get("prompt", "" if "prompt" in mapping.values() else "prompt")
        own_prompt = prompt in row
        record = {}
        for field in FIELDS:
            column = mapping.get(field, field)
            if field == "prompt" and not own_prompt and "prompt" not in mapping:
                continue
            if column.startswith("="):
                record[field] = column[1:]
            elif column in row:
                record[field] = _text(row[column])
            elif field in mapping or (field in REQUIRED and not (own_prompt and field == "instruction")):
                raise KeyError(column)
            elif field == "input" and not own_prompt:
                record[field] = ""
        return record

    return convert


def _converter(source: str, mapping: Mapping[str, str] | None, preset: str | None) -> Callable[[Mapping], Record]:
    if mapping is not None and preset is not None:
        raise ValueError("give a mapping or a preset, not both")
    if mapping is None:
        presets = {k.lower(): v for k, v in PRESETS.items()}
        found = presets.get((preset or source).lower())
        if preset is not None and found is None:
            raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
        mapping = found if found is not None else {}
    return mapping if callable(mapping) else _from_mapping(mapping)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"data file {path} is not UTF-8: {err}") from err


def _json_lines(path: Path, text: str) -> Iterator[dict]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from err
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        yield obj


def _jsonl_rows(path: Path) -> Iterator[dict]:
    return _json_lines(path, _read_text(path))


def _json_rows(path: Path) -> Iterable[dict]:
    """A JSON array of objects, a single object, or JSON lines under a .json name."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _json_lines(path, text)
    rows = data if isinstance(data, list) else [data]
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {n} is a {type(row).__name__}, expected a JSON object")
    return rows


def _csv_rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            return list(reader)
        except UnicodeDecodeError as err:
            raise ValueError(f"data file {path} is not UTF-8: {err}") from err
        except csv.Error as err:
            raise ValueError(f"{path}:{reader.line_num}: not valid CSV ({err})") from err


def _parquet_rows(path: Path) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"data file {path} is not valid Parquet: {err}") from err
    for batch in file.iter_batches():
        yield from batch.to_pylist()


READERS = {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows}


def _file_rows(path: Path, format: str) -> Iterable[dict]:
    if format == "auto":
        if path.suffix.lower() not in FORMATS:
            raise ValueError(
                f"cannot tell the format of data file {path} from its suffix {path.suffix!r}; "
                f"pass format= one of {', '.join(READERS)}"
            )
        format = FORMATS[path.suffix.lower()]
    return READERS[format](path)


FILE_COLUMN = "file"


def _folder_files(folder: Path, split: str, subset: str | None) -> list[Path] | None:
    """The data files of a folder's split, named after the subset if one is given, for
    layouts that ``datasets`` misreads: one file per subset (MMedBench's
    ``Train/English.jsonl``) or split folders named in capitals, which it merges into one
    train split. Those under a folder named after the split, else the subset's one file;
    None leaves the folder to ``datasets``. Their rows carry the file's stem in column
    ``file`` (unless they have one), so ``partition-by = "file"`` gives each client one
    file: one language per client for MMedBench."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in FORMATS]
    if subset is not None:
        matches = [p for p in files if p.stem.lower() == subset.lower()]
        if not matches:
            names = ", ".join(str(p.relative_to(folder)) for p in files) or "none"
            raise ValueError(f"folder {folder} has no data file named {subset!r}; its data files: {names}")
        files = matches
    in_split = [p for p in files if split.lower() in (part.lower() for part in p.relative_to(folder).parts[:-1])]
    if in_split or subset is None:
        return in_split or None
    if len(files) > 1:
        names = ", ".join(str(p.relative_to(folder)) for p in files)
        raise ValueError(
            f"folder {folder} has several files for subset {subset!r} and none under a folder named {split!r}: {names}"
        )
    return files


def _load_dataset(failure: str, *args, **kwargs) -> Iterable[Mapping]:
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # datasets raises many types; all mean "cannot load this"
        raise ValueError(f"{failure}: {err}") from err


def _unreadable(folder: Path) -> str:
    """The first data file of ``folder`` that does not read, named, for the error that
    ``datasets`` would give without its name."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS):
        try:
            for _ in _file_rows(path, "auto"):
                pass
        except Exception as err:  # noqa: BLE001 - any reader's failure names the file
            return f" (its file {path} does not read: {err})"
    return ""


def _looks_like_path(source: str) -> bool:
    """Hub names are ``owner/name``; a data suffix, a leading ``.``, ``/`` or ``~``, a
    deeper path or one under an existing folder mean a local path."""
    return (
        Path(source).suffix.lower() in FORMATS
        or source.startswith((".", "/", "~"))
        or "\\" in source
        or source.count("/") > 1
        or ("/" in source and Path(source).expanduser().parent.is_dir())
    )


def _records(
    rows: Iterable[Mapping],
    convert: Callable[[Mapping], Record],
    name: str,
    limit: int | None,
    keep: Sequence[str] = (),
) -> list[Record]:
    records, skipped, n = [], 0, 0
    for n, row in enumerate(rows, 1):
        try:
            record = convert(row)
            record.update({column: _text(row[column]) for column in keep})
        except KeyError as err:
            raise ValueError(
                f"{name}: row {n} has no column {err.args[0]!r}; its columns are {', '.join(map(str, row))}"
            ) from err
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: row {n}: {err}") from err
        if record.get("quality", "high") not in QUALITIES:
            raise ValueError(f"{name}: row {n}: quality is {record['quality']!r}, expected high or low")
        if not record["output"].strip():
            skipped += 1
            continue
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    if n == 0:
        raise ValueError(f"{name} has no rows")
    if not records:
        raise ValueError(f"{name} has no usable records: all {skipped} have an empty answer")
    if skipped:
        log.warning("%s: skipped %d records with an empty answer", name, skipped)
    return records


def load_records(
    source: str,
    *,
    format: str = "auto",
    mapping: dict[str, str] | None = None,
    preset: str | None = None,
    split: str = "train",
    subset: str | None = None,
    limit: int | None = None,
    keep: Sequence[str] = (),
) -> list[Record]:
    """Records of a local file or folder, else of the Hugging Face dataset so named.

    A file's format comes from its suffix unless ``format`` names it. A folder is read by
    ``datasets``, or file by file where its files are named after ``subset`` or lie under a
    folder named after ``split``; a file is all one split. Columns map onto
    record fields through ``mapping``, else the named ``preset``, else the preset for the
    source's name, else the fields' own names. Records with an empty answer are skipped
    and counted; ``limit`` keeps the first that many records; ``keep`` names extra columns
    to carry along as they are (e.g. the language a natural partition splits by).
    """
    if format != "auto" and format not in READERS:
        raise ValueError(f"unknown format {format!r}; expected auto, {', '.join(READERS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    convert = _converter(source, mapping, preset)
    path = Path(source).expanduser()
    if path.is_file():
        if subset is not None:
            raise ValueError(f"data file {path}: subset applies to folders and hub datasets only")
        name, rows = f"data file {path}", _file_rows(path, format)
    elif path.is_dir():
        if format != "auto":
            raise ValueError(f"folder {path}: format applies to files; a folder's is detected")
        files = _folder_files(path, split, subset)
        if files is None:
            name = f"folder {path} (split {split})"
            try:
                rows = _load_dataset(f"cannot load {name}", str(path), split=split)
            except ValueError as err:
                raise ValueError(f"{err}{_unreadable(path)}") from err
        else:
            what = f"split {split}" + (f", subset {subset}" if subset else "")
            name = f"folder {path} ({what}, {len(files)} files)"
            if len(files) == 1:
                name = f"data file {files[0]}"
            rows = ({FILE_COLUMN: f.stem, **row} for f in files for row in _file_rows(f, "auto"))
    elif format != "auto" or _looks_like_path(source):
        raise FileNotFoundError(f"data file {path} does not exist")
    else:
        name = f"dataset {source} ({f'subset {subset}, ' if subset else ''}split {split})"
        failure = f"{source!r} is no local file or folder, and loading it as a Hugging Face {name} failed"
        rows = _load_dataset(failure, source, subset, split=split)
    return _records(rows, convert, name, limit, keep)


def parse_mapping(text: str) -> dict[str, str] | None:
    """``"instruction=question,output=answer"`` (a node-config value) -> a mapping; empty -> None."""
    if not text.strip():
        return None
    mapping = {}
    for pair in text.split(","):
        field, sep, column = pair.partition("=")
        if not sep or not field.strip():
            raise ValueError(f"data-mapping: expected field=column pairs separated by commas, got {text!r}")
        mapping[field.strip()] = column.strip()
    return mapping
