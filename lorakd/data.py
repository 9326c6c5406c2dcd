"""Data: read labelled splits (CSV, JSONL, parquet, hub), carve validation, tokenise once, batch by length."""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import AG_NEWS_LABELS
from .errors import UserError, first_line

HUB_ALIASES = {"ag_news": "fancyzhx/ag_news", "fancyzhx/ag_news": "fancyzhx/ag_news"}
FORMATS = (".csv", ".jsonl", ".parquet")
csv.field_size_limit(1 << 30)  # a 10 MB row is legal CSV; tokenisation truncates it


@dataclass
class Split:
    texts: list[str]
    labels: np.ndarray | None  # int64 class indices 0..K-1, None for unlabelled input
    ids: list[str] | None = None
    id_column: str | None = None  # the input's name of its id column ("id", "ID"), when it has one
    label_names: tuple[str, ...] | None = None  # the classes, when read with names=None (from the data)

    def __len__(self):
        return len(self.texts)

    def subset(self, idx):
        idx = np.asarray(idx, dtype=np.int64)
        return Split([self.texts[i] for i in idx], None if self.labels is None else self.labels[idx],
                     None if self.ids is None else [self.ids[i] for i in idx], self.id_column)


# ---------------------------------------------------------------- reading files

def _decode(path: Path) -> str:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a BOM is tolerated
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: bytes that are not UTF-8 (offset {e.start})") from None
    if not text.strip():
        raise UserError(f"{path}: the file is empty")
    return text


def _label(value, names, one_based, where):
    """A class index 0..K-1 from an int (0- or 1-based by layout) or a class name."""
    k = len(names)
    if value is None:
        raise UserError(f"{where}: no label")
    if isinstance(value, (bool, np.bool_)):
        raise UserError(f"{where}: label {value!r} is not a class")
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and float(value).is_integer()):
        i = int(value)
    else:
        s = str(value).strip()
        try:
            i = int(s)
        except ValueError:
            lowered = [n.lower() for n in names]
            if s.lower() in lowered:
                return lowered.index(s.lower())
            raise UserError(f"{where}: label {s!r} is not one of data.label_names ({', '.join(names)}) nor a class "
                            "number; add it there, or leave data.label_names unset to take the classes from the data"
                            ) from None
    lo = 1 if one_based else 0
    if not lo <= i < lo + k:
        base = "1-based, the CharCNN layout" if one_based else "0-based"
        raise UserError(f"{where}: label {i} outside the classes {lo}..{lo + k - 1} ({base}; data.label_names has "
                        f"{k})")
    return i - lo


def _columns(n: int) -> str:
    return f"{n} column" + ("s" if n != 1 else "")


