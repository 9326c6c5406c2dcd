"""A corpus of malformed inputs: each gets a one-line UserError naming the file, row or key, or a
documented tolerant result; never a traceback, and nothing already written is lost."""
import errno
import json
import os
import pickle
import shutil

import pandas as pd
import pytest

from lorakd import config, data, runs
from lorakd import readers
from lorakd import backbones
from lorakd import train as train_lib
from lorakd.cli import main
from lorakd.errors import UserError

NAMES = config.AG_NEWS_LABELS
GOOD_CSV = '"1","a","b"\n"2","c","d"\n"3","e","f"\n"4","g","h"\n'


def pickled(obj):
    return lambda path: path.write_bytes(pickle.dumps(obj))


class Runs:
    """Unpickles as a call of fn(*args): what a hostile pickle does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def parquet(columns):
    return lambda path: pd.DataFrame(columns).to_parquet(path)


def folder(files):
    def make(path):
        path.mkdir()
        for name, content in files.items():
            write(path / name, content)
    return make


def make_dir(path):
    path.mkdir()


def write(path, content):
    """str/bytes become the file's bytes, a callable makes it, None leaves it absent."""
    if isinstance(content, str):
        content = content.encode("utf-8")
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        content(path)
    return path


READERS = {
    "labelled": lambda p: readers.read_file(p, NAMES),
    "unlabelled": lambda p: readers.read_unlabelled(p, NAMES),
    "folder": lambda p: data.read_splits(str(p), NAMES),
    "splits": lambda p: data.load_splits(config.DataConfig(path=str(p), label_names=NAMES), 0),
}


def one_line_error(fn, *args):
    with pytest.raises(UserError) as exc:
        fn(*args)
    msg = str(exc.value)
    assert msg and "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------- data files: clear errors

E = pytest.param
DATA_ERRORS = [
    # CSV structure
    E("a.csv", '"1","ok","x"\n"2","ab"c","d"\n', "labelled", ["line 2", "malformed CSV"], id="csv-stray-quote"),
    E("a.csv", '"1","ok","x"\n"2","never closed\n', "labelled", ["line 2", "malformed CSV"], id="csv-unclosed-quote"),
    E("a.csv", '"1","a","b","c"\n', "labelled", ["row 1", "4 columns"], id="charcnn-extra-column"),
    E("a.csv", '"1","a","b"\n"2"\n', "labelled", ["row 2", "1 column,"], id="charcnn-missing-column"),
    E("a.csv", "text,label\nhello,1\nworld,2,oops\n", "labelled", ["row 3", "3 columns, the header has 2"],
      id="header-row-extra-column"),
    E("a.csv", "id,text,label\n1,hello\n", "labelled", ["row 2", "2 columns"], id="header-row-missing-column"),
    # encodings
    E("a.csv", b'"1","caf\xe9","x"\n', "labelled", ["line 1", "not UTF-8"], id="latin1-bytes"),
    E("a.csv", b'"1","a","b"\n"2","c","d"\n"3","\xff\xfe","e"\n', "labelled", ["line 3", "not UTF-8"],
      id="bad-bytes-line-3"),
    E("a.csv", '"1","a","b"\n'.encode("utf-16"), "labelled", ["line 1", "not UTF-8"], id="utf16-file"),
    # labels
    E("a.csv", '"0","a","b"\n', "labelled", ["row 1", "label 0 outside the classes 1..4"], id="charcnn-0-based-label"),
    E("a.csv", '"1","a","b"\n"5","c","d"\n', "labelled", ["row 2", "label 5 outside"], id="charcnn-label-5"),
    E("a.csv", "text,label\na,1\nb,4\n", "labelled", ["row 3", "label 4 outside the classes 0..3"],
      id="label-column-1-based"),
    E("a.csv", "text,class\na,0\n", "labelled", ["row 2", "outside the classes 1..4"], id="class-column-0-based"),
    E("a.csv", "text,label\na,-1\n", "labelled", ["row 2", "label -1"], id="negative-label"),
    E("a.csv", "text,label\na,Politics\n", "labelled", ["row 2", "'Politics'", "Sci/Tech"], id="unknown-class-name"),
    E("a.csv", "text,label\na,1.5\n", "labelled", ["row 2", "'1.5'"], id="fractional-label"),
    E("a.csv", "text,label\na,\n", "labelled", ["row 2", "label ''"], id="empty-label"),
    # texts
    E("a.csv", '"1","",""\n', "labelled", ["row 1", "empty text"], id="empty-text"),
    E("a.csv", "text,label\n   ,1\n", "labelled", ["row 2", "empty text"], id="whitespace-text"),
    # whole files
    E("a.csv", "", "labelled", ["empty"], id="empty-file"),
    E("a.csv", "\n \r\n\t\n", "labelled", ["empty"], id="whitespace-only-file"),
    E("a.csv", b"\xef\xbb\xbf", "labelled", ["empty"], id="bom-only-file"),
    E("a.csv", ",,\n,\n", "labelled", ["empty"], id="blank-rows-only"),
    E("a.csv", "text,label\n", "labelled", ["no rows"], id="header-only"),
    E("a.csv", "id,label\n1,2\n", "labelled", ["no text column", "found id, label"], id="no-text-column"),
    E("a.csv", "id,text\n1,hello\n", "labelled", ["no label column"], id="no-label-column"),
    E("a.txt", "1,hello\n", "labelled", ["unknown format .txt"], id="unknown-suffix"),
    E("absent.csv", None, "labelled", ["no such file"], id="missing-file"),
    E("train.csv", make_dir, "labelled", ["is a folder, expected a file"], id="folder-instead-of-file"),
    # JSONL
    E("a.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": \n', "labelled", ["line 2", "not valid JSON"],
      id="jsonl-broken-line"),
    E("a.jsonl", '[1, "a"]\n', "labelled", ["line 1", "expected a JSON object"], id="jsonl-array-line"),
    E("a.jsonl", '{"text": 5, "label": 1}\n', "labelled", ["line 1", "text is int"], id="jsonl-number-text"),
    E("a.jsonl", '{"title": 5, "description": "x", "label": 1}\n', "labelled", ["line 1", "text is int"],
      id="jsonl-number-title"),
    E("a.jsonl", '{"text": "a", "label": true}\n', "labelled", ["line 1", "label True"], id="jsonl-bool-label"),
    E("a.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', "labelled", ["line 2", "no label"],
      id="jsonl-missing-label"),
    E("a.jsonl", '{"text": "a\\ud800", "label": 1}\n', "labelled", ["line 1", "lone surrogate"],
      id="jsonl-lone-surrogate"),
    E("a.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", "labelled", ["line 1", "nested too deeply"],
      id="jsonl-nested-too-deep"),
    # parquet
    E("a.parquet", b"PAR1 not really", "labelled", ["not a readable parquet"], id="parquet-corrupt"),
    E("a.parquet", parquet({"text": ["a"]}), "labelled", ["no label column"], id="parquet-no-label"),
    # unlabelled input for predict
    E("in.pkl", pickled(pd.DataFrame({"body": ["a"]})), "unlabelled", ["no text column", "found body"],
      id="pickle-without-text"),
    E("in.pkl", b"not a pickle", "unlabelled", ["not a readable pickle"], id="pickle-garbage"),
    E("in.pkl", pickled(42), "unlabelled", ["pickle holds a int"], id="pickle-of-a-number"),
    E("in.pkl", pickled(["a", 1]), "unlabelled", ["list pickle"], id="pickle-mixed-list"),
    E("in.pkl", pickled({"text": ["a", "b"], "id": [1]}), "unlabelled", ["dict pickle"], id="pickle-ragged-columns"),
    E("in.pkl", pickled({"text": "abc"}), "unlabelled", ["dict pickle"], id="pickle-dict-of-string"),
    E("train.pkl", pickled(["a"]), "labelled", ["unknown format .pkl"], id="pickle-as-training-data"),
    E("in.pkl", pickled(Runs(os.system, "true")), "unlabelled", [f"pickle refers to {os.system.__module__}.system",
      "which lorakd does not load"], id="pickle-that-runs-a-command"),
    E("in.pkl", pickled([{"text": "a", "id": Runs(eval, "1")}]), "unlabelled", ["pickle refers to builtins.eval"],
      id="pickle-with-a-call-nested-in-a-record"),
    E("in.csv", "id,text\n7,a\n8,b\n7,c\n", "unlabelled", ["duplicate ID '7'"], id="duplicate-ids-csv"),
    E("in.pkl", pickled({"id": [1, 1], "text": ["a", "b"]}), "unlabelled", ["duplicate ID '1'"],
      id="duplicate-ids-pickle"),
    E("in.jsonl", '{"id": 1, "text": "a"}\n{"text": "b"}\n', "unlabelled", ["line 2", "no id"], id="jsonl-missing-id"),
    E("in.csv", "id,text\n7,a\n,b\n", "unlabelled", ["row 3", "no id"], id="csv-empty-id"),
    E("in.csv", 'text\nhello\n"   "\nworld\n', "unlabelled", ["row 3", "empty text"], id="csv-blank-text"),
    E("train.csv", '"1","a","b"\n"2","c","d"\n"3","e","f"\n', "splits", ["no train row of class 'Sci/Tech'"],
      id="a-named-class-without-rows"),
    E("in.pkl", pickled({"text": []}), "unlabelled", ["no rows"], id="pickle-with-no-rows"),
    E("train.csv", "text,label,label\na,1,2\nb,2,3\n", "splits", ["column 'label' is named twice"],
      id="a-label-column-twice"),
    E("in.csv", "id,ID,text\n1,2,a\n3,4,b\n", "unlabelled", ["column 'ID' is named twice"], id="an-id-column-twice"),
    # data folders
    E("nowhere", None, "folder", ["no such file or folder (data.path)"], id="data-folder-missing"),
    E("d", folder({"test.csv": GOOD_CSV}), "folder", ["no train.csv"], id="data-folder-without-train"),
    E("d", folder({"train.csv": GOOD_CSV, "test.csv": '"9","a","b"\n'}), "folder", ["test.csv: row 1"],
      id="data-folder-bad-test-file"),
]


