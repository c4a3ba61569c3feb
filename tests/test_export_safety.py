"""Exports under hostile inputs (issue 14, exports): slugs that would escape their directory
or clobber the index, destinations that are not regular files, the umask, indexes of the
wrong shape, temporaries of interrupted writes, and token strings that break matplotlib or
XML. Graphs are hand-made (``make_graph`` of test_graph_files), no model is run."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_graph_files import make_graph

from tl_circuits.errors import TLCircuitsError
from tl_circuits.export.frontend import export_json
from tl_circuits.export.picture import display_text, save_graph_picture
from tl_circuits.graph.files import load_graph, save_graph
from tl_circuits.graph.frontend import (
    INDEX_FILE,
    MAX_SLUG_LENGTH,
    SLUG_PATTERN,
    check_slug,
    derived_slug,
    frontend_json,
)
from tl_circuits.storage import (
    _tmp_prefix,
    check_writable,
    locked,
    write_atomically,
    write_safetensors,
    write_text,
)

HASH = r"-[0-9a-f]{8}"


def _tree(root: Path) -> set[str]:
    """Every path under ``root`` (relative), hidden ones included."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ---- slugs ------------------------------------------------------------------------------

#: explicit slugs refused: (slug, what the error says)
BAD_SLUGS = [
    ("../evil", "characters outside"),
    ("..", "starts with a dot"),
    ("/tmp/x", "characters outside"),
    ("a/b", "characters outside"),
    ("a\\b", "characters outside"),
    (INDEX_FILE.removesuffix(".json"), "index"),
    ("GRAPH-METADATA", "index"),
    ("", "empty"),
    (".hidden", "starts with a dot"),
    ("a" * (MAX_SLUG_LENGTH + 1), "more than 100"),
    ("a" * 300, "more than 100"),
    ("a\x00b", "characters outside"),
    ("café", "characters outside"),
    ("a b", "characters outside"),
    ("a\nb", "characters outside"),
    ("\ud800", "characters outside"),
]
#: explicit slugs accepted as they are
GOOD_SLUGS = ["a", "my-graph", "Graph_2.v1", "a" * MAX_SLUG_LENGTH, "graph-metadata-2", "-x"]


@pytest.mark.parametrize(("slug", "error"), BAD_SLUGS)
def test_bad_explicit_slug_refused_and_nothing_written(tmp_path, slug, error):
    site = tmp_path / "site"
    site.mkdir()
    (site / INDEX_FILE).write_text('{"graphs": []}')
    before = _tree(tmp_path)
    graph = make_graph()
    with pytest.raises(TLCircuitsError, match=error):
        graph.to_json(site, slug=slug)
    with pytest.raises(TLCircuitsError, match=error):
        export_json(graph, tmp_path / "file.json", slug=slug)
    with pytest.raises(TLCircuitsError, match=error):
        frontend_json(graph, slug=slug)  # no file: still not a slug Neuronpedia takes
    assert _tree(tmp_path) == before
    assert json.loads((site / INDEX_FILE).read_text()) == {"graphs": []}


@pytest.mark.parametrize("slug", GOOD_SLUGS)
def test_good_explicit_slug_names_the_file(tmp_path, slug):
    frontend_json(make_graph(), tmp_path, slug=slug)
    assert json.loads((tmp_path / f"{slug}.json").read_text())["metadata"]["slug"] == slug
    assert [g["slug"] for g in json.loads((tmp_path / INDEX_FILE).read_text())["graphs"]] == [slug]


#: untrusted info["slug"] (a loaded graph's) -> the file name written in the directory
DERIVED_FROM_INFO = [
    ("../evil", "evil" + HASH),
    ("../../../../tmp/x", "tmp-x" + HASH),
    ("/tmp/x", "tmp-x" + HASH),
    (INDEX_FILE.removesuffix(".json"), "graph-metadata" + HASH),
    ("", "graph" + HASH),
    (".hidden", "hidden" + HASH),
    ("..", "graph" + HASH),
    ("a" * 300, "a" * 60 + HASH),
    ("a\x00b", "a-b" + HASH),
    ("café", "caf" + HASH),
    ("\ud800", "graph" + HASH),
    ("fine-slug", "fine-slug"),
]


