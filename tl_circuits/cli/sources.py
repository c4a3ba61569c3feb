"""The CLI's model and transcoder options as a :class:`ModelSource`.

The record itself, its resolution and its loading live in
:mod:`tl_circuits.batch.sources` (the library's ``trace_many`` reads them too); this
module turns parsed ``--model/--transcoders/...`` options into one.
"""

from __future__ import annotations

from typing import Any

from tl_circuits.batch.sources import (
    DEFAULT,
    DEFAULT_TRANSCODERS,
    ModelSource,
    SourceError,
    check_source_device,
    load_source,
    resolve_source,
)

__all__ = [
    "DEFAULT",
    "DEFAULT_TRANSCODERS",
    "ModelSource",
    "SourceError",
    "check_source_device",
    "load_source",
    "source_from_args",
]


def source_from_args(args: Any) -> ModelSource:
    """The :class:`ModelSource` of parsed ``--model/--transcoders/...`` options."""
    return resolve_source(
        args.model,
        args.transcoders,
        sae_id_template=getattr(args, "sae_id_template", None),
        fold_ln=bool(getattr(args, "fold_ln", False)),
        device=args.device,
        dtype=args.dtype,
    )
