"""Record sources: local formats, folders, presets with each dataset's real columns, and
the errors a site's data can raise. Everything is a small local file; no hub access."""

import csv
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clues_flwr.sources import MMEDBENCH_INSTRUCTION, PRESETS, load_records

RECORDS = [
    {"instruction": "Name the capital.", "input": "France", "output": "Paris", "quality": "high", "pollution": "none"},
    {
        "instruction": 'Copy this, with a comma, "quotes" and a newline.',
        "input": "",
        "output": "line one,\nline two",
        "quality": "low",
        "pollution": "language",
    },
    {"instruction": "Unicode: 日本語", "input": "ß", "output": "ü", "quality": "high", "pollution": "none"},
]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep the Arrow cache that ``datasets`` writes for a folder inside the test."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


# --- local files -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, write",
    [("site.jsonl", write_jsonl), ("site.json", write_json), ("site.csv", write_csv), ("site.parquet", write_parquet)],
)
def test_each_local_format_round_trips(tmp_path, name, write):
    assert load_records(str(write(tmp_path / name, RECORDS))) == RECORDS


def test_json_suffix_also_reads_json_lines(tmp_path):
    assert load_records(str(write_jsonl(tmp_path / "site.json", RECORDS))) == RECORDS


def test_explicit_format_overrides_the_suffix(tmp_path):
    path = write_csv(tmp_path / "export.txt", RECORDS)
    assert load_records(str(path), format="csv") == RECORDS


def test_mapping_with_literal_instruction_and_quality(tmp_path):
    rows = [
        {"question": "2 + 2?", "answer": "4", "label": "high"},
        {"question": "Capital of Peru?", "answer": "Lima", "label": "low"},
    ]
    path = write_csv(tmp_path / "qa.csv", rows)
    mapping = {"instruction": "=Answer the question.", "input": "question", "output": "answer", "quality": "label"}
    assert load_records(str(path), mapping=mapping) == [
        {"instruction": "Answer the question.", "input": "2 + 2?", "output": "4", "quality": "high"},
        {"instruction": "Answer the question.", "input": "Capital of Peru?", "output": "Lima", "quality": "low"},
    ]


