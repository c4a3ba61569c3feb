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

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype named ``dtype`` (a key of :data:`DTYPES`)."""
    if dtype not in DTYPES:
        raise PretrainedError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    name: str, *, fold_ln: bool = False, device: str = "cpu", dtype: str = "float32"
) -> HookedTransformer:
    """``HookedTransformer`` ``name``, unprocessed unless ``fold_ln``."""
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_official_model_name

    dtype_ = torch_dtype(dtype)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PretrainedError(f"device {device!r}: CUDA is not available on this machine")
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
