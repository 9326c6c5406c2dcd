"""Predict: input formats, label formats, streamed chunks, scores."""
import csv
import pickle

import pandas as pd
import pytest

from lorakd import readers
from lorakd import predict as predict_lib
from lorakd.errors import UserError
from lorakd.predict import predict


def test_pickle_course_format_and_label_formats(learned_run, tmp_path):
    df = pd.DataFrame({"text": ["election minister", "goal season", "shares profit"]})
    (tmp_path / "test_unlabelled.pkl").write_bytes(pickle.dumps(df))
    out = tmp_path / "p.csv"
    stats = predict(learned_run, tmp_path / "test_unlabelled.pkl", out, log=lambda *a: None)
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["ID", "Label"] and [r[0] for r in rows[1:]] == ["0", "1", "2"] and stats["n"] == 3
    predict(learned_run, tmp_path / "test_unlabelled.pkl", out, label_format="name", log=lambda *a: None)
    assert {r[1] for r in list(csv.reader(out.open()))[1:]} <= {"World", "Sports", "Business", "Sci/Tech"}
    (tmp_path / "list.pkl").write_bytes(pickle.dumps(["nasa linux", "bank oil"]))
    predict(learned_run, tmp_path / "list.pkl", out, label_format="charcnn", log=lambda *a: None)
    assert {r[1] for r in list(csv.reader(out.open()))[1:]} <= {"1", "2", "3", "4"}


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails the test: bad input must be refused before the backbone loads."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(predict_lib, "open_model", refuse)


def test_bad_label_format_fails_fast_and_writes_nothing(learned_run, tmp_path, no_model):
    (tmp_path / "in.csv").write_text("text\ngoal match\n")
    out = tmp_path / "p.csv"
    with pytest.raises(UserError, match="--labels 'names'"):
        predict(learned_run, tmp_path / "in.csv", out, label_format="names", log=lambda *a: None)
    with pytest.raises(UserError, match="--layout 'csv'"):  # the file has a header: the option is checked anyway
        predict(learned_run, tmp_path / "in.csv", out, layout="csv", log=lambda *a: None)
    assert not out.exists()


def test_missing_input_fails_fast_and_writes_nothing(learned_run, tmp_path, no_model):
    out = tmp_path / "p.csv"
    with pytest.raises(UserError, match="missing.csv: no such file") as e:
        predict(learned_run, tmp_path / "missing.csv", out, log=lambda *a: None)
    assert "\n" not in str(e.value) and not out.exists()


def test_streamed_chunks_give_the_same_output_as_one_chunk(learned_run, tmp_path, monkeypatch):
    """Chunks of 7 rows: the same rows, IDs counted across chunks, the same labels as one chunk."""
    texts = ["election minister war", "goal season coach", "shares profit bank", "nasa linux chip"] * 6
    (tmp_path / "in.csv").write_text("".join(f'"{t}"\n' for t in texts))  # headerless: IDs are row numbers
    predict(learned_run, tmp_path / "in.csv", tmp_path / "one.csv", progress=False, log=lambda *a: None)
    monkeypatch.setattr(predict_lib, "CHUNK", 7)
    stats = predict(learned_run, tmp_path / "in.csv", tmp_path / "seven.csv", progress=False, log=lambda *a: None)
    rows = list(csv.reader((tmp_path / "seven.csv").open()))
    assert stats["n"] == 24 and [r[0] for r in rows[1:]] == [str(i) for i in range(24)]
    assert (tmp_path / "seven.csv").read_text() == (tmp_path / "one.csv").read_text()


@pytest.mark.parametrize("name,content,fragment", [
    ("in.csv", "id,text\n" + "".join(f"{i},goal\n" for i in range(10)) + "3,peace\n", "duplicate ID '3'"),
    ("in.jsonl", '{"text": "goal"}\n' * 9 + '{"id": 9, "text": "peace"}\n', "line 1: no id"),
    ("in.csv", "id,text\n" + "".join(f"{i},goal\n" for i in range(10)) + "10,peace,extra\n", "row 12: 3 columns"),
    ("in.csv", "id,text\n", "no rows"),
], ids=["duplicate-id-in-a-later-chunk", "jsonl-id-only-in-a-later-chunk", "bad-row-in-a-later-chunk", "header-only"])
def test_streamed_input_is_checked_whole_before_the_model_loads(learned_run, tmp_path, monkeypatch, no_model,
                                                                name, content, fragment):
    monkeypatch.setattr(predict_lib, "CHUNK", 4)
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=fragment):
        predict(learned_run, tmp_path / name, tmp_path / "p.csv", log=lambda *a: None)
    assert not (tmp_path / "p.csv").exists()


