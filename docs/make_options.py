"""Write docs/options.md, the reference of every pass option, from the passes' config dataclasses.

    python docs/make_options.py            # rewrites docs/options.md
    python docs/make_options.py OUT.md     # writes elsewhere (the test compares the two)

The same code prints `onnxcompress recipes --options`; tests/test_options.py fails when the committed
page differs from what this writes.
"""
from __future__ import annotations

import sys
from pathlib import Path

from onnxcompress.recipes.options import options_markdown


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path(__file__).resolve().parent / "options.md"
    out.write_text(options_markdown(), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
