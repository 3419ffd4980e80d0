"""Which engine embeds a run's blocks (:mod:`clip_heads.engines`, :mod:`clip_heads.ray_engine`):
the one choice encode and predict share. Kept apart from both so that neither engine module
imports the other's chooser (the Ray engine builds on :mod:`clip_heads.engines`)."""
from __future__ import annotations

from typing import Sequence

import torch

from .engines import EmbedJob, default_workers, device_blocks, local_blocks

__all__ = ["Runner"]


class Runner:
    """The engine of one run (encode or predict): where its blocks are embedded, and on which
    kind of device (``device``, which decides the precision a store records)."""

    def __init__(self, engine: str, backbone, devices: Sequence[str] | None, workers: int | None,
                 ray_options: dict | None, progress: bool) -> None:
        self.engine, self.backbone, self.devices, self.workers = engine, backbone, devices, workers
        self.ray = None
        if engine == "ray":
            from .ray_engine import RayEngine  # Ray only when asked for

            self.ray = RayEngine(**(ray_options or {}), progress=progress)
            self.device = self.ray.device
        elif devices:
            self.device = torch.device(devices[0])
        else:
            self.device = backbone.device

    def blocks(self, job: EmbedJob):
        if self.ray is not None:
            return self.ray.blocks(job)
        if self.devices:
            per = self.workers if self.workers is not None else (
                0 if self.device.type == "cpu" else max(1, default_workers(self.device) // len(self.devices)))
            return device_blocks(job, self.devices, workers=per)
        workers = default_workers(self.backbone.device) if self.workers is None else self.workers
        return local_blocks(job, self.backbone, workers)

    def close(self) -> None:
        if self.ray is not None:
            self.ray.close()
