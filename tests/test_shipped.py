"""Shipped size: bytes on disk, gzip -9, brotli -q 11 and float bytes resident after onnxruntime folds
the decode chains, in the report, its JSON and the CLI text."""
from __future__ import annotations

import json
import zlib

import onnx

from onnxcompress import api
from onnxcompress.runtime.shipped import shipped_size
from tiny import gemm


def test_shipped_size_of_a_portable_share_output(tmp_path):
    source, out = tmp_path / "model.onnx", tmp_path / "small.onnx"
    model = gemm(k=256, n=64)
    onnx.save(model, source)
    report = api.compress_file(source, out, "share", validate="none")
    shipped = report.shipped
    raw = out.read_bytes()
    assert shipped.disk == len(raw) == report.output_bytes
    assert shipped.gzip == len(zlib.compress(raw, 9)) < shipped.disk
    # the decode chain folds into the dense weight: resident = the float weight and bias
    assert shipped.resident == (256 * 64 + 64) * 4
    try:
        import brotli
    except ImportError:
        assert shipped.brotli is None
    else:
        assert shipped.brotli == len(brotli.compress(raw, quality=11))
    assert report.as_dict()["shipped"]["gzip"] == shipped.gzip
    assert any(".ort" in note for note in report.notes)


def test_shipped_size_counts_external_data(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(gemm(k=512, n=64), path, save_as_external_data=True, location="ext.data", size_threshold=0)
    shipped = shipped_size(path)
    whole = path.read_bytes() + (tmp_path / "ext.data").read_bytes()
    assert shipped.disk == len(whole) and shipped.gzip == len(zlib.compress(whole, 9))
    assert shipped.resident == (512 * 64 + 64) * 4


def test_cli_text_and_json_show_shipped_sizes(tmp_path, capsys):
    from onnxcompress.cli import main

    source = tmp_path / "model.onnx"
    onnx.save(gemm(k=256, n=64), source)
    assert main(["compress", str(source), "-o", str(tmp_path / "a.onnx"), "--recipe", "share", "-q"]) in (0, None)
    text = capsys.readouterr().out
    assert "gzip -9" in text and "resident" in text
    assert main(["compress", str(source), "-o", str(tmp_path / "b.onnx"), "--recipe", "share", "-q", "--json"]) in (0, None)
    shipped = json.loads(capsys.readouterr().out)["shipped"]
    assert set(shipped) == {"disk", "gzip", "brotli", "resident"} and shipped["resident"] == (256 * 64 + 64) * 4


def test_resident_size_of_a_packed_output_is_the_decoded_float_model(tmp_path):
    source, out = tmp_path / "model.onnx", tmp_path / "packed.onnx"
    onnx.save(gemm(k=512, n=64), source)
    report = api.compress_file(source, out, "deep-compression-fixed", validate="none")
    assert report.form == "packed" and report.shipped.disk < (512 * 64) * 4 // 4
    assert report.shipped.resident == (512 * 64 + 64) * 4
    assert not any(".ort" in note for note in report.notes)  # the advice is about the portable form


def test_resident_size_is_not_measured_above_its_limit(tmp_path, monkeypatch):
    """Folding holds the dense float model in memory: above RESIDENT_MAX_BYTES of input it is skipped
    (gzip and disk still measured); at or below, measured."""
    from onnxcompress.runtime import shipped as module

    source = tmp_path / "model.onnx"
    onnx.save(gemm(k=256, n=64), source)
    size = source.stat().st_size
    monkeypatch.setattr(module, "RESIDENT_MAX_BYTES", size - 1)
    report = api.compress_file(source, tmp_path / "a.onnx", "share", validate="none")
    assert report.shipped.resident is None and report.shipped.gzip is not None and report.shipped.disk > 0
    monkeypatch.setattr(module, "RESIDENT_MAX_BYTES", size)
    report = api.compress_file(source, tmp_path / "b.onnx", "share", validate="none")
    assert report.shipped.resident == (256 * 64 + 64) * 4


def test_the_report_line_says_why_a_size_was_not_measured():
    from onnxcompress.report import shipped_text
    from onnxcompress.runtime.shipped import BROTLI_MAX_BYTES, MEASURE_MAX_BYTES, ShippedSize

    big = shipped_text(ShippedSize(disk=MEASURE_MAX_BYTES + 1, gzip=None, brotli=None), 4 * MEASURE_MAX_BYTES)
    assert "not measured (over 256.0 MB) gzip -9" in big.replace("MiB", "MB") and "pip install brotli" not in big
    mid = shipped_text(ShippedSize(disk=BROTLI_MAX_BYTES + 1, gzip=100, brotli=None), 4 * BROTLI_MAX_BYTES)
    assert "brotli" in mid and "pip install brotli" not in mid and "not measured (over" in mid
    small = shipped_text(ShippedSize(disk=1000, gzip=900, brotli=None), 4000)
    assert "pip install brotli" in small
