"""Unpickling an untrusted file: the data a course pickle holds, never a call it asks for.

pickle.load calls whatever a file names (os.system, say). Here every global the file names must be one of
an exact list of (module, name) pairs whose calls only build data (numpy arrays, pandas frames, arrow
arrays), whatever their arguments; anything else stops the load before it is called. datasets' own classes
never run: they load as inert records, and a Dataset is read from its arrow table.

What those libraries trust in a file is checked before they use it, as a crafted file would make them read
or write outside their buffers: pandas' block placements, arrow's offsets, and a numpy dtype's state (a
dtype whose pickled flags say "no objects" makes numpy take 8 bytes of the file for a pointer)."""
from __future__ import annotations

import pickle

import numpy as np

_NUMPY = {("numpy", "ndarray"), ("numpy", "dtype")} | {
    (f"numpy{core}.{mod}", name) for core in (".core", "._core")  # numpy 1 and numpy 2 module names
    for mod, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}
# pandas 3 names its classes from the top-level package, pandas 2 from where they are defined
_PANDAS = {("pandas", n) for n in ("DataFrame", "Index", "RangeIndex", "StringDtype", "NA")} | {
    ("pandas.core.frame", "DataFrame"), ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.base", "_new_Index"), ("pandas.core.indexes.range", "RangeIndex"),
    ("pandas._libs.internals", "_unpickle_block"), ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"),
    ("pandas._libs.missing", "NA"), ("pandas.arrays", "StringArray"), ("pandas.arrays", "ArrowStringArray"),
    ("pandas.core.arrays.string_", "StringArray"), ("pandas.core.arrays.string_", "StringDtype"),
    ("pandas.core.arrays.string_arrow", "ArrowStringArray")}
_PYARROW = {("pyarrow.lib", n) for n in ("_reconstruct_table", "chunked_array", "py_buffer", "type_for_alias",
                                         "field", "schema", "list_", "large_list", "struct")}
# bytes and slices in protocol 2 (which writes `builtins` as `__builtin__`)
_BUILTINS = {("builtins", "bytearray"), ("builtins", "slice"), ("_codecs", "encode")}
ALLOWED = _NUMPY | _PANDAS | _PYARROW | _BUILTINS
# also allowed, through checking stand-ins (REPLACED, below): pandas' BlockManager, arrow's array rebuild, and
# every datasets class (as a Record)


class Refused(pickle.UnpicklingError):
    """The file names a global outside the allow-list."""

    def __init__(self, module, name):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


class Record(dict):
    """Stands in for a datasets class: keeps what the file says (constructor arguments, items, state) and
    runs none of datasets' code. A dict, so that the items the file sets on a Features land somewhere."""

    args, kwargs, state = (), {}, None  # a record made by NEWOBJ skips __init__

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _record_class(module, name):
    return type(name, (Record,), {"qualname": f"{module}.{name}"})


def _restore_array(*args):
    """pyarrow's own rebuild, then a full validation: arrow trusts offsets and lengths in the file."""
    from pyarrow.lib import _restore_array as restore

    array = restore(*args)
    array.validate(full=True)
    return array


def _block_manager(blocks, axes, *rest):
    """pandas' BlockManager(blocks, axes), once the blocks' column positions cover the columns exactly once:
    pandas indexes memory with them unchecked (a position past the end crashes the process, or worse)."""
    from pandas import Index
    from pandas.core.internals.blocks import Block
    from pandas.core.internals.managers import BlockManager

    if not (all(isinstance(b, Block) for b in blocks) and all(isinstance(a, Index) for a in axes) and axes):
        raise pickle.UnpicklingError("a DataFrame whose parts are not blocks and indexes")
    positions = np.sort(np.concatenate([b.mgr_locs.as_array for b in blocks] + [np.zeros(0, np.intp)]))
    if not np.array_equal(positions, np.arange(len(axes[0]))):
        raise pickle.UnpicklingError("a DataFrame whose blocks do not match its columns")
    return BlockManager(tuple(blocks), list(axes), *rest)


REPLACED = {("pyarrow.lib", "_restore_array"): _restore_array,
            ("pandas.core.internals.managers", "BlockManager"): _block_manager}


class SafeUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (pickle's own, a few times slower than the C one: 0.3 s for 120,000 rows),
    as its opcodes can be checked one by one: BUILD here."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def load_build(self):
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.dtype) and state != inst.__reduce__()[2]:  # fields, flags, units of its own
            raise pickle.UnpicklingError(f"a numpy dtype {inst} whose pickled state is not its own")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def load_ext(self):  # copyreg's extension registry: its cache would hand over globals past find_class
        raise pickle.UnpicklingError("an extension code (copyreg), which lorakd does not load")

    dispatch.update(dict.fromkeys((pickle.EXT1[0], pickle.EXT2[0], pickle.EXT4[0]), load_ext))

    def find_class(self, module, name):
        module = "builtins" if module == "__builtin__" else module
        if "." in name:  # protocol 4 resolves dotted names attribute by attribute: os.system from anywhere
            raise Refused(module, name)
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        if (module, name) in REPLACED:
            return REPLACED[module, name]
        if module == "datasets" or module.startswith("datasets."):
            return _record_class(module, name)
        raise Refused(module, name)


def _arrow_table(rec):
    """The pyarrow Table behind a datasets table record (in memory, or in-memory blocks put together)."""
    import pyarrow as pa

    kind = getattr(rec, "qualname", type(rec).__name__)
    state = rec.state if isinstance(rec, Record) and isinstance(rec.state, dict) else {}
    if kind == "datasets.table.InMemoryTable" and isinstance(state.get("table"), pa.Table):
        return state["table"]
    if kind == "datasets.table.ConcatenationTable" and isinstance(state.get("blocks"), list):
        rows = []  # blocks: rows of tables side by side (added columns), the rows one after another
        for row in state["blocks"]:
            tables = [_arrow_table(t) for t in row]
            rows.append(pa.Table.from_arrays([c for t in tables for c in t.columns],
                                             names=[n for t in tables for n in t.column_names]))
        return pa.concat_tables(rows)
    if kind == "datasets.table.MemoryMappedTable":
        raise pickle.UnpicklingError("a Dataset whose rows are in a cache file of the machine that made it; "
                                     "pickle an in-memory one (Dataset.from_pandas, or ds.flatten_indices("
                                     "keep_in_memory=True))")
    raise pickle.UnpicklingError(f"a Dataset whose table is a {kind}")


def dataset_frame(rec):
    """A pandas DataFrame of a datasets.Dataset record: its arrow table, in the order its indices give."""
    state = rec.state if isinstance(rec.state, dict) else {}
    table = _arrow_table(state.get("_data"))
    if state.get("_indices") is not None:  # a select/shuffle/filter: row numbers into the table
        table = table.take(_arrow_table(state["_indices"]).column(0))
    return table.to_pandas()


def load(f):
    """The object a pickle file holds; a datasets.Dataset comes back as a pandas DataFrame.
    Raises Refused for a global outside the allow-list, other exceptions for a broken file."""
    obj = SafeUnpickler(f).load()
    if isinstance(obj, Record) and obj.qualname == "datasets.arrow_dataset.Dataset":
        obj = dataset_frame(obj)
    return obj
