"""Bodies of the evidence commands (``lost``, ``redundancy``, ``probes``, ``report``); cli.py parses."""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Sequence

from .engine import resolve_device
from .errors import OptionError
from .models import load_model
from .settings import Settings


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
                           max_pixels=settings.max_pixels)}
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
