#!/usr/bin/env python3
"""Regenerates the example vibration-fault classifier used by `edgeloop demo` and the tests.

Writes, next to this script:
  model_v1.onnx / reference_v1.csv   trained on the machine's original operating regime
  model_v2.onnx / reference_v2.csv   retrained after the covariate shift (a hotter, louder machine)
  holdout_v2.csv                     labelled rows from the shifted regime, for checks

The synthetic distribution below is the same one that the agent's synthetic sensor source
draws from (agent/src/source.rs, `VibrationGenerator`): change both together.

The network is an sklearn MLPClassifier. It is written out with the plain `onnx` helper as
standard ops only (Sub, Div, MatMul, Add, Relu, Sigmoid, Concat), because tract runs every
standard op, while skl2onnx's StandardScaler output (`ai.onnx.ml.Scaler`) it does not.
Outputs are checked against sklearn's predict_proba with onnxruntime before writing.

    pip install numpy scikit-learn onnx onnxruntime
    python3 controller/assets/vibration/make_model.py
"""
import csv
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sklearn.neural_network import MLPClassifier

HERE = os.path.dirname(os.path.abspath(__file__))
FEATURES = ["rms", "peak", "kurtosis", "temperature"]
FAULT_RATE = 0.1
# The covariate shift the demo injects: the machine runs hotter and louder.
SHIFT_TEMPERATURE = 12.0
SHIFT_RMS_FACTOR = 1.4


def sample(rng, n, shifted):
    fault = rng.random(n) < FAULT_RATE
    rms = np.where(fault, rng.normal(1.8, 0.3, n), rng.normal(1.0, 0.15, n))
    crest = np.where(fault, rng.normal(4.5, 0.5, n), rng.normal(3.0, 0.3, n))
    kurtosis = np.where(fault, rng.normal(6.0, 1.2, n), rng.normal(3.0, 0.4, n))
    temperature = np.where(fault, rng.normal(55.0, 4.0, n), rng.normal(45.0, 3.0, n))
    if shifted:
        rms = rms * SHIFT_RMS_FACTOR
        temperature = temperature + SHIFT_TEMPERATURE
    peak = rms * crest
    x = np.stack([rms, peak, kurtosis, temperature], axis=1).astype(np.float32)
    return x, fault.astype(np.int64)


def to_onnx(clf, mean, std, name):
    inits = [
        numpy_helper.from_array(mean.astype(np.float32), "mean"),
        numpy_helper.from_array(std.astype(np.float32), "std"),
        numpy_helper.from_array(np.array([1.0], dtype=np.float32), "one"),
    ]
    nodes = [
        helper.make_node("Sub", ["features", "mean"], ["centered"]),
        helper.make_node("Div", ["centered", "std"], ["h0"]),
    ]
    layers = len(clf.coefs_)
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array(b.astype(np.float32), f"b{i}"))
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"m{i}"]))
        last = i == layers - 1
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], ["logit" if last else f"a{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"h{i + 1}"]))
    nodes += [
        helper.make_node("Sigmoid", ["logit"], ["p_fault"]),
        helper.make_node("Sub", ["one", "p_fault"], ["p_normal"]),
        helper.make_node("Concat", ["p_normal", "p_fault"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", len(FEATURES)])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="edgeloop-make-model")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_csv(path, x, labels=None):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FEATURES + (["label"] if labels is not None else []))
        for i, row in enumerate(x):
            cells = [f"{v:.5g}" for v in row]
            if labels is not None:
                cells.append(str(int(labels[i])))
            w.writerow(cells)


def build(version, shifted, seed):
    rng = np.random.default_rng(seed)
    x, y = sample(rng, 6000, shifted)
    mean, std = x.mean(axis=0), x.std(axis=0)
    clf = MLPClassifier(hidden_layer_sizes=(16, 8), max_iter=600, random_state=seed)
    clf.fit((x - mean) / std, y)
    model = to_onnx(clf, mean, std, f"vibration_v{version}")
    path = os.path.join(HERE, f"model_v{version}.onnx")
    onnx.save(model, path)

    check, check_y = sample(rng, 500, shifted)
    expected = clf.predict_proba((check - mean) / std)
    got = ort.InferenceSession(path).run(None, {"features": check})[0]
    assert np.allclose(expected, got, atol=1e-4), "onnx export disagrees with sklearn"
    acc = (got.argmax(axis=1) == check_y).mean()
    print(f"model_v{version}: accuracy {acc:.3f} on its own regime")

    ref, _ = sample(rng, 1000, shifted)
    write_csv(os.path.join(HERE, f"reference_v{version}.csv"), ref)
    if shifted:
        hx, hy = sample(rng, 300, shifted)
        write_csv(os.path.join(HERE, f"holdout_v{version}.csv"), hx, hy)


if __name__ == "__main__":
    build(1, shifted=False, seed=7)
    build(2, shifted=True, seed=11)
