"""Object detection as a downstream task: torchvision's Faster R-CNN on the backbone's feature maps.

Registered and built through :class:`~bissl.downstream.base.DownstreamTask`'s contract exactly like a user's task.
The backbone's trunk is what BiSSL's upper level owns (phi; theta below); the region proposal network, the RoI
heads and (``cut: fpn``) the feature pyramid are the downstream head (omega). :meth:`DetectionTask.loss` runs the
steps of torchvision's ``GeneralizedRCNN`` on a backbone given per call: transform (resize + normalise with the
DATASET's mean/std: images reach the detector in [0, 1]), the backbone's feature maps, RPN, RoI heads; it returns
the sum of the four losses.

Cuts (``downstream.params.cut``):

* ``fpn``: a feature pyramid over the backbone's maps (``feature_maps``; all by default), the default 2-FC box head
  (``representation_size``, passed as ``box_head``: torchvision's ``FasterRCNN`` would silently ignore it);
* ``c4``: the trunk runs up to the second-to-last stage (ResNet ``layer3``), the RPN and a 14x14 RoIAlign work on
  that map, and the backbone's LAST stage (``layer4``) + average pooling is the box head, as in the R50-C4 protocol
  (MoCo, DenseCL). That last stage stays the backbone's: fine-tuning trains it, and in ``bissl align`` it is part of
  theta and phi, so the proximal term and the Hessian cover it too (the paper's C4 code moved it into the pretext
  head instead; here the pretext head is the method's own).

The RPN and RoI heads sample anchors and proposals at random. The draws come from a seed that :meth:`prepare` draws
from the batch's generator and :meth:`loss` uses in a forked RNG: the losses at theta and at phi of one BiSSL upper
step see the same samples, and a resumed run draws what an uninterrupted one would.

Data: items ``(image [C, S, S] in [0, 1], {"boxes": [N, 4] xyxy pixels, "labels": [N] in 0..K-1, "difficult":
[N]})``, a dataset whose ``info.kind == "detection"`` and which declares a ``collate`` (images stacked, targets a
list of dicts). Training flips images horizontally with p = 0.5 when the dataset is mirror-invariant.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, cast

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from bissl.config import DownstreamConfig
from bissl.data.base import ImageDataset, collate_of
from bissl.data.detection import hflip_detection
from bissl.downstream.base import DOWNSTREAM_TASKS, DownstreamTask, Metric, Splits, TaskConfig, evaluating
from bissl.eval.detection_metrics import detection_metrics
from bissl.models.backbones import feature_map_channels_of
from bissl.utils.errors import ConfigError
from bissl.utils.rows import Rows

Target = dict[str, Tensor]


class DetectionConfig(TaskConfig):
    """``downstream.params`` of ``detection``; the defaults are sized for 64 px synthetic images on a CPU."""

    cut: Literal["fpn", "c4"] = "fpn"
    norm: Literal["frozen_bn", "bn", "gn"] = "frozen_bn"  # the FPN's norm layers (torchvision's RPN head has none)
    feature_maps: list[str] | None = None  # fpn: the backbone maps the pyramid reads; None: all it declares
    fpn_channels: int = Field(64, gt=0)
    anchor_sizes: list[int] = Field(default_factory=lambda: [8, 16, 32, 64])  # one per level, else all at each
    aspect_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0])
    # images are resized so their short side is min_size (long side <= max_size); a list: one drawn per training
    # image (multi-scale training, torchvision's transform), the last at evaluation
    min_size: int | list[int] = 64
    max_size: int = Field(64, gt=0)
    rpn_pre_nms_top_n: tuple[int, int] = (300, 150)  # (training, testing)
    rpn_post_nms_top_n: tuple[int, int] = (100, 50)
    rpn_batch_size_per_image: int = Field(64, gt=0)
    box_batch_size_per_image: int = Field(64, gt=0)
    box_detections_per_img: int = Field(20, gt=0)
    box_score_thresh: float = Field(0.01, ge=0)
    representation_size: int = Field(128, gt=0)  # fpn's 2-FC box head
    roi_output_size: int = Field(7, gt=0)  # fpn: 7; c4 pools 2x this and the last stage halves it
    eval_batch_size: int = Field(16, gt=0)
    augment: bool = True  # flip training images where the dataset is mirror-invariant (was downstream.augment)


def _norm_layer(norm: str) -> Callable[[int], nn.Module]:
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    return lambda channels: nn.GroupNorm(math.gcd(32, channels), channels)


class _StageBoxHead(nn.Module):
    """C4's box head: the backbone's last stage + average pooling, on the backbone of the current call.

    The stage is not a submodule (its parameters are the backbone's); :meth:`DetectionHead.using` binds it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._stage: list[nn.Module] = []

    def forward(self, x: Tensor) -> Tensor:
        if not self._stage:
            raise RuntimeError("the C4 box head runs inside DetectionHead.using(backbone)")
        return self._stage[0](x).mean(dim=(2, 3))


class DetectionHead(nn.Module):
    """What a detector holds besides the backbone: transform, (FPN,) RPN and RoI heads."""

    def __init__(
        self,
        transform: GeneralizedRCNNTransform,
        rpn: RegionProposalNetwork,
        roi_heads: RoIHeads,
        maps: Sequence[str],
        fpn: nn.Module | None = None,
        box_stage: str | None = None,
    ) -> None:
        super().__init__()
        self.transform, self.rpn, self.roi_heads, self.fpn = transform, rpn, roi_heads, fpn
        self.maps, self.box_stage = list(maps), box_stage

    @contextlib.contextmanager
    def using(self, backbone: nn.Module) -> Iterator[None]:
        """C4: the box head runs ``backbone``'s last stage for the duration."""
        box_head = self.roi_heads.box_head
        if self.box_stage is None:
            yield
            return
        box_head._stage[:] = [backbone.feature_stage(self.box_stage)]
        try:
            yield
        finally:
            box_head._stage.clear()

    def features(self, backbone: nn.Module, images: Tensor) -> OrderedDict[str, Tensor]:
        maps = backbone.feature_maps(images, last=self.maps[-1])
        chosen = OrderedDict((name, maps[name]) for name in self.maps)
        return self.fpn(chosen) if self.fpn is not None else chosen

    def run(
        self, backbone: nn.Module, images: Tensor, targets: list[Target] | None
    ) -> tuple[dict[str, Tensor], list[Target]]:
        """GeneralizedRCNN's forward: losses (modules in train mode, ``targets`` given) or detections (eval mode)."""
        sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        image_list, targets = self.transform(list(images), targets)
        with self.using(backbone):
            features = self.features(backbone, image_list.tensors)
            proposals, rpn_losses = self.rpn(image_list, features, targets)
            detections, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        detections = self.transform.postprocess(detections, image_list.image_sizes, sizes)
        return {**rpn_losses, **roi_losses}, detections


@contextlib.contextmanager
def _sampling_seed(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNG seeded with ``seed`` for the duration, restored afterwards (the RPN / RoI samplers use it)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@DOWNSTREAM_TASKS.register("detection")
class DetectionTask(DownstreamTask):
    """Faster R-CNN on the backbone's feature maps (module docstring)."""

    metrics = (
        Metric("ap50_voc07", label="AP50 (VOC07)", unit="%", scale=100.0),
        Metric("map", label="mAP@[.5:.95]", unit="%", scale=100.0),
        Metric("map_75", label="AP75", unit="%", scale=100.0),
    )
    Config = DetectionConfig

    def __init__(
        self, num_classes: int, *, mean: Sequence[float], std: Sequence[float], params: DetectionConfig, flip: bool
    ) -> None:
        if num_classes < 1:
            raise ConfigError(f"detection needs at least one object class (got {num_classes})")
        self.num_classes = num_classes
        self.mean, self.std = list(mean), list(std)
        self.params = params
        self.flip = flip

    @classmethod
    def from_config(cls, cfg: DownstreamConfig, splits: Splits) -> DetectionTask:
        params = cast(DetectionConfig, cls.parse_params(cfg))
        info = splits["train"].info
        if getattr(info, "kind", "classification") != "detection":
            raise ConfigError(
                f"downstream.task=detection needs a detection dataset (boxes); downstream.data.name={cfg.data.name!r} "
                f"holds {getattr(info, 'kind', 'classification')} targets"
            )
        if cfg.few_shot is not None or cfg.classes is not None:
            raise ConfigError("downstream.few_shot / downstream.classes select classification labels; unset them")
        return cls(
            info.num_classes,
            mean=info.mean,
            std=info.std,
            params=params,
            flip=params.augment and info.mirror_invariant,
        )

    # ------------------------------------------------------------------------------------------- head
    def build_head(self, feature_dim: int) -> nn.Module:
        raise ConfigError("detection builds its head on the backbone's feature maps: call build_head_for(backbone)")

    def build_head_for(self, backbone: nn.Module) -> nn.Module:
        p = self.params
        channels = feature_map_channels_of(backbone)
        norm = _norm_layer(p.norm)
        sizes = tuple(p.min_size) if isinstance(p.min_size, list) else p.min_size
        transform = GeneralizedRCNNTransform(sizes, p.max_size, self.mean, self.std)
        fpn: nn.Module | None = None
        box_stage: str | None = None
        if p.cut == "fpn":
            maps = p.feature_maps or list(channels)
            unknown = [m for m in maps if m not in channels]
            if unknown:
                raise ConfigError(
                    f"downstream.params.feature_maps: {unknown} not among the backbone's {list(channels)}"
                )
            fpn = FeaturePyramidNetwork(
                [channels[m] for m in maps], p.fpn_channels, extra_blocks=LastLevelMaxPool(), norm_layer=norm
            )
            levels, rpn_channels, pooled = len(maps) + 1, p.fpn_channels, p.roi_output_size
            box_head: nn.Module = TwoMLPHead(p.fpn_channels * pooled**2, p.representation_size)
            box_dim = p.representation_size
        else:
            names = list(channels)
            if len(names) < 2:
                raise ConfigError("cut=c4 needs a backbone with at least two feature stages")
            maps, box_stage = [names[-2]], names[-1]
            levels, rpn_channels, pooled = 1, channels[names[-2]], 2 * p.roi_output_size
            box_head, box_dim = _StageBoxHead(), channels[names[-1]]
        sizes = (
            tuple((s,) for s in p.anchor_sizes) if len(p.anchor_sizes) == levels else (tuple(p.anchor_sizes),) * levels
        )
        anchors = AnchorGenerator(sizes, (tuple(p.aspect_ratios),) * levels)
        rpn = RegionProposalNetwork(
            anchors,
            RPNHead(rpn_channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=p.rpn_batch_size_per_image,
            positive_fraction=0.5, nms_thresh=0.7,
            pre_nms_top_n={"training": p.rpn_pre_nms_top_n[0], "testing": p.rpn_pre_nms_top_n[1]},
            post_nms_top_n={"training": p.rpn_post_nms_top_n[0], "testing": p.rpn_post_nms_top_n[1]},
        )  # fmt: skip
        predictor = FastRCNNPredictor(box_dim, self.num_classes + 1)
        roi_heads = RoIHeads(
            MultiScaleRoIAlign(maps, pooled, sampling_ratio=2), box_head, predictor,
            fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=p.box_batch_size_per_image,
            positive_fraction=0.25, bbox_reg_weights=None, score_thresh=p.box_score_thresh, nms_thresh=0.5,
            detections_per_img=p.box_detections_per_img,
        )  # fmt: skip
        return DetectionHead(transform, rpn, roi_heads, maps, fpn=fpn, box_stage=box_stage)

    # ------------------------------------------------------------------------------------------- training
    def prepare(
        self, batch: Any, device: torch.device, generator: torch.Generator | None
    ) -> tuple[Tensor, list, Tensor]:
        """``(images in [0, 1], targets with labels 1..K (0: background), sampling seeds [B])`` on ``device``."""
        images, targets = batch
        images = images.to(device, non_blocking=True)
        targets = [
            {"boxes": t["boxes"].to(device).float(), "labels": t["labels"].to(device).long() + 1} for t in targets
        ]
        seed = 0
        if generator is not None:
            if self.flip:
                mask = torch.rand(len(images), generator=generator) < 0.5
                images, targets = hflip_detection(images, targets, mask.to(device))
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return images, Rows(targets), torch.full((len(images),), seed, dtype=torch.int64)

    def loss(self, backbone: nn.Module, head: nn.Module, batch: tuple[Tensor, list[Target], Tensor]) -> Tensor:
        images, targets, seeds = batch
        with _sampling_seed(int(seeds[0]), images.device):
            losses, _ = head.run(backbone, images.to(_dtype(head, images)), [dict(t) for t in targets])
        return sum(losses.values())  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def predict(
        self, backbone: nn.Module, head: nn.Module, dataset: ImageDataset, device: torch.device
    ) -> tuple[list[Target], list[Target]]:
        """Per-image detections (labels 0..K-1) and targets of ``dataset``, in eval mode, on the CPU."""
        predictions: list[Target] = []
        targets: list[Target] = []
        loader = DataLoader(
            dataset, batch_size=self.params.eval_batch_size, shuffle=False, collate_fn=collate_of(dataset)
        )
        with evaluating(backbone, head):
            for images, batch_targets in loader:
                images = images.to(device)
                _, detections = head.run(backbone, images.to(_dtype(head, images)), None)
                predictions += [
                    {
                        "boxes": d["boxes"].float().cpu(),
                        "scores": d["scores"].float().cpu(),
                        "labels": d["labels"].cpu() - 1,
                    }
                    for d in detections
                ]
                targets += [{k: v.cpu() for k, v in t.items()} for t in batch_targets]
        return predictions, targets

    def score(self, predictions: tuple[list[Target], list[Target]]) -> dict[str, float]:
        preds, targets = predictions
        return detection_metrics(list(preds), list(targets), self.num_classes)


def _dtype(head: nn.Module, images: Tensor) -> torch.dtype:
    """The head's parameter dtype (float64 in exact tests), so images follow the model."""
    param = next(head.parameters(), None)
    return param.dtype if param is not None else images.dtype


__all__ = ["DetectionConfig", "DetectionHead", "DetectionTask", "detection_metrics", "hflip_detection"]
