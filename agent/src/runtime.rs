//! Inference with tract: an ONNX model is typed, optimized and planned once at load, then
//! run for each input row.
//!
//! The runtime serves models with inputs of shape `[batch, features]` of any manifest
//! dtype (f32, f64, i64, i32, u8, bool; values arrive as 32-bit floats and are cast, after
//! a check that each stands for a value of that type), or one tensor input, and an output
//! of shape `[batch, classes]` (class scores). A model of several inputs takes one row of
//! features, every input's in the graph's order, and the plan splits it among them, so
//! the drift monitor, the reservoir and the sources see one row as for any other model.
//! A graph may have other outputs beside the scores, such as the `label` scikit-learn
//! exporters write: they are pruned from the plan, and the class is the scores' argmax.
//! The plan is made for a batch of one.

use std::sync::Arc;

use edgeloop_shared::bundle::{DType, Manifest, Preprocess, RowLayout, TensorSpec, VerifiedBundle};
use edgeloop_shared::drift::Target;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("tract cannot load the model: {0}")]
    Load(String),
    #[error(
        "model input `{name}` must be of shape [batch, features] or a tensor [batch, d1, …] \
         with every dimension after the batch fixed, and of type f32, f64, i64, i32, u8 or \
         bool; the graph declares {declared}"
    )]
    UnsupportedInput { name: String, declared: String },
    #[error("model expects {expected} input features but {got} were given")]
    WidthMismatch { expected: usize, got: usize },
    #[error("input feature `{feature}` is {value}: only finite values can be inferred")]
    NonFinite { feature: String, value: f32 },
    #[error(
        "input feature `{feature}` is {value}, which the model's input type, {dtype}, cannot hold"
    )]
    NotRepresentable {
        feature: String,
        value: f32,
        dtype: &'static str,
    },
    #[error("inference failed: {0}")]
    Run(String),
    #[error("model output has {got} values, expected {expected} class scores")]
    OutputShape { expected: usize, got: usize },
    #[error("model output contains a non-finite score")]
    NonFiniteOutput,
    #[error(
        "golden vector {index}: this device computes {got:?}, the publisher {expected:?} (tolerance {tolerance})"
    )]
    Golden {
        index: usize,
        expected: Vec<f64>,
        got: Vec<f32>,
        tolerance: f64,
    },
}

/// What was learned about an ONNX graph by loading it with tract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSignature {
    /// Every input of the graph, in the graph's order: one, or several of
    /// `[batch, features]`.
    pub inputs: Vec<InputSignature>,
    /// The output served as class scores (see [`ModelSignature::scores`]).
    pub output_name: String,
    /// Every output of the graph, in the graph's order.
    pub outputs: Vec<OutputSignature>,
    /// Index in `outputs` of the class scores: the only output, or, of several, the one
    /// float output of rank 2 (scikit-learn's `probabilities` beside its `label`).
    pub scores: usize,
    /// The class labels the graph itself carries, in the order of the score columns
    /// ([`graph_class_labels`]).
    pub class_labels: Option<Vec<String>>,
}

/// One input of an ONNX graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSignature {
    pub name: String,
    /// Width of a `[batch, features]` input, when the graph declares it (`None` for a
    /// tensor input).
    pub width: Option<usize>,
    /// The dimensions after the batch, as far as the graph fixes them.
    pub dims: Vec<Option<usize>>,
    /// The element type (f32 when the graph leaves it open).
    pub dtype: DType,
}

/// One output of an ONNX graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSignature {
    pub name: String,
    /// The element type, when the graph declares one a manifest can name.
    pub dtype: Option<DType>,
    /// The declared type and shape, as tract prints them (for error messages).
    pub declared: String,
    /// A label output: an integer or string tensor of rank 1.
    pub is_label: bool,
}

/// Reads an ONNX graph's inputs and outputs and the declared input widths, and picks the
/// output served as class scores.
pub fn inspect_onnx(onnx: &[u8]) -> Result<ModelSignature, RuntimeError> {
    read_graph(onnx, RowSpec::Declared).map(|(signature, _)| signature)
}

