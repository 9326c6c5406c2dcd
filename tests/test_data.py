"""Data: reading the supported layouts, the seeded validation carve, batch order, padding, fingerprints."""
import json
import os
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import SHARED_AG_NEWS, make_texts, write_charcnn
from lorakd import config, data
from lorakd import readers, rows
from lorakd.errors import UserError

NAMES = config.AG_NEWS_LABELS


# ---------------------------------------------------------------- stratified_split

LABELS = np.repeat(np.arange(4), [100, 40, 7, 1])


def test_stratified_split_is_a_function_of_the_seed():
    a, b = data.stratified_split(LABELS, 0.2, seed=3), data.stratified_split(LABELS, 0.2, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], data.stratified_split(LABELS, 0.2, seed=4)[1])


def test_stratified_split_takes_the_fraction_of_every_class():
    train, val = data.stratified_split(LABELS, 0.2, seed=0)
    assert np.bincount(LABELS[val], minlength=4).tolist() == [20, 8, 1, 0]  # round(0.2 * n) per class
    assert np.bincount(LABELS[train], minlength=4).tolist() == [80, 32, 6, 1]


def test_a_small_class_still_gets_a_validation_row():
    """round(0.05 * 10) is 0: a 40-row file would validate on nothing; every class of 2+ rows gives one."""
    labels = np.repeat(np.arange(4), 10)
    assert np.bincount(labels[data.stratified_split(labels, 0.05, seed=0)[1]], minlength=4).tolist() == [1] * 4
    assert len(data.stratified_split(labels, 0.0, seed=0)[1]) == 0  # val_fraction 0: no validation, as asked


def test_stratified_split_is_disjoint_and_covers_all():
    train, val = data.stratified_split(LABELS, 0.3, seed=1)
    assert not set(train) & set(val)
    assert sorted(np.concatenate([train, val])) == list(range(len(LABELS)))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # sorted: order of the file kept


# ---------------------------------------------------------------- batch_order

LENGTHS = np.random.default_rng(0).integers(3, 120, size=1000)


def padded_cells(batches, lengths):
    return sum(len(b) * int(lengths[b].max()) for b in batches)


def test_batch_order_is_a_function_of_seed_and_epoch():
    def same(a, b):
        return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))

    first = data.batch_order(LENGTHS, 32, seed=1, epoch=0)
    assert same(first, data.batch_order(LENGTHS, 32, seed=1, epoch=0))
    assert not same(first, data.batch_order(LENGTHS, 32, seed=1, epoch=1))
    assert not same(first, data.batch_order(LENGTHS, 32, seed=2, epoch=0))


