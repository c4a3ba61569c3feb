# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---
# tl_circuits-tutorial: not-executed (downloads real models and their transcoders)

# %% [markdown]
# # 4. Using real models
#
# Tutorials 1–3 run on the embedded default model. This one traces real models with
# published transcoders, one source of each kind `load_transcoders` reads
# (`docs/dictionaries.md` describes every format):
#
# 1. `gemma-2-2b` with the Gemma Scope transcoders: SAE-Lens release
#    `gemma-scope-2b-pt-transcoders` (per-layer, JumpReLU);
# 2. circuit-tracer's cross-layer transcoders from Hugging Face repos:
#    `mntss/clt-llama-3.2-1b-524k` for `meta-llama/Llama-3.2-1B` and
#    `mntss/clt-gemma-2-2b-426k` for `gemma-2-2b`;
# 3. `google/gemma-3-270m` with Gemma Scope 2: SAE-Lens release
#    `gemma-scope-2-270m-pt-transcoders-all` (per-layer, JumpReLU, affine skip);
# 4. `qwen3-0.6b` with the `mwhanna` transcoders: SAE-Lens release
#    `mwhanna-qwen3-0.6b-transcoders-lowl0` (per-layer, ReLU).
#
# It downloads many GB from the Hugging Face hub, so the test suite does not run it; every
# code path it uses is tested on local stand-in files: the release resolution and
# `SAE.from_pretrained` in `tests/test_real_model_paths.py`, the hub repos, formats, hooks,
# lazy loading and refusals in `tests/test_formats*.py`.
#
# Settings that hold for all of them:
#
# - **Unprocessed models** (`fold_ln=False`, `HookedTransformer.from_pretrained_no_processing`):
#   SAE-Lens's and circuit-tracer's transcoders were trained on the raw weights.
#   `load_pretrained` loads them so by default; a `fold_ln` the transcoders record that
#   differs from the model's is refused when tracing.
# - **One dtype** for model and transcoders. `dtype="bfloat16"` halves the memory; float32
#   is exact (R1 bit for bit in every dtype; 16-bit tolerances in
#   `docs/dtypes_and_devices.md`).
# - **Checked before anything runs**: hook names, `d_in`/`d_out`, layers, dtype/device,
#   `fold_ln`; a mismatch is refused with a message naming the layer and hook.

# %%
import torch

from tl_circuits import (
    AttributionGraph,
    HeadLoadings,
    QKAttribution,
    ReplacementContext,
    load_pretrained,
    load_transcoders,
)
from tl_circuits.graph.build import estimate_memory_bytes
from tl_circuits.transcoders.loading import release_sae_ids

device = "cuda" if torch.cuda.is_available() else "cpu"

# %% [markdown]
# ## 1. Gemma Scope transcoders for gemma-2-2b (SAE-Lens release)
# One SAE-Lens `JumpReLUTranscoder` per layer, 16k features, reading
# `blocks.{l}.ln2.hook_normalized` and writing `blocks.{l}.hook_mlp_out`. The release lists
# one SAE per layer, so the ids (and the layer count) come from its directory entry; for
# releases with several per layer pass `sae_id_template="layer_{layer}/width_16k/average_l0_76"`.
#
# Memory: gemma-2-2b is 2.6 B parameters (10.5 GB in float32, 5.2 GB in bfloat16); the 26
# transcoders are 26 x 16,384 x 2,304 x 2 weights (7.9 GB in float32, 3.9 GB in bfloat16).
# Gemma-2's logits have a tanh soft-cap: logit targets are pre-cap logits, and QK scores
# are decomposed before the attention soft-cap.

# %%
print(release_sae_ids("gemma-scope-2b-pt-transcoders", None)[:3])
model, transcoders = load_pretrained(
    "gemma-2-2b", "gemma-scope-2b-pt-transcoders", device=device, dtype="float32"
)

# %% [markdown]
# ### Memory and time of a graph
# The build needs, beyond the weights, what `estimate_memory_bytes` says (the build prints
# the same estimate and refuses if it does not fit). With ~40 active features per layer
# and position:
#
# | prompt | active features | full graph | 4,096-feature budget |
# |---|---:|---:|---:|
# | 16 tokens | ~16.6k | 1.3 GiB | 0.6 GiB |
# | 32 tokens | ~33k | 4.6 GiB | 1.1 GiB |
# | 64 tokens | ~67k | 17.7 GiB | 2.1 GiB |
#
# Time: on the benchmark's GPT-2-small-shaped model (12 layers, d_model 768) a full
# 16-token graph takes ~23 s on 2 CPU cores (`benchmarks/README.md`); gemma-2-2b has 2x the
# layers and 3x the width, so expect minutes per graph on CPU and seconds on a GPU.

