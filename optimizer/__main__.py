"""``python -m onnxopt``: the same as the ``onnxopt`` command."""

from onnxopt.cli import console_main

console_main()
