"""Finding and checking data files, for every data module (``llmzoo.data.TextDataModule``
and the plugins' ones): a file, folder or glob resolved to files of one format, and every
record checked before anything is tokenized (one message naming file and line)."""

from __future__ import annotations

import glob as globlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError

log = logging.getLogger(__name__)


FORMATS = {"text": (".txt", ".text", ".md"), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",),
           "arrow": (".arrow",)}
SAVED = "hf_disk"  # a folder written by datasets' save_to_disk


def plugin_formats() -> dict:
    """{name: (extensions, reader)} of the formats plugins add (``llmzoo_data_formats``)."""
    from ..plugins import get_plugin_manager

    return {k: v for found in get_plugin_manager().hook.llmzoo_data_formats() for k, v in found.items()}


def all_formats() -> dict[str, tuple[str, ...]]:
    return {**FORMATS, **{k: tuple(v[0]) for k, v in plugin_formats().items()}}


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    p = Path(path)
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


# ----------------------------------------------------------------------------- finding files
def resolve_files(path: str | os.PathLike, fmt: str | None) -> tuple[list[str], str]:
    """A file, a folder (searched recursively) or a glob -> (sorted files, format)."""
    p = str(path)
    if any(c in p for c in "*?["):
        files = sorted(f for f in globlib.glob(p, recursive=True) if os.path.isfile(f))
    elif os.path.isdir(p):
        files = sorted(str(f) for f in Path(p).rglob("*") if f.is_file() and not f.name.startswith("."))
    elif os.path.isfile(p):
        files = [p]
    else:
        raise DataError(f"data.path={p!r}: no such file or folder")
    formats = all_formats()
    if fmt in (None, "auto"):
        found = {name for f in files for name, exts in formats.items() if f.endswith(exts)}
        if len(found) != 1:
            raise DataError(f"data.path={p!r}: cannot tell the format from the file names (found {sorted(found) or 'none'}); "
                            f"set data.format to one of {list(formats)}")
        fmt = found.pop()
    if fmt not in formats:
        raise DataError(f"data.format={fmt!r} is not one of {[*formats, SAVED]}")
    if os.path.isdir(p):  # a folder may hold other files: keep the ones of this format
        files = [f for f in files if f.endswith(formats[fmt])]
    if not files:
        raise DataError(f"data.path={p!r}: no {fmt} files found")
    return files, fmt


# ----------------------------------------------------------------------------- checking records
@dataclass
class ScanReport:
    records: int = 0
    bad: list[str] = field(default_factory=list)  # "file:line: reason"


