//! The built-in reference trainer, so that the loop closes with nothing else installed. It
//! fits the example model family to a labelled CSV — standardized inputs into a softmax
//! (multinomial logistic) regression, by full-batch gradient descent — and writes it as an
//! ONNX graph of standard ops (Sub, Div, MatMul, Add, Softmax) that tract runs, with the
//! same input and output layout as the example models: `features` `[batch, F]` in,
//! class probabilities `[batch, K]` out.

use std::path::Path;

use prost::Message;
use serde::{Deserialize, Serialize};
use tract_onnx::pb::{
    GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto,
    TypeProto, ValueInfoProto, tensor_proto::DataType, tensor_shape_proto, type_proto,
};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("dataset {path}: {message}")]
    Dataset { path: String, message: String },
    #[error("dataset row {row}: {message}")]
    Row { row: usize, message: String },
    #[error(
        "the dataset needs at least {min} rows and two classes; it has {rows} rows, classes {classes:?}"
    )]
    TooLittle {
        min: usize,
        rows: usize,
        classes: Vec<usize>,
    },
}

/// How to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainOptions {
    /// The column with each row's class index; every other column is a feature.
    #[serde(default = "TrainOptions::default_label_column")]
    pub label_column: String,
    #[serde(default = "TrainOptions::default_epochs")]
    pub epochs: usize,
    #[serde(default = "TrainOptions::default_learning_rate")]
    pub learning_rate: f64,
    /// L2 penalty on the weights.
    #[serde(default = "TrainOptions::default_l2")]
    pub l2: f64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            label_column: Self::default_label_column(),
            epochs: Self::default_epochs(),
            learning_rate: Self::default_learning_rate(),
            l2: Self::default_l2(),
        }
    }
}

impl TrainOptions {
    fn default_label_column() -> String {
        "label".into()
    }
    fn default_epochs() -> usize {
        300
    }
    fn default_learning_rate() -> f64 {
        0.5
    }
    fn default_l2() -> f64 {
        1e-4
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.epochs == 0 || self.epochs > 100_000 {
            return Err("epochs: must be 1 to 100000".into());
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err("learning_rate: must be above 0".into());
        }
        if !(self.l2 >= 0.0 && self.l2.is_finite()) {
            return Err("l2: must be 0 or more".into());
        }
        Ok(())
    }
}

/// Fewer rows than this cannot be split into a fit and a meaningful check.
const MIN_ROWS: usize = 20;
/// Reference rows written next to the model (what devices bin their inputs against).
const REFERENCE_ROWS: usize = 1000;

/// A trained model.
#[derive(Debug, Clone)]
pub struct Trained {
    pub onnx: Vec<u8>,
    /// CSV with a header of the feature names: the model's reference data.
    pub reference_csv: String,
    pub features: Vec<String>,
    pub classes: usize,
    /// Accuracy on the training rows.
    pub train_accuracy: f64,
}

/// Reads the labelled dataset and fits the model.
pub fn train_csv(path: &Path, options: &TrainOptions) -> Result<Trained, TrainError> {
    let (features, rows, labels) = read_dataset(path, &options.label_column)?;
    fit(&features, &rows, &labels, options)
}

/// Feature names, rows and labels.
type Dataset = (Vec<String>, Vec<Vec<f64>>, Vec<usize>);

fn read_dataset(path: &Path, label_column: &str) -> Result<Dataset, TrainError> {
    let bad = |message: String| TrainError::Dataset {
        path: path.display().to_string(),
        message,
    };
    let mut reader = csv::Reader::from_path(path).map_err(|e| bad(e.to_string()))?;
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| bad(e.to_string()))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let label_at = header
        .iter()
        .position(|h| h == label_column)
        .ok_or_else(|| bad(format!("no column `{label_column}`")))?;
    let features: Vec<String> = header
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != label_at)
        .map(|(_, h)| h.clone())
        .collect();
    if features.is_empty() {
        return Err(bad("no feature columns besides the label".into()));
    }
    let (mut rows, mut labels) = (Vec::new(), Vec::new());
    for (i, record) in reader.records().enumerate() {
        let row = i + 2;
        let record = record.map_err(|e| TrainError::Row {
            row,
            message: e.to_string(),
        })?;
        let mut values = Vec::with_capacity(features.len());
        for (at, field) in record.iter().enumerate() {
            let field = field.trim();
            if at == label_at {
                labels.push(field.parse::<usize>().map_err(|_| TrainError::Row {
                    row,
                    message: format!("label `{field}` is not a class index (0, 1, …)"),
                })?);
            } else {
                match field.parse::<f64>() {
                    Ok(v) if v.is_finite() => values.push(v),
                    _ => {
                        return Err(TrainError::Row {
                            row,
                            message: format!("`{}` is `{field}`, not a finite number", header[at]),
                        });
                    }
                }
            }
        }
        rows.push(values);
    }
    Ok((features, rows, labels))
}

