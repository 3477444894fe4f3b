"""Where training records come from: local files and directories, read through ``datasets``.

* ``.txt`` (any other extension too): documents are paragraphs separated by blank lines;
* ``.jsonl`` / ``.json``, ``.parquet``, ``.arrow`` (``datasets``' own files), ``.csv``: one
  record per line / row;
* a directory written by ``datasets``' ``save_to_disk`` (its ``train`` split when it holds
  several).

Nothing is downloaded: a Hugging Face Hub id gets the command to download it yourself. The
columns a source needs (its text field, its template's fields, its chat layout) are checked
against the file's schema (columnar formats) or its first record (JSONL) before training,
naming the file, the column and its type.
"""

from __future__ import annotations

import json
import logging
import os
import re
import string
from pathlib import Path
from typing import Any

from lmexpand.errors import ConfigError
from lmexpand.train.chat import STYLE_FIELDS, detect_style
from lmexpand.train.config import DataSource

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FORMATS_TEXT = ".txt, .jsonl, .parquet, .arrow, .csv, or a datasets.save_to_disk directory"


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def cache_dir() -> str:
    return str(Path(os.environ.get("LMEXPAND_CACHE") or Path.home() / ".cache" / "lmexpand") / "datasets")


def check_exists(src: DataSource) -> None:
    """The source is a readable local file or save_to_disk directory (a Hub id: download it first)."""
    path = src.path
    if not path.exists():
        text = str(path)
        if _HUB_ID.match(text):
            raise ConfigError(
                f"data: {text}: no such file or directory. If it is a Hugging Face Hub dataset id: lmexpand never "
                f"downloads, so fetch it yourself, e.g. `hf download {text} --repo-type dataset --local-dir "
                f"data/{text.split('/')[-1]}`, or in Python `datasets.load_dataset('{text}', split='train')"
                f".save_to_disk('data/{text.split('/')[-1]}')`, then pass the file or directory "
                f"({_FORMATS_TEXT}).")
        raise ConfigError(f"data: {path}: no such file or directory. Give a {_FORMATS_TEXT}.")
    if path.is_dir():
        if src.kind != "disk":
            raise ConfigError(f"data: {path}: a directory, but format {src.format} reads a file. Give the file, or "
                              "format: disk for a datasets.save_to_disk directory.")
        if not any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            raise ConfigError(f"data: {path}: a directory that datasets' save_to_disk did not write (no state.json "
                              "or dataset_dict.json). Give the data file(s) in it instead, e.g. "
                              f"--data {path}/data/train-00000-of-00001.parquet.")
        return
    if src.kind == "disk":
        raise ConfigError(f"data: {path}: format disk reads a datasets.save_to_disk directory; this is a file.")
    if path.stat().st_size == 0:
        raise ConfigError(f"data: {path}: the file is empty; there is nothing to train on.")


def _load_disk(src: DataSource):
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(src.path))
    except Exception as e:  # damaged or foreign directory
        raise ConfigError(f"data: {src.path}: datasets cannot read this save_to_disk directory "
                          f"({type(e).__name__}: {str(e).strip()[:200]}). Write it again with save_to_disk.") from None
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise ConfigError(f"data: {src.path}: holds the splits {', '.join(ds)} and none is 'train'. Give one "
                              f"split's directory, e.g. --data {src.path}/{next(iter(ds))}.")
        ds = ds["train"]
    return ds


