"""Plug-in import: module names and .py files, once each, with one-line errors naming the plug-in."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bissl.utils.errors import ConfigError
from bissl.utils.plugins import PluginImportError, import_plugin, merge_plugins


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


def test_a_plugin_calling_sys_exit_on_import_is_named(tmp_path):
    """``sys.exit(3)`` in a plug-in would end bissl with exit 3 and no message."""
    from bissl.utils.plugins import PluginImportError, import_plugin

    (tmp_path / "quits.py").write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(PluginImportError, match=r"plug-in '.*quits\.py' called sys\.exit\(3\) on import; remove"):
        import_plugin(str(tmp_path / "quits.py"))
