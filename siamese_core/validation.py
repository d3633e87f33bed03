"""Dataset validation: every problem of a train/test folder pair, named by path.

Errors make a dataset unusable (the pipeline stops); warnings are reported and
training goes on. Images are opened with Pillow and fully decoded, except those
whose header already exceeds the pixel limit: those are refused without decoding.
"""

from __future__ import annotations

import hashlib
import os
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

from .data import UNKNOWN, ImageFolder, max_image_pixels, scan_folder
from .errors import DatasetError

# Warning limits: class sizes further apart than this ratio; images with a side under MIN_SIDE pixels.
IMBALANCE_RATIO = 10.0
MIN_SIDE = 16

Level = Literal["error", "warning"]  # an error makes the dataset unusable; a warning is reported and passed


@dataclass
class Finding:
    """One problem: its level, a stable code, a message and the paths it concerns."""

    level: Level
    code: str
    message: str
    paths: list[str] = field(default_factory=list)


@dataclass
class ImageInfo:
    """What one image file turned out to be."""

    path: str
    size: tuple[int, int] | None = None
    format: str | None = None
    mode: str | None = None
    sha256: str | None = None
    problem: str | None = None
    kind: str | None = None  # the finding code of the problem: corrupt, empty or refused


@dataclass
class ValidationReport:
    """Findings and a summary of a dataset; ``ok`` when there is no error."""

    train_dir: str
    test_dir: str
    findings: list[Finding] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {"ok": self.ok, "train_dir": self.train_dir, "test_dir": self.test_dir,
                "summary": self.summary, "findings": [asdict(f) for f in self.findings]}

    def text(self, max_paths: int = 5) -> str:
        """A readable summary: counts, then each finding with up to ``max_paths`` paths."""
        lines = [f"dataset {self.train_dir}{f' / {self.test_dir}' if self.test_dir else ''}: "
                 f"{'OK' if self.ok else 'FAILED'} ({len(self.errors)} errors, {len(self.warnings)} warnings)"]
        for split, info in self.summary.get("splits", {}).items():
            per_class = info["images_per_class"]
            lines.append(
                f"  {split}: {info['classes']} classes, {info['images']} images "
                f"(per class min {per_class['min']} / median {per_class['median']} / max {per_class['max']}); "
                f"sizes {info['width']['min']}-{info['width']['max']} x {info['height']['min']}-{info['height']['max']} px; "
                f"formats {info['formats']}; modes {info['modes']}"
            )
        for finding in self.findings:
            lines.append(f"  {finding.level.upper()} [{finding.code}] {finding.message}")
            lines.extend(f"      {p}" for p in finding.paths[:max_paths])
            if len(finding.paths) > max_paths:
                lines.append(f"      ... and {len(finding.paths) - max_paths} more")
        return "\n".join(lines)


def inspect_image(path: str, max_pixels: int) -> ImageInfo:
    """Open and fully decode one image; refuse one whose header exceeds ``max_pixels``."""
    info = ImageInfo(path)

    def problem(kind: str, text: str) -> ImageInfo:
        info.kind, info.problem = kind, text
        return info

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return problem("corrupt", f"unreadable file ({exc.strerror or exc})")
    if not data:
        return problem("empty", "empty file (0 bytes)")
    info.sha256 = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(path) as image:
            info.size, info.format, info.mode = image.size, image.format, image.mode
            if image.size[0] * image.size[1] > max_pixels:
                return problem("refused", f"refused: {image.size[0]}x{image.size[1]} pixels exceeds the limit of "
                                          f"{max_pixels} (SIAMESE_MAX_IMAGE_PIXELS)")
            image.load()
    except Image.DecompressionBombError as exc:
        return problem("refused", f"refused: {exc}")
    except (OSError, SyntaxError, ValueError) as exc:
        return problem("corrupt", f"not a readable image ({exc})")
    return info


def _stats(values: list[int]) -> dict:
    if not values:
        return {"min": 0, "median": 0, "max": 0}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _split_summary(folder: ImageFolder, infos: dict[str, ImageInfo]) -> dict:
    good = [infos[p] for p in folder.paths if infos[p].problem is None and infos[p].size is not None]
    return {
        "classes": len(folder.class_names),
        "images": len(folder.paths),
        "images_per_class": _stats(list(Counter(folder.labels.tolist()).values())),
        "width": _stats([i.size[0] for i in good if i.size]),
        "height": _stats([i.size[1] for i in good if i.size]),
        "formats": dict(Counter(i.format for i in good)),
        "modes": dict(Counter(i.mode for i in good)),
    }