@pytest.mark.parametrize(("info_slug", "name"), DERIVED_FROM_INFO)
def test_untrusted_info_slug_is_sanitised(tmp_path, info_slug, name):
    graph = make_graph()
    graph.info["slug"] = info_slug
    site = tmp_path / "a" / "site"
    site.mkdir(parents=True)
    doc = frontend_json(graph, site)
    slug = doc["metadata"]["slug"]
    assert re.fullmatch(name, slug), slug
    assert SLUG_PATTERN.fullmatch(slug) and len(slug) <= MAX_SLUG_LENGTH
    # only the graph file, the index and its lock, all inside the directory
    assert _tree(tmp_path) == {
        "a",
        "a/site",
        f"a/site/{slug}.json",
        f"a/site/{INDEX_FILE}",
        "a/site/.graph-metadata.json.lock",
    }
    assert json.loads((site / INDEX_FILE).read_text())["graphs"][0]["slug"] == slug


def test_loaded_graph_cannot_choose_where_to_write(tmp_path):
    graph = make_graph()
    graph.info["slug"] = "../../escaped"
    save_graph(graph, tmp_path / "untrusted.safetensors")
    loaded = load_graph(tmp_path / "untrusted.safetensors")
    assert loaded.info["slug"] == "../../escaped"
    site = tmp_path / "deep" / "site"
    site.mkdir(parents=True)
    loaded.to_json(site)
    assert not (tmp_path / "escaped.json").exists()
    assert [p.name for p in site.glob("*.json") if p.name != INDEX_FILE] == [
        f"{loaded.to_json()['metadata']['slug']}.json"
    ]
    # a file path given: written there, info["slug"] does not matter
    loaded.to_json(tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text())["metadata"]["slug"] == "out"


def test_file_stem_is_sanitised_into_the_slug(tmp_path):
    doc = make_graph().to_json(tmp_path / "my graph (v2).json")
    assert (tmp_path / "my graph (v2).json").is_file()  # the path the user chose
    assert re.fullmatch("my-graph-v2" + HASH, doc["metadata"]["slug"])


#: prompts -> derived slugs; all different, every one valid
PROMPTS = [
    "Hello, world",
    "hello world",
    "HELLO WORLD!",
    "",
    "   ",
    "$\\frac{$",
    "\ud800 lone",
    "\x00\x01",
    "日本語",
    "x" * 500,
]


def test_prompts_that_reduce_alike_do_not_overwrite_each_other(tmp_path):
    graph = make_graph()
    slugs = []
    for prompt in PROMPTS:
        graph.info["prompt"] = prompt
        slugs.append(frontend_json(graph, tmp_path)["metadata"]["slug"])
    assert len(set(slugs)) == len(PROMPTS)
    assert all(SLUG_PATTERN.fullmatch(s) and len(s) <= MAX_SLUG_LENGTH for s in slugs)
    assert re.fullmatch("hello-world" + HASH, slugs[0]) and re.fullmatch("graph" + HASH, slugs[3])
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert sorted(g["slug"] for g in index["graphs"]) == sorted(slugs)
    for s, prompt in zip(slugs, PROMPTS, strict=True):
        assert json.loads((tmp_path / f"{s}.json").read_text())["metadata"]["prompt"] == prompt
    # the same prompt again replaces its own entry (same slug), nothing else
    graph.info["prompt"] = PROMPTS[0]
    frontend_json(graph, tmp_path)
    assert len(json.loads((tmp_path / INDEX_FILE).read_text())["graphs"]) == len(PROMPTS)


def test_slug_helpers():
    assert check_slug("ok") == "ok"
    with pytest.raises(TLCircuitsError, match="not a string"):
        check_slug(3)
    assert derived_slug("ok") == "ok"
    assert derived_slug("ok", from_prompt=True) != "ok"
    assert derived_slug("a/b") != derived_slug("a b") != derived_slug("a-b")


# ---- destinations that are not regular files ---------------------------------------------


def test_dev_null_refused():
    # only checked, never written: a bug here must not replace the device node
    with pytest.raises(TLCircuitsError, match="character device"):
        check_writable("/dev/null")


