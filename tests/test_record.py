"""The run record: one writer, one reader, one schema; other schemas refused by name."""

import json
import math

import pytest

from bench.results.record import RECORD, SCHEMA_VERSION, RecordError, RunRecord, read_record, read_record_or_none, write_record


def test_a_record_reads_back_as_written_with_nan_as_null(tmp_path):
    record = RunRecord(name="r", status="complete", config={"seed": 1}, iteration=4, curves=[{"iter": 2, "loss": math.nan}], final={"miou": 0.5})
    write_record(tmp_path, record)
    on_disk = json.loads((tmp_path / RECORD).read_text())
    assert on_disk["schema_version"] == SCHEMA_VERSION and on_disk["curves"] == [{"iter": 2, "loss": None}]
    back = read_record(tmp_path)
    assert back == RunRecord(name="r", status="complete", config={"seed": 1}, iteration=4, curves=[{"iter": 2, "loss": None}], final={"miou": 0.5})


def test_an_older_schema_is_refused_with_what_to_do(tmp_path):
    (tmp_path / RECORD).write_text(json.dumps({"name": "r", "status": "complete", "config": {}}))  # schema 1: no version key
    with pytest.raises(RecordError, match=r"record schema 1, but this cslbench reads schema 2 only; rerun"):
        read_record(tmp_path)
    assert read_record_or_none(tmp_path) is None


@pytest.mark.parametrize(
    "data, message",
    [
        ({"schema_version": 2, "name": "r", "status": "done", "config": {}}, "status 'done' is not one of"),
        ({"schema_version": 2, "name": "r", "status": "failed", "config": {}, "colour": 1}, r"unknown record fields \['colour'\]"),
        ({"schema_version": 2, "status": "failed", "config": {}}, "name"),
        ([1, 2], "not a run record"),
    ],
)
def test_what_is_not_a_record_is_named(tmp_path, data, message):
    (tmp_path / RECORD).write_text(json.dumps(data))
    with pytest.raises(RecordError, match=message):
        read_record(tmp_path)


def test_half_written_json_is_an_error_naming_the_file(tmp_path):
    (tmp_path / RECORD).write_text('{"status": "runn')
    with pytest.raises(RecordError, match=f"{RECORD}: not valid JSON"):
        read_record(tmp_path)
    assert read_record(tmp_path / "nothing") is None
