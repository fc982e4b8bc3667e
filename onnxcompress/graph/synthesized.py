"""Inputs made from a model's declarations: --shape parsing, the shape of each synthesized input, and
random feeds of those shapes (where the user gives no data).

Graph layer. runtime.synthesis checks that such feeds run.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from onnxcompress.errors import DataError
from onnxcompress.graph.data import Dataset, InputSpec
from onnxcompress.numerics.limits import MAX_SYNTH_ELEMENTS, element_count


def parse_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``name=1,3,224,224`` strings from the command line (every dimension >= 1)."""
    shapes = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            shapes[name] = tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError:
            sep = ""
        if not sep or not name:
            raise DataError(f"--shape '{item}' is not of the form name=1,3,224,224")
        if any(d < 1 for d in shapes[name]):
            raise DataError(f"--shape '{item}': every dimension must be at least 1")
    return shapes


def synthesis_shapes(specs: Sequence[InputSpec], shapes: Mapping[str, tuple[int, ...]] | None = None
                     ) -> dict[str, tuple[int, ...]]:
    """The shape of each synthesized input: `shapes` (from --shape), else the declared one with 1 for
    symbolic dims. DataError for a --shape that contradicts the model or a feed over MAX_SYNTH_ELEMENTS."""
    shapes = dict(shapes or {})
    names = [s.name for s in specs]
    for name in shapes.keys() - set(names):
        raise DataError(f"--shape names '{name}', which is not an input of the model (its inputs: {names})")
    out, total = {}, 0
    for spec in specs:
        if not spec.fed:  # left out (optional) or an empty sequence: nothing to synthesize
            if spec.name in shapes:
                raise DataError(f"--shape names '{spec.name}', an optional or sequence-typed input onnxcompress "
                                "does not synthesize")
            continue
        if spec.name in shapes:
            shape = shapes[spec.name]
            fixed = spec.shape is not None and (len(shape) != len(spec.shape) or any(
                isinstance(want, int) and want > 0 and want != got for want, got in zip(spec.shape, shape)))
            if fixed:
                raise DataError(f"--shape {spec.name}={','.join(map(str, shape))} does not fit the model's "
                                f"declared shape {spec.describe()}")
            where = f"--shape {spec.name}={','.join(map(str, shape))}"
        elif spec.shape is None:
            raise DataError(f"input '{spec.name}' has no declared shape; give --shape {spec.name}=... or --data")
        else:
            shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in spec.shape)
            where = f"input '{spec.name}' declared as {spec.describe()}"
        count = element_count(shape)
        total += count
        if count > MAX_SYNTH_ELEMENTS or total > MAX_SYNTH_ELEMENTS:
            raise DataError(f"{where} asks for {count} elements per synthesized feed ({total} with the inputs "
                            f"before it), more than the {MAX_SYNTH_ELEMENTS} onnxcompress synthesizes; give --data "
                            "(or a smaller --shape)")
        out[spec.name] = shape
    return out


def synthesize(specs: Sequence[InputSpec], *, shapes: Mapping[str, tuple[int, ...]] | None = None,
               n: int = 8, seed: int = 0) -> Dataset:
    """Random feeds from the declared shapes (dynamic dims from `shapes`, else 1).

    Random inputs exercise the model but measure fidelity weakly; callers warn the user.
    """
    sizes = synthesis_shapes(specs, shapes)
    specs = [spec for spec in specs if spec.fed]
    for spec in specs:
        _random(np.random.default_rng(seed), spec.dtype, (0,))  # an unsupported dtype fails before any work
    rng = np.random.default_rng(seed)
    feeds = [{spec.name: _random(rng, spec.dtype, sizes[spec.name]) for spec in specs} for _ in range(n)]
    data = Dataset(feeds, source="synthesized inputs")
    data.synthetic = True
    data.guessed = [s.name for s in specs if s.name not in (shapes or {}) and s.shape is not None
                    and not all(isinstance(d, int) and d > 0 for d in s.shape)]
    return data


def _random(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Random values of `shape`, as an array even for a scalar (shape ()): numpy's generators return a
    numpy scalar there, which onnxruntime refuses as a feed ('Unable to handle object of type numpy.bool')."""
    if np.issubdtype(dtype, np.floating):
        return np.asarray(rng.standard_normal(shape), dtype=dtype)
    if dtype == np.bool_:
        return np.asarray(rng.random(shape) < 0.5)
    if np.issubdtype(dtype, np.integer):
        return np.asarray(rng.integers(0, 2, size=shape), dtype=dtype)  # small values: safe as indices and lengths
    raise DataError(f"cannot synthesize inputs of dtype {dtype}; give --data")
