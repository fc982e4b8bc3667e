"""Finding streams in the data of a stateful model.

A stateful model (recurrent state in and out: a voice detector's LSTM state, a streaming tracker's
hidden and cell vectors) is run as a stream: each call's state outputs are the next call's state
inputs. Data recorded from such a stream holds, in consecutive feeds, state inputs equal to the
previous call's state outputs of the model that recorded it. :func:`detect_stream` finds that: it
runs the original model call by call and links each state input to the output it repeats. Where
the data is a stream, every run that judges a model's outputs goes call by call with the model's
own states (graph.stream.StateCarry), so a compressed model is charged with the error its states
carry forward, as a user streaming it would see.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx

from onnxcompress.graph.data import Dataset, InputSpec, model_inputs

from onnxcompress.graph.stream import Stream
from onnxcompress.errors import ModelError
from onnxcompress.runtime.sessions import first_line, foreign_domains, make_session

log = logging.getLogger(__name__)

PROBE_CALLS = 8  # calls run first: without a state repeated among them the data is not a stream
ATOL, RTOL = 1e-6, 1e-4  # a state input "is" the last call's output within these (another thread count, BLAS)


def detect_stream(model: onnx.ModelProto, data: Dataset) -> Stream | None:
    """The stream `data`'s feeds form for `model`, or None. Links are (input, output) pairs of one
    element type and shape where consecutive feeds repeat the output (not all zeros) as the input."""
    specs = model_inputs(model)
    pairs = _candidate_pairs(model, specs)
    if not pairs or len(data) < 2 or foreign_domains(model):
        return None
    session = make_session(model)
    outputs = list(dict.fromkeys(o for _, o in pairs))
    probe = min(len(data), PROBE_CALLS)
    links = _links(_repeats(session, data, specs, pairs, outputs, range(probe)))
    if not links:
        return None
    hits = _repeats(session, data, specs, links, list(dict.fromkeys(o for _, o in links)), range(len(data)))
    # a repeated all-zero state (None) continues too: carried or restarted, the original sees the same zeros
    continues = [False] + [all(hits[link][i - 1] is not False for link in links) for i in range(1, len(data))]
    stream = Stream(tuple(links), tuple(continues))
    log.info("streams: %s", stream.describe())
    return stream if stream.chains < len(data) else None


def _candidate_pairs(model: onnx.ModelProto, specs: list[InputSpec]) -> list[tuple[str, str]]:
    """(input, output) of the same element type and rank whose known dims agree."""
    pairs = []
    for output in model.graph.output:
        kind = output.type.tensor_type
        if not output.type.HasField("tensor_type") or not kind.elem_type:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in kind.shape.dim] \
            if kind.HasField("shape") else None
        for spec in specs:
            if not spec.fed or spec.dtype != dtype or dtype.kind != "f" or spec.name == output.name:
                continue
            if dims is not None and spec.shape is not None and (
                    len(dims) != len(spec.shape)
                    or any(isinstance(a, int) and b is not None and a != b for a, b in zip(spec.shape, dims))):
                continue
            pairs.append((spec.name, output.name))
    return pairs


def _repeats(session, data: Dataset, specs, pairs, outputs, calls) -> dict[tuple[str, str], list[bool | None]]:
    """Per pair, per consecutive (call i-1, call i) in `calls`: does feed i repeat output i-1 (None: the
    repeated value is all zeros, which says nothing, or the shapes differ)?"""
    hits: dict[tuple[str, str], list[bool | None]] = {p: [] for p in pairs}
    last = None
    for i in calls:
        feed = data.feed(i, specs)
        if last is not None:
            for name, output in pairs:
                hits[(name, output)].append(_repeat(np.asarray(feed[name]), last[output]))
        try:
            last = dict(zip(outputs, session.run(outputs, feed)))
        except Exception as e:  # onnxruntime raises its own exception types
            raise ModelError(f"onnxruntime failed on {data.source}, sample {i}: {first_line(e)}") from e
    return hits


def _repeat(given: np.ndarray, produced: np.ndarray) -> bool | None:
    if given.size != produced.size:
        return False
    same = bool(np.allclose(given.reshape(-1), produced.reshape(-1), atol=ATOL, rtol=RTOL))
    return None if same and not np.any(given) else same


def _links(hits) -> list[tuple[str, str]]:
    """Each input's output: the one it repeats most often (a nonzero repeat at least once)."""
    best: dict[str, tuple[int, str]] = {}
    for (name, output), found in hits.items():
        count = sum(1 for h in found if h)
        if count and count > best.get(name, (0, ""))[0]:
            best[name] = (count, output)
    return [(name, output) for name, (_, output) in best.items()]
