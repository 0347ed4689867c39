"""Checks of a stage's data against its config and backbone, before any work: one line naming the setting to change."""

from __future__ import annotations

from bissl.utils.errors import ConfigError, DataError


def check_batch_size(num_samples: int, batch_size: int, dataset: str, key: str) -> None:
    if num_samples == 0:
        raise DataError(f"dataset {dataset!r} is empty; check its root folder and split")
    if num_samples < batch_size:
        raise DataError(
            f"dataset {dataset!r} has {num_samples} samples, fewer than one batch of {batch_size}; lower {key}"
        )


def check_channels(data_channels: int, backbone_channels: int, dataset: str) -> None:
    if data_channels != backbone_channels:
        raise ConfigError(
            f"dataset {dataset!r} has {data_channels} channels but the backbone takes {backbone_channels}; "
            "use data with matching channels or another backbone"
        )
