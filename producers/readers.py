"""Read events from files: `jsonl`, `csv` and `movielens` (the formats `produce` and `evaluate` take).

Over 400 lines on purpose: the three formats share one line-numbered bad-row report and one sort.

    reader = EventReader("ratings.csv", sort_by_time=True)
    for event in reader: ...
    print(reader.report.describe())        # "2 bad rows skipped: ratings.csv:17: ..."

or `read_events(path, format, report=..., on_bad=...)` for a plain iterator.

Rules, the same for every format:

* Bad rows are skipped, never silently: each becomes a `BadRow(path, line,
  reason)` that is counted in the `ReadReport`, kept there (the first
  `ReadReport.keep` of them) and passed to `on_bad` when given. Line numbers
  are 1-based physical lines of the file (a CSV record spanning several lines
  is reported at its first line).
* Events missing `event_id` or `ts` get them from `schema.prepare` (a fresh
  uuid, and *now*). Every event is validated by the schema.
* File order is kept, unless `sort_by_time=True`: then every row is read
  first and the events come out in `ts` order, ties in file order (a stable
  sort). MovieLens `ratings.csv` is ordered by user, not by time, so a replay
  in time order needs it; it holds every row in memory, unvalidated (~350
  bytes a MovieLens row, ~1 KB a typical JSON or CSV event).
* Files ending in `.gz` are decompressed; the format is then detected from
  the name without `.gz`.

Formats:

* `jsonl`: one JSON event per line; blank lines are ignored. A line that repeats a key is a bad row.
* `csv`: a header naming event fields (`user_id`, `item_id`, `event_type`
  required; `ts`, `event_id`, `session_id`, `value` optional) and
  `context.<key>` columns. An unknown column or a missing required column is
  an `InputFileError` (every row would fail). An empty cell means the field is
  absent. `ts` and `value` are numbers (`ts` may also be an ISO 8601 time;
  without a zone it is read as UTC). A context cell becomes an int or float
  when the whole cell is a plain decimal number without leading zeros
  (`42`, `-1.5`, `2e3`), otherwise it stays a string (`02139`, `true`,
  `ios`, `1,5` stay strings).
* `movielens`: `u.data` (tab separated `user item rating timestamp`, no
  header), `ratings.csv` (`userId,movieId,rating,timestamp` with that
  header) or `ratings.dat` (`::` separated). Every rating is one `click`
  event with `value` = the rating and `ts` = the timestamp: the benchmark
  protocol treats every rating as an interaction, whatever its value.
  `event_id` is `<random prefix of this read>-<line>`.
* `auto`: `.jsonl`/`.ndjson`/`.json` -> jsonl; `u.data`, `.data`, `.dat`
  -> movielens; `.csv` -> movielens when the header is MovieLens's, else
  csv; anything else is sniffed from its first line.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from stream_app.core.errors import InputFileError, InvalidEvent
from stream_app.core.events import MAX_MESSAGE_BYTES, Event, check_unique_keys, from_dict, prepare

__all__ = ["FORMATS", "BadRow", "ReadReport", "EventReader", "read_events", "detect_format"]

FORMATS: tuple[str, ...] = ("auto", "jsonl", "csv", "movielens")
EVENT_FIELDS: tuple[str, ...] = ("event_id", "user_id", "item_id", "event_type", "ts", "session_id", "value")
REQUIRED_CSV_FIELDS: tuple[str, ...] = ("user_id", "item_id", "event_type")
MOVIELENS_HEADER: tuple[str, ...] = ("userid", "movieid", "rating", "timestamp")

_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


@dataclass(frozen=True)
class BadRow:
    """A row that was skipped: where it is and why."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class ReadReport:
    """What a read did: events produced, bad rows skipped (all counted, the first `keep` kept)."""

    path: str = ""
    format: str = ""
    events: int = 0
    bad: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
    keep: int = 100

    def add_bad(self, row: BadRow) -> None:
        self.bad += 1
        if len(self.bad_rows) < self.keep:
            self.bad_rows.append(row)

    def describe(self, n: int = 3) -> str:
        """`"no bad rows"` or `"N bad row(s) skipped: path:line: reason; ..."` with the first n reasons."""
        if not self.bad:
            return "no bad rows"
        shown = "; ".join(str(r) for r in self.bad_rows[:n])
        more = f"; ... ({self.bad - n} more)" if self.bad > n else ""
        return f"{self.bad} bad row{'s' if self.bad != 1 else ''} skipped: {shown}{more}"


def _open_binary(path: Path) -> IO[bytes]:
    try:
        if path.suffix == ".gz":
            return gzip.open(path, "rb")  # type: ignore[return-value]
        return open(path, "rb")
    except FileNotFoundError:
        raise InputFileError(f"input file {path} does not exist") from None
    except OSError as exc:
        raise InputFileError(f"cannot read input file {path}: {exc}") from None


