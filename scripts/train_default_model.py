"""Train the embedded default model and its transcoders (reproducible; fixed seeds).

    python scripts/train_default_model.py [--stage model|transcoders|card|all]

Stages write into ``tl_circuits/default/data/`` (or ``--out``):

- ``model``: a small GPT-2-style ``HookedTransformer`` trained on
  :mod:`tl_circuits.default.synthetic` with the loss on predictable positions only;
  writes ``model.safetensors``, ``model_config.json``, ``tokenizer.json`` and
  ``model_metrics.json`` (accuracies, head scores, ablation, wall time);
- ``transcoders``: per-layer and cross-layer transcoders (``tl_circuits.training``) on the
  model's MLP activations; writes ``per_layer/``, ``cross_layer/``,
  ``transcoder_metrics.json``;
- ``card``: measures everything again from the saved files (fresh evaluation data, spliced
  accuracies, replacement scores of the default prompts' graphs) and writes ``card.json``.

Every random draw is seeded from the constants below; CPU runs with the same torch version
reproduce the files.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_circuits.default import (
    DEFAULT_PROMPTS,
    load_default_model,
    load_default_transcoders,
    mechanisms,
)
from tl_circuits.default.synthetic import (
    SHORT_BLOCKS,
    SyntheticConfig,
    fact_table,
    generate,
    generate_filler,
)
from tl_circuits.default.tokenizer import (
    ATTRIBUTES,
    ENTITIES,
    RELATIONS,
    VOCAB_SIZE,
    build_backend_tokenizer,
    filler_words,
    wrap_tokenizer,
)
from tl_circuits.graph import AttributionGraph
from tl_circuits.model.hooks import install_mlp_input_hooks
from tl_circuits.training import TrainingConfig, evaluate_transcoders, train_transcoders
from tl_circuits.training.evaluate import replacement_hooks
from tl_circuits.transcoders import Transcoders

DATA_DIR = Path(__file__).resolve().parents[1] / "tl_circuits" / "default" / "data"

MODEL_SEED = 0
TRAIN_DATA_SEED = 1_000_000  # batch at step s is generate(batch, TRAIN_DATA_SEED + s)
EVAL_DATA_SEED = 7  # evaluation during and right after model training
TC_DATA_SEED = 2_000_000  # transcoder training tokens
TC_EVAL_SEED = 3_000_000  # transcoder evaluation tokens
CARD_DATA_SEED = 4_000_000  # the card's fresh evaluation data
TC_TRAIN_SEQUENCES = 2048
TC_EVAL_SEQUENCES = 256
CARD_SEQUENCES = 512
TC_KINDS = ("per_layer", "cross_layer")
ARCH = dict(
    n_layers=2,
    d_model=128,
    n_heads=4,
    d_head=32,
    d_mlp=256,
    n_ctx=64,
    d_vocab=VOCAB_SIZE,
    act_fn="gelu",
    normalization_type="LN",
    positional_embedding_type="rotary",
    rotary_dim=32,
)
MODEL_RECIPE = dict(
    steps=4000,
    batch_size=32,
    lr=2e-3,
    warmup_steps=100,
    eval_every=250,
    weight_decay=0.01,
    betas=(0.9, 0.98),
    grad_clip=1.0,
)


_TC_COMMON = dict(
    d_sae=512,
    activation="jumprelu",
    skip=False,
    loss="relative_mse",
    sparsity_coefficient=1e-2,
    lr=1e-3,
    batch_tokens=1024,
    n_tokens=1_000_000,
    seed=0,
    device="cpu",
    checkpoint_every_tokens=0,
)
TRANSCODER_RECIPE: dict[str, dict] = {kind: dict(_TC_COMMON) for kind in TC_KINDS}


def load_model_from(out: Path) -> HookedTransformer:
    return load_default_model(directory=out)


def load_transcoders_from(out: Path, kind: str) -> Transcoders:
    return load_default_transcoders(kind, directory=out)  # type: ignore[arg-type]


def data_config(out: Path) -> SyntheticConfig:
    """The data shape the model in ``out`` was trained on (``model_metrics.json``)."""
    fields = json.loads((out / "model_metrics.json").read_text())["data"]
    return SyntheticConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def model_config(arch: dict) -> HookedTransformerConfig:
    return HookedTransformerConfig(**arch, seed=MODEL_SEED, device="cpu")


def lr_at(step: int, recipe: dict) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < recipe["warmup_steps"]:
        return recipe["lr"] * (step + 1) / recipe["warmup_steps"]
    t = (step - recipe["warmup_steps"]) / max(1, recipe["steps"] - recipe["warmup_steps"])
    return recipe["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def evaluate_model(
    model: HookedTransformer, data_cfg: SyntheticConfig, n: int = 256, seed: int = EVAL_DATA_SEED
) -> dict:
    batch = generate(n, seed, data_cfg)
    filler = generate_filler(n, seed, data_cfg.n_ctx)
    prev = mechanisms.previous_token_scores(model, filler)
    ind = mechanisms.induction_scores(model, batch)
    (pl, ph, ps), (il, ih, iscore) = mechanisms.circuit_heads(prev, ind)
    acc = mechanisms.accuracies(model, batch)
    ablated = mechanisms.accuracies(model, batch, ablate_heads=[(il, ih)])
    ablated_prev = mechanisms.accuracies(model, batch, ablate_heads=[(pl, ph)])
    return {
        "accuracy": acc,
        "previous_token_head": [pl, ph, round(ps, 4)],
        "induction_head": [il, ih, round(iscore, 4)],
        "previous_token_scores": [[round(x, 4) for x in row] for row in prev.tolist()],
        "induction_scores": [[round(x, 4) for x in row] for row in ind.tolist()],
        "accuracy_induction_head_ablated": ablated,
        "accuracy_previous_token_head_ablated": ablated_prev,
    }


def masked_loss(model: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the masked positions (unembedding only those)."""
    resid = model(tokens, stop_at_layer=model.cfg.n_layers)  # [batch, pos, d_model]
    mask = mask.clone()
    mask[:, -1] = False
    x = model.ln_final(resid[mask][None])[0]  # [n_masked, d_model]
    logits = x @ model.W_U + model.b_U
    targets = tokens[:, 1:][mask[:, :-1]]
    return torch.nn.functional.cross_entropy(logits, targets)


