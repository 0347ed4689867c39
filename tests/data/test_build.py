"""The dataset contract: a registered builder called as build(split, *, root, image_size, download, seed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bissl.cli import main
from bissl.data import DATASETS, build_dataset
from bissl.utils.plugins import import_plugin

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "stripes_dataset.py"


@pytest.fixture
def datasets(monkeypatch):
    """``DATASETS`` as it is now, restored after the test (plug-ins register into it)."""
    monkeypatch.setattr(DATASETS, "_entries", dict(DATASETS._entries))
    return DATASETS


def test_the_example_dataset_plugin_follows_the_contract(datasets):
    import_plugin(str(EXAMPLE))
    train, test = (build_dataset("example_stripes", split, image_size=8, seed=1) for split in ("train", "test"))
    image, label = train[0]
    assert image.shape == (1, 8, 8) and 0 <= image.min() <= image.max() <= 1 and label in (0, 1, 2)
    assert set(train.targets) == {0, 1, 2} and len(test) == 150 and not train.info.mirror_invariant
    again = build_dataset("example_stripes", "train", image_size=8, seed=1)
    assert again.images.equal(train.images)  # the same seed, the same images


def test_a_builder_with_a_wrong_signature_is_one_config_line_before_the_run_folder(datasets, tmp_path, capsys):
    """#20 item 12: it was a raw TypeError after the run folder existed."""

    @datasets.register("no_root")
    def build(split: str, *, image_size: int, download: bool = False, seed: int = 0) -> None:
        raise AssertionError("never called")

    out = tmp_path / "run"
    assert main(["pretrain", "--out-dir", str(out), "data.name=no_root", "monitor.dataset=digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bad config value for 'data.name'" in err and "'no_root'" in err
    assert "build(split, *, root, image_size, download, seed)" in err and "unexpected keyword argument 'root'" in err
    assert not out.exists()