@pytest.mark.parametrize("group,shuffle", [(True, True), (False, True), (True, False), (False, False)])
def test_batch_order_covers_every_index_once(group, shuffle):
    batches = data.batch_order(LENGTHS, 32, seed=0, epoch=0, group_by_length=group, shuffle=shuffle)
    assert sorted(np.concatenate(batches)) == list(range(len(LENGTHS)))
    assert sorted(len(b) for b in batches) == sorted([32] * (len(LENGTHS) // 32) + [len(LENGTHS) % 32])


def test_batch_order_without_shuffle_or_grouping_is_the_file_order():
    batches = data.batch_order(LENGTHS, 100, seed=0, epoch=0, group_by_length=False, shuffle=False)
    assert np.array_equal(np.concatenate(batches), np.arange(len(LENGTHS)))


def test_grouping_by_length_reduces_padding():
    grouped = data.batch_order(LENGTHS, 16, seed=0, epoch=0, group_by_length=True)
    plain = data.batch_order(LENGTHS, 16, seed=0, epoch=0, group_by_length=False)
    assert padded_cells(grouped, LENGTHS) < 0.75 * padded_cells(plain, LENGTHS)


# ---------------------------------------------------------------- TokenStore

@pytest.fixture
def store():
    encoded = [np.arange(1, n + 1, dtype=np.int32) for n in (3, 17, 5, 33)]
    return data.TokenStore(encoded, np.array([0, 1, 2, 3]), pad_id=0, device="cpu")


def test_token_store_pads_to_multiples_of_16(store):
    assert store.width_max == 48 and tuple(store.ids.shape) == (4, 48)
    assert store.width(np.array([0])) == 16
    assert store.width(np.array([0, 2])) == 16
    assert store.width(np.array([0, 1])) == 32
    assert store.width(np.array([3])) == 48
    assert all(store.width(np.array([i])) % 16 == 0 for i in range(4))


def test_token_store_pads_to_data_pad_multiple():
    from lorakd import config
    from lorakd.errors import UserError

    encoded = [np.arange(1, n + 1, dtype=np.int32) for n in (3, 17, 5, 33)]
    wide = data.TokenStore(encoded, None, pad_id=0, device="cpu", multiple=32)
    assert wide.width_max == 64 and [wide.width(np.array([i])) for i in range(4)] == [32, 32, 32, 64]
    assert config.load(None, ["data.pad_multiple=32"]).data.pad_multiple == 32
    with pytest.raises(UserError, match="data.pad_multiple.*or divide data.max_length"):
        config.load(None, ["data.pad_multiple=48"])
    assert data.pad_multiple(0, 128, "cuda", 24) == 32 and data.pad_multiple(0, 128, "cpu", 24) == 16  # auto
    assert data.pad_multiple(0, 128, "cuda", 256) == 16 and data.pad_multiple(0, 48, "cuda", 24) == 16
    assert data.pad_multiple(0, 20, "cpu", 24) == 4 and data.pad_multiple(24, 48, "cuda", 24) == 24


def test_token_store_batch_mask_matches_lengths(store):
    import torch

    idx = np.array([1, 0, 2])
    ids, mask = store.batch(torch.as_tensor(idx), store.width(idx))
    assert tuple(ids.shape) == tuple(mask.shape) == (3, 32)
    assert mask.sum(1).tolist() == [17, 3, 5]
    assert torch.equal(ids * mask, ids)  # pad id 0 outside the mask, tokens inside
    assert ids[1, :3].tolist() == [1, 2, 3]


def test_pad_length():
    assert [data.pad_length(n) for n in (1, 16, 17, 33)] == [16, 16, 32, 48]
    assert data.pad_length(100, max_length=64) == 64


def test_pad_rows_pads_to_the_longest_or_a_multiple_never_past_max_length():
    rows = [np.array([5, 6, 7]), np.array([8])]
    ids, mask = data.pad_rows(rows, pad_id=1)
    assert ids.tolist() == [[5, 6, 7], [8, 1, 1]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = data.pad_rows(rows, pad_id=1, multiple=4)
    assert ids.shape == (2, 4) and mask.sum() == 4
    assert data.pad_rows([np.arange(99)], 0, multiple=16, max_length=100)[0].shape == (1, 100)


# ---------------------------------------------------------------- fingerprint

def test_fingerprint_follows_texts_labels_and_extra():
    base = rows.Split(["a b", "c"], np.array([0, 1]))
    fp = data.fingerprint(base)
    assert fp == data.fingerprint(rows.Split(["a b", "c"], np.array([0, 1])))
    assert fp != data.fingerprint(rows.Split(["a b", "d"], np.array([0, 1])))
    assert fp != data.fingerprint(rows.Split(["a b", "c"], np.array([0, 2])))
    assert fp != data.fingerprint(rows.Split(["a", "b c"], np.array([0, 1])))  # texts are separated
    assert fp != data.fingerprint(base, "other-backbone|128")


# ---------------------------------------------------------------- reading

def test_charcnn_layout_has_1_based_classes(tmp_path):
    rows = make_texts(5, seed=3)
    split = readers.read_file(write_charcnn(tmp_path / "train.csv", rows), NAMES)
    assert split.labels.tolist() == [label for label, _ in rows]
    assert split.texts == [" ".join(text.split()) for _, text in rows]  # title and description joined


def test_real_ag_news_sample():
    path = SHARED_AG_NEWS / "train.csv"
    if not path.exists():
        pytest.skip(f"{path}: the shared AG News sample is not here")
    split = data.read_splits(str(SHARED_AG_NEWS), NAMES)["train"]
    assert len(split) == 8791
    assert np.bincount(split.labels).tolist() == [2198, 2219, 2199, 2175]  # World, Sports, Business, Sci/Tech
    assert all(t.strip() for t in split.texts)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_label_text_columns(tmp_path, suffix):
    frame = pd.DataFrame({"text": ["goal", "peace", "chip"], "label": [1, 0, 3]})
    path = tmp_path / f"train{suffix}"
    if suffix == ".parquet":
        frame.to_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))
    split = data.read_splits(str(tmp_path), NAMES)["train"]
    assert split.texts == ["goal", "peace", "chip"] and split.labels.tolist() == [1, 0, 3]


def test_folder_reads_train_and_test(tmp_path):  # two train files (csv and jsonl): test_bad_inputs.py
    write_charcnn(tmp_path / "train.csv", make_texts(3, seed=1))
    write_charcnn(tmp_path / "test.csv", make_texts(1, seed=2))
    splits = data.read_splits(str(tmp_path), NAMES)
    assert set(splits) == {"train", "test"} and len(splits["train"]) == 12 and len(splits["test"]) == 4


def test_load_splits_carves_validation_and_trims(tmp_path):
    write_charcnn(tmp_path / "train.csv", make_texts(20, seed=1))
    write_charcnn(tmp_path / "test.csv", make_texts(2, seed=2))
    cfg = config.load(None, [f"data.path={tmp_path}", "data.val_fraction=0.25", "data.max_train_samples=50",
                             "data.repeat=2"])
    splits = data.load_splits(cfg.data, seed=0)
    assert len(splits["validation"]) == 20 and np.bincount(splits["validation"].labels).tolist() == [5] * 4
    assert len(splits["train"]) == 100 and splits["train"].texts[:50] == splits["train"].texts[50:]
    assert len(splits["test"]) == 8
    assert set(splits["train"].ids).isdisjoint(splits["validation"].ids)


@pytest.mark.parametrize("path", ["hub:ag_news", "ag_news"])
def test_hub_error_names_data_path(monkeypatch, path):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as exc:
        data.read_splits(path, NAMES)
    msg = str(exc.value)
    assert msg.startswith("data.path ag_news:") and "fancyzhx/ag_news" in msg and "ConnectionError" in msg
    assert "\n" not in msg


def test_hub_out_of_reach_loads_offline_at_once(monkeypatch):
    """No half minute of datasets' retries: with the hub out of reach the load runs offline (the local cache)."""
    from lorakd import backbones

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test
    monkeypatch.setattr(backbones, "hub_out_of_reach", lambda: True)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError):
        data.read_splits("hub:ag_news", NAMES)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_hub_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if it were not installed
    with pytest.raises(UserError, match=r"data.path ag_news: .*pip install datasets"):
        data.read_splits("hub:ag_news", NAMES)


