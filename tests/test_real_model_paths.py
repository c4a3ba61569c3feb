"""Tutorial 4's code path for real models, on local files (no network).

``load_pretrained("qwen3-0.6b", "mwhanna-qwen3-0.6b-transcoders-lowl0")`` resolves the
release's 28 SAE ids from SAE-Lens's directory, loads each through SAE-Lens's real
``SAE.from_pretrained`` (a converter reading local folders stands in for the hub download)
and the model through TransformerLens's loader (a random-weight Qwen3-shaped model with the
same layer count stands in for the download). The pair then splices exactly (R1) and
builds a graph, as the tutorial does.
"""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer

from tl_circuits import AttributionGraph, ReplacementContext
from tl_circuits.errors import PretrainedError
from tl_circuits.testing import local_saelens_converter, random_model, random_transcoders
from tl_circuits.transcoders.loading import load_pretrained

RELEASE = "mwhanna-qwen3-0.6b-transcoders-lowl0"
N_LAYERS = 28  # qwen3-0.6b, as the release's directory entry lists


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory):
    model = random_model("qwen3", n_layers=N_LAYERS, d_model=16, n_heads=2, d_vocab=40)
    transcoders = random_transcoders(model, "relu", d_sae=24)
    root = transcoders.save(tmp_path_factory.mktemp("hub"))
    return model, transcoders, root


def test_load_pretrained_release_on_local_files(stand_ins, monkeypatch) -> None:
    model, transcoders, root = stand_ins
    asked: list[tuple[str, str]] = []
    calls: list[tuple[str, str]] = []

    def from_pretrained_no_processing(name: str, device: str, dtype: torch.dtype):
        asked.append(("model", name))
        return model

    converter = local_saelens_converter(root, calls)

    monkeypatch.setattr(
        HookedTransformer, "from_pretrained_no_processing", from_pretrained_no_processing
    )
    loaded_model, loaded = load_pretrained("qwen3-0.6b", RELEASE, converter=converter)
    assert loaded_model is model
    # every layer's SAE asked for under the release's own folder name, in layer order
    assert asked == [("model", "qwen3-0.6b")]
    assert [folder for _, folder in calls] == [
        f"layer_{layer}.safetensors" for layer in range(N_LAYERS)
    ]
    for layer in range(N_LAYERS):
        assert torch.equal(loaded.encoder(layer).W_enc, transcoders.encoder(layer).W_enc)
    prompt = torch.randint(0, 40, (6,), generator=torch.Generator().manual_seed(0))
    ctx = ReplacementContext(loaded_model, loaded, prompt)
    logits, _ = ctx.run()
    assert torch.equal(logits, ctx.logits)  # R1 with the loaded transcoders
    graph = AttributionGraph.build(loaded_model, loaded, prompt)
    rows = graph.indices("target")
    residual = graph.adjacency[rows].sum(1) + graph.constants[rows] - graph.row_values[rows]
    assert float(residual.abs().max()) < 1e-3 * float(graph.row_values[rows].abs().max())


def test_wrong_layer_count_is_refused(stand_ins, monkeypatch) -> None:
    model = random_model("qwen3", n_layers=3, d_model=16, n_heads=2, d_vocab=40)
    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing", lambda *a, **k: model)
    with pytest.raises(PretrainedError, match=r"exactly one SAE per layer 0\.\.2"):
        load_pretrained("qwen3-0.6b", RELEASE)
