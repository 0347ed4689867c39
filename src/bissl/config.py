"""Typed configuration: pydantic models, YAML files and dotted command-line overrides.

A setting flows one way: YAML file -> ``key=value`` overrides -> validated config object -> the one
function that uses it. Unknown keys and bad values are rejected before any work starts, with the
dotted key named (:class:`~bissl.utils.errors.ConfigError`).
"""

from __future__ import annotations

import copy
import warnings
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bissl.utils.errors import ConfigError
from bissl.utils.plugins import is_path, merge_plugins

Device = Literal["auto", "cpu", "cuda"]
#: modules (or .py files, recorded as absolute paths) imported before a config's names are checked: bissl.utils.plugins
Plugins = Annotated[list[str], AfterValidator(lambda refs: merge_plugins(refs))]


def _folder_name(name: str) -> str:
    """A study's task or arm name, which names its folder: ``.``/``..`` would write outside the study."""
    if not 0 < len(name) <= 100 or name in (".", "..") or not set(name) <= _FOLDER_CHARS:
        raise ValueError(f"{name!r} is not a folder name: use 1-100 letters, digits, '_', '.', '-', not '.' or '..'")
    return name


_FOLDER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
FolderName = Annotated[str, AfterValidator(_folder_name)]


class NestedValidationError(ValueError):
    """A validation error of a plug-in's own config (e.g. a pretext method's ``params``), reported by key."""

    def __init__(self, error: ValidationError, prefix: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.prefix = prefix


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, assignments are validated, and no number is NaN or inf."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _in_machine_range(cls, value: Any) -> Any:
        """Numbers torch can hold: a float within float32's range, an int (a seed) within int64's."""
        if isinstance(value, float) and abs(value) > FLOAT32_MAX:
            raise ValueError(f"beyond float32's range (|x| <= {FLOAT32_MAX:.3g}); choose a smaller value")
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            raise ValueError("beyond a 64-bit integer's range; choose a smaller value")
        return value


FLOAT32_MAX = 3.4028234663852886e38


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


class AlignPretextSection(PretextSection):
    """The lower level's pretext section in ``align``: the method and its params are the pretrained run's
    (``pretext_head.pt``); ``name`` / ``params`` set here must match them (``params`` may add
    ``gather_distributed``), the view augmentation may change."""

    name: str | None = None  # type: ignore[assignment]  # None: the pretrained run's method


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


class RunConfig(StrictModel):
    """The fields every stage config starts with (pretrain, align, finetune, evaluate); a stage sets its own
    ``out_dir`` default. Kept to the leading fields so that a stage's field order (its config.yaml) is unchanged."""

    seed: int = 0
    out_dir: str  # each stage sets its own default
    plugins: Plugins = Field(default_factory=list)
    device: Device = "auto"


class PretrainConfig(RunConfig):
    """``bissl pretrain``: self-supervised pretraining of a backbone with a pretext method."""

    out_dir: str = "runs/pretrain"
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


#: downstream options that moved into the task's ``params`` (0.2.0), with their old defaults
MOVED_TO_PARAMS: dict[str, Any] = {"label_smoothing": 0.0, "augment": True}


class DownstreamConfig(StrictModel):
    """A downstream task (``bissl.downstream.DOWNSTREAM_TASKS``) on a dataset, optionally restricted to k shots per
    class or some classes; ``params`` are the task's own settings, validated by its ``Config``."""

    task: str = "classification"
    data: DataConfig = Field(default_factory=DataConfig)
    params: dict[str, Any] = Field(default_factory=dict)
    few_shot: int | None = Field(None, gt=0)  # k labelled training images per class
    few_shot_seed: int | None = None  # seed of the few-shot draw; None: data.seed (a study sets its replicate's)
    classes: list[int] | None = None  # keep only these classes (relabelled 0..n-1)

    @model_validator(mode="before")
    @classmethod
    def _moved_to_params(cls, data: Any) -> Any:
        """``label_smoothing`` / ``augment`` were set here before 0.2.0; they are the task's ``params`` now. A value
        other than the old default moves there with a FutureWarning; the default (which every earlier run's
        config.yaml holds) is dropped, as the task's own default is the same."""
        if not isinstance(data, dict) or not MOVED_TO_PARAMS.keys() & data.keys():
            return data
        data, params = dict(data), dict(data.get("params") or {})
        for key, default in MOVED_TO_PARAMS.items():
            value = data.pop(key, default)
            if value == default:
                continue
            if params.setdefault(key, value) != value:
                raise ValueError(f"{key} and params.{key} disagree; set params.{key} only")
            warnings.warn(f"downstream.{key} is deprecated; set downstream.params.{key}", FutureWarning, stacklevel=2)
        return {**data, "params": params}


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
    # what the cycles run (bissl.bilevel.rivals): bissl (the implicit hypergradient) | multitask (lower steps on
    # L_P + multitask_weight x L_D on one backbone, no upper level: n_upper 0) | penalty (a first-order bilevel
    # solution: the value-function penalty with weight penalty_rho, no Hessian)
    rule: Literal["bissl", "multitask", "penalty"] = "bissl"
    multitask_weight: float = Field(1.0, ge=0)
    penalty_rho: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _multitask_has_no_upper_level(self) -> BilevelConfig:
        if self.rule == "multitask" and self.n_upper != 0:
            raise ValueError(f"rule=multitask has lower steps only; set n_upper=0 (got {self.n_upper})")
        return self


class AlignConfig(RunConfig):
    """``bissl align``: the BiSSL stage between pretraining and fine-tuning."""

    out_dir: str = "runs/align"
    pretrained: str = "runs/pretrain_digits"  # a pretrain run folder or its backbone.pt
    # LoRA adapters {r, alpha, dropout, targets} added to the pretrained backbone: theta and phi are then each their
    # own adapters on one shared frozen base (BiSSLight); None: the whole backbone
    lora: dict[str, Any] | None = None
    pretext: AlignPretextSection | None = None  # None: the method, heads and views saved by pretraining
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


def _log_range(value: tuple[float, float] | None) -> tuple[float, float] | None:
    """A log-uniform search range: ``[low, high]`` with ``0 < low < high``."""
    if value is not None and not 0 < value[0] < value[1]:
        raise ValueError("must be [low, high] with 0 < low < high")
    return value


class HPOConfig(StrictModel):
    """Random/TPE search over ``optim.lr`` and ``optim.weight_decay`` (and the L2-SP weight ``l2sp`` when
    ``l2sp_range`` is set; Optuna), then the best setting per seed.

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
    l2sp_range: tuple[float, float] | None = None  # also search the L2-SP weight ``l2sp`` (log-uniform) when set

    _ranges = field_validator("lr_range", "weight_decay_range", "l2sp_range")(_log_range)


class FinetuneConfig(RunConfig):
    """``bissl finetune``: supervised fine-tuning of a backbone (from ``pretrain`` or ``align``) on a task."""

    out_dir: str = "runs/finetune"
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
    # L2-SP (Li et al. 2018): the loss gains l2sp / 2 * ||w - w0||^2 over the backbone's trainable parameters, w0
    # the backbone fine-tuning starts from, so fine-tuning keeps what the task does not need changed (0: off)
    l2sp: float = Field(0.0, ge=0)
    backbone_lr_factor: float = Field(1.0, ge=0)  # backbone lr = this x optim.lr (the head's); 0: backbone not stepped
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


class EvaluateConfig(RunConfig):
    """``bissl evaluate``: kNN and linear-probe accuracy of a frozen backbone, and a t-SNE plot of its features."""

    out_dir: str = "runs/evaluate"
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

    name: FolderName
    downstream: DownstreamConfig = Field(default_factory=DownstreamConfig)
    finetune: dict[str, Any] = Field(default_factory=dict)
    align: dict[str, Any] = Field(default_factory=dict)


ArmKind = Literal["conventional", "bissl", "tapt", "multitask", "penalty", "probe"]
#: arm kinds whose starting backbone comes out of the align stage (BiSSL, or a rival rule of its loop)
ALIGNED_KINDS = ("bissl", "tapt", "multitask", "penalty")
#: arm kinds at equal compute with a BiSSL arm (``ArmSpec.budget``)
RIVAL_KINDS = ("tapt", "multitask", "penalty")


class ArmSpec(StrictModel):
    """One arm of a study, by ``kind``:

    - ``conventional``: fine-tunes the pretrained backbone;
    - ``bissl`` (or ``bissl: true``): fine-tunes BiSSL's theta (the align stage);
    - ``tapt``: task-adaptive pretraining: more pretext steps (the pretrained method and heads) on the task's
      training images, from the pretrained backbone, then fine-tuning;
    - ``multitask``: one backbone on ``L_P + w L_D`` (``align.bilevel.multitask_weight``), then fine-tuning;
    - ``penalty``: a first-order bilevel solution (value-function penalty, no Hessian; ``bissl.bilevel.rivals``),
      then fine-tuning of its penalised theta;
    - ``probe``: no fine-tuning; its result is the frozen linear probe of the pretrained backbone.

    ``align`` holds nested overrides of the study's ``align`` settings for this arm only (e.g. another
    solver or damping), so a new arm is a config entry, not code. ``budget`` (``tapt``, ``multitask``,
    ``penalty``): the BiSSL arm whose measured backbone backward passes + Hessian-vector products (same task and
    seed) this arm's cycles are sized to match; ``None``: the study's first ``bissl`` arm with an upper level;
    ``own``: the arm's own ``align.bilevel.cycles``. ``hvp_passes``: what one of that arm's Hessian-vector products
    counts for in backward passes (1: a count; ~3.4 matches CPU time on the small conv net, benchmarks/README.md).
    """

    name: FolderName
    kind: ArmKind = "conventional"
    bissl: bool = False  # the same as kind: bissl (kept for configs written before kinds)
    align: dict[str, Any] = Field(default_factory=dict)
    budget: str | None = None
    hvp_passes: float = Field(1.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _kind_from_bissl(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("bissl"):
            if data.get("kind", "bissl") != "bissl":
                raise ValueError(f"bissl: true contradicts kind: {data['kind']}; keep one of them")
            return {**data, "kind": "bissl"}
        if isinstance(data, dict) and data.get("kind") == "bissl":
            return {**data, "bissl": True}
        return data

    @property
    def aligns(self) -> bool:
        """Whether the arm's starting backbone comes out of the align stage."""
        return self.kind in ALIGNED_KINDS


