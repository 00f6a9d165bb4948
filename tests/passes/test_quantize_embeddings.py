"""Tests of passes/quantize_embeddings.py: Gather tables as int8 rows or int4 blocks, dequantized
after the Gather, compared with onnxruntime on the original model."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import zoo_files
from onnx import TensorProto, helper, numpy_helper

from onnxopt import optimize
from onnxopt.errors import UsageError
from onnxopt.graph import export_graph, import_graph
from onnxopt.pass_manager import PassContext, PassManager, verify_model
from onnxopt.passes._quant import quantize_symmetric
from onnxopt.passes.quantize_embeddings import (QuantizeEmbeddings, dequantize_int4_blocks,
                                                quantize_int4_blocks)

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, initializers, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _ids(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.INT64, shape)


def _f(name, shape=None):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _quantize(model, **options):
    graph = import_graph(model)
    record = PassManager([]).run_pass(QuantizeEmbeddings(**options), graph,
                                      PassContext(template=model))
    out = export_graph(graph, model)
    verify_model(out, "quantize_embeddings")
    return out, record


def _embedding(table_shape=(100, 64), ids_shape=(2, 5), opset=17):
    table = (RNG.normal(size=table_shape) * RNG.uniform(0.01, 2, (table_shape[0], 1)))
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"]),
             helper.make_node("Relu", ["e"], ["y"])]
    model = _model(nodes, [_ids("ids", list(ids_shape))], [_f("y")],
                   {"E": table.astype(np.float32)}, opset)
    feed = {"ids": RNG.integers(0, table_shape[0], size=ids_shape).astype(np.int64)}
    return model, feed, table.astype(np.float32)


def _float_initializers(model):
    return {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT
            and np.prod(i.dims) > 1000}


@pytest.mark.parametrize("ids_shape", [(2, 5), (7,), ()])
def test_int8_rows_match_onnxruntime_within_half_a_step(ids_shape):
    model, feed, table = _embedding(ids_shape=ids_shape)
    quantized, record = _quantize(model)
    assert record.modified and record.stats["tensors_quantized"] == 1
    assert record.stats["bytes_before"] == table.nbytes
    assert record.stats["bytes_after"] == table.size + 4 * table.shape[0]
    assert not _float_initializers(quantized)
    ops = [n.op_type for n in quantized.graph.node]
    # only the gathered rows are dequantized: no DequantizeLinear of the whole table
    assert "DequantizeLinear" not in ops and ops.count("Gather") == 2
    expected, = _run(model, feed)
    got, = _run(quantized, feed)
    step = np.abs(table).max(axis=1) / 127
    bound = step[feed["ids"]][..., None] / 2 * (1 + 1e-6)
    assert got.shape == expected.shape
    assert (np.abs(got - expected) <= bound).all()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block_size", [32, 16])
def test_int4_blocks_match_onnxruntime(block_size, symmetric):
    model, feed, table = _embedding()
    quantized, record = _quantize(model, bits=4, block_size=block_size, symmetric=symmetric)
    assert record.stats["tensors_quantized"] == 1
    blocks = table.size // block_size
    assert record.stats["bytes_after"] == table.size // 2 + (4 if symmetric else 5) * blocks
    assert not _float_initializers(quantized)
    expected, = _run(model, feed)
    got, = _run(quantized, feed)
    b = table.reshape(table.shape[0], -1, block_size)
    step = np.abs(b).max(axis=2) / 7 if symmetric else \
        (np.maximum(b.max(axis=2), 0) - np.minimum(b.min(axis=2), 0)) / 15
    bound = np.repeat(step, block_size, axis=1)[feed["ids"]] / 2 * (1 + 1e-5)
    assert (np.abs(got - expected) <= bound).all()
    # the proposal's value is what the runtime form computes
    value = dequantize_int4_blocks(*quantize_int4_blocks(table, block_size, symmetric))
    np.testing.assert_allclose(np.maximum(value[feed["ids"]], 0), got, rtol=0, atol=1e-6)


@pytest.mark.parametrize("contrib_ops", [False, True])
def test_small_tables_stay_int8_under_int4(contrib_ops):
    """A word table (300 rows) and a position table (16 rows) summed as in a transformer's
    embeddings: with ``eight_bit_rows=64`` the position table is stored as int8 rows and the
    word table as int4 blocks; onnxruntime's outputs equal the original run with the
    tables replaced by those values, and the int8 table's error is below int4's."""
    words = RNG.normal(size=(300, 64)).astype(np.float32)
    positions = RNG.normal(size=(16, 64)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["W", "ids"], ["w"]),
             helper.make_node("Gather", ["P", "pos"], ["p"]),
             helper.make_node("Add", ["w", "p"], ["y"])]
    model = _model(nodes, [_ids("ids", [2, 16]), _ids("pos", [16])], [_f("y")],
                   {"W": words, "P": positions})
    feed = {"ids": RNG.integers(0, 300, size=(2, 16)).astype(np.int64),
            "pos": np.arange(16, dtype=np.int64)}
    quantized, record = _quantize(model, bits=4, symmetric=False, eight_bit_rows=64,
                                  contrib_ops=contrib_ops)
    assert record.stats["tensors_quantized"] == 2
    assert "tables of at most 64 rows int8" in record.stats["scheme"] or contrib_ops
    assert not _float_initializers(quantized)
    types = {i.data_type for i in quantized.graph.initializer}
    assert TensorProto.INT8 in types  # the position table's codes
    q, scale = quantize_symmetric(positions, 0)
    hat = {"W": dequantize_int4_blocks(*quantize_int4_blocks(words, 32, False)),
           "P": q.astype(np.float32) * scale[:, None]}
    replaced = onnx.ModelProto()
    replaced.CopyFrom(model)
    del replaced.graph.initializer[:]
    replaced.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in hat.items())
    got, = _run(quantized, feed)
    np.testing.assert_allclose(got, _run(replaced, feed)[0], rtol=0, atol=1e-5)
    four_bit = dequantize_int4_blocks(*quantize_int4_blocks(positions, 32, False))
    assert np.abs(hat["P"] - positions).max() < 0.2 * np.abs(four_bit - positions).max()
    _, all_four = _quantize(model, bits=4, symmetric=False)
    assert all_four.stats["bytes_after"] < record.stats["bytes_after"]


def test_asymmetric_int4_is_closer_on_skewed_rows():
    table = RNG.uniform(0.0, 1.0, size=(20, 64)).astype(np.float32)  # one-signed blocks
    errors = [np.abs(dequantize_int4_blocks(*quantize_int4_blocks(table, 32, sym)) - table).max()
              for sym in (True, False)]
    assert errors[1] < 0.6 * errors[0]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("ids_shape", [(2, 5), ()])
def test_int4_contrib_gather_block_quantized_equals_standard_form(ids_shape, symmetric):
    model, feed, _ = _embedding(table_shape=(100, 48), ids_shape=ids_shape)  # 3 blocks: odd
    standard, _ = _quantize(model, bits=4, block_size=16, symmetric=symmetric)
    contrib, record = _quantize(model, bits=4, block_size=16, symmetric=symmetric,
                                contrib_ops=True)
    assert record.stats["scheme"].endswith("GatherBlockQuantized")
    assert [n.op_type for n in contrib.graph.node] == ["GatherBlockQuantized", "Relu"]
    assert not _float_initializers(contrib)
    np.testing.assert_allclose(_run(contrib, feed)[0], _run(standard, feed)[0], rtol=1e-6,
                               atol=1e-6)


def test_int4_packing_round_trips_every_code():
    table = np.tile(np.arange(-7, 8, dtype=np.float32), (3, 4))[:, :32] * 0.5
    packed, scale, zero_point = quantize_int4_blocks(table, 32)
    assert packed.dtype == np.uint8 and packed.shape == (3, 1, 16) and zero_point is None
    np.testing.assert_array_equal(dequantize_int4_blocks(packed, scale), table)


def test_table_with_another_reader_or_axis_is_refused():
    table = RNG.normal(size=(40, 40)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"]),
             helper.make_node("MatMul", ["e", "E"], ["y"]),
             helper.make_node("Gather", ["F", "ids"], ["z"], axis=1)]
    model = _model(nodes, [_ids("ids", [3])], [_f("y"), _f("z")],
                   {"E": table, "F": table.copy() + 1})
    quantized, record = _quantize(model)
    assert not record.modified
    assert record.stats["refused"] == {"also read outside a Gather table slot": 1,
                                       "Gather axis is not 0": 1}


def test_exclude_and_block_size_refusals():
    model, _, _ = _embedding(table_shape=(50, 48))
    _, record = _quantize(model, exclude=["Gather"])
    assert record.stats["refused"] == {"excluded by the user": 1}
    _, record = _quantize(model, bits=4, block_size=32)
    assert record.stats["refused"] == {"embedding dimension not a multiple of block_size": 1}
    # stored in 8 bits (eight_bit_rows), the table needs no whole int4 block
    _, record = _quantize(model, bits=4, block_size=32, eight_bit_rows=50)
    assert record.stats["tensors_quantized"] == 1


@pytest.mark.parametrize("options", [{"bits": 2}, {"block_size": 7}, {"min_elements": 0},
                                     {"bits": 4, "block_size": 24, "contrib_ops": True},
                                     {"eight_bit_rows": -1}])
def test_invalid_options(options):
    with pytest.raises(UsageError):
        QuantizeEmbeddings(**options)


def test_int8_weight_mode_quantizes_tables_end_to_end():
    model, feed, table = _embedding(table_shape=(1000, 64))
    optimized, report = optimize(model, quantize="int8-weight", inputs=[feed])
    assert report.validation.passed
    assert optimized.ByteSize() < 0.3 * model.ByteSize()


@pytest.mark.zoo
@pytest.mark.parametrize("mode,options,limit", [
    ("int8-weight", None, 0.27),
    ("int8-weight", {"quantize_embeddings": {"bits": 4}}, 0.22)])
def test_minilm_shrinks(mode, options, limit):
    path, inputs = zoo_files("minilm_l6")
    optimized, report = optimize(path, quantize=mode, options=options, inputs=inputs)
    assert report.validation.passed, report.validation.reason
    stats = next(r.stats for r in report.passes if r.name == "quantize_embeddings")
    assert stats["tensors_quantized"] >= 2
    assert optimized.ByteSize() <= limit * os.path.getsize(path)