/// What one row holds, for typing a graph.
#[derive(Debug, Clone, Copy)]
enum RowSpec<'a> {
    /// What the graph declares; the graph is typed only when it fixes every dimension.
    Declared,
    /// One row of this shape (the dimensions after the batch). For a graph of several
    /// inputs, `[features]`, split among them by the widths they declare (one may be left
    /// open: it takes the rest).
    Row(&'a [usize]),
    /// A graph of `[batch, width]` inputs, one width each, in the graph's order.
    Widths(&'a [usize]),
}

/// Parses `onnx` once: its signature, and the graph typed for one row as `spec` says.
fn read_graph(
    onnx: &[u8],
    spec: RowSpec<'_>,
) -> Result<(ModelSignature, Option<TypedModel>), RuntimeError> {
    let framework = crate::onnx_ops::onnx();
    let proto = framework
        .proto_model_for_read(&mut std::io::Cursor::new(onnx))
        .map_err(|e| RuntimeError::Load(format!("{e:#}")))?;
    let class_labels = graph_class_labels(&proto);
    let mut model = framework
        .model_for_proto_model(&proto)
        .map_err(|e| RuntimeError::Load(format!("{e:#}")))?;
    if model.inputs.is_empty() {
        return Err(RuntimeError::Load("the model has no input".into()));
    }
    let inputs = (0..model.inputs.len())
        .map(|i| read_input(&model, i))
        .collect::<Result<Vec<_>, _>>()?;
    if inputs.len() > 1
        && let Some((i, _)) = inputs.iter().enumerate().find(|(_, s)| s.dims.len() != 1)
    {
        let fact = model
            .input_fact(i)
            .map_err(|e| RuntimeError::Load(e.to_string()))?;
        return Err(RuntimeError::UnsupportedInput {
            name: inputs[i].name.clone(),
            declared: format!(
                "{fact:?}, one of {} inputs (a model of several inputs takes a [batch, \
                 features] table in each)",
                inputs.len()
            ),
        });
    }
    let rows = input_rows(&model, &inputs, spec)?;
    // The output types the graph declares are not always filled in (scikit-learn's label
    // may be left open): type the graph for one row, when its shape is known, and read
    // them from there; otherwise from what analysis infers.
    let typed = match rows {
        Some(rows) => {
            let mut model = model.clone();
            for (i, (row, input)) in rows.into_iter().zip(&inputs).enumerate() {
                model = model
                    .with_input_fact(
                        i,
                        InferenceFact::dt_shape(
                            datum_type(input.dtype),
                            std::iter::once(1).chain(row).collect::<Vec<usize>>(),
                        ),
                    )
                    .map_err(|e| RuntimeError::Load(format!("{e:#}")))?;
            }
            Some(
                model
                    .into_typed()
                    .map_err(|e| RuntimeError::Load(format!("{e:#}")))?,
            )
        }
        None => {
            model
                .analyse(false)
                .map_err(|e| RuntimeError::Load(format!("{e:#}")))?;
            None
        }
    };
    let mut outputs = Vec::new();
    let mut candidates = Vec::new();
    for (i, &outlet) in model
        .output_outlets()
        .map_err(|e| RuntimeError::Load(e.to_string()))?
        .iter()
        .enumerate()
    {
        let (datum, rank, declared) = match &typed {
            Some(typed) => {
                let fact = typed
                    .output_fact(i)
                    .map_err(|e| RuntimeError::Load(e.to_string()))?;
                (
                    Some(fact.datum_type),
                    Some(fact.rank()),
                    format!("{fact:?}"),
                )
            }
            None => {
                let fact = model
                    .outlet_fact(outlet)
                    .map_err(|e| RuntimeError::Load(e.to_string()))?;
                let rank = fact.shape.rank().concretize().map(|r| r as usize);
                (fact.datum_type.concretize(), rank, format!("{fact:?}"))
            }
        };
        // tract types integers it reasons about symbolically (a label gathered from
        // constants) as TDim; the graph's, and onnxruntime's, type is i64.
        let datum = datum.map(|t| {
            if t == TDim::datum_type() {
                i64::datum_type()
            } else {
                t
            }
        });
        let float = datum.is_none_or(|t| t.is_float());
        let integer_or_string = datum.is_some_and(|t| t.is_integer() || t == String::datum_type());
        if float && rank.is_none_or(|r| r == 2) {
            candidates.push(i);
        }
        outputs.push(OutputSignature {
            name: model
                .outlet_label(outlet)
                .map_or_else(|| model.node(outlet.node).name.clone(), str::to_string),
            dtype: datum.and_then(dtype_of),
            declared,
            is_label: integer_or_string && rank == Some(1),
        });
    }
    let scores = match (outputs.len(), &candidates[..]) {
        (1, _) => 0,
        (_, &[one]) => one,
        _ => {
            let list: Vec<String> = outputs
                .iter()
                .map(|o| format!("`{}` {}", o.name, o.declared))
                .collect();
            return Err(RuntimeError::Load(format!(
                "the model has {} outputs ({}); of several, edgeloop serves the one float output \
                 of shape [batch, classes] as the class scores, and {} of them are",
                outputs.len(),
                list.join(", "),
                candidates.len()
            )));
        }
    };
    let signature = ModelSignature {
        inputs,
        output_name: outputs[scores].name.clone(),
        outputs,
        scores,
        class_labels,
    };
    Ok((signature, typed))
}

/// The `i`th input of a graph: its name, element type and dimensions. An input must be
/// `[batch, features]`, or a tensor `[batch, d1, …]` with every dimension after the batch
/// fixed.
fn read_input(model: &InferenceModel, i: usize) -> Result<InputSignature, RuntimeError> {
    let outlet = model
        .input_outlets()
        .map_err(|e| RuntimeError::Load(e.to_string()))?[i];
    let fact = model
        .input_fact(i)
        .map_err(|e| RuntimeError::Load(e.to_string()))?;
    let name = model.node(outlet.node).name.clone();
    let dims: Vec<Option<i64>> = fact
        .shape
        .dims()
        .map(|d| d.concretize().and_then(|d| d.to_i64().ok()))
        .collect();
    let dtype = match fact.datum_type.concretize() {
        None => Some(DType::F32),
        Some(t) => dtype_of(t),
    };
    let unsupported = || RuntimeError::UnsupportedInput {
        name: name.clone(),
        declared: format!("{fact:?}"),
    };
    let (rank, Some(dtype)) = (dims.len(), dtype) else {
        return Err(unsupported());
    };
    let dims: Vec<Option<usize>> = dims
        .iter()
        .skip(1)
        .map(|d| d.and_then(|d| usize::try_from(d).ok()))
        .collect();
    // A tensor input must fix every dimension but the batch: its rows are shaped.
    if rank < 2 || (rank > 2 && dims.iter().any(Option::is_none)) {
        return Err(unsupported());
    }
    Ok(InputSignature {
        width: (rank == 2).then(|| dims[0]).flatten(),
        dims,
        dtype,
        name,
    })
}

/// Each input's row shape for `spec`, checked against what the graph declares; `None`
/// when `spec` leaves a dimension open.
fn input_rows(
    model: &InferenceModel,
    inputs: &[InputSignature],
    spec: RowSpec<'_>,
) -> Result<Option<Vec<Vec<usize>>>, RuntimeError> {
    let declared = || -> Option<Vec<Vec<usize>>> {
        inputs
            .iter()
            .map(|input| input.dims.iter().copied().collect::<Option<Vec<usize>>>())
            .collect()
    };
    let rows = match (spec, inputs) {
        (RowSpec::Declared, _) => return Ok(declared()),
        (RowSpec::Row(row) | RowSpec::Widths(row), [_]) => vec![row.to_vec()],
        (RowSpec::Widths(widths), _) => {
            if widths.len() != inputs.len() {
                return Err(RuntimeError::Load(format!(
                    "the model has {} inputs, but widths for {} were given",
                    inputs.len(),
                    widths.len()
                )));
            }
            widths.iter().map(|&w| vec![w]).collect()
        }
        (RowSpec::Row(&[features]), _) => split_row(inputs, features)?
            .into_iter()
            .map(|w| vec![w])
            .collect(),
        (RowSpec::Row(row), _) => {
            return Err(RuntimeError::Load(format!(
                "a model of {} inputs takes rows of features, not rows of shape {row:?}",
                inputs.len()
            )));
        }
    };
    for (i, (row, input)) in rows.iter().zip(inputs).enumerate() {
        let fits = row.len() == input.dims.len()
            && row
                .iter()
                .zip(&input.dims)
                .all(|(r, d)| d.is_none_or(|d| d == *r));
        if !fits {
            return match (input.width, &row[..]) {
                (Some(width), &[features]) => Err(RuntimeError::WidthMismatch {
                    expected: width,
                    got: features,
                }),
                _ => Err(RuntimeError::UnsupportedInput {
                    name: input.name.clone(),
                    declared: format!(
                        "{:?}, not rows of shape {row:?}",
                        model
                            .input_fact(i)
                            .map_err(|e| RuntimeError::Load(e.to_string()))?
                    ),
                }),
            };
        }
    }
    Ok(Some(rows))
}

/// How a row of `features` numbers splits among `[batch, width]` inputs: by the widths
/// they declare, the one left open (if any) taking the rest.
fn split_row(inputs: &[InputSignature], features: usize) -> Result<Vec<usize>, RuntimeError> {
    let fixed: usize = inputs.iter().filter_map(|i| i.width).sum();
    let open: Vec<&str> = inputs
        .iter()
        .filter(|i| i.width.is_none())
        .map(|i| i.name.as_str())
        .collect();
    match open[..] {
        [] if fixed == features => Ok(inputs.iter().filter_map(|i| i.width).collect()),
        [] => Err(RuntimeError::WidthMismatch {
            expected: fixed,
            got: features,
        }),
        [_] if features > fixed => Ok(inputs
            .iter()
            .map(|i| i.width.unwrap_or(features - fixed))
            .collect()),
        [open] => Err(RuntimeError::Load(format!(
            "a row of {features} features leaves nothing for input `{open}`, whose width is \
             open (the other inputs take {fixed})"
        ))),
        _ => Err(RuntimeError::Load(format!(
            "inputs `{}` leave their widths open, so a row of {features} features cannot be \
             split among them; declare every input's width but one in the graph",
            open.join("`, `")
        ))),
    }
}

/// The class labels a classifier graph carries, in the order of its score columns:
/// - an ONNX-ML classifier node's `classlabels_strings`, `classlabels_ints` or
///   `classlabels_int64s` (`LinearClassifier`, `TreeEnsembleClassifier`, `SVMClassifier`,
///   as scikit-learn's exporter writes them);
/// - otherwise, the constant table an `ArrayFeatureExtractor` picks the label from (how the
///   exporter labels an `MLPClassifier`'s argmax).
///
/// Integer labels read as their decimal text. `None` unless exactly one node names the
/// labels, and they are distinct.
pub fn graph_class_labels(proto: &tract_onnx::pb::ModelProto) -> Option<Vec<String>> {
    let graph = proto.graph.as_ref()?;
    let text = |bytes: &Vec<u8>| String::from_utf8(bytes.clone()).ok();
    let from_attributes = |node: &tract_onnx::pb::NodeProto| {
        node.attribute.iter().find_map(|a| match a.name.as_str() {
            "classlabels_strings" => a.strings.iter().map(text).collect::<Option<Vec<_>>>(),
            "classlabels_ints" | "classlabels_int64s" => {
                Some(a.ints.iter().map(i64::to_string).collect())
            }
            _ => None,
        })
    };
    let mut found: Vec<Vec<String>> = graph.node.iter().filter_map(from_attributes).collect();
    if found.is_empty() {
        found = graph
            .node
            .iter()
            .filter(|n| n.op_type == "ArrayFeatureExtractor")
            .filter_map(|n| {
                let table = graph
                    .initializer
                    .iter()
                    .find(|t| Some(&t.name) == n.input.first())?;
                use tract_onnx::pb::tensor_proto::DataType;
                let raw = |width: usize| -> Vec<String> {
                    table
                        .raw_data
                        .chunks_exact(width)
                        .map(|b| {
                            if width == 8 {
                                i64::from_le_bytes(b.try_into().expect("8 bytes")).to_string()
                            } else {
                                i32::from_le_bytes(b.try_into().expect("4 bytes")).to_string()
                            }
                        })
                        .collect()
                };
                match DataType::try_from(table.data_type).ok()? {
                    DataType::String => table.string_data.iter().map(text).collect(),
                    DataType::Int64 if table.raw_data.is_empty() => {
                        Some(table.int64_data.iter().map(i64::to_string).collect())
                    }
                    DataType::Int64 => Some(raw(8)),
                    DataType::Int32 if table.raw_data.is_empty() => {
                        Some(table.int32_data.iter().map(i32::to_string).collect())
                    }
                    DataType::Int32 => Some(raw(4)),
                    _ => None,
                }
            })
            .collect();
    }
    let [labels] = <[Vec<String>; 1]>::try_from(found).ok()?;
    let distinct = labels
        .iter()
        .enumerate()
        .all(|(i, l)| !l.is_empty() && !labels[..i].contains(l));
    (distinct && !labels.is_empty()).then_some(labels)
}

/// Lets tract split the matrix multiplications of every plan in this process across
/// `threads` threads (1: each inference on the thread that runs it).
pub fn set_inference_threads(threads: u16) {
    use tract_linalg::multithread::{Executor, set_default_executor};
    set_default_executor(if threads > 1 {
        Executor::multithread(usize::from(threads))
    } else {
        Executor::SingleThread
    });
}

/// What the served output gave for one input row.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// The served output's numbers: a classifier's scores, one per class, or a
    /// regression's one value.
    pub scores: Vec<f32>,
    /// The top score's index: a classifier's predicted class (0 for a regression).
    pub class: usize,
}

