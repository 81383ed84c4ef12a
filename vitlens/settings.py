"""The one settings object, read from the environment by the entry points (CLI, app, worker)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import OptionError, UnknownModelError, WeightsError
from .images import DEFAULT_MAX_PIXELS
from .store import DEFAULT_SIZE_LIMIT

MODES = ("embedded", "hosted")
PRECISION_CHOICES = ("fp32", "bf16", "fp16")
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
        max_side: Largest capture side in pixels.
        allowed_models: Model names the app offers and accepts; None: any preset or timm ViT.
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
        job_attempts: Starts of a job before a worker crash fails it for good (with a reason).
        precision: Capture precision a worker uses for every job (``fp32``, ``bf16``, ``fp16``);
            None: each job's own. Results are stored under the precision actually used.
        poll_interval: Seconds between queue polls of the app and of an idle worker.
    """

    cache_dir: Path = _default_cache_dir()
    cache_size: int = DEFAULT_SIZE_LIMIT
    device: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int = 1036
    allowed_models: tuple[str, ...] | None = None
    weights_dir: Path | None = None
    mode: str = "embedded"
    job_dir: Path | None = None
    job_timeout: float = 600.0
    worker_wait: float = 30.0
    worker_batch: int = 8
    worker_max_models: int = 2
    worker_lease: float = 30.0
    job_attempts: int = 2
    precision: str | None = None
    poll_interval: float = 0.25

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise OptionError(f"VITLENS_MODE must be one of {', '.join(MODES)}, not '{self.mode}'.")
        if self.precision is not None and self.precision not in PRECISION_CHOICES:
            raise OptionError(f"VITLENS_PRECISION must be one of {', '.join(PRECISION_CHOICES)}, not '{self.precision}'.")
        if self.worker_batch < 1 or self.worker_max_models < 1 or self.job_attempts < 1:
            raise OptionError("VITLENS_WORKER_BATCH, VITLENS_WORKER_MAX_MODELS and VITLENS_JOB_ATTEMPTS must be at least 1.")

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

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        defaults = cls()

        def get(name: str, default):
            return env.get(f"VITLENS_{name.upper()}", default)

        allowed = get("allowed_models", None)
        weights_dir = get("weights_dir", None)
        job_dir = get("job_dir", None)
        return cls(
            cache_dir=Path(get("cache_dir", defaults.cache_dir)),
            cache_size=int(get("cache_size", defaults.cache_size)),
            device=get("device", defaults.device),
            max_pixels=int(get("max_pixels", defaults.max_pixels)),
            max_side=int(get("max_side", defaults.max_side)),
            allowed_models=tuple(name.strip() for name in allowed.split(",") if name.strip()) if allowed else None,
            weights_dir=Path(weights_dir) if weights_dir else None,
            mode=get("mode", defaults.mode),
            job_dir=Path(job_dir) if job_dir else None,
            job_timeout=float(get("job_timeout", defaults.job_timeout)),
            worker_wait=float(get("worker_wait", defaults.worker_wait)),
            worker_batch=int(get("worker_batch", defaults.worker_batch)),
            worker_max_models=int(get("worker_max_models", defaults.worker_max_models)),
            worker_lease=float(get("worker_lease", defaults.worker_lease)),
            job_attempts=int(get("job_attempts", defaults.job_attempts)),
            precision=get("precision", None) or None,
            poll_interval=float(get("poll_interval", defaults.poll_interval)),
        )