def test_unmapped_input_is_empty_and_extra_columns_are_dropped(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Say hi.", "reply": "hi", "id": 7}])
    records = load_records(str(path), mapping={"instruction": "prompt", "output": "reply"})
    assert records == [{"instruction": "Say hi.", "input": "", "output": "hi"}]


def test_limit_keeps_the_first_records(tmp_path):
    path = write_jsonl(tmp_path / "site.jsonl", RECORDS)
    assert load_records(str(path), limit=2) == RECORDS[:2]


def test_folder_is_read_by_datasets_per_split(tmp_path, hf_cache):
    folder = tmp_path / "site"
    write_jsonl(folder / "train.jsonl", RECORDS[:2])
    write_jsonl(folder / "test.jsonl", RECORDS[2:])
    assert load_records(str(folder)) == RECORDS[:2]
    assert load_records(str(folder), split="test") == RECORDS[2:]


# --- presets, each against its dataset's real columns and shapes -----------------------

FLASHCARDS = [
    {
        "input": "What is the relationship between very low Mg2+ levels, PTH levels, and Ca2+ levels?",
        "output": "Very low Mg2+ levels correspond to low PTH levels which in turn results in low Ca2+ levels.",
        "instruction": "Answer this question truthfully",
    },
    {"input": "What is an empty card?", "output": "", "instruction": "Answer this question truthfully"},
]

PMC_LLAMA = [
    {
        "instruction": "You're a doctor, kindly address the medical queries according to the patient's account.",
        "input": "Which vitamin deficiency causes scurvy?",
        "output": "Vitamin C.",
        "sample_id": 0,
        "source": "MedQA",
    }
]

FIQA = [
    {
        "input": "Should I pay off my mortgage early?",
        "output": "It depends on the interest rate compared with your expected investment return.",
        "instruction": "Utilize your financial knowledge, give your answer or opinion "
        "to the input question or subject.",
    }
]


def mmed_row(question, options, idx, answer, rationale="Because."):
    return {
        "question": question,
        "options": options,
        "answer_idx": idx,
        "answer": answer,
        "rationale": rationale,
        "human_checked": 0,
    }


def expected_alpaca(rows):
    return [{k: r[k] for k in ("instruction", "input", "output")} for r in rows if r["output"]]


def test_presets_cover_the_paper_datasets():
    assert set(PRESETS) == {
        "medalpaca/medical_meadow_medical_flashcards",
        "axiong/pmc_llama_instructions",
        "Henrychur/MMedBench",
        "FinGPT/fingpt-fiqa_qa",
    }


def test_medical_flashcards_preset_on_its_json_array(tmp_path, hf_cache, caplog):
    folder = tmp_path / "flashcards"
    write_json(folder / "medical_meadow_wikidoc_medical_flashcards.json", FLASHCARDS)
    with caplog.at_level(logging.WARNING, logger="clues_flwr.sources"):
        records = load_records(str(folder), preset="medalpaca/medical_meadow_medical_flashcards")
    assert records == expected_alpaca(FLASHCARDS)
    assert "skipped 1 records with an empty answer" in caplog.text


def test_pmc_llama_preset_on_parquet_shards(tmp_path, hf_cache):
    folder = tmp_path / "pmc_llama_instructions"
    write_parquet(folder / "data" / "train-00000-of-00001.parquet", PMC_LLAMA)
    assert load_records(str(folder), preset="axiong/pmc_llama_instructions") == expected_alpaca(PMC_LLAMA)


def test_fiqa_preset_on_a_file(tmp_path):
    path = write_parquet(tmp_path / "train-00000-of-00001.parquet", FIQA)
    assert load_records(str(path), preset="FinGPT/fingpt-fiqa_qa") == expected_alpaca(FIQA)


@pytest.fixture
def mmedbench(tmp_path):
    """MMedBench as unpacked from its release: ``Train/<Language>.jsonl``, ``Test/...``."""
    folder = tmp_path / "MMedBench"
    write_jsonl(
        folder / "Train" / "English.jsonl",
        [
            mmed_row("A 23-year-old with fever. Next step?", {"A": "Rest", "B": "Antibiotics"}, "B", "Antibiotics"),
            mmed_row("Empty answer?", {"A": "x", "B": "y"}, "A", ""),
        ],
    )
    write_jsonl(
        folder / "Train" / "Chinese.jsonl",
        [
            mmed_row(
                "哪些是维生素？", {"A": "维生素C", "B": "葡萄糖", "C": "维生素D"}, ["A", "C"], "维生素C, 维生素D", ""
            )
        ],
    )
    write_jsonl(
        folder / "Test" / "English.jsonl",
        [
            mmed_row(
                "Which organ makes insulin?",
                {"A": "Liver", "B": "Pancreas", "C": "Kidney", "D": "Heart"},
                "B",
                "Pancreas",
            )
        ],
    )
    return folder


def test_mmedbench_preset_by_language_subset_and_split(mmedbench):
    train = load_records(str(mmedbench), preset="Henrychur/MMedBench", subset="English")
    assert train == [
        {
            "instruction": MMEDBENCH_INSTRUCTION,
            "input": "A 23-year-old with fever. Next step?\n\nA. Rest\nB. Antibiotics",
            "output": "B. Antibiotics\n\nBecause.",
        }
    ]
    test = load_records(str(mmedbench), preset="Henrychur/MMedBench", subset="english", split="test")
    assert test[0]["input"] == "Which organ makes insulin?\n\nA. Liver\nB. Pancreas\nC. Kidney\nD. Heart"
    assert test[0]["output"] == "B. Pancreas\n\nBecause."
    chinese = load_records(str(mmedbench), preset="Henrychur/MMedBench", subset="Chinese")
    assert chinese[0]["output"] == "A, C. 维生素C, 维生素D"


def test_mmedbench_split_folder_without_subset_reads_every_language(mmedbench):
    train = load_records(str(mmedbench), preset="Henrychur/MMedBench")
    assert len(train) == 2  # English (one empty answer skipped) and Chinese, never Test
    assert len(load_records(str(mmedbench), preset="Henrychur/MMedBench", split="test")) == 1


def test_rows_of_a_folder_read_file_by_file_carry_their_file(mmedbench):
    train = load_records(str(mmedbench), preset="Henrychur/MMedBench", keep=("file",))
    assert [r["file"] for r in train] == ["Chinese", "English"]  # one language per file


def test_mmedbench_through_datasets_drops_the_letters_a_row_lacks(tmp_path, hf_cache):
    folder = tmp_path / "mmed"
    write_jsonl(
        folder / "test.jsonl",
        [
            mmed_row("Q1?", {"A": "a", "B": "b", "C": "c", "D": "d", "E": "e"}, "E", "e"),
            mmed_row("Q2?", {"A": "a", "B": "b"}, "A", "a"),
        ],
    )
    records = load_records(str(folder), preset="Henrychur/MMedBench", split="test")
    assert [r["input"] for r in records] == ["Q1?\n\nA. a\nB. b\nC. c\nD. d\nE. e", "Q2?\n\nA. a\nB. b"]


def test_hub_name_selects_its_preset_and_passes_subset_and_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        rows = FIQA if args[0].startswith("FinGPT") else [mmed_row("Q?", {"A": "a", "B": "b"}, "A", "a")]
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_records("FinGPT/fingpt-fiqa_qa") == expected_alpaca(FIQA)
    records = load_records("henrychur/mmedbench", subset="English", split="test")
    assert records[0]["instruction"] == MMEDBENCH_INSTRUCTION
    assert calls == [
        (("FinGPT/fingpt-fiqa_qa", None), {"split": "train"}),
        (("henrychur/mmedbench", "English"), {"split": "test"}),
    ]


def test_hub_failure_names_the_dataset(monkeypatch):
    import datasets

    def fake_load_dataset(*args, **kwargs):
        raise FileNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(ValueError, match="'nobody/nothing' is no local file or folder.*doesn't exist"):
        load_records("nobody/nothing")


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["missing.jsonl", "sub/missing", "sub/dir/missing", "./missing"])
def test_missing_path(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(FileNotFoundError, match="missing does not exist|missing.jsonl does not exist"):
        load_records(name)


def test_missing_path_with_explicit_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="export does not exist"):
        load_records(str(tmp_path / "export"), format="csv")


