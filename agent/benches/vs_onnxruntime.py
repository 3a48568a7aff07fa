"""Inference latency of the agent (tract) against onnxruntime, model by model.

What it measures
----------------
For every model in ``agent/tests/compat/*.onnx`` that has a sibling ``NAME.json``
fixture (input names, dtypes and shapes come from its "inputs", with the first axis set
to 1, i.e. batch 1; ``unsupported_op.onnx`` has none and is skipped),
plus ``cnn224``, a small MobileNet-like CNN on a 1x3x224x224 image that this script
generates with seeded random weights into a temporary directory (it is never
committed), it times single inferences in both runtimes in the same run:

* onnxruntime (Python, CPUExecutionProvider, 1 intra-op thread (``--threads N``: N),
  1 inter-op thread,
  ORT_SEQUENTIAL, graph optimizations at ORT_ENABLE_ALL): 3 warm-up runs, then N timed
  ``session.run`` calls with ``time.perf_counter`` on random inputs
  (``np.random.default_rng(7)``, floats uniform in [0, 1)). The time includes the
  Python binding's overhead (a few microseconds to tens of microseconds per call), which
  dominates for the smallest models.
* the agent: ``edgeloop-agent bench MODEL --input NAME:DIMS:DTYPE ... --runs N
  --warmup 3 --threads T --output json``, which loads the model the way the agent does (parse, type,
  optimize, plan) and times N runs in-process; the last stdout line is a JSON report.

Both sides report p50 and p99 as nearest-rank percentiles of the N timings. N defaults
to 200 (50 for ``cnn224``); ``--runs N`` sets it for every model. The result is a
markdown table: p50/p99 of both runtimes, the ratio agent/onnxruntime of the p50s, and
the agent's load time and peak resident memory.

How to run it (from the repository root)
----------------------------------------
    /tmp/venv-compat/bin/pip install numpy onnx onnxruntime
    cargo build --release -p edgeloop-agent
    /tmp/venv-compat/bin/python3 agent/benches/vs_onnxruntime.py \
        [--agent target/release/edgeloop-agent] [--runs N] [--threads N] [--only MODEL]

Run it on an otherwise idle machine: both runtimes are single-threaded, and anything
else on the CPU (a cargo build, say) skews the numbers.

The exit status is non-zero if the agent binary is missing, or if any model fails in
either runtime (the other models are still measured, and the failures are listed at
the end).

This is test tooling only: Python is never part of the product, which runs models with
tract alone.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[2]
COMPAT = REPO / "agent" / "tests" / "compat"
DEFAULT_AGENT = REPO / "target" / "release" / "edgeloop-agent"
WARMUP = 3
DEFAULT_RUNS = 200
DEFAULT_RUNS_CNN224 = 50
AGENT_TIMEOUT_S = 1800

NP_DTYPES = {
    "f32": np.float32,
    "f64": np.float64,
    "i64": np.int64,
    "i32": np.int32,
    "u8": np.uint8,
    "bool": np.bool_,
}


# --------------------------------------------------------------------------- models


def compat_models() -> list[dict]:
    """The compatibility-suite models, with their inputs at batch 1.

    A model without a ``NAME.json`` fixture (``unsupported_op.onnx``, which is meant to
    fail to load) is skipped, with a note on stderr.
    """
    models = []
    for path in sorted(glob.glob(str(COMPAT / "*.onnx"))):
        path = Path(path)
        fixture = path.with_suffix(".json")
        if not fixture.exists():
            print(f"note: skipping {path.name}: no {fixture.name} fixture", file=sys.stderr)
            continue
        inputs = []
        for spec in json.loads(fixture.read_text())["inputs"]:
            shape = list(spec["shape"])
            if shape:
                shape[0] = 1
            inputs.append((spec["name"], spec["dtype"], shape))
        models.append({"name": path.stem, "path": path, "inputs": inputs, "runs": DEFAULT_RUNS,
                       "error": None if inputs else f"no inputs in {fixture.name}"})
    return models


def build_cnn224(directory: Path) -> Path:
    """A small MobileNet-like CNN on 1x3x224x224, seeded random weights; returns its path."""
    rng = np.random.default_rng(224)
    nodes, inits = [], []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv_bn_relu(x: str, prefix: str, cin: int, cout: int, k: int, stride: int,
                     group: int) -> str:
        fan_in = (cin // group) * k * k
        w = rng.normal(0.0, math.sqrt(2.0 / fan_in), size=(cout, cin // group, k, k))
        pad = k // 2
        nodes.append(helper.make_node(
            "Conv", [x, const(f"{prefix}_w", w)], [f"{prefix}_conv"], name=f"{prefix}_conv",
            kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group))
        nodes.append(helper.make_node(
            "BatchNormalization",
            [f"{prefix}_conv",
             const(f"{prefix}_scale", rng.uniform(0.5, 1.5, cout)),
             const(f"{prefix}_bias", rng.normal(0.0, 0.1, cout)),
             const(f"{prefix}_mean", rng.normal(0.0, 0.1, cout)),
             const(f"{prefix}_var", rng.uniform(0.5, 1.5, cout))],
            [f"{prefix}_bn"], name=f"{prefix}_bn", epsilon=1e-5))
        nodes.append(helper.make_node("Relu", [f"{prefix}_bn"], [f"{prefix}_relu"],
                                      name=f"{prefix}_relu"))
        return f"{prefix}_relu"

    x = conv_bn_relu("image", "stem", 3, 16, 3, 2, 1)
    channels = [16, 32, 64, 128, 128]
    strides = [2, 2, 2, 1]
    for i, stride in enumerate(strides):
        cin, cout = channels[i], channels[i + 1]
        x = conv_bn_relu(x, f"b{i}_dw", cin, cin, 3, stride, cin)
        x = conv_bn_relu(x, f"b{i}_pw", cin, cout, 1, 1, 1)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flat", axis=1))
    nodes.append(helper.make_node(
        "Gemm", ["flat", const("fc_w", rng.normal(0.0, math.sqrt(1.0 / 128), (1000, 128))),
                 const("fc_b", np.zeros(1000))],
        ["logits"], name="fc", transB=1))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax",
                                  axis=1))
    graph = helper.make_graph(
        nodes, "cnn224",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 1000])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="edgeloop vs_onnxruntime.py")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = directory / "cnn224.onnx"
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------------------- timing


def percentile(sorted_ms: list[float], p: float) -> float:
    """Nearest-rank percentile, the same definition as the agent's bench."""
    rank = math.ceil(p * len(sorted_ms))
    return sorted_ms[min(max(rank, 1), len(sorted_ms)) - 1]


