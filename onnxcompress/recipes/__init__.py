"""Recipes: an explicit, ordered list of passes with their options.

A recipe file is YAML::

    name: share-4bit
    passes:
      - share: {bits_fc: 4}

Each entry is a pass name, or a one-key mapping from a pass name to its options.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from onnxcompress.errors import RecipeError
from onnxcompress.formats.forms import Form

if TYPE_CHECKING:  # the pipeline imports onnxruntime: listing recipes and --help work without a runtime
    from onnxcompress.pipeline.manager import Pass

BUILTIN: dict[str, list[tuple[str, dict[str, Any]]]] = {
    # k-means weight sharing alone: 8 bits for conv, 5 for fully connected (Han et al.)
    "share": [("share", {})],
    # 4-bit codebooks everywhere (codes two a byte at any opset, ~8x), granularity chosen per layer by measured
    # output error (per-tensor, per-channel scales, per-group, outliers; GPTQ codes with --data)
    "share-4bit": [("share", {"bits_conv": 4, "bits_fc": 4, "bits_other": 4, "min_elements": 0,
                              "granularity": "auto"})],
    # static int8 QDQ: uint8 activations with MSE-optimal clipping, int8 per-channel weights,
    # int32 biases with bias correction
    "int8": [("calibrate", {"method": "mse"}), ("qdq", {})],
    # dynamic int8 (no data): MatMul/Gemm activations quantized at run time, weight-only int8 elsewhere
    "int8-dynamic": [("qdq", {"mode": "dynamic"})],
    # weight-only int8 (per-channel), activations stay float
    "int8-weights": [("qdq", {"mode": "weights"})],
    # weight-only: blocked int4 for MatMul/Gemm (onnxruntime MatMulNBits), int8 elsewhere
    "int4-weights": [("qdq", {"mode": "weights", "int4_matmul": True})],
    # Deep Compression (Han et al. 2016): prune, share with the zeros kept exact, CSR with
    # relative indices, entropy coding; the packed form (custom ops; `unpack` gives portable).
    # With data, per-layer sparsity and bits come from the bit-width search, to a tolerance of one
    # point of accuracy (measured with labelled --eval-data, else estimated from the float model's
    # own class probabilities), the bound the paper's "no loss" is read to here; without data it runs
    # NO_DATA's settings instead (the paper's fixed ones: deep-compression-fixed). The search measures
    # one codebook per tensor (the paper's), so share codes what was measured: its "auto" choice would
    # spend bytes the search did not plan for.
    "deep-compression": [("bitwidth", {"max_drop": 1.0}), ("prune", {}),
                         ("share", {"granularity": "tensor"}), ("sparse", {}), ("entropy", {})],
    # the same passes with the paper's fixed per-role settings and no search
    "deep-compression-fixed": [("prune", {}), ("share", {}), ("sparse", {}), ("entropy", {})],
    # magnitude pruning alone (refit on the calibration data when given)
    "prune": [("prune", {})],
    # Deep Compression in standard ONNX: the same search, pricing the portable form (bit-packed codes,
    # relative indices where smaller), then prune and share; without data NO_DATA's `share`
    "deep-compression-portable": [("bitwidth", {"max_drop": 1.0}),
                                  ("prune", {}), ("share", {"granularity": "tensor"})],
    # per-layer bits and sparsity searched to a budget (--max-drop, --min-sqnr or --target-ratio),
    # then Deep Compression with those settings
    "auto": [("bitwidth", {}), ("prune", {}), ("share", {"granularity": "tensor"}), ("sparse", {}), ("entropy", {})],
}
DESCRIPTIONS = {
    "share": "k-means weight sharing: 8-bit codebooks for conv, 5-bit for fully connected, portable form",
    "share-4bit": "4-bit k-means sharing of every weight, granularity chosen per layer (give --data), portable",
    "int8": "static int8 QDQ (with --data; without, it runs int8-dynamic): MSE-clipped activations, per-channel "
            "weights, per-layer SQNR; "
            "activations that cost 1% of the task's answers (--metric) on the data stay float (else dynamic or "
            "weight-only int8, the weights that break it kept float)",
    "int8-dynamic": "dynamic int8, no data needed: MatMul/Gemm with activation ranges computed at run time "
                    "(onnxruntime's integer kernels, as its quantize_dynamic), weight-only int8 per channel elsewhere",
    "int8-weights": "weight-only int8 per-channel (DequantizeLinear), float activations, no data needed",
    "int4-weights": "weight-only blocked int4 for MatMul/Gemm (MatMulNBits in onnxruntime), int8 elsewhere",
    "deep-compression": "per-layer sparsity/bits searched to 1 point of accuracy (--data), then prune + share + "
                        "sparse (CSR, relative indices) + entropy (Huffman/ANS), packed form; without data, share "
                        "packed",
    "deep-compression-fixed": "deep-compression with the paper's fixed per-role sparsity and bits (no search), packed",
    "prune": "magnitude pruning (~91% of fc, 65% of conv weights), kept weights refit on calibration data",
    "deep-compression-portable": "deep-compression's search (--data) then prune + share, in standard ONNX ops only: "
                                 "bit-packed codes, relative indices, folded by onnxruntime at load; without data, "
                                 "share",
    "auto": "bits and sparsity per layer searched to --max-drop/--min-sqnr/--target-ratio, then deep-compression; "
            "with no data at all only --target-ratio is searched, else share packed",
}


@dataclass
class Recipe:
    name: str
    steps: list[tuple[str, dict[str, Any]]]
    form: Form = Form.PORTABLE  # the output form the recipe writes unless --form says otherwise
    builtin: bool = False  # one of ours: passes out of order are our bug, not the user's

    def __post_init__(self):
        self.form = Form(self.form)

    def with_options(self, pass_name: str, **options: Any) -> "Recipe":
        """A copy whose every `pass_name` step also gets `options` (command-line budgets, say)."""
        if not any(p == pass_name for p, _ in self.steps):
            raise RecipeError(f"recipe '{self.name}' has no '{pass_name}' pass to take {sorted(options)}")
        steps = [(p, {**o, **options} if p == pass_name else dict(o)) for p, o in self.steps]
        return Recipe(self.name, steps, form=self.form, builtin=self.builtin)

    def search_step(self) -> str | None:
        """The name of the recipe's per-layer search pass (the one that produces a search plan), if any."""
        from onnxcompress.pipeline.artifacts import Artifact

        classes = _pass_classes(self.name, [p for p, _ in self.steps])
        return next((p for (p, _), cls in zip(self.steps, classes) if Artifact.PLAN in cls.produces), None)

    def with_budget(self, **budget: Any) -> "Recipe":
        """A copy whose search pass takes `budget` (--max-drop, --target-ratio ...)."""
        search = self.search_step()
        if search is None:
            raise RecipeError(f"recipe '{self.name}' has no per-layer search (such as 'bitwidth') to take "
                              f"{sorted(budget)}")
        return self.with_options(search, **budget)

    def for_data(self, calibration: bool, evaluation: bool) -> tuple["Recipe", str | None]:
        """The recipe to run with or without calibration and evaluation data, and a note when it is another one: a
        built-in recipe that cannot do its job without data runs its no-data counterpart (NO_DATA), said in the
        report. A search to a size (target_ratio) needs no data to meet its bound and runs as it is."""
        fallback = NO_DATA.get(self.name) if self.builtin and not calibration else None
        if fallback is None or (evaluation and fallback.evaluation_suffices):
            return self, None
        search = self.search_step()
        if search and any(o.get("target_ratio") for p, o in self.steps if p == search):
            return self, None
        self.build()  # its options are checked all the same: a wrong budget is the user's to hear of
        return (Recipe(fallback.name, [(p, dict(o)) for p, o in fallback.steps], form=fallback.form, builtin=True),
                f"no --data: '{self.name}' ran as '{fallback.name}' ({fallback.runs}); {fallback.why}")

    def build(self) -> list[Pass]:
        """The recipe's passes in order; a search pass and every pass after it become one search-then-verify
        composite, which checks the search's plan on the real passes end to end."""
        from onnxcompress.pipeline.artifacts import Artifact
        from onnxcompress.pipeline.manager import PassManager
        from onnxcompress.pipeline.search import SearchThenVerify

        classes = _pass_classes(self.name, [p for p, _ in self.steps])
        passes = [cls(**options) for cls, (_, options) in zip(classes, self.steps)]
        search = next((i for i, p in enumerate(passes) if Artifact.PLAN in p.produces), None)
        if search is None:
            return passes
        return passes[:search] + [SearchThenVerify(search=passes[search], rest=PassManager(passes[search + 1:]))]


