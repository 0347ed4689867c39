"""MNIST / Fashion-MNIST from IDX files: a tiny tree in the real on-disk format, and Debian's real copy."""

from __future__ import annotations

import dataclasses
import gzip
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bissl.data import build_dataset, mnist
from bissl.utils.errors import DataError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
N_TRAIN, N_TEST = 120, 24


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> None:
    """An IDX file of unsigned bytes: magic 0x00 0x00 0x08 ndim, big-endian uint32 sizes, then the data."""
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def fake_arrays(n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` distinct 28x28 images (pixel [0, 0] and [0, 1] hold the image's number) with balanced labels."""
    rng = np.random.default_rng(offset)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    numbers = np.arange(offset, offset + n)
    images[:, 0, 0], images[:, 0, 1] = numbers % 256, numbers // 256
    return images, (np.arange(n) % 10).astype(np.uint8)


def write_tree(directory: Path, *, gz: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    arrays = {"train": fake_arrays(N_TRAIN, 0), "t10k": fake_arrays(N_TEST, 1000)}
    for prefix, (images, labels) in arrays.items():
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images, gz=gz)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, gz=gz)
    return arrays


@pytest.fixture(autouse=True)
def no_ambient_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only the test's own folders count: no env root, an empty cache, no Debian folder."""
    monkeypatch.delenv(mnist.ROOT_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    no_system = dataclasses.replace(mnist.FASHION_MNIST, system_dirs=(str(tmp_path / "no-debian"),))
    monkeypatch.setattr(mnist, "FASHION_MNIST", no_system)


def test_torchvision_layout_gzipped_via_root(tmp_path: Path) -> None:
    arrays = write_tree(tmp_path / "MNIST" / "raw", gz=True)
    sizes = {"train": 110, "val": 10, "test": N_TEST}  # val is 1/12 of the official train set
    built = {split: build_dataset("mnist", split, root=str(tmp_path), image_size=28) for split in sizes}
    for split, size in sizes.items():
        assert len(built[split]) == size
        image, label = built[split][0]
        assert image.shape == (1, 28, 28) and image.min() >= 0 and image.max() <= 1 and isinstance(label, int)
        assert built[split].info.name == "mnist" and built[split].info.num_classes == 10
        assert not built[split].info.mirror_invariant  # fine-tuning never mirrors a digit
    test_images, test_labels = arrays["t10k"]
    assert torch.equal(built["test"].images[:, 0], torch.from_numpy(test_images))
    assert built["test"].targets == test_labels.tolist()
    number = lambda d: (d.images[:, 0, 0, 0].long() + 256 * d.images[:, 0, 0, 1].long()).tolist()  # noqa: E731
    assert sorted(number(built["train"]) + number(built["val"])) == list(range(N_TRAIN))  # disjoint, complete
    assert Counter(built["val"].targets) == dict.fromkeys(range(10), 1)  # stratified
    assert built["train"].info.mean == built["test"].info.mean  # stats from the train split for every split


def test_flat_plain_files_via_env_var_and_resize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tree(tmp_path / "flat", gz=False)
    monkeypatch.setenv(mnist.ROOT_ENV_VAR, str(tmp_path / "flat"))
    dataset = build_dataset("fashion_mnist", "train", image_size=16, seed=3)
    assert dataset.images.shape == (110, 1, 16, 16)
    assert dataset.info.classes[0] == "T-shirt/top" and dataset.info.std[0] > 0
    assert dataset.info.mirror_invariant  # a mirrored garment or shoe keeps its class
    again = build_dataset("fashion_mnist", "train", image_size=16, seed=3)
    other = build_dataset("fashion_mnist", "train", image_size=16, seed=4)
    assert torch.equal(again.images, dataset.images) and not torch.equal(other.images, dataset.images)


def test_missing_data_error_names_dataset_paths_and_fixes(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        build_dataset("fashion_mnist", "train", root=str(tmp_path / "empty"), image_size=16)
    message = str(caught.value)
    assert "\n" not in message and "'fashion_mnist'" in message
    for path in (tmp_path / "empty" / "FashionMNIST" / "raw", tmp_path / "cache" / "bissl" / "data"):
        assert str(path) in message
    assert str(tmp_path / "no-debian") in message
    for fix in ("apt-get install dataset-fashion-mnist", "--data-root DIR", "--download"):
        assert fix in message
    with pytest.raises(DataError, match=r"'mnist' not found.*--download"):
        build_dataset("mnist", "test", root=str(tmp_path / "empty"), image_size=16)


def test_incomplete_folders_do_not_count(tmp_path: Path) -> None:
    write_tree(tmp_path / "MNIST" / "raw", gz=True)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="not found"):
        build_dataset("mnist", "train", root=str(tmp_path), image_size=16)


def test_corrupted_files_give_one_line_errors(tmp_path: Path) -> None:
    images, _ = fake_arrays(4, 0)
    write_idx(tmp_path / "images", images, gz=False)
    with pytest.raises(DataError, match="not an IDX file with magic number 0x00000801"):
        mnist.read_idx(tmp_path / "images", 0x0801)  # an image file where labels are expected
    (tmp_path / "short").write_bytes((tmp_path / "images").read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        mnist.read_idx(tmp_path / "short", 0x0803)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"x" * 100)[:20])
    with pytest.raises(DataError, match="corrupted gzip"):
        mnist.read_idx(tmp_path / "bad.gz", 0x0803)


def test_download_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    calls: list[tuple[str, bool]] = []

    class FakeMNIST:  # stands in for torchvision's downloader: writes the files where torchvision would
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, download))
            write_tree(Path(root) / "MNIST" / "raw", gz=False)

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    with pytest.raises(DataError):
        build_dataset("mnist", "train", root=str(tmp_path / "d"), image_size=8)
    assert calls == []
    dataset = build_dataset("mnist", "val", root=str(tmp_path / "d"), image_size=8, download=True)
    assert calls == [(str(tmp_path / "d"), True)] and len(dataset) == 10
    build_dataset("mnist", "test", root=str(tmp_path / "d"), image_size=8, download=True)
    assert len(calls) == 1  # found on disk now: no second download


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_debian_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        mnist, "FASHION_MNIST", dataclasses.replace(mnist.FASHION_MNIST, system_dirs=(str(DEBIAN_FASHION),))
    )
    assert mnist.find_idx_dir(mnist.FASHION_MNIST, None) == DEBIAN_FASHION
    train_images, train_labels = mnist.read_idx_pair(DEBIAN_FASHION, "train")
    assert train_images.shape == (60_000, 28, 28) and len(train_labels) == 60_000
    test = build_dataset("fashion_mnist", "test", image_size=32)
    assert test.images.shape == (10_000, 1, 32, 32) and Counter(test.targets) == dict.fromkeys(range(10), 1000)
    val = build_dataset("fashion_mnist", "val", image_size=32)
    assert len(val) == 5_000 and Counter(val.targets) == dict.fromkeys(range(10), 500)
    assert val.info.mean[0] == pytest.approx(0.2855, abs=2e-3) and val.info.std[0] == pytest.approx(0.339, abs=3e-3)
