"""The surface the sidebar and the pages share: requests, captures, images, weights, jobs and errors.

The work is split by concern: ``resources`` (settings, engine), ``jobs`` (background work),
``uploads`` (images), ``choices`` (models and weights), ``captures`` (requests and their traces),
and one view-model module per family of pages (``image_data`` for the per-image pages). Only
those modules use ``st.cache_*``; ``figures`` stays free of streamlit and ``vitlens`` never
imports it. Pages import this module for the shared pieces and their own view-model module.
"""
from __future__ import annotations

from captures import Captured, ModelChoice, Request, captured, offline_fallback, synthetic_note
from choices import (NAMED_WEIGHTS, RANDOM_NOTE, WEIGHTS_FILE_PREFIX, add_weights_upload, check_model,
                     pair_of, patch_size, presets, weights_files, weights_label)
from jobs import Cancelled, Job, Pending, forget, running_jobs
from resources import settings
from uploads import GALLERY_NAMES, add_upload, has_image, image_label, image_name, share_uploads
from vitlens.analysis.outliers import parse_threshold
from vitlens.errors import ImageError, OptionError, VitlensError, WeightsError

__all__ = ["Captured", "ModelChoice", "Request", "captured", "offline_fallback", "synthetic_note",
           "NAMED_WEIGHTS", "RANDOM_NOTE", "WEIGHTS_FILE_PREFIX", "add_weights_upload", "check_model", "pair_of",
           "patch_size", "presets", "weights_files", "weights_label",
           "Cancelled", "Job", "Pending", "forget", "running_jobs", "settings",
           "GALLERY_NAMES", "add_upload", "has_image", "image_label", "image_name", "share_uploads",
           "parse_threshold", "ImageError", "OptionError", "VitlensError", "WeightsError"]
