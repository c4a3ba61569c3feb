"""Every bad input raises the documented error class with a message naming the problem.

Models and transcoders here are tiny; transcoders built by :func:`make_sae` have SAE-Lens's
own random initialisation, which is enough because every check fires before any maths.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import cached_model, cached_transcoders, prompt_tokens
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import (
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    Transcoder,
    TranscoderConfig,
)
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_circuits import (
    CrossLayerTranscoder,
    HookError,
    NonFiniteError,
    PromptError,
    ReplacementContext,
    TLCircuitsError,
    TranscoderConfigError,
    TranscoderSet,
    UnsupportedArchitectureError,
)
from tl_circuits.model.prompt import to_tokens
from tl_circuits.replacement.context import validate_transcoders
from tl_circuits.testing import random_clt, random_model

N_LAYERS = 3  # the cached test models have 3 layers of width 32
D_MODEL = 32


def make_sae(
    layer: int,
    *,
    hook_in: str | None = None,
    hook_out: str | None = None,
    d_in: int = D_MODEL,
    d_out: int = D_MODEL,
    d_sae: int = 16,
    dtype: str = "float32",
    jumprelu_skip: bool = False,
    normalize_activations: str = "none",
    **metadata: object,
) -> Transcoder:
    """An SAE-Lens transcoder for ``layer`` (default hooks ``mlp.hook_in`` -> ``hook_mlp_out``)."""
    cls, cfg_cls = (
        (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig)
        if jumprelu_skip
        else (Transcoder, TranscoderConfig)
    )
    cfg = cfg_cls(
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out,
        dtype=dtype,
        device="cpu",
        apply_b_dec_to_input=False,
        normalize_activations=normalize_activations,  # type: ignore[arg-type]
        metadata=SAEMetadata(
            hook_name=hook_in or f"blocks.{layer}.mlp.hook_in",
            hook_name_out=hook_out or f"blocks.{layer}.hook_mlp_out",
            **metadata,
        ),
    )
    return cls(cfg)


def make_set(n_layers: int = N_LAYERS, **kwargs: object) -> TranscoderSet:
    return TranscoderSet.from_saelens([make_sae(layer, **kwargs) for layer in range(n_layers)])  # type: ignore[arg-type]


def check(model: HookedTransformer, transcoders) -> None:
    """The public path: validation runs first when a replacement context is built."""
    ReplacementContext(model, transcoders, prompt_tokens())


def test_errors_are_value_errors() -> None:
    for cls in (
        HookError,
        NonFiniteError,
        PromptError,
        TranscoderConfigError,
        UnsupportedArchitectureError,
    ):
        assert issubclass(cls, TLCircuitsError) and issubclass(cls, ValueError)


# ---- hooks ----------------------------------------------------------------------------


def test_input_hook_missing_from_model() -> None:
    """A supported hook name the model does not have (no ln2 without normalisation)."""
    cfg = HookedTransformerConfig(
        n_layers=N_LAYERS,
        d_model=D_MODEL,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=50,
        n_ctx=32,
        act_fn="gelu",
        normalization_type=None,
    )
    model = HookedTransformer(cfg)
    tcs = TranscoderSet.from_saelens(
        [make_sae(layer, hook_in=f"blocks.{layer}.ln2.hook_normalized") for layer in range(3)]
    )
    with pytest.raises(
        HookError, match=r"layer 0: hook 'blocks\.0\.ln2\.hook_normalized' does not exist"
    ):
        check(model, tcs)


def test_input_hook_that_never_fires() -> None:
    model = random_model("gpt2")  # fresh: use_hook_mlp_in stays off
    assert not model.cfg.use_hook_mlp_in
    tcs = TranscoderSet.from_saelens(
        [make_sae(layer, hook_in=f"blocks.{layer}.hook_mlp_in") for layer in range(N_LAYERS)]
    )
    with pytest.raises(HookError, match=r"layer 0: hook 'blocks\.0\.hook_mlp_in' .*never fires"):
        check(model, tcs)


def test_unsupported_input_hook() -> None:
    tcs = TranscoderSet.from_saelens(
        [make_sae(layer, hook_in=f"blocks.{layer}.attn.hook_z") for layer in range(N_LAYERS)]
    )
    with pytest.raises(
        HookError, match=r"layer 0: input hook 'blocks\.0\.attn\.hook_z' is not supported"
    ):
        check(cached_model("gpt2"), tcs)


def test_output_hook_not_mlp_out() -> None:
    tcs = TranscoderSet.from_saelens(
        [make_sae(layer, hook_out=f"blocks.{layer}.hook_resid_post") for layer in range(N_LAYERS)]
    )
    with pytest.raises(
        HookError, match=r"layer 0: output hook 'blocks\.0\.hook_resid_post' is not supported"
    ):
        check(cached_model("gpt2"), tcs)


def test_hook_outside_a_block() -> None:
    with pytest.raises(TranscoderConfigError, match=r"'hook_embed' is not inside a transformer"):
        TranscoderSet.from_saelens([make_sae(0, hook_in="hook_embed")])


def test_metadata_without_output_hook() -> None:
    sae = make_sae(0)
    sae.cfg.metadata.hook_name_out = None
    with pytest.raises(
        TranscoderConfigError, match=r"item 0: metadata must set hook_name and hook_name_out .*None"
    ):
        TranscoderSet.from_saelens([sae])


# ---- widths -------------------------------------------------------------------------


def test_d_in_differs_from_d_model() -> None:
    tcs = make_set(d_in=16, d_out=16)
    with pytest.raises(TranscoderConfigError, match=r"d_in=16 does not match .*d_model=32"):
        check(cached_model("gpt2"), tcs)


def test_d_in_differs_between_layers() -> None:
    saes = [make_sae(0), make_sae(1, d_in=16), make_sae(2)]
    with pytest.raises(
        TranscoderConfigError, match=r"layer 1 \('blocks\.1\.mlp\.hook_in'\): d_in=16"
    ):
        TranscoderSet.from_saelens(saes)


def test_d_out_differs_from_d_model() -> None:
    saes = [make_sae(0), make_sae(1), make_sae(2, d_out=16)]
    with pytest.raises(
        TranscoderConfigError, match=r"layer 2 \('blocks\.2\.hook_mlp_out'\): d_out=16"
    ):
        TranscoderSet.from_saelens(saes)


def test_clt_d_model_differs_from_model() -> None:
    clt = random_clt(random_model("gpt2", d_model=16, n_heads=2))
    with pytest.raises(TranscoderConfigError, match=r"d_in=16 does not match .*d_model=32"):
        check(cached_model("gpt2"), clt)


# ---- layer coverage -----------------------------------------------------------------

FEWER_LAYERS = r"cover layers 0\.\.1 but the model has 3 layers"
EXTRA_LAYER = r"layer 3 \('blocks\.3\.mlp\.hook_in'\) is out of range"


def test_duplicate_layers() -> None:
    with pytest.raises(
        TranscoderConfigError, match=r"two transcoders for layer 1 \('blocks\.1\.mlp\.hook_in'\)"
    ):
        TranscoderSet.from_saelens([make_sae(0), make_sae(1), make_sae(1), make_sae(2)])


def test_missing_layer() -> None:
    with pytest.raises(TranscoderConfigError, match=r"no transcoder for layer\(s\) \[1\]"):
        TranscoderSet.from_saelens([make_sae(0), make_sae(2)])


def test_empty_set() -> None:
    with pytest.raises(TranscoderConfigError, match="at least one transcoder"):
        TranscoderSet.from_saelens([])


def test_fewer_layers_than_model() -> None:
    with pytest.raises(TranscoderConfigError, match=FEWER_LAYERS):
        check(cached_model("gpt2"), make_set(n_layers=2))


def test_hook_layer_beyond_model() -> None:
    with pytest.raises(TranscoderConfigError, match=EXTRA_LAYER):
        check(cached_model("gpt2"), make_set(n_layers=4))


def test_clt_fewer_layers_than_model() -> None:
    clt = random_clt(random_model("gpt2", n_layers=2))
    with pytest.raises(TranscoderConfigError, match=FEWER_LAYERS):
        check(cached_model("gpt2"), clt)


def test_reads_and_writes_in_different_layers() -> None:
    saes = [make_sae(0, hook_out="blocks.1.hook_mlp_out"), make_sae(1), make_sae(2)]
    with pytest.raises(
        TranscoderConfigError,
        match=r"reads at layer 0 \('blocks\.0\.mlp\.hook_in'\) but writes at layer 1",
    ):
        TranscoderSet.from_saelens(saes)


# ---- dtype, fold_ln, finiteness -----------------------------------------------------


def test_transcoder_dtype_differs_from_model() -> None:
    with pytest.raises(
        TranscoderConfigError, match=r"transcoders are torch\.float64, the model is torch\.float32"
    ):
        check(cached_model("gpt2"), make_set(dtype="float64"))


def test_dtype_differs_between_layers() -> None:
    saes = [make_sae(0), make_sae(1, dtype="float64"), make_sae(2)]
    with pytest.raises(
        TranscoderConfigError,
        match=r"layer 1 \(blocks\.1\.mlp\.hook_in\): W_enc is torch\.float64 on cpu, "
        r"but the set is torch\.float32",
    ):
        TranscoderSet.from_saelens(saes)


def test_clt_decoder_dtype_differs() -> None:
    clt = cached_transcoders("gpt2", "clt")
    layers = [dict(clt.layer_tensors(layer)) for layer in range(N_LAYERS)]
    layers[2]["W_dec"] = layers[2]["W_dec"].double()
    with pytest.raises(
        TranscoderConfigError, match=r"layer 2 .*W_dec \(to layer 2\) is torch\.float64"
    ):
        CrossLayerTranscoder(layers, **clt._init_kwargs())


@pytest.mark.filterwarnings(
    r"ignore:\s*This SAE has non-empty model_from_pretrained_kwargs:UserWarning"
)
@pytest.mark.parametrize("trained_folded", [False, True])
def test_fold_ln_mismatch(trained_folded: bool) -> None:
    model = cached_model("gpt2", fold_ln=not trained_folded)
    tcs = make_set(model_from_pretrained_kwargs={"fold_ln": trained_folded})
    assert tcs.expects_folded_ln is trained_folded
    with pytest.raises(
        TranscoderConfigError,
        match=rf"trained with fold_ln={trained_folded} but the model has "
        rf"fold_ln={not trained_folded}",
    ):
        check(model, tcs)


def test_fold_ln_mismatch_clt() -> None:
    clt = cached_transcoders("gpt2", "clt")
    unfolded = CrossLayerTranscoder(
        [clt.layer_tensors(layer) for layer in range(N_LAYERS)],
        **{**clt._init_kwargs(), "fold_ln": False},
    )
    with pytest.raises(TranscoderConfigError, match=r"trained with fold_ln=False"):
        check(cached_model("gpt2", fold_ln=True), unfolded)


@pytest.mark.filterwarnings(
    r"ignore:\s*This SAE has non-empty model_from_pretrained_kwargs:UserWarning"
)
def test_fold_ln_disagreement_between_layers() -> None:
    saes = [
        make_sae(0, model_from_pretrained_kwargs={"fold_ln": True}),
        make_sae(1, model_from_pretrained_kwargs={"fold_ln": False}),
        make_sae(2),
    ]
    with pytest.raises(TranscoderConfigError, match="disagree on fold_ln"):
        TranscoderSet.from_saelens(saes)


def test_nan_in_model_weights() -> None:
    model = random_model("gpt2")  # fresh copy, modified below
    with torch.no_grad():
        model.blocks[1].mlp.W_in[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN/inf"):
        check(model, cached_transcoders("gpt2", "relu"))


def test_nan_in_transcoder_weights() -> None:
    saes = [make_sae(layer) for layer in range(N_LAYERS)]
    with torch.no_grad():
        saes[1].W_dec[3, 4] = float("nan")
    with pytest.raises(
        NonFiniteError, match=r"layer 1 \(blocks\.1\.mlp\.hook_in\): W_dec .*NaN or infinite"
    ):
        TranscoderSet.from_saelens(saes)


def test_inf_in_clt_threshold() -> None:
    clt = cached_transcoders("gpt2", "clt")
    layers = [dict(clt.layer_tensors(layer)) for layer in range(N_LAYERS)]
    layers[0]["threshold"] = layers[0]["threshold"].clone()
    layers[0]["threshold"][0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"layer 0 .*threshold contains NaN or infinite"):
        CrossLayerTranscoder(layers, **clt._init_kwargs())


# ---- not a usable transcoder ----------------------------------------------------------


def test_plain_sae_is_not_a_transcoder() -> None:
    sae = StandardSAE(
        StandardSAEConfig(
            d_in=D_MODEL,
            d_sae=16,
            metadata=SAEMetadata(hook_name="blocks.0.hook_resid_pre"),
        )
    )
    with pytest.raises(TranscoderConfigError, match=r"item 1 is a StandardSAE, not an SAE-Lens"):
        TranscoderSet.from_saelens([make_sae(0), sae])


def test_normalize_activations() -> None:
    with pytest.raises(
        TranscoderConfigError, match=r"layer 0: normalize_activations='layer_norm' is not linear"
    ):
        make_set(normalize_activations="layer_norm")


# ---- architecture -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"attn_only": True}, "attn_only=True"),
        (
            {"positional_embedding_type": "alibi", "act_fn": "gelu"},
            "positional_embedding_type='alibi'",
        ),
    ],
)
def test_unsupported_architecture(overrides: dict, problem: str) -> None:
    cfg = HookedTransformerConfig(
        n_layers=N_LAYERS,
        d_model=D_MODEL,
        d_head=8,
        n_heads=4,
        d_vocab=50,
        n_ctx=32,
        **({"d_mlp": 64, "act_fn": "gelu"} | overrides),
    )
    model = HookedTransformer(cfg)
    with pytest.raises(UnsupportedArchitectureError, match=problem):
        check(model, cached_transcoders("gpt2", "relu"))
    with pytest.raises(UnsupportedArchitectureError, match=problem):
        validate_transcoders(model, cached_transcoders("gpt2", "clt"))


# ---- prompts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "the prompt is empty"),
        ([], "the prompt is empty"),
        (torch.tensor([], dtype=torch.long), "the prompt is empty"),
        (torch.zeros(1, 0, dtype=torch.long), "the prompt is empty"),
        (torch.zeros(33, dtype=torch.long), r"has 33 tokens but the model's context is n_ctx=32"),
        ([1, 2, 50], r"token id 50 at position 2 is outside the vocabulary \[0, 50\)"),
        ([1, -1], r"token id -1 at position 1 is outside the vocabulary"),
        (torch.tensor([1.0, 2.0]), r"token ids must be integers, got torch\.float32"),
        (torch.tensor([True, False]), r"token ids must be integers, got torch\.bool"),
        (torch.zeros(2, 5, dtype=torch.long), r"expected a 1-D sequence .*shape \(2, 5\)"),
        ("no tokenizer here", "this model has no tokenizer"),
    ],
    ids=[
        "empty-string",
        "empty-list",
        "empty-tensor",
        "empty-batch",
        "too-long",
        "out-of-vocab",
        "negative-id",
        "float-tensor",
        "bool-tensor",
        "batch-of-two",
        "string-without-tokenizer",
    ],
)
def test_bad_prompt(prompt: object, message: str) -> None:
    with pytest.raises(PromptError, match=message):
        ReplacementContext(cached_model("gpt2"), cached_transcoders("gpt2", "relu"), prompt)  # type: ignore[arg-type]


def test_string_prompt_longer_than_context_is_not_truncated(tmp_path: Path) -> None:
    """A long string prompt fails instead of being cut to n_ctx by the tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2, "<unk>": 3}
    vocab |= {f"w{i}": i + 4 for i in range(40)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    ).save_pretrained(tmp_path)
    model = random_model("gpt2")  # fresh: gets a tokenizer below
    model.set_tokenizer(AutoTokenizer.from_pretrained(tmp_path))

    assert to_tokens(model, "w1 w2 w3").tolist() == [0, 5, 6, 7]  # BOS prepended
    with pytest.raises(PromptError, match=r"has 41 tokens but the model's context is n_ctx=32"):
        to_tokens(model, " ".join(["w1"] * 40))