#: what each rival kind sets in the study's align settings (before the arm's own ``align`` overrides)
KIND_ALIGN: dict[str, dict[str, Any]] = {
    "tapt": {"bilevel": {"rule": "multitask", "multitask_weight": 0.0, "n_upper": 0, "head_warmup_epochs": 0}},
    "multitask": {"bilevel": {"rule": "multitask", "n_upper": 0}},
    "penalty": {"bilevel": {"rule": "penalty"}},
}


class ReplicateSpec(StrictModel):
    """What a study's replicate (one entry of ``seeds``) varies besides its alignment / fine-tuning seed: its own
    pretraining run (``pretrain``) and its own draw of the few-shot training subset (``few_shot``). Off, every
    replicate shares ``pretrain.seed``'s run / ``data.seed``'s draw, and that variance is outside the statistics."""

    pretrain: bool = True
    few_shot: bool = True


class SearchSpec(StrictModel):
    """A study's fine-tuning search: ``trials`` settings of ``optim.lr`` / ``optim.weight_decay`` (and ``l2sp``
    with ``l2sp_range``; log-uniform in the ranges) per arm and task, scored on validation, the same budget for
    every arm, each arm's candidates drawn by its own sampler seed; a ``multitask`` arm's trials also draw its
    ``align.bilevel.multitask_weight`` (in ``multitask_weight_range``) and align with it first. ``trials: 0``
    fine-tunes every arm with the study's fixed settings (and a multitask arm aligns with its configured w)."""

    trials: int = Field(0, ge=0)
    sampler: Literal["random", "tpe"] = "random"
    pruner: Literal["median", "none"] = "none"
    lr_range: tuple[float, float] = (1e-3, 0.3)
    weight_decay_range: tuple[float, float] = (1e-5, 1e-2)
    l2sp_range: tuple[float, float] | None = None  # also search fine-tuning's L2-SP weight (log-uniform) when set
    # a multitask arm's w of L_P + w L_D (log-uniform), searched with its lr / weight decay: each trial aligns with it
    multitask_weight_range: tuple[float, float] = (0.1, 10.0)

    _ranges = field_validator("multitask_weight_range")(_log_range)

    def hpo(self) -> HPOConfig:
        """The search as a fine-tuning stage's ``hpo`` section (no final runs: the study runs its seeds)."""
        return HPOConfig(final_seeds=[], **self.model_dump(exclude={"multitask_weight_range"}))


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
    # dotted overrides applied by `bissl pipeline --quick`; they win over the tasks' own values (apply_preset)
    quick: list[str] = Field(default_factory=list)

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
        bissl_arms = [a.name for a in self.arms if a.kind == "bissl"]
        for arm in self.arms:
            if arm.budget not in (None, "own", *bissl_arms):
                raise ValueError(
                    f"arm {arm.name!r}: budget={arm.budget!r} is not a bissl arm; name one of {bissl_arms} or 'own'"
                )
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
        return arm.kind == "bissl" and all(self.arm_align(arm, task).bilevel.n_upper == 0 for task in self.tasks)

    def budget_arm(self, arm: ArmSpec) -> ArmSpec | None:
        """The BiSSL arm whose measured compute ``arm`` matches (``ArmSpec.budget``); ``None``: its own cycles."""
        if arm.kind not in RIVAL_KINDS or arm.budget == "own":
            return None
        if arm.budget is not None:
            return next(a for a in self.arms if a.name == arm.budget)
        return next((a for a in self.arms if a.kind == "bissl" and not self.is_control(a)), None)

    def arm_align(self, arm: ArmSpec, task: TaskSpec) -> AlignConfig:
        """The study's align settings with ``task``'s, then the arm kind's (``KIND_ALIGN``; ``tapt``: the task's
        data as pretext data), then ``arm``'s overrides applied (validated)."""
        kind = deep_merge(KIND_ALIGN.get(arm.kind, {}), {"pretext_data": task.downstream.data.model_dump(mode="json")}
                          if arm.kind == "tapt" else {})  # fmt: skip
        merged = deep_merge(deep_merge(deep_merge(self.align.model_dump(mode="json"), task.align), kind), arm.align)
        return AlignConfig.model_validate(merged)

    def task_finetune(self, task: TaskSpec) -> FinetuneConfig:
        """The study's fine-tuning settings with ``task``'s overrides applied (validated)."""
        return FinetuneConfig.model_validate(deep_merge(self.finetune.model_dump(mode="json"), task.finetune))


