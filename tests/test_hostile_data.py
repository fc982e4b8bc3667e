"""Hostile data folders and recipe files (red team, round 8): one line, exit 2, nothing written, and no hang
or exponential work on a few hundred bytes.
"""
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnx import helper, numpy_helper

import onnxcompress.api as oc
from onnxcompress.cli import main
from test_hostile import _fails_cleanly
from tiny import cli_error, gemm, make_model, value, weights


@pytest.mark.parametrize("entry", ["folder", "fifo"])
@pytest.mark.parametrize("suffix", [".npz", ".npy"])
def test_data_folder_entry_that_is_not_a_file(tmp_path, capsys, entry, suffix):
    """A data folder's 'b.npz' that is a folder was an IsADirectoryError traceback; a FIFO blocked forever."""
    data = tmp_path / "data"
    data.mkdir()
    if suffix == ".npz":
        np.savez(data / "a.npz", x=np.zeros((1, 64), np.float32))
    odd = data / ("b" + suffix if suffix == ".npz" else "x.npy")
    odd.mkdir() if entry == "folder" else os.mkfifo(odd)
    model = tmp_path / "m.onnx"
    onnx.save(gemm(), model)
    err = _fails_cleanly(capsys, tmp_path, model, "--data", str(data), "-q")
    assert err == f"onnxcompress: error: data file '{odd}' is not a regular file (a folder, FIFO or device?)"


_CHAIN = ", ".join(f"&{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi"))
_LAUGHS = f"name: [&a [lol, lol, lol, lol, lol, lol, lol, lol, lol], {_CHAIN}]\n"


@pytest.mark.parametrize("text, says", [
    (_LAUGHS + "passes:\n  - share: {}\n", "recipes may not use YAML anchors and aliases"),
    (_LAUGHS + "passes:\n  - share: {exclude: *i}\n", "recipes may not use YAML anchors and aliases"),
    ("passes: " + "[" * 5000 + "]" * 5000 + "\n", "nests too deeply to be a recipe"),
    ("passes:\n  - share: {}\n" + "#" * (1 << 20), "a recipe is a short list of passes"),
], ids=["laughs-in-name", "laughs-in-option", "deep-nesting", "over-1MB"])
def test_recipe_bombs_are_refused_quickly(tmp_path, text, says):
    """A billion-laughs recipe (about 600 bytes, 9^9 strings once walked) ran until killed when its alias sat
    in the name or an option; deep nesting was a RecursionError. Run with a timeout: the failure is a hang."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    model = tmp_path / "m.onnx"
    onnx.save(gemm(), model)
    proc = subprocess.run([sys.executable, "-m", "onnxcompress.cli", "compress", str(model), "-o",
                           str(tmp_path / "o.onnx"), "--recipe", str(recipe), "-q", "--jobs", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxcompress: error:") and says in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "r.yaml"]


@pytest.mark.parametrize("labels, says", [
    (np.array(["cat"] * 16), "labels must be whole class numbers"),
    (np.full(16, np.nan), "labels must be whole class numbers"),
    (np.linspace(0, 1, 16), "labels must be whole class numbers"),
    (np.array(3), "a scalar, not labels for 16 samples"),
], ids=["strings", "nan", "fractions", "scalar"])
def test_labels_that_are_no_class_numbers_are_refused(tmp_path, capsys, labels, says):
    """String, NaN or fractional labels matched no argmax: the accuracy was silently 0 and --max-drop meant
    nothing; a 0-d labels array was an IndexError."""
    model = tmp_path / "m.onnx"
    onnx.save(gemm(), model)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32), labels=labels)
    err = _fails_cleanly(capsys, tmp_path, model, "--data", str(data), "-q")
    assert says in err


@pytest.mark.parametrize("labels, says", [
    (np.full(16, 40), "the labels hold class 40, but output 'y' scores 32 classes"),
    (np.r_[np.arange(15), -1], "labels must be class numbers from 0; they hold -1"),
], ids=["past-the-last-class", "negative"])
def test_labels_out_of_the_class_range_are_refused(tmp_path, capsys, labels, says):
    """Labels of classes the model does not score matched no argmax: the accuracy was silently low and a
    --max-drop budget measured against it meant nothing (compress and validate alike)."""
    model = tmp_path / "m.onnx"
    onnx.save(gemm(), model)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32), labels=labels)
    assert says in _fails_cleanly(capsys, tmp_path, model, "--data", str(data), "-q")
    assert says in cli_error(capsys, ["validate", str(model), str(model), "--data", str(data)])


def test_labels_in_range_of_one_output_count_for_it(tmp_path):
    """Two class-score outputs of the same size: labels in range of one of them are that one's (no refusal)."""
    rng = np.random.default_rng(0)
    a = helper.make_node("Gemm", ["x", "Wa"], ["ya"], transB=1)
    b = helper.make_node("Gemm", ["x", "Wb"], ["yb"], transB=1)
    model = make_model([a, b], [value("x", ["N", 8])], [value("ya", ["N", 10]), value("yb", ["N", 3])],
                       [numpy_helper.from_array(weights(rng, 10, 8), "Wa"),
                        numpy_helper.from_array(weights(rng, 3, 8), "Wb")])
    data = {"x": rng.standard_normal((16, 8)).astype(np.float32), "labels": np.arange(16) % 10}
    outputs = {o.name: o for o in oc.validate(model, model, data).outputs}
    assert outputs["ya"].accuracy_reference is not None and outputs["yb"].accuracy_reference is None


