import pytest

from bissl.config import (
    AlignConfig,
    PipelineConfig,
    PretrainConfig,
    apply_overrides,
    config_class_for,
    load_config,
    shipped_config_names,
)
from bissl.engine.names import validate_names
from bissl.utils.errors import ConfigError


def test_every_shipped_config_loads_and_validates():
    names = shipped_config_names()
    assert "pretrain_digits" in names
    for name in names:
        validate_names(load_config(config_class_for(name), name))


def test_dotted_overrides_are_typed():
    cfg = load_config(PretrainConfig, "pretrain_digits", ["optim.lr=0.05", "pretext.params.temperature=0.2"])
    assert cfg.optim.lr == 0.05 and cfg.pretext.params["temperature"] == 0.2
    assert apply_overrides({"a": {"x": 1}}, ["a.b=[1, 2]", "c=true"]) == {"a": {"x": 1, "b": [1, 2]}, "c": True}
    assert apply_overrides({"p": {"t": 0.5}}, ["p={}"]) == {"p": {}}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=0.1", r"unknown config key 'optim.lrr'"),
        ("optim.lr=-1", r"bad config value for 'optim.lr'.*greater than 0.*-1"),
        ("pretext.name=nope", r"unknown pretext method 'nope'; choose one of: .*simclr"),
        ("data.name=imagenet22k", r"unknown dataset 'imagenet22k'"),
        ("backbone.name=vgg", r"unknown backbone 'vgg'"),
        ("optim.name=adam2", r"unknown optimizer 'adam2'"),
        ("pretext.params.temperatur=0.5", r"unknown config key 'pretext.params.temperatur'"),
        ("epochs=0", r"'epochs'"),
        ("device=tpu", r"'device'"),
        ("optim.lr", r"bad override 'optim.lr'"),
    ],
)
def test_bad_values_are_rejected_with_the_key_named(override, message):
    with pytest.raises(ConfigError, match=message):
        validate_names(load_config(PretrainConfig, "pretrain_digits", [override]))


def test_missing_config_file_lists_shipped_ones():
    with pytest.raises(ConfigError, match=r"not found; give a YAML path or one of: .*pretrain_digits"):
        load_config(PretrainConfig, "no_such_config")


def test_bad_yaml_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(PretrainConfig, bad)


def test_extends_merges_a_file_over_its_base(tmp_path):
    (tmp_path / "base.yaml").write_text("epochs: 3\ndata: {name: digits, batch_size: 64}\nseed: 1\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ndata: {batch_size: 32}\nseed: 2\n")
    cfg = load_config(PretrainConfig, tmp_path / "child.yaml", ["epochs=5"])
    assert (cfg.epochs, cfg.seed, cfg.data.name, cfg.data.batch_size) == (5, 2, "digits", 32)


def test_extends_a_shipped_config_replaces_lists():
    base = load_config(PipelineConfig, "pipeline_digits")
    solvers = load_config(PipelineConfig, "pipeline_solvers_digits")
    assert [arm.name for arm in solvers.arms] != [arm.name for arm in base.arms]
    assert solvers.pretrain == base.pretrain


def test_extends_loop_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config(PretrainConfig, tmp_path / "a.yaml")


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nseed: [1,\n  2\nlog: {a: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+:\d+: not valid YAML \(.+\); fix its syntax") as info:
        load_config(PretrainConfig, bad)
    assert "\n" not in str(info.value)
    (tmp_path / "tab.yaml").write_text("epochs: 3\nseed:\n\t- 1\n")
    with pytest.raises(ConfigError, match=r"tab\.yaml:3:1: not valid YAML"):
        load_config(PretrainConfig, tmp_path / "tab.yaml")


def test_duplicate_yaml_keys_are_refused_with_key_file_and_line(tmp_path):
    (tmp_path / "dup.yaml").write_text("epochs: 3\ndata:\n  name: digits\n  batch_size: 8\n  name: digits\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml:5:3: key 'name' appears twice in one mapping; keep one"):
        load_config(PretrainConfig, tmp_path / "dup.yaml")
    (tmp_path / "top.yaml").write_text("epochs: 3\nseed: 1\nepochs: 4\n")
    with pytest.raises(ConfigError, match=r"top\.yaml:3:1: key 'epochs' appears twice"):
        load_config(PretrainConfig, tmp_path / "top.yaml")


def test_missing_extends_target_names_both_files(tmp_path):
    (tmp_path / "child.yaml").write_text("epochs: 3\nextends: no_base.yaml\n")
    with pytest.raises(
        ConfigError, match=r"child\.yaml: 'extends: no_base\.yaml': config file 'no_base\.yaml' not found"
    ):
        load_config(PretrainConfig, tmp_path / "child.yaml")


@pytest.mark.parametrize("name", [".", "..", "a/b", "", "x" * 101])
@pytest.mark.parametrize("key", ["tasks", "arms"])
def test_task_and_arm_names_are_folder_names(key, name):
    """A task or arm names its folder in the study: ``..`` would write outside ``--out-dir``."""
    extra = ["baseline=a.b-c_1"] if key == "arms" else []
    with pytest.raises(ConfigError, match=rf"'{key}\.0\.name'.*is not a folder name: use 1-100 letters"):
        load_config(PipelineConfig, "pipeline_digits", [f"{key}=[{{name: '{name}'}}]", *extra])
    load_config(PipelineConfig, "pipeline_digits", [f"{key}=[{{name: 'a.b-c_1'}}]", *extra])


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999"])
@pytest.mark.parametrize(
    ("cls", "name", "key"),
    [(PretrainConfig, "pretrain_digits", "optim.lr"), (PretrainConfig, "pretrain_digits", "optim.weight_decay"),
     (AlignConfig, "align_digits", "bilevel.lam"), (AlignConfig, "align_digits", "bilevel.head_warmup_lr")],
)  # fmt: skip
def test_inf_and_nan_are_refused_with_the_key_named(cls, name, key, value):
    with pytest.raises(ConfigError, match=rf"'{key}'.*finite number"):
        load_config(cls, name, [f"{key}={value}"])


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_an_empty_or_comment_only_config_file_is_refused(tmp_path, text):
    """It would run the defaults without a word."""
    (tmp_path / "empty.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"empty\.yaml is empty \(or only comments\); write settings in it"):
        load_config(PretrainConfig, tmp_path / "empty.yaml")
