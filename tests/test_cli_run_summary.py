"""The summary of `agogosml run`: lost records apart from records not finished."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from rich.console import Console

from agogosml_cli import run
from agogosml_cli.local import ServiceProcess
from agogosml_cli.run import (
    InputRecords,
    OutputTally,
    RunStalledError,
    RunSummary,
    _check_exit,
    _follow,
    _summarise,
    print_summary,
    split_unfinished,
)

IDS = [f"tx-{index}" for index in range(10)]


def tally_of(written: list[str], dead_lettered: list[str]) -> OutputTally:
    tally = OutputTally()
    for message_id in written:
        tally.add_output(message_id, {"score": 1})
    for message_id in dead_lettered:
        tally.add_dead_letter(message_id)
    return tally


def table_text(summary: RunSummary) -> str:
    output = io.StringIO()
    print_summary(summary, Console(file=output, width=200))
    return output.getvalue()


def test_split_counts_records_after_checkpoint() -> None:
    # Records 0 to 5 are before the checkpoint; 3 is in neither output.
    tally = tally_of(["tx-0", "tx-1", "tx-2", "tx-5", "tx-7"], ["tx-4"])
    summary = RunSummary(transport="file", input_records=10, error="app killed")

    split_unfinished(summary, IDS[:6], IDS[6:], tally)

    assert summary.read == 6
    assert summary.missing == 1
    assert summary.missing_ids == ["tx-3"]
    assert summary.not_finished == 3


def test_split_without_loss() -> None:
    tally = tally_of(["tx-0", "tx-1"], [])
    summary = RunSummary(transport="file", input_records=10, error="app killed")

    split_unfinished(summary, IDS[:2], IDS[2:], tally)

    assert summary.missing == 0
    assert summary.missing_ids == []
    assert summary.not_finished == 8


def test_summary_json_has_not_finished() -> None:
    summary = RunSummary(transport="file", missing=0, not_finished=8)

    text = summary.to_json()
    data = orjson.loads(text)

    assert data["missing"] == 0
    assert data["not_finished"] == 8
    assert text.endswith(b"}\n")


def test_table_of_stopped_run_shows_not_finished() -> None:
    summary = RunSummary(
        transport="file",
        read=2,
        input_records=10,
        written=2,
        missing=0,
        not_finished=8,
        error="model app was killed",
    )

    text = table_text(summary)

    assert "missing" in text
    assert "0 of the 2 records that the reader finished" in text
    assert "not finished" in text
    assert "8, not read or still in flight when the run stopped" in text


def test_table_of_finished_run_has_no_not_finished() -> None:
    summary = RunSummary(transport="file", read=10, input_records=10, written=10)

    text = table_text(summary)

    assert "missing" in text
    assert "not finished" not in text


def test_table_of_stopped_broker_run() -> None:
    summary = RunSummary(
        transport="kafka",
        read=None,
        input_records=10,
        written=4,
        missing=None,
        not_finished=None,
        error="model app was killed",
    )

    text = " ".join(table_text(summary).split())

    assert "unknown, because the run cannot tell which records the reader read" in (
        text
    )
    assert "not finished" not in text


def test_fraud_counts_cover_written_records() -> None:
    # tx-8 is labelled fraud too, but the run stopped before writing it.
    records = InputRecords(IDS, frozenset({"tx-1", "tx-4", "tx-8"}))
    tally = OutputTally()
    tally.add_output("tx-1", {"transaction_id": "tx-1", "is_fraud": True})
    tally.add_output("tx-2", {"transaction_id": "tx-2", "is_fraud": True})
    tally.add_output("tx-4", {"transaction_id": "tx-4", "is_fraud": False})

    summary = _summarise("file", records, tally, 1.0)

    assert summary.flagged_as_fraud == 2
    assert summary.labelled_fraud == 2
    assert summary.flagged_labelled_fraud == 1
    assert "2 of the written records (1 of them flagged)" in table_text(summary)


def test_tally_matches_values_without_ids() -> None:
    # Values of another app: equal values and no transaction id.
    records = InputRecords(IDS[:4], None)
    tally = tally_of(["tx-0", "tx-1", "tx-1"], ["tx-2"])
    tally.add_output("tx-3", None)

    summary = _summarise("file", records, tally, 1.0)

    assert summary.written == 3
    assert summary.dead_lettered == 1
    assert summary.duplicates == 1
    assert summary.missing == 0


def test_summary_counts_records_written_and_dead_lettered() -> None:
    # The app forwarded tx-1's result, then failed; the reader dead-lettered it.
    records = InputRecords(IDS[:3], None)
    tally = tally_of(["tx-0", "tx-1"], ["tx-1", "tx-2"])

    summary = _summarise("file", records, tally, 1.0)
    data = orjson.loads(summary.to_json())

    assert summary.written == 2
    assert summary.dead_lettered == 2
    assert data["written_and_dead_lettered"] == 1
    assert "written and dead-lettered │ 1: the app forwarded" in table_text(summary)


def test_table_without_records_written_and_dead_lettered() -> None:
    records = InputRecords(IDS[:2], None)
    summary = _summarise("file", records, tally_of(["tx-0"], ["tx-1"]), 1.0)

    assert summary.written_and_dead_lettered == 0
    assert "written and dead-lettered" not in table_text(summary)


def test_tally_names_missing_message_ids() -> None:
    records = InputRecords(IDS[:4], None)
    tally = tally_of(["tx-0", "tx-3"], ["tx-1"])

    summary = _summarise("file", records, tally, 1.0)

    assert summary.missing == 1
    assert summary.missing_ids == ["tx-2"]


def test_summary_without_fraud_counts() -> None:
    records = InputRecords(IDS, None)
    tally = tally_of(IDS, [])

    summary = _summarise("file", records, tally, 1.0)
    summary.app = "my_app.app"
    data = orjson.loads(summary.to_json())
    text = table_text(summary)

    assert data["app"] == "my_app.app"
    for name in ("flagged_as_fraud", "labelled_fraud", "flagged_labelled_fraud"):
        assert name not in data
    assert "python -m my_app.app" in text
    assert "fraud" not in text


def test_summary_of_sample_app_has_fraud_counts() -> None:
    records = InputRecords(IDS, frozenset())
    tally = tally_of(IDS, [])

    data = orjson.loads(_summarise("file", records, tally, 1.0).to_json())

    assert data["app"] == "sample_app.app"
    assert data["flagged_as_fraud"] == 0
    assert data["labelled_fraud"] == 0
    assert data["flagged_labelled_fraud"] == 0


def test_table_marks_deleted_topics() -> None:
    summary = RunSummary(
        transport="kafka",
        output="run-output",
        dead_letter="kept.dlq",
        deleted_topics=["run-input", "run-output"],
    )

    text = table_text(summary)
    data = orjson.loads(summary.to_json())

    assert "run-output (deleted when the run ended)" in text
    assert "kept.dlq (deleted" not in text
    assert data["deleted_topics"] == ["run-input", "run-output"]


def test_dead_letter_reasons_counted_once_per_record() -> None:
    tally = OutputTally()
    for message_id, reason in [
        ("tx-0", "app responded 500: returned a dict"),
        ("tx-1", "not a payment"),
        ("tx-2", "app responded 500: returned a dict"),
        ("tx-2", "app responded 500: returned a dict"),
        ("tx-3", ""),
    ]:
        tally.add_dead_letter(message_id, reason)

    summary = _summarise("file", InputRecords(IDS[:4], None), tally, 1.0)

    assert summary.dead_lettered == 4
    assert summary.dead_letter_reasons == [
        {"reason": "app responded 500: returned a dict", "count": 2},
        {"reason": "not a payment", "count": 1},
    ]
    assert orjson.loads(summary.to_json())["dead_letter_reasons"][0]["count"] == 2


def test_table_shows_top_dead_letter_reason_shortened() -> None:
    reason = "app responded 500: " + "x" * 1000
    summary = RunSummary(
        transport="file",
        dead_lettered=5,
        dead_letter_reasons=[{"reason": reason, "count": 5}],
    )

    text = " ".join(table_text(summary).replace("│", " ").split())

    assert "top dead-letter reason 5 records: app responded 500: xxx" in text
    assert "x" * 299 not in text.replace(" ", "")
    assert "…" in text


def test_dead_lettered_lines_in_file_order() -> None:
    tally = tally_of(IDS[:2], IDS[9:1:-1])
    source_lines = [2 * index + 1 for index in range(10)]

    summary = _summarise("file", InputRecords(IDS, None, source_lines), tally, 1.0)

    assert summary.dead_lettered_lines == [5, 7, 9, 11, 13, 15, 17, 19]
    assert orjson.loads(summary.to_json())["dead_lettered_lines"][0] == 5


def test_dead_lettered_lines_cut_and_counted() -> None:
    ids = [f"line-{index}" for index in range(30)]
    tally = tally_of([], ids)

    summary = _summarise(
        "file", InputRecords(ids, None, list(range(1, 31))), tally, 1.0
    )
    text = " ".join(table_text(summary).replace("│", " ").split())

    assert summary.dead_lettered_lines == list(range(1, 21))
    assert "dead-lettered lines 1, 2, 3," in text
    assert "19, 20 and 10 more" in text


def test_dataset_run_names_no_dead_lettered_lines() -> None:
    summary = _summarise("file", InputRecords(IDS, None), tally_of([], IDS), 1.0)

    assert summary.dead_lettered_lines == []
    assert "dead-lettered lines" not in table_text(summary)


def test_table_counts_one_dead_letter_reason_as_one_record() -> None:
    summary = RunSummary(
        transport="file",
        dead_lettered=1,
        dead_letter_reasons=[{"reason": "not a payment", "count": 1}],
    )

    text = " ".join(table_text(summary).replace("│", " ").split())

    assert "top dead-letter reason 1 record: not a payment" in text


def test_table_without_dead_letters_has_no_reason_row() -> None:
    assert "dead-letter reason" not in table_text(RunSummary(transport="file"))


def follow_output(steps: list[list[tuple[str, str]]], total: int) -> str:
    """Run the progress display while each poll dead-letters one step's records."""
    tally = OutputTally()
    pending = list(steps)

    def poll() -> bool:
        for message_id, reason in pending.pop(0) if pending else []:
            tally.add_dead_letter(message_id, reason)
        return not pending

    output = io.StringIO()
    _follow(Console(file=output, width=200), total, tally, poll, stall_seconds=30)
    return output.getvalue()