def test_labelled_keeps_n_stratified_rows_and_returns_the_rest(tmp_path):
    write_charcnn(tmp_path / "train.csv", make_texts(50, seed=3))
    cfg = config.load(None, [], {"data.path": str(tmp_path), "data.val_fraction": 0.2, "data.labelled": 21})
    splits = data.load_splits(cfg.data, 5)
    train, rest = splits["train"], splits["unlabelled"]
    assert len(train) == 21 and len(rest) == 160 - 21
    assert sorted(np.bincount(train.labels).tolist()) == [5, 5, 5, 6]  # proportional, largest remainders
    whole = data.load_splits(config.override(cfg, **{"data.labelled": 0}).data, 5)["train"]
    assert sorted(train.texts + rest.texts) == sorted(whole.texts)  # a partition of the carved train split
    again = data.load_splits(cfg.data, 5)
    assert again["train"].texts == train.texts  # seeded
    with pytest.raises(UserError, match="data.labelled=500: the train split has only 160 rows"):
        data.load_splits(config.override(cfg, **{"data.labelled": 500}).data, 5)


def test_split_seed_fixes_the_split_apart_from_the_run_seed(tmp_path):
    write_charcnn(tmp_path / "train.csv", make_texts(50, seed=3))
    cfg = config.load(None, [], {"data.path": str(tmp_path), "data.val_fraction": 0.2, "data.labelled": 21})
    by_run_seed = [data.load_splits(cfg.data, s)["validation"].texts for s in (5, 6)]
    assert by_run_seed[0] != by_run_seed[1]  # by default the run's seed draws the split
    fixed = config.override(cfg, **{"data.split_seed": 5}).data
    assert data.load_splits(fixed, 6)["validation"].texts == by_run_seed[0]
    assert data.load_splits(fixed, 6)["train"].texts == data.load_splits(cfg.data, 5)["train"].texts


