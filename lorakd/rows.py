"""Rows: the labelled or unlabelled rows of any input as a Split, each row checked (text, label, id) and named in
its error; the file formats' readers (readers.py) hand their rows here."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import AG_NEWS_LABELS
from .errors import UserError

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

def decode(path: Path) -> str:
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
    if isinstance(value, str) and not value.strip():
        raise UserError(f"{where}: label {value!r} is empty; give every row its class")
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


def n_columns(n: int) -> str:
    return f"{n} column" + ("s" if n != 1 else "")


def row_text(title, description, where):
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


def find_column(columns, *names):
    lowered = {str(c).strip().lower(): c for c in columns}
    for n in names:
        if n in lowered:
            return lowered[n]
    return None


def _names(columns):
    """Column names for a one-line message: a name holding a line break is quoted."""
    return ", ".join(s if s.isprintable() else repr(s) for s in map(str, columns)) or "none"


READ_COLUMNS = ("text", "sentence", "content", "title", "description", "label", "labels", "class", "id")


def rows_to_split(rows, columns, names, where, need_labels=True):
    """Records with named columns (header CSV, JSONL, parquet, pickles) to a Split."""
    seen = set()
    for c in columns:  # a CSV row keeps the last of two same-named fields: which one was meant?
        key = str(c).strip().lower()
        if key in READ_COLUMNS and key in seen:
            raise UserError(f"{where}: the column {str(c).strip()!r} is named twice in the header; keep one")
        seen.add(key)
    text_col = find_column(columns, "text", "sentence", "content")
    title_col, desc_col = find_column(columns, "title"), find_column(columns, "description")
    label_col = find_column(columns, "label", "labels", "class")
    id_col = find_column(columns, "id")
    if text_col is None and title_col is None:
        raise UserError(f"{where}: no text column (expected 'text', or 'title' and 'description'; "
                        f"found {_names(columns)})")
    if need_labels and label_col is None:
        raise UserError(f"{where}: no label column (expected 'label'; found {_names(columns)})")
    one_based = label_col is not None and str(label_col).strip().lower() == "class"
    texts, labels, ids = [], [], []
    for n, (row_where, row) in enumerate(rows):
        if text_col is not None:
            texts.append(row_text(row.get(text_col), None, row_where))
        else:
            texts.append(row_text(row.get(title_col), row.get(desc_col), row_where))
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
    negative -> negative, positive). Class numbers keep the default; labels that are all AG News names keep
    its order (World, Sports: only those two)."""
    text = {str(v).strip().lower() for v in values if v is not None and not _is_number(v)}
    text.discard("")
    if not text:
        return AG_NEWS_LABELS
    if text <= {n.lower() for n in AG_NEWS_LABELS}:
        return tuple(n for n in AG_NEWS_LABELS if n.lower() in text)
    return tuple(sorted({str(v).strip() for v in values if v is not None and str(v).strip()}))