def _text(title, description, where):
    for s in (title, description):
        if s is not None and not isinstance(s, str):
            raise UserError(f"{where}: text is {type(s).__name__}, expected a string")
    text = " ".join(s.strip() for s in (title, description) if s is not None and s.strip())
    if not text:
        raise UserError(f"{where}: empty text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (a JSON \ud800 escape, say): no tokenizer takes it
        raise UserError(f"{where}: text is not valid Unicode (a lone surrogate)") from None
    return text


def _find(columns, *names):
    lowered = {str(c).strip().lower(): c for c in columns}
    for n in names:
        if n in lowered:
            return lowered[n]
    return None


def _names(columns):
    """Column names for a one-line message: a name holding a line break is quoted."""
    return ", ".join(s if s.isprintable() else repr(s) for s in map(str, columns)) or "none"


READ_COLUMNS = ("text", "sentence", "content", "title", "description", "label", "labels", "class", "id")


def _rows_to_split(rows, columns, names, where, need_labels=True):
    """Records with named columns (header CSV, JSONL, parquet, pickles) to a Split."""
    seen = set()
    for c in columns:  # a CSV row keeps the last of two same-named fields: which one was meant?
        key = str(c).strip().lower()
        if key in READ_COLUMNS and key in seen:
            raise UserError(f"{where}: the column {str(c).strip()!r} is named twice in the header; keep one")
        seen.add(key)
    text_col = _find(columns, "text", "sentence", "content")
    title_col, desc_col = _find(columns, "title"), _find(columns, "description")
    label_col = _find(columns, "label", "labels", "class")
    id_col = _find(columns, "id")
    if text_col is None and title_col is None:
        raise UserError(f"{where}: no text column (expected 'text', or 'title' and 'description'; "
                        f"found {_names(columns)})")
    if need_labels and label_col is None:
        raise UserError(f"{where}: no label column (expected 'label'; found {_names(columns)})")
    one_based = label_col is not None and str(label_col).strip().lower() == "class"
    texts, labels, ids = [], [], []
    for n, (row_where, row) in enumerate(rows):
        if text_col is not None:
            texts.append(_text(row.get(text_col), None, row_where))
        else:
            texts.append(_text(row.get(title_col), row.get(desc_col), row_where))
        if need_labels:  # names None: the raw labels, mapped once the classes are known (names_from_labels)
            labels.append(_label(row.get(label_col), names, one_based, row_where) if names is not None
                          else (row.get(label_col), row_where))
        if id_col is not None and (row.get(id_col) is None or not str(row.get(id_col)).strip()):
            raise UserError(f"{row_where}: no id")
        ids.append(str(row[id_col]) if id_col is not None else str(n))
    if not texts:
        raise UserError(f"{where}: no rows")
    if need_labels and names is None:
        names = names_from_labels([v for v, _ in labels])
        labels = [_label(v, names, one_based, row_where) for v, row_where in labels]
    return Split(texts, np.asarray(labels, dtype=np.int64) if need_labels else None, ids,
                 None if id_col is None else str(id_col).strip(), None if names is None else tuple(names))


def _is_number(value) -> bool:
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return True
    if isinstance(value, float):
        return value.is_integer()
    try:
        int(str(value).strip())
        return True
    except ValueError:
        return False


def names_from_labels(values) -> tuple[str, ...]:
    """The classes of data whose config leaves data.label_names unset: its text labels, sorted (positive,
    negative -> negative, positive). Class numbers, and labels that are all AG News names, keep the default."""
    text = {str(v).strip() for v in values if v is not None and not _is_number(v)}
    text.discard("")
    if not text or {t.lower() for t in text} <= {n.lower() for n in AG_NEWS_LABELS}:
        return AG_NEWS_LABELS
    return tuple(sorted({str(v).strip() for v in values if v is not None and str(v).strip()}))


PEEK_ROWS = 1000  # rows a headerless file's layout is judged from
LAYOUTS = ("auto", "text", "charcnn")  # a headerless CSV: judged from its rows | one text per row | class,title,...
CHARCNN = ["class", "title", "description"]


def _class_number(field) -> bool:
    return re.fullmatch(r"\d{1,3}", field.strip()) is not None


def headerless_columns(rows, where, layout="auto") -> tuple[list[str], bool]:
    """(columns, checked) of headerless unlabelled CSV rows ((row number, fields) pairs), judged from the first
    rows unless `layout` says. A first row of 2 or 3 fields starting with a class number is the CharCNN layout
    (class,title,description or class,text; the class is not used); `checked`: every row must then look like
    one too (headerless_record), else the file is refused as ambiguous, not misread. Rows that all have one
    other shape need a header: taking one of several columns would predict on the wrong text unsaid. Else
    one text per row, an unquoted comma kept in the text."""
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    first = rows[0][1]
    if layout == "text":
        return ["text"], False
    if layout == "charcnn" or (len(first) in (2, 3) and _class_number(first[0])):
        if len(first) not in (2, 3):
            raise UserError(f"{where}: row {rows[0][0]}: {_columns(len(first))}; the CharCNN layout has "
                            "class,title,description or class,text")
        return CHARCNN[: len(first)], layout == "auto"
    counts = {len(r) for _, r in rows}
    if len(first) > 1 and len(counts) == 1 and (len(rows) > 1 or first[0].strip().isdigit()):
        raise UserError(f"{where}: every row has {_columns(len(first))} and there is no header; give one text "
                        "per row, the CharCNN layout (class,title,description), or a header naming the text column")
    return ["text"], False


def headerless_record(cols, row, where, checked=False):
    """(where, record) of a headerless row; in a one-text-per-row file an unquoted comma stays in the text.
    checked: the CharCNN layout was judged from the rows, and a row that does not fit it (or whose class and
    text read as one number with a thousands comma: "100,000 protesters") makes the file ambiguous."""
    if cols == ["text"]:
        return where, {"text": ",".join(row)}
    why = None
    if len(row) != len(cols):
        why = f"{_columns(len(row))}, the first row has {len(cols)}"
    elif checked and not _class_number(row[0]):
        why = f"{row[0].strip()[:40]!r} is not a class number"
    elif checked and re.match(r"\d{3}(\D|$)", row[1]):
        why = f"{','.join(row)[:50]!r} starts with a number written with a comma"
    if why:
        raise UserError(f"{where}: {why}: is this the CharCNN layout (class,title,description) or one text per "
                        "row? Pass --layout text (one text per row) or --layout charcnn, or add a header: text")
    return where, dict(zip(cols, row))


def text_lines(path: Path):
    """A text file's lines, decoded one at a time, so bad bytes are reported with their line number."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a file")
    offset = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: line {n}: bytes that are not UTF-8 (offset {offset + e.start})") from None
            offset += len(raw)
            yield line.removeprefix("\ufeff") if n == 1 else line  # a BOM is tolerated


def csv_records(path: Path, need_labels=True, layout="auto"):
    """(columns, (where, record) pairs) of a CSV, read lazily: the one place a CSV's layout is decided. A header
    names the columns (when layout is auto); else the rows are the CharCNN layout or one text per row."""
    reader = csv.reader(text_lines(path), strict=True)

    def rows():
        try:
            for n, r in enumerate(reader, 1):
                # empty lines skipped, and in training data rows of blanks; in input to predict such a row is a
                # text to check (skipping it would shift every later row's ID)
                if r and (not need_labels or any(c.strip() for c in r)):
                    yield n, r
        except csv.Error as e:
            raise UserError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None

    it = rows()
    first = next(it, None)
    if first is None:
        raise UserError(f"{path}: the file is empty")
    if layout == "auto" and set(READ_COLUMNS) & {c.strip().lower() for c in first[1]}:
        cols = first[1]

        def records():
            for n, r in it:
                if len(r) != len(cols):
                    raise UserError(f"{path}: row {n}: {_columns(len(r))}, the header has {len(cols)}")
                yield f"{path}: row {n}", dict(zip(cols, r))
        return cols, records()
    if need_labels:  # CharCNN layout: "class","title","description", classes 1..K
        def charcnn():
            for n, r in itertools.chain([first], it):
                if len(r) not in (2, 3):
                    raise UserError(f"{path}: row {n}: {_columns(len(r))}, expected class,title,description "
                                    "(CharCNN layout)")
                yield f"{path}: row {n}", dict(zip(CHARCNN, r))
        return CHARCNN, charcnn()
    peeked = [first, *itertools.islice(it, PEEK_ROWS - 1)]
    cols, checked = headerless_columns(peeked, str(path), layout)
    return cols, (headerless_record(cols, r, f"{path}: row {n}", checked) for n, r in itertools.chain(peeked, it))


def _read_csv(path: Path, names, need_labels=True, layout="auto") -> Split:
    columns, records = csv_records(path, need_labels, layout)
    return _rows_to_split(records, columns, names, str(path), need_labels)


def json_records(path, lines):
    """(where, object) for each non-blank line of a JSONL file; a bad line is an error naming it."""
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {i}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise UserError(f"{path}: line {i}: JSON nested too deeply") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}: line {i}: expected a JSON object")
        yield f"{path}: line {i}", obj


def _read_jsonl(path: Path, names, need_labels=True) -> Split:
    recs, columns = [], {}
    # \r and \n only: str.splitlines would also split at U+2028 and others, which JSON strings may hold
    for where, obj in json_records(path, io.StringIO(_decode(path), newline=None)):
        columns.update(dict.fromkeys(obj))
        recs.append((where, obj))
    return _rows_to_split(recs, list(columns), names, str(path), need_labels)


def _frame_to_split(df, names, where, need_labels=True) -> Split:
    recs = ((f"{where}: row {i}", r) for i, r in enumerate(df.to_dict("records")))
    return _rows_to_split(recs, list(df.columns), names, where, need_labels)


PARQUET_FLOOR, PARQUET_PER_FILE_BYTE = 256 << 20, 16  # decoded bytes a parquet file may give: 256 MiB + 16x it
PARQUET_BATCH = 4096  # rows decoded at a time


def _read_parquet(path: Path, names, need_labels=True) -> Split:
    """A parquet file read in batches, its text columns kept dictionary-encoded, and what it decodes to
    counted before it is built: a small file whose one long value repeats a million times (dictionary
    encoding) would otherwise take gigabytes. Past PARQUET_FLOOR + PARQUET_PER_FILE_BYTE x its size: refused."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not path.exists():
        raise UserError(f"{path}: no such file")
    limit = PARQUET_FLOOR + PARQUET_PER_FILE_BYTE * path.stat().st_size
    too_big = (f"{path}: decodes to more than {limit:,} bytes ({PARQUET_FLOOR >> 20} MiB + {PARQUET_PER_FILE_BYTE}x "
               f"the file); lorakd refuses it (split the file, or use CSV)")
    try:
        pf = pq.ParquetFile(path)
        meta = pf.metadata
        pages = sum(meta.row_group(g).column(c).total_uncompressed_size
                    for g in range(meta.num_row_groups) for c in range(meta.num_columns))
        if pages > limit:
            raise UserError(too_big)
        texts = [f.name for f in pf.schema_arrow if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        pf = pq.ParquetFile(path, read_dictionary=texts)
        batches, size = [], 0
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH):
            for col in batch.columns:  # a dictionary column's values as they will be copied, row by row
                size += col.nbytes if not pa.types.is_dictionary(col.type) else 8 * len(col) + (pc.sum(
                    pc.take(pc.binary_length(col.dictionary), col.indices)).as_py() or 0)
            if size > limit:
                raise UserError(too_big)
            batches.append(batch)
        df = pa.Table.from_batches(batches, schema=pf.schema_arrow).to_pandas()
        for c in texts:  # categories back to plain values (references to them: no copies), a missing one None
            df[c] = df[c].astype(object).where(df[c].notna(), None)
    except UserError:
        raise
    except Exception as e:  # pyarrow raises many types for a broken file
        raise UserError(f"{path}: not a readable parquet file ({type(e).__name__})") from None
    return _frame_to_split(df, names, str(path), need_labels)


PICKLE_TYPES = "datasets.Dataset, pandas DataFrame, numpy arrays, dicts, lists, strings and numbers"


def _read_pickle(path: Path, names) -> Split:
    """The course format: a pickled datasets.Dataset, DataFrame, dict of columns or list with a `text` column.
    Read by a restricted unpickler (safepickle): a pickle that asks to run code is refused, not run."""
    import pandas as pd

    from . import safepickle

    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a file")
    try:
        with open(path, "rb") as f:
            obj = safepickle.load(f)
        if isinstance(obj, np.ndarray) and obj.ndim == 1:
            obj = obj.tolist()
        if type(obj) is pd.DataFrame:
            # through the class: the file may have set instance attributes that shadow the methods
            columns, obj = list(obj.columns), pd.DataFrame.to_dict(obj, "records")
        else:
            columns = None
    except safepickle.Refused as e:
        raise UserError(f"{path}: pickle refers to {e.module}.{e.name}, which lorakd does not load "
                        f"(only {PICKLE_TYPES})") from None
    except Exception as e:
        raise UserError(f"{path}: not a readable pickle ({type(e).__name__}: {first_line(e)})") from None
    if type(obj) is dict:
        lists = all(isinstance(v, (list, tuple, np.ndarray)) for v in obj.values())
        if not lists or len({len(v) for v in obj.values()}) > 1:
            raise UserError(f"{path}: a dict pickle must map column names to lists of one length")
        columns = list(obj)  # {'text': []} has its column, and no rows
        obj = [dict(zip(obj, vals)) for vals in zip(*obj.values())] if obj else []
    if type(obj) is list:
        if obj and all(isinstance(x, str) for x in obj):
            obj = [{"text": x} for x in obj]
        if not all(type(x) is dict for x in obj):
            raise UserError(f"{path}: a list pickle must hold strings or records with a 'text' key")
        columns = columns if columns is not None else list(dict.fromkeys(k for x in obj for k in x))
        return _rows_to_split(((f"{path}: row {i}", x) for i, x in enumerate(obj)), columns, names, str(path), False)
    raise UserError(f"{path}: pickle holds a {type(obj).__name__}; expected a Dataset, DataFrame or list with 'text'")


def read_file(path, names, need_labels=True, layout="auto") -> Split:
    """A Split of one file; `layout` is a headerless CSV's (LAYOUTS)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, names, need_labels, layout)
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path, names, need_labels)
    if suffix == ".parquet":
        return _read_parquet(path, names, need_labels)
    if suffix in (".pkl", ".pickle") and not need_labels:
        return _read_pickle(path, names)
    raise UserError(f"{path}: unknown format {suffix or '(no suffix)'}; use .csv, .jsonl or .parquet"
                    + ("" if need_labels else " or .pkl"))


def read_unlabelled(path, names, layout="auto") -> Split:
    split = read_file(path, names, need_labels=False, layout=layout)
    seen = set()
    for i in split.ids:
        if i in seen:
            raise UserError(f"{path}: duplicate ID {i!r}")
        seen.add(i)
    return split


STREAMED = (".csv", ".jsonl", ".json")  # read lazily; pickles and parquet are one object in memory anyway


def _input_records(path: Path, layout):
    """(columns, (where, record) pairs) of unlabelled CSV or JSONL input, read lazily."""
    if path.suffix.lower() == ".csv":
        return csv_records(path, need_labels=False, layout=layout)
    # JSONL rows may differ in keys: the columns are their union, as read_unlabelled takes them
    columns = list(dict.fromkeys(k for _, obj in json_records(path, text_lines(path)) for k in obj))
    if not columns:
        raise UserError(f"{path}: the file is empty")
    return columns, json_records(path, text_lines(path))


def unlabelled_chunks(path, size, layout="auto"):
    """Splits of up to `size` rows of CSV or JSONL input (STREAMED), read lazily, each checked and built
    exactly as read_unlabelled builds the whole file (IDs are row numbers across the file, not the chunk)."""
    path = Path(path)
    columns, records = _input_records(path, layout)
    has_id = _find(columns, "id") is not None
    start = 0
    while batch := list(itertools.islice(records, size)):
        split = _rows_to_split(batch, columns, [], str(path), need_labels=False)
        if not has_id:
            split.ids = [str(start + k) for k in range(len(split))]
        start += len(split)
        yield split


def _load_hub(name, names) -> dict[str, Split]:
    from .backbones import hub_out_of_reach

    if hub_out_of_reach():  # the local datasets cache at once, or one line; not half a minute of retries
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError:
        raise UserError(f"data.path {name}: loading from the hub needs `pip install datasets`") from None
    hub_id = HUB_ALIASES.get(name, name)
    try:
        ds = datasets.load_dataset(hub_id)
    except Exception as e:
        raise UserError(f"data.path {name}: could not load {hub_id} from the hub ({type(e).__name__}: "
                        f"{first_line(e, 200)})") from None
    out = {}
    for split in sorted(ds, key=lambda s: s != "train"):  # train first: its classes, when from the data, are all's
        out[split] = _frame_to_split(ds[split].to_pandas(), names, f"{hub_id}[{split}]")
        names = names if names is not None else out[split].label_names
    return out


_LAST_READ = {}  # the splits with_label_names read, kept for load_splits: a file is read once, not twice


def _stamp(p: Path):
    return tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in ([p] if p.is_file() else sorted(p.iterdir())))


def read_splits(path, names) -> dict[str, Split]:
    """{'train': Split, 'test': Split?} from a folder, one file, or a hub id. names None: the classes come from
    the train split's labels (names_from_labels), on each Split's label_names."""
    p = Path(path) if path else None
    if p is not None and p.exists() and names is not None:
        key = (str(p.resolve()), tuple(names), _stamp(p))
        if key in _LAST_READ:
            return _LAST_READ.pop(key)
    if not path:
        raise UserError("data.path is not set: pass --data FOLDER_OR_FILE or set data.path in the config")
    p = Path(path)
    if str(path).startswith("hub:") or (not p.exists() and str(path) in HUB_ALIASES):
        return _load_hub(str(path).removeprefix("hub:"), names)
    if not p.exists():
        raise UserError(f"{p}: no such file or folder (data.path)")
    if p.is_file():
        return {"train": read_file(p, names)}
    out = {}
    for split in ("train", "test"):
        found = [p / f"{split}{ext}" for ext in FORMATS if (p / f"{split}{ext}").exists()]
        if len(found) > 1:
            raise UserError(f"{p}: {' and '.join(f.name for f in found)}: more than one {split} file; keep one")
        if found:
            out[split] = read_file(found[0], names)
            names = names if names is not None else out[split].label_names  # test takes train's classes
    if "train" not in out:
        raise UserError(f"{p}: no train.csv, train.jsonl or train.parquet in this folder")
    return out


def stratified_split(labels: np.ndarray, fraction: float, seed: int):
    """(train_idx, val_idx): the same fraction of every class, the same indices for the same seed. A class
    of two rows or more gives at least one validation row when fraction > 0 (a small file still validates)."""
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) >= 2:
            n_val = max(n_val, 1)
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def stratified_take(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of n rows with the classes in the proportions they have (largest remainders round)."""
    classes, counts = np.unique(labels, return_counts=True)
    want = counts * n / len(labels)
    take = np.floor(want).astype(int)
    take[np.argsort(-(want - take), kind="stable")[: n - take.sum()]] += 1
    rng = np.random.default_rng([seed, n])
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]))