def _pass_classes(recipe: str, names: list[str]) -> list[type[Pass]]:
    from onnxcompress.passes import PASSES

    for pass_name in names:
        if pass_name not in PASSES:
            close = difflib.get_close_matches(pass_name, PASSES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known passes: {sorted(PASSES)}"
            raise RecipeError(f"recipe '{recipe}': unknown pass '{pass_name}'{hint}")
    return [PASSES[name] for name in names]


MAX_RECIPE_BYTES = 1 << 20


class _RecipeLoader(yaml.SafeLoader):
    """yaml's safe loader without aliases: a recipe has no use for them, and aliases of aliases expand
    exponentially once the document is walked (the 'billion laughs' bomb: a few hundred bytes that
    never finish printing)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"found the alias *{event.anchor}; recipes may not use "
                                              "YAML anchors and aliases", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        """A key given twice is refused (yaml keeps the last silently: `passes:` twice ran only the second list)."""
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if key is not None and key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {key[:100]!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name, or a recipe YAML file."""
    text = str(name_or_path)
    if text in BUILTIN:
        steps = [(p, dict(o)) for p, o in BUILTIN[text]]
        return Recipe(text, steps, form=FORMS.get(text, Form.PORTABLE), builtin=True)
    path = Path(text)
    if not path.suffix.lower() in (".yaml", ".yml") or not path.exists():
        close = difflib.get_close_matches(text, BUILTIN, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise RecipeError(f"'{text}' is neither a built-in recipe ({', '.join(sorted(BUILTIN))}) "
                          f"nor an existing .yaml recipe file{hint}")
    if not path.is_file():
        raise RecipeError(f"recipe '{path}' is not a file (a folder?); give a .yaml recipe file")
    try:
        raw = path.read_bytes()
        if len(raw) > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe file '{path}' holds {len(raw)} bytes; a recipe is a short list of passes "
                              f"(at most {MAX_RECIPE_BYTES} bytes)")
        doc = yaml.load(raw.decode("utf-8"), Loader=_RecipeLoader)
    except RecursionError as e:
        raise RecipeError(f"recipe file '{path}' nests too deeply to be a recipe") from e
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe file '{path}' is not UTF-8 text (byte {e.start} is invalid)") from e
    except OSError as e:
        raise RecipeError(f"cannot read recipe file '{path}': {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from e
    except ValueError as e:  # a number of thousands of digits (Python's int conversion limit)
        raise RecipeError(f"recipe file '{path}' holds a value YAML cannot read ({str(e).split(';')[0]})") from e
    return _parse(doc, path.stem, str(path))


@dataclass(frozen=True)
class NoData:
    """What a built-in recipe runs when no calibration data is given: `name` and `runs` say it in the report, `why`
    says what data would give; `evaluation_suffices`: the recipe runs as it is on --eval-data alone (a search)."""
    name: str
    steps: list[tuple[str, dict[str, Any]]]
    form: Form
    runs: str
    why: str
    evaluation_suffices: bool = False


_SEARCH_WITHOUT_DATA = ("its search measures what each layer tolerates on your inputs, and on random inputs that "
                        "measure holds nothing (on trained models it kept 56% of a face detector's crops and 0.3% of a "
                        "tagger's sentences while reading 100% on random ones); give --data with a few hundred "
                        "representative inputs, or --recipe deep-compression-fixed for the paper's fixed settings")
_SHARED_PACKED = NoData("share (packed)", BUILTIN["share"] + [("sparse", {}), ("entropy", {})], Form.PACKED,
                        "k-means sharing at 8 bits for conv, 5 for the rest, entropy-coded, packed: settings that "
                        "hold without knowing the model", _SEARCH_WITHOUT_DATA)
# a built-in recipe that cannot do its job without calibration data, and what runs in its place
NO_DATA: dict[str, NoData] = {
    "int8": NoData("int8-dynamic", BUILTIN["int8-dynamic"], Form.PORTABLE, DESCRIPTIONS["int8-dynamic"],
                   "give --data with a few hundred representative inputs for static int8 (activation ranges "
                   "calibrated ahead of time, no quantization work at run time)"),
    "deep-compression": _SHARED_PACKED,
    "auto": replace(_SHARED_PACKED, evaluation_suffices=True),  # auto searches on --eval-data alone
    "deep-compression-portable": NoData("share", BUILTIN["share"], Form.PORTABLE, DESCRIPTIONS["share"],
                                        _SEARCH_WITHOUT_DATA),
}
# the built-in recipes that write the packed form (the others: portable)
FORMS: dict[str, Form] = {"deep-compression": Form.PACKED, "deep-compression-fixed": Form.PACKED, "auto": Form.PACKED}


# options whose value names code to import and run: only the command line or the Python API may set them
CODE_OPTIONS = frozenset({"metric"})


def _parse(doc: Any, default_name: str, where: str) -> Recipe:
    if not isinstance(doc, dict) or not isinstance(doc.get("passes"), list):
        raise RecipeError(f"recipe '{where}' must be a mapping with a 'passes' list")
    unknown = set(doc) - {"name", "passes", "form"}
    if unknown:
        raise RecipeError(f"recipe '{where}': unknown key(s) {sorted(unknown)}; allowed: name, passes, form")
    steps = []
    for entry in doc["passes"]:
        if isinstance(entry, str):
            steps.append((entry, {}))
        elif isinstance(entry, dict) and len(entry) == 1:
            (pass_name, options), = entry.items()
            if options is not None and not isinstance(options, dict):
                raise RecipeError(f"recipe '{where}': options of pass '{pass_name}' must be a mapping")
            if isinstance(options, dict) and CODE_OPTIONS & set(options):
                raise RecipeError(f"recipe '{where}': option(s) {sorted(CODE_OPTIONS & set(options))} of pass "
                                  f"'{pass_name}' name code to run, which a recipe file may not do; give "
                                  "--metric MODULE:FUNCTION on the command line instead")
            steps.append((str(pass_name), dict(options or {})))
        else:
            raise RecipeError(f"recipe '{where}': each pass is a name or a one-key mapping name: {{options}}, "
                              f"not {entry!r}")
    form = doc.get("form", "portable")
    if form not in [f.value for f in Form]:
        raise RecipeError(f"recipe '{where}': form must be 'portable' or 'packed', not {form!r}")
    name = str(doc.get("name", default_name))
    classes = _pass_classes(name, [p for p, _ in steps])
    if all(cls.measures for cls in classes):  # the output would be the input, written out as if compressed
        which = f"only measures ({', '.join(sorted({c.name for c in classes}))})" if classes else "has no passes"
        raise RecipeError(f"recipe '{where}' {which}: it cannot change the model; add a pass that compresses "
                          "(share, prune, qdq; see `onnxcompress recipes --options`)")
    return Recipe(name, steps, form=form)