# ---- cross-layer transcoder files ---------------------------------------------------


@pytest.fixture
def clt_dir(tmp_path: Path) -> Path:
    return cached_transcoders("gpt2", "clt").save(tmp_path / "clt")


def edit_cfg(root: Path, **changes: object) -> None:
    cfg = json.loads((root / "cfg.json").read_text())
    for key, value in changes.items():
        if value is None:
            del cfg[key]
        else:
            cfg[key] = value
    (root / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("lazy", [True, False])
def test_clt_missing_layer_file(clt_dir: Path, lazy: bool) -> None:
    (clt_dir / "layer_2.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"layer_2\.safetensors: CLT layer file missing"):
        CrossLayerTranscoder.load(clt_dir, lazy=lazy)


def test_clt_layer_file_removed_after_lazy_load(clt_dir: Path) -> None:
    clt = CrossLayerTranscoder.load(clt_dir, lazy=True)
    (clt_dir / "layer_1.safetensors").unlink()
    clt.encoder(0)  # other layers still load
    with pytest.raises(FileNotFoundError, match=r"layer_1\.safetensors: CLT layer file missing"):
        clt.encoder(1)


def test_clt_missing_cfg(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"not a CLT directory \(no cfg\.json\)"):
        CrossLayerTranscoder.load(tmp_path)


def test_clt_wrong_format_string(clt_dir: Path) -> None:
    edit_cfg(clt_dir, format="circuit-tracer")
    with pytest.raises(
        TranscoderConfigError,
        match=r"cfg\.json: format is 'circuit-tracer', expected 'tl_circuits\.clt'",
    ):
        CrossLayerTranscoder.load(clt_dir)


def test_clt_unsupported_version(clt_dir: Path) -> None:
    edit_cfg(clt_dir, version=2)
    with pytest.raises(TranscoderConfigError, match=r"cfg\.json: version 2 is not supported"):
        CrossLayerTranscoder.load(clt_dir)


def test_clt_missing_cfg_key(clt_dir: Path) -> None:
    edit_cfg(clt_dir, d_sae=None)
    with pytest.raises(TranscoderConfigError, match=r"cfg\.json: missing keys \['d_sae'\]"):
        CrossLayerTranscoder.load(clt_dir)


def test_clt_unknown_activation(clt_dir: Path) -> None:
    edit_cfg(clt_dir, activation="gelu")
    with pytest.raises(
        TranscoderConfigError,
        match=r"cfg\.json: activation must be one of \('relu', 'jumprelu', 'topk'\), got 'gelu'",
    ):
        CrossLayerTranscoder.load(clt_dir)


def test_clt_unknown_activation_in_constructor() -> None:
    clt = cached_transcoders("gpt2", "clt")
    with pytest.raises(TranscoderConfigError, match=r"got 'gelu'"):
        CrossLayerTranscoder(
            [clt.layer_tensors(layer) for layer in range(N_LAYERS)],
            **{**clt._init_kwargs(), "activation": "gelu"},
        )


def test_clt_unknown_dtype(clt_dir: Path) -> None:
    edit_cfg(clt_dir, dtype="float17")
    with pytest.raises(TranscoderConfigError, match=r"unknown dtype 'float17'"):
        CrossLayerTranscoder.load(clt_dir)


def test_clt_hook_template_without_layer() -> None:
    clt = cached_transcoders("gpt2", "clt")
    with pytest.raises(TranscoderConfigError, match=r"'blocks\.0\.mlp\.hook_in' lacks '\{layer\}'"):
        CrossLayerTranscoder(None, **{**clt._init_kwargs(), "input_hook": "blocks.0.mlp.hook_in"})


def test_clt_wrong_tensor_shape(clt_dir: Path) -> None:
    path = clt_dir / "layer_1.safetensors"
    tensors = load_file(path)
    assert tensors["W_dec"].shape[1] == N_LAYERS - 1
    tensors["W_dec"] = torch.cat([tensors["W_dec"], tensors["W_dec"][:, :1]], dim=1)
    save_file(tensors, path)
    message = r"CLT layer 1 \(.*layer_1\.safetensors\): W_dec has shape \(48, 3, 32\), " + (
        r"expected \(48, 2, 32\)"
    )
    with pytest.raises(TranscoderConfigError, match=message):
        CrossLayerTranscoder.load(clt_dir, lazy=False)
    lazy = CrossLayerTranscoder.load(clt_dir, lazy=True)
    lazy.encoder(0)
    with pytest.raises(TranscoderConfigError, match=message):
        lazy.decoder(1, 2)


def test_clt_missing_tensor(clt_dir: Path) -> None:
    path = clt_dir / "layer_0.safetensors"
    tensors = load_file(path)
    del tensors["threshold"]
    save_file(tensors, path)
    with pytest.raises(
        TranscoderConfigError, match=r"CLT layer 0 .*missing tensors \['threshold'\]"
    ):
        CrossLayerTranscoder.load(clt_dir, lazy=False)


def test_clt_wrong_shape_in_constructor() -> None:
    clt = cached_transcoders("gpt2", "clt")
    layers = [dict(clt.layer_tensors(layer)) for layer in range(N_LAYERS)]
    layers[0]["W_skip"] = layers[0]["W_skip"][:, :16]
    with pytest.raises(
        TranscoderConfigError, match=r"CLT layer 0: W_skip has shape \(32, 16\), expected"
    ):
        CrossLayerTranscoder(layers, **clt._init_kwargs())


# ---- typed records are shape-checked at construction ----------------------------------


def test_typed_records_reject_mismatched_shapes() -> None:
    from tl_circuits.graph.nodes import NodeTable
    from tl_circuits.replacement.context import FeatureTable

    n3, n2 = torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    with pytest.raises(Exception, match="n"):  # jaxtyping/beartype type-check violation
        FeatureTable(n3, n3, n2, torch.zeros(3), torch.zeros(3))
    with pytest.raises(Exception, match="n"):
        NodeTable(n3, n3, n3, n3, torch.zeros(2))
    with pytest.raises(Exception, match=r"Float|dtype|float"):
        NodeTable(n3, n3, n3, n3, n3)  # activation must be floating point
    NodeTable(n3, n3, n3, n3, torch.zeros(3))  # the well-formed record is accepted
