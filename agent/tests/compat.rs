//! Model compatibility suite: the models in `tests/compat/` (made by `make_models.py`: a CNN,
//! a GRU and an LSTM written with the onnx helper, and scikit-learn models exported with
//! skl2onnx) run through the agent's loader and must give onnxruntime's outputs, stored
//! with each model, within the fixture's tolerance. A model with an operator tract cannot
//! run is refused at load with the operator's name.

use std::path::{Path, PathBuf};

use edgeloop_agent::modelbench::{BenchError, InputSpec, ShapedModel};
use edgeloop_shared::bundle::DType;
use serde_json::Value;
use tract_onnx::prelude::*;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compat")
}

fn fixture(name: &str) -> Value {
    let text = std::fs::read_to_string(dir().join(format!("{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn shape(v: &Value) -> Vec<usize> {
    v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect()
}

fn numbers(v: &Value) -> Vec<f64> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn input_tensor(v: &Value) -> Tensor {
    let dims = shape(v);
    let data = numbers(v);
    match v["dtype"].as_str().unwrap() {
        "f32" => {
            let data: Vec<f32> = data.iter().map(|&x| x as f32).collect();
            Tensor::from_shape(&dims, &data).unwrap()
        }
        "i64" => {
            let data: Vec<i64> = data.iter().map(|&x| x as i64).collect();
            Tensor::from_shape(&dims, &data).unwrap()
        }
        other => panic!("fixture input dtype {other}"),
    }
}

/// Runs one fixture and compares every output with onnxruntime's.
fn check(name: &str) {
    let f = fixture(name);
    let onnx = std::fs::read(dir().join(f["model"].as_str().unwrap())).unwrap();
    let inputs = f["inputs"].as_array().unwrap();
    let specs: Vec<InputSpec> = inputs
        .iter()
        .map(|i| InputSpec {
            name: i["name"].as_str().unwrap().to_string(),
            dims: shape(i),
            dtype: Some(match i["dtype"].as_str().unwrap() {
                "f32" => DType::F32,
                "i64" => DType::I64,
                other => panic!("fixture input dtype {other}"),
            }),
        })
        .collect();
    let model = ShapedModel::load(&onnx, &specs)
        .unwrap_or_else(|e| panic!("{name}: the agent cannot load it: {e}"));
    let values: TVec<TValue> = model
        .inputs
        .iter()
        .map(|(input, _, _)| {
            let fixture = inputs.iter().find(|i| i["name"] == input.as_str()).unwrap();
            input_tensor(fixture).into_tvalue()
        })
        .collect();
    let outputs = model.run(values).unwrap();
    let tolerance = &f["tolerance"];
    let (abs, rel) = (
        tolerance["abs"].as_f64().unwrap(),
        tolerance["rel"].as_f64().unwrap(),
    );
    let expected = f["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), expected.len(), "{name}: number of outputs");
    for want in expected {
        let out_name = want["name"].as_str().unwrap();
        let i = model
            .outputs
            .iter()
            .position(|o| o == out_name)
            .unwrap_or_else(|| panic!("{name}: no output `{out_name}` in {:?}", model.outputs));
        let got = &outputs[i];
        assert_eq!(
            got.shape(),
            shape(want).as_slice(),
            "{name}: shape of `{out_name}`"
        );
        let got: Vec<f64> = got
            .cast_to::<f64>()
            .unwrap()
            .to_plain_array_view::<f64>()
            .unwrap()
            .iter()
            .copied()
            .collect();
        let want_values = numbers(want);
        assert_eq!(got.len(), want_values.len(), "{name}: size of `{out_name}`");
        let exact = want["dtype"].as_str() == Some("i64");
        for (k, (g, w)) in got.iter().zip(&want_values).enumerate() {
            let ok = if exact {
                g == w
            } else {
                (g - w).abs() <= abs + rel * w.abs()
            };
            assert!(
                ok,
                "{name}: `{out_name}`[{k}] is {g}, onnxruntime gives {w} (abs {abs}, rel {rel})"
            );
        }
    }
}

#[test]
fn cnn_image_classifier_matches_onnxruntime() {
    check("cnn");
}

#[test]
fn gru_sequence_model_matches_onnxruntime() {
    check("gru");
}

#[test]
fn lstm_sequence_model_matches_onnxruntime() {
    check("lstm");
}

#[test]
fn sklearn_mlp_matches_onnxruntime() {
    check("mlp");
}

/// skl2onnx writes StandardScaler as `ai.onnx.ml.Scaler`, which tract lacks.
#[test]
fn sklearn_scaler_and_logistic_regression_match_onnxruntime() {
    check("scaler_logreg");
}

#[test]
fn sklearn_random_forest_matches_onnxruntime() {
    check("random_forest");
}

/// A binary GradientBoostingClassifier: one base value and a logistic transform, which
/// tract alone refuses to build.
#[test]
fn sklearn_binary_gradient_boosting_matches_onnxruntime() {
    check("gradient_boosting");
}

/// scikit-learn regressors: a scaled linear regression (`Scaler`, `LinearRegressor`), an
/// MLP, and tree ensembles (`TreeEnsembleRegressor`, which tract lacks: a forest averaged by
/// its weights, and gradient boosting with a base value).
#[test]
fn sklearn_regressors_match_onnxruntime() {
    for name in REGRESSORS {
        check(name);
    }
}

const REGRESSORS: [&str; 5] = [
    "linear_regression",
    "mlp_regressor",
    "forest_regressor",
    // The forest again, aggregated by AVERAGE with its weights scaled back up.
    "forest_average",
    "boosting_regressor",
];

/// The serving runtime's plan gives each regressor's one value per row, onnxruntime's.
#[test]
fn sklearn_regressors_are_served_with_one_value_per_row() {
    use edgeloop_agent::runtime::Plan;
    let features: Vec<String> = (0..4).map(|i| format!("f{i}")).collect();
    for name in REGRESSORS {
        let f = fixture(name);
        let onnx = std::fs::read(dir().join(f["model"].as_str().unwrap())).unwrap();
        let plan = Plan::compile(&onnx, 4).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(plan.classes(), 1, "{name}");
        let input = numbers(&f["inputs"][0]);
        let want = numbers(&f["outputs"][0]);
        assert_eq!(want.len(), input.len() / 4, "{name}");
        for (r, row) in input.chunks(4).enumerate() {
            let row: Vec<f32> = row.iter().map(|&x| x as f32).collect();
            let got = plan.infer(&row, &features).unwrap().scores;
            assert!(
                (f64::from(got[0]) - want[r]).abs() <= 1e-4 + 1e-4 * want[r].abs(),
                "{name}: row {r}: {}, onnxruntime {}",
                got[0],
                want[r]
            );
        }
    }
}

#[test]
fn a_model_of_two_inputs_matches_onnxruntime() {
    check("two_inputs");
}

/// A model of two inputs (`sensors` f32 [N,3], `counts` i64 [N,2]) is served from one row
/// of five features, split among its inputs in the graph's order, each cast to its type.
#[test]
fn a_model_of_two_inputs_is_served_from_one_row_of_features() {
    use edgeloop_agent::runtime::{Plan, RuntimeError, inspect_onnx};
    let f = fixture("two_inputs");
    let onnx = std::fs::read(dir().join("two_inputs.onnx")).unwrap();
    let signature = inspect_onnx(&onnx).unwrap();
    let inputs: Vec<(&str, Option<usize>, DType)> = signature
        .inputs
        .iter()
        .map(|i| (i.name.as_str(), i.width, i.dtype))
        .collect();
    assert_eq!(
        inputs,
        [
            ("sensors", Some(3), DType::F32),
            ("counts", Some(2), DType::I64)
        ]
    );
    let features: Vec<String> = ["temperature", "pressure", "flow", "starts", "faults"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let sensors = numbers(&f["inputs"][0]);
    let counts = numbers(&f["inputs"][1]);
    let want = numbers(&f["outputs"][0]);
    // Split by the widths the graph declares, and by the widths a manifest gives.
    for plan in [
        Plan::compile(&onnx, 5).unwrap(),
        Plan::compile_inputs(&onnx, &[3, 2]).unwrap(),
    ] {
        let split: Vec<(&str, usize, DType)> = plan
            .inputs()
            .iter()
            .map(|i| (i.name.as_str(), i.len, i.dtype))
            .collect();
        assert_eq!(
            split,
            [("sensors", 3, DType::F32), ("counts", 2, DType::I64)]
        );
        assert_eq!(plan.classes(), 3);
        for r in 0..4 {
            let row: Vec<f32> = sensors[r * 3..r * 3 + 3]
                .iter()
                .chain(&counts[r * 2..r * 2 + 2])
                .map(|&x| x as f32)
                .collect();
            let got = plan.infer(&row, &features).unwrap().scores;
            for (c, g) in got.iter().enumerate() {
                let w = want[r * 3 + c];
                assert!(
                    (f64::from(*g) - w).abs() <= 1e-4 + 1e-4 * w.abs(),
                    "row {r} class {c}: {g}, onnxruntime {w}"
                );
            }
        }
    }
    let plan = Plan::compile(&onnx, 5).unwrap();
    // A count must be a whole number: the error names the feature and the input's type.
    let err = plan
        .infer(&[1.0, 0.0, 2.0, 1.5, 0.0], &features)
        .unwrap_err();
    assert!(
        matches!(&err, RuntimeError::NotRepresentable { feature, dtype: "i64", .. } if feature == "starts"),
        "{err}"
    );
    assert!(matches!(
        plan.infer(&[1.0, 0.0, 2.0, 1.0], &features),
        Err(RuntimeError::WidthMismatch {
            expected: 5,
            got: 4
        })
    ));
    // A row that cannot be split as the graph declares, and widths that do not fit it.
    assert!(matches!(
        Plan::compile(&onnx, 4),
        Err(RuntimeError::WidthMismatch {
            expected: 5,
            got: 4
        })
    ));
    let err = Plan::compile_inputs(&onnx, &[2, 3]).unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::WidthMismatch {
                expected: 3,
                got: 2
            }
        ),
        "{err}"
    );
    let err = Plan::compile_inputs(&onnx, &[5]).unwrap_err();
    assert!(
        err.to_string().contains("has 2 inputs, but widths for 1"),
        "{err}"
    );
}

/// Tree regressors tract's builder would misread are refused by what they ask for.
#[test]
fn tree_regressors_of_unsupported_kinds_are_refused_by_name() {
    use tract_onnx::pb::ModelProto;
    let onnx = std::fs::read(dir().join("forest_regressor.onnx")).unwrap();
    let edited = |attribute: &str, edit: &dyn Fn(&mut tract_onnx::pb::AttributeProto)| {
        let mut model: ModelProto = prost::Message::decode(onnx.as_slice()).unwrap();
        let node = model
            .graph
            .as_mut()
            .unwrap()
            .node
            .iter_mut()
            .find(|n| n.op_type == "TreeEnsembleRegressor")
            .unwrap();
        match node.attribute.iter_mut().find(|a| a.name == attribute) {
            Some(a) => edit(a),
            None => {
                let mut a = tract_onnx::pb::AttributeProto {
                    name: attribute.into(),
                    ..Default::default()
                };
                edit(&mut a);
                node.attribute.push(a);
            }
        }
        prost::Message::encode_to_vec(&model)
    };
    let refused = |bytes: Vec<u8>| {
        edgeloop_agent::runtime::Plan::compile(&bytes, 4)
            .unwrap_err()
            .to_string()
    };
    let e = refused(edited("aggregate_function", &|a| a.s = b"MAX".to_vec()));
    assert!(e.contains("aggregate_function MAX"), "{e}");
    let e = refused(edited("post_transform", &|a| a.s = b"PROBIT".to_vec()));
    assert!(e.contains("post_transform PROBIT"), "{e}");
    let e = refused(edited("n_targets", &|a| a.i = 2));
    assert!(e.contains("2 targets"), "{e}");
}

/// Every fixture's declared op list matches its model, so that the suite's coverage is
/// what its names say.
#[test]
fn fixtures_cover_the_promised_operators() {
    let ops = |name: &str| -> Vec<String> {
        fixture(name)["ops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap().to_string())
            .collect()
    };
    assert!(ops("two_inputs").contains(&"Concat".to_string()));
    for op in ["Conv", "BatchNormalization", "Relu", "MaxPool", "Gemm"] {
        assert!(ops("cnn").contains(&op.to_string()), "cnn lacks {op}");
    }
    assert!(ops("gru").contains(&"GRU".to_string()));
    assert!(ops("lstm").contains(&"LSTM".to_string()));
    assert!(ops("scaler_logreg").contains(&"ai.onnx.ml.Scaler".to_string()));
    assert!(ops("gradient_boosting").contains(&"ai.onnx.ml.TreeEnsembleClassifier".to_string()));
    assert!(ops("linear_regression").contains(&"ai.onnx.ml.LinearRegressor".to_string()));
    for name in ["forest_regressor", "forest_average", "boosting_regressor"] {
        assert!(ops(name).contains(&"ai.onnx.ml.TreeEnsembleRegressor".to_string()));
    }
}

/// An operator nobody implements is refused at load, by name.
#[test]
fn an_unknown_operator_is_refused_by_name() {
    let onnx = std::fs::read(dir().join("unsupported_op.onnx")).unwrap();
    let err = ShapedModel::load(&onnx, &[]).unwrap_err();
    assert!(matches!(err, BenchError::Load(_)), "{err}");
    assert!(err.to_string().contains("Frobnicate"), "{err}");
    let err = edgeloop_agent::runtime::Plan::compile(&onnx, 4).unwrap_err();
    assert!(err.to_string().contains("Frobnicate"), "{err}");
}

/// The scikit-learn models have two outputs, `label` and `probabilities`: the agent's
/// serving runtime (the plan behind `POST /v1/infer`) serves the probabilities as the class
/// scores, prunes the label, and its class (the scores' argmax) is onnxruntime's label.
#[test]
fn sklearn_classifiers_are_served_with_their_probabilities_as_scores() {
    use edgeloop_agent::runtime::{Plan, inspect_onnx};
    for name in ["mlp", "scaler_logreg", "random_forest", "gradient_boosting"] {
        let f = fixture(name);
        let onnx = std::fs::read(dir().join(f["model"].as_str().unwrap())).unwrap();
        let signature = inspect_onnx(&onnx).unwrap();
        assert_eq!(signature.output_name, "probabilities", "{name}");
        let names: Vec<&str> = signature.outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["label", "probabilities"], "{name}");
        assert!(
            signature.outputs[0].is_label && !signature.outputs[1].is_label,
            "{name}: {:?}",
            signature.outputs
        );
        assert_eq!(signature.outputs[0].dtype, Some(DType::I64), "{name}");

        let plan = Plan::compile(&onnx, 4).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(plan.output(), "probabilities");
        let input = numbers(&f["inputs"][0]);
        let outputs = f["outputs"].as_array().unwrap();
        let labels = numbers(&outputs[0]);
        let probabilities = numbers(&outputs[1]);
        let classes = shape(&outputs[1])[1];
        assert_eq!(plan.classes(), classes, "{name}");
        // The exporter keeps scikit-learn's classes (0, 1, … here) in the graph: in the
        // classifier node's attributes, or (MLP) in the table its label is picked from.
        let expected: Vec<String> = (0..classes).map(|c| c.to_string()).collect();
        assert_eq!(signature.class_labels, Some(expected), "{name}");
        let features: Vec<String> = (0..4).map(|i| format!("f{i}")).collect();
        for (r, row) in input.chunks(4).enumerate() {
            let row: Vec<f32> = row.iter().map(|&x| x as f32).collect();
            let prediction = plan.infer(&row, &features).unwrap();
            assert_eq!(prediction.class as f64, labels[r], "{name}: row {r}");
            for (c, score) in prediction.scores.iter().enumerate() {
                let want = probabilities[r * classes + c];
                assert!(
                    (f64::from(*score) - want).abs() <= 1e-4 + 1e-4 * want.abs(),
                    "{name}: row {r} class {c}: {score}, onnxruntime {want}"
                );
            }
        }
    }
}
