"""Typed errors for problems a user can cause; each message is one plain sentence."""


class VitlensError(Exception):
    """Base class: bad input from the user, never a bug in vitlens."""


class ImageError(VitlensError):
    """The upload is not a usable image (corrupt, truncated, too large, unsupported)."""


class UnknownModelError(VitlensError):
    """The model name is neither a preset nor a timm Vision Transformer."""


class WeightsError(VitlensError):
    """A weights file is missing, unreadable, or does not fit the architecture."""


class HubUnavailableError(VitlensError):
    """Pretrained weights could not be fetched from the Hugging Face hub."""


class OptionError(VitlensError):
    """An option value is out of range (size, threshold, layer, ...)."""


class StorageError(VitlensError):
    """The job queue or trace cache on disk is damaged, missing or busy (rebuilt where possible)."""


class DataError(VitlensError):
    """A data set cannot answer the question asked (wrong folder layout, too few classes or outliers)."""


class NeuronFileError(VitlensError):
    """A register-neuron file is unreadable or does not fit the model it is applied to."""


class UnsupportedModelError(UnknownModelError):
    """A timm model vitlens cannot read exactly (e.g. attention it cannot recompute); refused at load."""


class ResultsError(VitlensError):
    """A sweep results folder is missing, empty, or not in the sweep's schema."""
