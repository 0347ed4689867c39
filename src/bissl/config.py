"""Typed configuration: pydantic models, YAML files and dotted command-line overrides.

A setting flows one way: YAML file -> ``key=value`` overrides -> validated config object -> the one
function that uses it. Unknown keys and bad values are rejected before any work starts, with the
dotted key named (:class:`~bissl.utils.errors.ConfigError`).
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bissl.utils.errors import ConfigError
from bissl.utils.plugins import merge_plugins

Device = Literal["auto", "cpu", "cuda"]
#: modules (or .py files, recorded as absolute paths) imported before a config's names are checked: bissl.utils.plugins
Plugins = Annotated[list[str], AfterValidator(lambda refs: merge_plugins(refs))]


class NestedValidationError(ValueError):
    """A validation error of a plug-in's own config (e.g. a pretext method's ``params``), reported by key."""

    def __init__(self, error: ValidationError, prefix: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.prefix = prefix


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(StrictModel):
    """Which dataset, where it lies, and how it is batched."""

    name: str = "digits"
    root: str | None = None
    image_size: int = Field(16, gt=0)
    download: bool = False
    batch_size: int = Field(128, gt=0)
    num_workers: int = Field(0, ge=0)
    seed: int = 0  # seed of the dataset's train/val split (kept apart from the run seed)


class BackboneConfig(StrictModel):
    """A registered backbone (``bissl.models.BACKBONES``) and optional local weights to start from."""

    name: str = "small_cnn"
    small_images: bool = True
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None
    # LoRA adapters {r, alpha, dropout, targets} on the (frozen) backbone: bissl.models.lora; None: none
    lora: dict[str, Any] | None = None


class PretextSection(StrictModel):
    """A registered pretext method and its hyper-parameters (validated by the method's own Config)."""

    name: str = "simclr"
    params: dict[str, Any] = Field(default_factory=dict)
    augmentation: str | None = None  # default: the method's own
    augmentation_params: dict[str, Any] = Field(default_factory=dict)


class OptimConfig(StrictModel):
    """Optimizer, cosine learning-rate schedule with linear warm-up, and gradient clipping."""

    name: str = "sgd"
    lr: float = Field(0.1, gt=0)
    weight_decay: float = Field(1e-6, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_epochs: float = Field(0.0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(None, gt=0)


def _check_warmup(optim: OptimConfig, epochs: int, key: str) -> None:
    if optim.warmup_epochs >= epochs:
        raise ValueError(f"{key}={optim.warmup_epochs} must be shorter than the run ({epochs} epochs); lower it")


class MonitorConfig(StrictModel):
    """Periodic kNN accuracy of the frozen backbone on a labelled dataset (off when ``every_epochs`` is 0)."""

    dataset: str | None = None  # default: the training dataset, when it has labels
    every_epochs: int = Field(1, ge=0)
    knn_k: int = Field(20, gt=0)
    knn_temperature: float = Field(0.07, gt=0)
    linear_probe_epochs: int = Field(100, ge=0)  # final linear probe on the test split (0: skip)


class LogConfig(StrictModel):
    every_steps: int = Field(10, gt=0)
    tensorboard: bool = True
    progress: bool = True


Precision = Literal["fp32", "bf16"]


class DistributedConfig(StrictModel):
    """Settings of multi-process runs (``torchrun``; docs/distributed.md). ``augment_shards`` acts in any run."""

    sync_batchnorm: bool = False  # BatchNorm statistics over every rank's samples (nn.SyncBatchNorm on CUDA)
    augment_shards: int | None = Field(None, gt=0)  # views drawn per shard; None: processes x grad_accumulation


class PretrainConfig(StrictModel):
    """``bissl pretrain``: self-supervised pretraining of a backbone with a pretext method."""

    seed: int = 0
    out_dir: str = "runs/pretrain"
    plugins: Plugins = Field(default_factory=list)
    device: Device = "auto"
    epochs: int = Field(30, gt=0)
    checkpoint_every_steps: int = Field(0, ge=0)  # 0: at the end of every epoch only
    data: DataConfig = Field(default_factory=DataConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    pretext: PretextSection = Field(default_factory=PretextSection)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    precision: Precision = "fp32"  # bf16: autocast on CUDA (fp32 with a warning elsewhere)
    channels_last: bool = False  # channels-last (NHWC) convolution weights (1.1-1.2x measured on CPU)
    grad_accumulation: int = Field(1, ge=1)  # micro-batches per global batch of data.batch_size
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @model_validator(mode="after")
    def _warmup_within_run(self) -> PretrainConfig:
        _check_warmup(self.optim, self.epochs, "optim.warmup_epochs")
        return self


class DownstreamConfig(StrictModel):
    """A downstream task (``bissl.downstream.DOWNSTREAM_TASKS``) on a dataset, optionally restricted to k shots per
    class or some classes; ``params`` are the task's own settings, validated by its ``Config``."""

    task: str = "classification"
    data: DataConfig = Field(default_factory=DataConfig)
    params: dict[str, Any] = Field(default_factory=dict)
    few_shot: int | None = Field(None, gt=0)  # k labelled training images per class
    few_shot_seed: int | None = None  # seed of the few-shot draw; None: data.seed (a study sets its replicate's)
    classes: list[int] | None = None  # keep only these classes (relabelled 0..n-1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # classification's cross-entropy
    augment: bool = True  # the task's training augmentation (classification: crop + flip as the dataset declares)


class LevelConfig(StrictModel):
    """Batch size and optimizer of one level of the bilevel problem."""

    batch_size: int = Field(128, gt=0)
    optim: OptimConfig = Field(default_factory=OptimConfig)


class SolverConfig(StrictModel):
    """The linear solver of ``(I + H/mu) x = v`` (``bissl.bilevel.SOLVERS``)."""

    # cg | recycled_cg (deflated CG sharing the cycle's Krylov directions: 13-19% fewer HVPs measured, but 2 x 16
    # stored parameter-sized vectors; benchmarks/README.md) | neumann | identity | exact | layerwise | mfac
    name: str = "cg"
    iters: int = Field(10, ge=0)  # the most iterations (a cap when tol is set); the paper: 5
    # relative residual at which to stop; 5e-4 keeps the relative error of the solution <= 1e-3 at the default
    # damping (measured: benchmarks/README.md; ResNet-18 needs 6 iterations); None: exactly iters (the paper)
    tol: float | None = Field(5e-4, gt=0)
    hvp: str | None = None  # Hessian-vector product method; None: the library default
    warm_start: bool = False  # start each solve from the previous solution
    hessian_fraction: float = Field(1.0, gt=0, le=1)  # H on this fraction of the cycle's pretext batch
    mfac_window: int = Field(20, gt=0)  # name=mfac: Fisher of the last m lower-level pretext gradients
    mfac_block_size: int | None = Field(None, gt=0)  # name=mfac: None, one block per parameter tensor
    # name=mfac: the window's storage: fp32 | bf16 | fp16 (half the memory) | cpu (host memory); maths in fp32
    mfac_storage: Literal["fp32", "bf16", "fp16", "cpu"] = "fp32"
    recycle_vectors: int = Field(16, gt=0)  # name=recycled_cg: directions kept (2 parameter-sized vectors each)


class BilevelConfig(StrictModel):
    """BiSSL's bilevel hyper-parameters (defaults: the paper's public code)."""

    cycles: int = Field(500, gt=0)
    n_lower: int = Field(20, gt=0)
    n_upper: int = Field(8, ge=0)  # 0: the pretext-only control: lower steps pulled to a phi that stays pretrained
    lam: float = Field(1e-3, gt=0)
    damping: float = Field(10.0, ge=0)
    gamma: float = Field(1.0, ge=0)  # weight of the plain L_D(phi, omega) term
    lower_grad_clip: float | None = Field(10.0, gt=0)
    upper_grad_clip: float | None = Field(10.0, gt=0)
    solver: SolverConfig = Field(default_factory=SolverConfig)
    head_warmup_epochs: int = Field(20, ge=0)
    head_warmup_lr: float = Field(0.01, gt=0)


class AlignConfig(StrictModel):
    """``bissl align``: the BiSSL stage between pretraining and fine-tuning."""

    seed: int = 0
    out_dir: str = "runs/align"
    plugins: Plugins = Field(default_factory=list)
    device: Device = "auto"
    pretrained: str = "runs/pretrain_digits"  # a pretrain run folder or its backbone.pt
    # LoRA adapters {r, alpha, dropout, targets} added to the pretrained backbone: theta and phi are then each their
    # own adapters on one shared frozen base (BiSSLight); None: the whole backbone
    lora: dict[str, Any] | None = None
    pretext: PretextSection | None = None  # None: the method and heads saved by pretraining
    pretext_data: DataConfig = Field(default_factory=DataConfig)
    downstream: DownstreamConfig = Field(default_factory=DownstreamConfig)
    lower: LevelConfig = Field(default_factory=LevelConfig)
    upper: LevelConfig = Field(default_factory=LevelConfig)
    bilevel: BilevelConfig = Field(default_factory=BilevelConfig)
    checkpoint_every_cycles: int = Field(10, gt=0)
    log: LogConfig = Field(default_factory=LogConfig)
    # bf16: forward passes under autocast on CUDA (fp32 with a warning elsewhere); backward passes, Hessian-vector
    # products and the solver's vectors stay fp32
    precision: Precision = "fp32"
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)  # under torchrun: docs/distributed.md


class HPOConfig(StrictModel):
    """Random/TPE search over ``optim.lr`` and ``optim.weight_decay`` (Optuna), then the best setting per seed.

    Defaults follow the paper: random search, lr in [1e-4, 1], weight decay in [1e-5, 1e-2] (log-uniform).
    """

    trials: int = Field(0, ge=0)  # finished trials the study should hold; 0: no search, one plain run
    sampler: Literal["random", "tpe"] = "random"
    pruner: Literal["median", "none"] = "median"
    lr_range: tuple[float, float] = (1e-4, 1.0)
    weight_decay_range: tuple[float, float] = (1e-5, 1e-2)
    storage: str | None = None  # Optuna storage URL (e.g. postgresql://...); None: sqlite:///<out_dir>/study.db
    study_name: str = "finetune"
    heartbeat_s: int = Field(30, gt=0)  # a RUNNING trial without a heartbeat for 2x this is failed and re-queued
    final_seeds: list[int] = Field(default_factory=lambda: [0])  # runs of the best setting; []: search only

    @field_validator("lr_range", "weight_decay_range")
    @classmethod
    def _positive_increasing(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] < value[1]:
            raise ValueError("must be [low, high] with 0 < low < high")
        return value


class FinetuneConfig(StrictModel):
    """``bissl finetune``: supervised fine-tuning of a backbone (from ``pretrain`` or ``align``) on a task."""

    seed: int = 0
    out_dir: str = "runs/finetune"
    plugins: Plugins = Field(default_factory=list)
    device: Device = "auto"
    backbone: str = "runs/align_digits"  # a run folder or its backbone.pt
    lora: dict[str, Any] | None = None  # LoRA adapters to add (if the backbone has none): bissl.models.lora
    # what trains besides the head: all | lora (the adapters only) | auto (lora if the backbone has adapters)
    trainable: Literal["auto", "all", "lora"] = "auto"
    downstream: DownstreamConfig = Field(default_factory=DownstreamConfig)
    epochs: int = Field(30, gt=0)
    batch_size: int = Field(64, gt=0)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=0.01, weight_decay=1e-4))
    eval_every_epochs: int = Field(1, gt=0)
    # LP-FT: epochs of training the head alone on the frozen backbone first; the probe is epoch 0's candidate for
    # model selection (0: the head starts fresh)
    head_warmup_epochs: int = Field(0, ge=0)
    head_warmup_lr: float = Field(0.05, gt=0)
    log: LogConfig = Field(default_factory=LogConfig)
    hpo: HPOConfig = Field(default_factory=HPOConfig)
    precision: Precision = "fp32"  # bf16: autocast on CUDA (fp32 with a warning elsewhere)
    channels_last: bool = False  # channels-last (NHWC) convolution weights (1.1-1.2x measured on CPU)
    grad_accumulation: int = Field(1, ge=1)  # micro-batches per global batch of batch_size
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @model_validator(mode="after")
    def _warmup_within_run(self) -> FinetuneConfig:
        _check_warmup(self.optim, self.epochs, "optim.warmup_epochs")
        return self


class EvaluateConfig(StrictModel):
    """``bissl evaluate``: kNN and linear-probe accuracy of a frozen backbone, and a t-SNE plot of its features."""

    seed: int = 0
    out_dir: str = "runs/evaluate"
    plugins: Plugins = Field(default_factory=list)
    device: Device = "auto"
    backbone: str = "runs/pretrain_digits"  # a run folder or its backbone.pt
    downstream: DownstreamConfig = Field(default_factory=DownstreamConfig)
    knn_k: int = Field(20, gt=0)
    knn_temperature: float = Field(0.07, gt=0)
    linear_probe_epochs: int = Field(100, ge=0)  # 0: no linear probe
    linear_probe_lr: float = Field(1e-2, gt=0)
    linear_probe_weight_decay: float = Field(1e-4, ge=0)
    embedding: bool = True  # embedding.png: t-SNE of the TEST features coloured by class (needs matplotlib)
    embedding_max_points: int = Field(2000, ge=3)
    log: LogConfig = Field(default_factory=LogConfig)
    precision: Precision = "fp32"  # bf16: feature extraction under autocast on CUDA
    channels_last: bool = False  # channels-last (NHWC) convolution weights (1.1-1.2x measured on CPU)


class DataSource(StrictModel):
    """Where every stage of a study finds its data (overrides each stage's ``root``/``download`` when set)."""

    root: str | None = None
    download: bool = False


class TaskSpec(StrictModel):
    """One downstream task of a study: a name (its folder), the task's config, and nested overrides of
    the study's ``finetune`` / ``align`` settings for this task (e.g. more epochs for a few-shot task),
    applied to every arm alike so that the arms stay comparable."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    downstream: DownstreamConfig = Field(default_factory=DownstreamConfig)
    finetune: dict[str, Any] = Field(default_factory=dict)
    align: dict[str, Any] = Field(default_factory=dict)


class ArmSpec(StrictModel):
    """One arm of a study: fine-tuning from the pretrained backbone, or from BiSSL's theta (``bissl: true``).

    ``align`` holds nested overrides of the study's ``align`` settings for this arm only (e.g. another
    solver or damping), so a new arm is a config entry, not code.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    bissl: bool = False
    align: dict[str, Any] = Field(default_factory=dict)


