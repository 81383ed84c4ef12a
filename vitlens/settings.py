"""The one settings object, read from the environment by the entry points (CLI, app, worker)."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

from .errors import OptionError, UnknownModelError, WeightsError
from .images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS
from .store import DEFAULT_SIZE_LIMIT

MODES = ("embedded", "hosted")
PRECISION_CHOICES = ("fp32", "bf16", "fp16")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_POSITIVE = ("cache_size", "max_pixels", "max_image_bytes", "max_side", "max_images", "max_uploaded_weights",
             "job_timeout", "worker_wait", "worker_batch",
             "worker_max_models", "worker_lease", "job_lease", "job_attempts", "poll_interval")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")  # as vitlens.models.WEIGHT_SUFFIXES (not imported: it pulls in timm)


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vitlens"


@dataclass(frozen=True)
class Settings:
    """Deployment settings. Environment variables: ``VITLENS_<FIELD>`` in upper case.

    Attributes:
        cache_dir: Where traces (and the job queue) live; shared by app, worker and CLI.
        cache_size: Cache size limit in bytes.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        max_pixels: Largest image (width x height) accepted for decoding.
        max_image_bytes: Largest image file accepted (checked before reading it).
        max_side: Largest capture side in pixels.
        max_images: Most images one request (a view, a link, a job) may name.
        max_uploaded_weights: Bytes of weights files uploaded in the app kept on disk (least
            recently used deleted first).
        allowed_models: Model names the app offers and accepts; None: any preset or timm ViT.
        allowed_email_domains: With sign-in on, the e-mail domains whose accounts may use the app;
            None: any account the identity provider signs in.
        weights_dir: Folder the app may load local weights files from; None: no local files.
            The browser names a file in it, never a path.
        mode: ``embedded`` (default: the app runs captures in a worker thread of its own, so
            ``streamlit run app/main.py`` alone works) or ``hosted`` (the app only queues jobs;
            ``python -m vitlens worker`` runs them and owns the GPU).
        job_dir: Folder of the job queue shared by app sessions and workers; None: ``cache_dir/jobs``.
        job_timeout: Seconds the app waits for a capture job before giving up with a message.
        worker_wait: Seconds the app waits for a live worker before saying none is running.
        worker_batch: Images per forward pass (halved on CUDA out-of-memory), and the most
            images a worker takes from the queue at once to batch compatible jobs.
        worker_max_models: Models a worker keeps loaded (least recently used dropped first).
        worker_lease: Seconds without a worker heartbeat after which its running jobs are
            re-queued (at once when its process is gone on this host).
        job_lease: Seconds a capture job is kept without its client (an app session, a CLI call)
            polling it; after that the worker cancels it, before it starts or between batches.
        job_attempts: Starts of a job before a worker crash fails it for good (with a reason).
        precision: Capture precision a worker uses for every job (``fp32``, ``bf16``, ``fp16``);
            None: each job's own. Results are stored under the precision actually used.
        poll_interval: Seconds between queue polls of the app and of an idle worker.
        results_dir: Folder whose subfolders are the sweep results folders the app may open
            (and create, when it runs a sweep); None: the population pages are off. The
            browser names a subfolder, never a path.
        datasets_dir: Folder whose subfolders (and itself) are image folders the app may sweep
            and show images of; None: no sweeps from the app, no images in the gallery.
    """

    cache_dir: Path = _default_cache_dir()
    cache_size: int = DEFAULT_SIZE_LIMIT
    device: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_side: int = 1036
    max_images: int = 16
    max_uploaded_weights: int = 2 * 2**30
    allowed_models: tuple[str, ...] | None = None
    allowed_email_domains: tuple[str, ...] | None = None
    weights_dir: Path | None = None
    mode: str = "embedded"
    job_dir: Path | None = None
    job_timeout: float = 600.0
    worker_wait: float = 30.0
    worker_batch: int = 8
    worker_max_models: int = 2
    worker_lease: float = 30.0
    job_lease: float = 30.0
    job_attempts: int = 2
    precision: str | None = None
    poll_interval: float = 0.25
    results_dir: Path | None = None
    datasets_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise OptionError(f"VITLENS_MODE must be one of {', '.join(MODES)}, not '{self.mode}'.")
        if self.precision is not None and self.precision not in PRECISION_CHOICES:
            raise OptionError(f"VITLENS_PRECISION must be one of {', '.join(PRECISION_CHOICES)}, not '{self.precision}'.")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise OptionError(f"Device must be auto, cpu, mps, cuda or cuda:N, not '{self.device[:40]}'.")
        for name in _POSITIVE:
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise OptionError(f"VITLENS_{name.upper()} must be a finite number more than 0, not {value}.")

    @property
    def queue_dir(self) -> Path:
        """Where the job queue lives."""
        return self.job_dir if self.job_dir is not None else self.cache_dir / "jobs"

    def check_model(self, name: str) -> None:
        """Refuse a model the deployment does not offer.

        Raises:
            UnknownModelError: ``allowed_models`` is set and does not list ``name``.
        """
        if self.allowed_models is not None and name not in self.allowed_models:
            raise UnknownModelError(f"Model '{name}' is not offered here; choose one of {', '.join(self.allowed_models)}.")

    def check_side(self, side: int | None) -> None:
        """Refuse a capture side outside ``1..max_side`` (None: the model's own, always fine).

        Raises:
            OptionError: the side is out of range.
        """
        if side is not None and not 0 < side <= self.max_side:
            raise OptionError(f"Size must be between 1 and {self.max_side} pixels, not {side}.")

    def resolve_weights(self, weights: str) -> str:
        """``hub``, ``random`` or ``synthetic`` as they are; a file name becomes its path inside ``weights_dir``.

        Only bare file names with a weights suffix are accepted, so a request can never
        reach a file outside the folder the operator chose.

        Raises:
            WeightsError: local files are not enabled, the name is a path, or no such file.
        """
        if weights in ("hub", "random", "synthetic"):
            return weights
        if self.weights_dir is None:
            raise WeightsError("Local weights files are not enabled here (VITLENS_WEIGHTS_DIR is not set); "
                               "use hub, random or synthetic demo weights.")
        if not weights or weights != Path(weights).name or weights.startswith(".") or "\\" in weights:
            raise WeightsError(f"Weights must be a file name inside the weights folder, not a path ('{weights[:80]}').")
        if not weights.lower().endswith(_WEIGHT_SUFFIXES):
            raise WeightsError(f"Weights file '{weights}' must end in {', '.join(_WEIGHT_SUFFIXES)}.")
        path = self.weights_dir / weights
        if not path.is_file():
            raise WeightsError(f"Weights file '{weights}' is not in the weights folder.")
        return str(path)

    def weights_files(self) -> list[str]:
        """Names of the weights files the app may offer (empty when local files are not enabled)."""
        if self.weights_dir is None or not self.weights_dir.is_dir():
            return []
        return sorted(path.name for path in self.weights_dir.iterdir()
                      if path.is_file() and path.name.lower().endswith(_WEIGHT_SUFFIXES) and not path.name.startswith("."))

    def results_folders(self) -> list[str]:
        """Names of the folders in ``results_dir`` (empty when results are not enabled)."""
        return _subfolders(self.results_dir)

    def resolve_results(self, name: str) -> Path:
        """The path of results folder ``name`` inside ``results_dir`` (it may not exist yet).

        Raises:
            OptionError: results are not enabled, or the name is not a plain folder name.
        """
        if self.results_dir is None:
            raise OptionError("Sweep results are not enabled here (set VITLENS_RESULTS_DIR to a folder of results folders).")
        return self.results_dir / _plain_name(name, "results folder")

    def dataset_folders(self) -> list[str]:
        """Image folders the app may sweep: ``.`` (``datasets_dir`` itself) and its subfolders."""
        return ["."] + _subfolders(self.datasets_dir) if self.datasets_dir is not None and self.datasets_dir.is_dir() else []

    def resolve_dataset(self, name: str) -> Path:
        """The path of image folder ``name`` (``.`` or a subfolder of ``datasets_dir``).

        Raises:
            OptionError: datasets are not enabled, the name is a path, or no such folder.
        """
        if self.datasets_dir is None:
            raise OptionError("Image folders are not enabled here (set VITLENS_DATASETS_DIR to a folder of image folders).")
        path = self.datasets_dir if name == "." else self.datasets_dir / _plain_name(name, "image folder")
        if not path.is_dir():
            raise OptionError(f"Image folder '{name}' is not in the datasets folder.")
        return path

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """Settings from ``VITLENS_*`` environment variables (unset or empty: the default).

        Raises:
            OptionError: a value is not of its field's type or out of range (one sentence).
        """
        env = os.environ if environ is None else environ
        values = {}
        for item in fields(cls):
            text = env.get(f"VITLENS_{item.name.upper()}", "").strip()
            if text:
                values[item.name] = _parse(item.name, text)
        return cls(**values)


def _parse(name: str, text: str) -> object:
    """One environment value converted to its field's type."""
    convert = _CONVERTERS.get(name, str)
    try:
        return convert(text)
    except ValueError as error:
        kind = {int: "a whole number", float: "a number"}.get(convert, "valid")
        raise OptionError(f"VITLENS_{name.upper()} must be {kind}, not '{text[:40]}'.") from error


def _names(text: str) -> tuple[str, ...] | None:
    return tuple(name.strip() for name in text.split(",") if name.strip()) or None


def _domains(text: str) -> tuple[str, ...] | None:
    return tuple(name.lstrip("@").lower() for name in _names(text) or ()) or None


_CONVERTERS: dict[str, Callable[[str], object]] = {
    "cache_dir": Path, "weights_dir": Path, "job_dir": Path, "results_dir": Path, "datasets_dir": Path,
    "allowed_models": _names,
    "allowed_email_domains": _domains,
    "cache_size": int, "max_pixels": int, "max_image_bytes": int, "max_side": int, "max_images": int,
    "max_uploaded_weights": int, "worker_batch": int,
    "worker_max_models": int, "job_attempts": int,
    "job_timeout": float, "worker_wait": float, "worker_lease": float, "job_lease": float,
    "poll_interval": float,
}


def _subfolders(folder: Path | None) -> list[str]:
    if folder is None or not folder.is_dir():
        return []
    return sorted(path.name for path in folder.iterdir() if path.is_dir() and not path.name.startswith((".", "_")))


def _plain_name(name: str, what: str) -> str:
    """``name`` when it is one plain folder name (no separator, no leading dot).

    Raises:
        OptionError: anything else.
    """
    if not name or name != Path(name).name or name.startswith((".", "_")) or "\\" in name or "/" in name:
        raise OptionError(f"The {what} must be a plain folder name, not '{name[:80]}'.")
    return name
