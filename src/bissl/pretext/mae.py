"""MAE (He et al., 2022): reconstruct the pixels of randomly masked patches from the visible ones.

The backbone encodes only the visible patches (``1 - mask_ratio`` of them, drawn per sample); a light decoder
(``decoder_dim`` wide, ``decoder_depth`` timm blocks, fixed 2-D sin-cos positions) fills in mask tokens and predicts
every patch's pixels; the loss is the mean squared error on the masked patches, against pixels normalised per patch
(``norm_pix_loss``, MAE's default). The decoder is this method's head: the BiSSL lower level owns it with theta.

What MAE asks of a backbone (bissl's ViT, :class:`bissl.models.timm_vit.ViT`, has it): ``patch_size``, ``grid_size``,
``in_chans`` and ``forward_tokens(x, keep_idx) -> [B, 1 + K, D]`` (class token first, then the kept patches' tokens in
the order of ``keep_idx``). :meth:`MAE.setup` raises a one-line ConfigError for a backbone without them.

Masks and the Hessian: a Hessian operator is one loss function of the parameters, so every evaluation of
``loss(backbone, views)`` on the same views must draw the same masks (a new mask per Hessian-vector product changes
the operator under CG; the BiSSLight baseline did that). The mask of a batch is drawn from a generator seeded by the
batch's content (a hash of its values, and ``mask_seed``): the same views give the same masks, every new batch (new
augmented views) new ones, and a resumed run draws the masks the uninterrupted run drew. Identical images in one
batch get different masks (the noise is drawn per sample).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from pydantic import Field, PositiveInt
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from bissl.pretext.base import PRETEXT_METHODS, PretextConfig, PretextMethod
from bissl.utils.errors import ConfigError

REQUIRED = ("forward_tokens", "patch_size", "grid_size", "in_chans")


class MAEConfig(PretextConfig):
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    decoder_dim: PositiveInt = 128  # MAE ViT-B: 512
    decoder_depth: PositiveInt = 2  # MAE ViT-B: 8
    decoder_heads: PositiveInt = 4  # MAE ViT-B: 16
    norm_pix_loss: bool = True
    mask_seed: int = 0  # mixed into every batch's mask seed


def patchify(images: Tensor, patch: int) -> Tensor:
    """``[B, C, H, W] -> [B, (H/p)(W/p), p*p*C]``: patches in raster order, flattened as ``(row, col, channel)``."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = True) -> Tensor:
    """Mean over masked patches (``mask == 1``) of the per-patch mean squared error; with ``norm_pix`` the target
    patches are standardised first (``(t - mean) / sqrt(var + 1e-6)``, unbiased variance, as MAE does)."""
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def sincos_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2-D sin-cos position embedding ``[1 + H*W, dim]`` (a zero row first, for the class token)."""
    if dim % 4:
        raise ConfigError(f"pretext 'mae': decoder_dim={dim} must be a multiple of 4 (2-D sin-cos positions)")
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64),
                                indexing="ij")  # fmt: skip
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    parts = []
    for pos in (cols.reshape(-1), rows.reshape(-1)):  # MAE: width coordinate first
        angles = pos[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb]).float()


def _plain(tensor: Tensor) -> Tensor:
    """``tensor`` outside any ``torch.func`` transform's wrappers (a ``func`` Hessian-vector product calls the loss
    inside ``jvp``/``vjp``, where the batch it closes over is seen through wrappers with no data pointer)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        tensor = torch._C._functorch.get_unwrapped(tensor)
    return tensor