/// Fits standardization and a softmax regression to `rows` and `labels`.
pub fn fit(
    features: &[String],
    rows: &[Vec<f64>],
    labels: &[usize],
    options: &TrainOptions,
) -> Result<Trained, TrainError> {
    let mut classes: Vec<usize> = labels.to_vec();
    classes.sort_unstable();
    classes.dedup();
    if rows.len() < MIN_ROWS || classes.len() < 2 {
        return Err(TrainError::TooLittle {
            min: MIN_ROWS,
            rows: rows.len(),
            classes,
        });
    }
    let k = classes.last().copied().unwrap_or(0) + 1;
    let f = features.len();
    let n = rows.len() as f64;
    let mean: Vec<f64> = (0..f)
        .map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / n)
        .collect();
    let std: Vec<f64> = (0..f)
        .map(|j| {
            let var = rows.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / n;
            // A constant feature carries nothing; dividing by 1 keeps it harmless.
            if var > 1e-12 { var.sqrt() } else { 1.0 }
        })
        .collect();
    let x: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| (0..f).map(|j| (r[j] - mean[j]) / std[j]).collect())
        .collect();

    let mut w = vec![vec![0.0; k]; f];
    let mut b = vec![0.0; k];
    let mut probabilities = vec![vec![0.0; k]; x.len()];
    for _ in 0..options.epochs {
        for (xi, p) in x.iter().zip(probabilities.iter_mut()) {
            softmax_into(xi, &w, &b, p);
        }
        let mut grad_w = vec![vec![0.0; k]; f];
        let mut grad_b = vec![0.0; k];
        for ((xi, p), &y) in x.iter().zip(&probabilities).zip(labels) {
            for c in 0..k {
                let err = p[c] - f64::from(u8::from(c == y));
                grad_b[c] += err;
                for j in 0..f {
                    grad_w[j][c] += err * xi[j];
                }
            }
        }
        for c in 0..k {
            b[c] -= options.learning_rate * grad_b[c] / n;
            for j in 0..f {
                w[j][c] -= options.learning_rate * (grad_w[j][c] / n + options.l2 * w[j][c]);
            }
        }
    }
    let mut hits = 0;
    let mut p = vec![0.0; k];
    for (xi, &y) in x.iter().zip(labels) {
        softmax_into(xi, &w, &b, &mut p);
        let predicted = (0..k).max_by(|a, c| p[*a].total_cmp(&p[*c])).unwrap_or(0);
        hits += usize::from(predicted == y);
    }

    let mut reference = features.join(",");
    reference.push('\n');
    for r in rows.iter().take(REFERENCE_ROWS) {
        let line: Vec<String> = r.iter().map(|v| v.to_string()).collect();
        reference.push_str(&line.join(","));
        reference.push('\n');
    }
    Ok(Trained {
        onnx: to_onnx(&mean, &std, &w, &b),
        reference_csv: reference,
        features: features.to_vec(),
        classes: k,
        train_accuracy: hits as f64 / n,
    })
}

fn softmax_into(x: &[f64], w: &[Vec<f64>], b: &[f64], out: &mut [f64]) {
    for (c, o) in out.iter_mut().enumerate() {
        *o = b[c] + x.iter().zip(w).map(|(xj, wj)| xj * wj[c]).sum::<f64>();
    }
    let max = out.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut total = 0.0;
    for o in out.iter_mut() {
        *o = (*o - max).exp();
        total += *o;
    }
    for o in out.iter_mut() {
        *o /= total;
    }
}

/// An f32 initializer of an ONNX graph.
pub fn tensor(name: &str, dims: &[i64], data: Vec<f32>) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        float_data: data,
        ..Default::default()
    }
}

/// An ONNX node with one output, named after it.
pub fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: output.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

/// A graph input or output: f32, shape `[batch, second]` with a symbolic batch.
pub fn float_value(name: &str, second: i64) -> ValueInfoProto {
    value(name, DataType::Float, second)
}

