"""Pickles: a file that asks to run code is refused before anything runs; the course formats still load."""
import base64
import builtins
import os
import pickle
import subprocess

import numpy as np
import pandas as pd
import pytest

from lorakd import config
from lorakd import readers
from lorakd.errors import UserError

NAMES = config.AG_NEWS_LABELS


class Calls:
    """Pickles as a call of fn(*args) on load, as an attacker's file would."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def call_pickle(module, name, *args):
    """A pickle that calls module.name(*args) by name: also names pickle.dumps refuses to write (dotted ones)."""
    def text(s):
        return b"\x8c" + bytes([len(s)]) + s.encode()
    return b"\x80\x04" + text(module) + text(name) + b"\x93" + pickle.dumps(args, protocol=2)[2:-1] + b"R."


def read(tmp_path, content):
    path = tmp_path / "in.pkl"
    path.write_bytes(content if isinstance(content, bytes) else pickle.dumps(content))
    return readers.read_unlabelled(path, NAMES)


def refused(tmp_path, content):
    with pytest.raises(UserError) as exc:
        read(tmp_path, content)
    msg = str(exc.value)
    assert "\n" not in msg and str(tmp_path / "in.pkl") in msg
    return msg


def attacks(marker):
    touch = f"touch {marker}"
    return {
        "os.system": (Calls(os.system, touch), f"{os.system.__module__}.system"),
        "subprocess.call": (Calls(subprocess.call, ["touch", str(marker)]), "subprocess.call"),
        "subprocess.Popen": (Calls(subprocess.Popen, ["touch", str(marker)]), "subprocess.Popen"),
        "eval": (Calls(builtins.eval, f"__import__('os').system({touch!r})"), "builtins.eval"),
        "exec": (Calls(builtins.exec, f"import os; os.system({touch!r})"), "builtins.exec"),
        "nested": ([{"text": "fine", "id": Calls(os.system, touch)}], f"{os.system.__module__}.system"),
        "protocol-0": (f"cos\nsystem\n(S'{touch}'\ntR.".encode(), "os.system"),
        "dotted-name": (call_pickle("pandas", "io.pickle.os.system", touch), "pandas.io.pickle.os.system"),
        "getattr-by-name": (call_pickle("builtins", "getattr", "x", "upper"), "builtins.getattr"),
        "copyreg": (call_pickle("copyreg", "_reconstructor", "x", "y", "z"), "copyreg._reconstructor"),
        "functools.partial": (call_pickle("functools", "partial", "x"), "functools.partial"),
        "torch.load": (call_pickle("torch", "load", str(marker)), "torch.load"),
        "pandas.read_pickle": (call_pickle("pandas", "read_pickle", str(marker)), "pandas.read_pickle"),
    }


@pytest.mark.parametrize("attack", list(attacks("m")))
def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path, attack):
    marker = tmp_path / "pwned"
    content, name = attacks(marker)[attack]
    msg = refused(tmp_path, content if isinstance(content, bytes) else pickle.dumps(content))
    assert f"pickle refers to {name}, which lorakd does not load" in msg
    assert not marker.exists()


def test_the_attack_is_real(tmp_path):
    """The same file through plain pickle does run its command: the refusal above is what stops it."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Calls(os.system, f"touch {marker}")))
    assert marker.exists()


def test_datasets_classes_are_inert_records(tmp_path):
    """A datasets name is never imported or called: datasets.load_dataset(...) is only a record of the call."""
    assert "pickle holds a load_dataset" in refused(tmp_path, call_pickle("datasets", "load_dataset", "x"))
    assert "pickle refers to datasets.utils.os.system" in refused(tmp_path, call_pickle("datasets", "utils.os.system"))