def random_input(rng: np.random.Generator, dtype: str, shape: list[int]) -> np.ndarray:
    np_dtype = NP_DTYPES[dtype]
    if np.issubdtype(np_dtype, np.floating):
        return rng.random(shape, dtype=np.float64).astype(np_dtype)
    if np_dtype is np.bool_:
        return rng.random(shape) < 0.5
    return rng.integers(0, 8, size=shape).astype(np_dtype)


def bench_ort(model: dict, runs: int, threads: int) -> dict:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(model["path"]), options,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    feeds = {name: random_input(rng, dtype, shape) for name, dtype, shape in model["inputs"]}
    for _ in range(WARMUP):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"p50_ms": percentile(times, 0.50), "p99_ms": percentile(times, 0.99)}


def bench_agent(agent: Path, model: dict, runs: int, threads: int) -> dict:
    cmd = [str(agent), "bench", str(model["path"])]
    for name, dtype, shape in model["inputs"]:
        cmd += ["--input", f"{name}:{'x'.join(map(str, shape))}:{dtype}"]
    cmd += ["--runs", str(runs), "--warmup", str(WARMUP), "--threads", str(threads),
            "--output", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=AGENT_TIMEOUT_S)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        detail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
        raise RuntimeError(f"exit status {proc.returncode}: {' | '.join(detail[-3:])}")
    try:
        report = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise RuntimeError(f"last stdout line is not JSON ({e}): {lines[-1][:200]}") from e
    given = [(n, d, s) for n, d, s in model["inputs"]]
    ran = [(t["name"], t["dtype"], t["shape"]) for t in report.get("inputs", [])]
    if sorted(ran) != sorted(given):
        report["_warning"] = f"agent ran inputs {ran}, asked for {given}"
    return report


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agent", type=Path, default=DEFAULT_AGENT,
                        help=f"the edgeloop-agent binary (default: {DEFAULT_AGENT})")
    parser.add_argument("--runs", type=int, default=None,
                        help=f"timed runs per model and runtime (default: {DEFAULT_RUNS}, "
                             f"{DEFAULT_RUNS_CNN224} for cnn224)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads of onnxruntime and --threads of the agent "
                             "(default: 1)")
    parser.add_argument("--only", action="append", default=None, metavar="MODEL",
                        help="measure only this model (repeatable)")
    args = parser.parse_args()
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")

    agent = args.agent.resolve()
    if not (agent.is_file() and os.access(agent, os.X_OK)):
        print(f"error: no agent binary at {agent}; build it with "
              f"`cargo build --release -p edgeloop-agent` or pass --agent PATH",
              file=sys.stderr)
        return 2

    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, numpy {np.__version__}; "
          f"agent {agent}", file=sys.stderr)
    rows, failures, warnings = [], [], []
    with tempfile.TemporaryDirectory(prefix="edgeloop-vs-ort-") as tmp:
        models = compat_models()
        try:
            models.append({"name": "cnn224", "path": build_cnn224(Path(tmp)),
                           "inputs": [("image", "f32", [1, 3, 224, 224])],
                           "runs": DEFAULT_RUNS_CNN224, "error": None})
        except Exception as e:  # noqa: BLE001 - report and go on
            failures.append(f"cnn224: building the model failed: {e}")
        for model in models:
            name = model["name"]
            if args.only and name not in args.only:
                continue
            if model["error"]:
                failures.append(f"{name}: {model['error']}")
                continue
            runs = args.runs if args.runs is not None else model["runs"]
            print(f"{name}: {runs} runs ...", file=sys.stderr, flush=True)
            ort_result = agent_result = None
            try:
                ort_result = bench_ort(model, runs, args.threads)
            except Exception as e:  # noqa: BLE001
                failures.append(f"{name}: onnxruntime failed: {e}")
            try:
                agent_result = bench_agent(agent, model, runs, args.threads)
                if "_warning" in agent_result:
                    warnings.append(f"{name}: {agent_result['_warning']}")
                for d in agent_result.get("defaulted") or []:
                    warnings.append(f"{name}: agent note: {d}")
            except Exception as e:  # noqa: BLE001
                failures.append(f"{name}: agent failed: {e}")
            rows.append((model, ort_result, agent_result))

    def f(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    print("| model | input | onnxruntime p50 ms | agent p50 ms | ratio (agent/ort) "
          "| onnxruntime p99 | agent p99 | agent load ms | agent peak RSS KiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for model, o, a in rows:
        inputs = ", ".join(f"{n} {d} {'x'.join(map(str, s))}" for n, d, s in model["inputs"])
        ratio = (a["p50_ms"] / o["p50_ms"]) if (o and a and o["p50_ms"] > 0) else None
        rss = a.get("peak_rss_kb") if a else None
        print(f"| {model['name']} | {inputs} | {f(o and o['p50_ms'])} | "
              f"{f(a and a['p50_ms'])} | {f(ratio, 2)} | {f(o and o['p99_ms'])} | "
              f"{f(a and a['p99_ms'])} | {f(a and a['load_ms'], 1)} | "
              f"{'-' if rss is None else rss} |")

    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if failures:
        print(f"\n{len(failures)} failure(s):", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
