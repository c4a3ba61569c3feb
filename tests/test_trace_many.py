"""trace_many on a local Ray instance: graphs equal direct builds, faults, resumption.

One Ray instance (2 CPUs) serves the module; workers are kept between batches of the same
model (the runner's pool), so only the first batch of each model and each replaced worker
pay a worker's start (importing the package and loading the model: a few seconds).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tl_circuits.batch.prompts import BatchInputError, PromptSpec, prompt_specs, read_prompts
from tl_circuits.batch.results import read_results
from tl_circuits.batch.runner import import_ray, trace_many
from tl_circuits.batch.sources import ModelSource, load_source
from tl_circuits.batch.worker import TraceOptions, trace_one
from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph.graph import AttributionGraph

ray = pytest.importorskip("ray", reason="the distributed extra is not installed")

TESTS = Path(__file__).resolve().parent
N_GOOD = 20


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module; workers find the package and this module
    (for the loaders below) on PYTHONPATH."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS.parent), str(TESTS), old) if p)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def default_model():
    return load_source(ModelSource())


def good_prompts(model) -> list[dict]:
    """The default model's named prompts and random token-id prompts (4 to 14 tokens)."""
    from tl_circuits.default import DEFAULT_PROMPTS

    prompts = [{"id": name, "prompt": p.text} for name, p in DEFAULT_PROMPTS.items()]
    gen = torch.Generator().manual_seed(0)
    bos = model.tokenizer.bos_token_id
    while len(prompts) < N_GOOD:
        n = int(torch.randint(3, 14, (1,), generator=gen))
        ids = torch.randint(5, model.cfg.d_vocab, (n,), generator=gen).tolist()
        prompts.append({"id": f"r{len(prompts)}", "prompt": [bos, *ids]})
    prompts[4]["targets"] = [int(prompts[4]["prompt"][1]), [3, 4]]  # a token and a logit diff
    return prompts


BAD = [
    {"id": "empty", "prompt": ""},
    {"id": "too_long", "prompt": [1] * 65},  # n_ctx is 64
    {"id": "unknown_target", "prompt": "kana deko", "targets": ["zzzz-no-such-word"]},
]


