"""Low-level raw-file access shared by every reader: plain or .gz files, checksums, and a fast
delimited-table parser that falls back to a line-by-line scan only to locate (or skip) bad lines.

Why two paths: pyarrow parses tens of millions of rows per second but cannot tell which physical
line was malformed. Clean files (the common case) take the fast path; a file with a bad row is
re-read line by line so the error names the exact 1-based line, or so ``on_bad_lines="skip"`` can
drop just those lines and count them.
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import io
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from .errors import BadInputError

ON_BAD_LINES = ("error", "skip")


def open_text(path: Path, encoding: str = "utf-8", errors: str = "strict") -> io.TextIOBase:
    """Open a plain or gzip file as text; newline=None turns CRLF into LF transparently."""
    path = Path(path)
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, errors=errors, newline=None)
    return open(path, encoding=encoding, errors=errors, newline=None)


def open_binary(path: Path):
    path = Path(path)
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def find_variant(directory: Path, name: str) -> Path | None:
    """``name`` or ``name.gz`` inside ``directory`` (plain first)."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class Lines:
    """The raw lines a parser reads: a whole file (``data`` None), or some of its consecutive lines (the Spark engine
    hands each parser the lines of one batch: an Arrow binary array of the raw bytes without their LF, with their
    1-based line numbers).

    Every parser takes a ``Lines``, so both engines run the same parsing code on the same bytes.
    """

    path: Path
    data: pa.Array | None = None  # binary or large_binary
    numbers: np.ndarray | None = None

    @property
    def starts_file(self) -> bool:
        """True when these lines begin at the file's first line (so a header row is among them)."""
        return self.data is None or (len(self.numbers) > 0 and int(self.numbers[0]) == 1)

    def numbered(self, bad: "BadLines", encoding: str = "utf-8"):
        """(1-based line number, decoded text without its LF/CRLF ending); an undecodable line goes to ``bad``.

        Decoding line by line (not through a TextIOWrapper) keeps line numbers exact even when one line has bytes
        that are not valid in ``encoding``.
        """
        if self.data is None:
            with open_binary(self.path) as f:
                yield from _decoded(enumerate(f, 1), self.path, bad, encoding)
        else:
            yield from _decoded(zip(self.numbers.tolist(), self.data.to_pylist()), self.path, bad, encoding)

    def arrow_source(self):
        """What pyarrow's readers take: the path (which also decompresses .gz), or the lines joined by LF."""
        if self.data is None:
            return self.path
        lists = (pa.LargeListArray if pa.types.is_large_binary(self.data.type) else pa.ListArray).from_arrays(
            pa.array([0, len(self.data)], pa.int64() if pa.types.is_large_binary(self.data.type) else pa.int32()),
            self.data)
        joined = pc.binary_join(lists, pa.scalar(b"\n", self.data.type))[0]
        return pa.BufferReader(joined.as_buffer() if joined.is_valid else b"")

    def data_lines(self, header: bool) -> int:
        """Non-blank lines, less the header when these lines hold it."""
        if self.data is None:
            return _count_data_lines(self.path, header)
        lengths = pc.binary_length(self.data).to_numpy(zero_copy_only=False)
        blank = (lengths == 0) | ((lengths == 1) & pc.equal(self.data, pa.scalar(b"\r", self.data.type))
                                  .to_numpy(zero_copy_only=False))
        return int((~blank).sum()) - (1 if header and self.starts_file else 0)

    @classmethod
    def head(cls, path: Path, n: int) -> "Lines":
        """The first ``n`` lines of a file."""
        with open_binary(path) as f:
            data = [line.rstrip(b"\n") for line in itertools.islice(f, n)]
        return cls(path, pa.array(data, pa.binary()), np.arange(1, len(data) + 1))


def _decoded(numbered_raw, path: Path, bad: "BadLines", encoding: str):
    for line_no, raw in numbered_raw:
        try:
            yield line_no, raw.decode(encoding).rstrip("\r\n")
        except UnicodeDecodeError as exc:
            bad.report(path, line_no, f"cannot decode as {encoding} ({exc.reason})")


@dataclass
class BadLines:
    """Policy for malformed lines: raise at the first one, or skip and count them per file."""

    on_bad_lines: str = "error"
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self):
        if self.on_bad_lines not in ON_BAD_LINES:
            raise ValueError(f"on_bad_lines must be one of {ON_BAD_LINES}, got {self.on_bad_lines!r}")

    def report(self, path: Path, line: int, reason: str, text: str | None = None) -> None:
        if self.on_bad_lines == "error":
            raise BadInputError(path, line, reason, text)
        name = Path(path).name
        self.skipped[name] = self.skipped.get(name, 0) + 1
        self.examples.setdefault(name, [])
        if len(self.examples[name]) < 10:
            self.examples[name].append(line)

    def forget(self, path: Path) -> None:
        """Drop the counts of one file before it is re-read from the start (so no line counts twice)."""
        self.skipped.pop(Path(path).name, None)
        self.examples.pop(Path(path).name, None)

    def print_summary(self) -> None:
        for name, count in self.skipped.items():
            lines = ", ".join(map(str, self.examples[name]))
            print(f"skipped {count} malformed line(s) in {name} (first lines: {lines})", file=sys.stderr)

    @property
    def total(self) -> int:
        return sum(self.skipped.values())


_CONVERT = {"int64": int, "float64": float, "string": str}
_ARROW = {"int64": pa.int64(), "float64": pa.float64(), "string": pa.string()}


