"""Unpickling an untrusted file: the data a course pickle holds, never a call it asks for.

pickle.load calls whatever a file names (os.system, say). Here every global the file names must be one of
an exact list of (module, name) pairs whose calls only build data (numpy arrays, pandas frames, arrow
arrays), whatever their arguments; anything else stops the load before it is called. datasets' own classes
never run: they load as inert records, and a Dataset is read from its arrow table.

What those libraries trust in a file is checked before they use it, as a crafted file would make them read
or write outside their buffers: pandas' block placements, arrow's offsets, and a numpy dtype's state (a
dtype whose pickled flags say "no objects" makes numpy take 8 bytes of the file for a pointer)."""
from __future__ import annotations

import os
import pickle
import struct

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
# also allowed, through checking stand-ins (REPLACED and CHARGED, below): pandas' BlockManager, arrow's array
# rebuild, and every datasets class (as a Record)


FLOOR = 64 << 20  # bytes any pickle may build, whatever its size
PER_FILE_BYTE = 4  # and this many per byte of the file: an array's bytes, its objects (8 each), byte strings


class TooLarge(pickle.UnpicklingError):
    """The file asks for more memory than its size can justify (a 34-byte bytearray(2_000_000_000), say)."""


class Budget:
    """Bytes the objects a pickle builds may take: FLOOR + PER_FILE_BYTE x the file's size. Each allocating
    call is charged before it runs, so a bomb stops at the check, not after the allocation; the message says
    which limit."""

    def __init__(self, file_size):
        self.limit, self.used = FLOOR + PER_FILE_BYTE * max(0, file_size), 0

    def charge(self, nbytes, what):
        self.used += max(0, int(nbytes))
        self.fits(self.used, what)

    def fits(self, nbytes, what):
        """nbytes on its own (what a conversion of everything loaded builds) within the limit."""
        if nbytes > self.limit:
            raise TooLarge(f"{what} takes the pickle past lorakd's memory limit of {self.limit:,} bytes "
                           f"({FLOOR >> 20} MiB + {PER_FILE_BYTE}x the file's size)")


def _array_bytes(shape, dtype) -> int:
    """What numpy allocates for an array of this shape and dtype (8 bytes per object); a shape or dtype that is
    not one is refused."""
    shape = (shape,) if isinstance(shape, int) else shape
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise pickle.UnpicklingError(f"a numpy array of shape {shape!r:.60}")
    dtype = np.dtype(dtype)
    return int(np.prod(shape, dtype=object)) * max(dtype.itemsize, 8 if dtype.hasobject else 1)


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


def _charged_restore_array(budget, restore):
    """pyarrow's own rebuild, then a full validation: arrow trusts offsets and lengths in the file. Charged its
    buffers and 8 bytes a row (what pandas makes of it): a null array of 10**10 rows has no buffer at all."""
    def make(*args):
        array = restore(*args)
        budget.charge(array.nbytes + 8 * len(array), f"an arrow array of {len(array):,} rows")
        array.validate(full=True)
        return array
    return make


def _bytearray_cost(args):
    n = args[0] if args and isinstance(args[0], int) else len(args[0]) if args and hasattr(args[0], "__len__") else 0
    return n, f"a bytearray of {n:,} bytes"


def _ndarray_cost(args):  # ndarray(shape, dtype=float, ...)
    shape, dtype = (list(args) + [float, float])[:2]
    return _array_bytes(shape, dtype), f"a numpy array of shape {shape!r:.40} ({np.dtype(dtype)})"


def _reconstruct_cost(args):  # _reconstruct(subtype, shape, dtype)
    shape, dtype = (list(args[1:]) + [float, float])[:2]
    return _array_bytes(shape, dtype), f"a numpy array of shape {shape!r:.40}"


def _encode_cost(args):  # _codecs.encode(text, encoding): at most 4 bytes a character
    n = len(args[0]) if args and isinstance(args[0], str) else 0
    return 4 * n, f"a byte string of {n:,} characters"


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


REPLACED = {("pandas.core.internals.managers", "BlockManager"): _block_manager}
# the allow-list's calls that allocate as their arguments say: (bytes, what) charged before the call runs
COSTS = {("builtins", "bytearray"): _bytearray_cost, ("numpy", "ndarray"): _ndarray_cost,
         ("_codecs", "encode"): _encode_cost} | {
    (f"numpy{core}.multiarray", "_reconstruct"): _reconstruct_cost for core in (".core", "._core")}


class SafeUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (pickle's own, a few times slower than the C one: 0.3 s for 120,000 rows),
    as its opcodes can be checked one by one: BUILD here."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, f, file_size=0):
        super().__init__(f)
        self.budget = Budget(file_size)
        self.costs = {}  # id of a callable the file named -> its cost function (COSTS)

    def _charge_call(self, func, args):
        cost = self.costs.get(id(func))
        if cost is not None:
            try:
                nbytes, what = cost(tuple(args) if isinstance(args, (tuple, list)) else ())
            except (TypeError, ValueError) as e:
                raise pickle.UnpicklingError(f"a call of {getattr(func, '__name__', func)} with arguments "
                                             f"that are not sizes ({str(e)[:80]})") from None
            self.budget.charge(nbytes, what)

    def load_reduce(self):  # func(*args)
        self._charge_call(self.stack[-2], self.stack[-1])
        super().load_reduce()

    def load_newobj(self):  # cls.__new__(cls, *args): numpy allocates an ndarray's memory in __new__
        self._charge_call(self.stack[-2], self.stack[-1])
        super().load_newobj()

    def load_newobj_ex(self):  # cls.__new__(cls, *args, **kwargs)
        self._charge_call(self.stack[-3], self.stack[-2])
        super().load_newobj_ex()

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def load_build(self):
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.dtype) and state != inst.__reduce__()[2]:  # fields, flags, units of its own
            raise pickle.UnpicklingError(f"a numpy dtype {inst} whose pickled state is not its own")
        if isinstance(inst, np.ndarray):
            self._check_array_state(state)
        super().load_build()

    def _check_array_state(self, state):
        """An array's (version, shape, dtype, fortran, data), charged before numpy allocates it. An object
        array's data is a list that numpy copies unchecked: shorter than the shape, it crashes the process."""
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("a numpy array whose pickled state is not an array's")
        shape, dtype, data = state[-4], state[-3], state[-1]
        if not isinstance(dtype, np.dtype):
            raise pickle.UnpicklingError("a numpy array whose pickled dtype is not a dtype")
        nbytes = _array_bytes(shape, dtype)
        if dtype.hasobject and not (isinstance(data, list) and len(data) == nbytes // 8):
            raise pickle.UnpicklingError(f"a numpy object array of shape {shape} whose items do not fill it")
        self.budget.charge(nbytes, f"a numpy array of shape {shape} ({dtype})")

    dispatch[pickle.BUILD[0]] = load_build

    def load_bytearray8(self):  # protocol 5 allocates the bytearray before reading it
        (n,) = struct.unpack("<Q", self.read(8))
        self.budget.charge(n, f"a bytearray of {n:,} bytes")
        self.stack.append(bytearray(self.read(n)))

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def load_ext(self):  # copyreg's extension registry: its cache would hand over globals past find_class
        raise pickle.UnpicklingError("an extension code (copyreg), which lorakd does not load")

    dispatch.update(dict.fromkeys((pickle.EXT1[0], pickle.EXT2[0], pickle.EXT4[0]), load_ext))

    def find_class(self, module, name):
        module = "builtins" if module == "__builtin__" else module
        if "." in name:  # protocol 4 resolves dotted names attribute by attribute: os.system from anywhere
            raise Refused(module, name)
        if (module, name) == ("pyarrow.lib", "_restore_array"):
            return _charged_restore_array(self.budget, super().find_class(module, name))
        if (module, name) in ALLOWED:
            found = super().find_class(module, name)
            if (module, name) in COSTS:
                self.costs[id(found)] = COSTS[module, name]
            return found
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


def dataset_frame(rec, budget=None):
    """A pandas DataFrame of a datasets.Dataset record: its arrow table, in the order its indices give. The
    table pandas would build is sized first: a few rows taken (or concatenated) a million times are small in
    the file and huge once copied."""
    budget = budget or Budget(0)
    state = rec.state if isinstance(rec.state, dict) else {}
    table = _arrow_table(state.get("_data"))
    if state.get("_indices") is not None:  # a select/shuffle/filter: row numbers into the table
        indices = _arrow_table(state["_indices"]).column(0)
        budget.fits(len(indices) * (table.nbytes // max(1, table.num_rows) + 8 * table.num_columns),
                    f"a Dataset of {len(indices):,} rows taken")
        table = table.take(indices)
    budget.fits(table.get_total_buffer_size() + 8 * table.num_rows * table.num_columns,
                f"a Dataset of {table.num_rows:,} rows")
    return table.to_pandas()


def _text_size(obj) -> int:
    """Characters of the texts a loaded pickle holds, counted as the readers will copy them: a list of a
    million references to one long string is small in the file and in memory, until every row is a text."""
    import pandas as pd

    if type(obj) is pd.DataFrame:
        cols = [obj[c].to_numpy() for c in obj.columns if obj[c].dtype == object]
    elif isinstance(obj, dict):
        cols = list(obj.values())
    else:
        cols = [obj]
    total = 0
    for col in cols:
        items = col if isinstance(col, (list, tuple, np.ndarray)) else [col]
        for x in items:
            if isinstance(x, dict):
                total += sum(len(v) for v in x.values() if isinstance(v, str))
            elif isinstance(x, str):
                total += len(x)
    return total


def load(f):
    """The object a pickle file holds; a datasets.Dataset comes back as a pandas DataFrame.
    Raises Refused for a global outside the allow-list, TooLarge past the file's memory budget (Budget), other
    exceptions for a broken file."""
    try:
        size = os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, ValueError):  # an in-memory file
        size = len(f.getbuffer()) if hasattr(f, "getbuffer") else 0
    unpickler = SafeUnpickler(f, size)
    obj = unpickler.load()
    if isinstance(obj, Record) and obj.qualname == "datasets.arrow_dataset.Dataset":
        obj = dataset_frame(obj, unpickler.budget)
    unpickler.budget.fits(_text_size(obj), "the texts it holds (one string referred to many times?)")
    return obj
