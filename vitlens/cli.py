"""Command line: ``python -m vitlens inspect|sweep|neurons|models|fetch|worker``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .analysis.neurons import DEFAULT_TOP, ImageBatches, RegisterNeurons, read_neurons, score_neurons, write_neurons
from .analysis.outliers import LayerOutliers, layer_outliers, parse_threshold
from .engine import Engine, TraceResult, resolve_device
from .errors import OptionError, VitlensError
from .images import read_image_file
from .interventions import PATCH_VALUES, REGISTER_INITS, TestTimeRegister, check_register
from .models import PRESETS, load_model
from .settings import Settings
from .store import CaptureOptions, TraceStore

EXIT_BAD_INPUT = 2
EXIT_BUG = 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args, Settings.from_env())
    except VitlensError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:  # a vitlens bug, not bad input: one line; the traceback on request
        if os.environ.get("VITLENS_DEBUG"):
            raise
        print(f"error: vitlens failed unexpectedly ({type(error).__name__}: {error}); "
              "rerun with VITLENS_DEBUG=1 for the traceback.", file=sys.stderr)
        return EXIT_BUG


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vitlens", description="Look at high-norm artifact tokens in ViTs.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="per-layer token norms, outliers and prefix attention of one image")
    inspect.add_argument("image", type=Path)
    inspect.add_argument("--model", required=True, help="a preset (see `models`) or any timm ViT name")
    inspect.add_argument("--weights", default="hub", help="hub (default), random, synthetic (demo: random weights with planted outliers, not a trained model), or a .safetensors/.pth/.pt file")
    inspect.add_argument("--size", type=int, default=None, help="longer input side in pixels (default: the model's own)")
    inspect.add_argument("--threshold", default="auto", help="outlier norm threshold: auto (default; see docs/outliers.md) or a number")
    inspect.add_argument("--no-antialias", action="store_true", help="resample position embeddings without antialiasing")
    inspect.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    inspect.add_argument("--save", type=Path, help="write the arrays to this .npz file")
    inspect.add_argument("--json", action="store_true", help="print a JSON summary")
    inspect.add_argument("--test-time-register", type=Path, metavar="FILE.json",
                         help="run with one extra register token that takes over the neurons listed in FILE (from `neurons`)")
    inspect.add_argument("--register-init", choices=REGISTER_INITS, default="zeros",
                         help="how the test-time register starts: zeros (default, as the authors' DINOv2 code) or the patch mean (their OpenCLIP code)")
    inspect.add_argument("--register-patches", choices=PATCH_VALUES, default="zero",
                         help="what the patches' activations of those neurons become: zero (default) or the mean of their lower 75%%")
    inspect.set_defaults(run=_inspect)

    sweep = commands.add_parser("sweep", help="images x models x weights (checkpoint series) -> Parquet rows per layer")
    sweep.add_argument("images", help="a folder (searched recursively) or a quoted glob")
    sweep.add_argument("--model", nargs="+", required=True, help="presets or timm ViT names")
    sweep.add_argument("--weights", nargs="+", required=True, help="hub, random, synthetic, files, folders or quoted globs")
    sweep.add_argument("--out", type=Path, required=True, help="results folder (Parquet dataset); a rerun continues it")
    sweep.add_argument("--size", type=int, default=None, help="longer input side in pixels (default: each model's own)")
    sweep.add_argument("--threshold", default="auto", help="outlier norm threshold: auto (default) or a number")
    sweep.add_argument("--batch", type=int, default=8, help="images per forward pass and per Parquet file (default 8)")
    sweep.add_argument("--engine", choices=("local", "ray"), default="local", help="local (default) or ray")
    sweep.add_argument("--ray-address", default=None, help="Ray cluster: auto or HOST:PORT (default: start a local Ray)")
    sweep.add_argument("--no-antialias", action="store_true", help="resample position embeddings without antialiasing")
    sweep.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    sweep.add_argument("--json", action="store_true", help="print a JSON summary")
    sweep.set_defaults(run=_sweep)

    neurons = commands.add_parser("neurons", help="rank MLP neurons by their activation at outlier tokens (register neurons)")
    neurons.add_argument("images", help="a folder (searched recursively) or a quoted glob of images")
    neurons.add_argument("--model", required=True, help="a preset (see `models`) or any timm ViT name")
    neurons.add_argument("--weights", default="hub", help="hub (default), random, synthetic, or a .safetensors/.pth/.pt file")
    neurons.add_argument("--max-layer", type=int, default=None, help="last block whose neurons are ranked (default: the detector layer)")
    neurons.add_argument("--top", type=int, default=DEFAULT_TOP, help=f"neurons kept (default {DEFAULT_TOP})")
    neurons.add_argument("--threshold", default="auto", help="outlier norm threshold: auto (default) or a number")
    neurons.add_argument("--detector-layer", type=int, default=None, help="block whose outliers count (default: the second-to-last)")
    neurons.add_argument("--sparse", action="store_true", help="rank only neurons that stay below 0.5 on at least half the tokens")
    neurons.add_argument("--size", type=int, default=None, help="longer input side in pixels (default: the model's own)")
    neurons.add_argument("--batch", type=int, default=8, help="images per forward pass (default 8)")
    neurons.add_argument("--out", type=Path, help="write the neuron list to this JSON file")
    neurons.add_argument("--json", action="store_true", help="print the neuron list as JSON")
    neurons.set_defaults(run=_neurons)

    models = commands.add_parser("models", help="list the model presets")
    models.set_defaults(run=_models)

    fetch = commands.add_parser("fetch", help="download a model's hub weights into the Hugging Face cache")
    fetch.add_argument("model")
    fetch.set_defaults(run=_fetch)

    lost = commands.add_parser("lost", help="LOST object discovery and corLoc on a Pascal-VOC-style folder")
    lost.add_argument("--voc", required=True, type=Path, help="folder with JPEGImages/ and Annotations/ (VOC XML)")
    lost.add_argument("--model", required=True, help="a preset (see `models`) or any timm ViT name")
    lost.add_argument("--weights", default="hub", help="hub (default), random, synthetic, or a .safetensors/.pth/.pt file")
    lost.add_argument("--size", type=int, default=None, help="longer input side in pixels (default: each image's own, as LOST)")
    lost.add_argument("--layer", type=int, default=-1, help="block whose attention features are used (default: the last)")
    lost.add_argument("--features", choices=("k", "q", "v"), default="k", help="keys (default), queries or values")
    lost.add_argument("--k", type=int, default=100, help="lowest-degree patches considered in the seed expansion (default 100)")
    lost.add_argument("--no-difficult", action="store_true", help="drop ground-truth boxes flagged difficult")
    lost.add_argument("--no-antialias", action="store_true", help="resample position embeddings without antialiasing")
    lost.add_argument("--out", type=Path, help="write the per-image boxes to this .json or .csv file")
    lost.add_argument("--json", action="store_true", help="print the JSON document")
    lost.set_defaults(run=_evidence("run_lost"))

    redundancy = commands.add_parser("redundancy", help="neighbour similarity of outlier vs normal patches (paper Fig. 5a)")
    _evidence_args(redundancy, "IMAGES: a folder (searched recursively) or one image")
    redundancy.set_defaults(run=_evidence("run_redundancy"))

    probes = commands.add_parser("probes", help="linear probes of position and pixels on outlier vs normal patch tokens (paper Table 1, left)")
    _evidence_args(probes, "IMAGES: a folder (searched recursively); square centre crops are used")
    probes.set_defaults(run=_evidence("run_probes"))

    global_probes = commands.add_parser("global-probes", help="class prediction from CLS, a normal and an outlier patch token (paper Table 1, right)")
    _evidence_args(global_probes, "IMAGES: an ImageFolder-style dataset, one subfolder of images per class")
    global_probes.set_defaults(run=_evidence("run_global_probes"))

    report = commands.add_parser("report", help="one self-contained HTML report: norms, redundancy, probes, LOST")
    report.add_argument("--model", required=True, help="a preset (see `models`) or any timm ViT name")
    report.add_argument("--weights", default="hub", help="hub (default), random, synthetic, or a .safetensors/.pth/.pt file")
    report.add_argument("--images", required=True, type=Path,
                        help="a folder of images (an ImageFolder adds global probes, a VOC folder adds corLoc)")
    report.add_argument("--out", type=Path, default=Path("report.html"), help="the HTML file (default report.html)")
    report.add_argument("--layer", type=int, default=-1, help="block whose outliers and tokens are used (default: the last)")
    report.add_argument("--threshold", default="auto", help="outlier norm threshold: auto (default) or a number")
    report.add_argument("--size", type=int, default=None, help="longer input side in pixels (default: the model's own)")
    report.add_argument("--features", choices=("k", "q", "v"), default="k", help="LOST features (default keys)")
    report.add_argument("--k", type=int, default=100, help="LOST seed-expansion size (default 100)")
    report.set_defaults(run=_evidence("run_report"))

    worker = commands.add_parser("worker", help="run capture jobs from the shared queue (hosted mode; owns the GPU)")
    worker.add_argument("--device", default=None, help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N (default: VITLENS_DEVICE)")
    worker.add_argument("--max-models", type=int, default=None, help="models kept loaded (default: VITLENS_WORKER_MAX_MODELS)")
    worker.add_argument("--batch", type=int, default=None, help="images per forward pass, halved on CUDA out-of-memory (default: VITLENS_WORKER_BATCH)")
    worker.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                        help="capture precision for every job (default: VITLENS_PRECISION, else each job's own)")
    worker.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs (default: run until SIGTERM)")
    worker.set_defaults(run=_worker)
    return parser


def _evidence_args(parser: argparse.ArgumentParser, images_help: str) -> None:
    parser.add_argument("images", type=Path, help=images_help)
    parser.add_argument("--model", required=True, help="a preset (see `models`) or any timm ViT name")
    parser.add_argument("--weights", default="hub", help="hub (default), random, synthetic, or a .safetensors/.pth/.pt file")
    parser.add_argument("--layer", type=int, default=-1, help="block whose outliers (and tokens) are used (default: the last)")
    parser.add_argument("--threshold", default="auto", help="outlier norm threshold: auto (default) or a number")
    parser.add_argument("--size", type=int, default=None, help="longer input side in pixels (default: the model's own)")
    parser.add_argument("--out", type=Path, help="write the table to this .csv or .json file")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")


def _evidence(name: str):
    """The body ``name`` of vitlens.evidence_cli, imported when the command runs."""
    def run(args: argparse.Namespace, settings: Settings) -> int:
        from . import evidence_cli

        return getattr(evidence_cli, name)(args, settings)
    return run


def _inspect(args: argparse.Namespace, settings: Settings) -> int:
    threshold = parse_threshold(args.threshold)
    settings.check_side(args.size)
    if args.save:
        check_save_path(args.save)
    image = read_image_file(args.image, max_pixels=settings.max_pixels, max_bytes=settings.max_image_bytes)
    engine = Engine(TraceStore(settings.cache_dir, settings.cache_size), device=settings.device)
    register = _test_time_register(args, engine) if args.test_time_register else None
    options = CaptureOptions(side=args.size, antialias=not args.no_antialias, precision=args.precision,
                             test_time_register=register)
    result = engine.traces([image], args.model, args.weights, options)[0]
    outliers = layer_outliers(result.trace, threshold)
    summary = inspect_summary(args, result, outliers)
    if args.save:
        save_npz(args.save, result, outliers)
        summary["saved"] = str(args.save.resolve())
    print(json.dumps(summary, indent=2) if args.json else _format_table(summary))
    return 0


def _test_time_register(args: argparse.Namespace, engine: Engine) -> TestTimeRegister:
    """The register of ``--test-time-register``, checked against the model (NeuronFileError/OptionError otherwise)."""
    neurons = read_neurons(args.test_time_register)
    neurons.check_model(args.model)
    register = TestTimeRegister(neurons.pairs(), init=args.register_init, patch_values=args.register_patches)
    check_register(engine.model(args.model, args.weights).model, register)
    return register


def _neurons(args: argparse.Namespace, settings: Settings) -> int:
    threshold = parse_threshold(args.threshold)
    settings.check_side(args.size)
    if args.top < 1 or args.batch < 1:
        raise OptionError("--top and --batch must be at least 1.")
    from .sweep import find_images  # pyarrow: imported only when needed

    paths = [Path(item.path) for item in find_images(args.images)]
    loaded = Engine(device=settings.device).model(args.model, args.weights)
    batches = ImageBatches(loaded, paths, side=args.size, batch=args.batch, max_pixels=settings.max_pixels,
                           max_bytes=settings.max_image_bytes)
    scores = score_neurons(loaded, batches, detector_layer=args.detector_layer, max_layer=args.max_layer,
                           threshold=threshold, sparse=args.sparse)
    if scores.num_images == 0:
        raise OptionError(f"None of the {len(paths)} files in '{args.images}' is a readable image.")
    if scores.images_with_outliers == 0:
        raise OptionError(f"No image has outliers at layer {scores.detector_layer}: lower --threshold or choose another "
                          "--detector-layer.")
    found = RegisterNeurons(model=args.model, weights=str(args.weights), neurons=tuple(scores.top(args.top)))
    if args.out:
        write_neurons(args.out, found)
    if args.json:
        print(json.dumps(found.to_json(), indent=2))
    else:
        print(f"{args.model} ({args.weights}): outliers at layer {scores.detector_layer} in {scores.images_with_outliers} of "
              f"{scores.num_images} images ({len(batches.failed)} unreadable files skipped); blocks 0-{scores.max_layer}")
        print(f"{'rank':>4} {'layer':>5} {'neuron':>6} {'score':>10}")
        for rank, neuron in enumerate(found.neurons, 1):
            print(f"{rank:>4} {neuron.layer:>5} {neuron.neuron:>6} {neuron.score:>10.3f}")
    return 0


def inspect_summary(args: argparse.Namespace, result: TraceResult, outliers: LayerOutliers) -> dict:
    """The ``--json`` document (layers are 0-based block indices; norms before the final norm)."""
    trace = result.trace
    layers = []
    for index in range(trace.num_layers):
        layer = outliers.layer(index)
        layers.append({
            "layer": index,
            "norm_median": float(outliers.norm_median[index]),
            "norm_max": float(outliers.norm_max[index]),
            "threshold": layer.threshold,
            "num_outliers": layer.count,
            "outliers": [list(cell) for cell in layer.cells],
            "threshold_reason": layer.decision.reason,
            "auto": layer.decision.to_dict(),
        })
    return {
        "model": args.model,
        "weights": str(args.weights),
        "image": str(args.image),
        "size": args.size or max(trace.input_size),
        "input_size": list(trace.input_size),
        "grid": list(trace.layout.grid),
        "num_prefix_tokens": trace.layout.num_prefix,
        "num_registers": trace.layout.num_registers,
        "cached": result.cached,
        "has_final_norm": trace.has_final_norm,
        "first_outlier_layer": outliers.first_layer,
        "layers": layers,
    }


def check_save_path(path: Path) -> None:
    """Refuse a ``--save`` target that numpy would rename or that cannot take a file.

    Raises:
        OptionError: no ``.npz`` suffix (numpy would append one), an existing folder or special
            file (a device, a pipe), or a folder to write in that is missing or read-only.
    """
    if path.suffix != ".npz":
        raise OptionError(f"--save needs a file name ending in .npz, not '{path}'.")
    if path.is_dir():
        raise OptionError(f"--save '{path}' is a folder; give a file name ending in .npz.")
    if path.exists() and not path.is_file():
        raise OptionError(f"--save '{path}' is a device or special file, not a regular file.")
    folder = path.resolve().parent
    if not folder.is_dir():
        raise OptionError(f"--save '{path}': the folder '{folder}' does not exist.")
    if not os.access(path if path.exists() else folder, os.W_OK):
        raise OptionError(f"--save '{path}' is not writable here (permission denied).")


def save_npz(path: Path, result: TraceResult, outliers: LayerOutliers) -> None:
    """Write the arrays of the CLI contract (see DESIGN.md) to ``path`` (checked by ``check_save_path``),
    plus ``pool_attention`` [pool_head, query, T] for a model with an attention-pool head."""
    trace = result.trace
    pool = {} if trace.pool_attention is None else {"pool_attention": trace.pool_attention.astype(np.float32)}
    try:
        with open(path, "wb") as handle:  # a file object: numpy never appends a suffix to it
            np.savez_compressed(
                handle,
                norms=trace.norms.astype(np.float32),
                final_norms=trace.final_norms_or_nan(),
                attention=trace.attention.astype(np.float32),
                outliers=outliers.masks,
                thresholds=outliers.thresholds.astype(np.float32),
                grid=np.array(trace.layout.grid),
                num_prefix_tokens=np.array(trace.layout.num_prefix),
                num_registers=np.array(trace.layout.num_registers),
                **pool,
            )
    except OSError as error:
        raise OptionError(f"Cannot write '{path}': {error.strerror or error}.") from error


def _format_table(summary: dict) -> str:
    head = (f"{summary['model']} ({summary['weights']}) on {summary['image']}: input {summary['input_size']}, "
            f"grid {summary['grid']}, {summary['num_registers']} registers{' (cached)' if summary['cached'] else ''}")
    rows = [f"{'layer':>5} {'median':>9} {'max':>9} {'threshold':>9} {'outliers':>8}"]
    for layer in summary["layers"]:
        threshold = "-" if layer["threshold"] is None else f"{layer['threshold']:.1f}"
        rows.append(f"{layer['layer']:>5} {layer['norm_median']:>9.1f} {layer['norm_max']:>9.1f} {threshold:>9} {layer['num_outliers']:>8}")
    if "saved" in summary:
        rows.append(f"arrays saved to {summary['saved']}")
    return "\n".join([head, *rows])


def _sweep(args: argparse.Namespace, settings: Settings) -> int:
    from .sweep import run_sweep, sweep_progress_bar

    settings.check_side(args.size)
    with sweep_progress_bar() as progress:
        summary = run_sweep(args.images, args.model, args.weights, args.out, size=args.size, threshold=args.threshold,
                            batch=args.batch, engine=args.engine, ray_address=args.ray_address,
                            antialias=not args.no_antialias, precision=args.precision, device=settings.device,
                            store=TraceStore(settings.cache_dir, settings.cache_size), max_pixels=settings.max_pixels,
                            max_image_bytes=settings.max_image_bytes,
                            progress=progress)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        print(summary.describe())
    return 0


def _models(args: argparse.Namespace, settings: Settings) -> int:
    for spec in PRESETS.values():
        pair = f"  (pair: {spec.pair})" if spec.pair else f"  (compare: {spec.compare})" if spec.compare else ""
        print(f"{spec.name:<20} {spec.label:<32} {spec.arch}{pair}")
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    """Run the worker until SIGTERM/SIGINT (the first finishes the running batch, a second stops at once)."""
    import dataclasses
    import logging
    import signal
    import threading

    from .worker import Worker

    overrides = {"device": args.device, "worker_max_models": args.max_models, "worker_batch": args.batch,
                 "precision": args.precision}
    settings = dataclasses.replace(settings, **{key: value for key, value in overrides.items() if value is not None})
    resolve_device(settings.device)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def on_signal(number: int, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        logging.getLogger("vitlens.worker").info("signal %d: finishing the running batch, then stopping", number)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        Worker(settings).run(stop, max_jobs=args.max_jobs)
    except KeyboardInterrupt:
        return 130
    return 0


def _fetch(args: argparse.Namespace, settings: Settings) -> int:
    loaded = load_model(args.model, "hub")
    print(f"{args.model}: weights in the Hugging Face cache ({loaded.fingerprint})")
    return 0
