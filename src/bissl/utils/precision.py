"""Mixed precision: which precision a device runs, and the autocast context every forward pass of a stage uses."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch


def resolve_precision(precision: str, device: torch.device) -> str:
    """``bf16`` on CUDA; elsewhere ``fp32`` (with a warning when ``bf16`` was asked for)."""
    if precision == "bf16" and device.type != "cuda":
        warnings.warn(f"precision=bf16 needs a CUDA device; running in fp32 on {device}", stacklevel=2)
        return "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA for ``precision='bf16'`` (weights, gradients and optimizer stay fp32); else nothing."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