def _writers(graph):
    """Every writer of the package, each writing ``path`` (a file path)."""
    return {
        "write_text": lambda p: write_text(p, "x"),
        "write_safetensors": lambda p: write_safetensors({"a": torch.ones(2)}, p, {}),
        "to_json": lambda p: graph.to_json(p),
        "save_graph": lambda p: save_graph(graph, p),
        "picture": lambda p: save_graph_picture(graph, p.with_suffix(""), formats=("svg",)),
    }


@pytest.mark.parametrize(
    "writer", ["write_text", "write_safetensors", "to_json", "save_graph", "picture"]
)
def test_non_regular_destinations_refused(tmp_path, writer):
    write = _writers(make_graph())[writer]
    suffix = {"write_safetensors": ".safetensors", "save_graph": ".safetensors"}.get(
        writer, ".svg" if writer == "picture" else ".json"
    )
    fifo = tmp_path / f"fifo{suffix}"
    os.mkfifo(fifo)
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("keep me")
    link = tmp_path / f"link{suffix}"
    link.symlink_to(elsewhere)
    dangling = tmp_path / f"dangling{suffix}"
    dangling.symlink_to(tmp_path / "nowhere")
    cases = [(fifo, "FIFO"), (link, "symbolic link"), (dangling, "symbolic link")]
    if writer in ("write_text", "write_safetensors", "picture"):
        folder = tmp_path / f"folder{suffix}"
        folder.mkdir()
        cases.append((folder, "a directory"))
    for path, what in cases:
        with pytest.raises(TLCircuitsError, match=what):
            write(path)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert link.is_symlink() and elsewhere.read_text() == "keep me"
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_missing_directory_named(tmp_path):
    with pytest.raises(TLCircuitsError, match="missing"):
        write_text(tmp_path / "no" / "file.json", "x")


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_get_the_umask_mode(tmp_path, mask):
    graph = make_graph()
    old = os.umask(mask)
    try:
        written = [
            *save_graph_picture(graph, tmp_path / "pic", formats=("svg", "png")),
            save_graph(graph, tmp_path / "g.safetensors"),
        ]
        graph.to_json(tmp_path / "g.json")
        graph.to_json(tmp_path, slug="in-dir")
        write_text(tmp_path / "t.txt", "x")
        written += [tmp_path / n for n in ("g.json", "in-dir.json", INDEX_FILE, "t.txt")]
        # replacing an existing file gives the same mode
        write_text(tmp_path / "t.txt", "y")
    finally:
        os.umask(old)
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


# ---- the directory index -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("[1, 2]", "not a graph index"),
        ('{"graphs": {}}', "not a graph index"),
        ('{"other": []}', "not a graph index"),
        ('{"graphs": [1]}', "entry 0"),
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
    ],
)
def test_index_of_the_wrong_shape_raises_and_nothing_is_written(tmp_path, content, error):
    (tmp_path / INDEX_FILE).write_text(content)
    with pytest.raises(TLCircuitsError, match=error):
        make_graph().to_json(tmp_path, slug="new")
    assert (tmp_path / INDEX_FILE).read_text() == content
    assert not (tmp_path / "new.json").exists()


def test_index_that_is_not_a_file(tmp_path):
    (tmp_path / INDEX_FILE).mkdir()
    with pytest.raises(TLCircuitsError, match="directory"):
        make_graph().to_json(tmp_path, slug="new")
    assert not (tmp_path / "new.json").exists()
    other = tmp_path / "other"
    other.mkdir()
    os.mkfifo(other / INDEX_FILE)
    with pytest.raises(TLCircuitsError, match="FIFO"):
        make_graph().to_json(other, slug="new")
    assert not (other / "new.json").exists()
    third = tmp_path / "third"
    third.mkdir()
    (third / ".graph-metadata.json.lock").mkdir()
    with pytest.raises(TLCircuitsError, match="lock file"):
        make_graph().to_json(third, slug="new")
    assert not (third / "new.json").exists()


def test_graph_file_destination_checked_before_the_index_changes(tmp_path):
    (tmp_path / "taken.json").mkdir()
    with pytest.raises(TLCircuitsError, match="directory"):
        make_graph().to_json(tmp_path, slug="taken")
    assert not (tmp_path / INDEX_FILE).exists()


