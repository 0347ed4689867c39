"""Loading local weights into a backbone: torchvision/timm state dicts, SSL checkpoints, bissl backbone files.

Foreign checkpoints wrap the backbone's tensors in containers (``{"state_dict": ...}``, ``{"teacher": ...}``)
and prefix their names (``module.``, ``backbone.``, ...). :func:`load_backbone_weights` unwraps the
container, strips the prefixes that make the names match the backbone best, drops classifier weights the
backbone does not have (and MAE's decoder), lets a backbone adapt foreign names and shapes (an
``adapt_state_dict(state) -> state`` method: the ViT resamples its position embedding and splits fused ``qkv``
weights), and refuses (``CheckpointError``, one line) anything that does not fit.

Layouts recognised (tested with a torchvision ResNet-18 saved in each, ``tests/models/test_weights.py``):

* torchvision and timm ResNets: plain state dicts, ``fc.*`` dropped; the Barlow Twins and VICReg releases'
  ``resnet50.pth`` are such plain dicts;
* full training checkpoints of the official releases: MoCo v3 (``state_dict`` / ``module.base_encoder.``; the
  momentum encoder is ignored), MoCo v1/v2 (``module.encoder_q.``), SimSiam (``module.encoder.``, its projector in
  ``fc.*`` dropped), Barlow Twins / VICReg (``model`` / ``module.backbone.``), DINO (``teacher`` / ``backbone.``);
* solo-learn (``state_dict`` / ``backbone.``, Lightning checkpoints), lightly (``backbone.0.``, ``backbone.4.1.``...:
  a ``nn.Sequential`` of the ResNet's children, indices mapped back to the children's names), VISSL
  (``classy_state_dict`` / ``base_model`` / ``model`` / ``trunk`` / ``_feature_blocks.``), ``torch.compile``
  (``_orig_mod.``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bissl.utils.errors import CheckpointError
from bissl.utils.io import load_torch

BACKBONE_FORMAT = "bissl.backbone/v1"
"""``format`` of bissl's backbone files ``{"format", "backbone": spec, "feature_dim", "state_dict"}``."""

log = logging.getLogger("bissl.models")

CONTAINER_KEYS = (
    "state_dict", "model", "backbone", "teacher", "student", "network", "net", "module",
    "classy_state_dict", "base_model", "trunk",  # VISSL: classy_state_dict.base_model.model.trunk
)  # fmt: skip
PREFIXES = (
    "module.", "backbone.", "encoder.", "model.", "_orig_mod.",
    "base_encoder.", "encoder_q.",  # MoCo v3, MoCo v1/v2: the query encoder (never the momentum one)
    "trunk.", "_feature_blocks.",  # VISSL
)  # fmt: skip
CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.")
# parts of a pretraining checkpoint that are not the backbone, dropped when the backbone has no such key: MAE's
# decoder and mask token (official MAE checkpoints ``{"model": {...}}``)
EXTRA_PREFIXES = ("decoder_", "mask_token")
_MAX_STRIPPED = 4  # prefixes stripped at most, e.g. "module.model.backbone."


@dataclass(frozen=True)
class LoadReport:
    """Backbone keys the weights did not provide, weight keys the backbone does not have, how many tensors
    were loaded and how the checkpoint's names were mapped (``layout``: e.g. ``strip 'module.base_encoder.'``)."""

    missing: list[str]
    unexpected: list[str]
    loaded: int = 0
    layout: str = "names as saved"

    def describe(self) -> str:
        """One line: what was loaded, the mapping, and the missing / unexpected keys (first few of each)."""
        return (
            f"loaded {self.loaded} tensors ({self.layout}); {len(self.missing)} missing ({_brief(self.missing)}), "
            f"{len(self.unexpected)} unexpected ({_brief(self.unexpected)})"
        )