def validate_dataset(
    train_dir: str | os.PathLike,
    test_dir: str | os.PathLike,
    open_set: bool = False,
    strict: bool = False,
    imbalance_ratio: float = IMBALANCE_RATIO,
    min_side: int = MIN_SIDE,
    max_pixels: int | None = None,
) -> ValidationReport:
    """Check a train/test folder pair and return every finding with a summary.

    Args:
        train_dir: the training folder, ``<dir>/<class>/<image>``.
        test_dir: the test folder of the same shape.
        open_set: allow test classes that are not in train (else an error).
        strict: the same image in train and test is an error (else a warning).
        imbalance_ratio: warn when the largest class is more than this many times the smallest.
        min_side: warn about images with a side under this many pixels.
        max_pixels: refuse images over this many pixels from the header; by default
            :func:`~siamese_core.data.max_image_pixels`, the limit every decode applies.

    Returns:
        A :class:`ValidationReport`: ``ok`` when no finding is an error; the findings by code,
        each with its paths; a summary per split.
    """
    return _validate(ValidationReport(str(train_dir), str(test_dir)), {"train": train_dir, "test": test_dir},
                     open_set, strict, imbalance_ratio, min_side, max_pixels)


def validate_folder(folder_dir: str | os.PathLike, min_side: int = MIN_SIDE,
                    max_pixels: int | None = None) -> ValidationReport:
    """Check one folder of class sub-folders that is enrolled or searched as a gallery, with the checks a
    training folder gets (names, unreadable or refused images, passed-over entries, duplicates) but no
    pairing and no minimum class size: a class of one image can be enrolled."""
    return _validate(ValidationReport(str(folder_dir), ""), {"gallery": folder_dir}, False, False,
                     IMBALANCE_RATIO, min_side, max_pixels)


def _validate(report: ValidationReport, roots: dict[str, str | os.PathLike], open_set: bool, strict: bool,
              imbalance_ratio: float, min_side: int, max_pixels: int | None) -> ValidationReport:
    """Fill ``report`` with the findings of the split folders ``roots`` (train and test are paired)."""
    add = report.findings.append
    folders = _scan_splits(roots, add)
    paths = [p for folder in folders.values() for p in folder.paths]
    limit = max_pixels or max_image_pixels()  # read once, not once per image
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        infos = {i.path: i for i in pool.map(lambda p: inspect_image(p, limit), paths)}
    _image_findings(infos, add)
    train, test = folders.get("train"), folders.get("test")
    if train is not None:
        _train_findings(train, infos, imbalance_ratio, add)
    for folder in folders.values():
        _duplicates(folder, infos, add)
    if train is not None and test is not None:
        _pair_findings(train, test, infos, open_set, strict, add)
    tiny = sorted(i.path for i in infos.values() if i.size and min(i.size) < min_side)
    if tiny:
        add(Finding("warning", "tiny", f"{len(tiny)} images are smaller than {min_side} px on a side", tiny))
    report.summary = {"splits": {split: _split_summary(folder, infos) for split, folder in folders.items()}}
    return report


Add = Callable[[Finding], None]


def _scan_splits(roots: dict[str, str | os.PathLike], add: Add) -> dict[str, ImageFolder]:
    """Scan each split's folder; what cannot be scanned, what was passed over and reserved names become findings."""
    folders: dict[str, ImageFolder] = {}
    for split, root in roots.items():
        try:
            folders[split] = scan_folder(root)
        except DatasetError as exc:
            add(Finding("error", "folder", f"{split} folder {exc}", [str(root)]))
        except OSError as exc:
            add(Finding("error", "folder", f"{split} folder {root}: unreadable ({exc.strerror or exc})", [str(root)]))
    for split, folder in folders.items():
        _skipped_findings(split, folder, add)
        if UNKNOWN in folder.class_names:
            add(Finding("error", "reserved_name", f"{split}: a class is named '{UNKNOWN}', the label given to images "
                        "of no known class; rename the folder", [str(Path(folder.root) / UNKNOWN)]))
    return folders