def test_lock_is_exclusive(tmp_path):
    lock = tmp_path / "x.lock"
    with locked(lock):
        probe = (
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "except BlockingIOError:\n    sys.exit(3)\n"
        )
        assert subprocess.run([sys.executable, "-c", probe, str(lock)]).returncode == 3
    assert subprocess.run([sys.executable, "-c", probe, str(lock)]).returncode == 0


# ---- temporaries ---------------------------------------------------------------------------


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "g.svg"
    target.write_text("old")

    def half(tmp: str) -> None:
        Path(tmp).write_text("<svg")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomically(target, half)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["g.svg"]


def test_failed_picture_leaves_old_files(tmp_path, monkeypatch):
    graph = make_graph()
    old = save_graph_picture(graph, tmp_path / "g", formats=("svg", "png"))
    contents = [p.read_bytes() for p in old]
    from matplotlib.figure import Figure

    def broken(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG partial")
        raise OSError("killed mid-render")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="mid-render"):
        save_graph_picture(graph, tmp_path / "g", formats=("svg", "png"))
    assert [p.read_bytes() for p in old] == contents
    assert sorted(os.listdir(tmp_path)) == ["g.png", "g.svg"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_next_write_removes_temporaries_of_dead_writers(tmp_path):
    """A SIGKILLed writer cannot remove its temporary; the next successful write of the same
    target removes it (it names its host and process), and keeps those of live writers."""
    target = tmp_path / "graph.json"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        dead = tmp_path / f"{_tmp_prefix(target.name, _dead_pid())}abcd1234.tmp"
        live = tmp_path / f"{_tmp_prefix(target.name, sleeper.pid)}abcd1234.tmp"
        mine = tmp_path / f"{_tmp_prefix(target.name)}abcd1234.tmp"
        other_host = tmp_path / f".graph.json.0000zzzz.{_dead_pid()}.abcd1234.tmp"
        other_target = tmp_path / f"{_tmp_prefix('other.json', _dead_pid())}abcd1234.tmp"
        for p in (dead, live, mine, other_host, other_target):
            p.write_text("partial")
        write_text(target, "{}")
        assert not dead.exists()
        assert live.exists() and mine.exists() and other_host.exists() and other_target.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_long_target_names_get_short_temporaries(tmp_path):
    target = tmp_path / ("n" * 250)
    write_text(target, "x")
    assert target.read_text() == "x"


# ---- picture text --------------------------------------------------------------------------

HOSTILE_TOKENS = [
    "$\\frac{$",
    "\ud800",
    "a\x00b\x01",
    "$x$",
    "\x7f\x85\x1b[31m",
    "\ufffe<&>\uffff",
]


def test_hostile_token_strings_give_valid_svg(tmp_path):
    graph = make_graph()
    t0, t1 = graph.targets
    graph = replace(
        graph,
        token_strings=HOSTILE_TOKENS,
        targets=[replace(t0, label="$\\sqrt{\udfff\x02$"), replace(t1, label="$}$ \x03")],
        info={**graph.info, "prompt": "$\\frac{$ \ud800\x00 \x1b[0m $$"},
    )
    svg, png = save_graph_picture(graph, tmp_path / "hostile", formats=("svg", "png"))
    root = ET.parse(svg).getroot()  # raises on invalid XML
    text = "".join(root.itertext())
    assert "$\\frac{$" in text and "\\ud800" in text and "a\\x00b\\x01" in text
    assert "\\x7f\\x85\\x1b[31m" in text and "\\ufffe<&>\\uffff" in text
    assert "\\udfff\\x02" in text
    assert png.read_bytes()[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    # the title was given explicitly
    svg2 = save_graph_picture(graph, tmp_path / "t", formats=("svg",), title="$\\x$ \ud800")[0]
    assert "$\\x$ \\ud800" in "".join(ET.parse(svg2).getroot().itertext())


def test_display_text():
    assert display_text("a\nb\tc\r") == "a⏎b→c↵"
    assert display_text("\x00\ud800\uffff$") == "\\x00\\ud800\\uffff$"
    assert display_text("café 日本") == "café 日本"