def _first_line(path: Path) -> str:
    with _open_binary(path) as f:
        try:
            for raw in f:
                line = raw.decode("utf-8-sig", errors="replace").strip()
                if line:
                    return line
        except (OSError, EOFError) as exc:
            raise InputFileError(f"cannot read input file {path}: {exc}") from None
    return ""


def _is_movielens_header(line: str) -> bool:
    cells = tuple(c.strip().strip('"').lower() for c in line.split(","))
    return cells == MOVIELENS_HEADER


def detect_format(path: str | Path) -> str:
    """The format `auto` resolves to for this file (see the module doc); raises `InputFileError`."""
    path = Path(path)
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    suffix = Path(name).suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if name == "u.data" or suffix in (".data", ".dat"):
        return "movielens"
    first = _first_line(path)
    if suffix == ".csv":
        return "movielens" if _is_movielens_header(first) else "csv"
    if first.startswith("{"):
        return "jsonl"
    if _is_movielens_header(first) or _movielens_fields(first) is not None:
        return "movielens"
    if "user_id" in first.split(","):
        return "csv"
    raise InputFileError(
        f"cannot tell the format of {path} from its name or first line; "
        "give --format jsonl, csv or movielens"
    )


def _movielens_fields(line: str) -> list[str] | None:
    for sep in ("\t", "::", ","):
        if sep in line:
            cells = [c.strip() for c in line.split(sep)]
            if len(cells) == 4 and all(_FLOAT.fullmatch(c) for c in cells):
                return cells
    return None


_Row = tuple[int, float, Callable[[Any], Event], Any]


def _sort_key(ts: Any) -> float:
    """Where a row goes in a sort by time: rows without a usable ts go last (they get *now*)."""
    if isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts):
        return ts
    return math.inf


