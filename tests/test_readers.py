"""Reading events from jsonl, csv and MovieLens files; bad rows counted with their line numbers."""

from __future__ import annotations

import gzip
from pathlib import Path

import orjson
import pytest

from producers.readers import BadRow, EventReader, ReadReport, detect_format, read_events
from stream_app.core.errors import InputFileError

ML_SMALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small" / "ratings.csv"


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def read(path: Path, format: str = "auto", **kw) -> tuple[list, ReadReport]:
    report = ReadReport()
    return list(read_events(path, format, report=report, **kw)), report


def lines_of(report: ReadReport) -> list[int]:
    return [b.line for b in report.bad_rows]


# ---- jsonl ------------------------------------------------------------------------------


def test_jsonl(tmp_path: Path) -> None:
    rows = [
        {"event_id": "e1", "user_id": "u1", "item_id": "i1", "event_type": "click", "ts": 10.5,
         "session_id": "s1", "context": {"device": "ios", "hour": 3}},
        {"user_id": "u2", "item_id": "i2", "event_type": "purchase", "value": 9.99},  # id and ts filled
    ]
    path = write(tmp_path / "events.jsonl", b"\n".join(orjson.dumps(r) for r in rows) + b"\n\n")
    events, report = read(path)
    assert report.format == "jsonl" and report.events == 2 and report.bad == 0
    assert events[0].event_id == "e1" and events[0].context == {"device": "ios", "hour": 3}
    assert events[1].event_id and events[1].ts > 1.7e9 and events[1].value == 9.99


def test_jsonl_bad_lines_are_counted_with_line_numbers(tmp_path: Path) -> None:
    good = orjson.dumps({"user_id": "u", "item_id": "i", "event_type": "click", "ts": 1})
    lines = [
        good,                                                           # 1
        b"{not json",                                                   # 2
        b"",                                                            # 3 blank: ignored, not bad
        orjson.dumps({"user_id": "u", "item_id": "i", "event_type": "teleport", "ts": 1}),  # 4
        b'{"user_id": "u", "item_id": "i", "event_type": "click", "ts": NaN}',              # 5
        b"[1, 2]",                                                      # 6
        b'{"user_id": "\xff", "item_id": "i", "event_type": "click", "ts": 1}',             # 7
        good,                                                           # 8
    ]
    seen: list[BadRow] = []
    report = ReadReport()
    events = list(read_events(write(tmp_path / "e.jsonl", b"\n".join(lines)), report=report, on_bad=seen.append))
    assert len(events) == 2 and report.events == 2
    assert report.bad == 5 and lines_of(report) == [2, 4, 5, 6, 7] and seen == report.bad_rows
    reasons = {b.line: b.reason for b in report.bad_rows}
    assert "event_type must be one of" in reasons[4]
    assert "ts must be a finite number" in reasons[5]
    assert "JSON object" in reasons[6]
    assert "UTF-8" in reasons[7]
    assert str(report.bad_rows[0]).startswith(f"{tmp_path / 'e.jsonl'}:2: ")
    assert report.describe(2).startswith("5 bad rows skipped: ") and "(3 more)" in report.describe(2)


def test_a_lone_surrogate_is_a_bad_line_not_the_end_of_the_run(tmp_path: Path) -> None:
    """JSON may escape half a surrogate pair (\\ud800); no event can carry it (it cannot be encoded again)."""
    good = orjson.dumps({"user_id": "u", "item_id": "i", "event_type": "click", "ts": 1})
    lines = [
        good,
        b'{"user_id": "u\\ud800", "item_id": "i", "event_type": "click", "ts": 2}',
        b'{"user_id": "u", "item_id": "i", "event_type": "click", "ts": 3, "context": {"k": "\\udfff"}}',
        good,
    ]
    events, report = read(write(tmp_path / "s.jsonl", b"\n".join(lines)))
    assert len(events) == 2 and lines_of(report) == [2, 3]
    assert "user_id must be valid Unicode" in report.bad_rows[0].reason
    assert "context.k must be valid Unicode" in report.bad_rows[1].reason


