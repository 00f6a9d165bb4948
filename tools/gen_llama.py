"""Generate a Llama-architecture decoder with past key/values, as ONNX with external data.

A ``transformers`` ``LlamaForCausalLM`` with random weights (``torch.manual_seed(seed)``, the
library's own initialization: N(0, 0.02) for projections and embeddings, ones for RMSNorm), float32,
exported by ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``, opset 17): the
dynamo exporter needs ``onnxscript``, which is not installed, and the TorchScript one traces the
cache path as plain tensors. The graph has real rotary-embedding, RMSNorm, grouped-query attention
(``scaled_dot_product_attention`` lowered to MatMul/Softmax) and SwiGLU subgraphs. Opset 17 is
what exported decoders commonly carry (the TorchScript exporter stops at 20); a tool needing 21
(block-wise DequantizeLinear for int4) has to convert the opset itself.

    python tools/gen_llama.py --preset 1b -o /work/big/llama1b/llama1b.onnx
    python tools/gen_llama.py --preset tiny -o /tmp/llama_tiny/llama_tiny.onnx

Presets: ``1b`` is TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 22 layers, 32 heads,
4 key/value heads, vocabulary 32000: 1.1 B parameters, 4.1 GiB of float32); ``tiny`` is the same
architecture at 2 layers, hidden 64 (about 1 MB), for tests.

Interface (``L`` layers, ``H`` key/value heads, ``D`` head dim; all dims but the last of each are
dynamic: ``batch``, ``sequence``, ``past_sequence``, ``total_sequence`` = past + sequence):

* inputs ``input_ids`` int64 [batch, sequence], ``attention_mask`` int64 [batch, total_sequence],
  ``position_ids`` int64 [batch, sequence], ``past_key_values.{i}.key`` / ``.value`` float32
  [batch, H, past_sequence, D] for i < L;
* outputs ``logits`` float32 [batch, sequence, vocab], ``present.{i}.key`` / ``.value`` float32
  [batch, H, total_sequence, D].

Files written beside ``-o NAME.onnx``: ``NAME.onnx.data`` (every initializer of 1 KiB or more, in
one file, page-aligned, copied from the exporter's per-tensor files in chunks so the copy holds no
weights in memory) and ``NAME.inputs.npz`` (validation inputs, usable as ``onnxopt --inputs``): a
fixed 24-token prompt whose first ``PAST`` tokens were run through the torch model to make a real
cache, so the model sees the remaining tokens with a past of ``PAST`` positions.

Afterwards the script loads the ONNX model by path in onnxruntime, runs it on the validation inputs,
on a second shape (batch 2, a left-padded attention mask, other sequence and past lengths) and on a
one-token decoding step, and
compares logits and presents with the torch model's; it prints the max abs differences and exits 1
when one exceeds ``--atol``.

Memory: the torch model (4.1 GiB for ``1b``) and the exporter's working copies are resident
together during the export; the torch reference outputs are computed before it and the model is
freed before onnxruntime loads the ONNX file. Measured for ``1b`` on 2 shared cores
(``/usr/bin/time -v``): 4 min wall (build 33 s, export 145 s), peak RSS 6.1 GiB.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

ALIGN = 4096
CHUNK = 64 * 2**20
EXTERNAL_THRESHOLD = 1024
OPSET = 17
PAST = 8

PRESETS: dict[str, dict[str, int]] = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),
}

# A fixed prompt: BOS (1) then ids spread over a 32000-token vocabulary; taken modulo the preset's
# vocabulary so every preset sees the same sequence pattern.
PROMPT = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889, 512, 278,
          7250, 29892, 278, 4799, 6568, 10425, 701, 297, 29871]


def _config(preset: str):
    from transformers import LlamaConfig

    return LlamaConfig(**PRESETS[preset], max_position_embeddings=2048, rms_norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=False, use_cache=True,
                       attn_implementation="sdpa")


def build_model(preset: str, seed: int = 0):
    """The random-weight ``LlamaForCausalLM`` of ``preset``, float32, in eval mode."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(preset))
    return model.eval()


def input_names(layers: int) -> list[str]:
    """The ONNX inputs' names, in the exported order."""
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def output_names(layers: int) -> list[str]:
    """The ONNX outputs' names, in the exported order."""
    return ["logits"] + [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def _flat_decoder(model):
    """Wrap ``model`` as ``forward(input_ids, attention_mask, position_ids, *past) ->
    (logits, *present)`` with plain tensors, as the TorchScript exporter needs."""
    import torch
    from transformers import DynamicCache

    class FlatDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])))
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, cache=cache, use_cache=True)
            presents = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
            return (out.logits, *presents)

    return FlatDecoder().eval()