@pytest.fixture(scope="module")
def batch20(ray_local, default_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch20")
    model, _ = default_model
    prompts = good_prompts(model)
    seen = []
    table = trace_many(
        [*prompts[:10], *BAD, *prompts[10:]],
        out_dir=out,
        workers=2,
        show_progress=False,
        on_result=seen.append,
        batch_size=32,
    )
    return out, prompts, table, seen


def assert_same_graph(a: AttributionGraph, b: AttributionGraph) -> None:
    for name in ("kind", "layer", "pos", "feature", "activation"):
        assert torch.equal(getattr(a.nodes, name), getattr(b.nodes, name)), name
    assert torch.equal(a.adjacency, b.adjacency)
    assert torch.equal(a.row_values, b.row_values)
    assert torch.equal(a.constants, b.constants)
    assert torch.equal(a.tokens, b.tokens)
    assert [t.label for t in a.targets] == [t.label for t in b.targets]


@pytest.fixture
def one_thread():
    """Direct builds with the workers' thread count (a worker of 1 CPU runs torch on 1
    thread; float sums split over another number of threads round differently)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_graph_equals_a_direct_build(batch20, default_model, one_thread) -> None:
    out, prompts, table, seen = batch20
    model, tcs = default_model
    assert list(table["id"]) == [p["id"] for p in [*prompts[:10], *BAD, *prompts[10:]]]
    complete = table[table["status"] == "complete"]
    assert len(complete) == N_GOOD and table["id"].is_unique
    assert sorted(r["id"] for r in seen) == sorted(table["id"])  # each answered once
    assert (complete["attempts"] == 1).all()
    for p in prompts:
        targets = p.get("targets")
        direct = AttributionGraph.build(
            model,
            tcs,
            p["prompt"],
            targets=[tuple(t) if isinstance(t, list) else t for t in targets] if targets else None,
            batch_size=32,
            show_progress=False,
        )
        folder = out / "graphs" / p["id"]
        assert_same_graph(AttributionGraph.load(folder / "graph"), direct)
        assert_same_graph(AttributionGraph.load(folder / "pruned"), direct.prune())
        row = complete[complete["id"] == p["id"]].iloc[0]
        assert row["n_nodes"] == direct.n_nodes and row["n_tokens"] == len(direct.tokens)
        assert row["replacement"] == pytest.approx(direct.scores().replacement)
        assert row["top_target"] == direct.node_label(int(direct.indices("target")[0]))
    assert not (out / "graphs" / "empty").exists()
    assert not any(p.name.startswith(".") for p in (out / "graphs").iterdir())
    assert read_results(out)["id"].tolist() == table["id"].tolist()


def test_bad_prompts_are_recorded_with_the_library_error(batch20) -> None:
    _, _, table, _ = batch20
    errors = dict(zip(table["id"], table["error"]))
    assert errors["empty"].startswith("PromptError: ") and "empty" in errors["empty"]
    assert errors["too_long"].startswith("PromptError: ") and "64" in errors["too_long"]
    assert errors["unknown_target"].startswith("TargetError: ")
    assert "zzzz-no-such-word" in errors["unknown_target"]
    failed = table[table["status"] == "failed"]
    assert sorted(failed["id"]) == sorted(b["id"] for b in BAD)


def test_recurrence_of_the_batch_counts_pruned_features(batch20) -> None:
    from tl_circuits.batch.recurrence import recurrence

    out, prompts, _, _ = batch20
    rec = recurrence(out)
    assert rec.n_graphs == N_GOOD
    counts: dict[tuple[int, int], set[str]] = {}
    for p in prompts:
        pruned = AttributionGraph.load(out / "graphs" / p["id"] / "pruned")
        for i in pruned.indices("feature").tolist():
            key = (int(pruned.nodes.layer[i]), int(pruned.nodes.feature[i]))
            counts.setdefault(key, set()).add(p["id"])
    got = {(r.layer, r.feature): set(r.prompts) for r in rec.features.itertuples()}
    assert got == counts
    assert rec.features["n_graphs"].is_monotonic_decreasing


def test_cli_trace_many_and_recurrence(ray_local, tmp_path: Path) -> None:
    from tl_circuits.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '"kana deko Alice lives_in"\n\n'
        + json.dumps({"id": "fact", "prompt": "gala dono fimi Judy plays"})
        + "\n"
    )
    out = tmp_path / "out"
    assert main(["trace-many", str(prompts), "--out", str(out), "--json", "--workers", "2"]) == 0
    table = read_results(out)
    assert table["id"].tolist() == ["1", "fact"] and (table["status"] == "complete").all()
    assert (out / "graphs" / "fact" / "graph.json").is_file()
    assert main(["recurrence", str(out)]) == 0
    assert (out / "recurrence.png").is_file() and (out / "recurrence_heads.parquet").is_file()
    prompts.write_text('{"id": "../up", "prompt": "kana"}\n')
    assert main(["trace-many", str(prompts), "--out", str(out)]) == 2


# ---- faults and resumption: a loader whose model kills its worker or logs its builds ----


def fault_loader(state: str, kill_once: tuple[str, ...], kill_always: tuple[str, ...]):
    """The default model with a pre-hook on its embedding that, on a clean run of one of
    the prompts named, kills the worker process (``kill_once``: only the first time, as
    a marker file in ``state`` records), and logs every run's tokens to ``state/log``."""
    model, tcs = load_source(ModelSource())
    once = {tuple(model.to_tokens(t)[0].tolist()) for t in kill_once}
    always = {tuple(model.to_tokens(t)[0].tolist()) for t in kill_always}
    state_dir = Path(state)

    def hook(_module, args):
        tokens = tuple(args[0][0].tolist())
        with open(state_dir / "log", "a") as f:
            f.write(json.dumps(tokens) + "\n")
        marker = state_dir / ("killed-" + "-".join(map(str, tokens)))
        if tokens in always or (tokens in once and not marker.exists()):
            marker.touch()
            os._exit(1)

    model.embed.register_forward_pre_hook(hook)
    return model, tcs


KILL_ONCE = "kana gita dama fera"
KILL_ALWAYS = "kana pipu bomo deko"
OTHERS = [
    "kana deko Alice lives_in",
    "gala dono fimi Judy plays",
    "kana gita dama fera buka pipu bomo deko gita dama",
    "kana fera buka",
    "kana bomo deko gala",
    "kana gala kelo fimi",
]


@pytest.fixture(scope="module")
def loader(tmp_path_factory):
    import functools

    state = tmp_path_factory.mktemp("fault_state")
    return state, functools.partial(fault_loader, str(state), (KILL_ONCE,), (KILL_ALWAYS,))


def log_lines(state: Path) -> list[str]:
    log = state / "log"
    return log.read_text().splitlines() if log.exists() else []


def runs_per_prompt(state: Path, model, texts: list[str], since: int = 0) -> dict[str, int]:
    """How many embedding runs the log holds for each prompt (from line ``since``)."""
    lines = log_lines(state)[since:]
    tokens = {json.dumps(model.to_tokens(t)[0].tolist()): t for t in texts}
    counts = dict.fromkeys(texts, 0)
    for line in lines:
        if line in tokens:
            counts[tokens[line]] += 1
    return counts


@pytest.fixture(scope="module")
def runs_per_build(loader, tmp_path_factory) -> int:
    """Embedding runs of one trace (counted in this process with the same loader)."""
    state, load = loader
    model, tcs = load()
    before = len(log_lines(state))
    spec = PromptSpec(id="probe", prompt=OTHERS[0])
    row = trace_one(model, tcs, spec, TraceOptions(), tmp_path_factory.mktemp("probe"))
    assert row["status"] == "complete"
    counted = runs_per_prompt(state, model, [OTHERS[0]], since=before)[OTHERS[0]]
    assert counted > 0
    return counted


def test_killed_worker_is_replaced_and_its_prompt_retried_once(
    ray_local, loader, runs_per_build, default_model, one_thread, tmp_path: Path
) -> None:
    _, load = loader
    texts = [OTHERS[0], KILL_ONCE, OTHERS[1], KILL_ALWAYS, OTHERS[2], OTHERS[3]]
    prompts = [{"id": f"p{i}", "prompt": t} for i, t in enumerate(texts)]
    table = trace_many(prompts, loader=load, out_dir=tmp_path, workers=2, show_progress=False)
    assert table["id"].tolist() == [p["id"] for p in prompts]  # none lost, none twice
    by_id = table.set_index("id")
    assert by_id.loc["p1", "status"] == "complete" and by_id.loc["p1", "attempts"] == 2
    assert by_id.loc["p3", "status"] == "failed" and by_id.loc["p3", "attempts"] == 2
    assert by_id.loc["p3", "error"].startswith("WorkerDied: the worker tracing this prompt died")
    for i in (0, 2, 4, 5):
        assert by_id.loc[f"p{i}", "status"] == "complete"
        assert by_id.loc[f"p{i}", "attempts"] == 1
    model, tcs = default_model
    direct = AttributionGraph.build(model, tcs, KILL_ONCE, show_progress=False)
    assert_same_graph(AttributionGraph.load(tmp_path / "graphs" / "p1" / "graph"), direct)
    assert not (tmp_path / "graphs" / "p3").exists()
    records = sorted(p.stem for p in (tmp_path / "records").glob("*.json"))
    assert records == sorted(by_id.index)


def test_interrupted_batch_resumes_and_redoes_none(
    ray_local, loader, runs_per_build, default_model, tmp_path: Path
) -> None:
    state, load = loader
    model, _ = default_model
    texts = [*OTHERS, "kana dama fera", "kana buka pipu"]
    prompts = [{"id": f"q{i}", "prompt": t} for i, t in enumerate(texts)]
    before = len(log_lines(state))
    answered: list[str] = []

    def stop_after_three(row: dict) -> None:
        answered.append(row["id"])
        if len(answered) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trace_many(
            prompts,
            loader=load,
            out_dir=tmp_path,
            workers=2,
            show_progress=False,
            on_result=stop_after_three,
        )
    first = read_results(tmp_path)
    assert sorted(first.loc[first["status"] == "complete", "id"]) == sorted(answered)
    assert (first["status"] == "pending").sum() == len(prompts) - 3
    # a killed write: one finished folder loses its header, a temporary folder is left
    half = answered[0]
    (tmp_path / "graphs" / half / "graph" / "graph.json").unlink()
    leftover = tmp_path / "graphs" / f".tmp-{answered[1]}-0123456789ab"
    (leftover / "graph").mkdir(parents=True)

    middle = len(log_lines(state))
    table = trace_many(prompts, loader=load, out_dir=tmp_path, workers=2, show_progress=False)
    assert (table["status"] == "complete").all() and table["id"].is_unique
    assert not leftover.exists()
    rerun = runs_per_prompt(state, model, texts, since=middle)
    for p in prompts:  # the rerun builds each prompt not done exactly once, none done
        expected = 0 if p["id"] in answered[1:] else runs_per_build
        assert rerun[p["prompt"]] == expected, p["id"]
    total = runs_per_prompt(state, model, texts, since=before)
    for p in prompts:  # over both runs: the three answered ones once (one redone: twice)
        if p["id"] in answered:
            assert total[p["prompt"]] == runs_per_build * (2 if p["id"] == half else 1)
    AttributionGraph.load(tmp_path / "graphs" / half / "graph")  # complete again
    # a third run finds everything done: nothing is built
    last = len(log_lines(state))
    trace_many(prompts, loader=load, out_dir=tmp_path, workers=2, show_progress=False)
    assert len(log_lines(state)) == last
    # a changed prompt has another key: only it is traced again
    changed = [{**prompts[0], "prompt": "kana dama buka"}, *prompts[1:]]
    table = trace_many(changed, loader=load, out_dir=tmp_path, workers=2, show_progress=False)
    assert table.loc[0, "n_tokens"] == 4 and (table["status"] == "complete").all()
    runs = runs_per_prompt(state, model, [*texts, "kana dama buka"], since=last)
    assert runs == {**dict.fromkeys(texts, 0), "kana dama buka": runs_per_build}


# ---- without Ray: input checks and the install message ----


def test_missing_ray_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(TLCircuitsError, match=r"pip install 'tl_circuits\[distributed\]'"):
        import_ray()
    with pytest.raises(TLCircuitsError, match=r"pip install 'tl_circuits\[distributed\]'"):
        trace_many(["kana deko"], out_dir=tmp_path)
    assert not (tmp_path / "graphs").exists()


def test_bad_source_fails_before_any_work(tmp_path: Path) -> None:
    from tl_circuits.batch.sources import SourceError

    with pytest.raises(SourceError, match="needs --model"):
        trace_many(["kana deko"], transcoders=str(tmp_path), out_dir=tmp_path / "out")
    with pytest.raises(TLCircuitsError, match="targets are given per prompt"):
        trace_many(["kana deko"], out_dir=tmp_path / "out", targets=["deko"])
    assert not (tmp_path / "out").exists()


def test_prompts_files_and_ids(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(
        '"first"\n\n{"id": 7, "prompt": [1, 2]}\n{"id": "x", "prompt": "a", "targets": ["b"]}\n'
    )
    specs = read_prompts(path)
    assert [(s.id, s.prompt, s.targets) for s in specs] == [
        ("1", "first", None),
        ("7", [1, 2], None),
        ("x", "a", ["b"]),
    ]
    assert [s.id for s in prompt_specs(["a", torch.tensor([1, 2])])] == ["1", "2"]
    bad_lines = {
        '{"id": "../x", "prompt": "a"}': "cannot name the prompt's folder",
        '{"id": ".hidden", "prompt": "a"}': "starts with a dot",
        '{"id": "a/b", "prompt": "a"}': "characters outside",
        '{"prompt": "a", "colour": 1}': "unknown fields",
        '{"id": "a"}': "no 'prompt'",
        "[1, 2]": "a list",
        "{nope": "not JSON",
        '{"id": "A", "prompt": "a"}\n{"id": "a", "prompt": "b"}': "given twice",
    }
    for text, message in bad_lines.items():
        path.write_text(text + "\n")
        with pytest.raises(BatchInputError, match=message):
            read_prompts(path)
