"""Cross-layer transcoders (CLTs) and their on-disk format.

Feature ``f`` of layer ``l`` reads ``x_in(l)`` and writes ``a_f * W_dec[l][f, l' - l]`` to
the MLP output of every layer ``l' >= l``. SAE-Lens has no class for this, so the format is
ours (see ``docs/clt_format.md``)::

    cfg.json                 {"format": "tl_circuits.clt", "version": 1, "n_layers", "d_model",
                              "d_sae", "activation": "relu" | "jumprelu" | "topk",
                              "top_k" (topk only), "skip": bool,
                              "dtype", "input_hook", "output_hook", "fold_ln", "model_name"}
    layer_{l}.safetensors    W_enc [d_model, d_sae], b_enc [d_sae], threshold [d_sae] (jumprelu),
                             W_dec [d_sae, n_layers - l, d_model]  (slot j writes to layer l + j),
                             b_dec [d_model]  (output bias of layer l),
                             W_skip [d_model, d_model]  (skip only; [d_out, d_in])

``input_hook`` / ``output_hook`` are templates with ``{layer}``. One file per layer lets a
large CLT load lazily: a layer's tensors are read the first time they are needed.

Laziness is not tied to this layout: a CLT built with ``reader=`` (a :class:`LayerReader`,
any callable ``layer -> {name: tensor}`` in this format's names and orientation) reads each
layer through it on first use. :meth:`CrossLayerTranscoder.load` uses one for the files
above; ``tl_circuits.transcoders.formats`` has readers for circuit-tracer's and Gemma Scope
2's layouts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from safetensors.torch import save_file
from torch import Tensor

from tl_circuits.errors import TranscoderConfigError
from tl_circuits.storage import read_safetensors
from tl_circuits.transcoders.base import (
    Encoder,
    Transcoders,
    check_hook_template,
    read_json_object,
)

CLT_FORMAT = "tl_circuits.clt"
CLT_VERSION = 1
CFG_FILE = "cfg.json"
Activation = Literal["relu", "jumprelu", "topk"]
ACTIVATIONS = ("relu", "jumprelu", "topk")


#: Keys ``cfg.json`` must have (``fold_ln`` and ``model_name`` may be absent or null).
_REQUIRED_KEYS = (
    "n_layers",
    "d_model",
    "d_sae",
    "activation",
    "skip",
    "dtype",
    "input_hook",
    "output_hook",
)


def _layer_file(layer: int) -> str:
    return f"layer_{layer}.safetensors"


@runtime_checkable
class LayerReader(Protocol):
    """Reads one layer of a lazily loaded CLT: ``reader(layer)`` returns that layer's tensors
    under this format's names and in its orientation (``W_enc [d_model, d_sae]``,
    ``W_dec [d_sae, n_layers - layer, d_model]``, ``b_dec``, ``b_enc``, ``threshold``,
    ``W_skip [d_out, d_in]``), on any device and in any dtype (the CLT converts them).
    Raises FileNotFoundError / TranscoderConfigError naming the file on a bad layer.
    ``describe(layer)`` names where the layer lives, for error messages."""

    def __call__(self, layer: int) -> dict[str, Tensor]: ...

    def describe(self, layer: int) -> str: ...


class OwnLayoutReader:
    """The :class:`LayerReader` of this module's format: ``root/layer_{l}.safetensors``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def describe(self, layer: int) -> str:
        return str(self.root / _layer_file(layer))

    def __call__(self, layer: int) -> dict[str, Tensor]:
        path = self.root / _layer_file(layer)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: CLT layer file missing")
        return read_safetensors(path, TranscoderConfigError)[0]