def _run_torch(model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of the torch model on an ONNX-style feed, in ``output_names`` order."""
    import torch

    layers = model.config.num_hidden_layers
    args = [torch.from_numpy(feed[name]) for name in input_names(layers)]
    with torch.no_grad():
        return [t.numpy() for t in _flat_decoder(model)(*args)]


def make_feed(model, batch: int, sequence: int, past: int, pad: int = 0
              ) -> dict[str, np.ndarray]:
    """A feed of ``batch`` copies of the prompt (shifted by one token per row): ``past`` tokens
    run through ``model`` make the cache, the next ``sequence`` are ``input_ids``. With ``pad``,
    the last row is left-padded: its first ``pad`` positions are masked out (attention_mask 0).

    Raises:
        ValueError: ``past + sequence`` longer than the prompt, or ``pad`` not below it.
    """
    import torch

    total = past + sequence
    if total + batch - 1 > len(PROMPT) or not 0 <= pad < total:
        raise ValueError(f"past {past} + sequence {sequence} (batch {batch}, pad {pad}) does not "
                         f"fit the {len(PROMPT)}-token prompt")
    vocab = model.config.vocab_size
    ids = np.array([[t % vocab for t in PROMPT[row:row + total]] for row in range(batch)],
                   dtype=np.int64)
    mask = np.ones((batch, total), dtype=np.int64)
    mask[-1, :pad] = 0
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    layers = model.config.num_hidden_layers
    if past:
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids[:, :past]),
                        attention_mask=torch.from_numpy(mask[:, :past]),
                        position_ids=torch.from_numpy(positions[:, :past]), use_cache=True)
        past_arrays = [t.numpy() for layer in out.cache.layers for t in (layer.keys, layer.values)]
    else:
        config = model.config
        head_dim = config.hidden_size // config.num_attention_heads
        past_arrays = [np.zeros((batch, config.num_key_value_heads, 0, head_dim), np.float32)
                       for _ in range(2 * layers)]
    feed = {"input_ids": ids[:, past:], "attention_mask": mask,
            "position_ids": positions[:, past:]}
    feed.update(zip(input_names(layers)[3:], past_arrays))
    return feed


def _export(model, path: Path) -> None:
    """TorchScript-export ``model`` to ``path`` (the exporter may write per-tensor data files
    beside it when the model exceeds 2 GiB). The trace uses batch 2, sequence 3, past 5, none of
    them a validation shape, so a baked-in dim shows up in the checks."""
    import torch

    layers = model.config.num_hidden_layers
    feed = make_feed(model, batch=2, sequence=3, past=5)
    args = tuple(torch.from_numpy(feed[name]) for name in input_names(layers))
    dynamic_axes = {"input_ids": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "total_sequence"},
                    "position_ids": {0: "batch", 1: "sequence"},
                    "logits": {0: "batch", 1: "sequence"}}
    for name in input_names(layers)[3:]:
        dynamic_axes[name] = {0: "batch", 2: "past_sequence"}
    for name in output_names(layers)[1:]:
        dynamic_axes[name] = {0: "batch", 2: "total_sequence"}
    # The tracer warns about each Python branch it freezes (cache empty?, one query token?,
    # padding longer than the keys?); generate() checks shapes on both sides of each against
    # torch. The deprecation warning is about choosing dynamo=False, which is deliberate.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(_flat_decoder(model), args, str(path), dynamo=False,
                          opset_version=OPSET, input_names=input_names(layers),
                          output_names=output_names(layers), dynamic_axes=dynamic_axes,
                          do_constant_folding=True)


def _set_location(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _gather_external(exported: Path, path: Path) -> None:
    """Rewrite the exported model at ``exported`` as ``path`` + ``path.name.data``: every
    initializer of ``EXTERNAL_THRESHOLD`` bytes or more goes to the one data file, page-aligned,
    copied in ``CHUNK``-sized pieces from the exporter's per-tensor files (or taken from its
    inline ``raw_data``, for models under 2 GiB)."""
    model = onnx.load(str(exported), load_external_data=False)
    data_name = path.name + ".data"
    tmp_data = path.with_name(data_name + ".tmp")
    with open(tmp_data, "wb") as out:
        for tensor in model.graph.initializer:
            offset = out.tell()
            if tensor.data_location == TensorProto.EXTERNAL:
                info = {entry.key: entry.value for entry in tensor.external_data}
                source_path = exported.parent / info["location"]
                start = int(info.get("offset", 0))
                remaining = int(info.get("length", source_path.stat().st_size - start))
                with open(source_path, "rb") as source:
                    source.seek(start)
                    while remaining > 0:
                        chunk = source.read(min(CHUNK, remaining))
                        if not chunk:
                            raise ValueError(f"{source_path}: shorter than tensor "
                                             f"{tensor.name}'s offset {start} + length")
                        out.write(chunk)
                        remaining -= len(chunk)
            elif len(tensor.raw_data) >= EXTERNAL_THRESHOLD:
                out.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            else:
                continue
            _set_location(tensor, data_name, offset, out.tell() - offset)
            out.write(b"\0" * (-out.tell() % ALIGN))
    tmp_model = path.with_name(path.name + ".tmp")
    tmp_model.write_bytes(model.SerializeToString())
    os.replace(tmp_data, path.with_name(data_name))
    os.replace(tmp_model, path)


def check(path: Path, feeds: list[dict[str, np.ndarray]],
          references: list[list[np.ndarray]]) -> list[float]:
    """Run the ONNX model at ``path`` (loaded by path, so external data resolves) on each feed;
    return, per feed, the max abs difference over all outputs from ``references`` (torch's
    outputs in ``output_names`` order).

    Raises:
        ValueError: an output's shape differs from the reference's.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    diffs = []
    for feed, reference in zip(feeds, references):
        got = session.run(names, feed)
        for name, a, b in zip(names, got, reference):
            if a.shape != b.shape:
                raise ValueError(f"{path}: output {name} has shape {a.shape}, torch {b.shape}")
        diffs.append(max(float(np.max(np.abs(a - b))) for a, b in zip(got, reference)))
    return diffs


