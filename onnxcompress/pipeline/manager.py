"""Passes and the manager that runs them: ordered, timed, checked, validated, reported.

A pass is a small class with a typed keyword-only ``Config`` dataclass. It declares the typed
artifacts it ``produces`` and ``consumes`` (:class:`~onnxcompress.pipeline.artifacts.Artifact`); the manager
checks a pass's before it runs (a missing one is a recipe ordering mistake: the user's in their own
recipe, exit 2, ours in a built-in one, a BugError), then ``requires`` raises PreconditionError for
anything else it needs, ``call`` rewrites ``ctx.model`` and returns a PassResult, ``ensures`` checks
the result (a failed check is our bug). Passes talk to each other only through the typed fields of
:class:`Context`. The manager is itself a pass, so a composite is a pass of passes.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx

from onnxcompress.errors import BugError, DataError, MissingArtifactError, OnnxCompressError, PassError
from onnxcompress.execution.parallel import Executor
from onnxcompress.formats.codebook import SharedWeight
from onnxcompress.formats.forms import Form
from onnxcompress.formats.packed import Layout, PackedWeight
from onnxcompress.graph import external
from onnxcompress.graph.data import Dataset
from onnxcompress.graph.edit import drop_initializer_inputs
from onnxcompress.graph.spill import SpillingDict
from onnxcompress.graph.weights import find_weights, NONFINITE, nonfinite_weights, prequantized_weights, WeightInfo
from onnxcompress.numerics.quantmath import CalibrationResult
from onnxcompress.pipeline.artifacts import Artifact, SearchPlan
from onnxcompress.pipeline.configs import make_config
from onnxcompress.pipeline.outcome import PassTiming, Report, WeightRecord
from onnxcompress.runtime.layer_errors import LayerError
from onnxcompress.runtime.metrics import compare_models, Comparison
from onnxcompress.runtime.sessions import foreign_domains
from onnxcompress.runtime.statistics import Collector
from onnxcompress.runtime.tasks import TaskMetric

log = logging.getLogger(__name__)


@dataclass
class Context:
    """Everything passes share. Fields below `model` are filled by passes, each declared here."""

    original: onnx.ModelProto
    model: onnx.ModelProto
    data: Dataset | None = None  # calibration data (None: passes fall back to data-free methods)
    eval_data: Dataset | None = None  # validation data (searches measure fidelity on it)
    form: Form = Form.PORTABLE  # the output form: set once per run (recipe, --form), read by the passes that care
    jobs: int | Executor = 1  # cores for per-weight work, or an executor (onnxcompress.execution.parallel)
    progress: bool = True
    # prune -> share, sparse (Artifact.MASKS): True where a weight entry is kept
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    # share -> sparse, entropy, packed form (Artifact.SHARED): the codebook form of each shared weight
    shared: dict[str, SharedWeight] = field(default_factory=dict)
    # sparse -> entropy (Artifact.LAYOUTS): how each shared weight's codes are laid out in the packed form
    layouts: dict[str, Layout] = field(default_factory=dict)
    # entropy -> packed form, report (Artifact.PACKED): the encoded blob and stream sizes of each shared weight
    packed: dict[str, PackedWeight] = field(default_factory=dict)
    # calibrate -> qdq (Artifact.CALIBRATION): activation ranges
    calibration: CalibrationResult | None = None
    # qdq -> report: SQNR of every quantized tensor against the float model, worst first
    layer_errors: list[LayerError] = field(default_factory=list)
    # bitwidth -> prune, share, the search-then-verify composite (Artifact.PLAN): per-weight settings
    plan: SearchPlan | None = None
    # a pass that rewrites the graph exactly (BatchNorm folded into its Conv) -> later layer fits:
    # the original with the same rewrite, so each layer's fit target is its own output there
    rewritten_original: onnx.ModelProto | None = None
    # the manager -> every pass: weights holding NaN or Inf on purpose (a -inf attention mask, a scalar
    # -inf in a Max); they stay float, marked skipped in weights()
    nonfinite: set[str] = field(default_factory=set)
    # the manager -> passes that check fidelity (qdq's guard): the task kind the user chose (None: detected)
    task: TaskMetric | None = None
    # the manager: the artifacts whose producers have run
    available: set[Artifact] = field(default_factory=set)
    # the manager: how the run validates (None: it does not), after every pass or at the end
    verify: Callable[[onnx.ModelProto], Comparison] | None = None
    validate_each: bool = False
    validation: Comparison | None = None  # of `model` as it stands (reset by every pass that runs)
    timings: list[PassTiming] = field(default_factory=list)
    records: list[WeightRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # every pass's runs of the model for statistics: sessions cached per graph for the whole run
    statistics: Collector = field(default_factory=Collector)

    def __post_init__(self):
        self.form = Form(self.form)

    @classmethod
    def start(cls, original: onnx.ModelProto, **options) -> Context:
        """A context on a copy of `original`, its weights holding NaN/Inf and its initializer inputs noted."""
        working = onnx.ModelProto()
        working.CopyFrom(original)
        ctx = cls(original=original, model=working, **options)
        if external.is_streamed(working):  # big arrays passes hand on stay on disk, like the weights
            ctx.masks, ctx.shared = SpillingDict(working), SpillingDict(working)
        weights = find_weights(working, min_elements=0)  # every constant tensor, whatever its size
        ctx.nonfinite = set(nonfinite_weights(working, weights))
        for name in sorted(ctx.nonfinite):
            ctx.record(name, "load", f"kept float: {NONFINITE}")
        if ctx.nonfinite:
            ctx.note(f"{len(ctx.nonfinite)} float tensor(s) hold NaN or Inf ({', '.join(sorted(ctx.nonfinite)[:5])}"
                     f"{', ...' if len(ctx.nonfinite) > 5 else ''}): every pass keeps them float")
        if dropped := drop_initializer_inputs(working):
            ctx.note(f"{len(dropped)} initializer(s) were also listed as graph inputs ({', '.join(dropped[:5])}"
                     f"{', ...' if len(dropped) > 5 else ''}), defaults a caller could override: they are treated as "
                     "the constants they are and are no longer inputs of the output, so they can be compressed")
        if quantized := prequantized_weights(weights):
            kinds, size = ", ".join(sorted({w.dtype for w in quantized})), sum(w.nbytes for w in quantized)
            amount = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} KB"
            ctx.note(f"{amount} of weights ({len(quantized)} tensor(s), {kinds}) are already integer, quantized "
                     "before: the passes compress float weights, so these are kept as they are (compress the float "
                     "model this one was quantized from to go further)")
        if not external.is_streamed(working) and (bound := _size_bound(working.ByteSize(), weights)):
            ctx.note(bound)
        return ctx

    def fork(self) -> Context:
        """A copy to try passes on (the model and every artifact copied); `adopt` takes it over."""
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        return dataclasses.replace(
            self, model=model, masks=_copied(self.masks, model), shared=_copied(self.shared, model),
            layouts=dict(self.layouts), packed=_copied(self.packed, model), layer_errors=list(self.layer_errors),
            nonfinite=set(self.nonfinite), available=set(self.available), timings=list(self.timings),
            records=list(self.records), notes=list(self.notes))

    def adopt(self, trial: Context) -> None:
        """Take over the state of a fork (the model, the artifacts and the report's lines)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(trial, f.name))

    def has(self, artifact: Artifact) -> bool:
        return artifact in self.available

    @property
    def reference(self) -> onnx.ModelProto:
        """The model whose layer outputs the fits aim for: the original, as exactly rewritten so far."""
        return self.rewritten_original if self.rewritten_original is not None else self.original

    def weights(self, min_elements: int = 0) -> list[WeightInfo]:
        found = find_weights(self.model, min_elements=min_elements)
        for info in found:
            if info.name in self.nonfinite and info.skip is None:
                info.skip = NONFINITE
        return found

    def record(self, *args, **kwargs) -> WeightRecord:
        rec = WeightRecord(*args, **kwargs)
        self.records.append(rec)
        return rec

    def note(self, text: str) -> None:
        log.warning("%s", text)
        self.notes.append(text)


BOUND_NOTE_BYTES = 100_000  # smaller files (test models, toys) are all structure and get no note
BOUND_NOTE_RATIO = 3.0  # the note comes when the rest of the file caps the ratio below this


def _size_bound(file_bytes: int, weights: list[WeightInfo]) -> str | None:
    """A note when the bytes no pass compresses (integer tensors such as a streaming export's ScatterND indices, and
    the graph itself: nodes, names, shapes) cap how much smaller the file can get, else None."""
    floats = sum(w.nbytes for w in weights if w.is_float)
    others = sum(w.nbytes for w in weights if not w.is_float)
    rest = max(file_bytes - floats, 1)
    if file_bytes < BOUND_NOTE_BYTES or file_bytes / rest >= BOUND_NOTE_RATIO:
        return None

    def amount(n: int) -> str:
        return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"

    return (f"only {amount(floats)} of the {amount(file_bytes)} file are float weights, which the passes compress; "
            f"{amount(others)} are integer or other tensors (indices, shapes) and {amount(max(rest - others, 0))} "
            f"the graph itself (nodes, names), kept as they are: the file can get at most "
            f"{file_bytes / rest:.1f}x smaller")


def _copied(values: dict, model: onnx.ModelProto) -> dict:
    """A copy of an artifact dict; a spilling one spills again beside `model`."""
    if not isinstance(values, SpillingDict):
        return dict(values)
    copy = SpillingDict(model)
    for key in values:
        copy[key] = values[key]
    return copy


@dataclass
class PassResult:
    modified: bool
    summary: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class of every pass: subclass, set `name` and `Config`, implement `call`; declare the
    artifacts it makes (`produces`) and those it cannot run without (`consumes`)."""

    name: ClassVar[str] = "pass"
    produces: ClassVar[frozenset[Artifact]] = frozenset()
    consumes: ClassVar[frozenset[Artifact]] = frozenset()
    composite: ClassVar[bool] = False  # its parts are run, checked and timed as passes of their own
    needs_data: ClassVar[bool] = False  # runs only with calibration data: checked before any pass runs
    without_data: ClassVar[str] = ""  # a needs_data pass's way out for a user with no data, said in the error
    measures: ClassVar[bool] = False  # only measures, for the passes after it: never changes the model

    @dataclass(kw_only=True)
    class Config:
        pass

    def __init__(self, config: Any = None, **options):
        if config is not None and options:
            raise TypeError("give a config object or keyword options, not both")
        self.config = config if config is not None else make_config(self.Config, options, self.name)

    def requires(self, ctx: Context) -> None:
        """Raise PreconditionError when the context lacks what this pass needs (beyond `consumes`)."""

    def call(self, ctx: Context) -> PassResult:
        raise NotImplementedError

    def ensures(self, ctx: Context, result: PassResult) -> None:
        """Raise when the result breaks this pass's invariants."""

    def parts(self) -> list[Pass]:
        """The passes that run, in order: itself, or a composite's leaves."""
        return [self]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def producers(artifact: Artifact) -> list[str]:
    """Names of the passes (imported so far) that declare they produce `artifact`."""
    found, stack = set(), list(Pass.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        made = cls.__dict__.get("produces")
        if isinstance(made, frozenset) and artifact in made:
            found.add(cls.name)
    return sorted(found)


def missing_artifact(p: Pass, artifact: Artifact) -> MissingArtifactError:
    return MissingArtifactError(p.name, artifact.value, producers(artifact))


def run_step(p: Pass, ctx: Context) -> PassResult:
    """Run one pass on `ctx`: its artifacts checked, `requires`, `call`, `ensures`, timed (and validated
    after it when the run validates each pass); a composite runs its parts as steps of their own."""
    if p.composite:
        return p.call(ctx)
    done = [t.name for t in ctx.timings]
    for artifact in sorted(p.consumes - ctx.available, key=lambda a: a.name):
        raise missing_artifact(p, artifact)
    where = f"in pass '{p.name}'" + (f", after passes {done}" if done else "")
    start = time.perf_counter()
    try:
        p.requires(ctx)
        result = p.call(ctx)
    except MissingArtifactError:
        raise
    except OnnxCompressError as e:
        raise PassError(p.name, done, e) from e
    except BugError as e:
        raise BugError(f"{where}: {e}") from e
    except MemoryError:
        raise
    except Exception as e:  # an unforeseen exception in a pass is our bug (exit 1); the traceback is its cause
        raise BugError(f"{where}: {type(e).__name__}: {e}") from e
    try:
        p.ensures(ctx, result)
    except OnnxCompressError as e:  # a check that names a problem of the input
        raise PassError(p.name, done, e) from e
    except Exception as e:  # a failed postcondition: ours to fix, not the user's
        raise BugError(f"{where}: postcondition failed: {e}") from e
    ctx.available |= p.produces
    ctx.validation = None
    timing = PassTiming(p.name, time.perf_counter() - start, result.modified, result.summary, produced=p.produces)
    log.info("pass %s: %.2f s, %s", p.name, timing.seconds, result.summary)
    if ctx.validate_each and ctx.verify is not None:
        timing.validation = ctx.validation = validated(ctx, p.name)
    ctx.timings.append(timing)
    return result


def validated(ctx: Context, where: str) -> Comparison:
    """The run's validation of ctx.model; a failure names where it happened."""
    try:
        return ctx.verify(ctx.model)
    except OnnxCompressError as e:
        raise PassError(where, [t.name for t in ctx.timings], e) from e


class PassManager(Pass):
    """Runs an explicit, ordered list of passes; itself a pass, so it nests.

    As the outermost pass (`run`) it works on a copy of the model and validates: "end" compares
    the result with the original in onnxruntime once, "each" after every pass (to find the pass
    that broke fidelity), "none" skips it. `ours`: the passes are a built-in recipe, so one that
    misses an artifact is our bug (exit 1), not the user's ordering mistake (exit 2).
    """

    name = "manager"
    composite = True

    def __init__(self, passes: list[Pass], *, recipe: str = "custom", validate: str = "end",
                 form: Form | str = Form.PORTABLE, jobs: int = 1, progress: bool = True,
                 tolerance: tuple[float, float] | None = None, task: TaskMetric | None = None, ours: bool = False):
        if validate not in ("end", "each", "none"):
            raise ValueError(f"validate must be 'end', 'each' or 'none', not {validate!r}")
        self.config = None
        self.passes, self.recipe, self.validate = list(passes), recipe, validate
        self.form, self.jobs, self.progress = Form(form), jobs, progress
        self.tolerance = tolerance  # (atol, rtol) the validation also counts values outside of (a gate's)
        self.task = task  # the task kind the user chose for the validation (None: detected per output)
        self.ours = ours

    @property
    def produces(self) -> frozenset[Artifact]:
        return frozenset().union(*(p.produces for p in self.parts()))

    @property
    def consumes(self) -> frozenset[Artifact]:
        """What its parts need that no earlier part makes."""
        needed, made = set(), set()
        for p in self.parts():
            needed |= p.consumes - made
            made |= p.produces
        return frozenset(needed)

    def parts(self) -> list[Pass]:
        return [leaf for p in self.passes for leaf in p.parts()]

    def __repr__(self) -> str:
        return f"PassManager({self.passes!r})"

    def call(self, ctx: Context) -> PassResult:
        modified = False
        for p in self.passes:
            modified |= run_step(p, ctx).modified
        return PassResult(modified)

    def check_order(self, available: set[Artifact]) -> None:
        """Raise MissingArtifactError for the first part that needs an artifact no earlier part makes."""
        made = set(available)
        for p in self.parts():
            for artifact in sorted(p.consumes - made, key=lambda a: a.name):
                raise missing_artifact(p, artifact)
            made |= p.produces

    def run(self, model: onnx.ModelProto, data: Dataset | None = None,
            eval_data: Dataset | None = None) -> tuple[onnx.ModelProto, Report]:
        """Run the passes on a copy of `model`, check and validate the result."""
        ctx = Context.start(model, data=data, eval_data=eval_data, form=self.form, jobs=self.jobs,
                            progress=self.progress, task=self.task)
        check_data = eval_data or data
        if self.validate != "none" and check_data is not None and (custom := foreign_domains(model)):
            check_data = None  # onnxruntime cannot run these ops without the user's library
            ctx.note(f"validation skipped: the model uses custom ops of {sorted(custom)}, which onnxruntime runs "
                     "only with their library registered; compare the models yourself with it loaded")
        if self.validate != "none" and check_data is not None:
            ctx.verify = lambda candidate: compare_models(model, candidate, check_data, tolerance=self.tolerance,
                                                          task=self.task)
            ctx.validate_each = self.validate == "each"
        if data is None and (needy := [p for p in self.parts() if p.needs_data]):
            raise DataError(f"the recipe '{self.recipe}' needs calibration data for its '{needy[0].name}' pass: give "
                            "--data with a few hundred representative inputs"
                            + (f" ({needy[0].without_data})" if needy[0].without_data else ""))
        try:
            self.check_order(ctx.available)
            self.call(ctx)
        except MissingArtifactError as e:
            if self.ours:
                raise BugError(f"the built-in recipe '{self.recipe}' runs its passes out of order: {e}") from e
            raise
        external.check_result(ctx.model, model)
        if ctx.verify is not None and ctx.validation is None:
            ctx.validation = validated(ctx, "end")
        report = Report(recipe=self.recipe, form=ctx.form.value, passes=ctx.timings, weights=ctx.records,
                        validation=ctx.validation, notes=ctx.notes, layer_errors=ctx.layer_errors,
                        artifacts=frozenset(ctx.available))
        return ctx.model, report