@pytest.mark.parametrize("text, says", [
    ("passes: []\n", "has no passes: it cannot change the model"),
    ("passes:\n  - bitwidth: {without_data: skip}\n", "only measures (bitwidth): it cannot change the model"),
    ("passes:\n  - calibrate\n  - bitwidth: {}\n", "only measures (bitwidth, calibrate)"),
], ids=["empty", "search-alone", "measures-only"])
def test_recipe_that_cannot_change_the_model_is_refused(tmp_path, capsys, text, says):
    """`passes: []` (or passes that only measure) wrote the input back as OUT with exit 0, as if compressed."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    model = tmp_path / "m.onnx"
    onnx.save(gemm(), model)
    err = _fails_cleanly(capsys, tmp_path, model, "--recipe", str(recipe), "-q")
    assert says in err and "add a pass that compresses" in err


@pytest.mark.parametrize("suffix", [".npz", ".npy"])
def test_data_folder_link_out_of_the_folder_is_refused(tmp_path, capsys, suffix):
    """A link in the data folder was followed wherever it pointed (a file the user never named); a link to
    another file of the same folder is still read."""
    data, outside = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir(), outside.mkdir()
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    save = (lambda f, a: np.savez(f, x=a)) if suffix == ".npz" else np.save
    (data / "sub").mkdir()
    save(data / "sub" / f"x{suffix}", x)
    save(outside / f"x{suffix}", x)
    link = data / f"x{suffix}"
    link.symlink_to(outside / f"x{suffix}")
    model = tmp_path / "m.onnx"
    onnx.save(gemm(), model)
    err = _fails_cleanly(capsys, tmp_path, model, "--data", str(data), "-q")
    assert err == f"onnxcompress: error: data file '{link}' is a link to a file outside the folder '{data}'; " \
                  "copy the file in, or give it as --data itself"
    link.unlink()
    link.symlink_to(data / "sub" / f"x{suffix}")
    assert oc.validate(model, model, str(data)).samples == (1 if suffix == ".npz" else 4)


def test_recipe_name_with_a_newline_cannot_forge_a_report_line(tmp_path, capsys):
    """A recipe's name is echoed in the report's first line: its newline split that line (a forged line
    'ratio: 100x' under it); escapes and CR were already written as text."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text('name: "\\e[31mmine\\nratio: 100x\\r"\npasses:\n  - share: {}\n')
    model = tmp_path / "m.onnx"
    onnx.save(gemm(), model)
    assert main(["compress", str(model), "-o", str(tmp_path / "o.onnx"), "--recipe", str(recipe)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("\\x1b[31mmine\\nratio: 100x\\r (portable): ")
    assert not any(line.startswith("ratio") for line in out)


@pytest.mark.parametrize("form", ["npz", "dict", "npy-folder"])
def test_an_input_named_labels_takes_the_labels_array(tmp_path, form):
    """A model whose input is called 'labels': stacked data's 'labels' array was taken for class labels and the
    data 'held no arrays'. It feeds the input."""
    model = gemm()
    model.graph.input[0].name = model.graph.node[0].input[0] = "labels"
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    if form == "npz":
        data = tmp_path / "d.npz"
        np.savez(data, labels=x)
    elif form == "npy-folder":
        data = tmp_path / "d"
        data.mkdir()
        np.save(data / "labels.npy", x)
    else:
        data = {"labels": x}
    comparison = oc.validate(model, model, str(data) if form != "dict" else data)
    assert comparison.samples == 16 and comparison.outputs[0].accuracy_reference is None


@pytest.mark.parametrize("text, says", [
    ("passes:\n  - prune:\n      rounds: 1000000000\n", "rounds must be between 1 and 32"),
    ("passes:\n  - calibrate:\n      method: entropy\n      bins: 1000000000000\n  - qdq: {}\n",
     "bins must be a multiple of 4 between 64 and 65536"),
    ("passes:\n  - share:\n      bits_fc: " + "9" * 5000 + "\n", "holds a value YAML cannot read"),
], ids=["prune-rounds", "calibrate-bins", "5000-digit-number"])
def test_recipe_options_that_size_the_work_are_bounded(tmp_path, capsys, text, says):
    """A few bytes of recipe: 10^9 prune rounds ran for hours (each refits every layer), 10^12 histogram bins
    per activation ran out of memory, a 5000-digit number was a ValueError (exit 1). Refused before any work."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    model = tmp_path / "m.onnx"
    onnx.save(gemm(), model)
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 64), np.float32))
    err = _fails_cleanly(capsys, tmp_path, model, "--recipe", str(recipe), "--data", str(tmp_path / "d.npz"))
    assert says in err, err


@pytest.mark.parametrize("text", ["passes: [share]\npasses: [prune]\n", "passes:\n  - share: {bits_fc: 4, bits_fc: 5}\n"],
                         ids=["passes", "option"])
def test_a_recipe_key_given_twice_is_refused(tmp_path, text):
    """yaml kept the last of two equal keys silently: `passes:` twice ran only the second list."""
    from onnxcompress.errors import RecipeError
    from onnxcompress.recipes import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(RecipeError, match="given twice"):
        load_recipe(recipe)
