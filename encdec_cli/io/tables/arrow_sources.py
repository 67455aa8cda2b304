"""Arrow IPC input: a ``.arrow`` file (stream or file format) and a folder written by Hugging Face
``datasets``' ``save_to_disk`` (``data-*.arrow`` Arrow stream files, ``state.json`` naming them in
order, ``dataset_info.json``), read without ``datasets`` installed. Files are memory-mapped and read a
record batch at a time, so memory stays bounded; rows are numbered across the folder's files in
order. A file that stops being readable part-way gives one error row and the next file goes on."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa

from encdec_cli.io.tables.base import Row, TableError
from encdec_cli.io.tables.sources import TableSource, arrow_batch_rows, check_column

DATASET_FILES = ("state.json", "dataset_info.json")  # a save_to_disk folder has them beside its data


def is_dataset_dir(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk`` (one dataset, or a
    DatasetDict of splits)."""
    return path.is_dir() and any((path / f).is_file() for f in (*DATASET_FILES, "dataset_dict.json"))


def dataset_files(path: Path) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` folder, in row order (``state.json``'s ``_data_files``,
    else ``data-*.arrow`` sorted); raises :class:`TableError` for a DatasetDict or a folder without
    data."""
    splits = path / "dataset_dict.json"
    if splits.is_file():
        try:
            names = json.loads(splits.read_text("utf-8")).get("splits", [])
        except (ValueError, OSError, AttributeError):
            names = []
        example = path / (names[0] if names else "train")
        raise TableError(
            f"{path} holds a DatasetDict (splits: {', '.join(names) or 'unknown'}); pass one split's "
            f"folder, e.g. {example}"
        )
    state = path / "state.json"
    files: list[Path] = []
    if state.is_file():
        try:
            files = [path / f["filename"] for f in json.loads(state.read_text("utf-8"))["_data_files"]]
        except (ValueError, OSError, KeyError, TypeError) as exc:
            raise TableError(f"cannot read {state} ({exc}); is the dataset folder complete?") from exc
    else:
        files = sorted(path.glob("data-*.arrow"))
    if not files:
        raise TableError(f"{path} has no data files (data-*.arrow); was it written by save_to_disk?")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise TableError(f"{path}: data file {missing[0].name} is missing; is the dataset folder complete?")
    return files


def open_ipc(path: Path) -> pa.ipc.RecordBatchStreamReader | pa.ipc.RecordBatchFileReader:
    """A reader of an Arrow IPC file, memory-mapped: stream format (what ``datasets`` writes), else
    file format."""
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        try:
            return pa.ipc.open_file(source)
        except pa.ArrowException:
            source.close()
            raise


def _record_batches(reader: pa.ipc.RecordBatchStreamReader | pa.ipc.RecordBatchFileReader):
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        return (reader.get_batch(i) for i in range(reader.num_record_batches))
    return reader


def open_arrow(
    path: Path, column: str, batch_rows: int, raw: bool = False, select: Sequence[str] | None = None
) -> TableSource:
    """An Arrow IPC file, or a ``save_to_disk`` folder of them (see the module's docstring)."""
    files = dataset_files(path) if path.is_dir() else [path]
    try:
        with open_ipc(files[0]) as reader:
            schema = reader.schema
    except (pa.ArrowException, OSError) as exc:
        raise TableError(
            f"cannot read {files[0]} as Arrow ({exc}); is the file complete and not corrupt?"
        ) from exc
    schema, read = check_column(schema, column, str(path), raw, select)

    def batches() -> Iterator[list[Row]]:
        next_id = 0
        for file in files:
            try:
                with open_ipc(file) as reader:
                    if reader.schema.names != schema.names and read is None:
                        raise pa.ArrowInvalid(f"its columns {reader.schema.names} differ from {schema.names}")
                    for batch in _record_batches(reader):
                        if read is not None:
                            batch = batch.select(read)
                        for start in range(0, batch.num_rows, batch_rows):
                            rows = arrow_batch_rows(batch.slice(start, batch_rows), column, next_id, raw)
                            next_id += len(rows)
                            yield rows
            except (pa.ArrowException, OSError) as exc:  # the rest of this file is lost: one error row
                yield [Row(next_id, None, None, f"unreadable Arrow data in {file}: {exc}")]
                next_id += 1

    return TableSource(str(path), "arrow", column, list(schema.names), schema.remove_metadata(), batches)
