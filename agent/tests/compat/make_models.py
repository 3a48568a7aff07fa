"""Generate the model-compatibility suite used by the agent's Rust tests.

For every model NAME this script writes, next to itself:

  NAME.onnx   a small ONNX model (each well under 300 KB)
  NAME.json   a fixture: the model file name, a deterministic input batch,
              ALL graph outputs computed by onnxruntime (CPUExecutionProvider)
              on that batch, a tolerance, and the sorted list of op types in
              the graph (non-default domains prefixed, e.g. "ai.onnx.ml.Scaler").

Models:
  cnn                small image classifier built with onnx.helper (opset 13),
                     input image f32 [N,3,32,32] -> scores f32 [N,10]
  gru, lstm          sequence models built with onnx.helper (opset 13),
                     input sequence f32 [N,20,6] (batch-first, transposed to
                     [20,N,6] inside the graph), hidden 16 -> scores f32 [N,3]
  mlp                sklearn MLPClassifier                  } exported with
  scaler_logreg      StandardScaler + LogisticRegression    } skl2onnx,
  random_forest      RandomForestClassifier(10 trees, d=4)  } zipmap off,
  gradient_boosting  binary GradientBoostingClassifier      } input features
                                                              f32 [N,4]; outputs
                                                              label i64 and
                                                              probabilities f32

Regression models (scikit-learn, skl2onnx; input features f32 [N,4], output
variable f32 [N,1]):
  linear_regression  StandardScaler + LinearRegression (ai.onnx.ml Scaler, LinearRegressor)
  mlp_regressor      MLPRegressor(16 hidden)
  forest_regressor   RandomForestRegressor(10 trees, d=4) (ai.onnx.ml TreeEnsembleRegressor)
  boosting_regressor GradientBoostingRegressor(20 trees, d=3) (TreeEnsembleRegressor with a
                     base value)
  forest_average     forest_regressor rewritten to aggregate by AVERAGE (its weights times
                     the tree count), which no exporter here writes
  with regression_reference.csv (their 300 training rows, without the target) and
  regression_holdout.csv (100 more rows with the true value as `label`)

A model of two inputs (onnx helper, opset 13):
  two_inputs         `sensors` f32 [N,3] and `counts` i64 [N,2] (cast, concatenated) through
                     a two-layer MLP -> scores f32 [N,3]; with two_inputs_reference.csv
                     (200 rows: the five features, the inputs' in order) for publishing it

Also unsupported_op.onnx: the example vibration model with one Relu renamed to
`Frobnicate`, which the agent and the controller must refuse by the operator's name.

Everything uses fixed seeds, so reruns produce the same weights and data
(modulo library-version differences). The generated .onnx/.json files are
committed; the Rust tests only read them and never run Python.

To regenerate (from the repository root; keep the venv outside the repo):

  python3 -m venv /tmp/venv-compat
  /tmp/venv-compat/bin/pip install numpy onnx onnxruntime scikit-learn skl2onnx
  /tmp/venv-compat/bin/python3 agent/tests/compat/make_models.py
"""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))

OPSET = 13
ML_OPSET = 3  # ai.onnx.ml opset 3: classic TreeEnsembleClassifier etc.
IR_VERSION = 8  # highest IR version that goes with opset 13
TOLERANCE = {"abs": 1e-4, "rel": 1e-4}
N_FEATURES = 4


# ---------------------------------------------------------------- helpers


def init(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def finish_model(graph, opsets):
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
        producer_name="edgeloop-compat",
    )
    model.ir_version = IR_VERSION
    return model


def op_list(model):
    ops = set()

    def walk(graph):
        for node in graph.node:
            dom = node.domain
            ops.add(node.op_type if dom in ("", "ai.onnx") else f"{dom}.{node.op_type}")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return sorted(ops)


DTYPES = {np.dtype(np.float32): "f32", np.dtype(np.int64): "i64"}


def tensor_json(name, array):
    array = np.ascontiguousarray(array)
    kind = DTYPES[array.dtype]
    flat = array.reshape(-1)
    if kind == "f32":
        data = [float(v) for v in flat]  # float32 -> exact Python float
    else:
        data = [int(v) for v in flat]
    return {"name": name, "dtype": kind, "shape": list(array.shape), "data": data}