def test_a_failure_mid_stream_keeps_the_old_output(learned_run, tmp_path, monkeypatch):
    (tmp_path / "in.csv").write_text("text\n" + "goal match\n" * 10)
    out = tmp_path / "p.csv"
    out.write_text("ID,Label\nold,0\n")
    monkeypatch.setattr(predict_lib, "CHUNK", 4)
    calls = []
    real = predict_lib.logits_of

    def fail_on_the_second_chunk(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(predict_lib, "logits_of", fail_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        predict(learned_run, tmp_path / "in.csv", out, progress=False, log=lambda *a: None)
    assert out.read_text() == "ID,Label\nold,0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "p.csv"]  # no temporary file left


def test_headerless_texts_may_start_with_a_comma_phrase(tmp_path):
    """One text per row even when the first text has a comma (or starts with a year); a number-and-comma start
    that looks like CharCNN and then breaks its shape names the row and the fix; a fixed shape needs a header."""
    ok = {"a.csv": ("Stocks fell sharply, says analyst\nMarkets rose\n", ["Stocks fell sharply, says analyst", "Markets rose"]),
          "b.csv": ("2024, a year of change\nStocks fell\n", ["2024, a year of change", "Stocks fell"])}
    bad = {"c.csv": ("3, goals in the final\nStocks fell\n", "row 2: 1 column, the first row has 2: .*--layout text"),
           "d.csv": ("some text,1\nother text,2\n", "every row has 2 columns and there is no header")}
    for name, (content, texts) in ok.items():
        (tmp_path / name).write_text(content)
        assert readers.read_unlabelled(tmp_path / name, []).texts == texts
        assert [t for s in predict_lib.read_input(tmp_path / name)[1]() for t in s.texts] == texts
    for name, (content, why) in bad.items():
        (tmp_path / name).write_text(content)
        for read in (lambda p: predict_lib.read_input(p), lambda p: readers.read_unlabelled(p, [])):
            with pytest.raises(UserError, match=why):
                read(tmp_path / name)


def test_input_matches_the_whole_file_reader(tmp_path):
    """The streamed reader builds what readers.read_unlabelled builds: texts, IDs, title + description."""
    cases = {"a.csv": "\ufeffid,title,description\r\n7,Big,deal\r\n\r\n8,Small,\r\n",
             "b.jsonl": '{"id": "x", "text": "one"}\n\n{"id": "y", "text": "two\\u2028lines"}\n',
             "c.csv": "just a text\nanother, with a comma\n",
             "d.csv": '"3","Wall St. Bears","Short-sellers are back."\n"4","Chip news",""\n'}  # CharCNN layout
    for name, content in cases.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
        n, chunks = predict_lib.read_input(tmp_path / name)
        got = [(i, t) for s in chunks() for i, t in zip(s.ids, s.texts)]
        whole = readers.read_unlabelled(tmp_path / name, [])
        assert got == list(zip(whole.ids, whole.texts)) and n == len(whole), name
    assert whole.texts == ["Wall St. Bears Short-sellers are back.", "Chip news"]  # the class is not the text
    assert readers.read_unlabelled(tmp_path / "c.csv", []).texts == ["just a text", "another, with a comma"]
    for bad, why in [('"1","a","b","c"\n', "every row has 4 columns and there is no header"),
                     ('"1","a","b"\n"2","c"\n', "row 2: 2 columns, the first row has 3")]:
        (tmp_path / "bad.csv").write_text(bad)
        for read in (lambda p: predict_lib.read_input(p), lambda p: readers.read_unlabelled(p, [])):
            with pytest.raises(UserError, match=why):
                read(tmp_path / "bad.csv")


def test_an_ambiguous_headerless_file_is_refused_with_the_row_and_the_fix(tmp_path):
    """A first text that starts with a number and a comma is not taken for the CharCNN layout's class: the
    file is refused, naming the row and --layout; --layout text reads it, commas kept."""
    texts = ["100,000 protesters march in Paris", "Apple, Google shares rise", "Storm, floods hit Florida"]
    path = tmp_path / "h.csv"
    path.write_text("".join(t + "\n" for t in texts))
    for read in (lambda **k: predict_lib.read_input(path, **k)[1](), lambda **k: [readers.read_unlabelled(path, [], **k)]):
        with pytest.raises(UserError, match=r"h.csv: row 1: .*--layout text .*header: text"):
            read()
        assert [t for s in read(layout="text") for t in s.texts] == texts
    (tmp_path / "later.csv").write_text("3,Wall St. Bears\n4,Chips\nApple, Google shares rise\n")
    with pytest.raises(UserError, match=r"row 3: 'Apple' is not a class number: .*--layout text"):
        readers.read_unlabelled(tmp_path / "later.csv", [])
    forced = readers.read_unlabelled(tmp_path / "later.csv", [], layout="charcnn")
    assert forced.texts == ["Wall St. Bears", "Chips", "Google shares rise"]  # as asked: the first field is the class
    with pytest.raises(UserError, match="--layout 'csv': expected one of auto, text, charcnn"):
        readers.read_unlabelled(path, [], layout="csv")


def test_scores_give_each_class_probability_and_keep_the_id_column_name(learned_run, tmp_path):
    from lorakd.runs import load_run

    names = list(load_run(learned_run)[0].data.label_names)
    (tmp_path / "in.csv").write_text("id,text\na7,Stocks fell sharply\nb8,The home team won the final\n")
    out = tmp_path / "p.csv"
    predict(learned_run, tmp_path / "in.csv", out, label_format="name", scores=True, progress=False, log=lambda *a: None)
    rows = list(csv.reader(open(out)))
    assert rows[0] == ["id", "Label", *names, "Score"]
    plain = tmp_path / "plain.csv"
    predict(learned_run, tmp_path / "in.csv", plain, label_format="name", progress=False, log=lambda *a: None)
    assert [r[:2] for r in rows] == list(csv.reader(open(plain)))  # --scores only adds columns
    for r in rows[1:]:
        probs = [float(v) for v in r[2:-1]]
        assert abs(sum(probs) - 1) < 1e-4 and float(r[-1]) == max(probs) and names[probs.index(max(probs))] == r[1]
    (tmp_path / "noid.csv").write_text("text\nStocks fell\n")
    predict(learned_run, tmp_path / "noid.csv", out, progress=False, log=lambda *a: None)
    assert out.read_text().splitlines()[0] == "ID,Label"  # no id column: ID, as before