def with_label_names(cfg, log=print):
    """cfg with data.label_names taken from the data when the config leaves them at their default and the
    train labels are text (positive/negative: sorted), said in one line; else cfg as it is. The run's
    config.yaml then keeps them, and everything after (eval, predict, export) reads them there."""
    from .config import override

    if tuple(cfg.data.label_names) != AG_NEWS_LABELS:  # given: a fixed order
        return cfg
    splits = read_splits(cfg.data.path, None)
    names = splits["train"].label_names
    p = Path(cfg.data.path)
    if p.exists():
        _LAST_READ.clear()
        _LAST_READ[(str(p.resolve()), names, _stamp(p))] = splits
    if names == AG_NEWS_LABELS:
        return cfg
    log(f"labels from the data: {', '.join(names)} (set data.label_names for another order)")
    return override(cfg, **{"data.label_names": list(names)})


def load_splits(data_cfg, seed) -> dict[str, Split]:
    """train / validation (carved from train) / test (when present), as the config asks. With data.labelled
    N, train keeps N stratified rows and the others come back as 'unlabelled' (their labels unused).
    `seed` (the run's train.seed) draws them unless data.split_seed fixes the split apart from it."""
    seed = data_cfg.split_seed if data_cfg.split_seed >= 0 else seed
    splits = read_splits(data_cfg.path, data_cfg.label_names)
    train = splits["train"]
    missing = [n for i, n in enumerate(data_cfg.label_names) if not (train.labels == i).any()]
    if missing:  # a head for a class it never sees, and a row of zeros in every table
        raise UserError(f"{data_cfg.path}: no train row of class {', '.join(map(repr, missing))} of data.label_names "
                        f"({len(data_cfg.label_names)} names); name only the classes the data has")
    if "validation" in splits:
        val = splits["validation"]
    else:
        tr, va = stratified_split(train.labels, data_cfg.val_fraction, seed)
        train, val = train.subset(tr), train.subset(va)
        if not len(train):
            raise UserError(f"{data_cfg.path}: no training rows left after carving data.val_fraction="
                            f"{data_cfg.val_fraction} for validation")
    out = {}
    if data_cfg.labelled:
        if data_cfg.labelled >= len(train):
            raise UserError(f"data.labelled={data_cfg.labelled}: the train split has only {len(train)} rows "
                            f"after validation is carved (use 0 for all)")
        keep = stratified_take(train.labels, data_cfg.labelled, seed)
        rest = np.setdiff1d(np.arange(len(train)), keep)
        train, out["unlabelled"] = train.subset(keep), train.subset(rest)
    if data_cfg.max_train_samples:
        train = train.subset(np.arange(min(data_cfg.max_train_samples, len(train))))
    if data_cfg.repeat > 1:
        train = train.subset(np.tile(np.arange(len(train)), data_cfg.repeat))
    out.update(train=train, validation=val)
    if "test" in splits:
        out["test"] = splits["test"]
    return out


