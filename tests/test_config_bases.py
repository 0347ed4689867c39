"""#19 item 4: the shipped configs' ``_base_*.yaml`` bases, the stage configs' shared base, and configs written
before classification's options moved into its task params."""

import shutil
from importlib import resources
from pathlib import Path

import pytest
import yaml

from bissl.config import AlignConfig, FinetuneConfig, config_class_for, load_config, shipped_config_names, to_yaml
from bissl.engine.run_record import require_same_config
from bissl.utils.errors import ConfigError

PAPER_SCALE = [n for n in shipped_config_names() if n.endswith(("_r50", "_vitb16_lora")) or "_imagenet_" in n]


def test_config_bases_are_extended_and_not_listed_as_runnable():
    """#19 item 4: ``_base_*.yaml`` files are partial; each is some shipped config's ``extends:``, none is listed."""
    configs = resources.files("bissl") / "configs"
    bases = {p.name.removesuffix(".yaml") for p in configs.iterdir() if p.name.startswith("_base_")}
    extended = {yaml.safe_load((configs / f"{n}.yaml").read_text()).get("extends") for n in shipped_config_names()}
    assert len(bases) == 5 and bases <= extended and not bases & set(shipped_config_names())


@pytest.mark.parametrize("name", PAPER_SCALE)
def test_paper_scale_config_resolves_to_its_own_run_and_dataset(name):
    """Each paper-scale sibling of a base keeps its own run folder, dataset, backbone and study (#19 item 4)."""
    cfg = load_config(config_class_for(name), name)
    assert cfg.out_dir == f"runs/{name}"
    if isinstance(cfg, AlignConfig | FinetuneConfig):
        assert f"_{cfg.downstream.data.name}_" in name
    if isinstance(cfg, FinetuneConfig):
        assert cfg.backbone == f"runs/{name.replace('finetune_', 'align_', 1)}"
        assert cfg.hpo.study_name == name


WRITTEN = Path(__file__).parent / "fixtures" / "written_configs"


@pytest.mark.parametrize("name", sorted(p.stem for p in WRITTEN.glob("*.yaml")))
def test_config_yaml_written_by_the_previous_release_loads_equal_in_the_same_order(name):
    """A run folder's config.yaml written before the stage configs shared a base (and before classification's options
    moved into its task params) loads to the config it was written from, and is written back in the same key order
    (#19 item 4)."""
    cls = config_class_for(name)
    written = load_config(cls, WRITTEN / f"{name}.yaml")
    assert written == load_config(cls, name)
    old_keys = list(yaml.safe_load((WRITTEN / f"{name}.yaml").read_text()))
    assert [key for key in yaml.safe_load(to_yaml(written)) if key in old_keys] == old_keys


def test_a_run_folder_written_by_the_previous_release_is_accepted_for_its_config(tmp_path):
    """Resuming a run whose config.yaml still holds ``downstream.label_smoothing`` / ``.augment`` (moved to the task's
    params) is not refused as "another config"; a real change still is."""
    shutil.copy(WRITTEN / "finetune_dtd_r50.yaml", tmp_path / "config.yaml")
    require_same_config(tmp_path, load_config(FinetuneConfig, "finetune_dtd_r50"))
    with pytest.raises(ConfigError, match=r"another config .*epochs"):
        require_same_config(tmp_path, load_config(FinetuneConfig, "finetune_dtd_r50", ["epochs=3"]))
