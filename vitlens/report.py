"""One self-contained HTML report of the paper's measurements on a model and a folder of images.

Sections: setup (model, weights fingerprint, data, options), norms (outliers per layer, the
norm histogram, norm and neighbour-similarity maps), redundancy (Fig. 5a), local probes and
global probes (Table 1), LOST object discovery (Table 3). A section that the data cannot answer
says why in one sentence instead. Plotly's JavaScript is inlined once, pictures are data URIs,
so the file opens anywhere without a network.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from .adapters import adapter_for
from .analysis.lost import DEFAULT_K
from .analysis.outliers import layer_outliers
from .analysis.redundancy import redundancy
from .discovery import REFERENCE_CORLOC, discover, lost_voc, voc_items
from .engine import Engine
from .errors import DataError, ImageError
from .evidence import (REFERENCES, EvidenceOptions, Failed, find_images, global_probe_run, image_classes,
                       local_probe_run, traces)
from .evidence_figures import (draw_discovery, norm_and_similarity_figure, norm_histogram_figure,
                               outliers_per_layer_figure, redundancy_figure)
from .images import read_image_file

SECTIONS = ("setup", "norms", "redundancy", "local-probes", "global-probes", "lost")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ReportOptions:
    """What the report runs.

    Attributes:
        evidence: Layer, threshold, capture options for the norm views, redundancy and probes.
        lost_layer: Block whose attention features LOST uses.
        lost_features: ``k``, ``q`` or ``v``.
        lost_k: LOST's seed-expansion size.
        shown: Images drawn one by one (norm maps, LOST boxes).
    """

    evidence: EvidenceOptions = EvidenceOptions()
    lost_layer: int = -1
    lost_features: str = "k"
    lost_k: int = DEFAULT_K
    shown: int = 6


def build_report(engine: Engine, model: str, weights: str, images: Path, options: ReportOptions = ReportOptions(),
                 command: str | None = None, progress: Progress | None = None) -> str:
    """The report as one HTML document.

    Raises:
        DataError: no image in ``images``.
    """
    say = progress or (lambda message: None)
    paths = find_images(images)
    loaded = engine.model(model, weights)
    say("norms and redundancy")
    norms_html, redundancy_html, failed = _norms_and_redundancy(engine, paths, model, weights, options)
    sections = {
        "setup": _setup(loaded, model, weights, images, paths, failed, options, command),
        "norms": norms_html,
        "redundancy": redundancy_html,
    }
    say("local probes")
    sections["local-probes"] = _guarded(lambda: _local_probes(engine, paths, model, weights, options.evidence))
    say("global probes")
    sections["global-probes"] = _guarded(lambda: _global_probes(engine, images, model, weights, options.evidence))
    say("object discovery")
    sections["lost"] = _guarded(lambda: _lost(loaded, images, paths, options))
    return _page(model, weights, sections)


def _guarded(section: Callable[[], str]) -> str:
    """The section, or the one sentence saying why the data cannot answer it."""
    try:
        return section()
    except DataError as error:
        return _note(str(error))


def _setup(loaded, model: str, weights: str, images: Path, paths: Sequence[Path], failed: Sequence[Failed],
           options: ReportOptions, command: str | None) -> str:
    evidence = options.evidence
    rows = [
        ("model", model), ("architecture", loaded.spec.arch), ("weights", str(weights)),
        ("weights fingerprint", loaded.fingerprint), ("patch size", loaded.patch_size),
        ("registers", adapter_for(loaded.model).prefix(loaded.model).num_registers),
        ("images", f"{images} ({len(paths)} files, {len(failed)} unreadable)"),
        ("image files", ", ".join(str(p.relative_to(images)) if p != images else p.name for p in paths[:50])
         + (f" and {len(paths) - 50} more" if len(paths) > 50 else "")),
        ("input size", evidence.capture.side or f"{max(loaded.native_size)} (the model's own)"),
        ("antialiased position embeddings", evidence.capture.antialias), ("precision", evidence.capture.precision),
        ("outlier layer", evidence.layer), ("outlier threshold", "auto" if evidence.threshold is None else evidence.threshold),
        ("LOST", f"layer {options.lost_layer}, features {options.lost_features}, k {options.lost_k}"),
        ("vitlens", _version()), ("generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
    ]
    if command:
        rows.append(("command", command))
    body = _table(["", ""], rows, header=False)
    if failed:
        body += "<h3>Unreadable images</h3>" + _table(["image", "reason"], [(f.image, f.reason) for f in failed])
    return body


def _version() -> str:
    try:
        return version("vitlens")
    except PackageNotFoundError:
        return "unknown"


def _norms_and_redundancy(engine: Engine, paths: Sequence[Path], model: str, weights: str,
                          options: ReportOptions) -> tuple[str, str, list[Failed]]:
    """One pass over the images for the norm views and the redundancy section."""
    evidence = options.evidence
    failed: list[Failed] = []
    counts, layer_norms, thresholds, similarities, masks, maps = None, [], [], [], [], []
    layer = evidence.layer
    for path, _, trace in traces(engine, paths, model, weights, evidence, failed=failed):
        outliers = layer_outliers(trace, evidence.threshold)
        layer = evidence.layer % trace.num_layers
        counts = outliers.counts if counts is None else counts + outliers.counts
        grid_norms = trace.patch_norms()[layer]  # [row, col]
        layer_norms.append(grid_norms.ravel())
        thresholds.append(outliers.thresholds[layer])
        similarities.append(trace.neighbor_similarity)
        masks.append(outliers.masks[layer])
        if len(maps) < options.shown:
            maps.append((path.name, grid_norms, trace.neighbor_similarity, outliers.masks[layer]))
    if counts is None:
        raise DataError("None of the images could be read.")
    norms_html = (_figure(outliers_per_layer_figure(counts, len(masks)))
                  + _figure(norm_histogram_figure(np.concatenate(layer_norms), thresholds, layer))
                  + "".join(_figure(norm_and_similarity_figure(n, s, m, f"{name}: layer {layer}")) for name, n, s, m in maps))
    result = redundancy(similarities, masks)
    summary = result.summary()
    redundancy_html = _figure(redundancy_figure(result)) + _table(list(summary), [tuple(_cell(v) for v in summary.values())])
    if result.auroc is None:
        redundancy_html = _note(f"No outlier tokens at layer {layer} in {len(masks)} images, so there is nothing to "
                                "compare; try another layer or threshold.") + redundancy_html
    redundancy_html += _reference("Paper, Fig. 5a (DINOv2 ViT-g): outlier tokens sit where the patch embedding is most "
                                  "similar to its 4 neighbours; the outlier distribution lies to the right of the normal one.")
    return norms_html, redundancy_html, failed


def _local_probes(engine: Engine, paths: Sequence[Path], model: str, weights: str, options: EvidenceOptions) -> str:
    run = local_probe_run(engine, paths, model, weights, options)
    result = run.result
    rows = [(group, score.count, _cell(score.position_accuracy), _cell(score.position_distance), _cell(score.pixel_error),
             _cell(REFERENCES["position_accuracy"][group]), _cell(REFERENCES["position_distance"][group]),
             _cell(REFERENCES["pixel_error"][group]))
            for group, score in (("normal", result.normal), ("outlier", result.outlier))]
    header = ["tokens", "test tokens", "position top-1", "distance (patches)", "pixel MSE (normalised)",
              "paper: top-1", "paper: distance", "paper: L2 error"]
    intro = (f"<p>Ridge probes on patch tokens of layer {run.layer}, grid {list(result.grid)}, square centre crops; "
             f"{result.num_train_images} training and {result.num_test_images} test images (split by image).</p>")
    note = _note("No outlier token among the test images; only normal tokens are scored.") if not result.outlier.count else ""
    return intro + note + _table(header, rows)


def _global_probes(engine: Engine, images: Path, model: str, weights: str, options: EvidenceOptions) -> str:
    image_classes(images)
    run = global_probe_run(engine, images, model, weights, options)
    reference = REFERENCES["global_accuracy_imagenet"]
    rows = [(kind, _cell(score.accuracy), score.num_images, score.num_train, score.num_test, score.num_classes,
             _cell(reference[kind]), score.reason or "") for kind, score in run.result.scores.items()]
    header = ["token", "accuracy", "images", "train", "test", "classes", "paper (ImageNet-1k)", "note"]
    return f"<p>Logistic regression from one token per image of layer {run.layer} to its class.</p>" + _table(header, rows)


def _lost(loaded, images: Path, paths: Sequence[Path], options: ReportOptions) -> str:
    reference = _table(["model (paper, VOC2007)", "corLoc"], list(REFERENCE_CORLOC.items()))
    side = options.evidence.capture.side
    try:
        voc_items(images)
    except DataError:
        pictures = [_discover_picture(loaded, path, options) for path in paths[:options.shown]]
        return (_note("Not a Pascal-VOC folder (JPEGImages/ + Annotations/), so no corLoc; boxes drawn on the first images.")
                + "".join(pictures) + reference)
    document = lost_voc(images, loaded, side=side, layer=options.lost_layer, which=options.lost_features, k=options.lost_k,
                        max_pixels=options.evidence.max_pixels, max_bytes=options.evidence.max_bytes)
    score = "n/a" if document["corloc"] is None else f"{100 * document['corloc']:.1f}"
    rows = [(row["image"], row["box"], row["seed"], _cell(row["iou"]), row["correct"]) for row in document["images"]]
    pictures = [_discover_picture(loaded, images / "JPEGImages" / row["image"], options) for row in document["images"][:options.shown]]
    failed = _table(["image", "reason"], [(f["image"], f["reason"]) for f in document["failed"]]) if document["failed"] else ""
    return (f"<p><b>corLoc {score}</b> on {document['num_images']} images ({len(document['failed'])} failed).</p>"
            + reference + "".join(pictures) + _table(["image", "box", "seed", "IoU", "correct"], rows) + failed)


def _discover_picture(loaded, path: Path, options: ReportOptions) -> str:
    try:
        image = read_image_file(path, max_pixels=options.evidence.max_pixels, max_bytes=options.evidence.max_bytes).image
    except ImageError as error:
        return _note(str(error))
    found = discover(loaded, image, options.evidence.capture.side, options.lost_layer, options.lost_features, options.lost_k)
    buffer = io.BytesIO()
    draw_discovery(image, found).save(buffer, format="JPEG", quality=85)
    uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    caption = html.escape(f"{path.name}: box {list(found.box)}, seed {list(found.result.seed)}")
    return f'<figure><img src="{uri}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _table(columns: Sequence[str], rows: Sequence[Sequence], header: bool = True) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in columns) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _reference(text: str) -> str:
    return f'<p class="reference">{html.escape(text)}</p>'


def _figure(fig: go.Figure) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})


TITLES = {"setup": "Setup", "norms": "Token norms", "redundancy": "Neighbour redundancy (paper Fig. 5a)",
          "local-probes": "Local information: position and pixels (paper Table 1, left)",
          "global-probes": "Global information: image class (paper Table 1, right)",
          "lost": "Object discovery: LOST (paper Table 3)"}
STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
.note{background:#fff4d6;padding:.5em .8em;border-left:4px solid #f0a500}.reference{color:#555;font-style:italic}
figure{display:inline-block;margin:.5em}figcaption{font-size:.85em;color:#555}nav a{margin-right:1em}"""


def _page(model: str, weights: str, sections: dict[str, str]) -> str:
    title = html.escape(f"vitlens report: {model} ({weights})")
    nav = "".join(f'<a href="#{key}">{html.escape(TITLES[key])}</a>' for key in SECTIONS)
    body = "".join(f'<section id="{key}"><h2>{html.escape(TITLES[key])}</h2>{sections[key]}</section>' for key in SECTIONS)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style>"
            f"<script>{get_plotlyjs()}</script></head><body><h1>{title}</h1><nav>{nav}</nav>{body}</body></html>")