@pytest.mark.parametrize("name,content,reader,fragments", DATA_ERRORS)
def test_bad_data_file_gets_one_line_error(tmp_path, name, content, reader, fragments):
    path = write(tmp_path / name, content)
    msg = one_line_error(READERS[reader], path)
    assert str(path) in msg
    for fragment in fragments:
        assert fragment in msg


# ---------------------------------------------------------------- data files: documented tolerance

T = pytest.param
TOLERATED = [
    T("a.csv", b'\xef\xbb\xbf"2","a","b"\n', "labelled", ["a b"], [1], id="utf8-bom-charcnn"),
    T("a.csv", "\ufefftext,label\nhi,3\n", "labelled", ["hi"], [3], id="utf8-bom-header"),
    T("a.csv", '"1","a","b"\r\n"4","c","d"\r\n', "labelled", ["a b", "c d"], [0, 3], id="crlf-line-ends"),
    T("a.csv", '\n"1","a","b"\n\n,,\n"2","c","d"\n\n', "labelled", ["a b", "c d"], [0, 1], id="blank-rows-skipped"),
    T("a.csv", '"4","hello"\n', "labelled", ["hello"], [3], id="charcnn-two-columns"),
    T("a.csv", "label,text\n0,a\n3,b\n", "labelled", ["a", "b"], [0, 3], id="label-column-0-based"),
    T("a.csv", "class,title,description\n1,a,b\n4,c,\n", "labelled", ["a b", "c"], [0, 3], id="class-column-1-based"),
    T("a.csv", "text,label\na,sports\nb,SCI/TECH\nc, World \n", "labelled", ["a", "b", "c"], [1, 3, 0],
      id="class-names-any-case"),
    T("a.csv", '"Business","a","b"\n', "labelled", ["a b"], [2], id="class-name-in-charcnn"),
    T("a.csv", "Text,Label\nhi,2\n", "labelled", ["hi"], [2], id="header-any-case"),
    T("a.csv", '"1","line one\nline two",""\n', "labelled", ["line one\nline two"], [0], id="newline-inside-quotes"),
    T("a.csv", '"1","a\x00b",""\n', "labelled", ["a\x00b"], [0], id="nul-character-kept"),
    T("a.jsonl", '{"text": "a", "label": 2.0}\n', "labelled", ["a"], [2], id="jsonl-integral-float-label"),
    T("a.jsonl", json.dumps({"text": "a\u2028b", "label": 1}, ensure_ascii=False) + "\r\n", "labelled",
      ["a\u2028b"], [1], id="jsonl-line-separator-in-text"),
    T("a.jsonl", '\n{"text": "a", "label": 0}\n\n', "labelled", ["a"], [0], id="jsonl-blank-lines"),
    T("a.parquet", parquet({"text": ["a", "b"], "label": ["World", "business"]}), "labelled", ["a", "b"], [0, 2],
      id="parquet-class-names"),
    T("in.csv", "first text\nsecond text\n", "unlabelled", ["first text", "second text"], ["0", "1"],
      id="unlabelled-headerless-csv"),
    T("in.csv", "id,text,label\n7,a,1\n9,b,2\n", "unlabelled", ["a", "b"], ["7", "9"], id="unlabelled-ignores-labels"),
    T("in.pkl", pickled(["a", "b"]), "unlabelled", ["a", "b"], ["0", "1"], id="pickle-list-of-strings"),
    T("in.pkl", pickled({"id": ["x", "y"], "text": ["a", "b"]}), "unlabelled", ["a", "b"], ["x", "y"],
      id="pickle-dict-of-columns"),
    T("in.pkl", pickled(pd.DataFrame({"ID": [3, 4], "text": ["a", "b"]})), "unlabelled", ["a", "b"], ["3", "4"],
      id="pickle-dataframe"),
]


