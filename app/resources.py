"""Long-lived resources of the app process: the deployment settings and the model engine."""
from __future__ import annotations

import streamlit as st

from vitlens.engine import Engine
from vitlens.settings import Settings
from vitlens.store import TraceStore


def settings() -> Settings:
    """Deployment settings (``VITLENS_*`` environment variables)."""
    return Settings.from_env()


@st.cache_resource(show_spinner=False)
def _engine(cache_dir: str, cache_size: int, device: str) -> Engine:
    engine = Engine(TraceStore(cache_dir, cache_size), device=device, max_models=2)
    engine.max_batch = 8 if engine.device.type == "cuda" else 1  # one image at a time on CPU: finer progress, quick cancel
    return engine


def engine() -> Engine:
    config = settings()
    return _engine(str(config.cache_dir), config.cache_size, config.device)