impl Prediction {
    /// What the model predicted: its class, or for a regression its value.
    pub fn target(&self, regression: bool) -> Target {
        if regression {
            Target::Value(f64::from(self.scores[0]))
        } else {
            Target::Class(self.class)
        }
    }
}

/// tract's element type for a manifest dtype.
pub fn datum_type(dtype: DType) -> DatumType {
    match dtype {
        DType::F32 => f32::datum_type(),
        DType::F64 => f64::datum_type(),
        DType::I64 => i64::datum_type(),
        DType::I32 => i32::datum_type(),
        DType::U8 => u8::datum_type(),
        DType::Bool => bool::datum_type(),
    }
}

/// The manifest dtype of one of tract's element types, if it has one.
pub fn dtype_of(datum: DatumType) -> Option<DType> {
    DType::ALL.into_iter().find(|&d| datum_type(d) == datum)
}

/// An ONNX model optimized for one row (`[1, features]`, or `[1, d1, …]` for a tensor
/// input), ready to run.
#[derive(Debug, Clone)]
pub struct Plan {
    runnable: Arc<TypedRunnableModel>,
    /// The numbers in one row.
    features: usize,
    /// The graph's inputs, each fed from its part of a row, in the graph's order.
    inputs: Vec<PlanInput>,
    /// A row's shape as callers send it: the model's, or channels last.
    row: Vec<usize>,
    /// `(channels, positions)` when rows come channels last and are transposed for a
    /// model whose channels come first.
    channels_last: Option<(usize, usize)>,
    /// Consecutive numbers of one channel, for preprocessing by channel (1 for a row of
    /// features).
    inner: usize,
    classes: usize,
    output: String,
    preprocess: Option<Arc<Preprocess>>,
    /// Preprocessing folded into the graph: the largest magnitude a number may have for
    /// its scaled value to stay finite ([`fold_limit`]).
    folded: Option<f32>,
    signature: Arc<ModelSignature>,
}

/// One graph input of a plan: the next `len` numbers of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanInput {
    pub name: String,
    /// The input's shape: a batch of one, then a row's.
    pub shape: Vec<usize>,
    /// The numbers of a row it takes.
    pub len: usize,
    pub dtype: DType,
}

impl Plan {
    /// Loads, types and optimizes `onnx` for a batch of one row of `features` values, and
    /// runs it once on zeros to learn the number of output classes. A row of a graph of
    /// several inputs is split among them by the widths they declare.
    pub fn compile(onnx: &[u8], features: usize) -> Result<Self, RuntimeError> {
        Plan::compile_shaped(onnx, &[features])
    }

    /// Loads, types and optimizes `onnx` for one row of shape `row` (the input's
    /// dimensions after the batch), and runs it once on zeros to learn the number of
    /// output classes.
    pub fn compile_shaped(onnx: &[u8], row: &[usize]) -> Result<Self, RuntimeError> {
        Plan::compile_with(onnx, RowSpec::Row(row), None)
    }