def save(name, model, inputs):
    """Check, save the model, run it with onnxruntime and write the fixture."""
    onnx.checker.check_model(model, full_check=True)
    onnx_path = os.path.join(HERE, f"{name}.onnx")
    with open(onnx_path, "wb") as f:
        f.write(model.SerializeToString())

    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    results = sess.run(out_names, inputs)

    fixture = {
        "model": f"{name}.onnx",
        "inputs": [tensor_json(k, v) for k, v in inputs.items()],
        "outputs": [tensor_json(k, v) for k, v in zip(out_names, results)],
        "tolerance": TOLERANCE,
        "ops": op_list(model),
    }
    with open(os.path.join(HERE, f"{name}.json"), "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    size = os.path.getsize(onnx_path)
    assert size < 300_000, f"{name}.onnx is {size} bytes"
    print(f"{name:18s} {size:7d} B  ops={fixture['ops']}")


# ---------------------------------------------------------------- cnn


def make_cnn():
    rng = np.random.default_rng(1)

    def w(*shape, scale):
        return rng.normal(0.0, scale, size=shape)

    def bn(prefix, c):
        return [
            init(f"{prefix}_scale", rng.uniform(0.5, 1.5, c)),
            init(f"{prefix}_bias", rng.normal(0.0, 0.1, c)),
            init(f"{prefix}_mean", rng.normal(0.0, 0.1, c)),
            init(f"{prefix}_var", rng.uniform(0.5, 1.5, c)),
        ]

    inits = [
        init("conv1_w", w(8, 3, 3, 3, scale=0.2)),
        init("conv1_b", w(8, scale=0.05)),
        *bn("bn1", 8),
        init("conv2_w", w(16, 8, 3, 3, scale=0.1)),
        init("conv2_b", w(16, scale=0.05)),
        *bn("bn2", 16),
        init("fc_w", w(10, 16, scale=0.3)),
        init("fc_b", w(10, scale=0.05)),
    ]
    bn_in = lambda p, x: [x, f"{p}_scale", f"{p}_bias", f"{p}_mean", f"{p}_var"]
    nodes = [
        helper.make_node("Conv", ["image", "conv1_w", "conv1_b"], ["c1"],
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", bn_in("bn1", "c1"), ["b1"], epsilon=1e-5),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "conv2_w", "conv2_b"], ["c2"],
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", bn_in("bn2", "c2"), ["b2"], epsilon=1e-5),
        helper.make_node("Relu", ["b2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["scores"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = finish_model(graph, [("", OPSET)])
    x = np.random.default_rng(101).uniform(0.0, 1.0, (2, 3, 32, 32)).astype(np.float32)
    save("cnn", model, {"image": x})


# ---------------------------------------------------------------- gru / lstm

SEQ, IN, HID, OUT = 20, 6, 16, 3


def make_rnn(kind):
    gates = {"GRU": 3, "LSTM": 4}[kind]
    rng = np.random.default_rng({"GRU": 2, "LSTM": 3}[kind])
    scale = 1.0 / np.sqrt(HID)
    inits = [
        init("W", rng.uniform(-scale, scale, (1, gates * HID, IN))),
        init("R", rng.uniform(-scale, scale, (1, gates * HID, HID))),
        init("B", rng.uniform(-scale, scale, (1, 2 * gates * HID))),
        init("fc_w", rng.normal(0.0, 0.3, (OUT, HID))),
        init("fc_b", rng.normal(0.0, 0.05, (OUT,))),
        numpy_helper.from_array(np.array([-1, HID], dtype=np.int64), "h_shape"),
    ]
    rnn_outs = ["Y", "Y_h"] if kind == "GRU" else ["Y", "Y_h", "Y_c"]
    attrs = {"hidden_size": HID}
    if kind == "GRU":
        attrs["linear_before_reset"] = 1  # the cuDNN/PyTorch flavour
    nodes = [
        helper.make_node("Transpose", ["sequence"], ["seq_t"], perm=[1, 0, 2]),
        helper.make_node(kind, ["seq_t", "W", "R", "B"], rnn_outs, **attrs),
        # Y_h is [num_directions=1, N, HID] -> [N, HID]
        helper.make_node("Reshape", ["Y_h", "h_shape"], ["h_last"]),
        helper.make_node("Gemm", ["h_last", "fc_w", "fc_b"], ["scores"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, kind.lower(),
        [helper.make_tensor_value_info("sequence", TensorProto.FLOAT, ["N", SEQ, IN])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", OUT])],
        inits,
    )
    model = finish_model(graph, [("", OPSET)])
    x = np.random.default_rng(202).normal(0.0, 1.0, (4, SEQ, IN)).astype(np.float32)
    save(kind.lower(), model, {"sequence": x})


# ---------------------------------------------------------------- sklearn


def make_sklearn():
    from sklearn.datasets import make_classification
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    def data(n_classes):
        X, y = make_classification(
            n_samples=300, n_features=N_FEATURES, n_informative=3, n_redundant=1,
            n_classes=n_classes, n_clusters_per_class=1, random_state=42,
        )
        X = (X * 3.0 + 5.0).astype(np.float32)  # off-centre, so the scaler matters
        return X, y

    X3, y3 = data(3)
    X2, y2 = data(2)
    models = {
        "mlp": (MLPClassifier(hidden_layer_sizes=(16,), max_iter=2000, random_state=0), X3, y3),
        "scaler_logreg": (Pipeline([("scaler", StandardScaler()),
                                    ("logreg", LogisticRegression(max_iter=1000))]), X3, y3),
        "random_forest": (RandomForestClassifier(n_estimators=10, max_depth=4, random_state=0), X3, y3),
        "gradient_boosting": (GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=0), X2, y2),
    }
    sample = np.random.default_rng(303)
    for name, (est, X, y) in models.items():
        est.fit(X, y)
        model = convert(est, name)
        rows = sample.integers(0, len(X), 4)
        x = (X[rows] + sample.normal(0.0, 0.5, (4, N_FEATURES))).astype(np.float32)
        save(name, model, {"features": x})


def convert(est, name):
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    model = convert_sklearn(
        est,
        initial_types=[("features", FloatTensorType([None, N_FEATURES]))],
        options={id(est): {"zipmap": False}} if hasattr(est, "predict_proba") else None,
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
    )
    model.ir_version = IR_VERSION
    model.graph.name = name  # skl2onnx uses a random uuid; pin it
    # skl2onnx may list the default domain twice; keep one entry each
    seen = {}
    for op in model.opset_import:
        seen[op.domain] = max(seen.get(op.domain, 0), op.version)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(seen.items()))
    return model


def make_regressors():
    from sklearn.datasets import make_regression
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
    from sklearn.linear_model import LinearRegression
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = make_regression(n_samples=400, n_features=N_FEATURES, n_informative=3,
                           noise=5.0, random_state=7)
    X = (X * 3.0 + 5.0).astype(np.float32)
    y = (y / 10.0 + 40.0).astype(np.float32)  # hours of life left, say
    # Fit on the first 300 rows; the last 100 are a labelled holdout for the quality gate.
    # The training rows without their target are the reference data a publish profiles.
    X, y, X_holdout, y_holdout = X[:300], y[:300], X[300:], y[300:]
    header = "f0,f1,f2,f3"
    np.savetxt(os.path.join(HERE, "regression_reference.csv"), X, delimiter=",",
               header=header, comments="", fmt="%.6g")
    np.savetxt(os.path.join(HERE, "regression_holdout.csv"),
               np.column_stack([X_holdout, y_holdout]), delimiter=",",
               header=header + ",label", comments="", fmt="%.6g")
    models = {
        "linear_regression": Pipeline([("scaler", StandardScaler()),
                                       ("linear", LinearRegression())]),
        "mlp_regressor": Pipeline([("scaler", StandardScaler()),
                                   ("mlp", MLPRegressor(hidden_layer_sizes=(16,), max_iter=3000,
                                                        random_state=0))]),
        "forest_regressor": RandomForestRegressor(n_estimators=10, max_depth=4, random_state=0),
        "boosting_regressor": GradientBoostingRegressor(n_estimators=20, max_depth=3,
                                                        random_state=0),
    }
    sample = np.random.default_rng(404)
    for name, est in models.items():
        est.fit(X, y)
        model = convert(est, name)
        rows = sample.integers(0, len(X), 6)
        x = (X[rows] + sample.normal(0.0, 0.5, (6, N_FEATURES))).astype(np.float32)
        save(name, model, {"features": x})
        mae = float(np.mean(np.abs(est.predict(X_holdout) - y_holdout)))
        print(f"{'':18s} holdout mae {mae:.4f}")


# ---------------------------------------------------------------- two inputs


def make_two_inputs():
    rng = np.random.default_rng(5)
    inits = [
        init("w1", rng.normal(0.0, 0.5, (8, 5))),
        init("b1", rng.normal(0.0, 0.1, (8,))),
        init("w2", rng.normal(0.0, 0.5, (3, 8))),
        init("b2", rng.normal(0.0, 0.1, (3,))),
    ]
    nodes = [
        helper.make_node("Cast", ["counts"], ["counts_f"], to=TensorProto.FLOAT),
        helper.make_node("Concat", ["sensors", "counts_f"], ["x"], axis=1),
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["scores"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "two_inputs",
        [
            helper.make_tensor_value_info("sensors", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("counts", TensorProto.INT64, ["N", 2]),
        ],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    model = finish_model(graph, [("", OPSET)])

    def rows(n, seed):
        r = np.random.default_rng(seed)
        sensors = r.normal([1.0, -0.5, 2.0], [1.0, 0.5, 0.8], (n, 3)).astype(np.float32)
        counts = r.integers(0, 4, (n, 2)).astype(np.int64)
        return sensors, counts

    sensors, counts = rows(4, 505)
    save("two_inputs", model, {"sensors": sensors, "counts": counts})
    sensors, counts = rows(200, 506)
    with open(os.path.join(HERE, "two_inputs_reference.csv"), "w") as f:
        f.write("temperature,pressure,flow,starts,faults\n")
        for s_row, c_row in zip(sensors, counts):
            # a float32's shortest text, which reads back as the same float32
            values = [str(np.float32(v)) for v in s_row] + [str(int(v)) for v in c_row]
            f.write(",".join(values) + "\n")


def make_unsupported():
    """The example vibration model with its first Relu replaced by an operator nobody
    implements, `Frobnicate`: the agent and the controller must refuse it by name. No
    fixture: it cannot run anywhere."""
    source = os.path.join(HERE, "..", "..", "..", "controller", "assets", "vibration", "model_v1.onnx")
    model = onnx.load(source)
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type = "Frobnicate"
    onnx.save(model, os.path.join(HERE, "unsupported_op.onnx"))


def make_average_forest():
    """forest_regressor as an AVERAGE ensemble: skl2onnx writes SUM with each leaf weight
    divided by the tree count, so multiplying the weights back and averaging must give the
    same values. Made from the committed forest_regressor files (no scikit-learn needed)."""
    model = onnx.load(os.path.join(HERE, "forest_regressor.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "TreeEnsembleRegressor")
    attrs = {a.name: a for a in node.attribute}
    trees = len(set(attrs["nodes_treeids"].ints))
    weights = list(attrs["target_weights"].floats)
    del attrs["target_weights"].floats[:]
    attrs["target_weights"].floats.extend([w * trees for w in weights])
    aggregate = [a for a in node.attribute if a.name == "aggregate_function"]
    if aggregate:
        aggregate[0].s = b"AVERAGE"
    else:
        node.attribute.append(helper.make_attribute("aggregate_function", "AVERAGE"))
    with open(os.path.join(HERE, "forest_regressor.json")) as f:
        summed = json.load(f)
    features = summed["inputs"][0]
    x = np.array(features["data"], dtype=np.float32).reshape(features["shape"])
    save("forest_average", model, {features["name"]: x})
    with open(os.path.join(HERE, "forest_average.json")) as f:
        averaged = json.load(f)
    # onnxruntime agrees that both say the same.
    np.testing.assert_allclose(averaged["outputs"][0]["data"], summed["outputs"][0]["data"],
                               rtol=1e-5, atol=1e-4)


if __name__ == "__main__":
    make_unsupported()
    make_cnn()
    make_rnn("GRU")
    make_rnn("LSTM")
    make_sklearn()
    make_regressors()
    make_average_forest()
    make_two_inputs()
