"""LoRA adapters (peft) on any backbone: frozen base weights, trainable low-rank updates.

A LoRA spec ``{"r": 8, "alpha": 8, "dropout": 0.0, "targets": ["q", "v"]}`` names the modules to adapt (peft's
``target_modules``: module names or name suffixes). :func:`apply_lora` first splits every timm ViT block's fused
``qkv`` Linear into ``q``, ``k``, ``v`` (same outputs, :func:`bissl.models.timm_vit.split_qkv`) so that ``q`` and ``v``
can be targeted alone (BiSSLight's choice, the default), freezes every parameter of the backbone, and injects the
adapters with ``peft.inject_adapter_in_model`` (no ``PeftModel`` wrapper: the module stays the backbone, keys become
``blocks.0.attn.q.base_layer.weight``, ``blocks.0.attn.q.lora_A.default.weight``, ...). peft initialises ``B = 0``:
the adapted backbone computes exactly what the base computed.

Only the adapters require gradients, so everything that trains ``p.requires_grad`` parameters trains LoRA only: the
BiSSL trainer's theta and phi, its proximal term, Hessian operator and M-FAC window; fine-tuning with
``trainable: lora``. A backbone file records the spec (``spec["lora"]``) and
:func:`bissl.engine.checkpoint.load_backbone` re-applies it before loading the weights, adapters included.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from bissl.utils.errors import ConfigError

LORA_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 8.0, "dropout": 0.0, "targets": ["q", "v"]}


def lora_spec(spec: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``spec`` validated and completed with :data:`LORA_DEFAULTS` (``None`` stays ``None``: no adapters)."""
    if spec is None:
        return None
    unknown = sorted(set(spec) - set(LORA_DEFAULTS))
    if unknown:
        raise ConfigError(f"lora: unknown keys {unknown}; allowed: {', '.join(LORA_DEFAULTS)}")
    out = {**LORA_DEFAULTS, **spec}
    out["targets"] = [out["targets"]] if isinstance(out["targets"], str) else list(out["targets"])
    if int(out["r"]) < 1 or float(out["alpha"]) <= 0 or not 0 <= float(out["dropout"]) < 1 or not out["targets"]:
        raise ConfigError(f"lora: need r >= 1, alpha > 0, 0 <= dropout < 1 and targets; got {dict(spec)}")
    return {"r": int(out["r"]), "alpha": float(out["alpha"]), "dropout": float(out["dropout"]),
            "targets": [str(t) for t in out["targets"]]}  # fmt: skip


def has_lora(module: nn.Module) -> bool:
    return any("lora_" in name for name, _ in module.named_parameters())


def apply_lora(module: nn.Module, spec: Mapping[str, Any]) -> nn.Module:
    """Inject LoRA adapters described by ``spec`` into ``module`` (in place; returned); every other parameter is
    frozen. Raises ConfigError if peft is missing, the module already has adapters, or no module matches."""
    spec = lora_spec(spec)
    assert spec is not None
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("LoRA needs peft: pip install 'bissl[vit]'") from None
    if has_lora(module):
        raise ConfigError(f"{type(module).__name__} already has LoRA adapters")
    try:
        from bissl.models.timm_vit import split_qkv
    except ImportError:  # no timm: nothing to split
        pass
    else:
        split_qkv(module)
    for param in module.parameters():
        param.requires_grad_(False)
    config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                        target_modules=spec["targets"])  # fmt: skip
    try:
        inject_adapter_in_model(config, module)
    except ValueError as exc:
        raise ConfigError(f"lora: {str(exc).splitlines()[0][:200]} (targets {spec['targets']})") from None
    for name, param in module.named_parameters():
        param.requires_grad_("lora_" in name)
    module.lora_spec = spec
    return module


def set_trainable(module: nn.Module, which: str) -> None:
    """``all``: every parameter trains; ``lora``: the adapters only (ConfigError if there are none); ``auto``: the
    adapters when the module has them, else all."""
    if which == "auto":
        which = "lora" if has_lora(module) else "all"
    if which == "lora" and not has_lora(module):
        raise ConfigError("trainable=lora but the backbone has no LoRA adapters; set lora: {r: 8, ...}")
    if which not in ("all", "lora"):
        raise ConfigError(f"trainable must be 'all' or 'lora', got {which!r}")
    for name, param in module.named_parameters():
        param.requires_grad_(which == "all" or "lora_" in name)