    /// A plan for a graph of `[batch, width]` inputs, one width each in the graph's order
    /// (as a manifest declares them): a row is their features one after the other.
    pub fn compile_inputs(onnx: &[u8], widths: &[usize]) -> Result<Self, RuntimeError> {
        Plan::compile_with(onnx, RowSpec::Widths(widths), None)
    }

    /// A plan for a tensor input (every dimension after the batch fixed) whose channels
    /// are scaled as its `preprocess` says. For an f32 input the
    /// scaling becomes two operators at the head of the graph, which tract fuses with what
    /// follows, so a row is not copied to be scaled; for other input types the plan scales
    /// a copy ([`Plan::with_channel_preprocess`]).
    pub fn compile_tensor(onnx: &[u8], input: &TensorSpec) -> Result<Self, RuntimeError> {
        let unsupported = || RuntimeError::UnsupportedInput {
            name: input.name.clone(),
            declared: format!("{:?} {:?}", input.dtype, input.shape),
        };
        let row: Vec<usize> = input.shape[1..]
            .iter()
            .map(|d| d.and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(unsupported)?;
        let (channels, inner) = input.channel_layout().ok_or_else(unsupported)?;
        // Rows sent channels last are transposed first: scaling by channel then sees the
        // model's layout, channels first.
        let channels_last = input.layout == Some(RowLayout::ChannelsLast);
        let inner = if channels_last {
            row[1..].iter().product()
        } else {
            inner
        };
        let Some(p) = &input.preprocess else {
            return Ok(Plan::compile_with(onnx, RowSpec::Row(&row), None)?
                .with_channels_last(channels_last));
        };
        p.validate(channels).map_err(RuntimeError::Load)?;
        let axis = input.channel_axis.unwrap_or(1) as usize;
        let plan = Plan::compile_with(onnx, RowSpec::Row(&row), Some((p, axis)))?
            .with_channels_last(channels_last);
        if plan.folded.is_some() {
            Ok(plan)
        } else {
            plan.with_channel_preprocess(Some(p), channels, inner)
        }
    }

    /// The plan that takes rows channels last (`[H, W, C]`) and transposes them for its
    /// model, whose channels come first (`[C, H, W]`); `false` leaves it as it is.
    fn with_channels_last(mut self, channels_last: bool) -> Self {
        if channels_last && self.row.len() >= 2 {
            let channels = self.row[0];
            self.channels_last = Some((channels, self.features / channels.max(1)));
            self.row.rotate_left(1);
        }
        self
    }

    /// Where the `i`th number of the row the model sees came from in the row the caller
    /// sent (they differ for rows sent channels last).
    fn caller_index(&self, i: usize) -> usize {
        match self.channels_last {
            Some((channels, positions)) => (i % positions.max(1)) * channels + i / positions.max(1),
            None => i,
        }
    }

    fn compile_with(
        onnx: &[u8],
        spec: RowSpec<'_>,
        fold: Option<(&Preprocess, usize)>,
    ) -> Result<Self, RuntimeError> {
        let (signature, typed) = read_graph(onnx, spec)?;
        let mut typed = typed.expect("typed for the given row");
        let inputs = typed
            .input_outlets()
            .map_err(|e| RuntimeError::Load(e.to_string()))?
            .iter()
            .zip(&signature.inputs)
            .map(|(&outlet, input)| {
                let fact = typed
                    .outlet_fact(outlet)
                    .map_err(|e| RuntimeError::Load(e.to_string()))?;
                let shape: Vec<usize> = fact
                    .shape
                    .as_concrete()
                    .ok_or_else(|| {
                        RuntimeError::Load(format!("input `{}` is typed {fact:?}", input.name))
                    })?
                    .to_vec();
                Ok(PlanInput {
                    name: input.name.clone(),
                    len: shape.iter().skip(1).product(),
                    shape,
                    dtype: input.dtype,
                })
            })
            .collect::<Result<Vec<_>, RuntimeError>>()?;
        let features = inputs.iter().map(|i| i.len).sum();
        // The row as callers send it: a tensor's shape, or the features of every input.
        let row = match &inputs[..] {
            [one] => one.shape[1..].to_vec(),
            _ => vec![features],
        };
        // Folding is for the one f32 input of a tensor model.
        let fold = fold.filter(|_| signature.inputs.len() == 1 && inputs[0].dtype == DType::F32);
        if let Some((p, axis)) = fold {
            fold_preprocess(&mut typed, p, axis, &row)
                .map_err(|e| RuntimeError::Load(format!("preprocessing in the graph: {e:#}")))?;
        }
        // Only the scores are computed: the other outputs (a label the graph derives from
        // them) are pruned when the plan is optimized.
        let runnable = typed
            .output_outlets()
            .map(|outlets| outlets[signature.scores])
            .and_then(|scores| typed.select_output_outlets(&[scores]))
            .and_then(|()| typed.into_optimized())
            .and_then(|mut m| {
                crate::onnx_ops::index_tree_ensembles(&mut m)?;
                m.into_runnable()
            })
            .map_err(|e| RuntimeError::Load(format!("{e:#}")))?;
        let mut plan = Plan {
            runnable,
            features,
            inputs,
            row,
            channels_last: None,
            inner: 1,
            classes: 0,
            output: signature.output_name.clone(),
            preprocess: None,
            folded: fold.map(|(p, _)| fold_limit(p)),
            signature: Arc::new(signature),
        };
        let zeros = plan.run_raw(&vec![0.0; features])?;
        plan.classes = zeros.len();
        if plan.classes == 0 {
            return Err(RuntimeError::OutputShape {
                expected: 1,
                got: 0,
            });
        }
        Ok(plan)
    }

    /// The plan that scales every row as `preprocess` says before the model sees it
    /// (the manifest input's `preprocess`; `None` leaves rows as they are).
    pub fn with_preprocess(
        mut self,
        preprocess: Option<&Preprocess>,
    ) -> Result<Self, RuntimeError> {
        if let Some(p) = preprocess {
            p.validate(self.features).map_err(RuntimeError::Load)?;
        }
        self.preprocess = preprocess.cloned().map(Arc::new);
        self.inner = 1;
        Ok(self)
    }

    /// The plan that scales a tensor row by channel, as `preprocess` says, channels
    /// coming in runs of `inner` numbers ([`TensorSpec::channel_layout`]).
    pub fn with_channel_preprocess(
        mut self,
        preprocess: Option<&Preprocess>,
        channels: usize,
        inner: usize,
    ) -> Result<Self, RuntimeError> {
        if let Some(p) = preprocess {
            p.validate(channels).map_err(RuntimeError::Load)?;
            if channels
                .checked_mul(inner)
                .is_none_or(|n| n == 0 || !self.features.is_multiple_of(n))
            {
                return Err(RuntimeError::Load(format!(
                    "{channels} channels of {inner} numbers do not tile a row of {}",
                    self.features
                )));
            }
        }
        self.preprocess = preprocess.cloned().map(Arc::new);
        self.inner = inner;
        Ok(self)
    }

    /// How an error names the `i`th number of a row: `#i` in a row of features, its index
    /// (`[c, h, w]`) in a tensor row.
    fn element_name(&self, i: usize) -> String {
        let row = self.row_shape();
        if row.len() < 2 {
            return format!("#{i}");
        }
        let mut index = vec![0; row.len()];
        let mut rest = i;
        for (slot, &dim) in index.iter_mut().zip(row).rev() {
            *slot = rest % dim.max(1);
            rest /= dim.max(1);
        }
        let index: Vec<String> = index.iter().map(usize::to_string).collect();
        format!("[{}]", index.join(", "))
    }

    /// A row's shape as callers send it, without the batch.
    pub fn row_shape(&self) -> &[usize] {
        &self.row
    }

    pub fn features(&self) -> usize {
        self.features
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The graph's inputs, in the graph's order, as a row feeds them.
    pub fn inputs(&self) -> &[PlanInput] {
        &self.inputs
    }

    /// The name of the graph output served as class scores.
    pub fn output(&self) -> &str {
        &self.output
    }

    /// The optimized tract model the plan runs (its preprocessing folded in, when it is),
    /// for measuring the plan against tract alone.
    pub fn runnable(&self) -> &Arc<TypedRunnableModel> {
        &self.runnable
    }

    /// What the graph declares, as [`inspect_onnx`] reads it (from the same parse).
    pub fn signature(&self) -> &ModelSignature {
        &self.signature
    }

    fn run_raw(&self, row: &[f32]) -> Result<Vec<f32>, RuntimeError> {
        // Taken before tract's buffers, not after: then the allocator gets tract's back in
        // the order it handed them out and serves the next run from its caches. A Vec
        // allocated after the run sent malloc down its slow paths (cachegrind: about 800
        // more instructions per call, 0.4 µs on the example MLP).
        let mut scores = Vec::with_capacity(self.classes);
        let mut tensors = TVec::with_capacity(self.inputs.len());
        let mut at = 0;
        for input in &self.inputs {
            let part = &row[at..at + input.len];
            at += input.len;
            let mut tensor = Tensor::from_shape(&input.shape, part)
                .map_err(|e| RuntimeError::Run(e.to_string()))?;
            if input.dtype != DType::F32 {
                tensor = tensor
                    .cast_to_dt(datum_type(input.dtype))
                    .map_err(|e| RuntimeError::Run(e.to_string()))?
                    .into_owned();
            }
            tensors.push(tensor.into());
        }
        let outputs = self
            .runnable
            .run(tensors)
            .map_err(|e| RuntimeError::Run(format!("{e:#}")))?;
        let cast = outputs[0]
            .cast_to::<f32>()
            .map_err(|e| RuntimeError::Run(e.to_string()))?;
        let plain = cast
            .try_as_plain_ram()
            .map_err(|e| RuntimeError::Run(e.to_string()))?;
        let values = plain
            .as_slice::<f32>()
            .map_err(|e| RuntimeError::Run(e.to_string()))?;
        scores.extend_from_slice(values);
        Ok(scores)
    }

    /// Runs one row. The caller names the features for error messages.
    pub fn infer(&self, row: &[f32], feature_names: &[String]) -> Result<Prediction, RuntimeError> {
        if row.len() != self.features {
            return Err(RuntimeError::WidthMismatch {
                expected: self.features,
                got: row.len(),
            });
        }
        // Named by where they are in the caller's row.
        let feature = |i: usize| {
            feature_names
                .get(i)
                .cloned()
                .unwrap_or_else(|| self.element_name(i))
        };
        if let Some(i) = first_non_finite(row, self.folded.unwrap_or(f32::MAX)) {
            let value = row[i];
            return Err(RuntimeError::NonFinite {
                feature: if value.is_finite() {
                    // Finite, but not once the graph scales it.
                    format!("{} (preprocessed)", feature(i))
                } else {
                    feature(i)
                },
                value,
            });
        }
        let transposed: Vec<f32>;
        let row = match self.channels_last {
            None => row,
            Some((channels, positions)) => {
                transposed = channels_first(row, channels, positions);
                &transposed[..]
            }
        };
        // From here on, indices are the model's: named by the caller's.
        let feature = |i: usize| feature(self.caller_index(i));
        let scaled: Vec<f32>;
        let row = match &self.preprocess {
            None => row,
            Some(p) => {
                let mut values = row.to_vec();
                p.apply(&mut values, self.inner);
                scaled = values;
                // A value beyond f32's range once scaled.
                if let Some(i) = first_non_finite(&scaled, f32::MAX) {
                    return Err(RuntimeError::NonFinite {
                        feature: format!("{} (preprocessed)", feature(i)),
                        value: scaled[i],
                    });
                }
                &scaled[..]
            }
        };
        // Every finite number is a float input's (checked above); integers and bools must
        // be whole and in range.
        if let Some((i, value, dtype)) = self.first_unrepresentable(row) {
            return Err(RuntimeError::NotRepresentable {
                feature: match self.preprocess {
                    Some(_) => format!("{} (preprocessed)", feature(i)),
                    None => feature(i),
                },
                value,
                dtype: dtype.name(),
            });
        }
        let scores = self.run_raw(row)?;
        if scores.len() != self.classes {
            return Err(RuntimeError::OutputShape {
                expected: self.classes,
                got: scores.len(),
            });
        }
        if scores.iter().any(|s| !s.is_finite()) {
            return Err(RuntimeError::NonFiniteOutput);
        }
        let class = scores
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap_or(0);
        Ok(Prediction { scores, class })
    }
}

impl Plan {
    /// The first number of a row that an integer or bool input cannot hold, with that
    /// input's type.
    fn first_unrepresentable(&self, row: &[f32]) -> Option<(usize, f32, DType)> {
        let mut at = 0;
        for input in &self.inputs {
            let part = &row[at..at + input.len];
            if !matches!(input.dtype, DType::F32 | DType::F64)
                && let Some(i) = part.iter().position(|v| !input.dtype.represents(*v))
            {
                return Some((at + i, part[i], input.dtype));
            }
            at += input.len;
        }
        None
    }
}

/// A row of `positions` runs of `channels` numbers (channels last) as `channels` runs of
/// `positions` numbers (channels first).
fn channels_first(row: &[f32], channels: usize, positions: usize) -> Vec<f32> {
    let mut out = vec![0.0; row.len()];
    for (j, pixel) in row
        .chunks_exact(channels.max(1))
        .take(positions)
        .enumerate()
    {
        for (c, &x) in pixel.iter().enumerate() {
            out[c * positions + j] = x;
        }
    }
    out
}

/// Where the first number that is NaN, infinite or larger in magnitude than `limit` is.
/// The whole row is checked without branching first (which the compiler vectorises),
/// since nearly every row has none.
fn first_non_finite(values: &[f32], limit: f32) -> Option<usize> {
    let within = |v: &f32| v.abs() <= limit;
    if values.iter().fold(true, |ok, v| ok & within(v)) {
        None
    } else {
        values.iter().position(|v| !within(v))
    }
}

/// Puts `x' = (x − offset) × scale` by channel (along `axis`) at the head of `typed`: a
/// `Sub` and a `Mul` by constants shaped to broadcast over the other axes, between the
/// input and everything that read it.
fn fold_preprocess(
    typed: &mut TypedModel,
    p: &Preprocess,
    axis: usize,
    row: &[usize],
) -> TractResult<()> {
    let input = typed.input_outlets()?[0];
    let readers = typed.outlet_successors(input).to_vec();
    let mut shape = vec![1usize; row.len() + 1];
    shape[axis] = p.offset.len();
    let constant = |values: &[f64]| -> TractResult<Tensor> {
        let values: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        tensor1(&values).into_shape(&shape)
    };
    let offset = typed.add_const("edgeloop.preprocess.offset", constant(&p.offset)?)?;
    let scale = typed.add_const("edgeloop.preprocess.scale", constant(&p.scale)?)?;
    let shifted = typed.wire_node(
        "edgeloop.preprocess.sub",
        tract_onnx::tract_core::ops::math::sub(),
        &[input, offset],
    )?[0];
    let scaled = typed.wire_node(
        "edgeloop.preprocess.mul",
        tract_onnx::tract_core::ops::math::mul(),
        &[shifted, scale],
    )?[0];
    for inlet in readers {
        typed.add_edge(scaled, inlet)?;
    }
    Ok(())
}

/// The largest magnitude an input number may have for `(x − offset) × scale` to stay
/// within f32 in every channel.
fn fold_limit(p: &Preprocess) -> f32 {
    p.offset
        .iter()
        .zip(&p.scale)
        .map(|(o, s)| f64::from(f32::MAX) / s.abs().max(f64::MIN_POSITIVE) - o.abs())
        .fold(f64::from(f32::MAX), f64::min)
        .max(0.0) as f32
}

/// A verified bundle's model, planned and smoke-tested, with its manifest.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub manifest: Manifest,
    pub plan: Plan,
    feature_names: Vec<String>,
    /// The chance that its next input is kept in the sample for retraining, which the
    /// agent's loop keeps current: the API hands a tensor input over with it.
    pub sample_chance: std::sync::Arc<crate::reservoir::SharedChance>,
}

impl LoadedModel {
    /// Plans the bundle's model and runs it on the reference means, which must give one
    /// finite score per declared class, then on the golden vectors, which must give the
    /// publisher's outputs within the tolerance.
    pub fn load(bundle: &VerifiedBundle) -> Result<Self, RuntimeError> {
        let manifest = bundle.manifest.clone();
        let input = &manifest.inputs[0];
        for input in &manifest.inputs {
            check_spec(input)?;
        }
        let plan = if input.is_tensor() {
            Plan::compile_tensor(&bundle.model, input)?
        } else if manifest.inputs.len() > 1 {
            // The manifest's widths split a row (checked against the graph's).
            let widths: Vec<usize> = manifest
                .inputs
                .iter()
                .map(|i| i.row_len().unwrap_or(0))
                .collect();
            Plan::compile_inputs(&bundle.model, &widths)?
                .with_preprocess(manifest.row_preprocess().as_ref())?
        } else {
            Plan::compile(&bundle.model, manifest.reference.features.len())?
                .with_preprocess(input.preprocess.as_ref())?
        };
        if plan.inputs().len() != manifest.inputs.len() {
            return Err(RuntimeError::Load(format!(
                "the manifest declares {} inputs, the graph has {}",
                manifest.inputs.len(),
                plan.inputs().len()
            )));
        }
        for (i, (spec, input)) in manifest.inputs.iter().zip(plan.inputs()).enumerate() {
            // One input may be named as the publisher liked; several are matched by name,
            // since their order splits a row.
            if manifest.inputs.len() > 1 && spec.name != input.name {
                return Err(RuntimeError::Load(format!(
                    "the manifest's input {i} is `{}`, the graph's `{}`: a model of several \
                     inputs lists them in the graph's order",
                    spec.name, input.name
                )));
            }
            if input.dtype != spec.dtype {
                return Err(RuntimeError::UnsupportedInput {
                    name: spec.name.clone(),
                    declared: format!(
                        "{} in the graph but {} in the manifest",
                        input.dtype.name(),
                        spec.dtype.name()
                    ),
                });
            }
        }
        let served = manifest.served_output();
        // A manifest of several outputs names the served one; a manifest of one output
        // (the only kind before outputs had kinds) may name it by its node.
        if manifest.outputs.len() > 1 && served.name != plan.output() {
            return Err(RuntimeError::Load(format!(
                "the manifest serves output `{}`, but the graph's served output is `{}`",
                served.name,
                plan.output()
            )));
        }
        let declared_classes = if manifest.is_regression() {
            Some(1)
        } else {
            served.shape.last().copied().flatten()
        };
        if let Some(classes) = declared_classes
            && classes as usize != plan.classes()
        {
            return Err(RuntimeError::OutputShape {
                expected: classes as usize,
                got: plan.classes(),
            });
        }
        let model = LoadedModel {
            sample_chance: Default::default(),
            // A tensor's numbers are named by their index in errors.
            feature_names: if input.is_tensor() {
                Vec::new()
            } else {
                manifest
                    .reference
                    .feature_names()
                    .map(str::to_string)
                    .collect()
            },
            manifest,
            plan,
        };
        model.infer(&model.smoke_row())?;
        if let Some(golden) = &model.manifest.golden {
            for (index, vector) in golden.vectors.iter().enumerate() {
                let got = model.infer(&golden_input(&vector.input))?.scores;
                let close = got.len() == vector.output.len()
                    && got.iter().zip(&vector.output).all(|(g, e)| {
                        (f64::from(*g) - e).abs() <= golden.tolerance * e.abs().max(1.0)
                    });
                if !close {
                    return Err(RuntimeError::Golden {
                        index,
                        expected: vector.output.clone(),
                        got,
                        tolerance: golden.tolerance,
                    });
                }
            }
        }
        Ok(model)
    }