def train_model(
    out: Path, arch: dict, recipe: dict, data_cfg: SyntheticConfig, init: Path | None = None
) -> dict:
    torch.manual_seed(MODEL_SEED)
    tokenizer = wrap_tokenizer(build_backend_tokenizer())
    model = HookedTransformer(model_config(arch), tokenizer=tokenizer)
    if init is not None:
        model.load_state_dict(load_model_from(init).state_dict())
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=recipe["lr"],
        betas=recipe["betas"],
        weight_decay=recipe["weight_decay"],
    )
    t0 = time.time()
    log = []
    bar = tqdm(range(recipe["steps"]), desc="model", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        batch = generate(recipe["batch_size"], TRAIN_DATA_SEED + step, data_cfg)
        loss = masked_loss(model, batch.tokens, batch.loss_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["grad_clip"])
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if (step + 1) % recipe.get("eval_every", 500) == 0 or step + 1 == recipe["steps"]:
            model.eval()
            m = evaluate_model(model, data_cfg, n=64)
            model.train()
            entry = {"step": step + 1, "loss": round(loss.item(), 4), "time_s": time.time() - t0}
            entry.update({k: m[k] for k in ("accuracy", "previous_token_head", "induction_head")})
            entry["ablated"] = m["accuracy_induction_head_ablated"]
            log.append(entry)
            print(json.dumps(entry), flush=True)
    model.eval()
    wall = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "model_config.json").write_text(json.dumps(arch, indent=2) + "\n")
    build_backend_tokenizer().save(str(out / "tokenizer.json"))
    metrics = evaluate_model(model, data_cfg)
    metrics.update(
        {"wall_time_s": round(wall, 1), "recipe": recipe, "log": log, "data": vars(data_cfg)}
    )
    (out / "model_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def transcoder_configs(n_tokens: int | None = None) -> dict[str, TrainingConfig]:
    """The shipped transcoders' training configurations, by kind (``n_tokens`` overrides)."""
    configs = {}
    for kind in TC_KINDS:
        recipe = dict(TRANSCODER_RECIPE[kind])
        if n_tokens is not None:
            recipe["n_tokens"] = n_tokens
        configs[kind] = TrainingConfig(kind=kind, **recipe)
    return configs


def train_default_transcoders(out: Path, n_tokens: int | None = None) -> dict:
    """Train both transcoder kinds on the saved model; save into ``out/{kind}``."""
    model = load_model_from(out)
    data = generate(TC_TRAIN_SEQUENCES, TC_DATA_SEED, data_config(out))
    evaluation = generate(TC_EVAL_SEQUENCES, TC_EVAL_SEED, data_config(out))
    metrics = {}
    for kind, cfg in transcoder_configs(n_tokens).items():
        t0 = time.time()
        result = train_transcoders(model, data.tokens, cfg, progress=True)
        wall = time.time() - t0
        target = out / kind
        if target.exists():
            shutil.rmtree(target)
        result.transcoders.save(target)
        report = evaluate_transcoders(model, result.transcoders, evaluation.tokens)
        metrics[kind] = {
            "config": cfg.to_dict(),
            "wall_time_s": round(wall, 1),
            "evaluation": report.to_dict(),
        }
        print(kind, json.dumps(metrics[kind]["evaluation"]), flush=True)
    (out / "transcoder_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def spliced_logits_fn(model: HookedTransformer, transcoders: Transcoders):
    """tokens -> logits of the model with every MLP output replaced by its transcoder's
    reconstruction from the live MLP input (no error terms)."""
    install_mlp_input_hooks(model)

    def run(tokens: torch.Tensor) -> torch.Tensor:
        with model.hooks(fwd_hooks=replacement_hooks(transcoders)):
            return model(tokens)

    return run


def make_card(out: Path) -> dict:
    """Measure the saved model and transcoders on fresh data; write ``card.json``."""
    model = load_model_from(out)
    data_cfg = data_config(out)
    measured = evaluate_model(model, data_cfg, n=CARD_SEQUENCES, seed=CARD_DATA_SEED)
    batch = generate(CARD_SEQUENCES, CARD_DATA_SEED, data_cfg)
    with torch.no_grad():
        clean = model(batch.tokens)
    fact_layers = mechanisms.mlp_ablation_accuracies(model, batch)
    model_metrics = json.loads((out / "model_metrics.json").read_text())
    tc_metrics = json.loads((out / "transcoder_metrics.json").read_text())
    transcoders = {}
    for kind in TC_KINDS:
        tcs = load_transcoders_from(out, kind)
        fn = spliced_logits_fn(model, tcs)
        with torch.no_grad():
            spliced = fn(batch.tokens)
        mask = batch.loss_mask
        graphs = {}
        for name, prompt in DEFAULT_PROMPTS.items():
            graph = AttributionGraph.build(model, tcs, prompt.text)
            pruned = graph.prune()
            full, small = graph.scores(), pruned.scores()
            graphs[name] = {
                "n_features": graph.nodes.count("feature"),
                "pruned_n_features": pruned.nodes.count("feature"),
                "replacement": round(full.replacement, 4),
                "completeness": round(full.completeness, 4),
                "pruned_replacement": round(small.replacement, 4),
                "pruned_completeness": round(small.completeness, 4),
            }
        ev = tc_metrics[kind]["evaluation"]
        transcoders[kind] = {
            "d_sae": tc_metrics[kind]["config"]["d_sae"],
            "config": tc_metrics[kind]["config"],
            "fvu": [round(x, 4) for x in ev["fvu"]],
            "l0": [round(x, 2) for x in ev["l0"]],
            "dead_fraction": [round(x, 4) for x in ev["dead_fraction"]],
            "ce_loss_original": round(ev["ce_loss_original"], 4),
            "ce_loss_replaced": round(ev["ce_loss_replaced"], 4),
            "wall_time_s": tc_metrics[kind]["wall_time_s"],
            "spliced_accuracy": mechanisms.accuracies(model, batch, logits_fn=fn),
            "spliced_agreement_predictable": round(mechanisms.agreement(clean, spliced, mask), 4),
            "spliced_agreement_all": round(
                mechanisms.agreement(clean, spliced, torch.ones_like(mask)), 4
            ),
            "graphs": graphs,
        }
    card = {
        "name": "tl_circuits default model",
        "architecture": json.loads((out / "model_config.json").read_text()),
        "vocabulary": {
            "size": VOCAB_SIZE,
            "entities": list(ENTITIES),
            "relations": list(RELATIONS),
            "attributes": {r: list(a) for r, a in ATTRIBUTES.items()},
            "n_fillers": len(filler_words()),
        },
        "facts": fact_table(),
        "data": model_metrics["data"],
        "training": {
            "recipe": model_metrics["recipe"],
            "seeds": {"model": MODEL_SEED, "train_data": TRAIN_DATA_SEED},
            "wall_time_s": model_metrics["wall_time_s"],
            "torch": torch.__version__,
        },
        "evaluation_data_seed": CARD_DATA_SEED,
        "evaluation_sequences": CARD_SEQUENCES,
        "previous_token_head": measured["previous_token_head"],
        "induction_head": measured["induction_head"],
        "previous_token_scores": measured["previous_token_scores"],
        "induction_scores": measured["induction_scores"],
        "accuracy": measured["accuracy"],
        "accuracy_induction_head_ablated": measured["accuracy_induction_head_ablated"],
        "accuracy_previous_token_head_ablated": measured["accuracy_previous_token_head_ablated"],
        "fact_accuracy_mlp_ablated": fact_layers,
        "fact_lookup_mlp_layers": [
            int(layer) for layer, acc in fact_layers.items() if acc["fact"] < 0.5
        ],
        "transcoders": transcoders,
        "prompts": {name: vars(p) for name, p in DEFAULT_PROMPTS.items()},
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=["model", "transcoders", "card", "all"], default="all")
    p.add_argument("--out", type=Path, default=DATA_DIR)
    p.add_argument("--steps", type=int, default=None, help="override the model's step count")
    p.add_argument("--layers", type=int, default=None, help="override n_layers (experiments)")
    p.add_argument("--lr", type=float, default=None, help="override the peak learning rate")
    p.add_argument("--batch", type=int, default=None, help="override the batch size")
    p.add_argument("--block", type=int, nargs=2, default=None, help="override block_len range")
    p.add_argument(
        "--short-blocks",
        action="store_true",
        help="train on synthetic.SHORT_BLOCKS (3-5 short repeated blocks; experiments)",
    )
    p.add_argument(
        "--skip-bigram",
        type=float,
        default=None,
        help="probability of the filler skip-bigram rule (SyntheticConfig.skip_bigram)",
    )
    p.add_argument("--init", type=Path, default=None, help="start from this model folder")
    p.add_argument("--tc-tokens", type=int, default=None, help="override transcoder n_tokens")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 avoids oversubscription on shared CPUs)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    arch = dict(ARCH)
    recipe = dict(MODEL_RECIPE)
    if args.layers is not None:
        arch["n_layers"] = args.layers
    if args.steps is not None:
        recipe["steps"] = args.steps
    if args.lr is not None:
        recipe["lr"] = args.lr
    if args.batch is not None:
        recipe["batch_size"] = args.batch
    data_cfg = SyntheticConfig(n_ctx=arch["n_ctx"])
    if args.short_blocks:
        data_cfg = replace(SHORT_BLOCKS, n_ctx=arch["n_ctx"])
    if args.block is not None:
        data_cfg = replace(data_cfg, block_len=tuple(args.block))
    if args.skip_bigram is not None:
        data_cfg = replace(data_cfg, skip_bigram=args.skip_bigram)
    if args.stage in ("model", "all"):
        metrics = train_model(args.out, arch, recipe, data_cfg, args.init)
        print(json.dumps({k: v for k, v in metrics.items() if k != "log"}, indent=1))
    if args.stage in ("transcoders", "all"):
        train_default_transcoders(args.out, args.tc_tokens)
    if args.stage in ("card", "all"):
        t0 = time.time()
        card = make_card(args.out)
        print(json.dumps({k: card[k] for k in ("accuracy", "induction_head", "transcoders")}))
        print(f"card: {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