def test_unknown_suffix(tmp_path):
    path = tmp_path / "site.txt"
    path.write_text("instruction\toutput\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"site\.txt from its suffix '\.txt'"):
        load_records(str(path))


def test_unknown_format_and_bad_arguments(tmp_path):
    path = write_jsonl(tmp_path / "site.jsonl", RECORDS)
    with pytest.raises(ValueError, match="unknown format 'xlsx'"):
        load_records(str(path), format="xlsx")
    with pytest.raises(ValueError, match="unknown preset 'alpaca'"):
        load_records(str(path), preset="alpaca")
    with pytest.raises(ValueError, match="mapping or a preset, not both"):
        load_records(str(path), mapping={}, preset="FinGPT/fingpt-fiqa_qa")
    with pytest.raises(ValueError, match="'answer' is not a record field"):
        load_records(str(path), mapping={"answer": "output"})
    with pytest.raises(ValueError, match="subset applies to folders"):
        load_records(str(path), subset="English")
    with pytest.raises(ValueError, match="limit must be at least 1"):
        load_records(str(path), limit=0)


def test_missing_column_lists_the_columns(tmp_path):
    path = write_csv(tmp_path / "qa.csv", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        ValueError, match=r"qa\.csv: row 1 has no column 'instruction'; its columns are question, answer"
    ):
        load_records(str(path))
    with pytest.raises(ValueError, match="no column 'answr'; its columns are question, answer"):
        load_records(str(path), mapping={"instruction": "question", "output": "answr"})


def test_preset_on_the_wrong_shape_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "English.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="no column 'options'; its columns are question, answer"):
        load_records(str(path), preset="Henrychur/MMedBench")
    path = write_jsonl(tmp_path / "French.jsonl", [mmed_row("q", "A. x B. y", "A", "x")])
    with pytest.raises(ValueError, match="row 1: options is a str"):
        load_records(str(path), preset="Henrychur/MMedBench")


@pytest.mark.parametrize(
    "name, content", [("e.jsonl", ""), ("e.json", "[]"), ("e.csv", "instruction,output\n"), ("e.csv", "")]
)
def test_empty_file(tmp_path, name, content):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{name} has no rows"):
        load_records(str(tmp_path / name))


def test_empty_parquet(tmp_path):
    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"instruction": pa.array([], pa.string()), "output": pa.array([], pa.string())}), path)
    with pytest.raises(ValueError, match=r"e\.parquet has no rows"):
        load_records(str(path))