def _image_findings(infos: dict[str, ImageInfo], add: Add) -> None:
    """One error per kind of unusable image (corrupt, empty, refused), and one when none is usable."""
    by_kind: dict[str, list[str]] = defaultdict(list)
    for info in infos.values():
        if info.kind:
            by_kind[info.kind].append(f"{info.path}: {info.problem}")
    messages = {"corrupt": "corrupt, truncated or unreadable images", "empty": "zero-byte files",
                "refused": "images over the pixel limit (not decoded)"}
    for kind, entries in by_kind.items():
        add(Finding("error", kind, f"{len(entries)} {messages[kind]}; fix or remove them", sorted(entries)))
    if infos and all(info.problem for info in infos.values()):
        add(Finding("error", "no_images", "no readable image at all"))


def _train_findings(train: ImageFolder, infos: dict[str, ImageInfo], imbalance_ratio: float, add: Add) -> None:
    """Classes too small for a pair, too few classes, and imbalance."""
    counts = Counter(train.label_names)
    usable = Counter(label for path, label in zip(train.paths, train.label_names) if not infos[path].problem)
    single = sorted(name for name in train.class_names if usable[name] < 2)
    if single:
        add(Finding("error", "small_class", f"train: {len(single)} classes have fewer than 2 readable images "
                    f"(no anchor-positive pair): {', '.join(single[:10])}",
                    [str(Path(train.root) / n) for n in single]))
    if len(train.class_names) < 2:
        add(Finding("error", "few_classes", "train: triplets need at least 2 classes"))
    if counts and max(counts.values()) > imbalance_ratio * max(1, min(counts.values())):
        add(Finding("warning", "imbalance", f"train: class sizes range from {min(counts.values())} to "
                    f"{max(counts.values())} images (more than {imbalance_ratio:g}x)"))


def _pair_findings(train: ImageFolder, test: ImageFolder, infos: dict[str, ImageInfo], open_set: bool,
                   strict: bool, add: Add) -> None:
    """Test classes absent from train, train classes without tests, and the same image in both."""
    unknown = sorted(set(test.class_names) - set(train.class_names))
    if unknown and not open_set:
        add(Finding("error", "unknown_test_class", f"test: {len(unknown)} classes are not in train and cannot be "
                    f"predicted: {', '.join(unknown[:10])} (enable open-set evaluation to allow this)",
                    [str(Path(test.root) / n) for n in unknown]))
    untested = sorted(set(train.class_names) - set(test.class_names))
    if untested:
        add(Finding("warning", "untested_class", f"{len(untested)} train classes have no test images: "
                    f"{', '.join(untested[:10])}"))
    train_hashes = {infos[p].sha256: p for p in train.paths if infos[p].sha256}
    leaked = [f"{p} = {train_hashes[infos[p].sha256]}" for p in test.paths if infos[p].sha256 in train_hashes]
    if leaked:
        add(Finding("error" if strict else "warning", "leakage",
                    f"{len(leaked)} test images are also in train (leakage)", leaked))


# How each kind of entry scan_folder passed over is reported: level and message.
_SKIPPED_FINDINGS: dict[str, tuple[Level, str]] = {
    "bad_name": ("error", "names are not valid UTF-8 and cannot be recorded or logged; rename them"),
    "hidden": ("warning", "hidden folders (names starting with a dot) were skipped with their images"),
    "nested_folder": ("warning", "folders inside class folders were skipped (images must sit directly in the class folder)"),
    "loose_file": ("warning", "files outside any class folder were skipped"),
    "not_image": ("warning", "files are not images and were skipped"),
    "outside_link": ("warning", "links point outside the data folder and were not followed"),
    "broken_link": ("warning", "links are broken or loop back on themselves and were skipped"),
}


def _skipped_findings(split: str, folder: ImageFolder, add: Add) -> None:
    by_reason: dict[str, list[str]] = defaultdict(list)
    for path, reason in folder.skipped:
        by_reason[reason].append(path)
    for reason, paths in by_reason.items():
        level, message = _SKIPPED_FINDINGS[reason]
        add(Finding(level, reason, f"{split}: {len(paths)} {message}", paths))


def _duplicates(folder: ImageFolder, infos: dict[str, ImageInfo], add: Add) -> None:
    seen: dict[tuple[str, int], str] = {}
    dupes = []
    for path, label in zip(folder.paths, folder.labels.tolist()):
        digest = infos[path].sha256
        if digest is None:
            continue
        if (digest, label) in seen:
            dupes.append(f"{path} = {seen[(digest, label)]}")
        else:
            seen[(digest, label)] = path
    if dupes:
        add(Finding("warning", "duplicate", f"{folder.root}: {len(dupes)} exact duplicate images inside a class", dupes))
