"""tl_circuits: circuit tracing (attribution graphs, head loadings, QK attributions) for
TransformerLens models with SAE-Lens transcoders. See DESIGN.md for the definitions."""

from tl_circuits.attention.heads.loadings import HeadLoadings
from tl_circuits.attention.qk.attribution import QKAttribution
from tl_circuits.attention.qk.basis import QKBasis
from tl_circuits.attention.qk.interventions import QKInterventionResult, intervene_qk
from tl_circuits.errors import (
    HookError,
    NonFiniteError,
    PromptError,
    TLCircuitsError,
    TranscoderConfigError,
    UnsupportedArchitectureError,
)
from tl_circuits.graph import AttributionGraph
from tl_circuits.model.hooks import install_mlp_input_hooks
from tl_circuits.replacement.context import (
    FeatureTable,
    ReconstructionStats,
    Recording,
    ReplacementContext,
    validate_transcoders,
)
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
from tl_circuits.transcoders import CrossLayerTranscoder, Encoder, Transcoders, TranscoderSet
from tl_circuits.transcoders.loading import load_pretrained

__version__ = "0.1.0"

__all__ = [
    "AttributionGraph",
    "CrossLayerTranscoder",
    "Encoder",
    "FeatureIntervention",
    "FeatureTable",
    "HeadLoadings",
    "HookError",
    "InterventionResult",
    "NonFiniteError",
    "PromptError",
    "QKAttribution",
    "QKBasis",
    "QKInterventionResult",
    "ReconstructionStats",
    "Recording",
    "ReplacementContext",
    "TLCircuitsError",
    "TrainingConfig",
    "TrainingReport",
    "TrainingResult",
    "TranscoderConfigError",
    "TranscoderSet",
    "Transcoders",
    "UnsupportedArchitectureError",
    "evaluate_transcoders",
    "install_mlp_input_hooks",
    "intervene",
    "intervene_qk",
    "load_pretrained",
    "steered_generate",
    "train_transcoders",
    "validate_transcoders",
]
