"""Bodies of the evidence commands (``lost``, ``redundancy``, ``probes``, ``report``); cli.py parses."""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
from pathlib import Path
from typing import Sequence

from .analysis.outliers import parse_threshold
from .engine import Engine, resolve_device
from .errors import DataError, OptionError
from .evidence import (REFERENCES, EvidenceOptions, find_images, global_probe_run, image_classes, local_probe_run,
                       redundancy_run)
from .models import load_model
from .settings import Settings
from .store import CaptureOptions, TraceStore


def run_lost(args: argparse.Namespace, settings: Settings) -> int:
    """``python -m vitlens lost``: corLoc of LOST on a VOC-style folder."""
    from .discovery import lost_voc, voc_items

    settings.check_side(args.size)
    if args.k < 1:
        raise OptionError(f"--k must be at least 1, not {args.k}.")
    voc_items(args.voc)  # a malformed folder fails before the model loads
    loaded = load_model(args.model, args.weights, device=resolve_device(settings.device))
    document = {"model": args.model, "weights": str(args.weights), "fingerprint": loaded.fingerprint,
                **lost_voc(args.voc, loaded, side=args.size, layer=args.layer, which=args.features, k=args.k,
                           difficult=not args.no_difficult, antialias=not args.no_antialias,
                           max_pixels=settings.max_pixels, max_bytes=settings.max_image_bytes)}
    if args.out:
        write_rows(args.out, document["images"], document)
    print(json.dumps(document, indent=2) if args.json else _lost_text(document))
    return 0


def _lost_text(document: dict) -> str:
    corloc = "n/a" if document["corloc"] is None else f"{100 * document['corloc']:.1f}"
    lines = [f"{document['model']} ({document['weights']}): corLoc {corloc} on {document['num_images']} images, "
             f"{len(document['failed'])} failed"]
    lines += [f"  failed {item['image']}: {item['reason']}" for item in document["failed"]]
    return "\n".join(lines)


def write_rows(path: Path, rows: Sequence[dict], document: dict | None = None) -> None:
    """Rows to ``.csv`` (one line each), or the whole ``document`` (else the rows) to ``.json``.

    Raises:
        OptionError: another suffix, or the file cannot be written.
    """
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise OptionError(f"--out must end in .csv or .json, not '{path.name}'.")
    try:
        with open(path, "w", newline="") as handle:
            if suffix == ".json":
                json.dump(document if document is not None else list(rows), handle, indent=2)
            else:
                _write_csv(handle, rows)
    except OSError as error:
        raise OptionError(f"Cannot write '{path}': {error.strerror or error}.") from error


def _write_csv(handle, rows: Sequence[dict]) -> None:
    fields = list(rows[0]) if rows else []
    writer = csv.DictWriter(handle, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: json.dumps(value) if isinstance(value, (list, dict)) else value for key, value in row.items()})


def _setup(args: argparse.Namespace, settings: Settings) -> tuple[Engine, EvidenceOptions, dict]:
    """The engine, the options and the document head (model, weights fingerprint, options)."""
    settings.check_side(args.size)
    options = EvidenceOptions(layer=args.layer, threshold=parse_threshold(args.threshold),
                              capture=CaptureOptions(side=args.size), max_pixels=settings.max_pixels,
                              max_bytes=settings.max_image_bytes)
    engine = Engine(TraceStore(settings.cache_dir, settings.cache_size), device=settings.device)
    loaded = engine.model(args.model, args.weights)
    head = {"model": args.model, "weights": str(args.weights), "fingerprint": loaded.fingerprint,
            "images_from": str(args.images), "size": args.size or max(loaded.native_size),
            "threshold": args.threshold}
    return engine, options, head


def _finish(args: argparse.Namespace, document: dict, rows: Sequence[dict], text: str) -> int:
    if args.out:
        write_rows(args.out, rows, document)
    print(json.dumps(document, indent=2) if args.json else text)
    return 0


def _no_outliers(layer: int, count: int, threshold: str) -> DataError:
    return DataError(f"No outlier tokens at layer {layer} in {count} images (threshold {threshold}); "
                     "try another --layer or --threshold, or a model that has artifacts.")


