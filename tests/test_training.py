"""Transcoder training: it learns, saves loadable files, resumes exactly, streams, and
evaluates correctly; bad inputs give clear errors."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_circuits import CrossLayerTranscoder, HookError, ReplacementContext, TranscoderSet
from tl_circuits.model.hooks import install_mlp_input_hooks
from tl_circuits.testing import random_model
from tl_circuits.training import (
    CheckpointError,
    TrainingConfig,
    TrainingConfigError,
    TrainingDataError,
    evaluate_transcoders,
    select_device,
    train_transcoders,
)
from tl_circuits.training.activations import (
    ActivationStream,
    StreamPosition,
    TokenSource,
)
from tl_circuits.training.evaluate import ReconstructionAccumulator
from tl_circuits.training.export import raw_layer_tensors, to_clt, to_saelens
from tl_circuits.training.trainable import JumpReLUFunction, TrainableTranscoder

pytestmark = pytest.mark.filterwarnings("ignore:(?s).*model_from_pretrained_kwargs:UserWarning")

D_VOCAB = 50
#: Per-layer FVU every trained kind must reach on the tiny model (measured: 0.09-0.11).
FVU_BOUND = 0.3


@functools.cache
def tiny_model() -> HookedTransformer:
    return random_model("gpt2", n_layers=2, d_model=32, d_vocab=D_VOCAB, n_ctx=32, seed=1)


def token_batch(n_seq: int, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, D_VOCAB, (n_seq, seq), generator=torch.Generator().manual_seed(seed))


def quick_config(**overrides) -> TrainingConfig:
    values = dict(
        d_sae=64,
        batch_tokens=128,
        n_tokens=128 * 60,
        lr=1e-2,
        sparsity_coefficient=1e-3,
        chunk_tokens=2048,
        device="cpu",
        checkpoint_every_tokens=0,
    )
    values.update(overrides)
    return TrainingConfig(**values)


TRAINED_KINDS = {
    "relu": dict(),
    "jumprelu_skip": dict(activation="jumprelu", skip=True),
    "clt": dict(kind="cross_layer"),
}


@functools.cache
def trained(name: str, out_dir: str):
    return train_transcoders(
        tiny_model(), token_batch(96), quick_config(**TRAINED_KINDS[name]), out_dir, progress=False
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return {name: trained(name, str(tmp_path_factory.mktemp(name))) for name in TRAINED_KINDS}


# ---- learning ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TRAINED_KINDS))
def test_training_lowers_fvu(results, name):
    report = results[name].report
    assert report.fvu is not None and len(report.fvu) == 2
    assert max(report.fvu) < FVU_BOUND, report.fvu
    # sparse: far fewer active features than d_sae, and the report's numbers are sane
    assert all(0 < l0 < 0.8 * 64 for l0 in report.l0)
    assert report.training["steps"] == 60 and report.training["tokens_seen"] == 128 * 60
    assert 0.0 <= report.agreement <= 1.0


def test_untrained_control_has_high_fvu(results):
    """The FVU bound is not trivially met: transcoders with their decoders zeroed (output
    = b_dec only) explain almost nothing."""
    tcs = results["relu"].transcoders.to()
    for sae in tcs.saes:
        with torch.no_grad():
            sae.W_dec.zero_()
    report = evaluate_transcoders(tiny_model(), tcs, token_batch(16, seed=5))
    assert min(report.fvu) > 0.9


# ---- files ---------------------------------------------------------------------------


def _reconstructions(tcs, x_in: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    acts = {
        layer: tcs.encoder(layer).activations(tcs.encoder(layer).pre_activations(x))
        for layer, x in x_in.items()
    }
    return [tcs.reconstruct(layer, acts, x_in[layer]) for layer in range(tcs.n_layers)]


def _inputs(seed: int = 9) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {layer: 3 * torch.randn(40, 32, generator=gen) for layer in range(2)}


@pytest.mark.parametrize("name", ["relu", "jumprelu_skip"])
def test_per_layer_files_load_and_reproduce(results, name):
    result = results[name]
    assert isinstance(result.transcoders, TranscoderSet)
    loaded = TranscoderSet.load(result.out_dir / "transcoders")
    x_in = _inputs()
    for a, b in zip(_reconstructions(result.transcoders, x_in), _reconstructions(loaded, x_in)):
        assert torch.equal(a, b)
    # SAE-Lens reads each layer directly, and its own forward gives the same reconstruction
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = SAE.load_from_disk(result.out_dir / "transcoders" / "layer_1")
    assert type(sae) is type(result.transcoders.saes[1])
    expected = _reconstructions(result.transcoders, x_in)[1]
    torch.testing.assert_close(sae(x_in[1]), expected, rtol=1e-5, atol=1e-5)
    assert (result.out_dir / "report.json").is_file()


def test_clt_files_load_and_reproduce(results):
    result = results["clt"]
    assert isinstance(result.transcoders, CrossLayerTranscoder)
    loaded = CrossLayerTranscoder.load(result.out_dir / "transcoders", lazy=False)
    x_in = _inputs()
    for a, b in zip(_reconstructions(result.transcoders, x_in), _reconstructions(loaded, x_in)):
        assert torch.equal(a, b)
    # layer 0's features write to both layers
    assert loaded.target_layers(0) == range(0, 2)


@pytest.mark.parametrize("name", list(TRAINED_KINDS))
def test_r1_with_trained_transcoders(results, name):
    ctx = ReplacementContext(tiny_model(), results[name].transcoders, token_batch(1, 16, 7)[0])
    logits, _ = ctx.run()
    assert (logits - ctx.logits).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["per_layer", "cross_layer"])
@pytest.mark.parametrize("activation,skip", [("relu", False), ("jumprelu", True)])
def test_export_folds_normalisation_exactly(kind, activation, skip):
    """The exported raw-unit transcoders compute what the trainable module computes in
    normalised units, undone: recon_raw = module(x * s_in) / s_out."""
    cfg = quick_config(kind=kind, activation=activation, skip=skip, d_sae=16)
    module = TrainableTranscoder(cfg, 2, 32)
    gen = torch.Generator().manual_seed(0)
    x_raw = 5 * torch.randn(2, 64, 32, generator=gen)
    y_raw = 0.3 * torch.randn(2, 64, 32, generator=gen) + 1.0
    module.initialise(x_raw, y_raw, gen)
    with torch.no_grad():  # move every weight off its initial value
        for param in module.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
        x, _ = module.normalise(x_raw, y_raw)
        expected = module.decode(module.encode(x), x) / module.scale_out[:, None, None]
    common = dict(dtype=torch.float32, device=torch.device("cpu"), fold_ln=False, model_name="m")
    if kind == "cross_layer":
        tcs = to_clt(module, "mlp.hook_in", **common)
    else:
        tcs = TranscoderSet.from_saelens(
            list(to_saelens(module, [0, 1], "mlp.hook_in", **common).values())
        )
    got = _reconstructions(tcs, {0: x_raw[0], 1: x_raw[1]})
    for layer in range(2):
        torch.testing.assert_close(got[layer], expected[layer], rtol=1e-5, atol=1e-5)
    assert raw_layer_tensors(module, 0)["W_enc"].shape == (32, 16)


# ---- resume --------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def chunk_list() -> list[torch.Tensor]:
    return [token_batch(16, seed=100 + i) for i in range(6)]  # 6 chunks of 512 tokens


def interrupted_stream(after: int):
    for i, chunk in enumerate(chunk_list()):
        if i == after:
            raise Interrupted
        yield chunk


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_resume_equals_uninterrupted_run(tmp_path, activation):
    # batches of 96 straddle the 512-token chunks; checkpoints fall mid-chunk
    cfg = quick_config(
        kind="cross_layer" if activation == "relu" else "per_layer",
        activation=activation,
        skip=activation == "jumprelu",
        d_sae=32,
        batch_tokens=96,
        n_tokens=96 * 30,
        checkpoint_every_tokens=96 * 10,
        dead_after_tokens=500,
    )
    model = tiny_model()
    full = train_transcoders(model, iter(chunk_list()), cfg, tmp_path / "a", progress=False)
    with pytest.raises(Interrupted):
        train_transcoders(model, interrupted_stream(4), cfg, tmp_path / "b", progress=False)
    state = (tmp_path / "b" / "checkpoint" / "state.json").read_text()
    assert '"tokens_seen": 1920' in state  # the step-20 checkpoint, chunk 3 row 384
    resumed = train_transcoders(
        model, iter(chunk_list()), cfg, tmp_path / "b", resume=True, progress=False
    )
    for layer in range(2):
        a, b = full.transcoders, resumed.transcoders
        assert torch.equal(a.encoder(layer).W_enc, b.encoder(layer).W_enc)
        for source in a.source_layers(layer):
            assert torch.equal(a.decoder(source, layer), b.decoder(source, layer))
        assert torch.equal(a.b_dec(layer), b.b_dec(layer))
    assert full.report.training["dead_fraction"] == resumed.report.training["dead_fraction"]
    assert resumed.report.training["steps"] == 30


def test_resume_errors(tmp_path):
    model = tiny_model()
    cfg = quick_config(n_tokens=128 * 3, checkpoint_every_tokens=128)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train_transcoders(model, token_batch(8), cfg, tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="out_dir"):
        train_transcoders(model, token_batch(8), cfg, None, resume=True, progress=False)
    train_transcoders(model, token_batch(8), cfg, tmp_path, progress=False)
    other = quick_config(n_tokens=128 * 3, checkpoint_every_tokens=128, d_sae=32, lr=2e-2)
    with pytest.raises(CheckpointError, match=r"d_sae: 64 -> 32.*lr"):
        train_transcoders(model, token_batch(8), other, tmp_path, resume=True, progress=False)


# ---- streaming -----------------------------------------------------------------------


def test_stream_of_chunks_with_masks():
    """(tokens, mask) chunks: only masked positions become rows; batches cross chunks; the
    position after each batch points at the next unread row."""
    model = tiny_model()
    chunks = []
    for i in range(3):
        tokens = token_batch(4, seed=i)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        mask[:, 1 + i :] = True  # drop the first 1..3 positions
        chunks.append((tokens, mask))
    source = TokenSource(model, iter(chunks), None, chunk_tokens=10**6)
    stream = ActivationStream(model, source, [0, 1], "mlp.hook_in", torch.device("cpu"), 0)
    batches = list(stream.batches(StreamPosition(), 50))
    n_rows = sum(int(m.sum()) for _, m in chunks)
    assert len(batches) == n_rows // 50
    x, y, after = batches[2]
    assert x.shape == y.shape == (2, 50, 32)
    assert after == StreamPosition(1, 150 - int(chunks[0][1].sum()))
    # every row is a real MLP input/output pair of some masked position
    _, cache = model.run_with_cache(chunks[0][0], names_filter=lambda n: n.endswith("mlp_out"))
    truth = cache["blocks.1.hook_mlp_out"][chunks[0][1]]
    first = batches[0][1][1]
    distance = torch.cdist(first, truth, compute_mode="donot_use_mm_for_euclid_dist")
    assert distance.min(-1).values.max() < 1e-5


def test_training_on_a_stream(tmp_path):
    """A one-shot iterator trains; when it ends before n_tokens the run stops with a warning
    and reports the tokens it saw."""
    cfg = quick_config(n_tokens=10**6)
    with pytest.warns(UserWarning, match="stream ended"):
        result = train_transcoders(tiny_model(), iter(chunk_list()), cfg, progress=False)
    assert result.report.training["tokens_seen"] == 128 * (6 * 512 // 128)
    assert result.report.fvu is not None


# ---- evaluation ----------------------------------------------------------------------


def relu_mlp_model() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=24, d_vocab=20, n_ctx=8,
        act_fn="relu", normalization_type="LN", seed=3,
    )  # fmt: skip
    model = HookedTransformer(cfg, move_to_device=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen))
    install_mlp_input_hooks(model)
    return model.eval()


def mlp_as_transcoders(model: HookedTransformer) -> TranscoderSet:
    """A ReLU MLP *is* a ReLU transcoder with d_sae = d_mlp: exact reconstruction."""
    saes = []
    for layer, block in enumerate(model.blocks):
        cfg = TranscoderConfig(
            d_in=16, d_sae=24, d_out=16, dtype="float32", device="cpu",
            apply_b_dec_to_input=False,
            metadata=SAEMetadata(
                hook_name=f"blocks.{layer}.mlp.hook_in",
                hook_name_out=f"blocks.{layer}.hook_mlp_out",
            ),
        )  # fmt: skip
        sae = Transcoder(cfg)
        with torch.no_grad():
            sae.W_enc.copy_(block.mlp.W_in)
            sae.b_enc.copy_(block.mlp.b_in)
            sae.W_dec.copy_(block.mlp.W_out)
            sae.b_dec.copy_(block.mlp.b_out)
        saes.append(sae)
    return TranscoderSet.from_saelens(saes)


def test_evaluation_of_exact_transcoders():
    model = relu_mlp_model()
    tcs = mlp_as_transcoders(model)
    tokens = torch.randint(0, 20, (12, 8), generator=torch.Generator().manual_seed(0))
    report = evaluate_transcoders(model, tcs, tokens, batch_sequences=5)
    assert report.agreement == 1.0
    assert report.ce_loss_replaced == pytest.approx(report.ce_loss_original, abs=1e-6)
    assert max(report.fvu) < 1e-10
    assert report.n_eval_tokens == 96
    # the model's own CE, computed independently
    with torch.no_grad():
        ce = model(tokens, return_type="loss").item()
    assert report.ce_loss_original == pytest.approx(ce, rel=1e-5)
    # control: break one layer's decoder -> the replaced model's numbers move
    with torch.no_grad():
        tcs.saes[0].W_dec.mul_(-1.0)
    broken = evaluate_transcoders(model, tcs, tokens)
    assert broken.fvu[0] > 0.5 and broken.fvu[1] < 1e-10
    assert broken.ce_loss_replaced != pytest.approx(report.ce_loss_original, abs=1e-3)


def test_evaluation_mask_and_stream():
    model = relu_mlp_model()
    tcs = mlp_as_transcoders(model)
    tokens = torch.randint(0, 20, (6, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 4:] = True
    full = evaluate_transcoders(model, tcs, tokens, mask)
    streamed = evaluate_transcoders(model, tcs, [(tokens[:2], mask[:2]), (tokens[2:], mask[2:])])
    assert full.n_eval_tokens == streamed.n_eval_tokens == 24
    assert full.ce_loss_original == pytest.approx(streamed.ce_loss_original, rel=1e-12)
    # masked CE: positions 4..6 predicting tokens 5..7
    with torch.no_grad():
        log_probs = model(tokens).double().log_softmax(-1)
    expected = -log_probs[:, 4:7].gather(-1, tokens[:, 5:8, None]).mean().item()
    assert full.ce_loss_original == pytest.approx(expected, rel=1e-9)


def test_fvu_hand_computed():
    """y rows (0,0), (2,0), (4,0): mean (2,0), total variance 8; errors of squared size
    1, 0, 1 -> FVU = 2/8, the same when the rows arrive in two batches."""
    y = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0]])
    y_hat = torch.tensor([[0.0, 1.0], [2.0, 0.0], [3.0, 0.0]])
    one = ReconstructionAccumulator()
    one.update(y, y_hat)
    two = ReconstructionAccumulator()
    two.update(y[:1], y_hat[:1])
    two.update(y[1:], y_hat[1:])
    assert one.fvu() == pytest.approx(0.25, abs=1e-15)
    assert two.fvu() == pytest.approx(0.25, abs=1e-15)


def test_jumprelu_pseudo_derivative():
    """d/dthreshold of sum(a) = -threshold/eps per pre-activation within eps/2 of it."""
    pre = torch.tensor([[0.49, 0.52, 0.7, 0.2]], requires_grad=True)
    threshold = torch.tensor([0.5], requires_grad=True)
    out = JumpReLUFunction.apply(pre, threshold, 0.1)
    assert torch.equal(out.detach(), torch.tensor([[0.0, 0.52, 0.7, 0.0]]))
    out.sum().backward()
    assert threshold.grad.item() == pytest.approx(-2 * 0.5 / 0.1)
    assert torch.equal(pre.grad, torch.tensor([[0.0, 1.0, 1.0, 0.0]]))


# ---- configuration and bad inputs ----------------------------------------------------


def test_select_device():
    assert select_device(None, cuda_available=False) == torch.device("cpu")
    assert select_device(None, cuda_available=True) == torch.device("cuda")
    assert select_device("cpu", cuda_available=True) == torch.device("cpu")
    with pytest.raises(TrainingConfigError, match="CUDA is not available"):
        select_device("cuda:0", cuda_available=False)
    with pytest.raises(TrainingConfigError, match="not a valid torch device"):
        select_device("tpu7", cuda_available=False)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(kind="sparse"), "kind must be one of"),
        (dict(d_sae=0), "d_sae must be a positive integer"),
        (dict(d_sae=-4), "d_sae must be a positive integer"),
        (dict(activation="gelu"), "activation must be one of"),
        (dict(loss="l2"), "loss must be one of"),
        (dict(lr=0.0), "lr must be > 0"),
        (dict(input_hook="hook_resid_post"), "input_hook must be one of"),
        (dict(kind="cross_layer", layers=(0,)), "a CLT spans every layer"),
        (dict(layers=(1, 1)), "distinct"),
    ],
)
def test_bad_config(overrides, match):
    with pytest.raises(TrainingConfigError, match=match):
        quick_config(**overrides)


def test_layer_out_of_range():
    with pytest.raises(TrainingConfigError, match=r"layers \[5\] are out of range.*0..1"):
        train_transcoders(tiny_model(), token_batch(4), quick_config(layers=(0, 5)))


@pytest.mark.parametrize(
    "tokens,mask,match",
    [
        (token_batch(4).float(), None, "integer dtype"),
        (token_batch(4)[0], None, r"shape \[n_seq, seq\]"),
        (token_batch(4) + D_VOCAB, None, "token ids must lie in"),
        (torch.zeros(2, 40, dtype=torch.long), None, "n_ctx"),
        (token_batch(4), torch.ones(4, 31, dtype=torch.bool), "loss_mask has shape"),
        (token_batch(4), torch.ones(4, 32), "loss_mask must be a bool"),
        ([token_batch(4)], torch.ones(4, 32, dtype=torch.bool), "yield"),
        ("some text", None, "integer torch.Tensor"),
        (iter([token_batch(4), token_batch(4).float()]), None, "chunk 1 of the token stream"),
    ],
)
def test_bad_tokens(tokens, mask, match):
    with pytest.raises(TrainingDataError, match=match):
        train_transcoders(tiny_model(), tokens, quick_config(), loss_mask=mask, progress=False)


def test_hook_that_does_not_fire():
    with pytest.raises(HookError, match="set_use_hook_mlp_in"):
        train_transcoders(tiny_model(), token_batch(4), quick_config(input_hook="hook_mlp_in"))


def test_partial_layers_train_and_save(tmp_path):
    """layers=(1,) trains one SAE-Lens transcoder; no complete set, so no spliced report."""
    cfg = quick_config(layers=(1,), n_tokens=128 * 5)
    result = train_transcoders(tiny_model(), token_batch(8), cfg, tmp_path, progress=False)
    assert result.transcoders is None and list(result.saes) == [1]
    assert result.report.agreement is None and result.report.training["layers"] == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = SAE.load_from_disk(tmp_path / "transcoders" / "layer_1")
    assert sae.cfg.metadata.hook_name == "blocks.1.mlp.hook_in"