def test_a_memory_mapped_dataset_is_refused_with_advice(tmp_path):
    """As datasets writes one: a Dataset whose _data is a MemoryMappedTable naming a file (read, replayed)."""
    raw = (b"\x80\x04\x8c\x16datasets.arrow_dataset\x8c\x07Dataset\x93)\x81}\x8c\x05_data"
           b"\x8c\x0edatasets.table\x8c\x11MemoryMappedTable\x93)\x81}\x8c\x04path\x8c\x0b/etc/passwdsbsb.")
    assert "cache file of the machine that made it" in refused(tmp_path, raw)


def test_dataframe_blocks_outside_the_columns_are_refused(tmp_path):
    """pandas trusts a block's column positions: one past the end writes outside an array (a crash, here)."""
    from pandas._libs.internals import _unpickle_block
    from pandas.core.internals.managers import BlockManager

    block = Calls(_unpickle_block, np.array([[3, 4]]), slice(100_000_000, 100_000_001, 1), 2)
    frame = Calls(pd.DataFrame, Calls(BlockManager, (block,), [pd.Index(["text"]), pd.RangeIndex(2)]))
    assert "blocks do not match its columns" in refused(tmp_path, pickle.dumps(frame))


def test_arrow_offsets_outside_the_data_are_refused(tmp_path):
    """Arrow trusts a string array's offsets; an offset past the data reads outside it. Validated on load."""
    import pyarrow as pa

    fn, (state,) = pa.array(["ab"]).__reduce__()
    typ, length, nulls, offset, buffers, *rest = state
    offsets = pa.py_buffer(np.array([0, 1 << 30], np.int32).tobytes())
    bad = (typ, length, nulls, offset, [buffers[0], offsets, buffers[2]], *rest)
    crafted = pickle.dumps(Calls(fn, bad))
    assert len(pickle.loads(crafted).buffers()[1]) == 8  # plain pickle takes it as it is
    assert "not a readable pickle" in refused(tmp_path, crafted)


def test_a_numpy_dtype_with_flags_of_its_own_is_refused(tmp_path):
    """An object array whose dtype's pickled flags say "no objects" gets raw bytes of the file as pointers."""
    raw = pickle.dumps(np.array([None], dtype=object), protocol=2)
    evil = raw.replace(b"K?tq\x10b", b"K\x00tq\x10b").replace(b"]q\x11Na", b"C\x08AAAAAAAA")
    assert evil.count(b"AAAAAAAA") == 1 and b"K\x00tq\x10b" in evil
    assert pickle.loads(evil).dtype.flags == 0  # plain pickle builds it; printing it would dereference 0x4141...
    assert "numpy dtype object whose pickled state is not its own" in refused(tmp_path, evil)


def test_extension_codes_are_refused(tmp_path):
    assert "extension code" in refused(tmp_path, b"\x80\x02\x82\x01.")