def _lenient_json(raw: bytes) -> Any:
    """The stdlib's parse (accepts NaN, Infinity) of a line orjson refused, or None."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def _number(text: str) -> int | float:
    """A number cell: int when it is a plain integer, else float (so 'nan' reaches the schema as NaN)."""
    text = text.strip()
    if _INT.fullmatch(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"is not a number (got {text!r:.60})") from None


def _timestamp(text: str) -> int | float:
    try:
        return _number(text)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"is not a number or an ISO 8601 time (got {text!r:.60})") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.timestamp()


def _context_value(text: str) -> str | int | float:
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


class EventReader:
    """The events of one file; iterate it (once per iteration, re-reading the file). `report` says what happened.

    `format` is resolved at construction (`auto` detects), so `reader.format`
    names the real format. `on_bad` is called with each `BadRow` as it is found.
    """

    def __init__(
        self,
        path: str | Path,
        format: str = "auto",
        *,
        sort_by_time: bool = False,
        on_bad: Callable[[BadRow], None] | None = None,
        report: ReadReport | None = None,
    ) -> None:
        self.path = Path(path)
        if format not in FORMATS:
            raise InputFileError(f"format must be one of {', '.join(FORMATS)} (got {format!r})")
        if not self.path.is_file():
            raise InputFileError(f"input file {self.path} does not exist or is not a file")
        self.format = detect_format(self.path) if format == "auto" else format
        self.sort_by_time = sort_by_time
        self.on_bad = on_bad
        self.report = report if report is not None else ReadReport()
        self.report.path = str(self.path)
        self.report.format = self.format

    def _bad(self, line: int, reason: str) -> None:
        row = BadRow(str(self.path), line, reason)
        self.report.add_bad(row)
        if self.on_bad is not None:
            self.on_bad(row)

    def __iter__(self) -> Iterator[Event]:
        self.report.events = self.report.bad = 0
        self.report.bad_rows = []
        rows = {"jsonl": self._jsonl, "csv": self._csv, "movielens": self._movielens}[self.format]()
        if self.sort_by_time:
            rows = iter(sorted(rows, key=lambda row: row[1]))  # stable: ties keep file order
        for line, _ts, make, payload in rows:
            try:
                event = make(payload)
            except InvalidEvent as exc:
                self._bad(line, str(exc))
                continue
            self.report.events += 1
            yield event

    # Each row source yields (line, sort key ts, make, payload); make(payload) is
    # the Event. Deferring it keeps a sorted read to light rows, not events.

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        f = _open_binary(self.path)
        try:
            for n, raw in enumerate(f, 1):
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                yield n, raw
        except (OSError, EOFError) as exc:
            raise InputFileError(f"cannot read input file {self.path}: {exc}") from None
        finally:
            f.close()

    def _jsonl(self) -> Iterator[_Row]:
        for n, raw in self._lines():
            if not raw.strip():
                continue
            size = len(raw.rstrip(b"\r\n"))
            if size > MAX_MESSAGE_BYTES:
                self._bad(n, f"message must be at most {MAX_MESSAGE_BYTES} bytes (got {size})")
                continue
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                data = _lenient_json(raw)  # NaN/Infinity parse here, so validation names the field
                if data is None:
                    self._bad(n, f"line must be UTF-8 JSON without NaN/Infinity ({exc})")
                    continue
            try:  # both parsers keep the last of a repeated key
                check_unique_keys(raw, data)
            except InvalidEvent as exc:
                self._bad(n, str(exc))
                continue
            key = _sort_key(data.get("ts") if isinstance(data, dict) else None)
            yield n, key, prepare, data

    def _decoded_lines(self) -> Iterator[str]:
        """Text lines for the csv module; a line that is not UTF-8 is reported and replaced by a blank line."""
        for n, raw in self._lines():
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                self._bad(n, f"line must be UTF-8 ({exc.reason} at byte {exc.start})")
                yield "\n"

    def _csv(self) -> Iterator[_Row]:
        reader = csv.reader(self._decoded_lines())
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise InputFileError(f"{self.path}:1: cannot parse the CSV header ({exc})") from None
        columns = [h.strip() for h in header]
        for col in columns:
            if col not in EVENT_FIELDS and not (col.startswith("context.") and len(col) > len("context.")):
                raise InputFileError(
                    f"{self.path}: column {col!r} is not an event field; name it context.{col} "
                    f"to keep it as context (event fields: {', '.join(EVENT_FIELDS)})"
                )
        missing = [f for f in REQUIRED_CSV_FIELDS if f not in columns]
        if missing:
            raise InputFileError(f"{self.path}: the CSV header lacks the required column(s) {', '.join(missing)}")
        if len(set(columns)) != len(columns):
            raise InputFileError(f"{self.path}: the CSV header repeats a column")
        last = reader.line_num
        while True:
            start = last + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                self._bad(start, f"cannot parse the CSV row ({exc})")
                last = reader.line_num
                continue
            last = reader.line_num
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue
            if len(cells) != len(columns):
                self._bad(start, f"row has {len(cells)} cells, the header {len(columns)}")
                continue
            data: dict[str, Any] = {}
            context: dict[str, Any] = {}
            problem = None
            for col, cell in zip(columns, cells):
                if cell == "":
                    continue
                if col.startswith("context."):
                    context[col[len("context."):]] = _context_value(cell)
                elif col in ("ts", "value"):
                    try:
                        data[col] = _timestamp(cell) if col == "ts" else _number(cell)
                    except ValueError as exc:
                        problem = f"{col} {exc}"
                        break
                else:
                    data[col] = cell
            if problem:
                self._bad(start, problem)
                continue
            if context:
                data["context"] = context
            yield start, _sort_key(data.get("ts")), prepare, data

    def _movielens(self) -> Iterator[_Row]:
        # event_id: a random prefix per read plus the line number, unique like a
        # uuid per event but cheaper (MovieLens files run to 25M rows).
        run = uuid.uuid4().hex[:16]

        def make(row: tuple[str, str, float, float, int]) -> Event:
            user, item, ts, value, n = row
            return from_dict({"user_id": user, "item_id": item, "event_type": "click", "ts": ts, "value": value,
                              "event_id": f"{run}-{n}"})

        sep: str | None = None
        for n, raw in self._lines():
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                self._bad(n, f"line must be UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not line:
                continue
            if sep is None:
                if _is_movielens_header(line):
                    sep = ","
                    continue
                sep = "\t" if "\t" in line else "::" if "::" in line else ","
            cells = line.split(sep)
            if len(cells) != 4:
                self._bad(n, f"a MovieLens row has 4 fields user, item, rating, timestamp (got {len(cells)})")
                continue
            user, item, rating, stamp = (c.strip() for c in cells)
            try:
                value = float(rating)
            except ValueError:
                self._bad(n, f"rating is not a number (got {rating!r:.60})")
                continue
            try:
                ts = float(stamp)
            except ValueError:
                self._bad(n, f"timestamp is not a number (got {stamp!r:.60})")
                continue
            yield n, _sort_key(ts), make, (user, item, ts, value, n)


def read_events(
    path: str | Path,
    format: str = "auto",
    *,
    sort_by_time: bool = False,
    report: ReadReport | None = None,
    on_bad: Callable[[BadRow], None] | None = None,
) -> Iterator[Event]:
    """The events of a file in file order (or `ts` order with `sort_by_time`).

    Pass a `ReadReport` to learn the bad rows and counts afterwards, or an
    `on_bad` callback to hear of each bad row as it is skipped. Raises
    `InputFileError` for a missing file, an unknown format or an unusable header.
    """
    return iter(EventReader(path, format, sort_by_time=sort_by_time, report=report, on_bad=on_bad))
