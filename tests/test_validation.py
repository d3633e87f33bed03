"""The validation report on a deliberately messy dataset: every problem named by path."""

import os

from PIL import Image

from siamese_core.validation import validate_dataset

from support.messy import make_messy_dataset, noise, write


def _codes(report, level):
    return {f.code for f in report.findings if f.level == level}


def _paths(report, code):
    return " ".join(p for f in report.findings if f.code == code for p in f.paths)


def test_messy_dataset_reports_every_problem(tmp_path):
    paths = make_messy_dataset(tmp_path)
    report = validate_dataset(tmp_path / "train", tmp_path / "test")
    assert not report.ok
    assert _codes(report, "error") == {"corrupt", "empty", "refused", "small_class", "unknown_test_class"}
    assert _codes(report, "warning") == {"not_image", "outside_link", "duplicate", "leakage", "tiny", "untested_class"}
    corrupt = _paths(report, "corrupt")
    assert str(paths["truncated"]) in corrupt and str(paths["text"]) in corrupt
    assert str(paths["empty"]) in _paths(report, "empty")
    assert str(paths["bomb"]) in _paths(report, "refused") and "900000000 pixels" in _paths(report, "refused")
    assert str(paths["readme"]) in _paths(report, "not_image")
    assert str(paths["link"]) in _paths(report, "outside_link")
    assert str(paths["leak"]) in _paths(report, "leakage")
    assert "lonely" in _paths(report, "small_class") and "stranger" in _paths(report, "unknown_test_class")
    for good in ("rgba", "palette", "deep", "cmyk", "rotated"):
        assert str(paths[good]) not in corrupt + _paths(report, "refused")
    summary = report.summary["splits"]["train"]
    assert summary["classes"] == 3 and summary["images_per_class"]["max"] == 6
    assert {"PNG", "JPEG"} <= set(summary["formats"]) and {"RGBA", "P", "CMYK"} <= set(summary["modes"])
    text = report.text()
    assert "FAILED" in text and "ERROR [refused]" in text and "WARNING [leakage]" in text


def test_open_set_and_strict_change_the_levels(tmp_path):
    make_messy_dataset(tmp_path)
    relaxed = validate_dataset(tmp_path / "train", tmp_path / "test", open_set=True)
    assert "unknown_test_class" not in _codes(relaxed, "error")
    strict = validate_dataset(tmp_path / "train", tmp_path / "test", strict=True)
    assert "leakage" in _codes(strict, "error")


def test_a_clean_dataset_passes(tmp_path):
    for split, n in (("train", 3), ("test", 1)):
        for c in ("a", "b"):
            for i in range(n):
                write(tmp_path / split / c / f"{i}.png", noise(hash((split, c, i)) % 1000, size=32))
    report = validate_dataset(tmp_path / "train", tmp_path / "test")
    assert report.ok and report.findings == []


def test_missing_and_flat_folders_are_errors(tmp_path):
    write(tmp_path / "flat" / "x.png", Image.new("RGB", (32, 32)))
    report = validate_dataset(tmp_path / "nowhere", tmp_path / "flat")
    messages = " ".join(f.message for f in report.errors)
    assert "nowhere: folder does not exist" in messages and "no class sub-folders" in messages


def test_names_that_break_things_each_get_a_named_finding(tmp_path):
    train, test = tmp_path / "train", tmp_path / "test"
    for name in ("a", "b", "unknown", ".hidden class"):
        for i in range(2):
            write(train / name / f"{i}.png", noise(hash((name, i)) % 1000))
        write(test / "a" / f"{name}.png", noise(hash(name) % 1000 + 1000))
    bad = os.fsdecode(b"caf\xe9")  # Latin-1 bytes: not valid UTF-8
    for i in range(1):  # a single image too: the class would also be too small
        write(train / bad / f"{i}.png", noise(20 + i))
    (train / "a" / "loop").symlink_to(train / "a" / "loop")
    (train / "b" / "to parent").symlink_to(train)
    write(train / "b" / "deeper" / "x.png", noise(30))

    report = validate_dataset(train, test)
    codes = {f.code: f for f in report.findings}
    assert codes["bad_name"].level == "error" and codes["bad_name"].paths == [str(train) + "/caf\\xe9"]
    assert codes["reserved_name"].level == "error" and codes["reserved_name"].paths == [str(train / "unknown")]
    assert codes["hidden"].level == "warning" and codes["hidden"].paths == [str(train / ".hidden class")]
    assert codes["broken_link"].paths == [str(train / "a" / "loop")]
    assert sorted(codes["nested_folder"].paths) == [str(train / "b" / "deeper"), str(train / "b" / "to parent")]
    text = report.text(max_paths=20)
    text.encode("utf-8")  # printable: no lone surrogates from the undecodable name
    assert "caf\\xe9" in text and "[reserved_name]" in text