@pytest.mark.parametrize("name,content,reader,texts,expected", TOLERATED)
def test_tolerated_input_reads_as_documented(tmp_path, name, content, reader, texts, expected):
    """`expected` is the 0-based labels of labelled input, the IDs of unlabelled input."""
    split = READERS[reader](write(tmp_path / name, content))
    assert split.texts == texts
    if reader == "labelled":
        assert split.labels.tolist() == expected
    else:
        assert split.labels is None and split.ids == expected


def test_pickled_hf_dataset_is_read(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"id": [5, 6], "text": ["a", "b"]})
    split = readers.read_unlabelled(write(tmp_path / "in.pkl", pickled(ds)), NAMES)
    assert split.texts == ["a", "b"] and split.ids == ["5", "6"]


def test_ten_megabyte_row_is_read_then_truncated_at_tokenisation(tmp_path, tiny_backbone):
    from transformers import AutoTokenizer

    big = "goal " * 2_000_000
    split = readers.read_file(write(tmp_path / "a.csv", f'"2","{big}",""\n"1","peace",""\n'), NAMES)
    assert len(split.texts[0]) == len(big.strip()) and split.labels.tolist() == [1, 0]
    ids = data.encode(AutoTokenizer.from_pretrained(tiny_backbone), split.texts, 32)
    assert [len(i) for i in ids] == [32, 3]


def test_two_train_files_in_one_folder(tmp_path):
    write(tmp_path / "train.csv", GOOD_CSV)
    write(tmp_path / "train.jsonl", '{"text": "a", "label": 0}\n')
    assert "train.csv and train.jsonl: more than one train file" in one_line_error(data.read_splits, tmp_path, NAMES)


def test_too_few_rows_to_carve_validation(tmp_path):
    write(tmp_path / "train.csv", GOOD_CSV)
    cfg = config.load(None, [f"data.path={tmp_path}", "data.val_fraction=0.6"])
    msg = one_line_error(data.load_splits, cfg.data, 0)
    assert "data.val_fraction" in msg and str(tmp_path) in msg


# ---------------------------------------------------------------- config files and overrides

C = pytest.param
CONFIG_ERRORS = [
    C("bogus: 1\n", [], ["unknown config key bogus"], id="unknown-key"),
    C("model:\n  rank: 4\n", [], ["unknown config key model.rank"], id="unknown-nested-key"),
    C("trainer:\n  lr: 1\n", [], ["unknown config key trainer"], id="unknown-section"),
    C("1: 2\nname: x\n", [], ["unknown config key 1"], id="numeric-key"),
    C("model:\n  r: abc\n", [], ["config key model.r", "integer"], id="text-for-int"),
    C("model:\n  r: true\n", [], ["config key model.r"], id="bool-for-int"),
    C("model:\n  r: 2.5\n", [], ["config key model.r"], id="fraction-for-int"),
    C("model:\n  r: " + "9" * 40 + "\n", [], ["config key model.r", "too large"], id="huge-int"),
    C("name: [a, b]\n", [], ["config key name"], id="list-for-text"),
    C("model:\n  layers: {a: 1}\n", [], ["config key model.layers", "expected a list"], id="mapping-for-list"),
    C("model:\n  r: -1\n", [], ["config key model.r", "at least 1"], id="negative-rank"),
    C("model:\n  layers: [0, -2]\n", [], ["config key model.layers"], id="negative-layer"),
    C("train:\n  capture_warmups: -1\n", [], ["config key train.capture_warmups", "between 0 and 10"],
      id="negative-warmups"),
    C("train:\n  capture_warmups: 100000\n", [], ["config key train.capture_warmups", "between 0 and 10"],
      id="warmups-beyond-ten"),
    C("train:\n  lr: .nan\n", [], ["config key train.lr", "finite"], id="nan-learning-rate"),
    C("train:\n  schedule: bogus\n", [], ["config key train.schedule", "polynomial"], id="bad-choice"),
    C("model: 5\n", [], ["config section model"], id="section-not-a-mapping"),
    C("- a\n- b\n", [], ["expected a mapping"], id="top-level-list"),
    C("model: [1, 2\n", [], ["not valid YAML"], id="invalid-yaml"),
    C("model:\n\tr: 4\n", [], ["line 2", "not valid YAML"], id="tab-indented-yaml"),
    C(b"name: a\x00b\n", [], ["not valid YAML", "special characters"], id="nul-byte-in-yaml"),
    C(b"name: caf\xe9\n", [], ["not UTF-8"], id="latin1-yaml"),
    C("distill:\n  teachers: [a]\n  weights: [1, 2]\n", [], ["config key distill.weights"], id="weights-per-teacher"),
    C("distill:\n  augment: 1\n  augment_ops: []\n", [], ["distill.augment_ops", "at least one op"], id="augment-no-ops"),
    C("data:\n  labelled: 3\n", [], ["config key data.labelled", "no labelled row"], id="labelled-below-classes"),
    C("", ["model.r"], ["override 'model.r'", "key=value"], id="override-without-equals"),
    C("name: x\n", ["name.sub=1"], ["override name.sub", "not a section"], id="override-into-a-value"),
    C("", ["model.rnak=4"], ["unknown config key model.rnak"], id="override-unknown-key"),
    C("", ["model.r=abc"], ["config key model.r"], id="override-wrong-type"),
    C("", ["=5"], ["override '=5'", "no key before '='"], id="override-without-key"),
    C("", [".r=3"], ["override '.r=3'", "empty part"], id="override-empty-key-part"),
    C("", ["model..r=3"], ["override 'model..r=3'", "empty part"], id="override-double-dot"),
    C("", ["model.targets=[query,value"], ["both brackets"], id="override-unclosed-list"),
]


@pytest.mark.parametrize("text,overrides,fragments", CONFIG_ERRORS)
def test_bad_config_gets_one_line_error(tmp_path, text, overrides, fragments):
    path = write(tmp_path / "bad.yaml", text)
    msg = one_line_error(config.load, path, overrides)
    for fragment in fragments:
        assert fragment in msg


def test_config_path_missing_or_a_folder(tmp_path):
    assert "no such config file" in one_line_error(config.load, tmp_path / "absent.yaml")
    assert "is a folder" in one_line_error(config.load, tmp_path)


def test_empty_config_sections_are_tolerated(tmp_path):
    """`data:` with nothing under it is an empty section: --data and defaults fill it."""
    cfg = config.load(write(tmp_path / "c.yaml", "data:\nmodel:\n"), [], {"data.path": "somewhere"})
    assert cfg.data.path == "somewhere" and cfg.model == config.ModelConfig()