def extract_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """The name -> tensor mapping inside a loaded checkpoint.

    A mapping of tensors is returned as is; a bissl backbone file yields its ``state_dict``; otherwise the
    first of :data:`CONTAINER_KEYS` holding a mapping is opened, recursively.
    """
    obj = checkpoint
    while True:
        if not isinstance(obj, Mapping) or not obj:
            raise CheckpointError(
                f"found no state dict in the checkpoint (got {type(obj).__name__}); save the backbone's state_dict()"
            )
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        fmt = obj.get("format")
        if isinstance(fmt, str) and fmt.startswith("bissl.backbone/"):
            if fmt != BACKBONE_FORMAT:
                raise CheckpointError(f"backbone file format {fmt!r} is not supported (expected {BACKBONE_FORMAT!r})")
            obj = obj["state_dict"]
            continue
        inner = next((obj[key] for key in CONTAINER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if inner is None:
            keys = ", ".join(sorted(map(str, obj))[:8])
            raise CheckpointError(
                f"found no state dict in the checkpoint (top-level keys: {keys}); expected tensors or one of "
                f"{', '.join(CONTAINER_KEYS)}"
            )
        obj = inner


def _children_named(state: dict[str, torch.Tensor], children: Sequence[str]) -> dict[str, torch.Tensor]:
    """``state`` with leading indices renamed to the backbone's children (``4.0.conv1.weight`` ->
    ``layer1.0.conv1.weight``): the names of ``nn.Sequential(*list(model.children())[:-1])``, as lightly builds
    its backbones; ``{}`` when no key starts with such an index."""
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if not (head.isdigit() and int(head) < len(children) and rest):
            return {}
        out[f"{children[int(head)]}.{rest}"] = value
    return out


def _align_names(
    state: dict[str, torch.Tensor], target: set[str], children: Sequence[str] = ()
) -> tuple[dict[str, torch.Tensor], str]:
    """``state`` with the known prefixes stripped that make most of its names match ``target``, and a description.

    Searches every chain of up to ``_MAX_STRIPPED`` prefixes (keeping only the keys carrying them), each also with
    leading child indices renamed (:func:`_children_named`); ties go to fewer strips, so a user module whose own
    submodule is called ``encoder`` keeps its names.
    """
    best, best_score, best_layout = state, len(target.intersection(state)), "names as saved"
    frontier = [(state, "")]
    for depth in range(_MAX_STRIPPED + 1):
        candidates = []
        for cand, stripped in frontier:
            options = [] if depth == 0 else [(cand, stripped)]
            renamed = _children_named(cand, children)
            if renamed:
                options.append((renamed, stripped + "|children"))
            for sub, how in options:
                score = len(target.intersection(sub))
                if score > best_score:
                    prefix, _, renamed_flag = how.partition("|")
                    parts = [f"strip {prefix!r}"] if prefix else []
                    parts += ["child indices -> names"] if renamed_flag else []
                    best, best_score, best_layout = sub, score, ", ".join(parts)
            if depth == _MAX_STRIPPED:
                continue
            for prefix in PREFIXES:
                sub = {k[len(prefix) :]: v for k, v in cand.items() if k.startswith(prefix)}
                if sub:
                    candidates.append((sub, stripped + prefix))
        frontier = candidates
    return best, best_layout


def _likely_cause(key: str, first_key: str, ours: torch.Size, theirs: torch.Size) -> str:
    if key == first_key and len(ours) == len(theirs) == 4 and ours[0] == theirs[0]:
        if ours[1] != theirs[1]:
            return f"in_channels differs (checkpoint {theirs[1]}, backbone {ours[1]})"
        return (
            f"the small_images setting differs (checkpoint stem {theirs[2]}x{theirs[3]}, backbone {ours[2]}x{ours[3]}; "
            "small_images=True uses 3x3)"
        )
    return "the checkpoint is for another architecture or width (e.g. resnet50 weights for a resnet18)"


def _brief(keys: list[str], limit: int = 3) -> str:
    more = f", ... (+{len(keys) - limit})" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_backbone_weights(
    backbone: nn.Module,
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any],
    *,
    strict: bool = True,
) -> LoadReport:
    """Load local weights (a file, loaded with ``weights_only=True``, or an in-memory checkpoint) into ``backbone``.

    Shape mismatches always raise ``CheckpointError`` naming the first key, both shapes and the likely cause;
    with ``strict`` so do missing or unexpected keys (BatchNorm's ``num_batches_tracked`` may be missing).
    Nothing is loaded when an error is raised.
    """
    if isinstance(path_or_state_dict, Mapping):
        checkpoint = path_or_state_dict
        source = "the given state dict"
    else:
        checkpoint = load_torch(path_or_state_dict, weights_only=True)
        source = str(path_or_state_dict)
    ours = backbone.state_dict()
    children = [name for name, _ in backbone.named_children()]
    state, layout = _align_names(extract_state_dict(checkpoint), set(ours), children)
    adapt = getattr(backbone, "adapt_state_dict", None)  # e.g. ViT: resample pos_embed, split qkv (timm_vit.py)
    if callable(adapt):
        state = adapt(state)
    state = {k: v for k, v in state.items() if k in ours or not k.startswith(CLASSIFIER_PREFIXES + EXTRA_PREFIXES)}

    if not ours.keys() & state.keys():
        raise CheckpointError(
            f"no weight name in {source} matches {type(backbone).__name__} (checkpoint: {_brief(sorted(state))}; "
            f"backbone: {_brief(list(ours))}); the checkpoint is for another model, or its layout is not one of "
            "bissl.models.weights' (strip its prefix and save the backbone's state_dict())"
        )
    mismatched = [k for k in ours if k in state and state[k].shape != ours[k].shape]
    if mismatched:
        key = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        cause = _likely_cause(key, next(iter(ours)), ours[key].shape, state[key].shape)
        raise CheckpointError(
            f"weights in {source} do not fit the backbone: {key!r} has shape {list(state[key].shape)} in the "
            f"checkpoint but {list(ours[key].shape)} in the backbone{more}; likely cause: {cause}"
        )
    missing = [k for k in ours if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in ours]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"weights in {source} do not fit the backbone: {len(missing)} missing ({_brief(missing)}), "
            f"{len(unexpected)} unexpected ({_brief(unexpected)}); pass strict=False to load only the matching ones"
        )
    backbone.load_state_dict(state, strict=False)
    report = LoadReport(missing=missing, unexpected=unexpected, loaded=len(state) - len(unexpected), layout=layout)
    log.info("weights from %s: %s", source, report.describe())
    return report