def _scan_lines(file: str, fmt: str, text_field: str, report: ScanReport, keep: list[str] | None) -> None:
    with open(file, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark may open the file
            except UnicodeDecodeError as e:
                report.bad.append(f"{file}:{n}: bytes are not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if "\x00" in line:
                report.bad.append(f"{file}:{n}: contains a NUL character (a binary file?)")
                continue
            if fmt == "jsonl":
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    report.bad.append(f"{file}:{n}: not valid JSON ({e.msg})")
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                    report.bad.append(f"{file}:{n}: record has no string field {text_field!r} (set data.text_field)")
                    continue
                if "\x00" in rec[text_field]:
                    report.bad.append(f"{file}:{n}: field {text_field!r} contains a NUL character")
                    continue
            report.records += 1
            if keep is not None:
                keep.append(line)


def check_files(files: list[str], fmt: str, text_field: str, skip_bad: bool, clean_dir: Path) -> list[str]:
    """Validate every record; return the files to load (cleaned copies if records were skipped)."""
    for f in files:
        if os.path.getsize(f) == 0:
            raise DataError(f"{f}: file is empty")
    if fmt == "arrow":  # binary tables: their column is checked once loaded (text_column)
        return files
    if fmt == "parquet":
        import pyarrow.parquet as pq

        import pyarrow as pa

        out = []
        for i, f in enumerate(files):
            try:
                table = pq.read_table(f, columns=None)
            except Exception as e:  # noqa: BLE001 - not parquet, truncated
                raise DataError(f"{f}: not a readable parquet file ({type(e).__name__}: {e})") from None
            if text_field not in table.column_names:
                raise DataError(f"{f}: no column {text_field!r} (columns: {table.column_names}); set data.text_field")
            col = table.column(text_field)
            if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
                raise DataError(f"{f}: column {text_field!r} holds {col.type}, not text; set data.text_field to a "
                                "string column")
            nulls = col.null_count
            if nulls and not skip_bad:
                first = col.to_pylist().index(None)
                raise DataError(f"{f}: row {first}: {text_field!r} is null ({nulls} of {len(col)} rows are); fix "
                                "them, or set data.skip_bad_records=true to drop them")
            if nulls:
                log.warning("skipped %d of %d rows of %s: %r is null", nulls, len(col), f, text_field)
                clean_dir.mkdir(parents=True, exist_ok=True)
                f = str(clean_dir / f"{i:04d}_{Path(f).name}")
                pq.write_table(table.filter(pa.compute.is_valid(col)).select([text_field]), f)
            out.append(f)
        return out
    out = []
    for i, f in enumerate(files):
        report = ScanReport()
        keep: list[str] | None = [] if skip_bad else None
        _scan_lines(f, fmt, text_field, report, keep)
        if report.bad and not skip_bad:
            more = f" (and {len(report.bad) - 5} more)" if len(report.bad) > 5 else ""
            raise DataError("bad input records:\n  " + "\n  ".join(report.bad[:5]) + more
                            + "\nfix them, or set data.skip_bad_records=true to drop them")
        if report.bad:
            log.warning("skipped %d bad records in %s: %s", len(report.bad), f, "; ".join(report.bad[:10]))
            clean_dir.mkdir(parents=True, exist_ok=True)
            clean = clean_dir / f"{i:04d}_{Path(f).name}"
            clean.write_text("".join(keep or []), encoding="utf-8")
            f = str(clean)
        if report.records == 0:
            raise DataError(f"{f}: no usable records")
        out.append(f)
    return out


# ----------------------------------------------------------------------------- Arrow tables
def load_saved_dataset(path: str, text_field: str, skip_bad: bool, cache_dir: str | None) -> Any:
    """A ``save_to_disk`` folder (Arrow files and JSON metadata: nothing is executed);
    of a DatasetDict, its "train" split (or its only one). Its Arrow files are read
    like data.format=arrow, so datasets' caches go to its cache folder, never into the
    user's folder. Returns ``text_column``'s dataset."""
    import datasets

    folder = Path(path)
    if not is_saved_dataset(folder):
        raise DataError(f"data.path={path!r}: not a folder written by datasets' save_to_disk (no state.json "
                        "or dataset_dict.json)")
    try:
        if (folder / "dataset_dict.json").is_file():
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
            if "train" not in splits and len(splits) != 1:
                raise DataError(f"data.path={path!r}: a DatasetDict with splits {splits} and no 'train' split")
            folder = folder / ("train" if "train" in splits else splits[0])
        names = [f["filename"] for f in json.loads((folder / "state.json").read_text())["_data_files"]]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise DataError(f"data.path={path!r}: broken save_to_disk metadata ({type(e).__name__}: {e})") from None
    if any(Path(n).name != n for n in names):
        raise DataError(f"{folder / 'state.json'}: refused: data file names must be plain file names")
    ds = datasets.load_dataset("arrow", data_files=[str(folder / n) for n in names], split="train",
                               cache_dir=cache_dir)
    return text_column(ds, text_field, path, skip_bad, path)


def text_column(ds: Any, text_field: str, where: Any, skip_bad: bool, path: str) -> Any:
    """Only ``text_field`` of the dataset ``ds`` (renamed "text"), checked to be text; null
    or empty rows dropped (null ones only with ``skip_bad``)."""
    feature = ds.features.get(text_field)
    if feature is None:
        raise DataError(f"{where}: no column {text_field!r} (columns: {ds.column_names}); set data.text_field")
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"{where}: column {text_field!r} holds {feature}, not text; set data.text_field")
    ds = ds.select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    nulls = [i for i, t in enumerate(ds["text"]) if t is None]
    if nulls and not skip_bad:
        raise DataError(f"{where}: row {nulls[0]}: {text_field!r} is null ({len(nulls)} rows are); fix them, "
                        "or set data.skip_bad_records=true to drop them")
    ds = ds.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True, desc="dropping empty records")
    if len(ds) == 0:
        raise DataError(f"data.path={path!r}: every record is empty")
    return ds
