"""The package's layers point one way (docs/ARCHITECTURE.md): masking, utils < losses, architectures,
evaluation < data < trainers < the commands (cli, bench, demo, workflow, ...). A module may import from its
own layer's package and from lower layers only; losses and architectures, though on one level, do not import
each other (a network part must not depend on a loss, nor a loss on a network)."""
from __future__ import annotations

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nnunet_topomae")
LAYER = {"errors": 0, "masking": 0, "utils": 0, "losses": 1, "architectures": 1, "evaluation": 1, "data": 2,
         "trainers": 3, "ext_trainers": 4}
TOP = 4  # every other top-level module is a command or workflow (cli, bench, demo, workflow, distributed, ...)


def _part(module: str) -> str:
    """nnunet_topomae.losses.spatial -> losses; nnunet_topomae.cli -> cli"""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(part: str) -> int:
    return LAYER.get(part, TOP)


def _imports():
    for root, _, files in os.walk(PKG):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nnunet_topomae"):
                    if node.module == "nnunet_topomae":  # from nnunet_topomae import bench, demo: each a module
                        yield from ((rel, f"nnunet_topomae.{a.name}") for a in node.names)
                    else:
                        yield rel, node.module
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        if a.name.startswith("nnunet_topomae."):
                            yield rel, a.name


def test_the_walk_finds_the_package_imports():
    found = list(_imports())
    assert ("nnunet_topomae.architectures.topomae_net", "nnunet_topomae.architectures.vit3d") in found
    # every name of a "from nnunet_topomae import a, b" counts, not only the first
    assert {("nnunet_topomae.cli", "nnunet_topomae.bench"), ("nnunet_topomae.cli", "nnunet_topomae.demo")} <= set(found)
    assert len(found) > 50


@pytest.mark.parametrize("src,dst", sorted(set(_imports())))
def test_imports_point_down(src, dst):
    a, b = _part(src), _part(dst)
    if a == b or not b:
        return
    assert _layer(b) <= _layer(a), f"{src} (layer {_layer(a)}) imports {dst} (layer {_layer(b)})"
    assert {a, b} != {"losses", "architectures"}, f"{src} imports {dst}: losses and architectures are independent"