    /// The median time of one single-row inference over `rounds` passes through the golden
    /// vectors (the reference means when there are none).
    pub fn median_latency(&self, rounds: usize) -> Result<std::time::Duration, RuntimeError> {
        let rows: Vec<Vec<f32>> = match &self.manifest.golden {
            Some(g) if !g.vectors.is_empty() => {
                g.vectors.iter().map(|v| golden_input(&v.input)).collect()
            }
            _ => vec![self.smoke_row()],
        };
        let mut times = Vec::with_capacity(rows.len() * rounds.max(1));
        for _ in 0..rounds.max(1) {
            for row in &rows {
                let started = std::time::Instant::now();
                self.infer(row)?;
                times.push(started.elapsed());
            }
        }
        times.sort_unstable();
        Ok(times[times.len() / 2])
    }

    pub fn infer(&self, row: &[f32]) -> Result<Prediction, RuntimeError> {
        self.plan.infer(row, &self.feature_names)
    }

    /// The reference means, as the nearest values the input type holds (rounded for
    /// integers, 0 or 1 for bool): the row the smoke test runs.
    fn smoke_row(&self) -> Vec<f32> {
        let features = &self.manifest.reference.features;
        let input = &self.manifest.inputs[0];
        // A tensor row holds each channel's reference mean (the mean of `{channel}.mean`).
        let means: Vec<f64> = match input.channel_layout() {
            Some((channels, inner)) if input.is_tensor() => (0..self.plan.features())
                .map(|i| features[2 * ((i / inner.max(1)) % channels.max(1))].mean)
                .collect(),
            _ => features.iter().map(|f| f.mean).collect(),
        };
        let dtypes = self
            .plan
            .inputs()
            .iter()
            .flat_map(|i| std::iter::repeat_n(i.dtype, i.len));
        means
            .into_iter()
            .zip(dtypes)
            .map(|(mean, dtype)| match dtype {
                DType::F32 | DType::F64 => mean as f32,
                DType::Bool => f32::from(u8::from(mean >= 0.5)),
                DType::U8 => mean.round().clamp(0.0, 255.0) as f32,
                DType::I32 => mean.round().clamp(-2_147_483_648.0, 2_147_483_520.0) as f32,
                DType::I64 => mean.round() as f32,
            })
            .collect()
    }