def test_a_repeated_key_is_a_bad_line_with_its_file_and_line(tmp_path: Path) -> None:
    lines = [
        b'{"user_id": "u", "item_id": "i", "event_type": "click", "ts": 1}',
        b'{"user_id": "a", "user_id": "b", "item_id": "i", "event_type": "click", "ts": 2}',
        b'{"user_id": "u", "item_id": "i", "event_type": "click", "ts": 3, "context": {"k": "x", "k": "y"}}',
        b'{"user_id": "u", "item_id": "i", "event_type": "click", "ts": 4, "ts": NaN}',  # the lenient parse too
        # no false alarms: colons and field names inside values, null fields, an empty context
        b'{"user_id": "user_id:", "item_id": "urn:i:1", "event_type": "click", "ts": 5, "event_id": null,'
        b' "context": {"url": "http://x:80/a", "ts": "ts"}}',
        b'{"user_id": "u", "item_id": "\\"item_id\\": 1", "event_type": "click", "ts": 6, "context": {}}',
    ]
    path = write(tmp_path / "d.jsonl", b"\n".join(lines))
    events, report = read(path)
    assert [e.ts for e in events] == [1, 5, 6] and lines_of(report) == [2, 3, 4]
    assert [str(b).split(" ", 1)[0] for b in report.bad_rows] == [f"{path}:{n}:" for n in (2, 3, 4)]
    assert [b.reason.split(" ", 1)[0] for b in report.bad_rows] == ["user_id", "context.k", "ts"]
    assert all("more than once" in b.reason for b in report.bad_rows)
    assert events[1].user_id == "user_id:" and events[2].item_id == '"item_id": 1'


