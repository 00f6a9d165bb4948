"""Generate a large MatMul-chain model with external data, for the large-model benchmark.

Each of ``--layers`` layers is ``MatMul(x, W[d, d]) + b -> Identity -> Mul(·, 1) -> Relu``: three of
its four nodes are removable by a lossless optimizer, and the weights (float32, ``d x d``) make the
size: 48 layers of 4096 x 4096 are 3 GiB. The weights are written to ``<out>.data`` one layer at a
time (page-aligned, as ``onnx.save`` with external data would lay them out), so generating an
8 GiB model needs no more memory than one layer.

    python tools/gen_chain.py --layers 48 --dim 4096 -o /tmp/big/chain3g.onnx
    python tools/gen_chain.py --gib 8 -o /tmp/big/chain8g.onnx

Weights are drawn from N(0, 1/d) with a fixed seed, so activations keep their scale through the
chain and validation compares meaningful numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

ALIGN = 4096


def _external(name: str, dims: list[int], location: str, offset: int, length: int
              ) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def generate(path: Path, layers: int, dim: int, seed: int = 0, batch: str | int = "batch") -> Path:
    """Write the chain to ``path`` and ``path.data``; returns ``path``.

    Raises:
        ValueError: ``layers`` or ``dim`` below 1.
    """
    if layers < 1 or dim < 1:
        raise ValueError(f"layers and dim must be at least 1, got {layers} and {dim}")
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    initializers.append(one)
    with open(path.parent / data_name, "wb") as data:
        current = "x"
        for i in range(layers):
            weight = rng.standard_normal((dim, dim), dtype=np.float32)
            weight *= np.float32(1.0 / np.sqrt(dim))
            bias = (rng.standard_normal(dim, dtype=np.float32) * np.float32(0.1))
            for name, array in ((f"W{i}", weight), (f"b{i}", bias)):
                offset = data.tell()
                data.write(array.tobytes())
                initializers.append(_external(name, list(array.shape), data_name, offset,
                                              array.nbytes))
                data.write(b"\0" * (-data.tell() % ALIGN))
            del weight
            nodes += [
                helper.make_node("MatMul", [current, f"W{i}"], [f"mm{i}"], name=f"matmul{i}"),
                helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"], name=f"add{i}"),
                helper.make_node("Identity", [f"add{i}"], [f"id{i}"], name=f"identity{i}"),
                helper.make_node("Mul", [f"id{i}", "one"], [f"mul{i}"], name=f"mul{i}"),
                helper.make_node("Relu", [f"mul{i}"], [f"relu{i}"], name=f"relu{i}")]
            current = f"relu{i}"
    graph = helper.make_graph(
        nodes, "matmul_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, dim])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [batch, dim])],
        initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="onnxopt tools/gen_chain.py")
    model.ir_version = 8
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", required=True, type=Path, help="model file to write")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--gib", type=float,
                        help="instead of --layers: as many layers as make this many GiB")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    layers = args.layers
    if args.gib is not None:
        layers = max(1, round(args.gib * 2**30 / (4 * args.dim * args.dim)))
    generate(args.output, layers, args.dim, args.seed)
    size = os.path.getsize(f"{args.output}.data")
    print(f"{args.output}: {layers} layers of {args.dim}x{args.dim}, "
          f"{size / 2**30:.2f} GiB of external data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