def content_seed(view: Tensor, salt: int = 0) -> int:
    """A 63-bit seed from the values of ``view`` (three float64 reductions, hashed): equal views, equal seeds."""
    with torch._C._DisableFuncTorch(), torch.no_grad():
        flat = _plain(view).detach().reshape(-1).double()
        stats = torch.stack([flat.sum(), (flat * flat).sum(), flat[:: max(1, flat.numel() // 997)].sum()])
        data = stats.cpu().numpy().tobytes()
    digest = hashlib.blake2b(data + repr((tuple(view.shape), salt)).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


@PRETEXT_METHODS.register("mae")
class MAE(PretextMethod):
    """Masked autoencoder on one view: ``loss = mae_loss(decoder(backbone.forward_tokens(x, keep)), patches(x))``."""

    Config = MAEConfig
    augmentation = "mae"
    n_views = 1
    config: MAEConfig

    def __init__(self, feature_dim: int, config: MAEConfig | None = None) -> None:
        super().__init__(feature_dim, config)
        try:
            from timm.models.vision_transformer import Block
        except ImportError:
            raise ConfigError("pretext 'mae' needs timm: pip install 'bissl[vit]'") from None
        cfg = self.config
        if cfg.decoder_dim % cfg.decoder_heads:
            raise ConfigError(f"pretext 'mae': decoder_dim {cfg.decoder_dim} not divisible by {cfg.decoder_heads}")
        self.decoder_embed = nn.Linear(feature_dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.decoder_blocks = nn.ModuleList(
            Block(cfg.decoder_dim, cfg.decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim)
        self.decoder_pred: nn.Linear | None = None  # p*p*C outputs: known at setup
        self.register_buffer("decoder_pos", torch.zeros(0), persistent=False)

    def setup(self, backbone: nn.Module) -> None:
        """Check the backbone's patch-level API; build the pixel predictor and the decoder positions for its grid."""
        backbone = _unwrap(backbone)
        missing = [name for name in REQUIRED if not hasattr(backbone, name)]
        if missing:
            raise ConfigError(
                f"pretext 'mae' needs a backbone with the patch-level API ({', '.join(REQUIRED)}), e.g. vit_tiny; "
                f"{type(backbone).__name__} lacks {', '.join(missing)}"
            )
        out = backbone.patch_size**2 * backbone.in_chans
        ref = self.decoder_embed.weight
        if self.decoder_pred is None or self.decoder_pred.out_features != out:
            self.decoder_pred = nn.Linear(self.config.decoder_dim, out, device=ref.device, dtype=ref.dtype)
        self.decoder_pos = sincos_2d(self.config.decoder_dim, tuple(backbone.grid_size)).to(ref.device, ref.dtype)[None]

    def draw_mask(self, view: Tensor, num_patches: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(keep_idx [B, K], ids_restore [B, N], mask [B, N])`` for ``view``, from a generator seeded by its
        content (module docstring); ``mask`` is 1 on the masked patches."""
        b = view.shape[0]
        keep = max(1, int(num_patches * (1 - self.config.mask_ratio)))
        seed = content_seed(view, self.config.mask_seed)
        with torch._C._DisableFuncTorch(), torch.no_grad():  # constants, also inside a torch.func transform
            generator = torch.Generator(device=view.device).manual_seed(seed)
            noise = torch.rand(b, num_patches, generator=generator, device=view.device)
            ids_shuffle = noise.argsort(dim=1)
            ids_restore = ids_shuffle.argsort(dim=1)
            mask = torch.ones(b, num_patches, device=view.device)
            mask[:, :keep] = 0
            return ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore)

    def decode(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Pixel predictions ``[B, N, p*p*C]`` of every patch from the encoder tokens ``[B, 1 + K, D]``."""
        if self.decoder_pred is None:
            raise RuntimeError("MAE has no pixel predictor yet; call setup(backbone) first")
        x = self.decoder_embed(latent)
        b, n = ids_restore.shape
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(b, n + 1 - x.shape[1], -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def loss(self, backbone: nn.Module, views: Sequence[Tensor]) -> Tensor:
        self.check_views(views)
        (images,) = views
        encoder = _unwrap(backbone)
        num_patches = math.prod(encoder.grid_size)
        keep_idx, ids_restore, mask = self.draw_mask(images, num_patches)
        pred = self.decode(encoder.forward_tokens(images, keep_idx), ids_restore)
        return mae_loss(pred, patchify(images, encoder.patch_size), mask.to(pred.dtype), self.config.norm_pix_loss)
