"""Helpers for the job queue, worker and client tests: settings on a temporary folder, images,
and a worker subprocess whose captures can be slowed down (to kill it mid-job)."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from vitlens.images import DecodedImage, decode_image
from vitlens.settings import Settings
from vitlens.store import CaptureOptions

MODEL = "test_vit"  # timm's own test ViT: 6 blocks, 64 channels, patch 16; built in milliseconds
OPTIONS = CaptureOptions(side=64)  # grid 4x4
ROOT = Path(__file__).resolve().parents[1]


def job_settings(tmp_path: Path, **overrides) -> Settings:
    """Settings on ``tmp_path`` with short polling and leases, so tests are fast."""
    values = dict(cache_dir=tmp_path / "cache", device="cpu", poll_interval=0.02, worker_lease=2.0,
                  worker_wait=5.0, job_timeout=60.0, worker_batch=4)
    values.update(overrides)
    return Settings(**values)


def image(seed: int, size: tuple[int, int] = (48, 40)) -> DecodedImage:
    """A distinct random RGB image per seed (``size`` is width, height)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return decode_image(buffer.getvalue(), name=f"image{seed}.png")


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes ``Settings.from_env`` give ``settings`` in a subprocess."""
    env = dict(os.environ)
    env.update({
        "VITLENS_CACHE_DIR": str(settings.cache_dir),
        "VITLENS_DEVICE": settings.device,
        "VITLENS_POLL_INTERVAL": str(settings.poll_interval),
        "VITLENS_WORKER_LEASE": str(settings.worker_lease),
        "VITLENS_JOB_LEASE": str(settings.job_lease),
        "VITLENS_WORKER_BATCH": str(settings.worker_batch),
        "VITLENS_JOB_ATTEMPTS": str(settings.job_attempts),
        "VITLENS_MODE": "hosted",
        "PYTHONPATH": str(ROOT),
    })
    for name in ("results_dir", "datasets_dir", "weights_dir"):
        if getattr(settings, name) is not None:
            env[f"VITLENS_{name.upper()}"] = str(getattr(settings, name))
    return env


_WORKER = """
import sys, time
import vitlens.engine as engine
import vitlens.sweep as sweep
delay = float(sys.argv[1])
if delay:
    original = engine.capture
    def slow_capture(*args, **kwargs):
        time.sleep(delay)
        return original(*args, **kwargs)
    engine.capture = sweep.capture = slow_capture
from vitlens.cli import main
sys.exit(main(["worker", *sys.argv[2:]]))
"""


def start_worker(settings: Settings, delay: float = 0.0, *args: str, log: Path | None = None) -> subprocess.Popen:
    """``python -m vitlens worker`` in a subprocess; each forward pass first sleeps ``delay`` s."""
    output = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-c", _WORKER, str(delay), *args], env=settings_env(settings),
                            cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)


def wait_for(condition: Callable[[], bool], timeout: float = 60.0, interval: float = 0.02) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