class Replace(dict):  # type: ignore[type-arg]
    """A mapping tagged ``!replace`` in YAML: merged over another mapping, it replaces it instead of merging into it
    (``params: !replace {}`` clears a method's parameters that a base config set)."""


#: keys that name a registered object, and the keys holding that object's own settings: a new name drops them
NAMING_KEYS = ("name", "task")
NAMED_SETTINGS = ("params", "kwargs")


def _forget_renamed(section: dict[str, Any], update: dict[str, Any]) -> None:
    """Remove the named object's settings (``params``, ``kwargs``) from ``section`` when ``update`` names another
    object: ``pretext.name: vicreg`` over SimCLR's section drops SimCLR's ``temperature``."""
    for key in NAMING_KEYS:
        old, new = section.get(key), update.get(key)
        if isinstance(old, str) and isinstance(new, str) and old.lower() != new.lower():
            for setting in NAMED_SETTINGS:
                section.pop(setting, None)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``update`` merged in recursively (``update`` wins at the leaves; a :class:`Replace`
    mapping replaces; a section whose name changes loses the old object's settings: :func:`_forget_renamed`)."""
    out = copy.deepcopy(base)
    _forget_renamed(out, update)
    for key, value in update.items():
        merge = isinstance(value, dict) and not isinstance(value, Replace) and isinstance(out.get(key), dict)
        out[key] = deep_merge(out[key], value) if merge else value
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
    """The runnable shipped configs; ``_base_*.yaml`` files are partial bases that others ``extends:``."""
    return sorted(
        p.name.removesuffix(".yaml")
        for p in (resources.files("bissl") / "configs").iterdir()
        if p.name.endswith(".yaml") and not p.name.startswith("_")
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


def _parse_override(item: str) -> tuple[list[str], Any]:
    """``key.subkey=value`` as its key path and its value parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"bad override {item!r}; write it as key.subkey=value")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def value_at(data: Any, parts: list[str]) -> Any:
    """The value at a key path in nested mappings; ``None`` where it is missing."""
    for part in parts:
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _set_at(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set the value at a key path, making (or replacing non-mapping values by) mappings on the way."""
    for part in parts[:-1]:
        if not isinstance(data.get(part), dict):
            data[part] = {}
        data = data[part]
    data[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Set ``key.subkey=value`` overrides (values parsed as YAML) in a copy of ``data``; a value replaces
    whatever was there, so ``pretext.params={}`` clears a method's parameters. A new ``pretext.name`` drops the
    old method's ``params`` from ``data`` first (:func:`_forget_renamed`), so ``pretext.params=...`` given with it
    stays, in either order."""
    out = copy.deepcopy(data)
    parsed = [_parse_override(item) for item in overrides]
    for parts, value in parsed:
        node = value_at(out, parts[:-1])
        if isinstance(node, dict):
            _forget_renamed(node, {parts[-1]: value})
    for parts, value in parsed:
        _set_at(out, parts, value)
    return out


#: the study sections a task of a study overrides for itself (``TaskSpec``)
TASK_SECTIONS = ("finetune", "align")


def apply_preset(
    data: dict[str, Any], preset: list[str] | tuple[str, ...], overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """``data`` with a preset's overrides (``bissl pipeline --quick``), then ``overrides``. The preset wins over a
    study task's own values: each of its ``finetune.*`` / ``align.*`` keys is also set, at its final value (an
    explicit override of it still wins), on every task of ``tasks``; an arm's ``align`` still wins, so a control
    arm (``n_upper: 0``) stays one."""
    out = apply_overrides(data, [*preset, *overrides])
    for parts, _ in map(_parse_override, preset):
        if parts[0] in TASK_SECTIONS and len(parts) > 1:
            for task in out.get("tasks") or []:
                if isinstance(task, dict):
                    _set_at(task, parts, copy.deepcopy(value_at(out, parts)))
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

    def construct_replace(self, node: yaml.Node) -> Replace:
        """``!replace {...}``: a mapping that replaces the base config's instead of merging into it."""
        if not isinstance(node, yaml.MappingNode):
            mark = node.start_mark
            raise ConfigError(
                f"{mark.name}:{mark.line + 1}:{mark.column + 1}: !replace applies to a mapping only (a list or a "
                "value replaces the base's anyway); remove the tag"
            )
        return Replace(self.construct_mapping(node, deep=True))


_StrictLoader.add_constructor("!replace", _StrictLoader.construct_replace)


def _plugins_next_to(node: Any, folder: Path) -> Any:
    """``node`` with every relative ``.py`` path in a ``plugins:`` list made relative to ``folder`` (that of the
    YAML file naming it, as for ``extends:``), unless only the path as written exists."""
    if isinstance(node, list):
        return [_plugins_next_to(item, folder) for item in node]
    if not isinstance(node, dict):
        return node
    out = type(node)({key: _plugins_next_to(value, folder) for key, value in node.items()})
    refs = out.get("plugins")
    if isinstance(refs, list):
        out["plugins"] = [_next_to(ref, folder) if isinstance(ref, str) and is_path(ref) else ref for ref in refs]
    return out


def _next_to(ref: str, folder: Path) -> str:
    """A plug-in file path of a YAML file in ``folder``, as the path to use."""
    path = Path(ref).expanduser()
    if path.is_absolute() or (path.is_file() and not (folder / path).is_file()):
        return ref
    return str(folder / path)


def _load_yaml(path: Path) -> Any:
    """The YAML document in ``path``; a syntax error or a duplicate key is one line ``file:line:column: ...``."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text (YAML) file; pass a YAML config") from None
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
    A mapping tagged ``!replace`` replaces the base's; a new ``name`` (or ``task``) drops the old object's
    ``params`` / ``kwargs`` (:func:`deep_merge`). ``plugins:`` files are relative to the file naming them.
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
    if loaded is None:  # would run the defaults without a word
        raise ConfigError(f"config file {path} is empty (or only comments); write settings in it, or omit --config")
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    data: dict[str, Any] = _plugins_next_to(loaded, path.parent)
    base = data.pop(EXTENDS_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"'extends' in {path} must name one config file or shipped config (got {base!r})")
    return deep_merge(read_config_file(base, (*_seen, path)), data)


def load_config(
    cls: type[ConfigT],
    path_or_name: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    preset: list[str] | tuple[str, ...] = (),
) -> ConfigT:
    """Load a YAML file (or shipped config name; ``extends:`` resolved), apply a ``preset`` (:func:`apply_preset`)
    and dotted overrides, validate."""
    data = read_config_file(path_or_name) if path_or_name is not None else {}
    return build_config(cls, apply_preset(data, preset, overrides))


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
