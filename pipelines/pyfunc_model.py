"""The registered MLflow model: a pyfunc wrapper around a model bundle that takes base64 images.

A request carries the image bytes themselves, base64-encoded in a string column
``image``; the server never opens a path named in a request. Every request is bounded:
bytes per image, pixels per image (checked from the header, before decoding), rows per
request, pixels decoded at once across the requests of the process (they wait their turn),
and the server's time limit, at which the work stops.
A bad request gets HTTP 400 with one line saying what is wrong, and no stack trace.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import Array, Object, Property
from PIL import Image

from siamese_core.data import PixelBudget, decode_image, max_image_pixels
from siamese_core.errors import USER_ERRORS, ImageError

from .imports import requirements
from .inference_log import judged

log = logging.getLogger(__name__)

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema([ColSpec("string", "label"), ColSpec("double", "distance"),
                    ColSpec(Array(Object([Property("label", "string"), Property("distance", "double")])), "top_k"),
                    ColSpec("double", "unknown_score", required=False)]),
)

# Largest accepted image, in bytes after base64 decoding ($SIAMESE_MAX_IMAGE_BYTES overrides it).
DEFAULT_MAX_IMAGE_BYTES = 10 * 1024 * 1024
# Most images in one request ($SIAMESE_MAX_REQUEST_ROWS overrides it); send more as several requests.
DEFAULT_MAX_REQUEST_ROWS = 64
# The time limit `mlflow models serve` sets for its workers; a request stops its work when it passes.
SERVER_TIMEOUT_VARIABLE = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"


class _OneLineError(MlflowException):
    """An error the scoring server sends as it is: its one-line message and no stack trace."""

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:  # what the server calls is private: see tests/test_private_apis.py
        # The scoring server rewrites the message of an MlflowException raised by a model as
        # "Failed to predict data '<the request>'. Error: <message>"; the first, one-line message is kept.
        if not hasattr(self, "_message"):
            self._message = value


class RequestError(_OneLineError):
    """A request the model cannot answer as sent: HTTP 400."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class ServerError(_OneLineError):
    """The model failed on a request it should have answered: HTTP 500; the traceback goes to the server log."""

    def __init__(self):
        super().__init__("the recogniser failed on this request; the server log has the details",
                         error_code=INTERNAL_ERROR)


def _limit(variable: str, default: int) -> int:
    value = os.environ.get(variable, "")
    try:
        return int(value) if value else default
    except ValueError:
        log.error("%s=%r is not a whole number", variable, value)
        raise ServerError() from None


def max_request_rows() -> int:
    """The most images in one request: ``$SIAMESE_MAX_REQUEST_ROWS`` or the default."""
    return _limit("SIAMESE_MAX_REQUEST_ROWS", DEFAULT_MAX_REQUEST_ROWS)


def encode_image(source: str | os.PathLike | bytes) -> str:
    """Base64 text of an image file (read on the client) or of encoded image bytes."""
    data = bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    return base64.b64encode(data).decode("ascii")