class ReplicateSpec(StrictModel):
    """What a study's replicate (one entry of ``seeds``) varies besides its alignment / fine-tuning seed: its own
    pretraining run (``pretrain``) and its own draw of the few-shot training subset (``few_shot``). Off, every
    replicate shares ``pretrain.seed``'s run / ``data.seed``'s draw, and that variance is outside the statistics."""

    pretrain: bool = True
    few_shot: bool = True


class SearchSpec(StrictModel):
    """A study's fine-tuning search: ``trials`` settings of ``optim.lr`` / ``optim.weight_decay`` (log-uniform in
    the ranges) per arm and task, scored on validation, the same budget for every arm, each arm's candidates drawn
    by its own sampler seed; ``trials: 0`` fine-tunes every arm with the study's fixed settings."""

    trials: int = Field(0, ge=0)
    sampler: Literal["random", "tpe"] = "random"
    pruner: Literal["median", "none"] = "none"
    lr_range: tuple[float, float] = (1e-3, 0.3)
    weight_decay_range: tuple[float, float] = (1e-5, 1e-2)

    def hpo(self) -> HPOConfig:
        """The search as a fine-tuning stage's ``hpo`` section (no final runs: the study runs its seeds)."""
        return HPOConfig(final_seeds=[], **self.model_dump())