class CrossLayerTranscoder(Transcoders):
    """A cross-layer transcoder over all ``n_layers`` blocks of a model.

    Construct from tensors (``layers[l]`` a dict with the keys of the on-disk format), lazily
    from a ``reader`` (``layers=None``; each layer read on first use, converted to
    ``dtype`` on ``device``), or with :meth:`load`. ``W_dec[l]`` has shape
    ``[d_sae, n_layers - l, d_model]``; ``dtype``/``device`` apply to a reader's layers
    (tensors given directly keep theirs). ``output_is_mlp_module_out``: the decoders were
    trained on the MLP module's own output (circuit-tracer's ``mlp.hook_out``), which is
    ``hook_mlp_out`` only for models without a norm after the MLP (:meth:`check_model`).
    """

    def __init__(
        self,
        layers: list[dict[str, Tensor]] | None,
        *,
        n_layers: int,
        d_model: int,
        d_sae: int,
        activation: Activation = "jumprelu",
        top_k: int | None = None,
        skip: bool = False,
        input_hook: str = "blocks.{layer}.mlp.hook_in",
        output_hook: str = "blocks.{layer}.hook_mlp_out",
        fold_ln: bool | None = None,
        model_name: str | None = None,
        reader: LayerReader | Callable[[int], dict[str, Tensor]] | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        output_is_mlp_module_out: bool = False,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise TranscoderConfigError(
                f"activation must be one of {ACTIVATIONS}, got {activation!r}"
            )
        if (activation == "topk") != (top_k is not None):
            raise TranscoderConfigError(
                f"top_k is given exactly for activation='topk' (got activation={activation!r}, "
                f"top_k={top_k!r})"
            )
        if n_layers < 1 or d_model < 1 or d_sae < 1:
            raise TranscoderConfigError(
                f"n_layers, d_model, d_sae must be positive, got {n_layers}, {d_model}, {d_sae}"
            )
        for template in (input_hook, output_hook):
            check_hook_template(template)
        self.n_layers = n_layers
        self.d_model = d_model
        self.d_sae_per_layer = d_sae
        self.activation: Activation = activation
        self.top_k = top_k
        self.skip = skip
        self.input_hook_template = input_hook
        self.output_hook_template = output_hook
        self.expects_folded_ln = fold_ln
        self.model_name = model_name
        self.output_is_mlp_module_out = output_is_mlp_module_out
        if (layers is None) == (reader is None):
            raise TranscoderConfigError(
                "give exactly one of layers (tensors) and reader (lazy loading)"
            )
        self._reader = reader
        self._layers: list[dict[str, Tensor] | None] = (
            list(layers) if layers is not None else [None] * n_layers
        )
        if len(self._layers) != n_layers:
            raise TranscoderConfigError(
                f"got tensors for {len(self._layers)} layers, expected n_layers={n_layers}"
            )
        for layer, tensors in enumerate(self._layers):
            if tensors is not None:
                self._check_layer(layer, tensors)
        if layers is not None:
            first = self._layers[0]["W_enc"]  # type: ignore[index]
            self._dtype, self._device = first.dtype, first.device
            self.check_consistent()
        else:
            # a reader's layers are converted to these when read
            self._dtype = dtype if dtype is not None else torch.float32
            self._device = torch.device(device if device is not None else "cpu")

    # ---- tensors ---------------------------------------------------------------------

    def _expected_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        shapes = {
            "W_enc": (self.d_model, self.d_sae_per_layer),
            "b_enc": (self.d_sae_per_layer,),
            "W_dec": (self.d_sae_per_layer, self.n_layers - layer, self.d_model),
            "b_dec": (self.d_model,),
        }
        if self.activation == "jumprelu":
            shapes["threshold"] = (self.d_sae_per_layer,)
        if self.skip:
            shapes["W_skip"] = (self.d_model, self.d_model)
        return shapes

    def _check_layer(
        self, layer: int, tensors: dict[str, Tensor], source: str | None = None
    ) -> None:
        """Raise TranscoderConfigError unless ``tensors`` has exactly the expected names and
        shapes (``source``: the file they came from, named in the message)."""
        where = f"CLT layer {layer}" + (f" ({source})" if source else "")
        expected = self._expected_shapes(layer)
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise TranscoderConfigError(
                f"{where}: missing tensors {missing}, unexpected tensors {extra} "
                f"(activation={self.activation!r}, skip={self.skip})"
            )
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise TranscoderConfigError(
                    f"{where}: {name} has shape {tuple(tensors[name].shape)}, expected {shape}"
                )

    def layer_tensors(self, layer: int) -> dict[str, Tensor]:
        """The tensors of ``layer`` (read from disk on first use for a lazily loaded CLT)."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.n_layers})")
        tensors = self._layers[layer]
        if tensors is None:
            assert self._reader is not None
            describe = getattr(self._reader, "describe", None)
            source = describe(layer) if callable(describe) else None
            raw = self._reader(layer)
            self._check_layer(layer, raw, source=source)
            tensors = {
                k: v.to(device=self._device, dtype=self._dtype).contiguous() for k, v in raw.items()
            }
            self._layers[layer] = tensors
        return tensors

    # ---- files -----------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {
            "format": CLT_FORMAT,
            "version": CLT_VERSION,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_sae": self.d_sae_per_layer,
            "activation": self.activation,
            "top_k": self.top_k,
            "skip": self.skip,
            "dtype": str(self.dtype).removeprefix("torch."),
            "input_hook": self.input_hook_template,
            "output_hook": self.output_hook_template,
            "fold_ln": self.expects_folded_ln,
            "model_name": self.model_name,
            "output_is_mlp_module_out": self.output_is_mlp_module_out,
        }

    def save(self, path: str | Path) -> Path:
        """Write ``cfg.json`` and one ``layer_{l}.safetensors`` per layer under ``path``."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        for layer in range(self.n_layers):
            tensors = {
                k: v.detach().contiguous().cpu() for k, v in self.layer_tensors(layer).items()
            }
            save_file(tensors, str(root / _layer_file(layer)))
        (root / CFG_FILE).write_text(json.dumps(self.config(), indent=1))
        return root

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        lazy: bool = True,
    ) -> CrossLayerTranscoder:
        """Open a CLT saved by :meth:`save`; with ``lazy`` layers load on first use."""
        root = Path(path)
        cfg_path = root / CFG_FILE
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{root}: not a CLT directory (no {CFG_FILE})")
        cfg = read_json_object(cfg_path)
        if cfg.get("format") != CLT_FORMAT:
            raise TranscoderConfigError(
                f"{cfg_path}: format is {cfg.get('format')!r}, expected {CLT_FORMAT!r}"
            )
        if cfg.get("version") != CLT_VERSION:
            raise TranscoderConfigError(
                f"{cfg_path}: version {cfg.get('version')} is not supported "
                f"(expected {CLT_VERSION})"
            )
        missing_keys = [k for k in _REQUIRED_KEYS if k not in cfg]
        if missing_keys:
            raise TranscoderConfigError(f"{cfg_path}: missing keys {missing_keys}")
        for key in ("n_layers", "d_model", "d_sae"):
            value = cfg[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
                raise TranscoderConfigError(f"{cfg_path}: {key} must be a positive integer")
        for key in ("input_hook", "output_hook"):
            try:
                check_hook_template(cfg[key])
            except TranscoderConfigError as exc:
                raise TranscoderConfigError(f"{cfg_path}: {key}: {exc}") from exc
        if not isinstance(cfg["skip"], bool) or not isinstance(cfg["dtype"], str):
            raise TranscoderConfigError(f"{cfg_path}: skip must be a bool and dtype a string")
        if cfg["activation"] not in ACTIVATIONS:
            raise TranscoderConfigError(
                f"{cfg_path}: activation must be one of {ACTIVATIONS}, got {cfg['activation']!r}"
            )
        for layer in range(cfg["n_layers"]):
            if not (root / _layer_file(layer)).is_file():
                raise FileNotFoundError(f"{root / _layer_file(layer)}: CLT layer file missing")
        file_dtype = getattr(torch, cfg["dtype"], None)
        if not isinstance(file_dtype, torch.dtype):
            raise TranscoderConfigError(f"{cfg_path}: unknown dtype {cfg['dtype']!r}")
        clt = cls(
            None,
            n_layers=cfg["n_layers"],
            d_model=cfg["d_model"],
            d_sae=cfg["d_sae"],
            activation=cfg["activation"],
            top_k=cfg.get("top_k"),
            skip=cfg["skip"],
            input_hook=cfg["input_hook"],
            output_hook=cfg["output_hook"],
            fold_ln=cfg.get("fold_ln"),
            model_name=cfg.get("model_name"),
            reader=OwnLayoutReader(root),
            dtype=dtype if dtype is not None else file_dtype,
            device=device,
            output_is_mlp_module_out=bool(cfg.get("output_is_mlp_module_out", False)),
        )
        if not lazy:
            for layer in range(clt.n_layers):
                clt.layer_tensors(layer)
            clt.check_consistent()
        return clt

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> CrossLayerTranscoder:
        """A fully loaded copy on ``device`` / in ``dtype``."""
        layers = [
            {k: v.to(device=device, dtype=dtype) for k, v in self.layer_tensors(layer).items()}
            for layer in range(self.n_layers)
        ]
        return CrossLayerTranscoder(layers, **self._init_kwargs())

    def _init_kwargs(self) -> dict[str, Any]:
        return dict(
            n_layers=self.n_layers,
            d_model=self.d_model,
            d_sae=self.d_sae_per_layer,
            activation=self.activation,
            top_k=self.top_k,
            skip=self.skip,
            input_hook=self.input_hook_template,
            output_hook=self.output_hook_template,
            fold_ln=self.expects_folded_ln,
            model_name=self.model_name,
            output_is_mlp_module_out=self.output_is_mlp_module_out,
        )

    # ---- Transcoders interface -----------------------------------------------------

    def input_hook(self, layer: int) -> str:
        return self.input_hook_template.format(layer=layer)

    def output_hook(self, layer: int) -> str:
        return self.output_hook_template.format(layer=layer)

    def encoder(self, layer: int) -> Encoder:
        t = self.layer_tensors(layer)
        return Encoder(
            W_enc=t["W_enc"], b_enc=t["b_enc"], threshold=t.get("threshold"), top_k=self.top_k
        )

    def decoder(self, source_layer: int, target_layer: int) -> Tensor:
        if target_layer not in self.target_layers(source_layer):
            raise IndexError(
                f"layer {source_layer}'s features write to layers "
                f"{source_layer}..{self.n_layers - 1}, not {target_layer}"
            )
        return self.layer_tensors(source_layer)["W_dec"][:, target_layer - source_layer]

    def b_dec(self, target_layer: int) -> Tensor:
        return self.layer_tensors(target_layer)["b_dec"]

    def W_skip(self, layer: int) -> Tensor | None:
        return self.layer_tensors(layer).get("W_skip")

    def target_layers(self, source_layer: int) -> range:
        return range(source_layer, self.n_layers)

    def d_sae(self, layer: int) -> int:
        return self.d_sae_per_layer

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def __repr__(self) -> str:
        return (
            f"CrossLayerTranscoder(n_layers={self.n_layers}, d_model={self.d_model}, "
            f"d_sae={self.d_sae_per_layer}, activation={self.activation!r}, "
            f"top_k={self.top_k}, skip={self.skip})"
        )
