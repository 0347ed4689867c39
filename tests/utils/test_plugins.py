"""Plug-in import: module names and .py files, once each, with one-line errors naming the plug-in."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from bissl.cli import main
from bissl.engine.checkpoint import load_backbone
from bissl.models import BACKBONES
from bissl.utils.errors import ConfigError
from bissl.utils.plugins import PluginImportError, import_plugin, load_entry_point_plugins, merge_plugins
from conftest import TINY_PRETRAIN


def test_a_file_is_imported_once_and_recorded_by_absolute_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "counted_plugin.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = import_plugin("counted_plugin.py")
    assert import_plugin(str(tmp_path / "counted_plugin.py")) is first is import_plugin("counted_plugin")
    assert merge_plugins(["counted_plugin.py", "a.b"], ["a.b"]) == [str(tmp_path / "counted_plugin.py"), "a.b"]
    del sys.modules["counted_plugin"]


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("no_such_plugin_mod", "cannot import plug-in 'no_such_plugin_mod' (no module named 'no_such_plugin_mod')"),
        ("missing/plugin.py", "plug-in file 'missing/plugin.py' not found"),
    ],
)
def test_a_missing_plugin_is_one_line_naming_it(ref: str, expected: str) -> None:
    with pytest.raises(PluginImportError) as info:
        import_plugin(ref)
    assert expected in str(info.value) and "\n" not in str(info.value) and info.value.ref == ref


def test_a_broken_plugin_says_what_failed(tmp_path: Path) -> None:
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match=r"plug-in '.*broken_plugin.py' failed to import \(RuntimeError: boom\)"):
        import_plugin(str(tmp_path / "broken_plugin.py"))
    assert "broken_plugin" not in sys.modules


def test_a_failing_plugin_names_its_file_and_line(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "late_fail.py").write_text("VALUE = 1\n\nraise RuntimeError('boom')\n")
    (tmp_path / "typo_plugin.py").write_text("def broken(:\n")
    (tmp_path / "clash_plugin.py").write_text(
        "from bissl.models import BACKBONES\n\nBACKBONES.register('small_cnn')(print)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for ref, line in (("late_fail", 3), (str(tmp_path / "typo_plugin.py"), 1), ("clash_plugin", 3)):
        with pytest.raises(PluginImportError) as info:
            import_plugin(ref)
        file = tmp_path / f"{Path(ref).stem}.py"
        assert f" at {file}:{line};" in str(info.value), str(info.value)  # the plug-in's line, not the registry's


@pytest.fixture
def installed_package(tmp_path: Path, monkeypatch) -> Iterator[Path]:
    """A package on ``sys.path`` whose ``bissl.plugins`` entry point registers the backbone ``ep_linear``; its
    modules and registry entries are removed afterwards."""
    site = tmp_path / "site"
    (site / "ep_bissl_pkg").mkdir(parents=True)
    (site / "ep_bissl_pkg" / "__init__.py").write_text("")
    (site / "ep_bissl_pkg" / "linear.py").write_text(
        "from torch import nn\n"
        "from bissl.models import BACKBONES, as_backbone\n\n\n"
        "@BACKBONES.register('ep_linear')\n"
        "def build(*, in_channels, small_images, image_size):\n"
        "    return as_backbone(nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, 16)), 16)\n"
    )
    (site / "ep_bissl_pkg-0.1.dist-info").mkdir()
    (site / "ep_bissl_pkg-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-bissl-pkg\n")
    (site / "ep_bissl_pkg-0.1.dist-info" / "entry_points.txt").write_text(
        "[bissl.plugins]\nlinear = ep_bissl_pkg.linear\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(BACKBONES, "_entries", dict(BACKBONES._entries))
    yield site
    for name, module in list(sys.modules.items()):  # only the test's own: bissl's stay one copy each
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def uninstall(site: Path, registered: dict[str, object]) -> None:
    """What ``pip uninstall`` leaves for a new process: the package gone from ``sys.path``, nothing registered."""
    sys.path.remove(str(site))
    for name in [name for name in sys.modules if name.startswith("ep_bissl_pkg")]:
        del sys.modules[name]
    BACKBONES._entries = registered


@pytest.mark.e2e
def test_entry_point_plugins_are_recorded_and_named_once_uninstalled(installed_package: Path, tmp_path: Path) -> None:
    registered = dict(BACKBONES._entries)
    out = tmp_path / "pre"
    overrides = [o for o in TINY_PRETRAIN if not o.startswith(("backbone.", "epochs", "optim."))]
    tiny = ["epochs=1", "optim.warmup_epochs=0", "backbone.name=ep_linear", "backbone.kwargs={}"]
    argv = ["pretrain", "--out-dir", str(out), *overrides, *tiny]
    assert main(argv) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["plugins"] == ["ep_bissl_pkg.linear"]
    assert torch.load(out / "backbone.pt", weights_only=True)["backbone"]["plugins"] == ["ep_bissl_pkg.linear"]
    uninstall(installed_package, registered)
    with pytest.raises(ConfigError, match=r"unknown backbone 'ep_linear'.*make 'ep_bissl_pkg.linear' importable"):
        load_backbone(out / "backbone.pt")


def test_the_same_module_again_is_no_clash_but_another_definition_is(installed_package: Path, tmp_path: Path) -> None:
    assert load_entry_point_plugins() == ["ep_bissl_pkg.linear"]
    entry = BACKBONES.get("ep_linear")
    import_plugin(str(installed_package / "ep_bissl_pkg" / "linear.py"))  # --plugin FILE of the installed module
    assert BACKBONES.get("ep_linear") is entry
    (tmp_path / "other_linear.py").write_text(
        "from bissl.models import BACKBONES\n\n\n@BACKBONES.register('ep_linear')\ndef build(**kwargs):\n    pass\n"
    )
    with pytest.raises(PluginImportError, match=r"'ep_linear' is already registered \(by ep_bissl_pkg.linear.build\)"):
        import_plugin(str(tmp_path / "other_linear.py"))


def test_a_plugin_calling_sys_exit_on_import_is_named(tmp_path):
    """``sys.exit(3)`` in a plug-in would end bissl with exit 3 and no message."""
    from bissl.utils.plugins import PluginImportError, import_plugin

    (tmp_path / "quits.py").write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(PluginImportError, match=r"plug-in '.*quits\.py' called sys\.exit\(3\) on import; remove"):
        import_plugin(str(tmp_path / "quits.py"))