def test_augment_is_seeded_and_does_what_each_op_says():
    texts = [" ".join(f"w{i}_{j}" for j in range(20)) for i in range(30)]
    a = data.augment(texts, 2, ("delete", "swap"), seed=1)
    assert len(a) == 60 and a == data.augment(texts, 2, ("delete", "swap"), seed=1)
    assert a != data.augment(texts, 2, ("delete", "swap"), seed=2)
    deleted = data.augment(texts, 1, ("delete",), seed=1)
    assert sum(len(d.split()) for d in deleted) < 20 * 30
    assert all(set(d.split()) <= set(t.split()) for d, t in zip(deleted, texts))  # only drops words
    swapped = data.augment(texts, 1, ("swap",), seed=1)
    assert all(sorted(s.split()) == sorted(t.split()) for s, t in zip(swapped, texts))  # same words, reordered
    assert any(s != t for s, t in zip(swapped, texts))
    masked = data.augment(texts, 1, ("mask",), seed=1, mask_token="<mask>")
    assert any("<mask>" in m for m in masked)
    mixed = data.augment(texts, 1, ("mix",), seed=1)
    assert any({w.split("_")[0] for w in m.split()} != {t.split("_")[0]} for m, t in zip(mixed, texts))


def test_text_labels_are_taken_from_the_data_sorted(tmp_path):
    """No data.label_names in the config and text labels: the classes are the data's, sorted, said in one line;
    test takes train's classes even when it lacks one; the file is read once."""
    (tmp_path / "train.csv").write_text("text,label\ngood film,positive\nbad film,negative\nfine film,neutral\n"
                                        "great,positive\n")
    (tmp_path / "test.csv").write_text("text,label\nawful,negative\nsplendid,positive\n")
    cfg = config.load(None, [f"data.path={tmp_path}", "data.val_fraction=0"])
    said = []
    resolved = data.with_label_names(cfg, said.append)
    assert resolved.data.label_names == ("negative", "neutral", "positive")
    assert said == ["labels from the data: negative, neutral, positive (set data.label_names for another order)"]
    splits = data.load_splits(resolved.data, seed=0)
    assert splits["train"].labels.tolist() == [2, 0, 1, 2] and splits["test"].labels.tolist() == [0, 2]
    numbered = write_charcnn(tmp_path / "charcnn.csv", make_texts(2, seed=1))
    same = config.override(cfg, **{"data.path": str(numbered)})
    assert data.with_label_names(same, said.append) == same and len(said) == 1  # class numbers: the default names


def test_text_labels_that_are_some_ag_news_names_keep_its_order_and_only_those(tmp_path):
    """World and Sports only, no data.label_names: two classes in AG News order, not the four defaults (the
    classes the data lacks would have no train row); all four keep the default quietly."""
    (tmp_path / "train.csv").write_text("text,label\nmatch won,Sports\nsummit held,World\ncup final,sports\n")
    cfg = config.load(None, [f"data.path={tmp_path}", "data.val_fraction=0"])
    said = []
    resolved = data.with_label_names(cfg, said.append)
    assert resolved.data.label_names == ("World", "Sports") and len(said) == 1
    assert data.load_splits(resolved.data, seed=0)["train"].labels.tolist() == [1, 0, 1]
    (tmp_path / "train.csv").write_text("text,label\na,World\nb,Sports\nc,Business\nd,Sci/Tech\n")
    assert data.with_label_names(cfg, said.append) == cfg and len(said) == 1


def test_a_fixed_label_order_is_kept_and_a_label_outside_it_names_the_key(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood film,positive\nbad film,negative\nmeh,neutral\n")
    cfg = config.load(None, [f"data.path={tmp_path}", "data.label_names=[positive,negative]"])
    assert data.with_label_names(cfg, print) is cfg
    with pytest.raises(UserError, match=r"train.csv: row 4: label 'neutral' is not one of data.label_names "
                                        r"\(positive, negative\)"):
        data.load_splits(cfg.data, seed=0)