# ---------------------------------------------------------------- the command line

def cli_error(capsys, *argv):
    """Run lorakd in-process; it must exit 2 with exactly one `lorakd: error:` line and no traceback."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # the lorakd script turns it off before transformers loads; in-process it is late
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorakd: error:"), err
    return lines[0]


@pytest.mark.parametrize("argv,line", [
    (["train", "--nosuchopt"], "lorakd train: error: unrecognized arguments: --nosuchopt (see lorakd train --help)"),
    (["eval"], "lorakd eval: error: the following arguments are required: run (see lorakd eval --help)"),
    (["nosuchcmd"], "lorakd: error: argument command: invalid choice: 'nosuchcmd'"),
])
def test_cli_usage_errors_are_one_line_naming_the_command(capsys, argv, line):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(line), err


def test_cli_joins_a_multiline_error_into_one_line(capsys, monkeypatch):
    from lorakd import cli

    def fail(args):
        raise UserError("data.yaml: bad value\n  line 3: expected an int\n\n")
    monkeypatch.setattr(cli, "cmd_report", fail)  # the parser looks the command up when main() builds it
    line = cli_error(capsys, "report", "x")
    assert line == "lorakd: error: data.yaml: bad value; line 3: expected an int"


@pytest.fixture
def tiny_yaml(tiny_config, tmp_path):
    return write(tmp_path / "tiny.yaml", config.to_yaml(tiny_config()))


@pytest.mark.parametrize("extra,fragments", [
    (["model.r=abc"], ["model.r"]),
    (["model.r=-1"], ["model.r", "at least 1"]),
    (["model.layers=[0,99]"], ["model.layers", "layer 99", "0..1"]),
    (["model.targets=[nonexistent]"], ["model.targets", "'nonexistent'"]),
    (["--budget", "10"], ["budget of 10"]),
    (["train.schedule=bogus"], ["train.schedule"]),
    (["train.threads=-1"], ["train.threads", ">= 0"]),
    (["data.max_length=100000"], ["data.max_length 100000", "takes at most"]),
], ids=["wrong-type", "negative-rank", "layer-out-of-range", "unknown-target", "budget-exceeded", "bad-choice",
        "negative-threads", "longer-than-the-backbone"])
def test_cli_train_refuses_bad_options_before_training(capsys, tmp_path, tiny_yaml, extra, fragments):
    out = tmp_path / "run"
    line = cli_error(capsys, "train", "--config", tiny_yaml, "--out", out, *extra)
    for fragment in fragments:
        assert fragment in line
    assert not out.exists()


def test_cli_train_unknown_config_key(capsys, tmp_path):
    bad = write(tmp_path / "bad.yaml", "model:\n  rnak: 4\n")
    assert "unknown config key model.rnak" in cli_error(capsys, "train", "--config", bad, "--out", tmp_path / "r")


def test_cli_train_config_is_a_folder(capsys, tmp_path):
    assert "is a folder" in cli_error(capsys, "train", "--config", tmp_path, "--out", tmp_path / "r")


def test_cli_train_data_folder_missing(capsys, tmp_path, tiny_yaml):
    line = cli_error(capsys, "train", "--config", tiny_yaml, "--data", tmp_path / "nowhere", "--out", tmp_path / "r")
    assert str(tmp_path / "nowhere") in line and "data.path" in line
    assert not (tmp_path / "r").exists()


def test_cli_train_folder_where_a_file_is_expected(capsys, tmp_path, tiny_yaml):
    (tmp_path / "d" / "train.csv").mkdir(parents=True)
    line = cli_error(capsys, "train", "--config", tiny_yaml, "--data", tmp_path / "d", "--out", tmp_path / "r")
    assert str(tmp_path / "d" / "train.csv") in line and "is a folder" in line


def test_cli_train_keeps_an_existing_run(capsys, tmp_path, tiny_yaml):
    out = tmp_path / "run"
    out.mkdir()
    before = write(out / "run.json", '{"format": 1, "status": "done"}\n').read_bytes()
    assert "a run already exists" in cli_error(capsys, "train", "--config", tiny_yaml, "--out", out)
    assert (out / "run.json").read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["run.json"]


def test_cli_train_refuses_a_folder_of_other_files(capsys, tmp_path, tiny_yaml):
    out = tmp_path / "notes"
    out.mkdir()
    write(out / "notes.txt", "mine\n")
    assert "a folder with other files in it" in cli_error(capsys, "train", "--config", tiny_yaml, "--out", out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    write(tmp_path / "file.csv", "x\n")
    assert "exists and is not a folder (--out)" in cli_error(capsys, "train", "--config", tiny_yaml, "--out",
                                                             tmp_path / "file.csv")


@pytest.fixture(scope="module")
def trained_run(tiny_backbone, tiny_data, tmp_path_factory):
    """A finished run of two steps: enough for eval and predict to open it."""
    cfg = config.load(None, [], {"data.path": str(tiny_data), "data.max_length": 32,
                                 "model.backbone": str(tiny_backbone), "model.r": 2, "train.max_steps": 2,
                                 "train.batch_size": 8, "train.checkpoint_every": 0, "train.threads": 1})
    run = tmp_path_factory.mktemp("trained") / "run"
    train_lib.train(cfg, run, log=lambda *a, **k: None)
    return run


@pytest.mark.parametrize("name,content,fragments", [
    ("in.pkl", pickled(pd.DataFrame({"body": ["a"]})), ["no text column"]),
    ("in.csv", "id,text\n1,goal\n1,peace\n", ["duplicate ID '1'"]),
    ("in.csv", b"id,text\n1,caf\xe9\n", ["line 2", "not UTF-8"]),
    ("in.csv", make_dir, ["is a folder"]),
    ("in.csv", None, ["no such file"]),
], ids=["pickle-without-text", "duplicate-ids", "not-utf8", "folder", "missing"])
def test_cli_predict_bad_input_keeps_old_output(capsys, tmp_path, trained_run, name, content, fragments):
    inp = write(tmp_path / name, content)
    out = write(tmp_path / "pred.csv", "ID,Label\n1,2\n")
    line = cli_error(capsys, "predict", trained_run, "--input", inp, "--out", out)
    assert str(inp) in line and all(f in line for f in fragments)
    assert out.read_bytes() == b"ID,Label\n1,2\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


@pytest.mark.parametrize("argv,fragment", [
    (["params", "--labels", "0"], "--labels 0: needs at least 2"),
    (["params", "--preset", "minilm-fill", "--config", "agnews-minilm"], "--preset or --config, not both"),
    (["params", "--r", "8", "model.r=4"], "model.r given twice"),
    (["params", "--model", ""], "model.backbone is empty"),
    (["params", "--model", "embedded:nope"], "embedded:nope: no such embedded backbone"),
    (["train", "--resume", "runs/x", "--budget", "5"], "--resume takes the run's own config and folder"),
    (["train", "--resume", "runs/x", "--out", "y"], "--resume takes the run's own config and folder"),
], ids=["params-zero-labels", "params-preset-and-config", "params-option-and-key", "params-empty-model",
        "params-unknown-embedded", "resume-with-budget", "resume-with-out"])
def test_cli_params_refuses_ambiguous_options(capsys, argv, fragment):
    assert fragment in cli_error(capsys, *argv)


@pytest.mark.parametrize("option,fragment", [(["--batch-size", "0"], "--batch-size 0: must be at least 1"),
                                             (["--threads", "-1"], "--threads -1: must be >= 0")])
def test_cli_predict_bad_numbers(capsys, tmp_path, trained_run, option, fragment):
    inp = write(tmp_path / "in.csv", "id,text\n1,goal\n")
    assert fragment in cli_error(capsys, "predict", trained_run, "--input", inp, "--out", tmp_path / "p.csv", *option)
    assert not (tmp_path / "p.csv").exists()


def test_cli_predict_never_writes_over_what_it_reads(capsys, tmp_path, trained_run):
    """--out the input, a file of the run, a path under a file, a folder: refused, and nothing is changed."""
    inp = write(tmp_path / "in.csv", "id,text\n1,goal\n")
    before = {p: p.read_bytes() for p in (inp, trained_run / "run.json")}
    for out, fragment in ((inp, "is the input file"), (trained_run / "run.json", "a file of the model"),
                          (inp / "p.csv", f"{inp} is a file, not a folder"), (tmp_path, "is a folder")):
        assert fragment in cli_error(capsys, "predict", trained_run, "--input", inp, "--out", out)
    assert before == {p: p.read_bytes() for p in before}
    main(["predict", str(trained_run), "--input", str(inp), "--out", str(trained_run / "predictions.csv")])
    assert (trained_run / "predictions.csv").read_text().startswith("id,Label\n1,")  # a CSV in the run is fine


def test_a_model_folder_without_tokenizer_files_is_refused(tmp_path, tiny_backbone):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):  # what save_pretrained writes, and a full fine-tune keeps
        shutil.copy(tiny_backbone / f, bare / f)
    assert "no tokenizer files" in one_line_error(backbones.load_tokenizer, str(bare))


def test_cli_predict_bad_label_format(capsys, tmp_path, trained_run):
    inp = write(tmp_path / "in.csv", "id,text\n1,goal\n")
    assert "--labels 'roman'" in cli_error(capsys, "predict", trained_run, "--input", inp, "--out", tmp_path / "p.csv",
                                           "--labels", "roman")


def test_cli_eval_data_gone_keeps_eval_json(capsys, tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    cfg, _ = runs.load_run(run)
    (run / "config.yaml").write_text(config.to_yaml(config.override(cfg, **{"data.path": str(tmp_path / "gone")})))
    before = (run / "eval.json").read_bytes()
    assert str(tmp_path / "gone") in cli_error(capsys, "eval", run)
    assert (run / "eval.json").read_bytes() == before


def fake_run(folder, backbone="bert-base-uncased", run_format=runs.RUN_FORMAT):
    """run.json and config.yaml as training writes them, for a backbone known without weights."""
    folder.mkdir()
    cfg = config.load(None, [f"model.backbone={backbone}"])
    fingerprint = backbones.backbone_fingerprint(backbones.backbone_config(backbone, len(cfg.data.label_names)))
    write(folder / "config.yaml", config.to_yaml(cfg))
    write(folder / "run.json", json.dumps({"format": run_format, "backbone": backbone,
                                            "backbone_fingerprint": fingerprint, "status": "done"}))
    return folder


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_cli_on_a_folder_that_is_not_a_run(capsys, tmp_path, command):
    extra = ["--input", tmp_path / "in.csv", "--out", tmp_path / "p.csv"] if command == "predict" else []
    assert "not a lorakd run folder" in cli_error(capsys, command, tmp_path, *extra)
    assert "no such run folder" in cli_error(capsys, command, tmp_path / "absent", *extra)


def test_run_from_a_newer_lorakd_is_refused(capsys, tmp_path):
    run = fake_run(tmp_path / "run", run_format=runs.RUN_FORMAT + 1)
    assert "newer lorakd" in one_line_error(runs.load_run, run)
    assert f"run format {runs.RUN_FORMAT + 1}" in cli_error(capsys, "eval", run)


@pytest.mark.parametrize("run_json,fragment", [
    ("{not json", "run.json: not valid JSON"),
    ('{"status": "done"}', "no run format number"),
    ('["format", 1]', "run.json: expected a JSON object"),
], ids=["broken-json", "no-format", "not-an-object"])
def test_broken_run_json_is_refused(tmp_path, run_json, fragment):
    run = fake_run(tmp_path / "run")
    write(run / "run.json", run_json)
    assert fragment in one_line_error(runs.load_run, run)


def test_backbone_of_another_architecture_is_refused(capsys, tmp_path):
    run = fake_run(tmp_path / "run", "bert-base-uncased")
    cfg, info = runs.load_run(run)
    assert "architecture differs" in one_line_error(runs.with_backbone, cfg, info, "roberta-base")
    same = runs.with_backbone(cfg, info, "google-bert/bert-base-uncased")  # an equal copy under another name
    assert same.model.backbone == "google-bert/bert-base-uncased"
    assert "roberta-base is not the one" in cli_error(capsys, "eval", run, "--backbone", "roberta-base")


# ---------------------------------------------------------------- a folder in use, a full disk

@pytest.mark.parametrize("command", [["train", "--config", "{cfg}", "--out", "{run}"], ["train", "--resume", "{run}"],
                                     ["eval", "{run}"], ["pipeline", "--config", "{cfg}", "--out", "{run}"],
                                     ["sweep", "{sweep}", "--out", "{run}"]],
                         ids=["train", "resume", "eval", "pipeline", "sweep"])
def test_cli_refuses_a_run_folder_in_use(capsys, tmp_path, tiny_yaml, lock_holder, command):
    run = fake_run(tmp_path / "run")
    sweep = write(tmp_path / "s.yaml", f"base: {tiny_yaml}\ngrid:\n  model.r: [2, 4]\n")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    proc = lock_holder(run)
    line = cli_error(capsys, *[a.format(cfg=tiny_yaml, run=run, sweep=sweep) for a in command])
    assert line == (f"lorakd: error: {run}: another lorakd process is writing to this run folder (pid {proc.pid}); "
                    "wait for it or use another --out")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"} == before


def _fail_second_checkpoint(monkeypatch):
    """os.fsync fails as a full disk does from the second checkpoint write on."""
    real, seen = os.fsync, []

    def fsync(fd):
        if "state.pt" in os.readlink(f"/proc/self/fd/{fd}"):
            seen.append(fd)
            if len(seen) >= 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def test_cli_train_full_disk_keeps_the_last_checkpoint_and_resumes(capsys, tmp_path, tiny_yaml, monkeypatch):
    import torch

    run = tmp_path / "run"
    _fail_second_checkpoint(monkeypatch)
    line = cli_error(capsys, "train", "--config", tiny_yaml, "--out", run, "train.checkpoint_every=4",
                     "train.max_steps=12")
    ckpt = run / "checkpoint" / "state.pt"
    assert line == f"lorakd: error: {ckpt}: cannot write (No space left on device)"
    assert torch.load(ckpt, weights_only=True)["step"] == 4  # the last good one, whole
    assert not [p for p in ckpt.parent.iterdir() if p.name != "state.pt"]
    monkeypatch.undo()  # room again: the run goes on from step 4
    main(["train", "--resume", str(run)])
    assert json.loads((run / "run.json").read_text())["status"] == "done" and not ckpt.exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_cli_predict_full_disk_keeps_old_output(capsys, tmp_path, trained_run, monkeypatch, code):
    inp = write(tmp_path / "in.csv", "id,text\n1,goal\n")
    out = write(tmp_path / "pred.csv", "ID,Label\n1,2\n")

    def fsync(fd):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(os, "fsync", fsync)
    line = cli_error(capsys, "predict", trained_run, "--input", inp, "--out", out)
    assert line == f"lorakd: error: {out}: cannot write ({os.strerror(code)})"
    assert out.read_bytes() == b"ID,Label\n1,2\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_error_names_the_option_given(capsys, tmp_path, trained_run):
    """--device on eval names --device (not train.device); a pipeline's teacher.KEY names teacher.KEY; a bad
    sweep --set key is the command line's, not the first member's."""
    import torch
    import yaml

    from lorakd.pipeline import split_configs
    from lorakd.sweep import plan

    if not torch.cuda.is_available():
        assert "--device cuda: no CUDA GPU is visible" in cli_error(capsys, "eval", trained_run, "--device", "cuda")
    assert "unknown config key teacher.train.nosuch" in one_line_error(split_configs, {}, ["teacher.train.nosuch=1"])
    spec = write(tmp_path / "s.yaml", yaml.safe_dump({"name": "s", "grid": {"model.r": [1, 2]}}))
    assert one_line_error(plan, spec, None, None, ["train.nosuch=1"]).startswith("--set: unknown config key")
    # a key the grid varies, fixed by --set, would make every member the same config
    assert one_line_error(plan, spec, None, None, ["model.r=8"]).startswith("--set model.r: the sweep varies model.r")
    # a pipeline's teacher trains on labels alone: its distill keys would do nothing
    assert "distill.* keys are the student's" in one_line_error(split_configs, {}, ["teacher.distill.alpha=0.3"])


# ---------------------------------------------------------------- untrusted run folders, configs, exports (issue 32)
# Each attack is a tiny file or link the test makes; each ends in one line (exit 2 through the CLI) and leaves
# the victim (a file or folder outside the run) exactly as it was.

VICTIM = b"the user's own file\n"


@pytest.fixture
def shared_run(tmp_path, trained_run):
    """A finished run handed over by someone else: a copy the attacker could have planted anything in."""
    run = tmp_path / "shared"
    shutil.copytree(trained_run, run)
    return run


@pytest.fixture
def victim(tmp_path):
    return write(tmp_path / "victim.txt", VICTIM)


def test_a_planted_lock_link_is_refused(capsys, shared_run, victim):
    (shared_run / ".lock").symlink_to(victim)
    assert "symbolic link" in cli_error(capsys, "eval", shared_run)
    assert victim.read_bytes() == VICTIM


@pytest.mark.parametrize("kind", ["hard link", "fifo"])
def test_a_lock_that_is_not_a_plain_file_of_its_own_is_refused(tmp_path, victim, kind):
    run = tmp_path / "run"
    run.mkdir()
    if kind == "fifo":
        os.mkfifo(run / ".lock")
    else:
        os.link(victim, run / ".lock")
    with pytest.raises(UserError, match="not a plain file of its own"):
        with runs.run_lock(run):
            pass
    assert victim.read_bytes() == VICTIM


def test_a_planted_run_folder_link_is_refused(tmp_path, shared_run):
    link = tmp_path / "link"
    link.symlink_to(shared_run)
    assert "a symbolic link" in one_line_error(lambda: runs.run_lock(link).__enter__())
    assert not (shared_run / ".lock").exists()


def test_a_planted_checkpoint_link_is_refused_on_resume(capsys, tmp_path, shared_run):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write(elsewhere / "state.pt", VICTIM)
    (shared_run / "checkpoint").symlink_to(elsewhere)
    info = json.loads((shared_run / "run.json").read_text())
    write(shared_run / "run.json", json.dumps({**info, "status": "running"}))  # a run killed mid-way
    assert "checkpoint: a symbolic link" in cli_error(capsys, "train", "--resume", shared_run)
    assert [p.name for p in elsewhere.iterdir()] == ["state.pt"] and (elsewhere / "state.pt").read_bytes() == VICTIM


def test_links_planted_at_file_names_are_replaced_not_followed(capsys, tmp_path, shared_run, victim):
    """eval.json and a predictions file that are links: the link is replaced, the file it named is kept."""
    from lorakd import atomic

    evals = (shared_run / "eval.json").replace(tmp_path / "their-eval.json")  # eval reads it, then writes it
    (shared_run / "eval.json").symlink_to(evals)
    before = evals.read_bytes()
    main(["eval", str(shared_run)])
    assert not (shared_run / "eval.json").is_symlink() and evals.read_bytes() == before
    out = tmp_path / "pred.csv"
    out.symlink_to(victim)
    main(["predict", str(shared_run), "--input", str(write(tmp_path / "in.csv", "id,text\n1,goal\n")),
          "--out", str(out)])
    assert not out.is_symlink() and victim.read_bytes() == VICTIM
    (shared_run / "metrics.jsonl").unlink()
    (shared_run / "metrics.jsonl").symlink_to(victim)  # appended to while training
    assert "a symbolic link" in one_line_error(atomic.append_line, shared_run / "metrics.jsonl", "{}")
    assert victim.read_bytes() == VICTIM


@pytest.mark.parametrize("folder_name", ["plots", "export"])
def test_a_planted_folder_link_is_refused(capsys, tmp_path, shared_run, folder_name):
    from lorakd.plots import plot_run

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write(elsewhere / "lorakd.json", "{}")  # what an earlier export holds: export would replace it
    (shared_run / folder_name).symlink_to(elsewhere, target_is_directory=True)
    if folder_name == "plots":
        assert "plots: a symbolic link" in one_line_error(plot_run, shared_run)
    else:
        assert "export: a symbolic link" in cli_error(capsys, "export", shared_run)
    assert [p.name for p in elsewhere.iterdir()] == ["lorakd.json"]


def model_folder(tmp_path, tiny_backbone, name="exported", **config_extra):
    """An exported-model folder (config.json + model.safetensors + tokenizer) from the tiny backbone."""
    folder = tmp_path / name
    shutil.copytree(tiny_backbone, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update({"id2label": {"0": "World", "1": "Sports"}, "label2id": {"World": 0, "Sports": 1}}, **config_extra)
    write(folder / "config.json", json.dumps(cfg))
    return folder


EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\nfrom transformers import BertConfig as EvilConfig\n"


@pytest.mark.parametrize("extra,fragment", [
    ({"auto_map": {"AutoConfig": "evil.EvilConfig"}}, "asks for code of its own (auto_map)"),
    ({"attn_implementation": "kernels-community/flash-attn"}, "a kernel fetched from the hub"),
    ({"text_config": {"auto_map": {"AutoModel": "evil.M"}}}, "auto_map"),
], ids=["auto-map", "hub-kernel", "nested-auto-map"])
def test_a_model_folder_that_asks_for_code_is_refused_before_loading(capsys, tmp_path, tiny_backbone, monkeypatch,
                                                                     extra, fragment):
    import io
    import sys

    marker = tmp_path / "marker"
    folder = model_folder(tmp_path, tiny_backbone, **extra)
    write(folder / "evil.py", EVIL.format(marker=str(marker)))
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))  # a "yes" waiting: never read
    assert fragment in cli_error(capsys, "params", "--model", folder)
    inp = write(tmp_path / "in.csv", "id,text\n1,goal\n")
    assert fragment in cli_error(capsys, "predict", folder, "--input", inp, "--out", tmp_path / "p.csv")
    assert not marker.exists() and sys.stdin.read() == "y\n" * 10


def test_every_from_pretrained_passes_trust_remote_code_false():
    """The one way lorakd opens a model folder (backbones.safe_kwargs) is the only one in the sources."""
    import re
    from pathlib import Path

    import lorakd

    for src in Path(lorakd.__file__).parent.glob("*.py"):
        text = src.read_text()
        for m in re.finditer(r"\.from_pretrained\(", text):
            depth, end = 1, m.end()
            while depth:  # to the call's closing parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            call = text[m.end(): end - 1]
            if "DIR" in call or call.startswith(("base, ", "model, p", "model, src")):
                continue  # a model card's text; peft's adapter (check_folder runs first)
            assert "safe_kwargs" in call or "tok_kwargs" in call, (src.name, call)


BAD_TOKENIZER = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "[NOPE]", "type_id": 0}}],
                 "pair": [], "special_tokens": {}}  # the Rust code panics at the first encode


@pytest.mark.parametrize("attack", ["onnx-garbage", "safetensors-header", "tokenizer-panic-onnx",
                                    "tokenizer-panic-hf", "id2label-missing"])
def test_a_broken_export_is_one_line(capsys, tmp_path, tiny_backbone, attack):
    folder = model_folder(tmp_path, tiny_backbone)
    target = folder
    if attack.startswith("onnx") or attack == "tokenizer-panic-onnx":
        (folder / "model.safetensors").unlink()
        target = write(folder / "model.int8.onnx", b"\x08\x07garbage that is not a graph")
    if attack == "safetensors-header":
        write(folder / "model.safetensors", (2 ** 40).to_bytes(8, "little") + b"{}")
    if attack.startswith("tokenizer-panic"):
        tok = json.loads((folder / "tokenizer.json").read_text())
        tok["post_processor"] = BAD_TOKENIZER
        write(folder / "tokenizer.json", json.dumps(tok))
    if attack == "id2label-missing":
        write(folder / "config.json", json.dumps({"model_type": "bert"}))
    inp = write(tmp_path / "in.csv", "id,text\n1,goal\n")
    line = cli_error(capsys, "predict", target, "--input", inp, "--out", tmp_path / "p.csv")
    assert str(folder) in line
    assert not (tmp_path / "p.csv").exists()


def test_csv_cells_never_start_a_formula(tmp_path, tiny_backbone):
    from lorakd import atomic
    from lorakd.predict import predict

    assert [atomic.csv_cell(c) for c in ("=1+1", "@SUM(A1)", "+x", "-x", "\tx", "\rx", "-5", "+1.5e3", "a=b", -5)] \
        == ["'=1+1", "'@SUM(A1)", "'+x", "'-x", "'\tx", "'\rx", "-5", "+1.5e3", "a=b", -5]
    folder = model_folder(tmp_path, tiny_backbone, id2label={"0": '=HYPERLINK("http://x")', "1": "@evil"})
    inp = write(tmp_path / "in.csv", 'id,text\n=1+1,goal\n@SUM(A1),peace\n-5,match\n')
    predict(folder, inp, tmp_path / "p.csv", label_format="name", log=lambda *a: None)
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["'=1+1", "'@SUM(A1)", "-5"]
    assert all(r.split(",", 1)[1].startswith(("'=", "'@", "\"'=")) for r in rows[1:])


def test_names_reach_reports_and_plots_as_plain_text(tmp_path, shared_run):
    from lorakd.plots import plot_run
    from lorakd.report import report

    odd = tmp_path / "$\\bogus{$=cmd|'calc'!A0<img src=x>"
    shared_run.rename(odd)
    plot_run(odd)  # mathtext would fail on `$\bogus{$`
    out = report([str(odd)], out_dir=tmp_path / "report")["out"]
    assert (out / "accuracy_vs_params.png").stat().st_size > 0
    assert "\n'$\\bogus" not in (out / "results.csv").read_text()
    assert (out / "results.csv").read_text().splitlines()[1].startswith("$\\bogus{$=cmd")  # `$` is no formula
    md = (out / "results.md").read_text()
    assert "<img" not in md and "&lt;img src=x&gt;" in md


def test_a_run_whose_plots_fail_is_still_done(tmp_path, tiny_config, monkeypatch):
    from lorakd import plots

    def fail(run_dir):
        raise ValueError("mathtext exploded")
    monkeypatch.setattr(plots, "plot_run", fail)
    said = []
    train_lib.train(tiny_config(**{"train.max_steps": 2}), tmp_path / "run", plots=True, log=said.append)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "done"
    assert any("plots: not drawn (ValueError: mathtext exploded)" in str(s) for s in said)


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", ".hidden", "a/b", "..", "a\nb"])
def test_a_config_name_is_a_folder_name_not_a_path(capsys, tmp_path, tiny_yaml, name):
    assert "config key name" in one_line_error(config.load, None, [], {"name": name})
    pipe = write(tmp_path / "p.yaml", f"{tiny_yaml.read_text()}teacher:\n  train:\n    max_steps: 1\n")
    if "\n" not in name:  # (YAML reads a key=value's line break as a space)
        assert "config key name" in cli_error(capsys, "pipeline", "--config", pipe, f"name={name}")
    assert not (tmp_path.parent / "x").exists() and not os.path.exists("/tmp/abs")


@pytest.mark.parametrize("out", ["../elsewhere", "/tmp/elsewhere-sweep"])
def test_a_sweep_files_out_stays_beside_it(capsys, tmp_path, tiny_yaml, out):
    (tmp_path / "s").mkdir()
    sweep = write(tmp_path / "s" / "s.yaml", f"base: {tiny_yaml}\nout: {out}\ngrid:\n  model.r: [2, 4]\n")
    assert "sweep key out" in cli_error(capsys, "sweep", sweep, "--dry-run")
    inside = write(tmp_path / "s" / "t.yaml", f"base: {tiny_yaml}\nout: here\ngrid:\n  model.r: [2, 4]\n")
    from lorakd.sweep import plan

    assert plan(inside)[1] == tmp_path / "s" / "here"


@pytest.mark.parametrize("entry,fragment", [({"config": 5}, "not a file name"),
                                            ({"config": "../../../../../../etc/passwd"}, "outside the sweep folder"),
                                            ("just text", None)])
def test_a_malformed_sweep_json_is_one_line(capsys, tmp_path, shared_run, entry, fragment):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    shared_run.rename(sweep_dir / "member")
    member = {"name": "x", "folder": "gone", "status": "failed", **entry} if isinstance(entry, dict) else entry
    write(sweep_dir / "sweep.json", json.dumps({"members": [member]}))
    if fragment is None:  # an entry that is not a member: skipped
        main(["report", str(sweep_dir), "--out", str(tmp_path / "r")])
    else:
        assert fragment in cli_error(capsys, "report", sweep_dir, "--out", tmp_path / "r")


ALIAS_BOMB = "name: {" + ", ".join(
    ["k0: &a0 [" + ",".join(["lol"] * 10) + "]"] +
    [f"k{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]) + "}\n"


def test_yaml_alias_bombs_are_refused_wherever_yaml_is_read(capsys, tmp_path, shared_run, tiny_yaml):
    bomb = write(tmp_path / "bomb.yaml", ALIAS_BOMB)
    assert "aliases expand past" in cli_error(capsys, "train", "--config", bomb, "--out", tmp_path / "r")
    write(shared_run / "config.yaml", ALIAS_BOMB)
    assert "aliases expand past" in cli_error(capsys, "eval", shared_run)
    sweep = write(tmp_path / "s.yaml", f"base: {tiny_yaml}\ngrid:\n  model.r: [2]\nmembers: " +
                  ALIAS_BOMB.removeprefix("name: "))
    assert "aliases expand past" in cli_error(capsys, "sweep", sweep, "--dry-run")
    assert "an alias inside the value it names" in one_line_error(config.load, write(tmp_path / "loop.yaml",
                                                                                     "name: &a [*a]\n"))
    small = config.load(write(tmp_path / "ok.yaml", "model: {targets: &t [query, value]}\n"))  # aliases still work
    assert small.model.targets == ("query", "value")


def test_a_long_value_is_cut_short_in_the_message(tmp_path):
    msg = one_line_error(config.load, write(tmp_path / "c.yaml", "name: [" + ",".join(["x" * 50] * 5000) + "]\n"))
    assert "config key name" in msg and len(msg) < 300


ARRAY_BOMB = b"\x80\x02cnumpy\nndarray\nJ\x00\x84\xd7\x17\x85U\x01O\x86R."  # numpy.ndarray((4e8,), 'O')
BYTES_BOMB = b"\x80\x02c__builtin__\nbytearray\nJ\x00\x94\x35\x77\x85R."  # bytearray(2_000_000_000)


class ShortObjectArray:
    """An object array whose pickled items do not fill its shape: numpy copies them unchecked and crashes."""

    def __reduce__(self):
        import numpy as np

        return (np.ndarray.__reduce__(np.zeros(0, object))[0], (np.ndarray, (0,), b"b"),
                (1, (100,), np.dtype("O"), False, [1, 2]))


def dictionary_bomb(path):
    """847 bytes of parquet: one 1 MB text, dictionary-encoded, in 8,000 rows (8 GB decoded)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = pa.array(["x" * 1_000_000] * 8000).dictionary_encode()
    pq.write_table(pa.table({"text": texts, "label": [0] * 8000}), path, compression="zstd")


