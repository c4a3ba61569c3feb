"""Hostile and malformed inputs to the library's entry points and the CLI (issue 14,
inputs and CLI): each gives a clear error of the library (or, for the CLI, one line and a
documented exit status) or a correct result, never a raw traceback or a silent ``<unk>``."""

from __future__ import annotations

import errno
import functools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tl_circuits.cli import main
from tl_circuits.default import load_default_model, load_default_transcoders
from tl_circuits.errors import PromptError, TLCircuitsError
from tl_circuits.graph import AttributionGraph
from tl_circuits.graph.targets import TargetError, resolve_targets
from tl_circuits.model.prompt import to_tokens
from tl_circuits.replacement.context import ReplacementContext
from tl_circuits.testing import random_model
from tl_circuits.training import CheckpointError, TrainingConfig, train_transcoders

FAST = ["--no-picture", "--head-edges", "0"]


@functools.cache
def default_model():
    return load_default_model()


@functools.cache
def default_ctx() -> ReplacementContext:
    return ReplacementContext(default_model(), load_default_transcoders(), "kana gita bomo")


# ---- prompts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([1.5, 2.5], r"token ids must be integers, got torch.float32"),
        ([[1, 2], [3, 4]], r"1-D sequence of token ids, got shape \(2, 2\)"),
        ([1, [2, 3]], r"not a 1-D sequence of integer token ids"),
        ([2**70], r"not a 1-D sequence of integer token ids"),
        ([True, False], r"must be integers, got torch.bool"),
        (b"kana bomo", r"the prompt is bytes; pass a str"),
        (bytearray(b"kana"), r"the prompt is bytes"),
        (["kana", "bomo"], r"sequence of strings"),
        (None, r"must be a str, a sequence of token ids or a 1-D integer tensor, got NoneType"),
        (5, r"got int 5"),
        ({"a": 1}, r"got dict"),
        ("kana \udcff bomo", r"character 5 is '\\udcff' \(the undecodable byte 0xff\)"),
        ("kana zzzz bomo qqq", r"2 word\(s\) the tokenizer does not know \('zzzz', 'qqq'\)"),
        ("5", r"does not know \('5'\)"),
        ("", r"the prompt is empty"),
        ([], r"the prompt is empty"),
    ],
    ids=lambda v: repr(v)[:30],
)
def test_bad_prompt_is_refused_clearly(prompt: object, message: str) -> None:
    with pytest.raises(PromptError, match=message) as info:
        to_tokens(default_model(), prompt)  # type: ignore[arg-type]
    assert len(str(info.value)) < 400  # never a dump of the model or the whole prompt


@pytest.mark.parametrize(
    ("prompt", "tokens"),
    [
        ("kana <unk> bomo", [1, None, 2, None]),  # the unknown token written out: on purpose
        ([1, 2, 5], [1, 2, 5]),  # ids may name <unk> (id 2) on purpose
        (np.array([1, 5]), [1, 5]),
        (torch.tensor([[1, 5]]), [1, 5]),
    ],
    ids=["literal-unk", "ids-with-unk", "numpy", "batch-of-one"],
)
def test_prompts_that_are_fine(prompt: object, tokens: list[int | None]) -> None:
    got = to_tokens(default_model(), prompt).tolist()  # type: ignore[arg-type]
    assert len(got) == len(tokens)
    assert all(t is None or t == g for t, g in zip(tokens, got, strict=True))


def test_bad_prompt_type_through_the_type_checked_context() -> None:
    """The public, runtime-type-checked constructor explains a bad prompt (it used to raise
    beartype's message with the whole model in it)."""
    with pytest.raises(PromptError, match="must be integers") as info:
        ReplacementContext(default_model(), load_default_transcoders(), [1.5, 2.5])  # type: ignore[arg-type]
    assert len(str(info.value)) < 200


