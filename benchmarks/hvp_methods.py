"""Which Hessian-vector product method is faster: double backward or torch.func (jvp of grad)?

Times, on a SimCLR-style lower loss (two noisy views, NT-Xent, fixed projection head, H over the backbone with
BatchNorm in train mode), one plain forward+backward, building a ``HessianOperator`` and one HVP, for:
(a) a small conv net with BatchNorm at 16 px and (b) torchvision's ResNet-18 with a 3x3 stem and no max-pool
at 32 px. Prints a table of milliseconds (the minimum over ``--repeats`` runs, which is the least noisy on a
shared machine) and ratios to one forward+backward.

    python benchmarks/hvp_methods.py [--batch 32] [--repeats 3] [--device cpu|cuda] [--models small,resnet18]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from bissl.bilevel.hvp import HVP_METHODS, HessianOperator


def small_convnet() -> nn.Module:
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 32, 1), *block(32, 64, 2), *block(64, 128, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def resnet18_small_stem() -> nn.Module:
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


MODELS: dict[str, tuple[Callable[[], nn.Module], int, int]] = {
    "small": (small_convnet, 128, 16),
    "resnet18": (resnet18_small_stem, 512, 32),
}


def nt_xent(z: Tensor, temperature: float = 0.5) -> Tensor:
    z = F.normalize(z, dim=1)
    n = z.shape[0] // 2
    sim = (z @ z.T / temperature).fill_diagonal_(-torch.inf)
    return F.cross_entropy(sim, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_of(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Minimum wall time of ``fn`` in ms over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    return min(times)


def bench(name: str, batch: int, repeats: int, device: torch.device) -> list[tuple[str, str, float, float, float]]:
    make, dim, px = MODELS[name]
    torch.manual_seed(0)
    backbone = make().to(device).train()
    head = nn.Linear(dim, 128).to(device)
    x = torch.randn(batch, 3, px, px, device=device)
    views = torch.cat([x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x)])
    params = list(backbone.parameters())
    modules = nn.ModuleList([backbone, head])

    def loss() -> Tensor:
        return nt_xent(head(backbone(views)))

    fb = best_of(lambda: torch.autograd.grad(loss(), params), repeats, device)
    rows = [(name, "forward+backward", fb, 0.0, 1.0)]
    ops: dict[str, HessianOperator] = {}
    builds: dict[str, float] = {}
    for method in HVP_METHODS:
        builds[method] = best_of(
            lambda m=method: ops.__setitem__(m, HessianOperator(loss, params, method=m, module=modules)),
            repeats,
            device,
        )
    v = torch.randn(ops[HVP_METHODS[0]].numel, device=device)
    hvp = {m: best_of(lambda m=m: ops[m].matvec(v), repeats, device) for m in HVP_METHODS}
    for method in HVP_METHODS:
        rows.append((name, method, builds[method], hvp[method], hvp[method] / fb))
        print(f"  {name}: {method} done", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="images per view (the loss sees 2x this)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="small,resnet18")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch}x2 views torch={torch.__version__}")
    rows = []
    for name in args.models.split(","):
        rows += bench(name, args.batch, args.repeats, device)
    print(f"\n{'model':<9} {'method':<17} {'build ms':>9} {'ms/HVP':>9} {'HVP/(f+b)':>10} {'5-HVP solve/(f+b)':>18}")
    fbs = {model: t for model, method, t, _, _ in rows if method == "forward+backward"}
    for model, method, build, hvp, ratio in rows:
        if method == "forward+backward":
            print(f"{model:<9} {method:<17} {build:>9.1f} {'':>9} {ratio:>10.2f} {'':>18}")
        else:
            solve = (build + 5 * hvp) / fbs[model]
            print(f"{model:<9} {method:<17} {build:>9.1f} {hvp:>9.1f} {ratio:>10.2f} {solve:>18.2f}")


if __name__ == "__main__":
    main()
