"""View models of the Interventions and Ablations pages: register neurons, a test-time register's cost,
replacement ablations, massive activations and attention sinks; and one block's full attention (Attention page).

These run forward passes with hooks, so they use this process's engine (never the worker queue)
on the request's images, with the sidebar's model (``request.models[0]``, whatever order the pages draw the
models in) unless a page names one; results are cached per request and settings.
"""
from __future__ import annotations

import numpy as np
import streamlit as st
import torch

from captures import ModelChoice, Request
from choices import weights_path
from resources import engine
from uploads import image, picture_uri
from vitlens.analysis.neurons import NeuronScores, neuron_maps, score_neurons
from vitlens.capture import full_attention
from vitlens.experiments import (ABLATIONS, AblationResult, AttentionSinks, MassiveActivations, RegisterCost, ablate,
                                 attention_sinks, massive_activations, register_cost)
from vitlens.images import resize_for_model, to_tensor
from vitlens.interventions import TestTimeRegister
from vitlens.layout import TokenLayout
from vitlens.models import LoadedModel


def _model(request: Request, choice: ModelChoice | None = None) -> LoadedModel:
    """The loaded model of ``choice``; None: the sidebar's model."""
    choice = choice or request.models[0]
    return engine().model(choice.name, weights_path(choice.weights))


def _batch(request: Request, loaded: LoadedModel, refs: tuple[str, ...]) -> tuple[tuple[str, ...], torch.Tensor]:
    """The images of ``refs`` with the first one's input shape, and their normalised pixels.  # [batch, 3, h, w]"""
    tensors = {ref: to_tensor(resize_for_model(image(ref).image, request.side, loaded.patch_size), loaded.mean, loaded.std)
               for ref in refs}
    shape = tensors[refs[0]].shape
    kept = tuple(ref for ref in refs if tensors[ref].shape == shape)
    return kept, torch.stack([tensors[ref] for ref in kept])


def _pixels(request: Request, loaded: LoadedModel, ref: str) -> torch.Tensor:
    """One image's normalised pixels.  # [1, 3, h, w]"""
    return _batch(request, loaded, (ref,))[1]


def picture(request: Request, ref: str) -> str:
    """The picture under the maps (a data URI at the model's input size)."""
    loaded = _model(request)
    return picture_uri(ref, tuple(_pixels(request, loaded, ref).shape[-2:]))


@st.cache_data(max_entries=32, show_spinner="Scoring MLP neurons at the outliers…")
def _scores(key: str, detector: int, threshold: float | None, sparse: bool, _request: Request) -> NeuronScores:
    loaded = _model(_request)
    batches = [_pixels(_request, loaded, ref) for ref in _request.images]
    return score_neurons(loaded, batches, detector_layer=detector, max_layer=len(loaded.model.blocks) - 1,
                         threshold=threshold, sparse=sparse)


def neuron_scores(request: Request, detector: int, threshold: float | None, sparse: bool) -> NeuronScores:
    """Scores of every neuron of every block of the first model over the request's images."""
    return _scores(request.key, detector, threshold, sparse, request)


@st.cache_data(max_entries=32, show_spinner=False)
def _maps(key: str, ref: str, neurons: tuple[tuple[int, int], ...], _request: Request):
    loaded = _model(_request)
    return neuron_maps(loaded, _pixels(_request, loaded, ref), neurons)


def activation_maps(request: Request, ref: str, neurons: tuple[tuple[int, int], ...]):
    """Each neuron's activation over the patches of one image.  # [neuron, row, col]"""
    return _maps(request.key, ref, neurons, request)


@st.cache_data(max_entries=32, show_spinner="Measuring the register's cost…")
def _cost(key: str, ref: str, register: TestTimeRegister, threshold: float | None, _request: Request) -> RegisterCost:
    loaded = _model(_request)
    return register_cost(loaded, _pixels(_request, loaded, ref), register, threshold)


def cost(request: Request, ref: str, register: TestTimeRegister, threshold: float | None) -> RegisterCost:
    """What the register changes in CLS and in the patches outside the outliers, per block."""
    return _cost(request.key, ref, register, threshold, request)


@st.cache_data(max_entries=32, show_spinner="Running the four replacements…")
def _ablations(key: str, model: str, layer: int, target: str, threshold: float | None, _request: Request,
               _choice: ModelChoice) -> tuple[tuple[str, ...], dict[str, AblationResult | str]]:
    loaded = _model(_request, _choice)
    refs, pixels = _batch(_request, loaded, _request.images)
    results: dict[str, AblationResult | str] = {}
    for mode in ABLATIONS:
        if mode in ("mean", "shuffle") and pixels.shape[0] < 2:
            results[mode] = "needs at least 2 images of the same shape"
            continue
        results[mode] = ablate(loaded, pixels, layer, target, mode, threshold)
    return refs, results


def ablations(request: Request, choice: ModelChoice, layer: int, target: str,
              threshold: float | None) -> tuple[tuple[str, ...], dict[str, AblationResult | str]]:
    """All four replacements of model ``choice``'s ``target`` tokens after block ``layer`` (or why one cannot run),
    over the request's images of the first image's shape (returned first)."""
    return _ablations(request.key, choice.key, layer, target, threshold, request, choice)


@st.cache_data(max_entries=32, show_spinner="Computing full attention rows…")
def _sinks(key: str, model: str, ref: str, layers: tuple[int, ...], threshold: float | None, _request: Request,
           _choice: ModelChoice) -> tuple[AttentionSinks, MassiveActivations]:
    loaded = _model(_request, _choice)
    register = _choice.register
    pixels = _pixels(_request, loaded, ref)
    return (attention_sinks(loaded, pixels, layers, threshold, register=register),
            massive_activations(loaded, pixels, register=register))


def sinks(request: Request, choice: ModelChoice, ref: str, layers: tuple[int, ...],
          threshold: float | None) -> tuple[AttentionSinks, MassiveActivations]:
    """Attention received per block and head (all queries) and the massive activations of model ``choice``
    (with its test-time register, if any) on one image."""
    return _sinks(request.key, choice.key, ref, layers, threshold, request, choice)


@st.cache_data(max_entries=16, show_spinner="Computing every token's attention in this block…")
def _full_attention(key: str, model: str, weights: str, ref: str, layer: int, _request: Request,
                    _choice: ModelChoice) -> tuple[np.ndarray, TokenLayout]:
    loaded = engine().model(_choice.name, weights_path(weights))
    attention, layout = full_attention(loaded, _pixels(_request, loaded, ref), layer, test_time_register=_choice.register)
    return attention.astype(np.float16), layout  # [head, query, token]


def block_attention(request: Request, choice: ModelChoice, weights: str, ref: str, layer: int) -> tuple[np.ndarray, TokenLayout]:
    """Every query's attention over every token in block ``layer`` of model ``choice`` on one image (float16), with
    ``weights`` the weights its captures used (the offline fallback, when it applied).  # [head, query, token]"""
    return _full_attention(request.key, choice.key, weights, ref, layer, request, choice)