/// A graph input or output of element type `elem`, shape `[batch, second]` with a
/// symbolic batch.
pub fn value(name: &str, elem: DataType, second: i64) -> ValueInfoProto {
    let dim = |value| tensor_shape_proto::Dimension {
        value: Some(value),
        ..Default::default()
    };
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem as i32,
                shape: Some(TensorShapeProto {
                    dim: vec![
                        dim(tensor_shape_proto::dimension::Value::DimParam(
                            "batch".into(),
                        )),
                        dim(tensor_shape_proto::dimension::Value::DimValue(second)),
                    ],
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The fitted model as ONNX (opset 13).
fn to_onnx(mean: &[f64], std: &[f64], w: &[Vec<f64>], b: &[f64]) -> Vec<u8> {
    let (f, k) = (mean.len() as i64, b.len() as i64);
    let floats = |v: &[f64]| v.iter().map(|x| *x as f32).collect::<Vec<f32>>();
    let mut softmax = node("Softmax", &["logits"], "scores");
    softmax.attribute.push(tract_onnx::pb::AttributeProto {
        name: "axis".into(),
        r#type: tract_onnx::pb::attribute_proto::AttributeType::Int as i32,
        i: 1,
        ..Default::default()
    });
    let graph = GraphProto {
        name: "edgeloop_softmax_regression".into(),
        node: vec![
            node("Sub", &["features", "mean"], "centered"),
            node("Div", &["centered", "std"], "scaled"),
            node("MatMul", &["scaled", "weights"], "linear"),
            node("Add", &["linear", "bias"], "logits"),
            softmax,
        ],
        initializer: vec![
            tensor("mean", &[f], floats(mean)),
            tensor("std", &[f], floats(std)),
            tensor(
                "weights",
                &[f, k],
                w.iter().flat_map(|row| floats(row)).collect(),
            ),
            tensor("bias", &[k], floats(b)),
        ],
        input: vec![float_value("features", f)],
        output: vec![float_value("scores", k)],
        ..Default::default()
    };
    encode_model(graph)
}

/// An ONNX model file (IR version 8, opset 13) around `graph`.
pub fn encode_model(graph: GraphProto) -> Vec<u8> {
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        producer_name: "edgeloop".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// `n` floats uniform in ±`amplitude`, the same for the same seed (a linear congruential
/// generator: no rand crate, and reproducible across builds).
pub fn random_weights(n: i64, seed: u64, amplitude: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * amplitude
        })
        .collect()
}

/// A model of about `bytes` of weights that answers like a classifier but knows nothing:
/// features → MatMul (one wide hidden layer) → Relu → MatMul → Softmax, with pseudo-random
/// weights from a fixed seed (uniform in ±0.01, so zstd cannot shrink them). For benchmarks
/// and tests that need a model of a given size and cost.
pub fn random_mlp(features: i64, classes: i64, bytes: usize) -> Vec<u8> {
    use tract_onnx::pb::{AttributeProto, attribute_proto};
    let weights = |n: i64, seed: u64| random_weights(n, seed, 0.01);
    let hidden = (bytes / (4 * (features + classes) as usize)).max(1) as i64;
    let mut softmax = node("Softmax", &["logits"], "scores");
    softmax.attribute.push(AttributeProto {
        name: "axis".into(),
        r#type: attribute_proto::AttributeType::Int as i32,
        i: 1,
        ..Default::default()
    });
    encode_model(GraphProto {
        name: "random_mlp".into(),
        node: vec![
            node("MatMul", &["features", "w1"], "h"),
            node("Relu", &["h"], "a"),
            node("MatMul", &["a", "w2"], "logits"),
            softmax,
        ],
        initializer: vec![
            tensor("w1", &[features, hidden], weights(features * hidden, 1)),
            tensor("w2", &[hidden, classes], weights(hidden * classes, 2)),
        ],
        input: vec![float_value("features", features)],
        output: vec![float_value("scores", classes)],
        ..Default::default()
    })
}

/// An MLP over `dims` (inputs, hidden…, classes): MatMul and Relu per layer, Softmax at
/// the end, layer i's weights pseudo-random (±0.05) from `seeds[i]`. Two models that
/// share all seeds but the last are one model with its head retrained.
pub fn mlp(dims: &[i64], seeds: &[u64]) -> Vec<u8> {
    let mut nodes = Vec::new();
    let mut initializer = Vec::new();
    let mut input = "features".to_string();
    for (i, pair) in dims.windows(2).enumerate() {
        let w = format!("w{i}");
        initializer.push(tensor(
            &w,
            &[pair[0], pair[1]],
            random_weights(pair[0] * pair[1], seeds[i], 0.05),
        ));
        let last = i == dims.len() - 2;
        let out = if last {
            "logits".to_string()
        } else {
            format!("h{i}")
        };
        nodes.push(node("MatMul", &[&input, &w], &out));
        if last {
            nodes.push(node("Softmax", &["logits"], "scores"));
        } else {
            let relu = format!("a{i}");
            nodes.push(node("Relu", &[&out], &relu));
            input = relu;
        }
    }
    encode_model(GraphProto {
        name: "mlp".into(),
        node: nodes,
        initializer,
        input: vec![float_value("features", dims[0])],
        output: vec![float_value("scores", *dims.last().unwrap())],
        ..Default::default()
    })
}

/// A classifier of 4 features whose input is of element type `elem` (for tests of the
/// input types): a cast to f32, a fixed linear layer and a softmax over 2 classes.
pub fn typed_classifier(elem: DataType) -> Vec<u8> {
    use tract_onnx::pb::{AttributeProto, attribute_proto};
    let mut cast = node("Cast", &["features"], "x");
    cast.attribute.push(AttributeProto {
        name: "to".into(),
        r#type: attribute_proto::AttributeType::Int as i32,
        i: DataType::Float as i64,
        ..Default::default()
    });
    encode_model(GraphProto {
        name: "typed".into(),
        node: vec![
            cast,
            node("MatMul", &["x", "w"], "logits"),
            node("Softmax", &["logits"], "scores"),
        ],
        initializer: vec![tensor(
            "w",
            &[4, 2],
            vec![1.0, -1.0, 0.5, 0.25, -0.5, 1.0, 0.0, 2.0],
        )],
        input: vec![value("features", elem, 4)],
        output: vec![float_value("scores", 2)],
        ..Default::default()
    })
}

/// Reference data for [`typed_classifier`]: 40 rows of the vibration features holding
/// whole 0/1 values, which every input type holds.
pub fn typed_reference_csv() -> String {
    let mut csv = String::from("rms,peak,kurtosis,temperature\n");
    for i in 0..40u32 {
        let row: Vec<String> = (0..4).map(|b| ((i >> b) & 1).to_string()).collect();
        csv.push_str(&row.join(","));
        csv.push('\n');
    }
    csv
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeloop_agent::runtime::Plan;
    use edgeloop_agent::source::{ShiftControl, VibrationGenerator};

    fn generated(shift: f32, seed: u64, n: usize) -> (Vec<Vec<f64>>, Vec<usize>) {
        let control = ShiftControl::default();
        control.set(shift);
        let mut g = VibrationGenerator::new(seed, control);
        (0..n)
            .map(|_| {
                let (row, label) = g.labelled_row();
                (row.iter().map(|v| f64::from(*v)).collect(), label)
            })
            .unzip()
    }

    fn names() -> Vec<String> {
        ["rms", "peak", "kurtosis", "temperature"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn the_trained_model_runs_in_tract_and_classifies_unseen_rows() {
        let (rows, labels) = generated(1.0, 1, 3000);
        let trained = fit(&names(), &rows, &labels, &TrainOptions::default()).unwrap();
        assert_eq!(trained.classes, 2);
        assert!(trained.train_accuracy > 0.95, "{}", trained.train_accuracy);
        let plan = Plan::compile(&trained.onnx, 4).unwrap();
        assert_eq!(plan.classes(), 2);
        let (test, truth) = generated(1.0, 2, 2000);
        let hits = test
            .iter()
            .zip(&truth)
            .filter(|(row, label)| {
                let row: Vec<f32> = row.iter().map(|v| *v as f32).collect();
                let p = plan.infer(&row, &names()).unwrap();
                assert!((p.scores.iter().sum::<f32>() - 1.0).abs() < 1e-4);
                p.class == **label
            })
            .count();
        let accuracy = hits as f64 / 2000.0;
        assert!(accuracy > 0.95, "accuracy on unseen rows {accuracy}");
        assert!(
            trained
                .reference_csv
                .starts_with("rms,peak,kurtosis,temperature\n")
        );
        assert_eq!(trained.reference_csv.lines().count(), 1001);
    }

    #[test]
    fn bad_datasets_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("a,b\n1,2\n", "no column `label`"),
            ("label\n1\n", "no feature columns"),
            ("a,label\n1,x\n", "row 2: label `x` is not a class index"),
            ("a,label\n1,0\nNaN,1\n", "row 3: `a` is `NaN`"),
            (
                "a,label\n1,0\n2,1\n",
                "at least 20 rows and two classes; it has 2 rows",
            ),
        ];
        for (i, (csv, expected)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("d{i}.csv"));
            std::fs::write(&path, csv).unwrap();
            let err = train_csv(&path, &TrainOptions::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{err} should say {expected}");
        }
        let one_class: String = std::iter::once("a,label\n".to_string())
            .chain((0..30).map(|i| format!("{i},0\n")))
            .collect();
        let path = dir.path().join("one.csv");
        std::fs::write(&path, one_class).unwrap();
        let err = train_csv(&path, &TrainOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("classes [0]"), "{err}");
    }
}