def run_redundancy(args: argparse.Namespace, settings: Settings) -> int:
    """``python -m vitlens redundancy``: neighbour similarity at outlier vs normal cells."""
    paths = find_images(args.images)
    engine, options, head = _setup(args, settings)
    run = redundancy_run(engine, paths, args.model, args.weights, options)
    result = run.result
    if not result.outlier.size:
        raise _no_outliers(run.layer, len(run.images), args.threshold)
    document = {**head, "layer": run.layer, **result.summary(), "failed": [vars(f) for f in run.failed]}
    rows = [{"group": group, "similarity": float(value)}
            for group, values in (("outlier", result.outlier), ("normal", result.normal)) for value in values]
    text = (f"layer {run.layer}: neighbour similarity {result.summary()['outlier_mean']:.3f} at {result.outlier.size} outlier "
            f"cells vs {result.summary()['normal_mean']:.3f} at {result.normal.size} normal cells; AUROC {result.auroc:.3f} "
            f"({len(run.images)} images, {len(run.failed)} unreadable)")
    return _finish(args, document, rows, text)


def run_probes(args: argparse.Namespace, settings: Settings) -> int:
    """``python -m vitlens probes``: position and pixel probes on outlier vs normal patch tokens."""
    paths = find_images(args.images)
    engine, options, head = _setup(args, settings)
    run = local_probe_run(engine, paths, args.model, args.weights, options)
    result = run.result
    if not result.outlier.count:
        raise _no_outliers(run.layer, len(run.images), args.threshold)
    document = {**head, "layer": run.layer, **result.summary(), "reference": REFERENCES,
                "failed": [vars(f) for f in run.failed]}
    rows = [{"group": group, **vars(score)} for group, score in (("normal", result.normal), ("outlier", result.outlier))]
    text = "\n".join([f"layer {run.layer}, grid {list(result.grid)}: {result.num_train_images} train / {result.num_test_images} test images"]
                     + [_local_line(row) for row in rows])
    return _finish(args, document, rows, text)


def _local_line(row: dict) -> str:
    def number(value, digits=3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"
    return (f"  {row['group']:<8} tokens {row['count']:>7}  position accuracy {number(row['position_accuracy'])}  "
            f"distance {number(row['position_distance'], 2)}  pixel MSE {number(row['pixel_error'])}")


def run_global_probes(args: argparse.Namespace, settings: Settings) -> int:
    """``python -m vitlens global-probes``: class prediction from CLS, a normal and an outlier patch token."""
    image_classes(args.images)  # a folder without classes fails before the model loads
    engine, options, head = _setup(args, settings)
    run = global_probe_run(engine, args.images, args.model, args.weights, options)
    result = run.result
    document = {**head, "layer": run.layer, **result.summary(), "reference": REFERENCES["global_accuracy_imagenet"],
                "failed": [vars(f) for f in run.failed]}
    rows = [{"token": kind, **vars(score)} for kind, score in result.scores.items()]
    lines = [f"layer {run.layer}: {len(result.classes)} classes, {len(run.images)} images"]
    for row in rows:
        outcome = f"accuracy {row['accuracy']:.3f}" if row["accuracy"] is not None else f"not run: {row['reason']}"
        lines.append(f"  {row['token']:<8} {outcome} ({row['num_train']} train / {row['num_test']} test images)")
    return _finish(args, document, rows, "\n".join(lines))


def run_report(args: argparse.Namespace, settings: Settings) -> int:
    """``python -m vitlens report``: the self-contained HTML report."""
    from .report import ReportOptions, build_report

    settings.check_side(args.size)
    if args.k < 1:
        raise OptionError(f"--k must be at least 1, not {args.k}.")
    if args.out.suffix.lower() not in (".html", ".htm"):
        raise OptionError(f"--out must end in .html, not '{args.out.name}'.")
    evidence = EvidenceOptions(layer=args.layer, threshold=parse_threshold(args.threshold),
                               capture=CaptureOptions(side=args.size), max_pixels=settings.max_pixels,
                               max_bytes=settings.max_image_bytes)
    options = ReportOptions(evidence=evidence, lost_features=args.features, lost_k=args.k)
    engine = Engine(TraceStore(settings.cache_dir, settings.cache_size), device=settings.device)
    command = _report_command(args)
    page = build_report(engine, args.model, args.weights, args.images, options, command=command,
                        progress=lambda step: print(f"report: {step}", file=sys.stderr))
    try:
        args.out.write_text(page, encoding="utf-8")
    except OSError as error:
        raise OptionError(f"Cannot write '{args.out}': {error.strerror or error}.") from error
    print(f"wrote {args.out} ({len(page) / 1e6:.1f} MB)")
    return 0


def _report_command(args: argparse.Namespace) -> str:
    """The command that rebuilds this report, every option spelled out."""
    parts = ["python -m vitlens report", "--model", args.model, "--weights", str(args.weights), "--images", str(args.images),
             "--out", str(args.out), "--layer", str(args.layer), "--threshold", str(args.threshold),
             "--features", args.features, "--k", str(args.k)]
    if args.size is not None:
        parts += ["--size", str(args.size)]
    return " ".join([parts[0], *(shlex.quote(part) for part in parts[1:])])
