"""Expanding annotation inputs: folders, globs, path lists and COCO image lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cvserve.annotation.inputs import InputError, collect_images


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for rel in ("a/1.jpg", "a/2.PNG", "a/deep/3.jpeg", "b/4.png", "a/notes.txt", "a/.hidden/5.jpg"):
        _touch(tmp_path / rel)
    return tmp_path


def test_folder_is_searched_recursively_in_sorted_order_skipping_non_images(tree: Path) -> None:
    image_set = collect_images([str(tree / "a")])
    assert [e.rel for e in image_set.images] == ["1.jpg", "2.PNG", "deep/3.jpeg"]
    assert [e.image_id for e in image_set.images] == [1, 2, 3]
    assert image_set.root == str(tree / "a")
    assert image_set.coco_categories is None


def test_globs_and_duplicates_keep_first_occurrence_and_ids_follow_input_order(tree: Path) -> None:
    image_set = collect_images(
        [str(tree / "b" / "*.png"), str(tree / "a" / "**" / "*.jp*g"), str(tree / "b")]
    )
    assert [e.rel for e in image_set.images] == ["b/4.png", "a/1.jpg", "a/deep/3.jpeg"]
    assert [e.image_id for e in image_set.images] == [1, 2, 3]


def test_text_file_lists_paths_relative_to_itself_with_comments(tree: Path) -> None:
    listing = tree / "list.txt"
    listing.write_text(f"# images\na/1.jpg\n\n{tree / 'b' / '4.png'}\nmissing.jpg\n")
    paths = [e.path for e in collect_images([str(listing)]).images]
    # A listed file that does not exist is kept: reading it fails later and is reported per image.
    assert paths == [str(tree / "a/1.jpg"), str(tree / "b/4.png"), str(tree / "missing.jpg")]


def test_ids_are_stable_across_calls(tree: Path) -> None:
    first = collect_images([str(tree)])
    assert first == collect_images([str(tree)])


def test_coco_json_gives_ids_file_names_and_categories(tree: Path) -> None:
    coco = {
        "images": [{"id": 42, "file_name": "deep/3.jpeg"}, {"id": 7, "file_name": "1.jpg"}],
        "categories": [{"id": 3, "name": "red"}],
    }
    ann = tree / "ann.json"
    ann.write_text(json.dumps(coco))
    image_set = collect_images([str(ann)], image_root=str(tree / "a"))
    assert [(e.image_id, e.rel, e.path) for e in image_set.images] == [
        (42, "deep/3.jpeg", str(tree / "a/deep/3.jpeg")),
        (7, "1.jpg", str(tree / "a/1.jpg")),
    ]
    assert image_set.coco_categories == ({"id": 3, "name": "red"},)


@pytest.mark.parametrize(
    ("coco", "message"),
    [
        ({"annotations": []}, "needs an 'images' list"),
        ({"images": [{"id": 1}]}, "images[0].file_name"),
        ({"images": [{"id": "1", "file_name": "x.jpg"}]}, "images[0].id"),
        ({"images": [{"id": 1, "file_name": "x"}, {"id": 1, "file_name": "y"}]}, "duplicate image id 1"),
        ({"images": [{"id": 1, "file_name": "x"}], "categories": [{"id": 1}]}, "categories"),
    ],
)
def test_invalid_coco_json_is_refused_naming_the_field(tmp_path: Path, coco: dict, message: str) -> None:
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        collect_images([str(ann)])


def test_errors_name_the_bad_input(tree: Path) -> None:
    with pytest.raises(InputError, match="nope: no such file or folder"):
        collect_images([str(tree / "nope")])
    with pytest.raises(InputError, match="matches no image files"):
        collect_images([str(tree / "*.gif")])
    with pytest.raises(InputError, match="only applies to a COCO json"):
        collect_images([str(tree / "a")], image_root=str(tree))
    with pytest.raises(InputError, match="no images found"):
        (tree / "empty").mkdir()
        collect_images([str(tree / "empty")])
    ann = tree / "ann.json"
    ann.write_text(json.dumps({"images": []}))
    with pytest.raises(InputError, match="must be the only input"):
        collect_images([str(ann), str(tree / "a")])
