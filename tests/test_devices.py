"""Device handling (issue 13 item 7): the memory a build checks against is the model's
device's free memory; on a CUDA machine the invariants hold with everything on the GPU.

The ``cuda`` tests run only where ``torch.cuda.is_available()``; elsewhere they are skipped
with that reason (CI machines have no GPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_tokens

from tl_circuits import AttributionGraph, HeadLoadings, QKAttribution, TLCircuitsError
from tl_circuits.model import devices
from tl_circuits.testing import random_clt, random_model, random_transcoders

_skip_without_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


def needs_cuda(test):
    """Mark ``test`` ``cuda`` (``pytest -m cuda`` selects these) and skip it without a GPU."""
    return pytest.mark.cuda(_skip_without_gpu(test))


def test_cuda_memory_is_the_devices_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def mem_get_info(device):
        calls.append(torch.device(device))
        return 3 * 2**30, 80 * 2**30  # (free, total)

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert devices.available_memory_bytes("cuda:1") == 3 * 2**30  # free, not total
    assert calls == [torch.device("cuda:1")]
    assert devices.available_memory_bytes("cpu") > 0 and calls == [torch.device("cuda:1")]


def test_the_build_refuses_past_the_devices_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default limit comes from the model's device (here the CPU, patched to 1 KiB)."""
    model = random_model("gpt2")
    tcs = random_transcoders(model, "relu")
    seen = []

    def tiny(device):
        seen.append(torch.device(device))
        return 1024

    monkeypatch.setattr("tl_circuits.graph.build.available_memory_bytes", tiny)
    with pytest.raises(TLCircuitsError, match="the free memory of cpu"):
        AttributionGraph.build(model, tcs, prompt_tokens(), show_progress=False)
    assert seen == [torch.device("cpu")]


@needs_cuda
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
@pytest.mark.parametrize("kind", ["jumprelu_skip", "clt"])
def test_invariants_on_cuda(family: str, kind: str) -> None:
    """R1, G1, H1 and Q1 with the model, dictionaries and every analysis on the GPU, and the
    edges equal to a CPU build of the same weights."""
    model = random_model(family, dtype=torch.float64)  # type: ignore[arg-type]
    tcs = random_clt(model) if kind == "clt" else random_transcoders(model, kind)  # type: ignore[arg-type]
    cpu_graph = AttributionGraph.build(model, tcs, prompt_tokens(), show_progress=False)
    model_gpu, tcs_gpu = model.to("cuda"), tcs.to(device="cuda")
    graph = AttributionGraph.build(model_gpu, tcs_gpu, prompt_tokens(), show_progress=False)
    ctx = graph.context
    assert ctx is not None and ctx.embeddings.device.type == "cuda"
    assert torch.equal(ctx.run()[0], ctx.logits)  # R1
    assert graph.adjacency.device.type == "cuda"
    rows = torch.cat([graph.indices("feature"), graph.indices("target")]).to("cuda")
    total = graph.adjacency[rows].sum(1) + graph.constants[rows]
    torch.testing.assert_close(total, graph.row_values[rows], rtol=1e-10, atol=1e-10)  # G1
    torch.testing.assert_close(graph.adjacency.cpu(), cpu_graph.adjacency, rtol=1e-9, atol=1e-12)
    pruned = graph.prune()
    hl = HeadLoadings.compute(pruned)
    split = hl.bypass + hl.loadings.sum(-1)
    edge = hl.edge_values[:, None].expand_as(split)
    assert bool(((split - edge).abs()[hl.crossed] <= 1e-9 * edge.abs()[hl.crossed]).all())  # H1
    layer, query = model.cfg.n_layers - 1, len(prompt_tokens()) - 1
    qk = QKAttribution.compute(graph, layer=layer, head=0, query_pos=query)
    _, cache = model_gpu.run_with_cache(prompt_tokens()[None].to("cuda"))
    real = cache[f"blocks.{layer}.attn.hook_attn_scores"][0, 0, query, : query + 1]
    torch.testing.assert_close(qk.scores, real, rtol=1e-6, atol=1e-9)  # Q1
