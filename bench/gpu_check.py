"""GPU check of the capture path: speed, half-precision error, peak memory, OOM halving.

    python bench/gpu_check.py            # on the GPU machine: DINOv2 ViT-L/14 and ViT-g/14 at 518 px
    python bench/gpu_check.py --tiny     # tiny configs on the CPU (a smoke test of this script)

For each architecture (random weights; nothing is downloaded) and precision (fp32, bf16,
fp16) it measures images/s of plain timm ``forward_features`` and of ``vitlens.capture``
(same batch, same autocast), peak GPU memory, and the error of half-precision captures against
the fp32 capture of the same images: max absolute and relative error of the token norms
(per layer, before the final norm) and max absolute error of the prefix attention
probabilities. Then it checks the out-of-memory path of ``Engine``: with the GPU memory capped,
a batch too large for it must be halved until it fits and give the same traces.

Imports only torch, timm, numpy, PIL and vitlens' models/capture/images/engine modules, so it
runs where diskcache is not installed (``Engine`` is used without a store). Stops measuring
when ``--budget`` seconds are spent (default 200; an H100 needs about a minute).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitlens.capture import PRECISIONS, capture  # noqa: E402
from vitlens.models import LoadedModel, ModelSpec, weights_fingerprint  # noqa: E402

ARCHS = {"ViT-L/14": "vit_large_patch14_dinov2", "ViT-g/14": "vit_giant_patch14_dinov2"}
LAYER_SCALE = 1.0
TINY_ARGS = dict(depth=2, embed_dim=96, num_heads=2)  # 96: the giant SwiGLU width 96 * 8/3 is whole


@dataclass
class Row:
    model: str
    precision: str
    batch: int
    timm_ips: float
    capture_ips: float
    peak_gib: float
    norm_abs: float | None = None
    norm_rel: float | None = None
    norm_rel_p999: float | None = None
    attn_abs: float | None = None


def main() -> int:
    args = _parser().parse_args()
    use_gpu = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")  # an index: memory caps need one
    side = 56 if args.tiny else args.side
    batches = {"ViT-L/14": 2, "ViT-g/14": 2} if args.tiny else {"ViT-L/14": args.batch_large, "ViT-g/14": args.batch_giant}
    started = time.monotonic()
    print(f"device {_device_name(device)}, torch {torch.__version__}, timm {timm.__version__}, side {side}px, "
          f"random weights (layer scale {LAYER_SCALE}), fp32 matmul precision '{torch.get_float32_matmul_precision()}'", flush=True)
    rows: list[Row] = []
    for label, arch in ARCHS.items():
        loaded = _build(arch, side, device, args.tiny)
        pixels = _images(batches[label], side, loaded, device)
        reference = None
        for precision in args.precisions:
            if time.monotonic() - started > args.budget:
                print(f"budget of {args.budget:.0f} s spent; skipping {label} {precision}", flush=True)
                continue
            row, traces = _measure(loaded, label, precision, pixels, args.iterations, device)
            if precision == "fp32":
                reference = traces
            elif reference is not None:
                _errors(row, traces, reference)
            rows.append(row)
            print(_format([row], header=not rows[:-1]), flush=True)
        del loaded, pixels, reference
        _free(device)
    print()
    print(_format(rows))
    if time.monotonic() - started < args.budget:
        print(_oom_check(device, side, args.tiny))
    print(f"total {time.monotonic() - started:.0f} s")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2-block, 96-channel models at 56 px on the CPU")
    parser.add_argument("--side", type=int, default=518)
    parser.add_argument("--batch-large", type=int, default=32)
    parser.add_argument("--batch-giant", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=3, help="timed batches per measurement (after one warm-up)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"], choices=list(PRECISIONS))
    parser.add_argument("--budget", type=float, default=200.0, help="seconds after which measuring stops")
    return parser


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _build(arch: str, side: int, device: torch.device, tiny: bool, layer_scale: float | None = LAYER_SCALE) -> LoadedModel:
    """Random weights, built directly on the device (a 1.1B-parameter init on the CPU is slow).

    Layer scale starts at ``layer_scale`` instead of timm's 1e-5, so every block adds to the
    residual stream as in a trained model; at 1e-5 the blocks barely matter and half-precision
    errors would look smaller than they are.
    """
    torch.manual_seed(0)
    with torch.device(device):
        model = timm.create_model(arch, pretrained=False, img_size=side, init_values=layer_scale, **(TINY_ARGS if tiny else {}))
    model.eval().requires_grad_(False)
    spec = ModelSpec(arch, arch, arch)
    # the fingerprint Engine expects for random weights, so it keeps this model instead of building its own
    return LoadedModel(spec=spec, model=model, weights="random", fingerprint=weights_fingerprint(spec, "random"))


def _images(batch: int, side: int, loaded: LoadedModel, device: torch.device) -> torch.Tensor:
    """Structured synthetic images: smooth gradients, a flat background region and a few blobs."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side] / side
    images = []
    for _ in range(batch):
        image = np.stack([np.sin(x * rng.uniform(2, 9) + rng.uniform(0, 6)) * 0.5 + 0.5 for _ in range(3)])
        image[:, : side // 3, :] = rng.uniform(0.7, 1.0)  # uniform band: where artifact tokens like to sit
        for _ in range(4):
            cy, cx, r = rng.uniform(0.3, 1.0), rng.uniform(0, 1), rng.uniform(0.05, 0.15)
            image[:, (y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 1, size=(3, 1))
        images.append(image)
    pixels = torch.tensor(np.stack(images), dtype=torch.float32)
    mean, std = torch.tensor(loaded.mean).view(1, 3, 1, 1), torch.tensor(loaded.std).view(1, 3, 1, 1)
    return ((pixels - mean) / std).to(device)


def _autocast(device: torch.device, precision: str):
    return contextlib.nullcontext() if precision == "fp32" else torch.autocast(device.type, dtype=PRECISIONS[precision])


def _timed(function, iterations: int, device: torch.device) -> tuple[float, object]:
    result = function()  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        result = function()
    _sync(device)
    return (time.perf_counter() - start) / iterations, result


def _measure(loaded: LoadedModel, label: str, precision: str, pixels: torch.Tensor, iterations: int,
             device: torch.device) -> tuple[Row, list]:
    batch = pixels.shape[0]

    def plain():
        with torch.inference_mode(), _autocast(device, precision):
            return loaded.model.forward_features(pixels)

    _free(device)
    plain_s, _ = _timed(plain, iterations, device)
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    capture_s, traces = _timed(lambda: capture(loaded, pixels, precision=precision), iterations, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return Row(label, precision, batch, batch / plain_s, batch / capture_s, peak), traces


def _errors(row: Row, traces: list, reference: list) -> None:
    norms = np.stack([trace.norms for trace in traces]).astype(np.float64)  # [image, layer, token]
    exact = np.stack([trace.norms for trace in reference]).astype(np.float64)
    relative = np.abs(norms - exact) / np.maximum(np.abs(exact), 1e-6)
    attention = np.stack([trace.attention for trace in traces]).astype(np.float64)  # [image, layer, head, prefix, token]
    attention_exact = np.stack([trace.attention for trace in reference]).astype(np.float64)
    row.norm_abs = float(np.abs(norms - exact).max())
    row.norm_rel = float(relative.max())
    row.norm_rel_p999 = float(np.quantile(relative, 0.999))
    row.attn_abs = float(np.abs(attention - attention_exact).max())


def _format(rows: list[Row], header: bool = True) -> str:
    lines = [f"{'model':<9} {'prec':<5} {'batch':>5} {'timm img/s':>10} {'capture img/s':>13} {'overhead':>8} {'peak GiB':>8} "
             f"{'norm abs':>9} {'norm rel':>9} {'rel p99.9':>9} {'attn abs':>9}"] if header else []
    for row in rows:
        def number(value):
            return "-" if value is None else f"{value:.2e}"
        lines.append(f"{row.model:<9} {row.precision:<5} {row.batch:>5} {row.timm_ips:>10.1f} {row.capture_ips:>13.1f} "
                     f"{row.timm_ips / row.capture_ips - 1:>+8.0%} {row.peak_gib:>8.2f} {number(row.norm_abs):>9} "
                     f"{number(row.norm_rel):>9} {number(row.norm_rel_p999):>9} {number(row.attn_abs):>9}")
    return "\n".join(lines)


def _oom_check(device: torch.device, side: int, tiny: bool) -> str:
    """Ask ``Engine`` for a batch that cannot fit; it must halve until it fits and match batch-1 results."""
    try:
        import diskcache  # noqa: F401
    except ImportError:  # Engine imports the store module, whose TraceStore (unused here) needs diskcache
        sys.modules["diskcache"] = types.ModuleType("diskcache")
    import vitlens.engine as engine_module
    from vitlens.images import DecodedImage, resize_for_model, to_tensor
    from vitlens.store import CaptureOptions
    from PIL import Image

    arch, batch = ARCHS["ViT-L/14"], (8 if tiny else 64)
    tried: list[tuple[int, str]] = []
    original = engine_module.capture

    def watched(loaded, pixels, **kwargs):
        try:
            if tiny and pixels.shape[0] > 2:  # no GPU memory to cap on the CPU: simulate it
                raise torch.cuda.OutOfMemoryError("simulated")
            result = original(loaded, pixels, **kwargs)
        except torch.cuda.OutOfMemoryError:
            tried.append((pixels.shape[0], "OOM"))
            raise
        tried.append((pixels.shape[0], "ok"))
        return result

    rng = np.random.default_rng(1)
    images = [DecodedImage(f"i{i}", Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)), f"{i:024x}")
              for i in range(batch)]
    engine = engine_module.Engine(store=None, device=str(device), max_models=1, max_batch=batch)
    loaded = _build(arch, side, device, tiny)
    engine._models[(arch, "random")] = loaded  # built on the device (fast); the engine's loader would build on the CPU
    options = CaptureOptions(side=side)
    capped = None
    engine_module.capture = watched
    try:
        if device.type == "cuda":
            _free(device)
            torch.cuda.reset_peak_memory_stats(device)
            baseline = torch.cuda.memory_allocated(device)
            engine.traces(images[:2], arch, "random", options)  # per-image cost at batch 2
            per_image = (torch.cuda.max_memory_allocated(device) - baseline) / 2
            total = torch.cuda.get_device_properties(device).total_memory
            capped = baseline + per_image * batch / 4  # room for about a quarter of the batch
            torch.cuda.set_per_process_memory_fraction(min(1.0, capped / total), device)
            tried.clear()
        start = time.perf_counter()
        results = engine.traces(images, arch, "random", options)
        seconds = time.perf_counter() - start
    except torch.cuda.OutOfMemoryError:
        return f"OOM halving: FAILED, out of memory even at batch 1 (tried {tried})"
    finally:
        engine_module.capture = original
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            _free(device)
    sizes = [size for size, _ in tried]
    ooms = sum(1 for _, outcome in tried if outcome == "OOM")
    settled = next((size for size, outcome in tried if outcome == "ok"), None)
    pixels = to_tensor(resize_for_model(images[-1].image, side, loaded.patch_size), loaded.mean, loaded.std)
    check = capture(loaded, pixels[None].to(device))[0]
    difference = float(np.abs(results[-1].trace.norms - check.norms).max())
    cap = f"memory capped at {capped / 2**30:.1f} GiB, " if capped else "OOM simulated above batch 2, "
    verdict = "ok" if ooms and settled and settled < batch and difference < 1e-2 * float(np.abs(check.norms).max()) else "FAILED"
    return (f"OOM halving: {verdict}; {cap}asked batch {batch}: {ooms} OOM(s), settled at batch {settled} "
            f"({len(sizes)} passes, {seconds:.1f} s); last image vs batch-1 capture: max norm diff {difference:.2e}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