def test_unknown_words_for_any_tokenizer_with_an_unknown_token(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2, "<unk>": 3} | {f"w{i}": i + 4 for i in range(9)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(tmp_path)
    model = random_model("gpt2")
    model.set_tokenizer(AutoTokenizer.from_pretrained(tmp_path))
    assert to_tokens(model, "w1 w2").tolist() == [0, 5, 6]
    with pytest.raises(PromptError, match=r"does not know \('nope'\).*'<unk>'"):
        to_tokens(model, "w1 nope w2")


# ---- targets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ([True], r"target True is a bool"),
        ([("bomo", False)], r"target False is a bool"),
        (["nosuchword"], r"'nosuchword' is not in the tokenizer's vocabulary.*'<unk>'"),
        (["5"], r"target '5' is not in the tokenizer's vocabulary.*--target-id"),
        (["bomo kana"], r"is 2 tokens"),
        ([""], r"target '' is empty"),
        (["bo\udcffmo"], r"cannot be tokenised: .*byte 0xff"),
        ([("bomo", "bomo")], r"both sides are token 73 \('bomo'\).*always 0"),
        ([(73, "bomo")], r"both sides are token 73"),
        ([5.0], r"cannot interpret target 5.0"),
        ([512], r"outside the vocabulary \[0, 512\)"),
        ("bomo", r"targets must be a list.*targets=\['bomo'\]"),
        (5, r"targets must be a list"),
        ([], r"targets is empty"),
    ],
    ids=lambda v: repr(v)[:30],
)
def test_bad_target_is_refused(targets: object, message: str) -> None:
    with pytest.raises(TargetError, match=message):
        resolve_targets(default_ctx(), targets)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("targets", "labels"),
    [
        ([5], ["Carol"]),
        ([np.int64(5)], ["Carol"]),
        (["<unk>"], ["<unk>"]),  # the unknown token named literally
        ([2], ["<unk>"]),
        ([("bomo", "kana")], ['"bomo" - "kana"']),
    ],
    ids=["int", "numpy-int", "literal-unk", "unk-id", "logit-diff"],
)
def test_targets_that_are_fine(targets: list, labels: list[str]) -> None:
    assert [t.label for t in resolve_targets(default_ctx(), targets)] == labels


# ---- the memory check ---------------------------------------------------------------


@pytest.mark.parametrize("limit", [float("nan"), float("inf"), -5, 0, "1000", True, [1]])
def test_bad_memory_limit_raises(limit: object) -> None:
    with pytest.raises(TLCircuitsError, match=r"memory_limit_bytes must be a positive finite"):
        AttributionGraph.build(
            default_model(),
            load_default_transcoders(),
            "kana bomo",
            show_progress=False,
            memory_limit_bytes=limit,  # type: ignore[arg-type]
        )


@pytest.mark.parametrize(
    ("limit", "batch_size", "says", "never"),
    [
        (1000, 64, ["the limit you set (memory_limit_bytes=1000)", "raise memory_limit_bytes"],
         ["available", "batch_size (now", "max_feature_nodes to"]),
        (30_000, 64, ["memory_limit_bytes=30000", "lower batch_size (now 64)"],
         ["available", "max_feature_nodes to"]),
        (2_500_000, 1, ["set max_feature_nodes to at most about", "(now 400)"],
         ["available", "lower batch_size"]),
    ],
)  # fmt: skip
def test_memory_refusal_names_the_limit_and_the_knobs(
    limit: int, batch_size: int, says: list[str], never: list[str]
) -> None:
    from tl_circuits.default import DEFAULT_PROMPTS

    budget = 400 if limit == 2_500_000 else None
    with pytest.raises(TLCircuitsError) as info:
        AttributionGraph.build(
            default_model(),
            load_default_transcoders(),
            DEFAULT_PROMPTS["induction"].text if budget else "kana bomo",
            show_progress=False,
            memory_limit_bytes=limit,
            batch_size=batch_size,
            max_feature_nodes=budget,
        )
    message = str(info.value)
    assert all(s in message for s in says), message
    assert not any(s in message for s in never), message


def test_memory_refusal_of_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tl_circuits.graph.build.available_memory_bytes", lambda device: 1000)
    with pytest.raises(
        TLCircuitsError, match=r"free memory of cpu is 9\.3e-07 GiB \(1,000 bytes\)"
    ) as info:
        AttributionGraph.build(
            default_model(), load_default_transcoders(), "kana bomo", show_progress=False
        )
    assert "memory_limit_bytes=" not in str(info.value)


# ---- the command line ---------------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--target", "nosuchword"], "'nosuchword' is not in the tokenizer's vocabulary"),
        (["--target", "5"], "target '5' is not in the tokenizer's vocabulary"),
        (["--logit-diff", "bomo", "bomo"], "logit with itself is always 0"),
        (["kana zzzz bomo"], "does not know ('zzzz')"),
        (["kana \udcff bomo"], "undecodable byte 0xff"),
        (["--fold-ln"], "--fold-ln does not apply to the embedded default model"),
        (["--device", "nosuch"], "--device: unknown device 'nosuch'"),
        (["--device", "cuda:99"], "device 'cuda:99'"),
        (["--device", "mps"] if not torch.backends.mps.is_available() else ["--target", "5"],
         "not available" if not torch.backends.mps.is_available() else "vocabulary"),
    ],
    ids=lambda v: repr(v)[:30],
)  # fmt: skip
def test_cli_refuses_bad_input(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, err = run_cli(["trace", *argv, "--out", str(tmp_path / "o"), *FAST], capsys)
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "o" / "graph").exists()


