"""Fuzzing saved graphs (issue 14): mutated files (tensor-file bytes, header JSON fields:
deleted, retyped, numbers changed) either load as the original graph (same nodes, edges
bit for bit) or raise TLCircuitsError, never another exception. Unsealed content (version
1, or version 2 re-sealed after the mutation) must load as a graph that saves and loads
again unchanged, or raise TLCircuitsError."""

from __future__ import annotations

import copy
import functools
import json
import math
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_graph_files import make_graph
from test_graph_integrity import causal_graph, graphs_equal, write_v1, write_v2

from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph.files import HEADER_FILE, load_graph, save_graph, tensor_path

SETTINGS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
GRAPHS = {"dense": functools.partial(make_graph, density=0.3), "causal": causal_graph}


@functools.cache
def saved(kind: str, single: bool) -> tuple[dict[str, bytes], str]:
    """The files of a saved graph: ``({name: bytes}, main file name)``."""
    root = Path(tempfile.mkdtemp())
    path = save_graph(GRAPHS[kind](), root / ("g.safetensors" if single else "g"))
    if single:
        return {path.name: path.read_bytes()}, path.name
    return {p.name: p.read_bytes() for p in path.iterdir()}, tensor_path(path).name


def materialise(files: dict[str, bytes], root: Path, single: bool) -> Path:
    folder = root / "g"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder / next(iter(files)) if single else folder


def check(path: Path, original) -> None:
    """Loading gives the original graph or the library's error, nothing else."""
    try:
        loaded = load_graph(path)
    except TLCircuitsError:
        return
    assert graphs_equal(original, loaded)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=4,
)


def json_paths(obj, prefix=()):
    """Every position in ``obj`` (a path of keys and indices)."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from json_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):  # (a few of each list)
            yield from json_paths(v, (*prefix, i))


def mutate_json(data, header: dict) -> dict:
    header = copy.deepcopy(header)
    paths = [p for p in json_paths(header) if p]
    path = data.draw(st.sampled_from(paths))
    parent = header
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    op = data.draw(st.sampled_from(["delete", "set", "number"]))
    value = parent[key]
    if op == "delete":
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    elif op == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
        change = data.draw(
            st.sampled_from(
                [lambda x: x + 1, lambda x: x - 1, lambda x: -x, lambda x: x * 2, float, str]
            )
        )
        parent[key] = change(value)
    else:
        parent[key] = data.draw(JSON_VALUES)
    return header


def _header_of(files: dict[str, bytes]) -> dict:
    return json.loads(files[HEADER_FILE])


@SETTINGS
@given(data=st.data(), kind=st.sampled_from(sorted(GRAPHS)), single=st.booleans())
def test_fuzz_tensor_file_bytes(data, kind, single):
    files, main = saved(kind, single)
    blob = bytearray(files[main])
    op = data.draw(st.sampled_from(["bytes", "truncate", "append"]))
    if op == "bytes":
        for _ in range(data.draw(st.integers(1, 3))):
            at = data.draw(st.integers(0, len(blob) - 1))
            blob[at] = data.draw(st.integers(0, 255))
    elif op == "truncate":
        del blob[data.draw(st.integers(0, len(blob) - 1)) :]
    else:
        blob += data.draw(st.binary(min_size=1, max_size=16))
    with tempfile.TemporaryDirectory() as root:
        path = materialise({**files, main: bytes(blob)}, Path(root), single)
        check(path, GRAPHS[kind]())


@SETTINGS
@given(data=st.data(), kind=st.sampled_from(sorted(GRAPHS)))
def test_fuzz_sealed_header(data, kind):
    files, _ = saved(kind, False)
    header = mutate_json(data, _header_of(files))
    with tempfile.TemporaryDirectory() as root:
        path = materialise({**files, HEADER_FILE: json.dumps(header).encode()}, Path(root), False)
        check(path, GRAPHS[kind]())


def _tensor_mutation(data, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = dict(tensors)
    name = data.draw(st.sampled_from(sorted(tensors)))
    t = tensors[name]
    op = data.draw(st.sampled_from(["drop", "shorten", "lengthen", "dtype", "value", "2d"]))
    if op == "drop":
        del tensors[name]
    elif op == "shorten":
        tensors[name] = t[:-1] if t.ndim else t
    elif op == "lengthen":
        tensors[name] = torch.cat([t, t[:1]]) if t.ndim and len(t) else t
    elif op == "dtype":
        tensors[name] = t.to(data.draw(st.sampled_from([torch.float64, torch.int32, torch.bool])))
    elif op == "2d":
        tensors[name] = t[None]
    elif t.numel():
        t = t.clone()
        value = data.draw(st.sampled_from([math.nan, math.inf, -1, 0, 3, 10**9, 2**62]))
        at = data.draw(st.integers(0, t.numel() - 1))
        t.reshape(-1)[at] = value if t.is_floating_point() or not isinstance(value, float) else 0
        tensors[name] = t
    return tensors


def _round_trips_or_refuses(path: Path) -> None:
    try:
        loaded = load_graph(path)
    except TLCircuitsError:
        return
    again = save_graph(loaded, path.parent / "again")
    assert graphs_equal(loaded, load_graph(again))


@SETTINGS
@given(
    data=st.data(),
    kind=st.sampled_from(sorted(GRAPHS)),
    version=st.sampled_from([1, 2]),
    what=st.sampled_from(["header", "tensors", "both"]),
)
def test_fuzz_unsealed_content(data, kind, version, what):
    """Content mutated, then sealed again (version 2) or written as version 1: what the
    meaning checks see. Version 1 has no causal blocks: those graphs are version 2 only."""
    files, main = saved(kind, False)
    header = _header_of(files)
    if version == 1 and header["adjacency"]["layout"] == "blocks":
        version = 2
    with tempfile.TemporaryDirectory() as root:
        path = materialise(files, Path(root), False)
        tensors = load_file(str(path / main))
        if what in ("header", "both"):
            header = mutate_json(data, header)
        if what in ("tensors", "both"):
            tensors = _tensor_mutation(data, tensors)
        try:
            (write_v1 if version == 1 else write_v2)(path, tensors, header)
        except (TLCircuitsError, TypeError, ValueError, RecursionError):
            return  # content the writer itself cannot encode (not a file to load)
        _round_trips_or_refuses(path)
