"""Images by reference: the gallery photographs and the uploads this process keeps in memory, per owner."""
from __future__ import annotations

import hashlib
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import streamlit as st

import auth
import figures
from resources import settings
from vitlens.capture import Trace
from vitlens.errors import ImageError
from vitlens.images import GALLERY, DecodedImage, decode_image, gallery_image

UPLOAD_PREFIX = "upload-"
SESSION_BUDGET = 128 * 2**20  # decoded bytes of uploads one session (or signed-in user) keeps
MAX_UPLOAD_BYTES = 512 * 2**20  # decoded uploads kept in memory by the whole process


GALLERY_NAMES: tuple[str, ...] = tuple(GALLERY)


@dataclass
class _Upload:
    decoded: DecodedImage
    owner: str
    shared: bool = False

    @property
    def nbytes(self) -> int:
        return self.decoded.image.width * self.decoded.image.height * 3


class _Uploads:
    """Decoded uploads by reference, kept in memory for the sessions of this process.

    Each owner (a session, or a signed-in user) has ``budget`` bytes: beyond it, its own oldest
    uploads go. Beyond the process-wide ``limit``, the oldest uploads of whoever holds the most
    go, so one visitor's large uploads never push out everybody else's. An upload is visible
    to its owner, and to everyone once the owner shares it by link.
    """

    def __init__(self, budget: int = SESSION_BUDGET, limit: int = MAX_UPLOAD_BYTES) -> None:
        self.uploads: OrderedDict[str, _Upload] = OrderedDict()
        self.lock = threading.Lock()
        self.budget = budget
        self.limit = limit

    def add(self, decoded: DecodedImage, owner: str, shared: bool = False) -> tuple[str, list[str]]:
        """Keep an upload; returns its reference and the names of the uploads dropped to make room."""
        ref = UPLOAD_PREFIX + decoded.digest[:16]
        with self.lock:
            known = self.uploads.get(ref)
            if known is not None and known.owner != owner:  # the same picture from someone else: theirs stays theirs
                ref = UPLOAD_PREFIX + hashlib.sha256(f"{owner}|{decoded.digest}".encode()).hexdigest()[:16]
            self.uploads[ref] = _Upload(decoded, owner, shared or bool(known and known.owner == owner and known.shared))
            self.uploads.move_to_end(ref)
            dropped = self._evict(ref)
        return ref, dropped

    def _evict(self, keep: str) -> list[str]:
        dropped = []
        owner = self.uploads[keep].owner
        while self._used(owner) > self.budget and (victim := self._oldest(owner, keep)) is not None:
            dropped.append(self.uploads.pop(victim).decoded.name)
        while self._used() > self.limit:
            heaviest = max(self._owners(), key=self._used)
            victim = self._oldest(heaviest, keep)
            if victim is None:
                break
            removed = self.uploads.pop(victim)
            if removed.owner == owner:
                dropped.append(removed.decoded.name)
        return dropped

    def _used(self, owner: str | None = None) -> int:
        return sum(u.nbytes for u in self.uploads.values() if owner is None or u.owner == owner)

    def _owners(self) -> set[str]:
        return {u.owner for u in self.uploads.values()}

    def _oldest(self, owner: str, keep: str) -> str | None:
        return next((ref for ref, u in self.uploads.items() if u.owner == owner and ref != keep), None)

    def visible(self, ref: str, owner: str) -> _Upload | None:
        upload = self.uploads.get(ref)
        return upload if upload is not None and (upload.shared or upload.owner == owner) else None

    def share(self, owner: str) -> int:
        """Make the owner's uploads visible to anyone with a link; returns how many."""
        with self.lock:
            mine = [u for u in self.uploads.values() if u.owner == owner]
            for upload in mine:
                upload.shared = True
        return len(mine)


@st.cache_resource(show_spinner=False)
def _uploads() -> _Uploads:
    return _Uploads()


@st.cache_resource(show_spinner=False)
def _gallery(name: str) -> DecodedImage:
    return gallery_image(name)


def owner() -> str:
    """Who owns this session's uploads: the signed-in user's e-mail, else the browser session."""
    if auth.signed_in():
        return "user:" + auth.email()
    return "session:" + st.session_state.setdefault("upload_owner", uuid.uuid4().hex)


def add_upload(name: str, content: bytes) -> tuple[str, list[str]]:
    """Decode an uploaded file and keep it for this session; returns its reference
    (``upload-<digest>``) and the names of this session's uploads dropped to stay in budget.

    Raises:
        ImageError: the file is not a usable image.
    """
    decoded = decode_image(content, name=name, max_pixels=settings().max_pixels)
    return _uploads().add(decoded, owner(), shared=bool(st.session_state.get("share_uploads")))


def share_uploads() -> int:
    """Let anyone with a link see this session's uploads (now and later); returns how many were shared."""
    st.session_state["share_uploads"] = True
    return _uploads().share(owner())


def has_image(ref: str) -> bool:
    """A gallery name, or an upload this session may see."""
    return ref in GALLERY or _uploads().visible(ref, owner()) is not None


def image(ref: str) -> DecodedImage:
    """A gallery photograph or an upload, by reference (``has_image`` decides who may name it).

    Raises:
        ImageError: an upload this server no longer holds.
    """
    if ref in GALLERY:
        return _gallery(ref)
    upload = _uploads().uploads.get(ref)
    if upload is None:
        raise ImageError(f"Image '{ref[:40]}' is not on this server any more (uploads are kept in memory); upload it again.")
    return upload.decoded


def image_label(ref: str) -> str:
    if ref in GALLERY:
        return f"{ref} (gallery)"
    upload = _uploads().uploads.get(ref)
    return f"{upload.decoded.name} (upload)" if upload is not None else f"{ref[:40]} (missing)"


def image_name(ref: str) -> str:
    """Short name for hover text and file names."""
    upload = _uploads().uploads.get(ref) if ref not in GALLERY else None
    return upload.decoded.name if upload is not None else ref


@st.cache_data(max_entries=256, show_spinner=False)
def _display_uri(ref: str, input_size: tuple[int, int]) -> str:
    """The picture stretched to the box the patch grid covers (the model's input), as a figure background."""
    height, width = input_size
    scale = 448 / max(height, width)
    picture = image(ref).image.resize((max(1, round(width * scale)), max(1, round(height * scale))))
    return figures.image_uri(picture)


def display_uri(ref: str, trace: Trace) -> str:
    return _display_uri(ref, tuple(trace.input_size))


def picture_uri(ref: str, input_size: tuple[int, int]) -> str:
    """``display_uri`` for an input size without a trace."""
    return _display_uri(ref, tuple(input_size))
