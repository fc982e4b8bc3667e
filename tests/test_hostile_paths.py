"""Hostile paths and data loss (issue 14, items 1-5): nothing a model says reaches the file system
outside its folder, no output is an input, every output is checked before the work and nothing is
left behind on failure, outputs get the mode of a plain file write.

Each case runs the real CLI and checks: exit code 2, one line naming the problem, no traceback,
every file under the test's folders unchanged (hash) and no new file (outputs, temporaries);
the security cases keep a victim file in a sibling folder outside the working folder.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxcompress.graph import external, spill

from onnxcompress.graph import model as model_io
from onnxcompress.cli import main
from onnxcompress.graph.model import load_model, save_model
from tiny import cli_error, gemm, random_feeds, run

VICTIM_TEXT = b"precious, not to be touched\n"


def _tree(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones too, links not followed) -> sha256 of its bytes (or link target)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(root))] = "link:" + os.readlink(path)
        elif path.is_file():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def place(tmp_path):
    """(work folder, victim file in a sibling folder); the whole tmp_path is watched."""
    work, outside = tmp_path / "work", tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_bytes(VICTIM_TEXT)
    return work, victim


def _refused(capsys, root: Path, argv: list[str]) -> str:
    """The CLI exits 2 with one line, and nothing under root changed or appeared."""
    before = _tree(root)
    err = cli_error(capsys, argv)
    assert _tree(root) == before
    return err


def _with_external(work: Path, name: str = "m.onnx") -> Path:
    path = work / name
    save_model(gemm(k=256, n=64), path, external_data=True)
    return path


def _rewrite_external(path: Path, **entries: str) -> None:
    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key in entries:
                    entry.value = entries[entry.key]
            for key in set(entries) - {e.key for e in tensor.external_data}:
                entry = tensor.external_data.add()
                entry.key, entry.value = key, entries[key]
    path.write_bytes(proto.SerializeToString())


# ---- 1. bookkeeping never read from a model ------------------------------------------------------

def _with_bookkeeping(model: onnx.ModelProto, victim: Path) -> onnx.ModelProto:
    spill_rel = os.path.relpath(victim, spill._spill_dir())
    helper.set_model_props(model, {
        "onnxcompress.spill_location": spill_rel,
        "onnxcompress.external_data_dirs": json.dumps({spill_rel: str(spill._spill_dir()),
                                                        "m.onnx.data": str(victim.parent)}),
        external.BOOKKEEPING_PREFIX + "0" * 32: "guess", "author": "kept"})
    return model


@pytest.mark.parametrize("streamed", [True, False])
def test_bookkeeping_keys_in_a_model_are_ignored(place, capsys, monkeypatch, streamed):
    """The old attack: a model naming a spill file '../../victim.txt' made compress append to it or
    delete it. Now the keys are dropped at load and the spill file is chosen by us."""
    work, victim = place
    if streamed:
        monkeypatch.setattr(model_io, "STREAM_THRESHOLD", 0)
        monkeypatch.setattr(spill, "SPILL_MIN_BYTES", 1024)
    path = work / "m.onnx"
    onnx.save_model(_with_bookkeeping(gemm(k=256, n=64), victim), path, save_as_external_data=streamed,
                    location="m.onnx.data", size_threshold=0)
    assert {p.key for p in onnx.load(path, load_external_data=False).metadata_props} >= {
        "onnxcompress.spill_location", "onnxcompress.external_data_dirs"}
    outside = _tree(victim.parent)
    assert main(["compress", str(path), "-o", str(work / "out.onnx"), "--jobs", "1", "-q"]) == 0
    assert _tree(victim.parent) == outside  # not appended to, not deleted, nothing new beside it
    written = onnx.load(work / "out.onnx", load_external_data=False)
    assert {(p.key, p.value) for p in written.metadata_props} == {("author", "kept")}
    loaded = load_model(path)
    assert external.is_streamed(loaded) == streamed
    assert all(folder == work.resolve() for folder in external.external_dirs(loaded).values())


def test_a_model_cannot_name_the_folders_it_is_read_from(place):
    """external_data_dirs pointing at another folder holding a same-named file is not followed."""
    work, victim = place
    path = _with_external(work)
    (victim.parent / "m.onnx.data").write_bytes((work / "m.onnx.data").read_bytes()[::-1])  # decoy
    proto = onnx.load(path, load_external_data=False)
    helper.set_model_props(proto, {"onnxcompress.external_data_dirs": json.dumps({"m.onnx.data": str(victim.parent)})})
    path.write_bytes(proto.SerializeToString())
    for stream in (True, False):
        loaded = load_model(path, stream=stream)
        assert not set(external.LEGACY_KEYS) & {e.key for e in loaded.metadata_props}
        feeds = random_feeds(gemm(k=256, n=64), n=2)
        np.testing.assert_allclose(run(external.inline_copy(loaded), feeds)[0], run(gemm(k=256, n=64), feeds)[0],
                                   rtol=1e-6)


# ---- 2. external data the model names ---------------------------------------------------------------

def _external_cases(work: Path, victim: Path) -> dict:
    return {
        "dotdot": {"location": os.path.relpath(victim, work)},
        "absolute": {"location": str(victim)},
        "nested-dotdot": {"location": "sub/../../outside/victim.txt"},
        "offset-text": {"offset": "abc"},
        "offset-negative": {"offset": "-5"},
        "length-float": {"length": "1e3"},
        "offset-huge": {"offset": "9" * 40},
        "length-beyond-file": {"length": str(10**9)},
        "length-negative": {"length": "-1"},
        "missing-file": {"location": "nope.data"},
        "empty-location": {"location": ""},
        "newline": {"location": "a\nb.data"},
    }


CASES = list(_external_cases(Path("/w"), Path("/v/victim.txt")))


@pytest.mark.parametrize("case", CASES + ["symlink-out"])
@pytest.mark.parametrize("command", ["compress", "inspect", "validate", "unpack"])
def test_external_data_the_model_names_is_refused(place, capsys, case, command):
    work, victim = place
    path = _with_external(work)
    if case == "symlink-out":
        (work / "link.data").symlink_to(victim)
        _rewrite_external(path, location="link.data")
    else:
        _rewrite_external(path, **_external_cases(work, victim)[case])
    argv = {"compress": ["compress", str(path), "-o", str(work / "out.onnx"), "--jobs", "1"],
            "inspect": ["inspect", str(path)],
            "validate": ["validate", str(path), str(path)],
            "unpack": ["unpack", str(path), "-o", str(work / "out.onnx")]}[command]
    err = _refused(capsys, place[0].parent, argv)
    expected = {"offset": "offset", "length": "length" if "beyond" not in case else "truncated"}
    if case.startswith(("offset", "length")):
        assert expected[case.split("-")[0]] in err, err
    elif case == "missing-file":
        assert "missing" in err
    elif case == "empty-location":
        assert "names none" in err
    elif case != "newline":
        assert "outside the model's folder" in err or "not a path relative" in err, err


def test_symlink_inside_the_folder_is_refused_like_onnx_does(tmp_path, capsys):
    """onnx and onnxruntime refuse a linked data file even inside the folder: one sentence, streamed or not."""
    path = _with_external(tmp_path)
    os.replace(tmp_path / "m.onnx.data", tmp_path / "real.data")
    (tmp_path / "m.onnx.data").symlink_to("real.data")
    assert "symbolic link" in _refused(capsys, tmp_path, ["inspect", str(path)])


# ---- 3. an output that is also an input -------------------------------------------------------------

def _data(path: Path, labels: bool = False) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"x": rng.standard_normal((8, 256)).astype(np.float32)}
    if labels:
        arrays["labels"] = rng.integers(0, 64, 8)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case", ["out=external", "out=data", "out=eval-data", "report=out", "report=model",
                                  "report=data", "report=recipe", "out-link=model", "out.data=data",
                                  "plot=model", "report-link=external"])
def test_output_that_is_an_input_is_refused(tmp_path, capsys, case):
    work = tmp_path
    model = _with_external(work, "r.pareto.png" if case == "plot=model" else "m.onnx")
    data = _data(work / "d.npz")
    recipe = work / "recipe.yaml"
    recipe.write_text("passes:\n  - share: {bits_fc: 4}\n")
    (work / "link.onnx").symlink_to(model.name)
    (work / "link.json").symlink_to(model.name + ".data")
    out, report = work / "out.onnx", None
    if case == "out=external":
        out = work / f"{model.name}.data"
    elif case == "out=data":
        out = data
    elif case == "out=eval-data":
        out = work / "e.npz"
        _data(out)
    elif case == "report=out":
        report = out
    elif case == "report=model":
        report = model
    elif case == "report=data":
        report = data
    elif case == "report=recipe":
        report = recipe
    elif case == "out-link=model":
        out = work / "link.onnx"
    elif case == "out.data=data":
        out = work / "d"
        os.replace(data, work / "d.data")
        data = work / "d.data"
    elif case == "plot=model":
        report = work / "r.json"
    elif case == "report-link=external":
        report = work / "link.json"
    argv = ["compress", str(model), "-o", str(out), "--data", str(data), "--recipe", str(recipe), "--jobs", "1"]
    argv += ["--eval-data", str(work / "e.npz")] if case == "out=eval-data" else []
    argv += ["--report", str(report)] if report else []
    err = _refused(capsys, tmp_path, argv)
    assert "inputs are never overwritten" in err or "are the same file" in err, err


def test_unpack_output_equal_to_its_data_file_is_refused(tmp_path, capsys):
    model = _with_external(tmp_path)
    _refused(capsys, tmp_path, ["unpack", str(model), "-o", str(tmp_path / "m.onnx.data")])


# ---- 4. every output checked before the work; nothing left behind -------------------------------------

@pytest.mark.parametrize("case", ["report-folder-missing", "out-folder-is-file", "out-is-folder", "report-is-folder",
                                  "out-data-is-folder", "name-too-long", "read-only-folder"])
def test_unwritable_output_is_refused_before_the_work(tmp_path, capsys, monkeypatch, case):
    model = tmp_path / "m.onnx"
    onnx.save(gemm(), model)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    out, report = tmp_path / "out.onnx", None
    if case == "report-folder-missing":
        report = tmp_path / "nope" / "r.json"
    elif case == "out-folder-is-file":
        out = tmp_path / "afile" / "out.onnx"
    elif case == "out-is-folder":
        out = tmp_path / "adir"
    elif case == "report-is-folder":
        report = tmp_path / "adir"
    elif case == "out-data-is-folder":
        (tmp_path / "out.onnx.data").mkdir()
    elif case == "name-too-long":
        out = tmp_path / ("o" * 300 + ".onnx")

    elif case == "read-only-folder":  # as the file system answers for a read-only mount or folder
        monkeypatch.setattr("onnxcompress.graph.outputs.os.open", _fail(PermissionError(13, "Permission denied")))

    def no_work(*args, **kwargs):
        raise AssertionError("the work started before the outputs were checked")

    monkeypatch.setattr("onnxcompress.api.compress", no_work)
    argv = ["compress", str(model), "-o", str(out)] + (["--report", str(report)] if report else [])
    assert "cannot write" in _refused(capsys, tmp_path, argv)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused_before_the_work(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(gemm(), model)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        assert "Permission denied" in _refused(capsys, tmp_path, ["compress", str(model), "-o",
                                                                  str(tmp_path / "ro" / "o.onnx")])
    finally:
        (tmp_path / "ro").chmod(0o755)


def _fail(exc):
    def boom(*args, **kwargs):
        raise exc
    return boom


@pytest.mark.parametrize("where", ["rename", "report", "interrupt-save", "interrupt-report", "interrupt-rename"])
def test_failure_after_the_work_leaves_nothing(tmp_path, capsys, monkeypatch, where):
    """Disk or permission errors once the work ran, and Ctrl-C: no OUT, no data file, no report, no temp.
    (Ctrl-C between two renames left the first output in place and the hard link kept of a file it replaced.)"""
    monkeypatch.setattr(model_io, "STREAM_THRESHOLD", 0)
    model = _with_external(tmp_path)  # streamed: OUT comes with a data file
    argv = ["compress", str(model), "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json"),
            "--jobs", "1", "-q"]
    if where.endswith("rename"):
        real = os.replace
        calls = []

        def replace(src, dst):  # the second rename fails: the first output must not stay
            calls.append(dst)
            if len(calls) == 2:
                raise KeyboardInterrupt() if where.startswith("interrupt") else PermissionError(13, "Permission denied")
            return real(src, dst)

        monkeypatch.setattr("onnxcompress.graph.outputs.os.replace", replace)
    elif where == "report":
        monkeypatch.setattr("onnxcompress.cli._dump", _fail(OSError(28, "No space left on device")))
    elif where == "interrupt-save":
        monkeypatch.setattr(external, "strip_bookkeeping", _fail(KeyboardInterrupt()))  # inside save_model
    else:
        monkeypatch.setattr("onnxcompress.plots.plot_report", _fail(KeyboardInterrupt()))
    before = _tree(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    if where.startswith("interrupt"):
        assert code == 130 and "nothing was written" in err
    else:
        assert code == 2 and "cannot write" in err, err
    assert _tree(tmp_path) == before


# ---- 5. output file mode ---------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_get_the_mode_of_a_plain_write(tmp_path, monkeypatch, mask):
    monkeypatch.setattr(model_io, "STREAM_THRESHOLD", 0)
    model = _with_external(tmp_path)
    old = os.umask(mask)
    try:
        assert main(["compress", str(model), "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json"),
                     "--jobs", "1", "-q"]) == 0
        assert main(["unpack", str(model), "-o", str(tmp_path / "u.onnx")]) == 0  # streamed: with a data file
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(old)
    want = (tmp_path / "plain").stat().st_mode & 0o777
    assert want == 0o666 & ~mask
    for name in ("out.onnx", "r.json", "u.onnx", "u.onnx.data"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_into_the_data_folder_as_a_data_file_is_refused(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(gemm(k=256, n=64), model)
    (tmp_path / "calib").mkdir()
    _data(tmp_path / "calib" / "0.npz")
    err = _refused(capsys, tmp_path, ["compress", str(model), "-o", str(tmp_path / "calib" / "1.npz"),
                                      "--data", str(tmp_path / "calib")])
    assert "files of --data" in err


def test_a_recipe_file_cannot_name_code_to_run(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(gemm(), model)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - bitwidth: {metric: 'shutil:rmtree', max_drop: 1}\n")
    assert "code to run" in _refused(capsys, tmp_path, ["compress", str(model), "-o", str(tmp_path / "o.onnx"),
                                                        "--recipe", str(recipe)])


def test_sigterm_while_writing_leaves_nothing(tmp_path):
    """SIGTERM unwinds like Ctrl-C: the temporary outputs go, exit status 128 + 15."""
    import signal
    import subprocess
    import sys

    model = _with_external(tmp_path)
    before = _tree(tmp_path)
    script = (
        "import os, signal, sys\n"
        "from onnxcompress.graph import external\n"
        "from onnxcompress.cli import main\n"
        "external.strip_bookkeeping = lambda m: os.kill(os.getpid(), signal.SIGTERM)  # inside save_model\n"
        f"sys.exit(main(['compress', {str(model)!r}, '-o', {str(tmp_path / 'o.onnx')!r}, '--jobs', '1', '-q',"
        f" '--report', {str(tmp_path / 'r.json')!r}]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert _tree(tmp_path) == before


def test_output_that_is_a_link_out_of_the_folder_replaces_the_link_only(place, capsys):
    """-o naming a link to a file elsewhere: the link is replaced by the output, the file it pointed to is untouched."""
    work, victim = place
    model = work / "m.onnx"
    onnx.save(gemm(), model)
    (work / "out.onnx").symlink_to(victim)
    (work / "out.onnx.data").symlink_to(victim.parent / "new.data")  # dangling: must not create new.data
    outside = _tree(victim.parent)
    assert main(["compress", str(model), "-o", str(work / "out.onnx"), "--jobs", "1", "-q"]) == 0
    assert _tree(victim.parent) == outside
    assert not (work / "out.onnx").is_symlink() and onnx.load(work / "out.onnx").graph.node


@pytest.mark.parametrize("argv", [
    ["compress", "m.onnx", "-o", "x.onnx", "--form", "foo"],  # a choice argparse refuses
    ["unpack"],  # required arguments missing
    ["validate", "a", "b", "--bogus"],  # an unknown flag
    ["no-such-command"],
    ["compress", "m.onnx", "-o", "x.onnx", "--jobs", "zero"],  # a value of the wrong type
])
def test_usage_errors_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2
    assert len(err) == 1 and err[0].startswith("onnxcompress: error:") and "--help" in err[0], err


@pytest.mark.parametrize("command", ["compress", "recipes"])
def test_stdout_closed_early_is_no_internal_error(tmp_path, command):
    """`onnxcompress compress ... | head -1`: the report's print hit a closed pipe after OUT was in place, and the
    line said 'internal error ... nothing was written' (exit 1). Now: silent, exit 141 as for SIGPIPE."""
    model = tmp_path / "m.onnx"
    onnx.save(gemm(), model)
    argv = ["compress", str(model), "-o", str(tmp_path / "o.onnx"), "--jobs", "1"] if command == "compress" \
        else ["recipes", "--options"]
    proc = subprocess.Popen([sys.executable, "-m", "onnxcompress.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and "error" not in err and "Traceback" not in err, err
    if command == "compress":
        onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)