# %%
n_pos, n_layers, d_model, l0 = 32, 26, 2304, 40
n_features = n_layers * n_pos * l0
n_cols = n_features + n_layers * n_pos + n_pos
estimate = estimate_memory_bytes(4096 + 10, n_cols, n_pos, d_model, 256, n_layers, 4, True)
print(f"32 tokens, 4,096 budget: ~{estimate / 2**30:.1f} GiB beyond the weights")

# %% [markdown]
# ### Trace a prompt
# Everything from tutorial 1 applies unchanged: the replacement context reproduces the
# model's logits (R1), the graph's edges are exact, and head loadings and QK attributions
# read the same cached activations.

# %%
prompt = "The National Digital Analytics Group (N"
ctx = ReplacementContext(model, transcoders, prompt)
print(ctx.reconstruction_stats())
graph = AttributionGraph.build(model, transcoders, prompt, max_feature_nodes=4096)
pruned = graph.prune(node_threshold=0.8, edge_threshold=0.98)
print(pruned.scores())
pruned.to_json("gemma_ndag.json")  # open in the Neuronpedia / circuit-tracer frontend

# %% [markdown]
# Which heads carried the strongest cross-position edges, and why the top one attended
# where it did:

# %%
hl = HeadLoadings.compute(pruned)
totals = hl.head_totals()
layer, head = divmod(int(totals.flatten().argmax()), totals.shape[1])
qk = QKAttribution.compute(pruned, layer=layer, head=head, query_pos=len(graph.tokens) - 1)
best = int(torch.argmax(qk.pattern))
for term in qk.top_terms(best, k=5):
    print(f"{term.value:+.3f}  {qk.label(term.query)}  x  {qk.label(term.key)}")
del model, transcoders, ctx, graph, pruned, hl, qk

# %% [markdown]
# ## 2. circuit-tracer's cross-layer transcoders (Hugging Face repos)
# A repo id (`owner/name`, optionally `owner/name//subfolder@revision`) of a repo in
# circuit-tracer's format: `config.yaml` (kind, hooks) plus `W_enc_{i}` / `W_dec_{i}`
# safetensors per layer. `load_transcoders` downloads the config first, then only the
# files it names, and reads the layers **lazily**: nothing but the first file's header is
# read until a layer is used (building a replacement context then reads every layer).
# The hooks come from the repo's config; `tcs.input_hook(0)` shows them.
#
# These repos are listed in circuit-tracer's README. SAE-Lens's directory has only one of
# them, as the release `mntss-gemma-2-2b-2.5m-clt-as-per-layer`: the CLT's decoders summed
# per layer, which SAE-Lens itself marks "not for reconstruction". `tl_circuits` refuses
# that release and points to the CLT, `load_transcoders("mntss/clt-gemma-2-2b-2.5M")`.
#
# Memory: a CLT's decoders are large. Layer `l`'s features write to the `n_layers - l`
# layers from `l` on, so the decoders hold `d_sae * d_model * n_layers * (n_layers + 1) / 2`
# weights:
#
# | repo | model | layers x features | decoder weights | bfloat16 | float32 |
# |---|---|---|---:|---:|---:|
# | `mntss/clt-gemma-2-2b-426k` | gemma-2-2b | 26 x 16,384 | 13.3 B | 26.5 GB | 53 GB |
# | `mntss/clt-llama-3.2-1b-524k` | Llama-3.2-1B | 16 x 32,768 | 9.1 B | 18.3 GB | 36.5 GB |
#
# (encoders add `n_layers * d_sae * d_model`: 1.0 B and 1.1 B weights). Llama-3.2-1B itself
# is 1.24 B parameters (2.5 GB in bfloat16). Load them in bfloat16 with a bfloat16 model
# unless you have the memory, and on a GPU.

# %%
model, clt = load_pretrained(
    "meta-llama/Llama-3.2-1B", "mntss/clt-llama-3.2-1b-524k", device=device, dtype="bfloat16"
)
print(clt, clt.input_hook(0), clt.output_hook(0))
graph = AttributionGraph.build(model, clt, "The capital of France is", max_feature_nodes=4096)
print(graph.prune().scores())
del model, clt, graph