def test_progress_shows_first_dead_letter_reason_once() -> None:
    reason = "app responded 500: [bold]a dict[/bold]\x1b[31m"
    steps = [[], [("tx-0", reason)], [("tx-1", reason), ("tx-2", "other")]]

    text = follow_output(steps, total=3)

    notice = "records are being dead-lettered; the first reason: app responded 500:"
    assert text.count(notice) == 1
    assert "[bold]a dict[/bold]\\x1b[31m" in text
    assert "\x1b[31m" not in text
    assert "other" not in text


def test_progress_without_dead_letters_shows_no_reason() -> None:
    assert "dead-lettered" not in follow_output([[], []], total=3)


@pytest.mark.parametrize(
    "reason",
    [
        'app responded 422: {"error": "closing [/] tag"}',
        'app responded 422: {"error": "missing [bold]amount[/bold]"}',
    ],
)
def test_table_shows_reason_brackets_as_text(reason: str) -> None:
    summary = RunSummary(
        transport="file",
        dead_lettered=2,
        dead_letter_reasons=[{"reason": reason, "count": 2}],
    )

    text = table_text(summary)

    assert reason in text


def test_table_escapes_reason_control_characters() -> None:
    reason = "app responded 500: \x1b[31mred\x1b[0m\nnext line"
    summary = RunSummary(
        transport="file",
        dead_lettered=1,
        dead_letter_reasons=[{"reason": reason, "count": 1}],
    )

    text = table_text(summary)

    assert "\x1b" not in text
    assert "\\x1b[31mred\\x1b[0m\\nnext line" in text


def test_check_exit_reader_never_exits(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(run, "READER_EXIT_SECONDS", 0.1)
    reader = ServiceProcess(
        "input reader", "agogosml.reader", {}, tmp_path / "reader.log", port=0
    )
    reader.process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"]
    )
    input_path = tmp_path / "input.jsonl"
    input_path.write_text("{}\n")

    try:
        with pytest.raises(RunStalledError, match="did not exit within 0.1 s"):
            _check_exit(reader, False, input_path, tmp_path / "checkpoint")
    finally:
        reader.kill()
