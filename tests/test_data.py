"""Holdout loading (SPEC §2.3): ImageFolder and .npz, validation, resizing on request, fit with the model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bdsan.errors import DataError
from bdsan.io.archs import build_arch
from bdsan.io.data import check_holdout_matches, load_holdout, split_holdout
from bdsan.io.models import from_module
from bdsan.io.preprocess import Preprocessing


def write_image(path, size=(8, 8), value=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def image_folder(root, layout: dict[str, int], size=(8, 8)):
    for name, count in layout.items():
        for index in range(count):
            write_image(root / name / f"{index}.png", size, value=10 * index)
    return root


def toy_model(num_classes=3, input_size=None, classes=None):
    return from_module(build_arch("tiny_cnn", num_classes), "tiny_cnn", num_classes,
                       Preprocessing(input_size=input_size), classes)


# --- ImageFolder ----------------------------------------------------------------------------------------------

def test_image_folder_sorted_classes_and_all_extensions(tmp_path):
    write_image(tmp_path / "b_dog" / "1.jpg", fmt="JPEG")
    write_image(tmp_path / "b_dog" / "sub" / "2.WEBP", fmt="WEBP")
    write_image(tmp_path / "a_cat" / "1.png", value=255)
    write_image(tmp_path / "a_cat" / "2.jpeg", fmt="JPEG")
    (tmp_path / "a_cat" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    holdout = load_holdout(tmp_path)
    assert holdout.classes == ["a_cat", "b_dog"]
    assert holdout.y.tolist() == [0, 0, 1, 1]
    assert holdout.x.shape == (4, 3, 8, 8) and holdout.x.dtype == torch.uint8
    assert int(holdout.x[0].min()) == 255  # a_cat/1.png first: files sorted within a class
    assert holdout.skipped == []


def test_classes_option_sets_the_label_order(tmp_path):
    image_folder(tmp_path, {"cat": 2, "dog": 1, "extra": 1})
    holdout = load_holdout(tmp_path, classes=["dog", "cat"])
    assert holdout.classes == ["dog", "cat"] and holdout.y.tolist() == [0, 1, 1]


def test_unreadable_image_among_good_ones_is_skipped_and_listed(tmp_path):
    image_folder(tmp_path, {"cat": 2, "dog": 2})
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    truncated = write_image(tmp_path / "cat" / "cut.jpg", (64, 64), fmt="JPEG")
    truncated.write_bytes(truncated.read_bytes()[:200])
    holdout = load_holdout(tmp_path)
    assert len(holdout) == 4
    assert sorted(s.split(":")[0] for s in holdout.skipped) == sorted([str(truncated),
                                                                        str(tmp_path / "dog" / "broken.png")])


def test_only_unreadable_images_is_an_empty_holdout(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="no images.*unreadable"):
        load_holdout(tmp_path)


def test_decompression_bomb_limit_applies(tmp_path, monkeypatch):
    image_folder(tmp_path, {"cat": 1, "dog": 1})
    write_image(tmp_path / "cat" / "big.png", (40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    holdout = load_holdout(tmp_path)
    assert len(holdout) == 2
    assert "decompression-bomb" in holdout.skipped[0]


def test_empty_and_one_class_holdouts_are_refused(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        load_holdout(tmp_path / "empty")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_holdout(tmp_path / "empty" / "cat")
    image_folder(tmp_path / "one", {"cat": 3})
    with pytest.raises(DataError, match="one class only"):
        load_holdout(tmp_path / "one")
    image_folder(tmp_path / "two", {"cat": 3, "dog": 0})
    with pytest.raises(DataError, match="one class only"):
        load_holdout(tmp_path / "two")


def test_mixed_sizes_need_input_size(tmp_path):
    image_folder(tmp_path, {"cat": 2, "dog": 1})
    write_image(tmp_path / "dog" / "wide.png", (12, 8))
    with pytest.raises(DataError, match="differ in size") as error:
        load_holdout(tmp_path)
    assert "--input-size" in error.value.hint
    holdout = load_holdout(tmp_path, input_size=16)
    assert holdout.image_size == (16, 16) and len(holdout) == 4


def test_missing_holdout(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_holdout(tmp_path / "nope")


# --- .npz -------------------------------------------------------------------------------------------------------

def test_npz_x_y_and_classes(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "h.npz", x=x, y=np.array([0, 1, 2, 0, 1, 2]), classes=np.array(["a", "b", "c"]))
    holdout = load_holdout(tmp_path / "h.npz")
    assert holdout.classes == ["a", "b", "c"]
    assert torch.equal(holdout.x, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert load_holdout(tmp_path / "h.npz", input_size=10).image_size == (10, 10)


def test_npz_split_keys(tmp_path):
    x = np.zeros((4, 4, 4, 3), np.uint8)
    np.savez(tmp_path / "b.npz", x_train=x, y_train=np.array([0, 1, 0, 1]), x_test=x[:2], y_test=np.array([1, 0]))
    assert len(load_holdout(tmp_path / "b.npz", split="test")) == 2
    with pytest.raises(DataError, match="no 'x'/'y'") as error:
        load_holdout(tmp_path / "b.npz")
    assert "--split test|train" in error.value.hint


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((4, 4, 4, 3), np.float32), np.array([0, 1, 0, 1]), "must be uint8"),
    (np.zeros((4, 3, 8, 8), np.uint8), np.array([0, 1, 0, 1]), "look N×C×H×W"),
    (np.zeros((4, 4, 4, 5), np.uint8), np.array([0, 1, 0, 1]), "1 or 3 channels"),
    (np.zeros((4, 4, 4, 3), np.uint8), np.array([0, 1, 0]), "4 images but 3 labels"),
    (np.zeros((4, 4, 4, 3), np.uint8), np.array([0.0, 1.0, 0.0, 1.0]), "1-D integer"),
    (np.zeros((4, 4, 4, 3), np.uint8), np.array([0, -1, 0, 1]), "negative labels"),
    (np.zeros((4, 4, 4, 3), np.uint8), np.array([1, 1, 1, 1]), "one class only"),
    (np.zeros((0, 4, 4, 3), np.uint8), np.zeros(0, np.int64), "no images"),
])
def test_bad_npz_is_refused(tmp_path, x, y, message):
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    with pytest.raises(DataError, match=message):
        load_holdout(tmp_path / "bad.npz")


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([object()], dtype=object), y=np.array([0]))
    with pytest.raises(DataError, match="allow_pickle"):
        load_holdout(tmp_path / "obj.npz")


def test_not_an_npz(tmp_path):
    (tmp_path / "h.npz").write_bytes(b"hello")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_holdout(tmp_path / "h.npz")


# --- holdout vs model -------------------------------------------------------------------------------------------

def test_class_count_mismatch_is_refused(tmp_path):
    holdout = load_holdout(image_folder(tmp_path, {"a": 1, "b": 1}))
    with pytest.raises(DataError, match="2 classes .* but the model has 3"):
        check_holdout_matches(toy_model(3), holdout)


def test_labels_beyond_the_model_are_refused(tmp_path):
    np.savez(tmp_path / "h.npz", x=np.zeros((3, 4, 4, 3), np.uint8), y=np.array([0, 1, 5]))
    with pytest.raises(DataError, match="label 5 but the model has 3 classes"):
        check_holdout_matches(toy_model(3), load_holdout(tmp_path / "h.npz"))


def test_numeric_labels_may_cover_fewer_classes(tmp_path):
    np.savez(tmp_path / "h.npz", x=np.zeros((2, 4, 4, 3), np.uint8), y=np.array([0, 1]))
    holdout = check_holdout_matches(toy_model(3), load_holdout(tmp_path / "h.npz"))
    assert holdout.num_classes == 3 and holdout.y.tolist() == [0, 1]


def test_folder_names_map_onto_the_models_class_names(tmp_path):
    holdout = load_holdout(image_folder(tmp_path, {"cat": 1, "dog": 1}))
    matched = check_holdout_matches(toy_model(3, classes=["dog", "bird", "cat"]), holdout)
    assert matched.classes == ["dog", "bird", "cat"] and matched.y.tolist() == [2, 0]


def test_image_size_mismatch_is_refused(tmp_path):
    holdout = load_holdout(image_folder(tmp_path, {"a": 1, "b": 1, "c": 1}))
    with pytest.raises(DataError, match="8×8 but the model expects 32×32") as error:
        check_holdout_matches(toy_model(3, input_size=32), holdout)
    assert "--input-size 32" in error.value.hint
    resized = load_holdout(tmp_path, input_size=32)
    assert check_holdout_matches(toy_model(3, input_size=32), resized) is not None


def test_channel_mismatch_is_refused(tmp_path):
    np.savez(tmp_path / "g.npz", x=np.zeros((2, 8, 8), np.uint8), y=np.array([0, 1]))
    with pytest.raises(DataError, match="1 channel"):
        check_holdout_matches(toy_model(2), load_holdout(tmp_path / "g.npz"))


def test_split_is_stratified_and_seeded(tmp_path):
    np.savez(tmp_path / "h.npz", x=np.zeros((40, 4, 4, 3), np.uint8), y=np.repeat([0, 1], 20))
    holdout = load_holdout(tmp_path / "h.npz")
    fit, verify = split_holdout(holdout, 0.5, seed=3)
    assert fit.class_counts() == [10, 10] and verify.class_counts() == [10, 10]
    again, _ = split_holdout(holdout, 0.5, seed=3)
    assert torch.equal(fit.y, again.y)