def input_example() -> pd.DataFrame:
    """One small grey PNG, base64-encoded: the example request logged with the model."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buffer, format="PNG")
    return pd.DataFrame({"image": [encode_image(buffer.getvalue())]})


def pip_requirements() -> list[str]:
    """What the served model needs: the packages its code imports (followed through siamese_core),
    pinned to the versions installed when it is logged."""
    return requirements("pipelines.served_model")


def decode_base64_images(model_input) -> list[bytes]:
    """The image bytes of every row of a DataFrame with an ``image`` column, or of a list of strings.

    Raises ImageError (a ValueError) naming the first row that is not a base64 string.
    """
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise ImageError(
                f"the input needs a column 'image' of base64-encoded images, got {list(model_input.columns)}"
            )
        values = model_input["image"].tolist()
    elif isinstance(model_input, (list, tuple, pd.Series)):
        values = list(model_input)
    else:
        raise ImageError(
            f"expected a DataFrame with an 'image' column or a list of base64 strings, got {type(model_input).__name__}"
        )
    limit = _limit("SIAMESE_MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES)
    max_rows = max_request_rows()
    if len(values) > max_rows:
        raise ImageError(f"{len(values)} images in one request, over the limit of {max_rows}; "
                         "send them in several requests")
    images = []
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise ImageError(f"row {row}: 'image' must be a base64 string, got {type(value).__name__}")
        if len(value) * 3 // 4 > limit:
            raise ImageError(f"row {row}: image of about {len(value) * 3 // 4} bytes is over the {limit}-byte limit")
        try:
            images.append(base64.b64decode("".join(value.split()), validate=True))
        except (binascii.Error, ValueError):
            raise ImageError(
                f"row {row}: 'image' is not valid base64; send the image bytes base64-encoded, not a path or URL"
            ) from None
    return images


class DeadlinePassed(RequestError):
    """A request's time ran out before its images were decoded: ``mlflow models serve`` answers it 400 as it always
    has, ``siamese serve`` 503 with Retry-After (the server was too busy, not the request wrong)."""


@dataclass(frozen=True)
class Asked:
    """One request of a batch: its image bytes and decoded arrays, its id, when it arrived (``time.monotonic()``),
    for a shadow answer the labels the client got (each image's agreement is logged), and whether it is logged (a
    canary's comparison with the champion is not: no client got it)."""

    images: list[bytes]
    arrays: list[np.ndarray]
    request_id: str | None
    arrived: float
    client_labels: list[str] | None = None
    recorded: bool = True


class SiameseBundleModel(PythonModel):
    """Recognises base64-encoded images with the model bundle logged as the artifact ``bundle``."""

    def load_context(self, context) -> None:
        """Load the recogniser from the bundle folder."""
        from siamese_core.recognizer import SiameseRecognizer  # TensorFlow: only where a version is loaded

        self.recognizer = SiameseRecognizer.load(context.artifacts["bundle"])
        self.inference_log = None
        # Pixels decoded at once across all requests of the process: by default one image at the per-image limit.
        self.decoding = PixelBudget(_limit("SIAMESE_MAX_DECODING_PIXELS", max_image_pixels()))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """One row per image: the nearest class (``unknown`` when rejected), its squared distance, the top-k
        classes as JSON, and, when the bundle rejects unknown classes, the unknown score."""
        started = time.monotonic()
        timeout = os.environ.get(SERVER_TIMEOUT_VARIABLE)
        images, arrays = self.decode(model_input, time.monotonic() + float(timeout) if timeout else None)
        answer = self.answer([Asked(images, arrays, None, started)])[0]
        if isinstance(answer, Exception):
            raise answer
        return answer_frame(answer)

    def decode(self, model_input, deadline: float | None = None) -> tuple[list[bytes], list[np.ndarray]]:
        """The image bytes of a request and their decoded arrays, within the pixel budget and by ``deadline`` (a
        ``time.monotonic()``; past it, DeadlinePassed); a bad request is a RequestError naming its row."""
        try:
            encoded = decode_base64_images(model_input)
            arrays = []
            for row, data in enumerate(encoded):
                if deadline is not None and time.monotonic() > deadline:
                    raise DeadlinePassed(f"stopped at image {row} of {len(encoded)}: the request ran past its time "
                                         f"limit ({SERVER_TIMEOUT_VARIABLE}, or siamese serve's serving.deadline_ms)")
                try:
                    arrays.append(decode_image(data, self.recognizer.input_size, budget=self.decoding))
                except ImageError as exc:
                    raise ImageError(f"row {row}: {str(exc).removeprefix('<bytes>: ')}") from None
        except USER_ERRORS as exc:
            raise RequestError(str(exc)) from None
        return encoded, arrays

    def answer(self, batch: list[Asked]) -> list[list | ServerError]:
        """Each request's matches, all recognised in one forward pass and each logged when a log is attached (with
        its request id, its latency from arrival and, for a shadow answer, its agreement); a failing forward pass
        is a ServerError for every request, its traceback in the log."""
        arrays = [array for asked in batch for array in asked.arrays]
        try:
            queries = self.recognizer.embed(arrays) if arrays else np.zeros((0, 0), np.float32)
            matches = self.recognizer.match(queries) if arrays else []
        except Exception:
            log.exception("prediction failed")
            failed = ServerError()
            return [failed] * len(batch)
        answers: list[list | ServerError] = []
        start = 0
        for asked in batch:
            end = start + len(asked.arrays)
            answers.append(matches[start:end])
            self._record(asked, matches[start:end], queries[start:end])
            start = end
        return answers

    def _record(self, asked: Asked, matches: list, queries: np.ndarray) -> None:
        """Log the answers of one request when a log is attached."""
        if self.inference_log is not None and asked.recorded:
            agreement = (None if asked.client_labels is None else
                         [m.label == label for m, label in zip(matches, asked.client_labels)])
            self.inference_log.submit(asked.images, matches, judged(self.recognizer, queries, matches), queries,
                                      1000 * (time.monotonic() - asked.arrived), asked.request_id, agreement)

    def log_to(self, inference_log) -> None:
        """Write a record of every answer to ``inference_log`` (a :class:`pipelines.inference_log.InferenceLog`)."""
        self.inference_log = inference_log


def answer_records(matches: list) -> list[dict]:
    """The served answers as JSON-ready rows, as ``answer_frame(matches).to_dict(orient="records")`` gives them,
    without building the frame (the server's path: a frame costs more than the search)."""
    scored = any(m.unknown_score is not None for m in matches)
    return [{"label": m.label, "distance": float(m.distance),
             "top_k": [{"label": label, "distance": float(d)} for label, d in m.top_k],
             **({"unknown_score": None if m.unknown_score is None else float(m.unknown_score)} if scored else {})}
            for m in matches]


def answer_frame(matches: list) -> pd.DataFrame:
    """The served answer of each match, one row per image."""
    answers = pd.DataFrame(
        {
            "label": pd.Series([m.label for m in matches], dtype=object),
            "distance": pd.Series([m.distance for m in matches], dtype="float64"),
            "top_k": pd.Series(
                [[{"label": label, "distance": float(d)} for label, d in m.top_k] for m in matches], dtype=object),
        }
    )
    if any(m.unknown_score is not None for m in matches):
        answers["unknown_score"] = pd.Series([m.unknown_score for m in matches], dtype="float64")
    return answers