def test_not_parquet(tmp_path):
    path = tmp_path / "site.parquet"
    path.write_text("not parquet", encoding="utf-8")
    with pytest.raises(ValueError, match=r"site\.parquet is not valid Parquet"):
        load_records(str(path))


@pytest.mark.parametrize("name", ["latin1.csv", "latin1.jsonl"])
def test_not_utf8(tmp_path, name):
    path = tmp_path / name
    content = (
        "instruction,output\nCafé?,oui\n" if name.endswith(".csv") else '{"instruction": "Café?", "output": "oui"}\n'
    )
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{name} is not UTF-8"):
        load_records(str(path))


def test_bad_json_line_names_the_line(tmp_path):
    path = tmp_path / "site.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"site\.jsonl:2: not valid JSON"):
        load_records(str(path))
    path = write_json(tmp_path / "site.json", [RECORDS[0], ["not", "an", "object"]])
    with pytest.raises(ValueError, match=r"site\.json: row 2 is a list, expected a JSON object"):
        load_records(str(path))


def test_all_answers_empty(tmp_path):
    path = write_jsonl(
        tmp_path / "site.jsonl", [{"instruction": "a", "output": ""}, {"instruction": "b", "output": "  "}]
    )
    with pytest.raises(ValueError, match="no usable records: all 2 have an empty answer"):
        load_records(str(path))


def test_empty_answers_are_skipped_and_counted(tmp_path, caplog):
    rows = [*RECORDS, {**RECORDS[0], "output": ""}, {**RECORDS[1], "output": " \n"}]
    path = write_csv(tmp_path / "site.csv", rows)
    with caplog.at_level(logging.WARNING, logger="clues_flwr.sources"):
        assert load_records(str(path)) == RECORDS
    assert "site.csv: skipped 2 records with an empty answer" in caplog.text


def test_bad_quality_label(tmp_path):
    path = write_jsonl(tmp_path / "site.jsonl", [{**RECORDS[0], "quality": "good"}])
    with pytest.raises(ValueError, match="row 1: quality is 'good', expected high or low"):
        load_records(str(path))


def test_folder_without_the_subset_lists_its_files(mmedbench):
    with pytest.raises(ValueError, match=r"no data file named 'German'; its data files: Test/English\.jsonl"):
        load_records(str(mmedbench), preset="Henrychur/MMedBench", subset="German")


def test_node_config_mapping_parses():
    from clues_flwr.sources import parse_mapping

    assert parse_mapping("") is None
    assert parse_mapping("instruction==Answer., output = answer") == {"instruction": "=Answer.", "output": "answer"}
    with pytest.raises(ValueError, match="data-mapping: expected field=column"):
        parse_mapping("question")


def test_keep_carries_extra_columns(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text("instruction,output,language\nQ?,A,fr\n", encoding="utf-8")
    assert load_records(str(path), keep=("language",)) == [
        {"instruction": "Q?", "input": "", "output": "A", "language": "fr"}
    ]
    with pytest.raises(ValueError, match="no column 'lang'; its columns are instruction, output, language"):
        load_records(str(path), keep=("lang",))


def test_a_folder_with_one_bad_file_names_that_file(tmp_path, hf_cache):
    (tmp_path / "good.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"its file .*bad\.jsonl does not read: .*bad\.jsonl:2: not valid JSON"):
        load_records(str(tmp_path))