def read_delimited(
    lines: Lines,
    *,
    sep: str,
    columns: dict[str, str],
    bad: BadLines,
    header: bool = False,
    encoding: str = "utf-8",
    quoted: bool = False,
    keep: list[str] | None = None,
    row_check=None,
    force_scan: bool = False,
) -> pa.Table:
    """Read a delimited file whose rows have exactly ``len(columns)`` fields.

    ``columns`` maps column name -> "int64" | "float64" | "string" in file order; ``keep`` selects
    the columns returned. ``sep`` may be ``"::"`` (MovieLens .dat), handled by splitting on ':' and
    dropping the empty fields in between. ``row_check`` (kept values -> reason or None) adds a
    per-row validation to the line-by-line path; callers that found a bad value in the fast result
    re-read with ``force_scan=True`` so the offending line is named (or skipped) exactly.
    """
    keep = keep or list(columns)
    if not force_scan:
        try:
            return _read_fast(lines, sep, columns, header, encoding, quoted, keep)
        except (pa.ArrowInvalid, UnicodeDecodeError):
            pass
    return _read_scan(lines, sep, columns, header, encoding, quoted, keep, bad, row_check)


def _read_fast(lines: Lines, sep, columns, header, encoding, quoted, keep) -> pa.Table:
    names = list(columns)
    gaps: list[str] = []
    if sep == "::":
        # "a::b::c" split on ':' is "a", "", "b", "", "c": give the gaps throwaway names (checked empty below,
        # so a line with single colons is not silently misread).
        gaps = [f"_gap{i}" for i in range(1, len(names))]
        file_names = [names[0]] + [n for gap, name in zip(gaps, names[1:]) for n in (gap, name)]
        delimiter = ":"
    elif len(sep) == 1:
        file_names, delimiter = names, sep
    else:
        raise pa.ArrowInvalid("multi-character separator")  # scan path handles it
    read = pacsv.ReadOptions(column_names=file_names, skip_rows=1 if header and lines.starts_file else 0,
                             encoding=encoding,
                             block_size=1 << 24)
    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quoted else False,
                               invalid_row_handler=lambda row: "error")
    types = {name: _ARROW[kind] for name, kind in columns.items()} | {gap: pa.string() for gap in gaps}
    convert = pacsv.ConvertOptions(column_types=types, include_columns=keep + gaps, strings_can_be_null=False,
                                   quoted_strings_can_be_null=False)
    table = pacsv.read_csv(lines.arrow_source(), read_options=read, parse_options=parse, convert_options=convert)
    if any(table.column(name).null_count for name in keep):
        raise pa.ArrowInvalid("empty numeric field")
    if any(pc.any(pc.not_equal(table.column(gap), "")).as_py() for gap in gaps):
        raise pa.ArrowInvalid("'::' separator expected")
    if quoted and table.num_rows != lines.data_lines(header):
        # An unclosed quote makes the parser swallow the following lines into one field.
        raise pa.ArrowInvalid("row count differs from line count")
    return table.select(keep)


def _count_data_lines(path: Path, header: bool) -> int:
    """Non-blank lines minus the header, counted in blocks. Only compared with the parsed row count: a
    miscount (e.g. a blank line split across blocks) merely sends the file to the exact line-by-line path."""
    newlines = blank = 0
    tail = b"\n"  # a line "ended" just before the file, so leading blank lines count as blank
    with open_binary(path) as f:
        while block := f.read(1 << 24):
            newlines += block.count(b"\n")
            joined = tail + block
            blank += joined.count(b"\n\n") + joined.count(b"\n\r\n")
            tail = block[-1:]
    lines = newlines + (0 if tail == b"\n" else 1)
    return lines - blank - (1 if header else 0)


def _read_scan(lines: Lines, sep, columns, header, encoding, quoted, keep, bad: BadLines, row_check=None) -> pa.Table:
    path = lines.path
    names, kinds = list(columns), list(columns.values())
    converters = [_CONVERT[k] for k in kinds]
    keep_pos = [names.index(n) for n in keep]
    out: list[list] = [[] for _ in keep]
    for line_no, text in lines.numbered(bad, encoding):
        if header and line_no == 1:
            continue
        if not text.strip():
            continue
        try:
            fields = next(csv.reader([text], delimiter=sep, strict=True)) if quoted else text.split(sep)
        except csv.Error as exc:
            bad.report(path, line_no, f"malformed quoting ({exc})", text)
            continue
        if len(fields) != len(names):
            bad.report(path, line_no, f"expected {len(names)} fields separated by {sep!r}, found {len(fields)}", text)
            continue
        try:
            values = [converters[p](fields[p]) if kinds[p] != "string" else fields[p] for p in keep_pos]
        except ValueError as exc:
            bad.report(path, line_no, f"bad value ({exc})", text)
            continue
        reason = row_check(values) if row_check is not None else None
        if reason is not None:
            bad.report(path, line_no, reason, text)
            continue
        for column, value in zip(out, values):
            column.append(value)
    return pa.table({name: pa.array(col, type=_ARROW[columns[name]]) for name, col in zip(keep, out)})


def parse_record(text: str):
    """One JSON-lines record: strict JSON, or the Python-literal dicts of the 2014 Amazon metadata."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return ast.literal_eval(text)


def iter_records(lines: Lines, bad: BadLines, encoding: str = "utf-8", want=None):
    """Yield ``(line_no, dict)`` per non-blank line; malformed lines go through ``bad``.

    ``want`` is an optional cheap text pre-filter (line -> bool) applied before parsing, so huge
    metadata files only pay the parse cost for the lines that matter.
    """
    for line_no, text in lines.numbered(bad, encoding):
        if not text.strip() or (want is not None and not want(text)):
            continue
        try:
            record = parse_record(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
            bad.report(lines.path, line_no, f"not a JSON object or Python dict literal ({type(exc).__name__})", text)
            continue
        if not isinstance(record, dict):
            bad.report(lines.path, line_no, "record is not an object", text)
            continue
        yield line_no, record
