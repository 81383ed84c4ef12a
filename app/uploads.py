"""Images by reference: the gallery photographs and the uploads this process keeps in memory."""
from __future__ import annotations

import threading
from collections import OrderedDict

import streamlit as st

import figures
from resources import settings
from vitlens.capture import Trace
from vitlens.errors import ImageError
from vitlens.images import GALLERY, DecodedImage, decode_image, gallery_image

UPLOAD_PREFIX = "upload-"
MAX_UPLOAD_BYTES = 512 * 2**20  # decoded uploads kept in memory (shared by sessions, so a URL can name them)


GALLERY_NAMES: tuple[str, ...] = tuple(GALLERY)


class _Uploads:
    """Decoded uploads by reference, shared by the sessions of this process (newest kept)."""

    def __init__(self, limit: int = MAX_UPLOAD_BYTES) -> None:
        self.images: OrderedDict[str, DecodedImage] = OrderedDict()
        self.lock = threading.Lock()
        self.limit = limit

    def add(self, decoded: DecodedImage) -> str:
        ref = UPLOAD_PREFIX + decoded.digest[:16]
        with self.lock:
            self.images[ref] = decoded
            self.images.move_to_end(ref)
            while len(self.images) > 1 and sum(_nbytes(i) for i in self.images.values()) > self.limit:
                self.images.popitem(last=False)
        return ref


def _nbytes(decoded: DecodedImage) -> int:
    return decoded.image.width * decoded.image.height * 3


@st.cache_resource(show_spinner=False)
def _uploads() -> _Uploads:
    return _Uploads()


@st.cache_resource(show_spinner=False)
def _gallery(name: str) -> DecodedImage:
    return gallery_image(name)


def add_upload(name: str, content: bytes) -> str:
    """Decode an uploaded file and keep it; returns its reference (``upload-<digest>``).

    Raises:
        ImageError: the file is not a usable image.
    """
    return _uploads().add(decode_image(content, name=name, max_pixels=settings().max_pixels))


def has_image(ref: str) -> bool:
    return ref in GALLERY or ref in _uploads().images


def image(ref: str) -> DecodedImage:
    """A gallery photograph or an upload, by reference.

    Raises:
        ImageError: an upload this server no longer holds.
    """
    if ref in GALLERY:
        return _gallery(ref)
    decoded = _uploads().images.get(ref)
    if decoded is None:
        raise ImageError(f"Image '{ref}' is not on this server any more (uploads are kept in memory); upload it again.")
    return decoded


def image_label(ref: str) -> str:
    if ref in GALLERY:
        return f"{ref} (gallery)"
    decoded = _uploads().images.get(ref)
    return f"{decoded.name} (upload)" if decoded is not None else f"{ref} (missing)"


def image_name(ref: str) -> str:
    """Short name for hover text and file names."""
    decoded = _uploads().images.get(ref) if ref not in GALLERY else None
    return decoded.name if decoded is not None else ref


@st.cache_data(max_entries=256, show_spinner=False)
def _display_uri(ref: str, input_size: tuple[int, int]) -> str:
    """The picture stretched to the box the patch grid covers (the model's input), as a figure background."""
    height, width = input_size
    scale = 448 / max(height, width)
    picture = image(ref).image.resize((max(1, round(width * scale)), max(1, round(height * scale))))
    return figures.image_uri(picture)


def display_uri(ref: str, trace: Trace) -> str:
    return _display_uri(ref, tuple(trace.input_size))
