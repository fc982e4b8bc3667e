"""The one family of errors onnxcompress raises on purpose.

Each message is a single sentence a user can act on. The CLI prints it on one line and exits
with code 2; anything else escaping (BugError among them) is a bug in onnxcompress.
"""
from __future__ import annotations


def printable(text: str, *, newlines: bool = True) -> str:
    """`text` with its control characters written as escapes (ESC as \\x1b, CR as \\r; newlines too unless
    `newlines`): a name or message from a model never moves the terminal's cursor, recolours it or
    splits a line."""
    return "".join(c if c.isprintable() or (newlines and c == "\n") else c.encode("unicode_escape").decode("ascii")
                   for c in text)


class BugError(Exception):
    """A failed pre- or postcondition inside onnxcompress: our bug, never the user's. The CLI
    exits with code 1 and asks for a report."""


class OnnxCompressError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class ModelError(OnnxCompressError):
    """The model file is missing, corrupt, truncated, or cannot run in onnxruntime."""


class DataError(OnnxCompressError):
    """Calibration or validation data does not fit the model."""


class RecipeError(OnnxCompressError):
    """A recipe names an unknown pass or option, or gives an option a wrong value."""


class CodecError(OnnxCompressError):
    """An encoded stream is corrupt, truncated, or was written by an incompatible version."""


class PreconditionError(OnnxCompressError):
    """A pass was run without what it requires (e.g. QDQ insertion without calibration)."""


class MissingArtifactError(PreconditionError):
    """A pass runs before the pass that makes what it consumes: a recipe's passes are out of order."""

    def __init__(self, pass_name: str, artifact: str, producers: list[str]):
        made_by = " or ".join(f"'{p}'" for p in producers)
        super().__init__(f"pass '{pass_name}' needs {artifact}, which pass {made_by} makes: put it before "
                         f"'{pass_name}' in the recipe" if producers else
                         f"pass '{pass_name}' needs {artifact}, which no pass makes")
        self.pass_name, self.artifact, self.producers = pass_name, artifact, producers


class PassError(OnnxCompressError):
    """A pass failed; the message names the pass and the passes that ran before it."""

    def __init__(self, pass_name: str, before: list[str], cause: BaseException):
        where = f"in pass '{pass_name}'" + (f", after passes {before}" if before else "")
        super().__init__(f"{where}: {cause}")
        self.pass_name = pass_name
        self.before = before


class OutputError(OnnxCompressError):
    """The output path cannot be written (missing folder, same as the input, ...)."""


class RuntimeMissingError(OnnxCompressError, ImportError):
    """No onnxruntime distribution can be imported (the message names what to install)."""


class ExecutorError(OnnxCompressError):
    """Per-weight work could not run: the executor is missing or unreachable, or a task kept failing
    after its retries (the message names the weight)."""