def open_records(src: DataSource, streaming: bool):
    """The source as a ``datasets`` Dataset (or IterableDataset when streaming) of records;
    plain text gives one ``text`` record per paragraph.

    ``datasets``' file readers log a parse failure ("Failed to load JSON from file ...") on
    stderr before they raise; lmexpand names the bad line itself (``jsonl_problem``) in the one
    error paragraph, so those readers' log is kept for critical records only."""
    from datasets import load_dataset

    logging.getLogger("datasets.packaged_modules").setLevel(logging.CRITICAL)

    kind = src.kind
    if kind == "disk":
        ds = _load_disk(src)
        return ds.to_iterable_dataset() if streaming else ds
    if kind == "text":
        return load_dataset("text", data_files=str(src.path), sample_by="paragraph", split="train",
                            streaming=streaming, cache_dir=cache_dir())
    builder = {"jsonl": "json", "parquet": "parquet", "arrow": "arrow", "csv": "csv"}[kind]
    return load_dataset(builder, data_files=str(src.path), split="train", streaming=streaming, cache_dir=cache_dir())


# -- what a source needs of its records ------------------------------------------------------

def schema(src: DataSource) -> dict[str, Any] | None:
    """Column name -> datasets feature, read from the file's header (columnar formats), or
    None (JSONL and text are checked record by record)."""
    kind = src.kind
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq
            from datasets import Features

            return dict(Features.from_arrow_schema(pq.read_schema(str(src.path))))
        if kind == "arrow":
            import pyarrow as pa
            from datasets import Features

            with open(src.path, "rb") as f:
                try:
                    arrow_schema = pa.ipc.open_stream(f).schema
                except pa.ArrowInvalid:
                    f.seek(0)
                    arrow_schema = pa.ipc.open_file(f).schema
            return dict(Features.from_arrow_schema(arrow_schema))
        if kind == "disk":
            return dict(_load_disk(src).features)
        if kind == "csv":
            import csv

            with open(src.path, encoding="utf-8", errors="replace", newline="") as f:
                header = next(csv.reader(f), [])
            return {c: None for c in header}  # CSV values are scalars; pandas infers their types
    except ConfigError:
        raise
    except Exception as e:  # pyarrow: not a parquet/arrow file
        raise ConfigError(f"data: {src.path}: not a readable {kind} file ({type(e).__name__}: "
                          f"{str(e).strip()[:200]}). Check the file, or give format: to say what it is.") from None
    return None


def chat_style(src: DataSource, columns: list[str], where: str) -> str:
    """The source's chat layout (``auto`` resolved from the fields present)."""
    style = src.chat
    if style == "auto":
        style = detect_style(columns)
        if style is None:
            raise ConfigError(f"{where}: --chat auto found no chat fields (fields present: {', '.join(columns)}). "
                              "Chat records have messages (role/content), conversations (from/value) or "
                              "instruction/output (alpaca); give --chat STYLE, or --text-field/--template for plain "
                              "text.")
    return style


def _type_name(feature: Any) -> str:
    """A column's type in words: int64, list of string, struct {role, content}."""
    dtype = getattr(feature, "dtype", None)
    if isinstance(dtype, str) and dtype != "list":
        return dtype
    if isinstance(feature, dict):
        return "struct {" + ", ".join(feature) + "}"
    inner = feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", None)
    if isinstance(feature, list) or inner is not None:
        return f"list of {_type_name(inner)}" if inner is not None else "list"
    return type(feature).__name__


def _is_text(feature: Any) -> bool:
    return feature is None or getattr(feature, "dtype", None) in ("string", "large_string")


def _is_scalar(feature: Any) -> bool:
    from datasets import Value

    return feature is None or isinstance(feature, Value)


def _turn_fields(feature: Any) -> dict | None:
    """The fields of a list-of-struct column (turns), or None when it is not one."""
    from datasets import LargeList, List

    inner = feature[0] if isinstance(feature, list) and feature else \
        getattr(feature, "feature", None) if isinstance(feature, (List, LargeList)) else None
    return inner if isinstance(inner, dict) else None


