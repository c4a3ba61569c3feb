"""Exceptions raised by tl_circuits.

Every error names the offending object (layer, hook, position, file) so the user can fix
the input without reading our source. All derive from :class:`TLCircuitsError`, which is a
``ValueError`` so generic input-validation handlers still catch them.
"""

from __future__ import annotations


class TLCircuitsError(ValueError):
    """Base class of every error this library raises on bad input."""


class TranscoderConfigError(TLCircuitsError):
    """A transcoder (or set of them) is malformed or does not fit the model."""


class HookError(TLCircuitsError):
    """A hook point a transcoder reads from or writes to is missing or never fires."""


class UnsupportedArchitectureError(TLCircuitsError):
    """The model uses a feature the exact local replacement model cannot represent."""


class PromptError(TLCircuitsError):
    """The prompt is empty, too long for the model, or otherwise unusable."""


class NonFiniteError(TLCircuitsError):
    """A NaN or infinity appeared where a finite value is required."""


class QKError(TLCircuitsError):
    """A QK attribution request is invalid (head, layer or positions out of range, a basis
    SAE at the wrong hook, ...)."""


class PretrainedError(TLCircuitsError):
    """A model or transcoders named cannot be found or loaded."""


class HeadLoadingError(TLCircuitsError):
    """Head loadings cannot be computed, saved or loaded for these inputs (no context, bad
    edges, loadings of another graph, ...)."""