def test_jsonl_gzip(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(orjson.dumps({"user_id": "u", "item_id": "i", "event_type": "favorite", "ts": 2}) + b"\n")
    events, report = read(path)
    assert report.format == "jsonl" and [e.event_type for e in events] == ["favorite"]


# ---- csv --------------------------------------------------------------------------------


def test_csv_with_context_columns(tmp_path: Path) -> None:
    path = write(
        tmp_path / "events.csv",
        "\ufeffuser_id,item_id,event_type,ts,session_id,value,context.device,context.zip,context.score,context.flag\n"
        "u1,i1,click,100,s1,,ios,02139,42,true\n"
        'u2,"i,2",purchase,2024-01-01T00:00:00Z,,19.5,web,10115,-1.5e2,\n'
        "u3,i3,favorite,,,,,,,\n",
    )
    events, report = read(path)
    assert report.format == "csv" and report.bad == 0 and len(events) == 3
    a, b, c = events
    assert (a.user_id, a.item_id, a.event_type, a.ts, a.session_id, a.value) == ("u1", "i1", "click", 100, "s1", None)
    # Context cells: whole plain numbers become numbers; leading zeros and words stay strings.
    assert a.context == {"device": "ios", "zip": "02139", "score": 42, "flag": "true"}
    assert b.item_id == "i,2" and b.ts == 1704067200.0 and b.value == 19.5
    assert b.context == {"device": "web", "zip": 10115, "score": -150.0}
    assert c.context == {} and c.ts > 1.7e9 and c.event_id and c.session_id is None  # empty cells are absent


def test_csv_bad_rows(tmp_path: Path) -> None:
    path = write(
        tmp_path / "events.csv",
        "user_id,item_id,event_type,ts,value\n"   # 1
        "u1,i1,click,1,\n"                         # 2 good
        "u1,i1,click,1\n"                          # 3 too few cells
        ",i1,click,1,\n"                           # 4 empty user_id = missing
        "u1,i1,click,yesterday,\n"                 # 5 bad ts
        "u1,i1,click,1,nan\n"                      # 6 non-finite value
        "u1,i1,buy,1,\n"                           # 7 bad type
        "\n"                                       # 8 blank: ignored
        'u1,"i\n1",click,1,\n'                     # 9-10 a quoted newline: a good record
        "u1,i1,click,1,x\n",                       # 11 bad value
    )
    events, report = read(path)
    assert len(events) == 2 and events[1].item_id == "i\n1"
    assert lines_of(report) == [3, 4, 5, 6, 7, 11]
    reasons = [b.reason for b in report.bad_rows]
    assert "4 cells, the header 5" in reasons[0] and "user_id is required" in reasons[1]
    assert "ts is not a number" in reasons[2] and "value must be a finite number" in reasons[3]
    assert "event_type must be one of" in reasons[4] and "value is not a number" in reasons[5]


def test_csv_bad_header(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="context.device"):
        list(read_events(write(tmp_path / "a.csv", "user_id,item_id,event_type,device\nu,i,click,ios\n")))
    with pytest.raises(InputFileError, match="item_id"):
        list(read_events(write(tmp_path / "b.csv", "user_id,event_type\nu,click\n")))


def test_csv_non_utf8_line(tmp_path: Path) -> None:
    path = write(tmp_path / "e.csv", b"user_id,item_id,event_type,ts\nu\xff,i,click,1\nu,i,click,2\n")
    events, report = read(path)
    assert [e.ts for e in events] == [2] and lines_of(report) == [2] and "UTF-8" in report.bad_rows[0].reason


# ---- MovieLens --------------------------------------------------------------------------


def test_movielens_u_data(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\tx\t878887116\n")
    events, report = read(path)
    assert report.format == "movielens" and len(events) == 2
    e = events[0]
    assert (e.user_id, e.item_id, e.event_type, e.value, e.ts) == ("196", "242", "click", 3.0, 881250949.0)
    assert e.event_id and events[0].event_id != events[1].event_id
    assert lines_of(report) == [3] and "rating is not a number" in report.bad_rows[0].reason


def test_movielens_ratings_csv_and_sort_by_time(tmp_path: Path) -> None:
    path = write(
        tmp_path / "ratings.csv",
        "userId,movieId,rating,timestamp\n"
        "1,10,4.0,300\n"
        "1,20,2.5,100\n"
        "2,10,5.0,200\n"
        "2,30,oops\n"
        "3,40,1.0,100\n",
    )
    events, report = read(path)
    assert report.format == "movielens"
    assert [(e.user_id, e.item_id) for e in events] == [("1", "10"), ("1", "20"), ("2", "10"), ("3", "40")]
    assert lines_of(report) == [5] and "4 fields" in report.bad_rows[0].reason
    ordered, report = read(path, "movielens", sort_by_time=True)
    # Time order, ties in file order; bad rows still reported with their line.
    assert [(e.user_id, e.ts) for e in ordered] == [("1", 100), ("3", 100), ("2", 200), ("1", 300)]
    assert [e.value for e in ordered] == [2.5, 1.0, 5.0, 4.0]
    assert lines_of(report) == [5]


def test_sort_by_time_for_jsonl(tmp_path: Path) -> None:
    rows = [{"user_id": "u", "item_id": f"i{t}", "event_type": "click", "ts": t} for t in (3, 1, 2)]
    path = write(tmp_path / "e.jsonl", b"\n".join(map(orjson.dumps, rows)))
    events, _ = read(path, sort_by_time=True)
    assert [e.ts for e in events] == [1, 2, 3]


def test_movielens_dat(tmp_path: Path) -> None:
    events, report = read(write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n"))
    assert report.format == "movielens" and [e.item_id for e in events] == ["1193", "661"]


@pytest.mark.skipif(not ML_SMALL.exists(), reason="MovieLens latest-small not present")
def test_movielens_latest_small() -> None:
    reader = EventReader(ML_SMALL, sort_by_time=True)
    n, last = 0, float("-inf")
    for event in reader:
        assert event.ts >= last
        last = event.ts
        n += 1
    assert reader.format == "movielens" and n == 100836 and reader.report.bad == 0


# ---- detection and errors ----------------------------------------------------------------


def test_detect_format(tmp_path: Path) -> None:
    assert detect_format(write(tmp_path / "x.ndjson", "{}")) == "jsonl"
    assert detect_format(write(tmp_path / "x.csv", "userId,movieId,rating,timestamp\n")) == "movielens"
    assert detect_format(write(tmp_path / "y.csv", "user_id,item_id,event_type\n")) == "csv"
    assert detect_format(write(tmp_path / "events", '{"user_id": "u"}\n')) == "jsonl"
    assert detect_format(write(tmp_path / "ratings", "1\t2\t3\t4\n")) == "movielens"
    with pytest.raises(InputFileError, match="--format"):
        detect_format(write(tmp_path / "mystery", "hello\n"))


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="does not exist"):
        read_events(tmp_path / "nope.jsonl")
    with pytest.raises(InputFileError, match="format must be one of"):
        read_events(write(tmp_path / "e.jsonl", ""), "parquet")


def test_report_keeps_a_bounded_sample_but_counts_all(tmp_path: Path) -> None:
    path = write(tmp_path / "e.jsonl", "junk\n" * 250)
    report = ReadReport(keep=10)
    assert list(read_events(path, report=report)) == []
    assert report.bad == 250 and len(report.bad_rows) == 10 and report.bad_rows[-1].line == 10


def test_reader_can_be_iterated_again(tmp_path: Path) -> None:
    reader = EventReader(write(tmp_path / "u.data", "1\t2\t3\t4\nbad\n"))
    assert len(list(reader)) == 1 and len(list(reader)) == 1
    assert reader.report.events == 1 and reader.report.bad == 1
