"""Property tests: the loaders and the config parser answer any input with a result or a one-line UserError."""
import dataclasses
import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakd import config
from lorakd import readers
from lorakd.errors import UserError

NAMES = config.AG_NEWS_LABELS
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_CONFIG = settings(FUZZ, max_examples=50)  # its nested examples cost more to draw than to check
# printable text: no character that str.splitlines breaks at (those are in Cc, Zl, Zp)
PRINTABLE = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=12)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def one_line(e: UserError):
    msg = str(e)
    assert msg and "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------- loaders

CELL = st.one_of(
    st.sampled_from(["1", "2", "4", "0", "5", "-1", "2.0", "World", "sports", "SCI/TECH", "", " ", '"', '""',
                     "a,b", "\n", "\r\n", "text", "label", "class", "id", "title", "description", "\ufeff"]),
    st.text(max_size=8))


@st.composite
def csv_text(draw):
    """Rows of cells, quoted or not, with any line ending: often valid CSV, often not."""
    rows = draw(st.lists(st.lists(CELL, max_size=5), max_size=6))
    quote = draw(st.booleans())
    end = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    cell = (lambda c: '"' + c.replace('"', '""') + '"') if quote else (lambda c: c)
    return end.join(",".join(cell(c) for c in row) for row in rows)


VALUE = st.one_of(st.none(), st.booleans(), st.integers(-3, 8), st.floats(), st.text(max_size=8),
                  st.sampled_from(NAMES), st.lists(st.integers(), max_size=2), st.just("\ud800"))
RECORD = st.dictionaries(st.sampled_from(["text", "label", "labels", "class", "id", "title", "description", "x"]),
                         VALUE, max_size=5)
JSONL = st.lists(st.one_of(RECORD.map(json.dumps), st.text(max_size=20)), max_size=6).map("\n".join)


def check_read(path, content: bytes, need_labels: bool):
    """read_file gives a sound Split (labels 0..3, non-empty texts, one ID each) or a UserError naming the file."""
    path.write_bytes(content)
    try:
        split = readers.read_file(path, NAMES, need_labels)
    except UserError as e:
        assert str(path) in one_line(e)
        return
    assert len(split) > 0 and len(split.ids) == len(split)
    assert all(isinstance(t, str) and t.strip() for t in split.texts)
    for t in split.texts:
        t.encode("utf-8")  # a tokenizer can take it
    if need_labels:
        assert len(split.labels) == len(split) and all(0 <= label < len(NAMES) for label in split.labels)
    else:
        assert split.labels is None


@FUZZ
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".csv", ".jsonl", ".parquet"]),
       need_labels=st.booleans())
def test_random_bytes(scratch, content, suffix, need_labels):
    check_read(scratch / f"bytes{suffix}", content, need_labels)


@FUZZ
@given(text=csv_text(), bom=st.booleans(), need_labels=st.booleans())
def test_csv_like_text(scratch, text, bom, need_labels):
    check_read(scratch / "rows.csv", ("\ufeff" * bom + text).encode("utf-8", "surrogatepass"), need_labels)


@FUZZ
@given(text=JSONL, need_labels=st.booleans())
def test_jsonl_like_text(scratch, text, need_labels):
    check_read(scratch / "rows.jsonl", text.encode("utf-8", "surrogatepass"), need_labels)


# ---------------------------------------------------------------- config

SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), PRINTABLE,
                   st.sampled_from(["linear", "teacher", "query,value", "1e-3", "yes", "[0, 1]", "-1"]))
ANY = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(PRINTABLE, inner, max_size=3)), max_leaves=8)


def section(cls):
    names = [f.name for f in dataclasses.fields(cls)] + ["bogus"]
    return st.one_of(st.dictionaries(st.sampled_from(names), ANY, max_size=4), ANY)


RAW = st.fixed_dictionaries({}, optional={
    "name": ANY, "role": st.one_of(st.sampled_from(["student", "teacher"]), ANY),
    "data": section(config.DataConfig), "model": section(config.ModelConfig),
    "train": section(config.TrainConfig), "distill": section(config.DistillConfig),
    "extra": ANY, 7: ANY, None: ANY,
})
DOTTED = sorted(config.flatten(config.Config())) + ["model", "model.r.x", "bogus.key", "", ".", "name.x"]
OVERRIDE = st.one_of(st.builds("{}={}".format, st.sampled_from(DOTTED), PRINTABLE), PRINTABLE)


def config_or_error(fn, *args):
    try:
        cfg = fn(*args)
    except UserError as e:
        one_line(e)
        return None
    assert isinstance(cfg, config.Config)
    config.validate(cfg)
    return cfg


@FUZZ_CONFIG
@given(raw=RAW)
def test_from_dict_gives_config_or_user_error(raw):
    config_or_error(config.from_dict, raw)


@FUZZ_CONFIG
@given(raw=RAW, overrides=st.lists(OVERRIDE, max_size=4))
def test_load_with_overrides_gives_config_or_user_error(scratch, raw, overrides):
    path = scratch / "fuzz.yaml"
    path.write_text(yaml.safe_dump({str(k): v for k, v in raw.items()}), encoding="utf-8")
    config_or_error(config.load, path, overrides)


@FUZZ_CONFIG
@given(text=st.lists(PRINTABLE, max_size=6).map("\n".join))
def test_random_yaml_text_gives_config_or_user_error(scratch, text):
    path = scratch / "text.yaml"
    path.write_text(text, encoding="utf-8")
    config_or_error(config.load, path)


TEXT = st.text(max_size=16)
VALID = st.fixed_dictionaries({
    "name": TEXT.filter(config.safe_name),  # a folder name, not a path "role": st.sampled_from(config.CHOICES["role"]),
    "data": st.fixed_dictionaries({
        "path": TEXT, "val_fraction": st.floats(0, 0.99), "max_length": st.integers(8, 4096),
        "max_train_samples": st.integers(0, 10**9), "repeat": st.integers(1, 100),
        "label_names": st.lists(TEXT, min_size=2, max_size=6, unique=True), "group_by_length": st.booleans()}),
    "model": st.fixed_dictionaries({
        "backbone": TEXT, "full_finetune": st.booleans(), "r": st.integers(1, 1024), "alpha": st.floats(1e-6, 1e6),
        "dropout": st.floats(0, 0.99), "targets": st.lists(TEXT, min_size=1, max_size=4),
        "layers": st.lists(st.integers(0, 100), max_size=4), "budget": st.integers(0, 2**62)}),
    "train": st.fixed_dictionaries({
        "lr": st.floats(1e-9, 10), "batch_size": st.integers(1, 4096), "epochs": st.floats(0.01, 1e3),
        "schedule": st.sampled_from(config.CHOICES["train.schedule"]), "warmup_ratio": st.floats(0, 0.99),
        "seed": st.integers(-2**62, 2**62), "device": TEXT,
        "precision": st.sampled_from(config.CHOICES["train.precision"]), "tensorboard": st.booleans()}),
    "distill": st.fixed_dictionaries({
        "teachers": st.lists(TEXT, max_size=3), "alpha": st.floats(0, 1), "temperature": st.floats(1e-3, 100)}),
})


@FUZZ_CONFIG
@given(raw=VALID)
def test_valid_config_round_trips_through_yaml(scratch, raw):
    cfg = config.from_dict(raw)
    path = scratch / "round.yaml"
    path.write_text(config.to_yaml(cfg), encoding="utf-8")
    assert config.load(path) == cfg
