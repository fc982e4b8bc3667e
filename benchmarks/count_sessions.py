"""How many onnxruntime sessions one compress builds (every InferenceSession, probes included).

    python benchmarks/count_sessions.py RECIPE MODEL DATA
    PYTHONPATH=/path/to/other/checkout python benchmarks/count_sessions.py ...   # the same for another tree

Measured 2026-12-07 on LeNet-5 (samples/lenet5.onnx, --data samples/mnist_calib.npz, --jobs 1): share 25
before the statistics collector (c7d67f3), 9 after; deep-compression 24 -> 9.
"""
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort


def main(argv: list[str]) -> int:
    recipe, model, data = argv
    count = [0]
    original = ort.InferenceSession.__init__

    def counting(self, *args, **kwargs):
        count[0] += 1
        return original(self, *args, **kwargs)

    ort.InferenceSession.__init__ = counting
    from onnxcompress.cli import main as cli

    with tempfile.TemporaryDirectory() as folder:
        code = cli(["compress", model, "-o", str(Path(folder) / "out.onnx"), "--recipe", recipe, "--data", data,
                    "--jobs", "1", "-q"])
    print(f"{recipe}: {count[0]} onnxruntime sessions (exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
