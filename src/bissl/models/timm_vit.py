"""timm's VisionTransformer as a bissl backbone (needs ``timm``: ``pip install bissl[vit]``).

:class:`ViT` subclasses ``timm.models.vision_transformer.VisionTransformer``, so its state-dict keys are timm's
(``cls_token``, ``pos_embed``, ``patch_embed.proj.weight``, ``blocks.0.attn.qkv.weight``, ``norm.weight``, ...): timm
checkpoints and the official MAE checkpoints (``{"model": ...}``) load with :func:`bissl.models.load_backbone_weights`,
the position embedding resampled when the image size differs (:meth:`ViT.adapt_state_dict`).

On top of timm it adds what bissl asks of a ViT:

* ``feature_dim`` (the embedding width) and the pooled features as ``forward`` (no classifier: ``num_classes=0``);
* the patch-level API of masked image modelling (:mod:`bissl.pretext.mae`): ``patch_size``, ``grid_size``,
  ``in_chans`` and :meth:`ViT.forward_tokens` (patch embedding + blocks on the visible tokens only);
* :func:`split_qkv`: each block's fused ``qkv`` Linear replaced by separate ``q``, ``k``, ``v`` Linears carrying the
  same weights (:class:`SplitQKVAttention`), so LoRA can target ``q`` and ``v`` alone (:mod:`bissl.models.lora`).

Attention and second derivatives: ``F.scaled_dot_product_attention`` picks fused kernels (flash / memory-efficient,
on CPU as on CUDA) that have no double backward. bissl's Hessian-vector products run their forward passes under
the math kernel (:func:`bissl.bilevel.hvp.math_attention`), for this ViT and for any user module that calls SDPA, so
the fused kernel stays on for ordinary training; ``fused_attn=False`` builds timm's explicit softmax path instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.layers.attention import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn


class ViT(VisionTransformer):
    """A timm ViT mapping ``[B, C, H, W]`` to pooled features ``[B, embed_dim]`` (``feature_dim = embed_dim``)."""

    def __init__(self, *, fused_attn: bool = True, **kwargs: object) -> None:
        kwargs.setdefault("num_classes", 0)
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if self.reg_token is not None or self.no_embed_class:
            raise ValueError("bissl's ViT supports a class token (or none) with the position embedding over it")
        for module in self.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = fused_attn
        self.feature_dim = int(self.embed_dim)
        self.in_chans = int(self.patch_embed.proj.in_channels)

    @property
    def patch_size(self) -> int:
        return int(self.patch_embed.patch_size[0])

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.patch_embed.grid_size)  # type: ignore[return-value]

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def forward_tokens(self, x: Tensor, keep_idx: Tensor | None = None) -> Tensor:
        """Encoder tokens ``[B, P + K, D]`` (``P`` prefix tokens, normed) of the patches ``keep_idx`` (``[B, K]``
        indices into the ``grid_size`` patches in raster order; ``None``: all patches). Positions are added before
        the patches are dropped, so each kept token carries its own position."""
        tokens = self.patch_embed(x)
        prefix = self.num_prefix_tokens
        tokens = tokens + self.pos_embed[:, prefix:]
        if keep_idx is not None:
            tokens = torch.gather(tokens, 1, keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        if self.cls_token is not None:
            cls = (self.cls_token + self.pos_embed[:, :prefix]).expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([cls, tokens], dim=1)
        tokens = self.norm_pre(self.pos_drop(tokens))
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def adapt_state_dict(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A foreign state dict made to fit: ``pos_embed`` resampled to this grid, fused ``qkv`` weights split into
        ``q``/``k``/``v`` for split blocks, LoRA-wrapped names (``q.base_layer.weight``) for plain ones."""
        ours = self.state_dict()
        out = dict(state)
        pos = out.get("pos_embed")
        if pos is not None and "pos_embed" in ours and pos.shape != ours["pos_embed"].shape:
            prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            out["pos_embed"] = resample_abs_pos_embed(
                pos, new_size=list(self.grid_size), num_prefix_tokens=prefix, verbose=False
            )
        for key in [k for k in out if k.endswith((".attn.qkv.weight", ".attn.qkv.bias")) and k not in ours]:
            stem, kind = key.rsplit(".qkv.", 1)
            if f"{stem}.q.{kind}" in ours or f"{stem}.q.base_layer.{kind}" in ours:
                for name, chunk in zip("qkv", out.pop(key).chunk(3, dim=0), strict=True):
                    out[f"{stem}.{name}.{kind}"] = chunk.clone()
        if "norm.weight" in ours and "norm.weight" not in out and "fc_norm.weight" in out:  # MAE fine-tuned
            out.update({f"norm.{kind}": out.pop(f"fc_norm.{kind}") for kind in ("weight", "bias")})
        for key in list(out):  # plain Linear weights into LoRA-wrapped layers
            if key not in ours:
                module, _, kind = key.rpartition(".")
                wrapped = f"{module}.base_layer.{kind}"
                if wrapped in ours:
                    out[wrapped] = out.pop(key)
        return out


class SplitQKVAttention(nn.Module):
    """timm's ``Attention`` with the fused ``qkv`` Linear split into ``q``, ``k`` and ``v`` (same outputs)."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise ValueError("split_qkv does not support gated attention")
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.attn_dim, self.scale, self.fused_attn = attn.attn_dim, attn.scale, attn.fused_attn
        dim, has_bias = attn.qkv.in_features, attn.qkv.bias is not None
        weights = attn.qkv.weight.detach().chunk(3, dim=0)
        biases = attn.qkv.bias.detach().chunk(3, dim=0) if has_bias else (None, None, None)
        for name, weight, bias in zip("qkv", weights, biases, strict=True):
            linear = nn.Linear(dim, self.attn_dim, bias=has_bias, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
            for param in linear.parameters():
                param.requires_grad_(attn.qkv.weight.requires_grad)
            setattr(self, name, linear)
        self.q_norm, self.k_norm, self.attn_drop = attn.q_norm, attn.k_norm, attn.attn_drop
        self.norm, self.proj, self.proj_drop = attn.norm, attn.proj, attn.proj_drop

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (getattr(self, name)(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for name in "qkv")
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            dropout = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if is_causal:
                attn = attn.masked_fill(torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1), -math.inf)
            if attn_mask is not None:
                attn = attn.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else attn + attn_mask
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = self.norm(x.transpose(1, 2).reshape(b, n, self.attn_dim))
        return self.proj_drop(self.proj(x))


def split_qkv(model: nn.Module) -> int:
    """Replace every timm ``Attention`` in ``model`` by a :class:`SplitQKVAttention` (in place); the count."""
    targets = [(name, m) for name, m in model.named_modules() if type(m) is Attention]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, SplitQKVAttention(module))
    return len(targets)