def _default_arms() -> list[ArmSpec]:
    return [ArmSpec(name="conventional"), ArmSpec(name="bissl", bissl=True)]


class PipelineConfig(StrictModel):
    """``bissl pipeline``: every arm x task x replicate (``seeds``), then the report.

    A replicate pretrains with its seed, draws its few-shot subset with it, and aligns / fine-tunes with it
    (``replicate`` turns the first two off; ``pretrained`` pins pretraining to one run). ``pretrain``, ``align``
    and ``finetune`` are the stage configs shared by all runs; the pipeline sets their ``out_dir``, ``seed``,
    ``device``, ``pretrained``/``backbone`` and ``downstream`` per run.
    """

    out_dir: str = "runs/pipeline_digits"
    plugins: Plugins = Field(default_factory=list)
    device: Device = "auto"
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)  # one replicate each
    replicate: ReplicateSpec = Field(default_factory=ReplicateSpec)
    pretrained: str | None = None  # every replicate starts from this pretrain run folder / backbone.pt (pinned)
    data: DataSource = Field(default_factory=DataSource)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    search: SearchSpec = Field(default_factory=SearchSpec)
    evaluate: EvaluateConfig = Field(default_factory=lambda: EvaluateConfig(embedding=False))  # frozen probes
    tasks: list[TaskSpec] = Field(default_factory=lambda: [TaskSpec(name="digits")], min_length=1)
    arms: list[ArmSpec] = Field(default_factory=_default_arms, min_length=1)
    baseline: str = "conventional"
    embedding: bool = True
    embedding_max_points: int = Field(1000, ge=10)
    quick: list[str] = Field(default_factory=list)  # dotted overrides applied by `bissl pipeline --quick`

    @model_validator(mode="after")
    def _stages_inherit_plugins(self) -> PipelineConfig:
        """Every stage config imports the study's ``plugins`` too (before its own)."""
        for name in ("pretrain", "align", "finetune"):
            stage = getattr(self, name)
            merged = merge_plugins(self.plugins, stage.plugins)
            if merged != stage.plugins:  # a copy: a stage config the caller passed in stays as it was
                setattr(self, name, stage.model_copy(update={"plugins": merged}))
        return self

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        for kind, names in (("seed", self.seeds), ("task", [t.name for t in self.tasks]), ("arm", self.arm_names())):
            if len(set(names)) != len(names):
                raise ValueError(f"{kind}s must be unique, got {names}")
        if self.baseline not in self.arm_names():
            raise ValueError(f"baseline={self.baseline!r} is not an arm; choose one of {self.arm_names()}")
        for t, task in enumerate(self.tasks):
            try:
                self.task_finetune(task)
            except ValidationError as exc:
                raise NestedValidationError(exc, f"tasks.{t}.finetune") from None
            for i, arm in enumerate(self.arms):
                try:
                    self.arm_align(arm, task)
                except ValidationError as exc:
                    raise NestedValidationError(exc, f"tasks.{t}.align / arms.{i}.align") from None
        return self

    def arm_names(self) -> list[str]:
        return [arm.name for arm in self.arms]

    def pretrain_seed(self, seed: int) -> int:
        """The pretraining seed of replicate ``seed`` (``pretrain.seed`` when replicates share one run)."""
        return seed if self.replicate.pretrain else self.pretrain.seed

    def few_shot_seed(self, seed: int) -> int | None:
        """The few-shot draw of replicate ``seed`` (None: the task's own, ``data.seed``, shared by replicates)."""
        return seed if self.replicate.few_shot else None

    def is_control(self, arm: ArmSpec) -> bool:
        """Whether ``arm`` is the same-compute control: BiSSL's lower level with no upper level (``n_upper: 0``)."""
        return arm.bissl and all(self.arm_align(arm, task).bilevel.n_upper == 0 for task in self.tasks)

    def arm_align(self, arm: ArmSpec, task: TaskSpec) -> AlignConfig:
        """The study's align settings with ``task``'s, then ``arm``'s overrides applied (validated)."""
        merged = deep_merge(deep_merge(self.align.model_dump(mode="json"), task.align), arm.align)
        return AlignConfig.model_validate(merged)

    def task_finetune(self, task: TaskSpec) -> FinetuneConfig:
        """The study's fine-tuning settings with ``task``'s overrides applied (validated)."""
        return FinetuneConfig.model_validate(deep_merge(self.finetune.model_dump(mode="json"), task.finetune))


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``update`` merged in recursively (``update`` wins at the leaves)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    first = exc.errors()[0]
    loc = ".".join(str(part) for part in first["loc"] if part != "__root__")
    key = ".".join(part for part in (prefix, loc) if part)
    nested = first.get("ctx", {}).get("error")
    if isinstance(nested, NestedValidationError):
        return format_validation_error(nested.error, prefix=".".join(p for p in (key, nested.prefix) if p))
    if first["type"] == "extra_forbidden":
        return f"unknown config key {key!r}; remove it or check its spelling"
    message = str(first["msg"]).removeprefix("Value error, ")
    given = first.get("input")
    if not key:
        return f"bad config: {message}"
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"bad config value for {key!r}: {message}{shown}"