def test_cli_target_ids_and_words_keep_their_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["trace", "--target-id", "5", "--target", "bomo", "--out", str(tmp_path), *FAST]
    assert main(argv) == 0
    assert 'targets: Output "Carol" (p=' in capsys.readouterr().out
    graph = AttributionGraph.load(tmp_path / "graph")
    assert [t.label for t in graph.targets] == ["Carol", "bomo"]


def _no_build(*args: object, **kwargs: object) -> None:
    raise AssertionError("the model was loaded before the output folder was checked")


def _read_only(*args: object, **kwargs: object) -> None:
    raise OSError(errno.EROFS, "Read-only file system")


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("file", "exists and is not a folder"),
        ("under-file", "cannot create it"),
        ("read-only", "cannot write there (it would be created in"),
        ("read-only-existing", "cannot write there: Read-only file system"),
    ],
)
def test_cli_checks_the_output_folder_before_building(
    where: str,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "existing").mkdir()
    out = {
        "file": tmp_path / "file",
        "under-file": tmp_path / "file" / "sub",
        "read-only": tmp_path / "new" / "deeper",
        "read-only-existing": tmp_path / "existing",
    }[where]
    if where.startswith("read-only"):  # as root, permissions cannot make a folder read-only
        monkeypatch.setattr("tl_circuits.cli.options.tempfile.TemporaryFile", _read_only)
    monkeypatch.setattr("tl_circuits.cli.trace.load_source", _no_build)
    rc, err = run_cli(["trace", "--out", str(out), *FAST], capsys)
    assert rc == 2 and message in err and str(out) in err, err
    rc, err = run_cli(["train-transcoders", "--out", str(out)], capsys)
    assert rc == 2 and message in err, err


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostile_trace")
    assert main(["trace", "kana gita bomo", "--out", str(out), *FAST]) == 0
    return out


