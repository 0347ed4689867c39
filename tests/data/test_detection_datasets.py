"""Detection datasets: the synthetic set, VOC and COCO layouts on tiny fake trees, collate and the exact flip."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bissl.data import DATASETS, build_dataset, hflip_detection
from bissl.data.detection_sets import VOC_DETECTION_CLASSES
from bissl.data.detection_synthetic import SHAPES, SyntheticDetection, object_alpha
from bissl.utils.errors import DataError

SIZE = 64


def check_item(image: torch.Tensor, target: dict, size: int, num_classes: int, channels: int = 3) -> None:
    assert image.shape == (channels, size, size) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert set(target) == {"boxes", "labels", "difficult"}
    boxes, labels, difficult = target["boxes"], target["labels"], target["difficult"]
    assert boxes.dtype == torch.float32 and labels.dtype == torch.int64 and difficult.dtype == torch.bool
    assert boxes.shape == (len(labels), 4) and difficult.shape == labels.shape
    assert ((labels >= 0) & (labels < num_classes)).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= size).all() and (boxes[:, 2:] > boxes[:, :2]).all()


# --- synthetic_detection ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic() -> SyntheticDetection:
    return build_dataset("synthetic_detection", "val", image_size=SIZE, seed=3)


def test_synthetic_items_info_and_sizes(synthetic) -> None:
    assert len(synthetic) == 128 == len(synthetic.targets)
    info = synthetic.info
    assert info.kind == "detection" and info.num_classes == 4 and info.classes == list(SHAPES[:4])
    assert info.channels == 3 and info.mirror_invariant and len(info.mean) == len(info.std) == 3
    counts = set()
    for index in range(0, len(synthetic), 4):
        image, target = synthetic[index]
        check_item(image, target, SIZE, 4)
        assert not target["difficult"].any() and 1 <= len(target["labels"]) <= 4
        assert synthetic.targets[index] == int(target["labels"][0])
        counts.add(len(target["labels"]))
    assert len(counts) >= 3
    sizes = {s: len(DATASETS.get("synthetic_detection")(s, image_size=SIZE, sizes={"train": 10})) for s in ("train",)}
    assert sizes == {"train": 10}


def test_synthetic_is_deterministic_per_seed_split_and_index(synthetic) -> None:
    again = build_dataset("synthetic_detection", "val", image_size=SIZE, seed=3)
    other_seed = build_dataset("synthetic_detection", "val", image_size=SIZE, seed=4)
    other_split = build_dataset("synthetic_detection", "train", image_size=SIZE, seed=3)
    short = DATASETS.get("synthetic_detection")("val", image_size=SIZE, seed=3, sizes={"val": 5})
    for index in (0, 4):
        image, target = synthetic[index]
        assert torch.equal(image, again[index][0]) and torch.equal(target["boxes"], again[index][1]["boxes"])
        assert torch.equal(image, short[index][0])  # an image does not depend on the split's size
        assert not torch.equal(image, other_seed[index][0]) and not torch.equal(image, other_split[index][0])
    assert torch.equal(pickle.loads(pickle.dumps(synthetic))[2][0], synthetic[2][0])  # as DataLoader workers see it
    part = synthetic.subset([4, 0])
    assert len(part) == 2 == len(part.targets) and torch.equal(part[0][0], synthetic[4][0])
    assert torch.equal(part[1][1]["boxes"], synthetic[0][1]["boxes"])
    # the test split is the same for every run seed
    tests = [build_dataset("synthetic_detection", "test", image_size=SIZE, seed=s) for s in (0, 7)]
    assert torch.equal(tests[0][0][0], tests[1][0][0])


def test_synthetic_boxes_are_the_painted_objects_exactly(synthetic) -> None:
    for index in range(12):
        image, target = synthetic[index]
        layout = synthetic.layouts[index]
        assert len(layout) == len(target["boxes"])
        for (label, glyph, x, y, height, width, _), box in zip(layout, target["boxes"].tolist(), strict=True):
            alpha = object_alpha(SHAPES[label], height, width, glyph)
            canvas = np.zeros((SIZE, SIZE), dtype=bool)
            canvas[y : y + height, x : x + width] = alpha > 0
            rows, cols = np.nonzero(canvas)
            assert box == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]  # the tight box of the pixels
            # the object is painted there: inside its mask the image is one colour (shapes are opaque)
            if SHAPES[label] != "digit":
                pixels = image[:, torch.from_numpy(canvas)]
                assert (pixels.std(dim=1) < 1e-6).all()
        boxes = target["boxes"]  # objects never overlap
        for i in range(len(boxes)):
            for j in range(i):
                overlap = (torch.min(boxes[i, 2:], boxes[j, 2:]) - torch.max(boxes[i, :2], boxes[j, :2])).clamp(min=0)
                assert overlap.prod() == 0


def test_synthetic_generation_is_fast() -> None:
    build = DATASETS.get("synthetic_detection")
    build("train", image_size=SIZE, sizes={"train": 8})  # scikit-learn's glyphs loaded once
    start = time.perf_counter()
    dataset = build("train", image_size=SIZE, seed=11, sizes={"train": 1000})
    images = [dataset[i][0] for i in range(len(dataset))]
    assert len(images) == 1000 and time.perf_counter() - start < 10.0  # ~0.5 s unloaded; generous for shared CPUs


# --- collate and the flip --------------------------------------------------------------------------------------------


def test_collate_and_exact_hflip(synthetic) -> None:
    batch = [synthetic[i] for i in range(4)]
    images, targets = synthetic.collate(batch)
    assert images.shape == (4, 3, SIZE, SIZE) and len(targets) == 4
    assert all(t["boxes"] is b[1]["boxes"] for t, b in zip(targets, batch, strict=True))
    flip = torch.tensor([True, False, True, False])
    flipped, flipped_targets = hflip_detection(images, targets, flip)
    assert torch.equal(flipped[0], images[0].flip(-1)) and torch.equal(flipped[1], images[1])
    for b in range(4):
        old, new = targets[b]["boxes"], flipped_targets[b]["boxes"]
        if flip[b]:
            assert torch.equal(new[:, 0], SIZE - old[:, 2]) and torch.equal(new[:, 2], SIZE - old[:, 0])
            assert torch.equal(new[:, 1::2], old[:, 1::2])
        else:
            assert torch.equal(new, old)
        assert torch.equal(flipped_targets[b]["labels"], targets[b]["labels"])
    # the mirrored box is still the tight box of the mirrored object: rebuild the mask from the layout
    label, glyph, x, y, height, width, _ = synthetic.layouts[0][0]
    canvas = np.zeros((SIZE, SIZE), dtype=bool)
    canvas[y : y + height, x : x + width] = object_alpha(SHAPES[label], height, width, glyph) > 0
    rows, cols = np.nonzero(canvas[:, ::-1])
    assert flipped_targets[0]["boxes"][0].tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    assert torch.equal(images, torch.stack([b[0] for b in batch]))  # inputs unchanged
    assert torch.equal(targets[0]["boxes"], batch[0][1]["boxes"])


# --- Pascal VOC on a fake tree ----------------------------------------------------------------------------------------


def _jpeg(path: Path, width: int, height: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def _voc_xml(objects: list[tuple[str, tuple[int, int, int, int], int]], width: int, height: int) -> str:
    body = "".join(
        f"<object><name>{name}</name><difficult>{hard}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, b, hard in objects
    )
    size = f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
    return f"<annotation>{size}{body}</annotation>"


def fake_voc(root: Path, *, with_2012: bool = True) -> dict[str, list[str]]:
    """VOC2007 (10 trainval, 3 test) and VOC2012 (10 trainval) images of 40 x 20 px, two objects each."""
    sets = {("2007", "trainval"): 10, ("2007", "test"): 3} | ({("2012", "trainval"): 10} if with_2012 else {})
    ids: dict[str, list[str]] = {}
    for (year, part), count in sets.items():
        folder = root / "VOCdevkit" / f"VOC{year}"
        names = [f"{year}_{part}_{i:03d}" for i in range(count)]
        ids[f"{year}_{part}"] = names
        main = folder / "ImageSets" / "Main"
        main.mkdir(parents=True, exist_ok=True)
        (main / f"{part}.txt").write_text("".join(f"{n}\n" for n in names))
        for i, name in enumerate(names):
            _jpeg(folder / "JPEGImages" / f"{name}.jpg", 40, 20, i)
            objects = [(VOC_DETECTION_CLASSES[i % 20], (1, 1, 20, 10), 0), ("person", (21, 5, 40, 20), i % 2)]
            (folder / "Annotations").mkdir(exist_ok=True)
            (folder / "Annotations" / f"{name}.xml").write_text(_voc_xml(objects, 40, 20))
    return ids


def test_voc_detection_protocol_boxes_and_difficult(tmp_path) -> None:
    ids = fake_voc(tmp_path)
    splits = {s: build_dataset("voc_detection", s, root=str(tmp_path), image_size=32, seed=0) for s in ("train", "val")}
    test = build_dataset("voc_detection", "test", root=str(tmp_path / "VOCdevkit"), image_size=32)
    assert len(test) == 3 and len(splits["train"]) + len(splits["val"]) == 20 and len(splits["val"]) == 2
    pool = set(ids["2007_trainval"]) | set(ids["2012_trainval"])
    paths = {s: {Path(p).stem for p in d.images.paths} for s, d in splits.items()}
    assert paths["train"] | paths["val"] == pool and not paths["train"] & paths["val"]
    assert {Path(p).stem for p in test.images.paths} == set(ids["2007_test"])
    other = build_dataset("voc_detection", "val", root=str(tmp_path), image_size=32, seed=5)
    assert {Path(p).stem for p in other.images.paths} != paths["val"]  # val is carved with the run's seed
    image, target = test[1]
    check_item(image, target, 32, 20)
    assert test.info.kind == "detection" and test.info.classes == list(VOC_DETECTION_CLASSES)
    # VOC's (1, 1, 20, 10) on a 40 x 20 image -> continuous (0, 0, 20, 10) -> scaled by (32/40, 32/20)
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0, 16, 16], [16, 6.4, 32, 32]]))
    assert target["labels"].tolist() == [1, VOC_DETECTION_CLASSES.index("person")]
    assert target["difficult"].tolist() == [False, True]
    assert test.targets == [0, 1, 2]  # the first object's label per image


def test_voc_detection_without_2012_warns(tmp_path) -> None:
    fake_voc(tmp_path, with_2012=False)
    with pytest.warns(UserWarning, match="VOC2007 trainval alone"):
        train = build_dataset("voc_detection", "train", root=str(tmp_path), image_size=32)
    assert len(train) == 9


def test_voc_detection_offline_error_names_what_was_looked_for(tmp_path) -> None:
    with pytest.raises(DataError, match=r"voc_detection.*VOC2007/ImageSets/Main/trainval\.txt") as info:
        build_dataset("voc_detection", "train", root=str(tmp_path), image_size=32)
    assert "\n" not in str(info.value) and "--data-root" in str(info.value)


# --- COCO-format JSON on a fake tree ----------------------------------------------------------------------------------


def fake_coco(root: Path, splits: tuple[str, ...] = ("train",), count: int = 10) -> None:
    categories = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 12, "name": "bird"}]
    for s, split in enumerate(splits):
        images, annotations = [], []
        for i in range(count):
            name = f"{split}_{i}.png"
            _jpeg(root / "images" / name, 50, 25, 100 * s + i)
            images.append({"id": 1000 + i, "file_name": name, "width": 50, "height": 25})
            annotations.append({"id": 2 * i, "image_id": 1000 + i, "category_id": [7, 3, 12][i % 3],
                                "bbox": [5, 5, 20, 10], "iscrowd": 0})  # fmt: skip
            annotations.append({"id": 2 * i + 1, "image_id": 1000 + i, "category_id": 3,
                                "bbox": [30, 0, 20, 25], "iscrowd": 1})  # fmt: skip
        images.append({"id": 5000, "file_name": f"{split}_{0}.png", "width": 50, "height": 25})  # no objects
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        data = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def test_coco_detection_categories_boxes_crowd_and_carved_splits(tmp_path) -> None:
    fake_coco(tmp_path)
    parts = {s: build_dataset("coco_detection", s, root=str(tmp_path), image_size=20) for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in parts.items()} == {"train": 9, "val": 1, "test": 1}
    info = parts["train"].info
    assert info.kind == "detection" and info.classes == ["dog", "cat", "bird"]  # ids 3, 7, 12 -> 0, 1, 2
    everything = [parts[s][i] for s in parts for i in range(len(parts[s]))]
    for image, target in everything:
        check_item(image, target, 20, 3)
    with_objects = [t for _, t in everything if len(t["labels"])]
    assert len(with_objects) == 10 and sum(not len(t["labels"]) for _, t in everything) == 1
    target = next(t for t in with_objects if t["labels"][0] == 1)  # a "cat" image (category id 7)
    # bbox [5, 5, 20, 10] -> xyxy (5, 5, 25, 15) -> scaled by (20/50, 20/25); the crowd box is difficult
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 4, 10, 12], [12, 0, 20, 20]]))
    assert target["labels"].tolist() == [1, 0] and target["difficult"].tolist() == [False, True]


def test_coco_detection_reads_given_splits(tmp_path) -> None:
    fake_coco(tmp_path, splits=("train", "val", "test"), count=4)
    parts = {s: build_dataset("coco_detection", s, root=str(tmp_path), image_size=20) for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in parts.items()} == {"train": 5, "val": 5, "test": 5}
    assert all(Path(p).name.startswith("val_") for p in parts["val"].images.paths)


def test_coco_detection_carves_only_the_missing_split(tmp_path) -> None:
    fake_coco(tmp_path, splits=("train", "val"), count=9)  # 10 images a file; test carved from train (10 %)
    parts = {s: build_dataset("coco_detection", s, root=str(tmp_path), image_size=20) for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in parts.items()} == {"train": 9, "val": 10, "test": 1}
    names = {s: {Path(p).name for p in d.images.paths} for s, d in parts.items()}
    assert all(n.startswith("train_") for n in names["train"] | names["test"])
    copied = pickle.loads(pickle.dumps(parts["train"]))  # DataLoader workers get pickled copies
    loader = torch.utils.data.DataLoader(copied, batch_size=4, collate_fn=copied.collate)
    images, targets = next(iter(loader))
    assert images.shape == (4, 3, 20, 20) and len(targets) == 4
    assert all(torch.equal(t["boxes"], parts["train"][i][1]["boxes"]) for i, t in enumerate(targets))


def test_coco_detection_offline_errors(tmp_path) -> None:
    with pytest.raises(DataError, match=r"coco_detection.*annotations/instances_train\.json") as info:
        build_dataset("coco_detection", "train", root=str(tmp_path), image_size=20)
    assert "\n" not in str(info.value)
    fake_coco(tmp_path)
    for image in (tmp_path / "images").iterdir():
        image.unlink()
    with pytest.raises(DataError, match=r"image 'train_0\.png' of instances_train\.json not found"):
        build_dataset("coco_detection", "train", root=str(tmp_path), image_size=20)
