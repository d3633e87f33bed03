"""The registered MLflow model: a pyfunc wrapper around a model bundle that takes base64 images.

A request carries the image bytes themselves, base64-encoded in a string column
``image``; the server never opens a path named in a request.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from siamese_core.errors import ImageError

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema([ColSpec("string", "label"), ColSpec("double", "distance"), ColSpec("string", "top_k")]),
)

# Largest accepted image, in bytes after base64 decoding ($SIAMESE_MAX_IMAGE_BYTES overrides it).
DEFAULT_MAX_IMAGE_BYTES = 10 * 1024 * 1024

# What the model needs at serving time; pinned to the versions installed when it is logged.
RUNTIME_PACKAGES = ("mlflow", "tensorflow-cpu", "keras", "numpy", "pillow", "pandas", "pydantic", "pyyaml")


def encode_image(source: str | os.PathLike | bytes) -> str:
    """Base64 text of an image file (read on the client) or of encoded image bytes."""
    data = bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    return base64.b64encode(data).decode("ascii")


def input_example() -> pd.DataFrame:
    """One small grey PNG, base64-encoded: the example request logged with the model."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buffer, format="PNG")
    return pd.DataFrame({"image": [encode_image(buffer.getvalue())]})


def pip_requirements() -> list[str]:
    """The runtime packages, pinned to the installed versions (skipping any not installed)."""
    pins = []
    for package in RUNTIME_PACKAGES:
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins


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
    limit = int(os.environ.get("SIAMESE_MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES))
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


class SiameseBundleModel(mlflow.pyfunc.PythonModel):
    """Recognises base64-encoded images with the model bundle logged as the artifact ``bundle``."""

    def load_context(self, context) -> None:
        """Load the recogniser from the bundle folder."""
        from siamese_core.recognizer import SiameseRecognizer

        self.recognizer = SiameseRecognizer.load(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        """One row per image: the nearest class, its squared distance, and the top-k classes as JSON."""
        from siamese_core.data import decode_image

        arrays = []
        for row, data in enumerate(decode_base64_images(model_input)):
            try:
                arrays.append(decode_image(data, self.recognizer.input_size))
            except ImageError as exc:
                raise ImageError(f"row {row}: 'image' does not hold a readable image ({exc})") from None
        matches = self.recognizer.predict(arrays) if arrays else []
        return pd.DataFrame(
            {
                "label": pd.Series([m.label for m in matches], dtype=object),
                "distance": pd.Series([m.distance for m in matches], dtype="float64"),
                "top_k": pd.Series(
                    [json.dumps([{"label": label, "distance": d} for label, d in m.top_k]) for m in matches],
                    dtype=object,
                ),
            }
        )
