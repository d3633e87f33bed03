"""Searching for an erased class, independently of the code that erases it: a file or object "yields" the class when
its sha256 is one of the images', it holds one of their sha256 as text (UTF-8 or UTF-32), it names the class as a
whole word (UTF-8, JSON-escaped or UTF-32), or a folder on its path is named after it; a Parquet file is read as its
rows; a database row yields it when any of its values does."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import sqlalchemy as sa
from dvc.repo import Repo
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput


class Search:
    """The erased class ``name`` (or None) and the sha256 of its images."""

    def __init__(self, name: str | None, digests: set[str]):
        self.name, self.digests = name, digests
        texts = [] if name is None else [name, json.dumps(name)[1:-1]]
        words = [re.escape(t.encode()) for t in texts] + [re.escape(d.encode()) for d in digests]
        self.words = re.compile(rb"(?<![\w])(?:" + b"|".join(words) + rb")(?![\w])") if words else None
        self.wide = [t.encode("utf-32-le") for t in [*texts[:1], *digests]]

    def yields(self, data: bytes, path: str = "") -> bool:
        if self.name is not None and self.name in Path(path).parts:
            return True
        if path.endswith(".parquet"):
            data = json.dumps(pq.read_table(io.BytesIO(data)).to_pylist(), default=str, ensure_ascii=False).encode()
        return (hashlib.sha256(data).hexdigest() in self.digests or any(w in data for w in self.wide)
                or bool(self.words and self.words.search(data)))

    def files(self, root: Path, skip: str | None = None) -> int:
        """Files under ``root`` (a folder or one file) that yield the class; paths holding ``skip`` left out."""
        paths = [root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []
        return sum(self.yields(p.read_bytes(), str(p.relative_to(root.parent))) for p in paths
                   if p.is_file() and not (skip and skip in str(p)))

    def objects(self, s3, bucket: str, prefix: str, skip: str | None = None) -> int:
        """S3 objects under ``prefix`` that yield the class; keys holding ``skip`` left out."""
        found = 0
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if not (skip and skip in item["Key"]):
                    found += self.yields(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read(), item["Key"])
        return found

    def dvc_state(self, root: Path) -> int:
        """Files of DVC's state caches for the repository at ``root`` (its site cache, ``.dvc/tmp``) that yield it."""
        with Repo(str(root)) as repo:
            return self.files(Path(repo.site_cache_dir)) + self.files(root / ".dvc" / "tmp")

    def rows(self, database: str) -> dict[str, int]:
        """Rows per table of a database (every table, every column) that yield the class."""
        engine = sa.create_engine(database)
        found: dict[str, int] = {}
        try:
            tables = sa.MetaData()
            tables.reflect(engine)
            with engine.connect() as connection:
                for name, table in tables.tables.items():
                    for row in connection.execute(sa.select(table)):
                        text = json.dumps([str(value) for value in row], ensure_ascii=False).encode()
                        if self.yields(text):
                            found[name] = found.get(name, 0) + 1
        finally:
            engine.dispose()
        return found


def log_old_dataset_input(run_id: str, classes: dict[str, int]) -> None:
    """A data folder's dataset input as versions before this one logged it: its profile named every class."""
    profile = {"classes": len(classes), "images": sum(classes.values()), "per_class": classes}
    MlflowClient().log_inputs(run_id, datasets=[DatasetInput(Dataset(
        name="data-train-before", digest="0123456789abcdef", source_type="local",
        source=json.dumps({"path": "data/train"}), profile=json.dumps(profile)))])