    pub fn feature_names(&self) -> &[String] {
        &self.feature_names
    }

    /// Whether the model predicts a value (a regression) rather than a class.
    pub fn is_regression(&self) -> bool {
        self.manifest.is_regression()
    }

    /// Whether the model's input is a tensor (an image, a sequence): rows are shaped, and
    /// drift is watched on channel statistics.
    pub fn is_tensor(&self) -> bool {
        self.manifest.inputs[0].is_tensor()
    }

    /// The numbers the drift window counts for an input row: the row itself, or for a
    /// tensor input its channels' means and deviations ([`TensorSpec::tensor_features`]),
    /// in the order of the reference profile's features.
    pub fn drift_row<'a>(&self, row: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        let input = &self.manifest.inputs[0];
        if input.is_tensor() {
            std::borrow::Cow::Owned(input.tensor_features(row))
        } else {
            std::borrow::Cow::Borrowed(row)
        }
    }
}

fn golden_input(input: &[f64]) -> Vec<f32> {
    input.iter().map(|x| *x as f32).collect()
}

/// Checks that the agent serves an input of this spec: `[batch, features]`, or a tensor
/// input ([`Plan::compile_tensor`] checks its dimensions).
fn check_spec(spec: &TensorSpec) -> Result<(), RuntimeError> {
    if spec.shape.len() < 2 {
        return Err(RuntimeError::UnsupportedInput {
            name: spec.name.clone(),
            declared: format!("{:?} {:?}", spec.dtype, spec.shape),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL_V1: &[u8] = include_bytes!("../../controller/assets/vibration/model_v1.onnx");

    fn names() -> Vec<String> {
        ["rms", "peak", "kurtosis", "temperature"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn the_example_model_loads_and_classifies() {
        let sig = inspect_onnx(MODEL_V1).unwrap();
        assert_eq!(sig.inputs.len(), 1);
        assert_eq!(sig.inputs[0].width, Some(4));
        // Built by hand from plain ONNX ops: it names no classes.
        assert_eq!(sig.class_labels, None);
        let plan = Plan::compile(MODEL_V1, 4).unwrap();
        assert_eq!(plan.classes(), 2);
        let normal = plan.infer(&[1.0, 3.0, 3.0, 45.0], &names()).unwrap();
        assert_eq!(normal.class, 0);
        assert!((normal.scores.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        let fault = plan.infer(&[1.9, 8.5, 6.5, 56.0], &names()).unwrap();
        assert_eq!(fault.class, 1);
    }

    #[test]
    fn preprocessing_scales_rows_before_the_model_and_names_what_it_breaks() {
        // Temperatures arrive in °F: x' = (x - 32) * 5/9.
        let fahrenheit = Preprocess {
            offset: vec![0.0, 0.0, 0.0, 32.0],
            scale: vec![1.0, 1.0, 1.0, 5.0 / 9.0],
        };
        let plan = Plan::compile(MODEL_V1, 4).unwrap();
        let scaled = plan.clone().with_preprocess(Some(&fahrenheit)).unwrap();
        let celsius = plan.infer(&[1.9, 8.5, 6.5, 56.0], &names()).unwrap();
        let got = scaled.infer(&[1.9, 8.5, 6.5, 132.8], &names()).unwrap();
        assert_eq!(got.class, celsius.class);
        assert!((got.scores[1] - celsius.scores[1]).abs() < 1e-5, "{got:?}");
        // The same numbers unscaled are a much hotter machine.
        let hot = plan.infer(&[1.9, 8.5, 6.5, 132.8], &names()).unwrap();
        assert!(hot.scores[1] > got.scores[1]);

        let err = plan
            .clone()
            .with_preprocess(Some(&Preprocess {
                offset: vec![0.0; 2],
                scale: vec![1.0; 2],
            }))
            .unwrap_err();
        assert!(err.to_string().contains("2 values for 4 features"), "{err}");

        // A value the scaling pushes past f32's range is refused as the feature it came from.
        let huge = Preprocess {
            offset: vec![0.0; 4],
            scale: vec![1.0, 1.0, 1.0, 1e30],
        };
        let err = plan
            .with_preprocess(Some(&huge))
            .unwrap()
            .infer(&[1.0, 3.0, 3.0, 1e10], &names())
            .unwrap_err();
        assert!(
            matches!(&err, RuntimeError::NonFinite { feature, .. } if feature == "temperature (preprocessed)"),
            "{err}"
        );
    }

    /// Scaling folded into an f32 graph gives what scaling a copy gives, and still names
    /// a number its scaling would push past f32.
    #[test]
    fn preprocessing_folded_into_the_graph_matches_scaling_a_copy() {
        const CNN: &[u8] = include_bytes!("../tests/compat/cnn.onnx");
        let p = Preprocess {
            offset: vec![10.0, 20.0, 30.0],
            scale: vec![0.5, 0.25, 0.125],
        };
        let spec = |preprocess: Option<&Preprocess>| TensorSpec {
            name: "image".into(),
            dtype: DType::F32,
            shape: vec![None, Some(3), Some(32), Some(32)],
            names: Vec::new(),
            kind: None,
            preprocess: preprocess.cloned(),
            layout: None,
            channel_axis: Some(1),
        };
        let folded = Plan::compile_tensor(CNN, &spec(Some(&p))).unwrap();
        assert!(folded.folded.is_some() && folded.preprocess.is_none());
        let copied = Plan::compile_shaped(CNN, &[3, 32, 32])
            .unwrap()
            .with_channel_preprocess(Some(&p), 3, 1024)
            .unwrap();
        let image: Vec<f32> = (0..3072).map(|i| 20.0 + (i % 97) as f32 * 0.3).collect();
        let (a, b) = (
            folded.infer(&image, &[]).unwrap(),
            copied.infer(&image, &[]).unwrap(),
        );
        assert_eq!(a.class, b.class);
        for (x, y) in a.scores.iter().zip(&b.scores) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
        // Without preprocessing the same numbers score otherwise.
        let raw = Plan::compile_tensor(CNN, &spec(None)).unwrap();
        assert_ne!(raw.infer(&image, &[]).unwrap().scores, a.scores);

        let huge = Preprocess {
            offset: vec![0.0; 3],
            scale: vec![1.0, 1.0, 1e30],
        };
        let plan = Plan::compile_tensor(CNN, &spec(Some(&huge))).unwrap();
        let mut bright = image.clone();
        bright[2048 + 33] = 1e10;
        let err = plan.infer(&bright, &[]).unwrap_err();
        assert!(
            matches!(&err, RuntimeError::NonFinite { feature, .. } if feature == "[2, 1, 1] (preprocessed)"),
            "{err}"
        );
        let mut gap = image;
        gap[5] = f32::NAN;
        let err = plan.infer(&gap, &[]).unwrap_err();
        assert!(
            matches!(&err, RuntimeError::NonFinite { feature, .. } if feature == "[0, 0, 5]"),
            "{err}"
        );
    }

    /// Rows sent channels last (`[H, W, C]`) are transposed for a model that takes them
    /// channels first: the same scores as the channels-first row, with and without
    /// preprocessing, and errors named by where they are in the row sent.
    #[test]
    fn rows_sent_channels_last_are_transposed_for_the_model() {
        const CNN: &[u8] = include_bytes!("../tests/compat/cnn.onnx");
        let spec = |layout: Option<RowLayout>, preprocess: Option<Preprocess>| TensorSpec {
            name: "image".into(),
            dtype: DType::F32,
            shape: vec![None, Some(3), Some(32), Some(32)],
            names: Vec::new(),
            kind: None,
            preprocess,
            layout,
            channel_axis: None,
        };
        let chw: Vec<f32> = (0..3072)
            .map(|i| ((i * 7919) % 1013) as f32 / 101.0)
            .collect();
        // [h, w, c] = [c, h, w]
        let mut hwc = vec![0.0; 3072];
        for c in 0..3 {
            for pos in 0..1024 {
                hwc[pos * 3 + c] = chw[c * 1024 + pos];
            }
        }
        let p = Preprocess {
            offset: vec![1.0, 2.0, 3.0],
            scale: vec![0.5, 2.0, 4.0],
        };
        for preprocess in [None, Some(p)] {
            let first = Plan::compile_tensor(CNN, &spec(None, preprocess.clone())).unwrap();
            let last = Plan::compile_tensor(CNN, &spec(Some(RowLayout::ChannelsLast), preprocess))
                .unwrap();
            assert_eq!(last.row_shape(), [32, 32, 3]);
            let (a, b) = (
                first.infer(&chw, &[]).unwrap(),
                last.infer(&hwc, &[]).unwrap(),
            );
            assert_eq!(a.scores, b.scores);
            // The channels-first row read as channels last is another image.
            assert_ne!(last.infer(&chw, &[]).unwrap().scores, a.scores);
        }
        let huge = Preprocess {
            offset: vec![0.0; 3],
            scale: vec![1.0, 1.0, 1e30],
        };
        let last =
            Plan::compile_tensor(CNN, &spec(Some(RowLayout::ChannelsLast), Some(huge))).unwrap();
        let mut gap = hwc.clone();
        gap[(32 + 5) * 3 + 1] = f32::NAN;
        let err = last.infer(&gap, &[]).unwrap_err();
        assert!(
            matches!(&err, RuntimeError::NonFinite { feature, .. } if feature == "[1, 5, 1]"),
            "{err}"
        );
        let mut bright = hwc;
        bright[(2 * 32 + 7) * 3 + 2] = 1e10;
        let err = last.infer(&bright, &[]).unwrap_err();
        assert!(
            matches!(&err, RuntimeError::NonFinite { feature, .. } if feature == "[2, 7, 2] (preprocessed)"),
            "{err}"
        );
    }

    fn bundle_with_golden(expected: Vec<f64>) -> VerifiedBundle {
        use edgeloop_shared::bundle::{Golden, GoldenVector};
        let columns: Vec<Vec<f64>> = vec![
            vec![1.0, 1.9, 1.2],
            vec![3.0, 8.5, 3.3],
            vec![3.0, 6.5, 3.1],
            vec![45.0, 56.0, 47.0],
        ];
        let mut manifest = Manifest::classifier("vibration", 1, &names(), &columns, 2).unwrap();
        manifest.golden = Some(Golden {
            tolerance: 1e-4,
            vectors: vec![GoldenVector {
                input: vec![1.9, 8.5, 6.5, 56.0],
                output: expected,
            }],
        });
        VerifiedBundle {
            manifest,
            key_id: edgeloop_shared::signing::KeyId([0; 8]),
            model: MODEL_V1.to_vec(),
        }
    }

    #[test]
    fn golden_vectors_must_come_out_as_the_publisher_computed() {
        let plan = Plan::compile(MODEL_V1, 4).unwrap();
        let scores: Vec<f64> = plan
            .infer(&[1.9, 8.5, 6.5, 56.0], &names())
            .unwrap()
            .scores
            .iter()
            .map(|s| f64::from(*s))
            .collect();
        let model = LoadedModel::load(&bundle_with_golden(scores.clone())).unwrap();
        assert!(model.median_latency(3).unwrap() > std::time::Duration::ZERO);
        let mut off = scores;
        off[1] += 0.01;
        assert!(matches!(
            LoadedModel::load(&bundle_with_golden(off)),
            Err(RuntimeError::Golden { index: 0, .. })
        ));
    }

    #[test]
    fn bad_inputs_get_clear_errors() {
        let plan = Plan::compile(MODEL_V1, 4).unwrap();
        assert!(matches!(
            plan.infer(&[1.0, 2.0], &names()),
            Err(RuntimeError::WidthMismatch {
                expected: 4,
                got: 2
            })
        ));
        let err = plan
            .infer(&[1.0, f32::NAN, 3.0, 4.0], &names())
            .unwrap_err();
        assert!(err.to_string().contains("`peak`"), "{err}");
        assert!(matches!(
            Plan::compile(MODEL_V1, 5),
            Err(RuntimeError::WidthMismatch {
                expected: 4,
                got: 5
            })
        ));
        assert!(matches!(
            Plan::compile(b"definitely not onnx", 4),
            Err(RuntimeError::Load(_))
        ));
    }
}