def check_columns(src: DataSource, columns: dict[str, Any]) -> None:
    """The columns the source needs exist and hold what it reads from them."""
    where = f"data: {src.path}"
    names = list(columns)
    present = ", ".join(f"{c} ({_type_name(t)})" if t is not None else c for c, t in columns.items())
    if src.chat:
        style = chat_style(src, names, where)
        for col in STYLE_FIELDS[style]:
            if col not in columns:
                raise ConfigError(f"{where}: --chat {style} reads the field {col!r}, which the records do not have "
                                  f"(fields: {present}). Give the --chat style that matches the data.")
        if style == "alpaca":
            for col in ("instruction", "input", "output", "system"):
                if col in columns and not _is_text(columns[col]):
                    raise ConfigError(f"{where}: the column {col!r} holds {_type_name(columns[col])}, not text; "
                                      "alpaca records need text in instruction, input and output. Convert that "
                                      "column to strings.")
        else:
            col = STYLE_FIELDS[style][0]
            if columns[col] is not None:
                turn = _turn_fields(columns[col])
                role_key, text_key = ("role", "content") if style == "messages" else ("from", "value")
                if turn is None or role_key not in turn or text_key not in turn or not _is_text(turn[text_key]):
                    raise ConfigError(f"{where}: the column {col!r} holds {_type_name(columns[col])}, not a list of "
                                      f"{{{role_key}, {text_key}}} turns with text content. Convert it to that "
                                      f"layout, or choose another --chat style.")
        return
    if src.template:
        for f in template_fields(src.template):
            if f not in columns:
                raise ConfigError(f"{where}: records have no field {f!r} (needed by template {src.template!r}). "
                                  f"Fields present: {present}. Use --text-field NAME or --template, or fix the data.")
            if not _is_scalar(columns[f]):
                raise ConfigError(f"{where}: the column {f!r} holds {_type_name(columns[f])}, not a scalar; the "
                                  f"template {src.template!r} would print its Python form. Template only text or "
                                  "number columns, or flatten that one.")
        return
    if src.field not in columns:
        raise ConfigError(f"{where}: records have no field {src.field!r} (needed by --text-field). Fields present: "
                          f"{present}. Use --text-field NAME or --template, or --chat for conversations.")
    if not _is_text(columns[src.field]):
        raise ConfigError(f"{where}: the column {src.field!r} holds {_type_name(columns[src.field])}, not text. "
                          "Give --text-field a text column, or --template '{" + src.field + "}' to format it.")


def jsonl_problem(src: DataSource, *, first_only: bool) -> ConfigError | None:
    """The first bad record of a JSONL source (not JSON, not an object, or without a field
    the source needs), looking at the first record only or at every line."""
    seen = False
    with open(src.path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            seen = True
            try:
                record = json.loads(line)
            except ValueError as e:
                return ConfigError(f"data: {src.path}:{line_no}: not valid JSON ({e}). Fix or remove that line.")
            if not isinstance(record, dict):
                return ConfigError(f"data: {src.path}:{line_no}: each line must be a JSON object.")
            try:
                if src.chat:  # the layout's fields; the turns themselves are checked when read
                    style = chat_style(src, list(record), f"data: {src.path}:{line_no}")
                    missing = [k for k in STYLE_FIELDS[style] if k not in record]
                    if missing:
                        return ConfigError(f"data: {src.path}:{line_no}: --chat {style} needs the field {missing[0]!r}; "
                                           f"fields present: {', '.join(record) or 'none'}. Fix that record or give "
                                           "the --chat style of the data.")
                else:
                    check_columns(src, {k: None if isinstance(v, (str, int, float, bool)) or v is None else
                                        _json_feature(v) for k, v in record.items()})
            except ConfigError as e:
                return ConfigError(str(e).replace(f"data: {src.path}:", f"data: {src.path}:{line_no}:", 1))
            if first_only:
                return None
    return None if seen else ConfigError(f"data: {src.path}: no JSON records; there is nothing to train on.")


def _json_feature(value: Any) -> Any:
    """A stand-in feature for a JSON value that is not a scalar (lists and objects)."""
    return [value[0]] if isinstance(value, list) and value else (value if isinstance(value, dict) else [])
