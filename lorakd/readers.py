"""Readers: labelled and unlabelled rows from CSV (CharCNN or headed), JSONL, parquet and pickles, checked row by
row; the one reader for training data (data.read_splits) and for prediction input (predict)."""
from __future__ import annotations

import csv
import io
import itertools
import json
import re
from pathlib import Path

import numpy as np

from .errors import UserError, first_line
from .rows import READ_COLUMNS, Split, decode, find_column, n_columns, rows_to_split

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
            raise UserError(f"{where}: row {rows[0][0]}: {n_columns(len(first))}; the CharCNN layout has "
                            "class,title,description or class,text")
        return CHARCNN[: len(first)], layout == "auto"
    counts = {len(r) for _, r in rows}
    if len(first) > 1 and len(counts) == 1 and (len(rows) > 1 or first[0].strip().isdigit()):
        raise UserError(f"{where}: every row has {n_columns(len(first))} and there is no header; give one text "
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
        why = f"{n_columns(len(row))}, the first row has {len(cols)}"
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
                    raise UserError(f"{path}: row {n}: {n_columns(len(r))}, the header has {len(cols)}")
                yield f"{path}: row {n}", dict(zip(cols, r))
        return cols, records()
    if need_labels:  # CharCNN layout: "class","title","description", classes 1..K
        def charcnn():
            for n, r in itertools.chain([first], it):
                if len(r) not in (2, 3):
                    raise UserError(f"{path}: row {n}: {n_columns(len(r))}, expected class,title,description "
                                    "(CharCNN layout)")
                yield f"{path}: row {n}", dict(zip(CHARCNN, r))
        return CHARCNN, charcnn()
    peeked = [first, *itertools.islice(it, PEEK_ROWS - 1)]
    cols, checked = headerless_columns(peeked, str(path), layout)
    return cols, (headerless_record(cols, r, f"{path}: row {n}", checked) for n, r in itertools.chain(peeked, it))


def _read_csv(path: Path, names, need_labels=True, layout="auto") -> Split:
    columns, records = csv_records(path, need_labels, layout)
    return rows_to_split(records, columns, names, str(path), need_labels)


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
    for where, obj in json_records(path, io.StringIO(decode(path), newline=None)):
        columns.update(dict.fromkeys(obj))
        recs.append((where, obj))
    return rows_to_split(recs, list(columns), names, str(path), need_labels)


def frame_to_split(df, names, where, need_labels=True) -> Split:
    recs = ((f"{where}: row {i}", r) for i, r in enumerate(df.to_dict("records")))
    return rows_to_split(recs, list(df.columns), names, where, need_labels)


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
    return frame_to_split(df, names, str(path), need_labels)


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
        return rows_to_split(((f"{path}: row {i}", x) for i, x in enumerate(obj)), columns, names, str(path), False)
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
    has_id = find_column(columns, "id") is not None
    start = 0
    while batch := list(itertools.islice(records, size)):
        split = rows_to_split(batch, columns, [], str(path), need_labels=False)
        if not has_id:
            split.ids = [str(start + k) for k in range(len(split))]
        start += len(split)
        yield split
