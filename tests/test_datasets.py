"""Readers of evaluation sets: JSONL/CSV manifests, Karpathy-split JSON, caption folders, class folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from retrieval import shapes
from retrieval.datasets import (
    read_caption_folder,
    read_captioned,
    read_class_folders,
    read_karpathy,
    read_manifest,
)
from retrieval.errors import DatasetError


def _image(path, colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)
    return path


def test_jsonl_manifest_groups_captions_of_the_same_image(tmp_path):
    lines = [
        {"image": "a.png", "caption": "a red square"},
        {"image": "b.png", "caption": "a blue  disc"},
        {"image": "a.png", "caption": "crimson block"},
    ]
    manifest = tmp_path / "set.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    data = read_manifest(manifest)
    assert data.images == [tmp_path / "a.png", tmp_path / "b.png"]
    assert data.captions == ["a red square", "a blue disc", "crimson block"]  # whitespace collapsed
    assert data.caption_image.tolist() == [0, 1, 0]
    assert data.image_captions().tolist() == [[True, False, True], [False, True, False]]
    limited = data.limit(1)
    assert limited.images == [tmp_path / "a.png"]
    assert limited.captions == ["a red square", "crimson block"]
    assert limited.caption_image.tolist() == [0, 0]
    assert data.limit(None) is data


def test_csv_manifest(tmp_path):
    manifest = tmp_path / "set.csv"
    manifest.write_text('image,caption\nx/a.jpg,"a cat, sleeping"\nx/b.jpg,a dog\n', encoding="utf-8")
    data = read_captioned(manifest)
    assert data.images == [tmp_path / "x/a.jpg", tmp_path / "x/b.jpg"]
    assert data.captions == ["a cat, sleeping", "a dog"]


def test_bad_manifest_lines_name_the_file_and_line(tmp_path):
    manifest = tmp_path / "set.jsonl"
    manifest.write_text('{"image": "a.png", "caption": "x"}\n{"image": "b.png"}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"set\.jsonl:2: .*caption"):
        read_manifest(manifest)
    manifest.write_text('{"image": "a.png", "caption": "   "}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match="no captioned images"):
        read_manifest(manifest)
    (tmp_path / "bad.csv").write_text("path,text\na,b\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="'image' and 'caption'"):
        read_manifest(tmp_path / "bad.csv")


def test_a_generated_shapes_manifest_reads_as_a_captioned_set(tmp_path):
    samples = shapes.generate(tmp_path / "gal", 6, seed=3, image_size=32)
    data = read_captioned(tmp_path / "gal" / "manifest.jsonl")
    assert [p.resolve() for p in data.images] == [s.path.resolve() for s in samples]
    assert data.captions == [" ".join(s.caption.split()) for s in samples]
    assert data.caption_image.tolist() == list(range(6))


def _karpathy(tmp_path, with_filepath):
    entries = []
    for i, split in enumerate(["train", "test", "test", "val"]):
        entry = {
            "filename": f"{i}.jpg",
            "split": split,
            "sentences": [{"raw": f"caption {i}.{j}", "tokens": []} for j in range(3)],
        }
        if with_filepath:
            entry["filepath"] = "val2014"
        entries.append(entry)
        _image(tmp_path / "images" / ("val2014" if with_filepath else "") / f"{i}.jpg")
    path = tmp_path / "dataset_x.json"
    path.write_text(json.dumps({"images": entries, "dataset": "x"}), encoding="utf-8")
    return path


@pytest.mark.parametrize("with_filepath", [False, True], ids=["flickr", "coco"])
def test_karpathy_json_reads_one_split(tmp_path, with_filepath):
    path = _karpathy(tmp_path, with_filepath)
    data = read_captioned(path)  # default: the test split, images in ./images beside the JSON
    sub = "val2014/" if with_filepath else ""
    assert data.images == [tmp_path / f"images/{sub}1.jpg", tmp_path / f"images/{sub}2.jpg"]
    assert data.captions == [f"caption {i}.{j}" for i in (1, 2) for j in range(3)]
    assert data.caption_image.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(read_karpathy(path, tmp_path / "images", split="val").images) == 1


def test_karpathy_errors_say_what_to_fix(tmp_path):
    path = _karpathy(tmp_path, with_filepath=False)
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        read_karpathy(path, split="dev")
    with pytest.raises(DatasetError, match="are not under"):
        read_karpathy(path, tmp_path / "elsewhere")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"annotations": []}), encoding="utf-8")
    with pytest.raises(DatasetError, match="not a Karpathy-split JSON"):
        read_karpathy(other)
    with pytest.raises(DatasetError, match="no such file or folder"):
        read_captioned(tmp_path / "missing.jsonl")


def test_caption_folder_reads_one_caption_per_line(tmp_path):
    _image(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("a red square\n\nsecond caption\n", encoding="utf-8")
    _image(tmp_path / "sub" / "b.PNG")
    (tmp_path / "sub" / "b.txt").write_text("a blue disc", encoding="utf-8")
    _image(tmp_path / "c.jpg")  # no caption: skipped
    data = read_caption_folder(tmp_path)
    assert data.images == [tmp_path / "a.jpg", tmp_path / "sub" / "b.PNG"]
    assert data.captions == ["a red square", "second caption", "a blue disc"]
    assert data.caption_image.tolist() == [0, 0, 1]
    assert read_captioned(tmp_path).captions == data.captions


def test_class_folders(tmp_path):
    for name, n in (("cat", 3), ("dog", 2), ("golden_retriever", 1)):
        for i in range(n):
            _image(tmp_path / name / f"{i}.jpg")
    (tmp_path / "empty").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("not an image", encoding="utf-8")
    data = read_class_folders(tmp_path)
    assert data.classes == ["cat", "dog", "golden retriever"]
    assert data.targets.tolist() == [0, 0, 0, 1, 1, 2]
    assert all(p.suffix == ".jpg" for p in data.images)
    assert read_class_folders(tmp_path, per_class=1).targets.tolist() == [0, 1, 2]


def test_class_names_file_maps_folders(tmp_path):
    for wnid in ("n02", "n01"):
        _image(tmp_path / "val" / wnid / "x.JPEG")
    tsv = tmp_path / "names.tsv"
    tsv.write_text("n01\ttench\nn02\tgoldfish\nn03\tshark\n", encoding="utf-8")
    assert read_class_folders(tmp_path / "val", tsv).classes == ["tench", "goldfish"]
    ordered = tmp_path / "names.txt"
    ordered.write_text("tench\ngoldfish\n", encoding="utf-8")
    data = read_class_folders(tmp_path / "val", ordered)
    assert data.classes == ["tench", "goldfish"]
    assert np.array_equal(data.targets, [0, 1])
    ordered.write_text("tench\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="1 names for 2 class folders"):
        read_class_folders(tmp_path / "val", ordered)
    tsv.write_text("n01\ttench\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"no class for folder\(s\) \['n02'\]"):
        read_class_folders(tmp_path / "val", tsv)


def test_class_folders_without_images_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(DatasetError, match="no class folders with images"):
        read_class_folders(tmp_path)
    with pytest.raises(DatasetError, match="not a folder"):
        read_class_folders(tmp_path / "nope")