def shipped_config_path(name: str) -> Path:
    """Path of a config shipped with the package (``bissl/configs/<name>.yaml``)."""
    return Path(str(resources.files("bissl") / "configs" / f"{name.removesuffix('.yaml')}.yaml"))


def shipped_config_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml")
        for p in (resources.files("bissl") / "configs").iterdir()
        if p.name.endswith(".yaml")
    )


def resolve_config_path(path_or_name: str | Path) -> Path:
    """A YAML path, or the name of a shipped config (e.g. ``pretrain_digits``)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    shipped = shipped_config_path(str(path_or_name))
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"config file {str(path_or_name)!r} not found; give a YAML path or one of: {', '.join(shipped_config_names())}"
    )


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Set ``key.subkey=value`` overrides (values parsed as YAML) in a copy of ``data``; a value replaces
    whatever was there, so ``pretext.params={}`` clears a method's parameters."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad override {item!r}; write it as key.subkey=value")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return out


def build_config(cls: type[ConfigT], data: dict[str, Any] | None = None) -> ConfigT:
    """Validate a nested dict into ``cls``; any problem becomes one ConfigError naming the key."""
    try:
        return cls.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


EXTENDS_KEY = "extends"


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise ConfigError(
                    f"{mark.name}:{mark.line + 1}:{mark.column + 1}: key {key!r} appears twice in one mapping; "
                    "keep one of them"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(path: Path) -> Any:
    """The YAML document in ``path``; a syntax error or a duplicate key is one line ``file:line:column: ...``."""
    text = path.read_text()
    loader = _StrictLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = " ".join(str(exc.problem or exc.context or type(exc).__name__).split())
        raise ConfigError(f"{where}: not valid YAML ({problem}); fix its syntax") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML ({type(exc).__name__}); fix its syntax") from None
    finally:
        loader.dispose()


def read_config_file(path_or_name: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping a YAML config file (or shipped config name) holds, with its ``extends:`` chain resolved.

    ``extends: BASE`` (a shipped config name, or a path relative to the file) loads ``BASE`` first and merges
    this file over it: mappings merge key by key, any other value (a list, a scalar) replaces the base's. So a
    study that differs from ``pipeline_digits`` only in its arms is ``extends: pipeline_digits`` plus ``arms:``.
    """
    path = Path(path_or_name)
    if _seen and not path.is_absolute():
        relative = _seen[-1].parent / path
        path = relative if relative.is_file() else path
    try:
        path = resolve_config_path(path).resolve()
    except ConfigError as exc:
        if not _seen:
            raise
        raise ConfigError(f"{_seen[-1]}: 'extends: {path_or_name}': {exc}") from None
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"config files extend each other in a loop ({chain}); remove one 'extends:'")
    loaded = _load_yaml(path)
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    data: dict[str, Any] = loaded or {}
    base = data.pop(EXTENDS_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"'extends' in {path} must name one config file or shipped config (got {base!r})")
    return deep_merge(read_config_file(base, (*_seen, path)), data)


def load_config(
    cls: type[ConfigT], path_or_name: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ConfigT:
    """Load a YAML file (or shipped config name; ``extends:`` resolved), apply dotted overrides, validate."""
    data = read_config_file(path_or_name) if path_or_name is not None else {}
    return build_config(cls, apply_overrides(data, overrides))


def to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


STAGE_CONFIGS: dict[str, type[BaseModel]] = {
    "pretrain": PretrainConfig,
    "align": AlignConfig,
    "finetune": FinetuneConfig,
    "pipeline": PipelineConfig,
    "evaluate": EvaluateConfig,
}


def config_class_for(name: str) -> type[BaseModel]:
    """The config class of a shipped config, from its ``<stage>_`` name prefix (e.g. ``pretrain_digits``)."""
    stage = Path(name).name.split("_")[0]
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"config {name!r} does not start with a stage name ({', '.join(STAGE_CONFIGS)})")
    return STAGE_CONFIGS[stage]