@pytest.mark.parametrize("name,content,fragment", [
    ("in.pkl", BYTES_BOMB, "a bytearray of 2,000,000,000 bytes"),
    ("in.pkl", ARRAY_BOMB, "a numpy array of shape (400000000,) (object)"),
    ("in.pkl", b"\x80\x02](" + BYTES_BOMB[2:-1] * 10 + b"e.", "a bytearray of 2,000,000,000 bytes"),
    ("in.pkl", pickled(ShortObjectArray()), "whose items do not fill it"),
    ("in.pkl", pickled(["goal " * 200_000] * 100_000), "the texts it holds"),
    ("in.parquet", dictionary_bomb, "decodes to more than"),
], ids=["bytearray", "object-array", "list-of-bombs", "short-object-array", "one-text-many-times", "parquet"])
def test_memory_bombs_stop_before_they_allocate(tmp_path, name, content, fragment):
    path = write(tmp_path / name, content)
    msg = one_line_error(READERS["labelled" if name.endswith("parquet") else "unlabelled"], path)
    assert fragment in msg and str(path) in msg


def test_memory_bombs_stay_under_the_stated_bound(tmp_path):
    """Peak memory of a fresh process reading every bomb: what it imports plus a few MB (measured in
    README: Security), far from the gigabytes each asks for."""
    import subprocess
    import sys

    files = [write(tmp_path / "a.pkl", BYTES_BOMB), write(tmp_path / "b.pkl", ARRAY_BOMB),
             write(tmp_path / "c.parquet", dictionary_bomb), write(tmp_path / "d.yaml", ALIAS_BOMB)]
    code = ("import resource, sys\nfrom lorakd import config, readers\nfrom lorakd.errors import UserError\n"
            "import pyarrow.parquet, pandas\nbase = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "for f in sys.argv[1:]:\n    try:\n"
            "        config.load(f) if f.endswith('.yaml') else readers.read_file(f, ('a', 'b'), f.endswith('.parquet'))\n"
            "    except UserError:\n        pass\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n")
    grown_mb = int(subprocess.run([sys.executable, "-c", code, *map(str, files)], capture_output=True, text=True,
                                  check=True).stdout)
    assert grown_mb < 100, grown_mb
