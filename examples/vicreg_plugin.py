"""VICReg-style pretext plug-in: bissl pretrain --plugin examples/vicreg_plugin.py pretext.name=example_vicreg"""

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from bissl.pretext import PRETEXT_METHODS, PretextConfig, PretextMethod


class VICRegConfig(PretextConfig):
    dim: int = 64
    sim_weight: float = 25.0
    var_weight: float = 25.0
    cov_weight: float = 1.0


@PRETEXT_METHODS.register("example_vicreg")
class VICReg(PretextMethod):
    """Invariance + variance + covariance (Bardes et al., 2022): a projector and a loss; the stages do the rest."""

    Config = VICRegConfig

    def __init__(self, feature_dim: int, config: VICRegConfig | None = None) -> None:
        super().__init__(feature_dim, config)
        d = self.config.dim
        self.projector = nn.Sequential(nn.Linear(feature_dim, d), nn.BatchNorm1d(d), nn.ReLU(), nn.Linear(d, d))

    def loss(self, backbone: nn.Module, views: Sequence[Tensor]) -> Tensor:
        self.check_views(views)
        z1, z2 = (self.projector(backbone(v)) for v in views)
        return self.config.sim_weight * F.mse_loss(z1, z2) + self.regulariser(z1) + self.regulariser(z2)

    def regulariser(self, z: Tensor) -> Tensor:
        """Hinge on each dimension's std (no collapse) + squared off-diagonal covariances (decorrelation)."""
        c, z = self.config, z - z.mean(dim=0)
        cov = z.T @ z / (len(z) - 1)
        var, off_diagonal = cov.diagonal(), (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / z.shape[1]
        return c.var_weight * F.relu(1 - (var + 1e-4).sqrt()).mean() + c.cov_weight * off_diagonal
