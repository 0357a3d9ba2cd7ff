"""Validate card transactions and score them with the trained fraud model.

A model app validates each incoming message with ``Transaction``, then scores a
whole batch with ``FraudModel.score_many``. ``python -m sample_app.train`` writes
the model file that ``FraudModel.load`` reads.
"""

from __future__ import annotations

import copy
import math
import operator
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import joblib
import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .data import FEATURE_COLUMNS, _atomic_target, default_cache_root

__all__ = [
    "ARTIFACT_FORMAT",
    "FraudModel",
    "ModelLoadError",
    "Transaction",
    "default_model_path",
    "validation_error_message",
]

# Stored in every model file, so load can reject files of another layout.
# Format 2 keeps a scaler + logistic regression also as plain arrays, so that
# serving it does not import scikit-learn; format 1 files still load.
ARTIFACT_FORMAT = "agogosml-fraud-model/2"
_FORMAT_1 = "agogosml-fraud-model/1"

# Strict, so a JSON string such as "1.5" is rejected instead of converted.
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
NonNegativeFiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0)]

_MAX_VALUE_REPR_CHARS = 60


class Transaction(BaseModel):
    """One card transaction, with the columns of the ULB credit-card fraud dataset.

    ``Time`` and ``Amount`` are finite numbers >= 0, and ``V1``..``V28`` are finite
    numbers. Integers are accepted as numbers, but strings and booleans are not.
    Unknown fields are ignored.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    transaction_id: str | None = None
    Time: NonNegativeFiniteFloat
    V1: FiniteFloat
    V2: FiniteFloat
    V3: FiniteFloat
    V4: FiniteFloat
    V5: FiniteFloat
    V6: FiniteFloat
    V7: FiniteFloat
    V8: FiniteFloat
    V9: FiniteFloat
    V10: FiniteFloat
    V11: FiniteFloat
    V12: FiniteFloat
    V13: FiniteFloat
    V14: FiniteFloat
    V15: FiniteFloat
    V16: FiniteFloat
    V17: FiniteFloat
    V18: FiniteFloat
    V19: FiniteFloat
    V20: FiniteFloat
    V21: FiniteFloat
    V22: FiniteFloat
    V23: FiniteFloat
    V24: FiniteFloat
    V25: FiniteFloat
    V26: FiniteFloat
    V27: FiniteFloat
    V28: FiniteFloat
    Amount: NonNegativeFiniteFloat
    Class: Literal[0, 1] | None = None


def validation_error_message(exc: ValidationError) -> str:
    """Describe the first error of a failed validation in one short sentence.

    The sentence names the field and its invalid value, for example ``Invalid
    value -5.0 for field 'Amount' (input should be greater than or equal to 0).``,
    and counts any further errors.
    """
    errors = exc.errors(include_url=False)
    if not errors:
        return "Invalid transaction."

    first = errors[0]
    field = ".".join(str(part) for part in first["loc"])
    reason = first["msg"][:1].lower() + first["msg"][1:]
    if first["type"] == "missing":
        sentence = f"Missing required field {field!r}"
    elif not field:
        sentence = f"Invalid transaction {_short_repr(first['input'])} ({reason})"
    else:
        value = _short_repr(first["input"])
        sentence = f"Invalid value {value} for field {field!r} ({reason})"

    others = len(errors) - 1
    if others == 1:
        sentence += ", and 1 more error"
    elif others > 1:
        sentence += f", and {others} more errors"
    return sentence + "."


def _short_repr(value: object) -> str:
    """Return `value` as JSON, the form in which the client sent it, cut short.

    NaN and the infinities, which JSON cannot carry, keep Python's spelling.
    """
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    if isinstance(value, float) and not math.isfinite(value):
        text = repr(value)
    if len(text) > _MAX_VALUE_REPR_CHARS:
        return text[: _MAX_VALUE_REPR_CHARS - 3] + "..."
    return text


def default_model_path() -> Path:
    """Return ``${AGOGOSML_CACHE_DIR:-~/.cache/agogosml}/models/fraud-model.joblib``."""
    return default_cache_root() / "models" / "fraud-model.joblib"


class ModelLoadError(ValueError):
    """A model file that is not a fraud model saved by ``FraudModel.save``."""


class FraudModel:
    """A fitted classifier with the decision threshold and metadata to use it.

    Args:
        estimator: A fitted scikit-learn classifier with ``predict_proba`` and the
            classes 0 and 1, fit on columns in the order of ``feature_names``.
        feature_names: Transaction fields, in the column order of the estimator.
        threshold: The minimum fraud probability at which a transaction is scored
            as fraud, between 0 and 1.
        version: The model version reported with every score.
        metadata: Training details saved with the model, such as metrics.

    Raises:
        ValueError: A feature is not a Transaction field, the threshold is
            outside [0, 1] or the estimator has no class 1.
    """

    def __init__(
        self,
        estimator: Any,
        *,
        feature_names: Sequence[str],
        threshold: float,
        version: str,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        _fraud_column(estimator)
        self._set_fields(feature_names, threshold, version, metadata)
        self._fitted: Any = estimator
        self._pickled: bytes | None = None
        self._linear = _ScaledLogistic.from_estimator(estimator)

    def _set_fields(
        self,
        feature_names: Sequence[str],
        threshold: float,
        version: str,
        metadata: Mapping[str, Any] | None,
    ) -> None:
        unknown = [name for name in feature_names if name not in FEATURE_COLUMNS]
        if unknown or not feature_names:
            raise ValueError(
                f"feature_names must be a non-empty subset of {list(FEATURE_COLUMNS)}, "
                f"got the unknown names {unknown}"
            )
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold!r}")
        self._feature_names = tuple(feature_names)
        self._read_features = operator.attrgetter(*self._feature_names)
        self._threshold = float(threshold)
        self._version = version
        self._metadata = dict(metadata or {})

    @property
    def _estimator(self) -> Any:
        """The fitted estimator, unpickled on first use after ``load``."""
        if self._fitted is None:
            assert self._pickled is not None
            self._fitted = pickle.loads(self._pickled)  # noqa: S301 - see load
        return self._fitted

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The Transaction fields, in the column order of the estimator."""
        return self._feature_names

    @property
    def threshold(self) -> float:
        """The minimum fraud probability at which a transaction counts as fraud."""
        return self._threshold

    @property
    def version(self) -> str:
        """The model version reported with every score."""
        return self._version

    @property
    def metadata(self) -> dict[str, Any]:
        """A copy of the training details saved with the model."""
        return dict(self._metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FraudModel:
        """Load a model file written by ``save``.

        joblib unpickles the file, and unpickling can run arbitrary code, so load
        only files you trust.

        Raises:
            FileNotFoundError: The file does not exist.
            ModelLoadError: The file is not a model saved by ``save``.
        """
        try:
            artifact = joblib.load(path)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - a file of any other kind fails in any way
            # Text or another binary file fails in the unpickler with errors
            # such as IndexError or KeyError, which do not mention the file.
            raise ModelLoadError(
                f"{str(path)!r} is not a model file: unpickling it failed "
                f"({type(exc).__name__}: {exc}). Train a model with "
                "python -m sample_app.train."
            ) from exc

        if not isinstance(artifact, dict) or artifact.get("format") not in (
            ARTIFACT_FORMAT,
            _FORMAT_1,
        ):
            raise ModelLoadError(
                f"{str(path)!r} is not a fraud model of format {ARTIFACT_FORMAT!r}. "
                "Train a model with python -m sample_app.train."
            )
        try:
            if artifact["format"] == _FORMAT_1:
                return cls(
                    artifact["estimator"],
                    feature_names=artifact["feature_names"],
                    threshold=artifact["threshold"],
                    version=artifact["version"],
                    metadata=artifact["metadata"],
                )
            return cls._from_artifact(artifact)
        except (KeyError, TypeError, ValueError, pickle.UnpicklingError) as exc:
            raise ModelLoadError(
                f"The model file {str(path)!r} is invalid: {exc!r}"
            ) from exc

    @staticmethod
    def is_current(path: str | os.PathLike[str]) -> bool:
        """Return whether ``path`` contains a model file of the current format.

        False for a missing or unreadable file, and for a file of an older
        format, which ``load`` still reads but serves with scikit-learn.
        """
        try:
            artifact = joblib.load(path)
        except Exception:  # noqa: BLE001 - any unreadable file is not current
            return False
        return isinstance(artifact, dict) and artifact.get("format") == ARTIFACT_FORMAT

    @classmethod
    def _from_artifact(cls, artifact: Mapping[str, Any]) -> FraudModel:
        """Restore a format 2 model; its estimator stays pickled while unused."""
        linear = artifact["linear"]
        if linear is None:
            return cls(
                pickle.loads(artifact["estimator"]),  # noqa: S301 - see load
                feature_names=artifact["feature_names"],
                threshold=artifact["threshold"],
                version=artifact["version"],
                metadata=artifact["metadata"],
            )
        model = cls.__new__(cls)
        model._set_fields(
            artifact["feature_names"],
            artifact["threshold"],
            artifact["version"],
            artifact["metadata"],
        )
        model._fitted = None
        model._pickled = bytes(artifact["estimator"])
        model._linear = _ScaledLogistic.from_arrays(linear)
        return model

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the model to ``path`` atomically, creating parent directories.

        Returns:
            The path written.
        """
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        pickled = self._pickled
        if pickled is None:
            pickled = pickle.dumps(self._fitted, protocol=pickle.HIGHEST_PROTOCOL)
        artifact = {
            "format": ARTIFACT_FORMAT,
            "estimator": pickled,
            "linear": None if self._linear is None else self._linear.arrays(),
            "feature_names": list(self._feature_names),
            "threshold": self._threshold,
            "version": self._version,
            "metadata": self._metadata,
        }
        with _atomic_target(target) as temporary:
            joblib.dump(artifact, temporary)
        return target

    def with_metadata(self, extra: Mapping[str, Any]) -> FraudModel:
        """Return a copy of the model whose metadata also has the ``extra`` keys."""
        model = copy.copy(self)
        model._metadata = {**self._metadata, **extra}
        return model

    def fraud_probabilities(self, features: np.ndarray) -> np.ndarray:
        """Return the fraud probability of each row of a feature matrix.

        A scaler plus logistic regression is evaluated with its fitted
        parameters directly: the same arithmetic as ``predict_proba``, without
        scikit-learn's input checks, which cost far more than the arithmetic
        when a request carries one transaction.

        Args:
            features: An array of shape (rows, len(feature_names)), with columns
                in the order of ``feature_names``.
        """
        if self._linear is not None:
            return self._linear.fraud_probabilities(features)
        estimator = self._estimator
        return estimator.predict_proba(features)[:, _fraud_column(estimator)]

    def score(self, transaction: Transaction) -> dict[str, Any]:
        """Score one transaction. ``score_many`` describes the result."""
        return self.score_many([transaction])[0]

    def score_many(self, transactions: Sequence[Transaction]) -> list[dict[str, Any]]:
        """Score a batch of transactions with one ``predict_proba`` call.

        Returns:
            One dict per transaction, in input order, with the keys
            ``transaction_id`` (str or None), ``fraud_probability`` (float),
            ``is_fraud`` (True when the probability is at least the threshold)
            and ``model_version``. The probability is the estimator's output for
            class 1, which is not calibrated if training used class weights.
        """
        if not transactions:
            return []

        rows = [self._read_features(transaction) for transaction in transactions]
        features = np.array(rows, dtype=np.float64).reshape(
            len(transactions), len(self._feature_names)
        )
        probabilities = self.fraud_probabilities(features).tolist()

        return [
            {
                "transaction_id": transaction.transaction_id,
                "fraud_probability": probability,
                "is_fraud": probability >= self._threshold,
                "model_version": self._version,
            }
            for transaction, probability in zip(
                transactions, probabilities, strict=True
            )
        ]


def _fraud_column(estimator: Any) -> int:
    """Return the predict_proba column of class 1, or raise ValueError."""
    classes = [int(label) for label in estimator.classes_]
    if 1 not in classes:
        raise ValueError(f"the estimator has no fraud class 1, only {classes}")
    return classes.index(1)


#: Up to this many rows, the logistic function runs per row in Python.
_PYTHON_ROWS = 16


class _ScaledLogistic:
    """A fitted StandardScaler + binary LogisticRegression, as plain arrays."""

    def __init__(
        self, weights: np.ndarray, bias: float, *, fraud_is_positive: bool
    ) -> None:
        self._weights = np.asarray(weights, dtype=np.float64)
        self._bias = float(bias)
        self._fraud_is_positive = bool(fraud_is_positive)

    def arrays(self) -> dict[str, Any]:
        """Return the parameters for a model file; ``from_arrays`` reads them."""
        return {
            "weights": self._weights,
            "bias": self._bias,
            "fraud_is_positive": self._fraud_is_positive,
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> _ScaledLogistic:
        """Return the model whose parameters ``arrays`` wrote."""
        return cls(
            arrays["weights"],
            arrays["bias"],
            fraud_is_positive=arrays["fraud_is_positive"],
        )

    @classmethod
    def from_estimator(cls, estimator: Any) -> _ScaledLogistic | None:
        """Return the arrays of a scaler + logistic regression pipeline, else None."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        if not isinstance(estimator, Pipeline) or len(estimator.steps) != 2:
            return None
        scaler, classifier = (step for _, step in estimator.steps)
        if not (
            type(scaler) is StandardScaler
            and type(classifier) is LogisticRegression
            and len(classifier.classes_) == 2
        ):
            return None
        width = classifier.coef_.shape[1]
        mean = scaler.mean_ if scaler.with_mean else np.zeros(width)
        scale = scaler.scale_ if scaler.with_std else np.ones(width)
        # Scaling folded into the weights: ((x - mean) / scale) . w + b
        # equals x . (w / scale) + (b - mean . (w / scale)).
        weights = np.asarray(classifier.coef_[0], dtype=np.float64) / np.asarray(
            scale, dtype=np.float64
        )
        bias = float(classifier.intercept_[0]) - float(
            np.asarray(mean, dtype=np.float64) @ weights
        )
        return cls(weights, bias, fraud_is_positive=int(classifier.classes_[1]) == 1)

    def fraud_probabilities(self, features: np.ndarray) -> np.ndarray:
        """Return the probability of class 1 for each row.

        A row whose values are so large that their weighted sum overflows gets
        0 or 1, or NaN when the overflow has both signs, without a numpy warning
        on stderr.
        """
        with np.errstate(over="ignore", invalid="ignore"):
            decisions = features @ self._weights + self._bias
        if not self._fraud_is_positive:
            decisions = -decisions
        if len(decisions) <= _PYTHON_ROWS:
            # For a few rows, each numpy call costs more than the arithmetic.
            return np.array([_logistic(decision) for decision in decisions.tolist()])
        exponent = np.exp(-np.abs(decisions))
        return np.where(
            decisions >= 0, 1.0 / (1.0 + exponent), exponent / (1.0 + exponent)
        )


def _logistic(decision: float) -> float:
    """Return 1 / (1 + e^-decision), without overflow for large |decision|."""
    if decision >= 0:
        return 1.0 / (1.0 + math.exp(-decision))
    exponent = math.exp(decision)
    return exponent / (1.0 + exponent)
