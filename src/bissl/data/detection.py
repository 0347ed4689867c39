"""What a detection dataset is in bissl: the item format, batching and the exact horizontal flip.

``dataset[i] -> (image, target)``: ``image`` a float tensor ``[C, S, S]`` in [0, 1], resized to the square
``image_size`` at load like every bissl dataset (detection images are resized to the square without cropping,
so every box survives; the aspect ratio is not kept); ``target`` a dict

- ``"boxes"``: float32 ``[N, 4]``, ``(x1, y1, x2, y2)`` in pixels of the returned image, continuous coordinates
  (pixel ``j`` covers ``[j, j + 1)``, so a box around pixels 3..5 is ``x1 = 3, x2 = 6``; ``0 <= x1 < x2 <= S``);
- ``"labels"``: int64 ``[N]`` in ``0..K-1``;
- ``"difficult"``: bool ``[N]`` (VOC's difficult objects, COCO's crowd regions): kept in the data so that a loss
  may use or drop them; the metrics (:mod:`bissl.eval.detection_metrics`) ignore them.

``info.kind == "detection"``; ``targets`` (the per-image integer samplers and carved splits need) is the label of
each image's first object, 0 for an image without objects. ``collate`` (a staticmethod on every detection dataset)
stacks the images and keeps the targets as a list; :func:`hflip_detection` mirrors a batch with its boxes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Target = dict[str, torch.Tensor]

DETECTION_KIND = "detection"


def make_target(boxes: object, labels: object, difficult: object | None = None) -> Target:
    """A target dict with the documented dtypes and shapes (``boxes`` reshaped to ``[N, 4]``, even when empty)."""
    box = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    label = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    flag = (
        torch.zeros(len(label), dtype=torch.bool)
        if difficult is None
        else torch.as_tensor(difficult, dtype=torch.bool).reshape(-1)
    )
    if not len(box) == len(label) == len(flag):
        raise ValueError(f"a target needs as many boxes, labels and flags, got {len(box)}, {len(label)}, {len(flag)}")
    return {"boxes": box, "labels": label, "difficult": flag}


def first_labels(labels: Sequence[torch.Tensor]) -> list[int]:
    """``targets`` of a detection dataset: each image's first object label, 0 for an image without objects."""
    return [int(label[0]) if len(label) else 0 for label in labels]


def collate_detection(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[torch.Tensor, list[Target]]:
    """``[(image, target), ...] -> (images [B, C, S, S], [target, ...])``: the DataLoader ``collate_fn``."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    images, targets = zip(*batch, strict=True)
    return torch.stack(list(images)), list(targets)


def hflip_detection(
    images: torch.Tensor, targets: Sequence[Target], flip: torch.Tensor
) -> tuple[torch.Tensor, list[Target]]:
    """Mirror left-right the images of the batch where ``flip[b]`` is true, and their boxes exactly.

    ``images`` ``[B, C, H, W]``, ``flip`` bool ``[B]`` (drawn by the caller, e.g. from a seeded generator). A
    mirrored box is ``x1' = W - x2, x2' = W - x1`` (continuous coordinates). Returns a new image tensor and new
    target dicts (other keys shared with the input); the inputs are not modified.
    """
    flip = torch.as_tensor(flip, dtype=torch.bool, device=images.device).reshape(-1)
    if images.ndim != 4 or len(flip) != len(images) or len(targets) != len(images):
        raise ValueError(
            f"hflip_detection needs images [B, C, H, W] with B targets and B flags, got {tuple(images.shape)}, "
            f"{len(targets)} targets and {len(flip)} flags"
        )
    width = images.shape[-1]
    out_images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    out_targets = []
    for target, mirrored in zip(targets, flip.tolist(), strict=True):
        target = dict(target)
        if mirrored:
            boxes = target["boxes"]
            target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        out_targets.append(target)
    return out_images, out_targets


def scale_boxes(boxes: torch.Tensor, sx: float, sy: float, size: int) -> torch.Tensor:
    """``boxes`` scaled by ``(sx, sy)`` and clipped to the ``size x size`` image."""
    scale = torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
    return (boxes.float() * scale).clamp_(0.0, float(size))