def test_heads_save_into_a_read_only_folder(
    traced: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("tl_circuits.cli.options.tempfile.TemporaryFile", _read_only)
    monkeypatch.setattr("tl_circuits.cli.heads.load_source", _no_build)
    rc, err = run_cli(["heads", str(traced), "--save", "--edges", "2"], capsys)
    assert rc == 2 and "Read-only file system" in err and "pruned" in err, err


def test_write_failure_after_the_build_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full_disk(self: object, path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(AttributionGraph, "save", full_disk)
    rc, err = run_cli(["trace", "kana bomo", "--out", str(tmp_path), *FAST], capsys)
    last = err.splitlines()[-1]  # after the build's progress bar
    assert rc == 1 and "Traceback" not in err, err
    assert last == (
        f"tl-circuits trace: error: cannot write or read {tmp_path / 'graph'}: "
        "No space left on device"
    )


def test_ctrl_c_prints_interrupted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupt(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("tl_circuits.cli.trace.load_source", interrupt)
    rc, err = run_cli(["trace", "--out", str(tmp_path), *FAST], capsys)
    assert (rc, err) == (130, "tl-circuits trace: error: interrupted")


@pytest.mark.parametrize("command", [[], ["trace"], ["heads"], ["train-transcoders"]])
def test_help_documents_the_exit_status(command: list[str], capsys) -> None:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    printed = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0 done; 1 a file could not be read or written" in printed
    assert "130 interrupted" in printed
    if command == ["trace"]:
        assert "--target 5 is the token '5'" in printed and "--target-id" in printed


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("budget", [[], ["--max-features", "100"]], ids=["full", "budget"])
def test_trace_in_half_precision(
    dtype: str, budget: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["trace", "--dtype", dtype, *budget, "--out", str(tmp_path), "--head-edges", "10"]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert 'targets: Output "bomo"' in printed and "nan" not in printed
    graph = AttributionGraph.load(tmp_path / "graph")
    assert torch.isfinite(graph.adjacency).all()
    assert 0.5 < graph.scores().replacement <= 1.0
    assert (tmp_path / "pruned" / "head_loadings.safetensors").is_file()
    assert (tmp_path / "graph.svg").is_file()


# ---- training inputs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.txt", b"kana\nbomo \xff\xfe", r"not UTF-8 text \(byte 0xff at offset 10, line 2\)"),
        ("bad.safetensors", b"\x00\x01garbage", r"not a readable \.safetensors file"),
        ("empty.safetensors", b"", r"not a readable \.safetensors file"),
    ],
)  # fmt: skip
def test_train_cli_bad_token_files(
    name: str, content: bytes, message: str, tmp_path: Path, capsys
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    rc, err = run_cli(
        ["train-transcoders", "--out", str(tmp_path / "o"), "--tokens", str(path)], capsys
    )
    assert rc == 2 and str(path) in err, err
    assert re.search(message, err), err


def test_train_cli_float_tokens(tmp_path: Path, capsys) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"tokens": torch.zeros(2, 8)}, str(path))
    rc, err = run_cli(
        ["train-transcoders", "--out", str(tmp_path / "o"), "--tokens", str(path)], capsys
    )
    assert rc == 2 and "must be an integer [n_seq, seq] tensor, got torch.float32" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fold-ln"], "--fold-ln does not apply to the embedded default model"),
        (["--device", "nosuch"], "unknown device 'nosuch'"),
    ],
)
def test_train_cli_bad_options(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    rc, err = run_cli(["train-transcoders", "--out", str(tmp_path), *argv], capsys)
    assert rc == 2 and message in err, err


D_VOCAB = 64


def _tiny():
    return random_model("gpt2", n_layers=2, d_model=32, d_vocab=D_VOCAB, n_ctx=32, seed=1)


def _cfg() -> TrainingConfig:
    return TrainingConfig(
        d_sae=16, batch_tokens=128, n_tokens=128 * 3, lr=1e-2, chunk_tokens=2048,
        device="cpu", checkpoint_every_tokens=128,
    )  # fmt: skip


def _tokens() -> torch.Tensor:
    return torch.randint(0, D_VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    train_transcoders(_tiny(), _tokens(), _cfg(), out, progress=False)
    assert (out / "checkpoint" / "state.json").is_file()
    return out


def _edit_state(root: Path, edit) -> None:
    path = root / "checkpoint" / "state.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _set(key: str, value: object):
    def edit(meta: dict) -> None:
        if value is ...:
            del meta[key]
        else:
            meta[key] = value

    return edit


def _truncate(root: Path) -> None:
    path = root / "checkpoint" / "weights.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _drop(key: str):
    def corrupt(root: Path) -> None:
        path = root / "checkpoint" / "weights.safetensors"
        tensors = load_file(str(path))
        if key == "adam-shape":
            name = next(k for k in tensors if k.endswith(".exp_avg"))
            tensors[name] = tensors[name].flatten()[:3].clone()
        else:
            del tensors[key]
        save_file(tensors, str(path))

    return corrupt


def _write(name: str, data: bytes):
    return lambda root: (root / "checkpoint" / name).write_bytes(data)


def _state(key: str, value: object):
    return lambda root: _edit_state(root, _set(key, value))


CORRUPTIONS = {
    "invalid-json": (_write("state.json", b"{not json"), "state.json: not valid JSON"),
    "not-utf8": (_write("state.json", b"\xff\xfe{}"), "state.json: not valid JSON"),
    "a-list": (_write("state.json", b"[]"), "expected a JSON object, got list"),
    "tokens_seen-str": (_state("tokens_seen", "x"), "'tokens_seen' must be int"),
    "step-missing": (_state("step", ...), "'step' is missing"),
    "step-negative": (_state("step", -1), "'step' must be >= 0"),
    "layers-str": (_state("layers", ["a", "b"]), "'layers' must be a list of ints"),
    "position-bad": (_state("position", {"chunk": 0}), "'position.row' must be"),
    "config-int": (_state("config", 5), "'config' must be dict"),
    "config-junk": (_state("config", {"d_sae": "many"}), "'config' is not valid"),
    "stats-list": (_state("stats", [1]), "'stats' must be dict or null"),
    "truncated-weights": (_truncate, "weights.safetensors: cannot read the checkpoint's weights"),
    "empty-weights": (_write("weights.safetensors", b""), "cannot read the checkpoint's weights"),
    "no-last-fired": (_drop("last_fired"), "'last_fired' must be a [2, d_sae] tensor, got nothing"),
    "adam-shape": (_drop("adam-shape"), "must have the parameter's shape"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_checkpoint(case: str, checkpoint_run: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    shutil.copytree(checkpoint_run, root)
    corrupt, message = CORRUPTIONS[case]
    corrupt(root)
    with pytest.raises(CheckpointError) as info:
        train_transcoders(_tiny(), _tokens(), _cfg(), root, resume=True, progress=False)
    assert message in str(info.value) and str(root / "checkpoint") in str(info.value)


def test_intact_checkpoint_resumes(checkpoint_run: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    shutil.copytree(checkpoint_run, root)
    train_transcoders(_tiny(), _tokens(), _cfg(), root, resume=True, progress=False)
