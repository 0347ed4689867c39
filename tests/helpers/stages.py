"""Tiny, fast overrides of the shipped digits configs, shared by the stage tests (and conftest's fixtures)."""

TINY_PRETRAIN = [
    "epochs=2",
    "data.image_size=8",
    "data.batch_size=128",
    "backbone.kwargs.width=8",
    "optim.warmup_epochs=1",
    "monitor.every_epochs=0",
    "monitor.linear_probe_epochs=0",
    "log.progress=false",
    "log.tensorboard=false",
    "log.every_steps=1",
]

TINY_ALIGN = [
    "pretext_data.image_size=8",
    "downstream.data.image_size=8",
    "lower.batch_size=64",
    "upper.batch_size=32",
    "bilevel.cycles=2",
    "bilevel.n_lower=2",
    "bilevel.n_upper=2",
    "bilevel.head_warmup_epochs=1",
    "checkpoint_every_cycles=1",
    "log.progress=false",
    "log.tensorboard=false",
]

#: a study's stages made tiny (the pipeline tests' `--quick` studies)
FAST = [
    "pretrain.data.batch_size=128",
    "pretrain.backbone.kwargs.width=8",
    "align.bilevel.n_lower=4",
    "align.bilevel.n_upper=2",
    "pretrain.log.progress=false",
    "align.log.progress=false",
    "finetune.log.progress=false",
    "pretrain.log.tensorboard=false",
    "align.log.tensorboard=false",
    "finetune.log.tensorboard=false",
]