# pandas 2.2.3 / numpy 1.26 (the course's likely writer), DataFrame({"ID": [3, 4], "text": [...]}), protocol 4
PANDAS2_FRAME = base64.b64decode(
    "gASV7wIAAAAAAACMEXBhbmRhcy5jb3JlLmZyYW1llIwJRGF0YUZyYW1llJOUKYGUfZQojARfbWdylIwecGFuZGFzLmNvcmUuaW50ZXJuYWxzLm1h"
    "bmFnZXJzlIwMQmxvY2tNYW5hZ2VylJOUjBZwYW5kYXMuX2xpYnMuaW50ZXJuYWxzlIwPX3VucGlja2xlX2Jsb2NrlJOUjBVudW1weS5jb3JlLm11"
    "bHRpYXJyYXmUjAxfcmVjb25zdHJ1Y3SUk5SMBW51bXB5lIwHbmRhcnJheZSTlEsAhZRDAWKUh5RSlChLAUsBSwKGlGgPjAVkdHlwZZSTlIwCaTiU"
    "iYiHlFKUKEsDjAE8lE5OTkr/////Sv////9LAHSUYolDEAMAAAAAAAAABAAAAAAAAACUdJRijAhidWlsdGluc5SMBXNsaWNllJOUSwBLAUsBh5RS"
    "lEsCh5RSlGgLaA5oEUsAhZRoE4eUUpQoSwFLAUsChpRoGIwCTziUiYiHlFKUKEsDjAF8lE5OTkr/////Sv////9LP3SUYoldlCiMD2VsZWN0aW9u"
    "IHRyZWF0eZSMCmdvYWwgbWF0Y2iUZXSUYmgiSwFLAksBh5RSlEsCh5RSlIaUXZQojBhwYW5kYXMuY29yZS5pbmRleGVzLmJhc2WUjApfbmV3X0lu"
    "ZGV4lJOUaDqMBUluZGV4lJOUfZQojARkYXRhlGgOaBFLAIWUaBOHlFKUKEsBSwKFlGgtiV2UKIwCSUSUjAR0ZXh0lGV0lGKMBG5hbWWUTnWGlFKU"
    "aDyMGXBhbmRhcy5jb3JlLmluZGV4ZXMucmFuZ2WUjApSYW5nZUluZGV4lJOUfZQoaElOjAVzdGFydJRLAIwEc3RvcJRLAowEc3RlcJRLAXWGlFKU"
    "ZYaUUpSMBF90eXCUjAlkYXRhZnJhbWWUjAlfbWV0YWRhdGGUXZSMBWF0dHJzlH2UjAZfZmxhZ3OUfZSMF2FsbG93c19kdXBsaWNhdGVfbGFiZWxz"
    "lIhzdWIu")


def test_a_pandas_2_dataframe_pickle_loads(tmp_path):
    split = read(tmp_path, PANDAS2_FRAME)
    assert split.texts == ["election treaty", "goal match"] and split.ids == ["3", "4"]


def frames():
    yield "object-strings", pd.DataFrame({"ID": [3, 4], "text": ["a", "b"]})
    yield "arrow-strings", pd.DataFrame({"ID": [3, 4], "text": pd.array(["a", "b"], dtype="string[pyarrow]")})
    yield "python-strings", pd.DataFrame({"ID": [3, 4], "text": pd.array(["a", "b"], dtype="string[python]")})
    yield "dict-of-arrays", {"ID": np.array([3, 4]), "text": np.array(["a", "b"])}
    yield "numpy-scalars", {"ID": [np.int64(3), np.int64(4)], "text": ["a", "b"]}
    yield "records", [{"ID": 3, "text": "a"}, {"ID": 4, "text": "b"}]


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("kind,obj", list(frames()), ids=[k for k, _ in frames()])
def test_course_formats_load_at_every_protocol(tmp_path, kind, obj, protocol):
    split = read(tmp_path, pickle.dumps(obj, protocol=protocol))
    assert split.texts == ["a", "b"] and split.ids == ["3", "4"]


def test_numpy_array_of_texts_loads(tmp_path):
    assert read(tmp_path, np.array(["a", "b"])).texts == ["a", "b"]


@pytest.mark.parametrize("protocol", [2, 5])
def test_datasets_in_their_usual_shapes_load(tmp_path, protocol):
    datasets = pytest.importorskip("datasets")
    base = datasets.Dataset.from_dict({"ID": [5, 6, 7], "text": ["a", "b", "c"]})
    cases = {
        "plain": (base, ["a", "b", "c"]),
        "selected": (base.select([2, 0]), ["c", "a"]),  # an indices mapping over the table
        "concatenated": (datasets.concatenate_datasets([base, datasets.Dataset.from_dict({"ID": [8], "text": ["d"]})]),
                         ["a", "b", "c", "d"]),
        "added-column": (datasets.Dataset.from_dict({"text": ["a"]}).add_column("ID", [9]), ["a"]),
        "class-label": (base.cast_column("ID", datasets.ClassLabel(num_classes=8)), ["a", "b", "c"]),
    }
    for name, (ds, texts) in cases.items():
        assert read(tmp_path, pickle.dumps(ds, protocol=protocol)).texts == texts, name
