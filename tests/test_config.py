import pytest

from bissl.cli import VERBS, build_parser, load_verb_config
from bissl.config import (
    KIND_ALIGN,
    AlignConfig,
    ArmSpec,
    PipelineConfig,
    PretrainConfig,
    apply_overrides,
    config_class_for,
    deep_merge,
    load_config,
    shipped_config_names,
    value_at,
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


def test_arm_kinds_keep_bissl_true_and_size_rivals_by_a_bissl_arm():
    assert ArmSpec(name="a", bissl=True).kind == "bissl" and ArmSpec(name="a", kind="bissl").bissl
    with pytest.raises(ValueError, match="contradicts"):
        ArmSpec(name="a", bissl=True, kind="tapt")
    cfg = load_config(PipelineConfig, "pipeline_rivals_digits")
    arms = {arm.name: arm for arm in cfg.arms}
    assert cfg.budget_arm(arms["penalty"]) is arms["bissl"] and cfg.budget_arm(arms["probe"]) is None
    tapt = cfg.arm_align(arms["tapt"], cfg.tasks[0])
    assert tapt.bilevel.rule == "multitask" and tapt.bilevel.multitask_weight == 0 and tapt.bilevel.n_upper == 0
    assert tapt.pretext_data == cfg.tasks[0].downstream.data  # the task's own images
    with pytest.raises(ConfigError, match="budget='conventional' is not a bissl arm"):
        load_config(PipelineConfig, "pipeline_rivals_digits", ["arms=[{name: conventional}, {name: m, kind: multitask, "
                                                               "budget: conventional}]"])  # fmt: skip
    with pytest.raises(ConfigError, match="n_upper=0"):
        load_config(PipelineConfig, "pipeline_rivals_digits", ["arms=[{name: conventional}, {name: m, kind: multitask, "
                                                               "align: {bilevel: {n_upper: 2}}}]"])  # fmt: skip


def test_plugin_files_in_a_yaml_are_relative_to_it(tmp_path, monkeypatch):
    """#20 item 9: a study run from another folder finds the plug-ins its YAML names, at every level."""
    (tmp_path / "study" / "plugins").mkdir(parents=True)
    (tmp_path / "study" / "plugins" / "mine.py").write_text("")
    (tmp_path / "study" / "base.yaml").write_text("plugins: [plugins/mine.py, a_module]\n")
    (tmp_path / "study" / "study.yaml").write_text("extends: base.yaml\npretrain: {plugins: [./plugins/mine.py]}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(PipelineConfig, "study/study.yaml")
    mine = str(tmp_path / "study" / "plugins" / "mine.py")
    assert cfg.plugins == [mine, "a_module"] and cfg.pretrain.plugins == [mine, "a_module"]


def test_a_new_method_name_drops_the_old_params_and_replace_clears_a_mapping(tmp_path):
    """#20 item 10: another pretext method over pipeline_digits' SimCLR, by YAML and by override."""
    (tmp_path / "vicreg.yaml").write_text("extends: pipeline_digits\npretrain: {pretext: {name: vicreg}}\n")
    cfg = load_config(PipelineConfig, tmp_path / "vicreg.yaml")
    validate_names(cfg)
    assert cfg.pretrain.pretext.name == "vicreg" and cfg.pretrain.pretext.params == {}
    for given in ({}, {"sim_coeff": 20}):  # an override's new params stay, before or after the new name
        overrides = ["pretrain.pretext.name=vicreg", *(f"pretrain.pretext.params.{k}={v}" for k, v in given.items())]
        cfg = load_config(PipelineConfig, "pipeline_digits", overrides[::-1])
        validate_names(cfg)
        assert cfg.pretrain.pretext.params == given
    (tmp_path / "cleared.yaml").write_text(
        "extends: pipeline_digits\npretrain:\n  pretext: {params: !replace {}}\n  backbone: !replace {name: resnet18}\n"
    )
    cfg = load_config(PipelineConfig, tmp_path / "cleared.yaml")
    assert cfg.pretrain.pretext.name == "simclr" and cfg.pretrain.pretext.params == {}
    assert cfg.pretrain.backbone.name == "resnet18" and cfg.pretrain.backbone.kwargs == {}
    (tmp_path / "bad.yaml").write_text("extends: pipeline_digits\nseeds: !replace [1]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:2:8: !replace applies to a mapping only"):
        load_config(PipelineConfig, tmp_path / "bad.yaml")


@pytest.mark.parametrize("name", [n for n in shipped_config_names() if n.startswith("pipeline_")])
def test_every_quick_preset_wins_over_the_tasks_and_is_small(name):
    """#20 item 14: `--quick` is a smoke test for every shipped study: the preset's fine-tuning and alignment values
    hold on every task (pipeline_detection_synthetic's task sets `finetune.epochs: 2`, its preset 1), and each stage
    is a few epochs / cycles."""
    cfg = load_verb_config(VERBS["pipeline"], build_parser().parse_args(["pipeline", "--config", name, "--quick"]))
    assert len(cfg.seeds) <= 2 and cfg.pretrain.epochs <= 8 and cfg.search.trials <= 2
    keys = [item.partition("=")[0].split(".") for item in cfg.quick]
    for task in cfg.tasks:
        finetune = cfg.task_finetune(task)
        assert finetune.epochs <= 3 and finetune.hpo.trials == 0
        for _section, *key in (k for k in keys if k[0] == "finetune"):
            assert value_at(finetune.model_dump(), key) == value_at(cfg.finetune.model_dump(), key), (task.name, key)
        for arm in cfg.arms:
            align = cfg.arm_align(arm, task)
            assert align.bilevel.cycles <= 2 and align.bilevel.head_warmup_epochs <= 2
            own = deep_merge(KIND_ALIGN.get(arm.kind, {}), arm.align)  # what the arm's kind and the arm set win
            for _section, *key in (k for k in keys if k[0] == "align" and value_at(own, k[1:]) is None):
                assert value_at(align.model_dump(), key) == value_at(cfg.align.model_dump(), key), (arm.name, key)


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