# %% [markdown]
# The Gemma-2 CLT the same way, here without the model (the model-dependent checks run
# when it meets one). circuit-tracer's `mlp.hook_out` (the MLP module's output) equals
# TransformerLens's `hook_mlp_out` only in models without a norm after the MLP; Gemma's
# `ln2_post` makes them differ, so a config naming `mlp.hook_out` for a Gemma model is
# refused, while `hook_mlp_out` (the normalised output) is exact. The printed hooks show
# what the repo's config names.

# %%
clt = load_transcoders("mntss/clt-gemma-2-2b-426k", dtype="bfloat16", device=device)
print(clt, [clt.input_hook(0), clt.output_hook(0)])
enc = clt.encoder(3)  # reads only layer 3's files
print(enc.W_enc.shape, enc.threshold is not None)
del clt, enc

# %% [markdown]
# ## 3. Gemma Scope 2 for Gemma 3
# Gemma Scope 2's transcoders (`params.safetensors`: `w_enc`, `w_dec`, `b_enc`, `b_dec`,
# `threshold`, and for the `_affine` ones an affine skip `affine_skip_connection`) read the
# output of `pre_feedforward_layernorm` (our `blocks.{l}.mlp.hook_in`) and write the output
# of `post_feedforward_layernorm` (`blocks.{l}.hook_mlp_out`). The `-all` releases hold
# several widths and sparsities per layer: choose one with a template. Gemma 3 has QK-norm,
# sandwich norms and local/global layers with separate rotary bases, all handled exactly.
#
# Memory: gemma-3-270m is 0.27 B parameters (1.1 GB in float32); 18 affine 16k transcoders
# are 18 x (2 x 16,384 x 640 + 640^2) = 0.38 B weights (1.5 GB in float32).

# %%
model, transcoders = load_pretrained(
    "google/gemma-3-270m",
    "gemma-scope-2-270m-pt-transcoders-all",
    sae_id_template="layer_{layer}_width_16k_l0_small_affine",
    device=device,
)
print(transcoders.input_hook(0), transcoders.W_skip(0) is not None)
graph = AttributionGraph.build(model, transcoders, "The capital of France is")
print(graph.prune().scores())
del model, transcoders, graph

# %% [markdown]
# Gemma Scope 2's cross-layer transcoders (`params_layer_{i}.safetensors`, each with a
# decoder to every layer, zero before its own) load from the repo folder that holds them,
# e.g. `load_transcoders("google/gemma-scope-2-1b-pt//clt/<folder>")` (browse the repo for
# the folder names), or from a circuit-tracer config listing their files; a folder or repo
# in no known format is refused naming what it holds.
#
# ## 4. Qwen3
# The `mwhanna` releases list one SAE per layer (ReLU transcoders reading
# `blocks.{l}.mlp.hook_in`); the same weights are also a circuit-tracer repo
# (`mwhanna/qwen3-0.6b-transcoders-lowl0`, `config.yaml` + `layer_{i}.safetensors`).
# Qwen3 has QK-norm and grouped-query attention, both handled exactly (frozen QK-norm
# scales; key heads shared by query heads). Memory: qwen3-0.6b is 0.6 B parameters
# (2.4 GB in float32); its 28 transcoders hold `28 x 2 x d_sae x 1,024` weights plus biases
# (`transcoders.d_sae(0)` gives `d_sae` once loaded).

# %%
model, transcoders = load_pretrained("qwen3-0.6b", "mwhanna-qwen3-0.6b-transcoders-lowl0")
graph = AttributionGraph.build(
    model, transcoders, "The capital of France is", max_feature_nodes=4096
)
print(graph.prune().scores())

# %% [markdown]
# ## From the command line
# `--transcoders` takes the same sources (a repo id or a folder needs `--model`; a release
# names its model):
# ```bash
# tl-circuits trace "The capital of France is" --transcoders mwhanna-qwen3-0.6b-transcoders-lowl0 \
#     --max-features 4096 --out qwen_paris
# tl-circuits trace "The capital of France is" --model meta-llama/Llama-3.2-1B \
#     --transcoders mntss/clt-llama-3.2-1b-524k --dtype bfloat16 --device cuda --out llama_paris
# tl-circuits heads qwen_paris --edges 20
# tl-circuits qk qwen_paris --layer 12 --head 3 --query-pos -1
# ```
