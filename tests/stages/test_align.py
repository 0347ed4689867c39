import json
import math
import shutil

import pytest
import torch

from bissl.config import AlignConfig, load_config
from bissl.engine.checkpoint import load_backbone
from bissl.engine.logger import read_metrics
from bissl.stages.align import _pretext_params, align
from bissl.utils.errors import CheckpointError, ConfigError, DataError, NonFiniteError
from bissl.utils.io import load_torch


def _cfg(overrides, *extra):
    return load_config(AlignConfig, "align_digits", [*overrides, *extra])


def test_align_runs_logs_and_exports_theta_in_pretrain_format(tiny_align_overrides, tiny_pretrained):
    result = align(_cfg(tiny_align_overrides))
    assert result.finished and result.cycle == 2
    theta, spec = load_backbone(result.backbone_path)  # same format as `bissl pretrain` writes
    pretrained, _ = load_backbone(tiny_pretrained / "backbone.pt")
    assert spec["name"] == "small_cnn"
    moved = [not torch.equal(a, b) for a, b in zip(theta.parameters(), pretrained.parameters(), strict=True)]
    assert all(moved)  # every tensor of theta was trained by the lower level
    cycles = read_metrics(result.out_dir / "metrics.jsonl", "cycle")
    assert [r["step"] for r in cycles] == [1, 2]
    for key in ("lower/pretext_loss", "lower/proximal", "upper/loss_theta", "upper/hypergrad_norm",
                "upper/solver_iters", "upper/solver_residual"):  # fmt: skip
        assert all(torch.isfinite(torch.tensor(r[key])) for r in cycles), key
    assert 1 <= cycles[0]["upper/solver_iters"] <= 5  # CG stops at bilevel.solver.tol, at most iters=5
    for name in ("upper_backbone.pt", "pretext_head.pt", "downstream_head.pt", "summary.json"):
        assert (result.out_dir / name).is_file(), name
    assert 0.0 <= result.metrics["theta_test_top1"] <= 1.0
    for key in ("theta_shift", "phi_shift", "cosine", "gap", "proximal_share"):  # per logged cycle
        assert all(math.isfinite(r[f"coupling/{key}"]) for r in cycles), key
    summary = json.loads((result.out_dir / "summary.json").read_text())
    assert summary["coupling"]["theta_shift"] == pytest.approx(cycles[-1]["coupling/theta_shift"])
    assert -1.0 <= summary["coupling"]["cosine"] <= 1.0


def test_align_resume_is_exact(tmp_path, tiny_align_overrides):
    full = align(_cfg(tiny_align_overrides, f"out_dir={tmp_path / 'full'}"))
    cfg = _cfg(tiny_align_overrides, f"out_dir={tmp_path / 'split'}")
    assert not align(cfg, until_cycle=1).finished
    resumed = align(cfg, resume=True)
    a, b = load_torch(full.backbone_path)["state_dict"], load_torch(resumed.backbone_path)["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    cycles = lambda run: read_metrics(run.out_dir / "metrics.jsonl", "cycle")  # noqa: E731
    assert cycles(full) == cycles(resumed)
    compute = lambda run: json.loads((run.out_dir / "summary.json").read_text())["compute"]  # noqa: E731
    assert compute(full) == compute(resumed) and compute(full)["hvp"] > 0  # counts continue from the checkpoint


@pytest.mark.parametrize("override", ["bilevel.lam=0", "bilevel.lam=-0.1"])
def test_non_positive_lam_rejected_before_work(tiny_align_overrides, override):
    with pytest.raises(ConfigError, match=r"bilevel.lam"):
        _cfg(tiny_align_overrides, override)


def test_checkpoint_of_another_architecture_is_named(tmp_path, tiny_align_overrides, tiny_pretrained):
    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_pretrained, foreign)
    payload = load_torch(foreign / "backbone.pt")
    payload["backbone"]["kwargs"] = {"width": 16}  # the weights are of a width-8 net
    torch.save(payload, foreign / "backbone.pt")
    with pytest.raises(CheckpointError, match=r"shape"):
        align(_cfg(tiny_align_overrides, f"pretrained={foreign}"))
    torch.save({"conv1.weight": torch.zeros(1)}, foreign / "backbone.pt")
    with pytest.raises(CheckpointError, match="not a bissl backbone file"):
        align(_cfg(tiny_align_overrides, f"pretrained={foreign}"))


def test_empty_dataset_is_one_clear_error(tmp_path, tiny_align_overrides):
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(DataError) as info:
        align(_cfg(tiny_align_overrides, "pretext_data.name=unlabelled_folder", f"pretext_data.root={empty}"))
    assert "\n" not in str(info.value)


def test_nan_loss_names_the_fix_and_keeps_checkpoints(tiny_align_overrides, tiny_pretrained):
    before = (tiny_pretrained / "backbone.pt").read_bytes()
    cfg = _cfg(tiny_align_overrides, "lower.optim.lr=1e30", "bilevel.lower_grad_clip=null")
    message = r"lower-level (loss|weights).* became (nan|inf|NaN/inf).*; lower lower.optim.lr"
    with pytest.raises(NonFiniteError, match=message):
        align(cfg)
    assert (tiny_pretrained / "backbone.pt").read_bytes() == before
    assert load_torch(f"{cfg.out_dir}/checkpoints/last.pt")["cycle"] == 0  # the warm-up checkpoint survives


def test_bf16_without_cuda_warns_and_runs_exactly_as_fp32(tmp_path, tiny_align_overrides):
    fp32 = align(_cfg(tiny_align_overrides, f"out_dir={tmp_path / 'fp32'}"))
    with pytest.warns(UserWarning, match="precision=bf16 needs a CUDA device"):
        bf16 = align(_cfg(tiny_align_overrides, f"out_dir={tmp_path / 'bf16'}", "precision=bf16"))
    assert bf16.metrics == fp32.metrics
    a, b = load_torch(fp32.backbone_path)["state_dict"], load_torch(bf16.backbone_path)["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    cycles = lambda run: read_metrics(run.out_dir / "metrics.jsonl", "cycle")  # noqa: E731
    assert cycles(bf16) == cycles(fp32)


def test_unknown_precision_rejected(tiny_align_overrides):
    with pytest.raises(ConfigError, match="precision"):
        _cfg(tiny_align_overrides, "precision=fp16")


def test_the_shipped_config_takes_the_method_from_the_pretrained_run(tmp_path):
    """#20 item 11: align_digits sets only the views; a VICReg (or plug-in) run aligns without pretext=null."""
    heads = {"name": "vicreg", "params": {"sim_coeff": 20.0}}
    assert _pretext_params(_cfg([]), heads, tmp_path / "backbone.pt") == heads["params"]
    with pytest.raises(ConfigError, match=r"pretext.name='simclr' but .*pretext_head.pt holds 'vicreg' heads"):
        _pretext_params(_cfg(["pretext.name=simclr"]), heads, tmp_path / "backbone.pt")


def test_a_head_warm_up_that_blows_up_without_nan_is_stopped(tiny_align_overrides):
    """lr 1e6 keeps the warm-up loss finite (3e5 where 1.7 is normal): the weights' range stops it, naming the key."""
    message = r"head weights at step \d+ is .*x its start .*lower bilevel\.head_warmup_lr"
    with pytest.raises(NonFiniteError, match=message):
        align(_cfg(tiny_align_overrides, "bilevel.head_warmup_lr=1e6"))
