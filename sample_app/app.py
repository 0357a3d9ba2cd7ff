"""The fraud-scoring model app: validate each transaction, score it, forward it.

Run it with ``agogosml-sample-app`` (or ``python -m sample_app.app``). It reads the
``APP_`` settings of `agogosml.app.AppSettings`, plus ``SAMPLE_APP_MODEL_PATH``
of `SampleAppSettings` (default: where ``python -m sample_app.train`` saves the
model). At start it logs a warning for a ``SAMPLE_APP_`` variable whose name is
close to that one, such as ``SAMPLE_APP_MODEL_PAHT``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from sample_app import exit_if_packages_missing

if __name__ == "__main__":
    # Before the imports below, so that a missing package ends with the fix.
    exit_if_packages_missing("sample app")

from pydantic import Field, ValidationError  # noqa: E402
from pydantic_settings import BaseSettings, SettingsConfigDict  # noqa: E402

from agogosml.app import InvalidRecord, ModelApp  # noqa: E402
from agogosml.config import misspelled_variables  # noqa: E402
from agogosml.exact_json import json_type  # noqa: E402
from sample_app.scoring import (  # noqa: E402
    FraudModel,
    ModelLoadError,
    Transaction,
    default_model_path,
    validation_error_message,
)

_UNSCORABLE = (
    "the transaction cannot be scored: its values are so large that the model's "
    "weighted sum of them is not a finite number; send the values of a real "
    "transaction"
)


def make_score_function(model: FraudModel) -> Any:
    """Return a scoring function that validates values and scores the valid ones."""

    def score(values: list[Any]) -> list[Any]:
        results: list[Any] = [None] * len(values)
        valid: list[tuple[int, Transaction]] = []
        for index, value in enumerate(values):
            if not isinstance(value, dict):
                results[index] = InvalidRecord(
                    f"a transaction must be a JSON object, got {json_type(value)}"
                )
                continue
            try:
                valid.append((index, Transaction.model_validate(value)))
            except ValidationError as exc:
                results[index] = InvalidRecord(validation_error_message(exc))
        if valid:
            scores = model.score_many([transaction for _, transaction in valid])
            for (index, _), result in zip(valid, scores, strict=True):
                if math.isfinite(result["fraud_probability"]):
                    results[index] = result
                else:
                    results[index] = InvalidRecord(_UNSCORABLE)
        return results

    return score


class SampleAppSettings(BaseSettings):
    """Settings of the sample app beside `AppSettings` (prefix ``SAMPLE_APP_``)."""

    # pydantic 2.6 to 2.9 warn about a field named "model_..." because they
    # reserve that prefix for the model's methods.
    model_config = SettingsConfigDict(
        env_prefix="SAMPLE_APP_",
        frozen=True,
        extra="ignore",
        case_sensitive=False,
        protected_namespaces=(),
    )

    model_path: str = Field(
        "",
        description="SAMPLE_APP_MODEL_PATH: the model file; empty means "
        "${AGOGOSML_CACHE_DIR:-~/.cache/agogosml}/models/fraud-model.joblib.",
    )


def model_path() -> Path:
    """Return the model file named by SAMPLE_APP_MODEL_PATH, or the default."""
    configured = SampleAppSettings().model_path
    return Path(configured) if configured else default_model_path()


def _misspelling_hint() -> str:
    """Return '; NAME is set, did you mean ...?' for each likely misspelling."""
    return "".join(
        f"; {name} is set, did you mean {known}?"
        for name, known in misspelled_variables(SampleAppSettings)
    )


def main() -> None:
    """Load the model and serve until SIGTERM/SIGINT."""
    path = model_path()
    if not path.exists():
        print(
            f"sample app: model file {str(path)!r} not found; train it with "
            "'python -m sample_app.train' or set SAMPLE_APP_MODEL_PATH"
            f"{_misspelling_hint()}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    try:
        model = FraudModel.load(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file ends the same way
        # A ModelLoadError gives the fix itself.
        fix = ""
        if not isinstance(exc, ModelLoadError):
            fix = "; retrain it with 'python -m sample_app.train'"
        print(
            f"sample app: cannot load the model from {str(path)!r}: {exc!s}{fix}",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    # One transaction scores in about 12 µs and a batch of 100 in 0.5 ms, so a
    # switch to a scoring thread and back (about 40 µs) would cost more than
    # the scoring of a single message. The model runs on the event loop, which
    # it holds for at most half a millisecond. A slow model keeps the default.
    ModelApp(
        make_score_function(model),
        name="fraud-scoring app",
        score_in_thread=False,
        extra_settings=[SampleAppSettings],
        model_version=model.version,
    ).run()


if __name__ == "__main__":
    main()
