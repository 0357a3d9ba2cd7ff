"""Model files of the sample app: serving without scikit-learn, older formats."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
from test_sample_model import make_frame, to_transactions

from sample_app import train
from sample_app.data import FEATURE_COLUMNS
from sample_app.scoring import FraudModel

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline_model() -> FraudModel:
    """A scaler + logistic regression, fit as the training script fits it."""
    return train.fit_model(
        make_frame(rows=400, frauds=40), data_sha256="0" * 64, data_source="test"
    )


def test_loaded_model_scores_without_scikit_learn(
    pipeline_model: FraudModel, tmp_path: Path
) -> None:
    path = pipeline_model.save(tmp_path / "model.joblib")
    transactions = to_transactions(make_frame(rows=20, frauds=5, seed=3))
    scored = pipeline_model.score_many(transactions)
    expected = [row["fraud_probability"] for row in scored]
    script = f"""
import json, sys
from sample_app.scoring import FraudModel, Transaction
model = FraudModel.load({str(path)!r})
rows = [Transaction.model_validate(row) for row in json.loads(sys.stdin.read())]
scores = [score["fraud_probability"] for score in model.score_many(rows)]
heavy = sorted(name for name in ("sklearn", "scipy", "pandas") if name in sys.modules)
print(json.dumps({{"scores": scores, "imported": heavy}}))
"""
    payload = "[" + ",".join(row.model_dump_json() for row in transactions) + "]"

    result = subprocess.run(
        [sys.executable, "-c", script],
        input=payload,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=True,
    )

    served = json.loads(result.stdout)
    assert served["imported"] == []
    np.testing.assert_allclose(served["scores"], expected, rtol=1e-12)


def test_estimator_kept_through_save_and_load(
    pipeline_model: FraudModel, tmp_path: Path
) -> None:
    first = FraudModel.load(pipeline_model.save(tmp_path / "first.joblib"))
    second = FraudModel.load(first.save(tmp_path / "second.joblib"))
    features = make_frame(rows=50, frauds=5, seed=4)[list(FEATURE_COLUMNS)].to_numpy()

    expected = pipeline_model._estimator.predict_proba(features)[:, 1]
    np.testing.assert_allclose(
        second._estimator.predict_proba(features)[:, 1], expected, rtol=1e-12
    )
    np.testing.assert_allclose(
        second.fraud_probabilities(features), expected, rtol=1e-9
    )
    assert second.with_metadata({"note": "x"}).metadata["note"] == "x"
    assert second.metadata == pipeline_model.metadata


def write_format_1(model: FraudModel, path: Path) -> None:
    joblib.dump(
        {
            "format": "agogosml-fraud-model/1",
            "estimator": model._estimator,
            "feature_names": list(model.feature_names),
            "threshold": model.threshold,
            "version": model.version,
            "metadata": model.metadata,
        },
        path,
    )


def test_format_1_model_file_still_loads(
    pipeline_model: FraudModel, tmp_path: Path
) -> None:
    path = tmp_path / "old.joblib"
    write_format_1(pipeline_model, path)
    transactions = to_transactions(make_frame(rows=10, frauds=2, seed=5))

    loaded = FraudModel.load(path)

    assert loaded.score_many(transactions) == pipeline_model.score_many(transactions)


def test_if_missing_retrains_older_format_only(
    pipeline_model: FraudModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_path = tmp_path / "train.csv"
    make_frame(rows=2000, frauds=100).to_csv(data_path, index=False)
    path = tmp_path / "fraud-model.joblib"
    write_format_1(pipeline_model, path)
    arguments = ["--if-missing", "--data", str(data_path), "--out", str(path)]

    train.main(arguments)
    assert FraudModel.is_current(path)
    assert "not retrained" not in capsys.readouterr().out

    train.main(arguments)
    assert "(exists, not retrained)" in capsys.readouterr().out
