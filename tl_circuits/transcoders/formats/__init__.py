"""Transcoders in a local folder, in any supported format, detected from the files.

``load_folder(path)`` looks at the files (in this order) and reads:

- ``transcoder_set.json``: a :meth:`TranscoderSet.save` folder;
- ``cfg.json`` with ``"format": "tl_circuits.clt"``: our CLT format (docs/clt_format.md);
- ``cfg.json`` (any other): one SAE-Lens transcoder directory (a one-layer set);
- ``config.yaml``: circuit-tracer's format (``model_kind: transcoder_set`` or
  ``cross_layer_transcoder``; per-layer ``layer_{i}.safetensors``, CLT ``W_enc_{i}`` /
  ``W_dec_{i}.safetensors``, or a ``transcoders:`` list of files: circuit-tracer per-layer
  safetensors, Gemma Scope ``params.npz``, Gemma Scope 2 ``params.safetensors`` or Gemma
  Scope 2 CLT layer files, local paths or ``hf://`` URIs);
- ``config.json`` with ``params.safetensors``: one Gemma Scope 2 transcoder (a one-layer
  set); with ``params_layer_{i}.safetensors``: a Gemma Scope 2 cross-layer transcoder;
- sub-folders that are all SAE-Lens directories (a set without a manifest), or all Gemma
  Scope 2 transcoder folders (one per layer).

Anything else raises TranscoderConfigError naming the folder and what was found. Tensors are
read with safetensors and ``numpy.load(..., allow_pickle=False)``, configs with JSON and
``yaml.safe_load``; nothing is unpickled. Per-layer formats become SAE-Lens transcoder
objects in a :class:`TranscoderSet`; cross-layer ones a :class:`CrossLayerTranscoder` that
reads each layer's files on first use (``lazy=True``). Orientation rules, hook names and
refusals are in docs/dictionaries.md.
"""

from tl_circuits.transcoders.formats.circuit_tracer import (
    CircuitTracerCLTReader,
    ct_hooks,
    load_circuit_tracer,
    resolve_listed,
)
from tl_circuits.transcoders.formats.detect import detect, load_folder
from tl_circuits.transcoders.formats.files import (
    CT_CONFIG,
    CT_KINDS,
    CT_MLP_MODULE_OUT,
    GS2_CONFIG,
    GS2_PARAMS,
    GS_PARAMS,
    FetchUris,
    Options,
    read_yaml,
)
from tl_circuits.transcoders.formats.gemma_scope import GemmaScope2CLTReader

__all__ = [
    "CT_CONFIG",
    "CT_KINDS",
    "CT_MLP_MODULE_OUT",
    "GS2_CONFIG",
    "GS2_PARAMS",
    "GS_PARAMS",
    "CircuitTracerCLTReader",
    "FetchUris",
    "GemmaScope2CLTReader",
    "Options",
    "ct_hooks",
    "detect",
    "load_circuit_tracer",
    "load_folder",
    "read_yaml",
    "resolve_listed",
]
