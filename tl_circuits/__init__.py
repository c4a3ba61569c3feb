"""tl_circuits: circuit tracing (attribution graphs, head loadings, QK attributions) for
TransformerLens models with SAE-Lens transcoders. See docs/DESIGN.md for the definitions
and docs/ARCHITECTURE.md for where each stage lives.

The names here are the user-facing API; plumbing stays in its modules
(``tl_circuits.model``, ``.transcoders``, ``.replacement``, ``.graph``, ``.attention``,
``.export``, ``.batch``).
"""

from tl_circuits._version import __version__
from tl_circuits.attention.heads.loadings import HeadLoadings
from tl_circuits.attention.qk.attribution import QKAttribution
from tl_circuits.attention.qk.basis import QKBasis
from tl_circuits.attention.qk.interventions import QKInterventionResult, intervene_qk
from tl_circuits.batch import Recurrence, recurrence, trace_many
from tl_circuits.errors import (
    HeadLoadingError,
    HookError,
    NonFiniteError,
    PretrainedError,
    PromptError,
    QKError,
    TLCircuitsError,
    TranscoderConfigError,
    UnsupportedArchitectureError,
)
from tl_circuits.export.frontend import export_json
from tl_circuits.graph.graph import AttributionGraph
from tl_circuits.replacement.context import ReplacementContext
from tl_circuits.replacement.interventions import (
    FeatureIntervention,
    InterventionResult,
    intervene,
    steered_generate,
)
from tl_circuits.training import (
    TrainingConfig,
    TrainingReport,
    TrainingResult,
    evaluate_transcoders,
    train_transcoders,
)
from tl_circuits.transcoders.cross_layer import CrossLayerTranscoder
from tl_circuits.transcoders.loading import load_pretrained, load_transcoders
from tl_circuits.transcoders.per_layer import TranscoderSet

__all__ = [
    "AttributionGraph",
    "CrossLayerTranscoder",
    "FeatureIntervention",
    "HeadLoadingError",
    "HeadLoadings",
    "HookError",
    "InterventionResult",
    "NonFiniteError",
    "PretrainedError",
    "PromptError",
    "QKAttribution",
    "QKBasis",
    "QKError",
    "QKInterventionResult",
    "Recurrence",
    "ReplacementContext",
    "TLCircuitsError",
    "TrainingConfig",
    "TrainingReport",
    "TrainingResult",
    "TranscoderConfigError",
    "TranscoderSet",
    "UnsupportedArchitectureError",
    "__version__",
    "evaluate_transcoders",
    "export_json",
    "intervene",
    "intervene_qk",
    "load_pretrained",
    "load_transcoders",
    "recurrence",
    "steered_generate",
    "trace_many",
    "train_transcoders",
]
