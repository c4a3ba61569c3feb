"""Loading real pretrained models by their TransformerLens names.

Models load unprocessed (``HookedTransformer.from_pretrained_no_processing``) unless
``fold_ln``: transcoders must be used on the model they were trained on, and SAE-Lens's
transcoder releases were trained on unprocessed models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tl_circuits.errors import PretrainedError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

#: dtype names accepted wherever a dtype may be given as a string
DTYPE_NAMES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "double": torch.float64,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a torch dtype or a name (``"float32"``, ``"bfloat16"``,
    ``"float16"``, ``"float64"``, with or without ``torch.``); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = dtype.lower().removeprefix("torch.")
        if name in DTYPE_NAMES:
            return DTYPE_NAMES[name]
    raise PretrainedError(
        f"unknown dtype {dtype!r}; use a torch dtype or one of "
        "'float32', 'bfloat16', 'float16', 'float64'"
    )


#: the canonical names (command-line choices), each naming one dtype
DTYPES = {name: DTYPE_NAMES[name] for name in ("float32", "float64", "bfloat16", "float16")}


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype named ``dtype`` (a key of :data:`DTYPES`)."""
    if dtype not in DTYPES:
        raise PretrainedError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    return DTYPES[dtype]


def check_device(device: str | torch.device) -> str:
    """``device`` as a string, if torch knows it and this machine has it; PretrainedError
    otherwise (a misspelt name, CUDA or MPS missing, a CUDA index past the last GPU)."""
    if not isinstance(device, (str, torch.device)):
        raise PretrainedError(f"device must be a str such as 'cpu' or 'cuda:0', got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise PretrainedError(
            f"unknown device {str(device)!r}; use e.g. 'cpu', 'cuda', 'cuda:1' or 'mps'"
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PretrainedError(f"device {str(device)!r}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise PretrainedError(
                f"device {str(device)!r}: this machine has {count} CUDA device(s) "
                f"(cuda:0 .. cuda:{count - 1})"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise PretrainedError(f"device {str(device)!r}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise PretrainedError(
            f"device {str(device)!r}: only 'cpu', 'cuda[:N]' and 'mps' are supported"
        )
    return str(device)


def load_model(
    name: str, *, fold_ln: bool = False, device: str = "cpu", dtype: str = "float32"
) -> HookedTransformer:
    """``HookedTransformer`` ``name``, unprocessed unless ``fold_ln``."""
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_official_model_name

    dtype_ = torch_dtype(dtype)
    device = check_device(device)
    try:
        get_official_model_name(name)
    except ValueError as exc:
        raise PretrainedError(
            f"unknown model {name!r}: not a TransformerLens model name (see "
            "transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES)"
        ) from exc
    load = (
        HookedTransformer.from_pretrained
        if fold_ln
        else HookedTransformer.from_pretrained_no_processing
    )
    try:
        return load(name, device=device, dtype=dtype_)
    except OSError as exc:  # no network and not in the Hugging Face cache
        raise PretrainedError(
            f"could not load {name!r} from the Hugging Face hub or its cache: {exc}"
        ) from exc