def augment(texts: list[str], copies: int, ops, seed: int, mask_token: str = "[MASK]") -> list[str]:
    """`copies` augmented versions of each text, a pure function of (texts, copies, ops, seed), on words:
    delete: drop 15% of the words; swap: with p 0.5 swap two spans of up to a quarter of the words each;
    mask: replace 15% of the words with the tokenizer's mask token; mix: with p 0.5 the second half
    becomes another random text's second half (a blend whose soft label only a teacher can give).
    The teachers label these rows, so an edit that changes the topic is no harm: the target follows it."""
    out = []
    n = len(texts)
    for k in range(copies):
        rng = np.random.default_rng([seed, k, 7])
        for i, text in enumerate(texts):
            words = text.split()
            if "delete" in ops and len(words) > 3:
                kept = [w for w in words if rng.random() >= 0.15]
                words = kept or words
            if "swap" in ops and len(words) >= 4 and rng.random() < 0.5:
                span = int(rng.integers(1, max(2, len(words) // 4)))
                a, b = sorted(rng.choice(len(words) - span + 1, 2, replace=False))
                if b - a >= span:  # two spans that do not overlap
                    words = words[:a] + words[b:b + span] + words[a + span:b] + words[a:a + span] + words[b + span:]
            if "mask" in ops:
                words = [mask_token if rng.random() < 0.15 else w for w in words]
            if "mix" in ops and n > 1 and rng.random() < 0.5:
                other = texts[int(rng.integers(n))].split()
                words = words[: max(1, len(words) // 2)] + other[len(other) // 2:]
            out.append(" ".join(words))
    return out


def fingerprint(split: Split, extra="") -> str:
    """A short hash of the texts and labels (and anything else that shapes a cache)."""
    h = hashlib.sha256(extra.encode())
    for t in split.texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    if split.labels is not None:
        h.update(split.labels.tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- tokens and batches

def encode(tokenizer, texts, max_length, chunk=4096) -> list[np.ndarray]:
    """Token ids per text, unpadded: tokenised once, then batches only index and pad.

    A text is cut to 64 characters per token first: the tokenizer would read a 10 MB row whole
    (seconds) only to truncate it; real text never spends 64 characters on one token."""
    out = []
    for i in range(0, len(texts), chunk):
        cut = [t[: max_length * 64] for t in texts[i: i + chunk]]
        if hasattr(tokenizer, "encode_batch"):  # a bare `tokenizers` Tokenizer (predict.onnx_tokenizer)
            tokenizer.enable_truncation(max_length)
            ids = [e.ids for e in tokenizer.encode_batch(cut)]
        else:  # ids only: masks come from lengths (TokenStore.batch)
            ids = tokenizer(cut, truncation=True, max_length=max_length, return_attention_mask=False,
                            return_token_type_ids=False)["input_ids"]
        out.extend(np.asarray(i, dtype=np.int32) for i in ids)
    return out


def batch_order(lengths, batch_size, seed, epoch, group_by_length=True, shuffle=True) -> list[np.ndarray]:
    """The batches of one epoch, a pure function of (seed, epoch): resume replays the same order.

    Grouping sorts each window of 50 batches by length, so a batch pads little and the
    padded lengths take few distinct values (one CUDA graph each)."""
    n = len(lengths)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    if group_by_length:
        window = batch_size * 50
        lengths = np.asarray(lengths)
        order = np.concatenate([w[np.argsort(-lengths[w], kind="stable")]
                                for w in np.array_split(order, max(1, -(-n // window)))])
    batches = [order[i: i + batch_size] for i in range(0, n, batch_size)]
    if group_by_length and shuffle:
        perm = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
        batches = [batches[i] for i in perm]
    return batches


def pad_multiple(setting: int, max_length: int, device_type: str, batch_size: int) -> int:
    """data.pad_multiple, 0 = auto. Small batches on a GPU: every batch shape is a CUDA graph to capture, and
    capture costs more than the extra padding (32: 4 shapes at 128 tokens, against 8 at 16). Large batches
    (over 64) and a CPU: padding is compute, so 16."""
    if setting:
        return setting
    wide = device_type == "cuda" and batch_size <= 64
    return next(m for m in (32, 16, 8, 4, 2, 1) if max_length % m == 0 and (m < 32 or wide))


def pad_rows(encoded, pad_id, multiple=1, max_length=None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 [rows, width] of token-id rows, padded to the longest (rounded up to
    a multiple of `multiple`, never past max_length)."""
    longest = max(len(e) for e in encoded)
    width = max(pad_length(longest, multiple, max_length), longest)
    ids = np.full((len(encoded), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(encoded), width), dtype=np.int64)
    for row, e in enumerate(encoded):
        ids[row, : len(e)] = e
        mask[row, : len(e)] = 1
    return ids, mask


def pad_length(n, multiple=16, max_length=None):
    m = -(-n // multiple) * multiple
    return min(m, max_length) if max_length else m


class TokenStore:
    """One split's token ids padded once into a [N, L] tensor on the device.

    A batch is then an index tensor: ids and mask are gathered where the model runs, so a training
    step moves only B integers from the host (and a CUDA graph takes that index as its one input)."""

    def __init__(self, encoded, labels, pad_id, device, multiple=16):
        import torch

        self.lengths_np = np.asarray([len(e) for e in encoded], dtype=np.int64)
        self.width_max = pad_length(int(self.lengths_np.max()), multiple)
        ids = np.full((len(encoded), self.width_max), pad_id, dtype=np.int64)
        for row, e in enumerate(encoded):
            ids[row, : len(e)] = e
        self.multiple = multiple
        self.ids = torch.from_numpy(ids).to(device)
        self.lengths = torch.from_numpy(self.lengths_np).to(device)
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long).to(device)

    def __len__(self):
        return len(self.lengths_np)

    def width(self, idx) -> int:
        """Padded length for a batch: a multiple of `multiple` (data.pad_multiple), so few distinct shapes occur."""
        return min(pad_length(int(self.lengths_np[idx].max()), self.multiple), self.width_max)

    def batch(self, idx_t, width):
        import torch

        ids = self.ids[idx_t, :width]
        mask = (torch.arange(width, device=ids.device)[None, :] < self.lengths[idx_t, None]).long()
        return ids, mask