def generate(path: Path, preset: str, seed: int = 0, sequence: int = 16, past: int = PAST
             ) -> tuple[Path, list[float]]:
    """Write ``path``, ``path.data`` and ``NAME.inputs.npz`` (``NAME`` = ``path`` without
    ``.onnx``) for ``preset``; return ``path`` and the max abs logits/present differences between
    onnxruntime and torch on [the validation inputs, a batch-2 left-padded feed, a one-token
    decoding step after a past of 20].

    Raises:
        KeyError: unknown ``preset``.
        ValueError: ``past + sequence`` longer than the prompt.
    """
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = build_model(preset, seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"{preset}: {params / 1e6:.1f} M parameters, built in "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    feeds = [make_feed(model, batch=1, sequence=sequence, past=past),
             make_feed(model, batch=2, sequence=5, past=11, pad=3),
             make_feed(model, batch=1, sequence=1, past=20)]
    references = [_run_torch(model, feed) for feed in feeds]
    np.savez(path.with_name(path.name.removesuffix(".onnx") + ".inputs.npz"), **feeds[0])
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        exported = Path(tmp) / "model.onnx"
        started = time.perf_counter()
        _export(model, exported)
        print(f"exported in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        del model
        gc.collect()
        _gather_external(exported, path)
    diffs = check(path, feeds, references)
    return path, diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", required=True, type=Path, help="model file (.onnx)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sequence", type=int, default=16,
                        help="tokens in input_ids of the validation inputs (default 16)")
    parser.add_argument("--past", type=int, default=PAST,
                        help=f"past length of the validation inputs (default {PAST})")
    parser.add_argument("--atol", type=float, default=1e-3,
                        help="largest accepted onnxruntime-vs-torch difference (default 1e-3)")
    args = parser.parse_args(argv)
    if args.output.suffix != ".onnx":
        parser.error(f"{args.output}: the output must end in .onnx")
    path, diffs = generate(args.output, args.preset, args.seed, args.sequence, args.past)
    size = os.path.getsize(f"{path}.data")
    print(f"{path}: {size / 2**30:.2f} GiB of external data; onnxruntime vs torch max abs "
          f"diff: validation inputs {diffs[0]:.3g}, batch-2 padded {diffs[1]:.3g}, "
          f"decoding step {diffs[2]:.3g}")
    return 0 if max(diffs) <= args.atol else 1


if __name__ == "__main__":
    sys.exit(main())
