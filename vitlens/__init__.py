"""vitlens: see the high-norm artifact tokens and the registers inside Vision Transformers.

The public API: load a model, decode an image, capture one forward pass, find the outliers.
Cached and batched captures: ``vitlens.engine.Engine``; the job queue: ``vitlens.client``.
"""
from .analysis.outliers import (LayerOutliers, OutlierResult, ThresholdDecision, auto_threshold, decide_threshold,
                                find_outliers, layer_outliers)
from .capture import Trace, capture
from .errors import HubUnavailableError, ImageError, OptionError, UnknownModelError, VitlensError, WeightsError
from .images import DecodedImage, decode_image, gallery_image, read_image_file, resize_for_model, to_tensor
from .layout import TokenLayout
from .models import PRESETS, LoadedModel, ModelSpec, load_model

__all__ = [
    "PRESETS", "DecodedImage", "HubUnavailableError", "ImageError", "LayerOutliers", "LoadedModel", "ModelSpec",
    "OptionError", "OutlierResult", "ThresholdDecision", "TokenLayout", "Trace", "UnknownModelError", "VitlensError",
    "WeightsError", "auto_threshold", "capture", "decide_threshold", "decode_image", "find_outliers", "gallery_image", "layer_outliers", "load_model",
    "read_image_file", "resize_for_model", "to_tensor",
]
