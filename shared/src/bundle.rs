//! The signed model bundle, format 1.
//!
//! A bundle is one file:
//!
//! ```text
//! offset  size  field
//! 0       8     magic "ELBUNDLE"
//! 8       2     format, u16 big-endian (1)
//! 10      4     manifest length M, u32 big-endian
//! 14      M     manifest, UTF-8 JSON (`Manifest`)
//! 14+M    8     key id of the signing key
//! 22+M    64    ed25519 signature over "edgeloop/v1/bundle-manifest\0" ‖ manifest bytes
//! 86+M    8     artifact length A, u64 big-endian
//! 94+M    A     artifact: the ONNX model, zstd-compressed
//! ```
//!
//! The manifest carries the SHA-256 and the sizes of the artifact (compressed and raw), so
//! the one signature covers everything. [`verify`] checks framing and sizes first, then
//! the signature over the exact manifest bytes, then the compressed artifact's digest,
//! and only then decompresses, with the output capped at the signed raw size.

use serde::{Deserialize, Serialize};

use crate::drift::{DriftError, DriftPolicy, ReferenceProfile};
use crate::signing::{Context, KeyId, SIGNATURE_LEN, SecretKey, SignatureError, TrustedKeys};
use crate::{is_valid_identifier, sha256_hex};

pub const MAGIC: &[u8; 8] = b"ELBUNDLE";
pub const FORMAT: u16 = 1;
pub const FILE_EXTENSION: &str = "elb";
const HEADER_LEN: usize = 8 + 2 + 4;
const ZSTD_LEVEL: i32 = 10;

/// Size caps applied while parsing, before anything is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_manifest_bytes: usize,
    pub max_artifact_bytes: u64,
    pub max_model_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_manifest_bytes: 4 << 20,
            max_artifact_bytes: 512 << 20,
            max_model_bytes: 1 << 30,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    #[error("not an edgeloop bundle (bad magic)")]
    NotABundle,
    #[error("bundle format {0} is not supported (this build reads format {FORMAT})")]
    UnsupportedFormat(u16),
    #[error("bundle is truncated: the {0} is incomplete")]
    Truncated(&'static str),
    #[error("bundle has {0} unexpected bytes after the artifact")]
    TrailingBytes(u64),
    #[error("{what} is {size} bytes, over the limit of {limit}")]
    TooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("manifest signature check failed: {0}")]
    Signature(#[from] SignatureError),
    #[error("manifest is malformed: {0}")]
    MalformedManifest(String),
    #[error("{what} size is {actual} bytes but the manifest says {expected}")]
    SizeMismatch {
        what: &'static str,
        expected: u64,
        actual: u64,
    },
    #[error("{what} SHA-256 is {actual} but the manifest says {expected}")]
    DigestMismatch {
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("artifact does not decompress: {0}")]
    Decompress(String),
    #[error("compression failed: {0}")]
    Compress(String),
    #[error("a delta bundle against model {expected}; {found}")]
    DeltaBase { expected: String, found: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F64,
    I64,
    I32,
    U8,
    Bool,
}

impl DType {
    pub const ALL: [DType; 6] = [
        DType::F32,
        DType::F64,
        DType::I64,
        DType::I32,
        DType::U8,
        DType::Bool,
    ];

    /// The name manifests and command lines use (`f32`, `i64`, `bool`…).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::U8 => "u8",
            DType::Bool => "bool",
        }
    }

    pub fn parse(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Whether `value` (as a device receives it, a 32-bit float) stands for a value of
    /// this type exactly: any finite number for floats, a whole number within range for
    /// integers, 0 or 1 for booleans.
    pub fn represents(self, value: f32) -> bool {
        let whole = value.is_finite() && value.fract() == 0.0;
        match self {
            DType::F32 | DType::F64 => value.is_finite(),
            // ±2^63 is the first f32 beyond i64's range.
            DType::I64 => whole && value.abs() < 9.223_372e18,
            DType::I32 => whole && (-2_147_483_648.0..2_147_483_648.0).contains(&value),
            DType::U8 => whole && (0.0..=255.0).contains(&value),
            DType::Bool => value == 0.0 || value == 1.0,
        }
    }
}

/// One model input or output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    /// Dimensions; `null` is a symbolic dimension (the batch).
    pub shape: Vec<Option<u64>>,
    /// Feature names along the last axis (inputs) or class labels (outputs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// What an output means (outputs only). Absent: class scores, so a manifest of one
    /// output reads as it did before outputs had kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<OutputKind>,
    /// How a device turns the numbers it receives into this input (inputs only). Absent:
    /// the numbers go to the model as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocess: Option<Preprocess>,
    /// For a tensor input (rank 3 or more: images, sequences), the axis of its channels,
    /// counting the batch as axis 0: 1 for NCHW images, the last for NHWC images or
    /// `[batch, time, features]` sequences. Absent: 1. Drift is watched on each channel's
    /// mean and standard deviation ([`TensorSpec::tensor_features`]), and preprocessing
    /// scales by channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_axis: Option<u32>,
    /// For a tensor input whose channels come first (`channel_axis` 1), how devices lay
    /// out the rows they send when it differs: `channels_last` rows (`[H, W, C]` images, as
    /// cameras and image libraries give them) are transposed for the model. Absent: rows
    /// come as the model takes them. Drift and preprocessing go by channel either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<RowLayout>,
}

/// How a device lays out a tensor input's rows, when not as the model takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RowLayout {
    /// The channel axis last: `[H, W, C]` for a model of `[C, H, W]`.
    ChannelsLast,
}

impl TensorSpec {
    /// An f32 input of `dims` after a symbolic batch, channels on axis 1, with no
    /// preprocessing and no layout: an image or sequence model's input as its graph takes it.
    pub fn f32_tensor(name: &str, dims: &[usize]) -> TensorSpec {
        TensorSpec {
            name: name.to_string(),
            dtype: DType::F32,
            shape: std::iter::once(None)
                .chain(dims.iter().map(|&d| Some(d as u64)))
                .collect(),
            names: Vec::new(),
            kind: None,
            preprocess: None,
            layout: None,
            channel_axis: Some(1),
        }
    }

    /// The numbers in one row (the product of the dimensions after the batch), when every
    /// one is fixed.
    pub fn row_len(&self) -> Option<usize> {
        self.shape.iter().skip(1).try_fold(1usize, |n, d| {
            d.and_then(|d| usize::try_from(d).ok())
                .and_then(|d| n.checked_mul(d))
        })
    }

    /// Whether rows are tensors (rank 3 or more), watched for drift by channel rather
    /// than value by value.
    pub fn is_tensor(&self) -> bool {
        self.shape.len() >= 3
    }

    /// The dimensions of one row as devices send it (after the batch): the model's, or
    /// for a `channels_last` layout the model's with its channel axis moved last. `None`
    /// when a dimension is open.
    pub fn row_shape(&self) -> Option<Vec<usize>> {
        let mut dims: Vec<usize> = self
            .shape
            .iter()
            .skip(1)
            .map(|d| d.and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()?;
        if self.layout == Some(RowLayout::ChannelsLast) && self.is_tensor() {
            dims.rotate_left(1);
        }
        Some(dims)
    }

    /// `(channels, inner)`: how many channels a row as devices send it has, and how many
    /// consecutive numbers of it (in row-major order) belong to one channel before the
    /// next begins (1 for a `channels_last` layout). For a rank-2 input each feature is a
    /// channel of one number. `None` when a dimension is open, the channel axis is out of
    /// range, or a layout is given for channels that do not come first.
    pub fn channel_layout(&self) -> Option<(usize, usize)> {
        let dims = self.row_shape()?;
        if !self.is_tensor() {
            return dims.last().map(|&features| (features, 1));
        }
        let axis = self.channel_axis.unwrap_or(1) as usize;
        if axis == 0 || axis > dims.len() {
            return None;
        }
        match self.layout {
            Some(RowLayout::ChannelsLast) if axis == 1 => dims.last().map(|&c| (c, 1)),
            Some(RowLayout::ChannelsLast) => None,
            None => Some((dims[axis - 1], dims[axis..].iter().product())),
        }
    }

    /// The channels' names: `names` when it names each, else `c0`, `c1`, ….
    pub fn channel_names(&self) -> Vec<String> {
        let channels = self.channel_layout().map_or(0, |(c, _)| c);
        if self.names.len() == channels {
            self.names.clone()
        } else {
            (0..channels).map(|c| format!("c{c}")).collect()
        }
    }

    /// The features drift is watched on for a tensor input: `{channel}.mean` and
    /// `{channel}.std` for each channel, in channel order.
    pub fn tensor_feature_names(&self) -> Vec<String> {
        self.channel_names()
            .iter()
            .flat_map(|c| [format!("{c}.mean"), format!("{c}.std")])
            .collect()
    }

    /// What drift is watched on for one row of a tensor input: each channel's mean and
    /// population standard deviation over the row's other axes, in the order of
    /// [`TensorSpec::tensor_feature_names`]. A non-finite number makes its channel's two
    /// features non-finite (counted as missing).
    pub fn tensor_features(&self, row: &[f32]) -> Vec<f32> {
        let Some((channels, inner)) = self.channel_layout() else {
            return Vec::new();
        };
        let mut sums = vec![(0.0f64, 0.0f64, 0u64); channels];
        if inner <= 1 {
            // Channels last (or a row of features): the channels alternate.
            for pixel in row.chunks(channels.max(1)) {
                for (total, &x) in sums.iter_mut().zip(pixel) {
                    let x = f64::from(x);
                    total.0 += x;
                    total.1 += x * x;
                    total.2 += 1;
                }
            }
        } else {
            for (run, values) in row.chunks(inner).enumerate() {
                // Four running sums each, so that the additions need not wait on one another.
                let (mut sum, mut squares) = ([0.0f64; 4], [0.0f64; 4]);
                let mut lanes = values.chunks_exact(4);
                for four in &mut lanes {
                    for (k, &x) in four.iter().enumerate() {
                        let x = f64::from(x);
                        sum[k] += x;
                        squares[k] += x * x;
                    }
                }
                for &x in lanes.remainder() {
                    let x = f64::from(x);
                    sum[0] += x;
                    squares[0] += x * x;
                }
                let (sum, squares): (f64, f64) = (sum.iter().sum(), squares.iter().sum());
                let total = &mut sums[run % channels.max(1)];
                total.0 += sum;
                total.1 += squares;
                total.2 += values.len() as u64;
            }
        }
        sums.iter()
            .flat_map(|&(sum, squares, n)| {
                let n = n.max(1) as f64;
                let mean = sum / n;
                let variance = (squares / n - mean * mean).max(0.0);
                [mean as f32, variance.sqrt() as f32]
            })
            .collect()
    }
}

/// Per-feature scaling a device applies before inference: `x' = (x − offset) × scale`,
/// as ONNX-ML's `Scaler` does (`offset` = a standard scaler's means, `scale` = one over its
/// standard deviations). Callers, sources, drift windows, the reference profile and the
/// sample kept for retraining all see the numbers before it, in the units they were
/// measured in; only the model sees them after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// One per feature.
    pub offset: Vec<f64>,
    /// One per feature.
    pub scale: Vec<f64>,
}

impl Preprocess {
    /// Checks that both vectors have one finite number per feature.
    pub fn validate(&self, features: usize) -> Result<(), String> {
        for (what, values) in [("offset", &self.offset), ("scale", &self.scale)] {
            if values.len() != features {
                return Err(format!(
                    "preprocess {what} has {} values for {features} features",
                    values.len()
                ));
            }
            if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(format!(
                    "preprocess {what}[{i}] is {v}, not a finite number"
                ));
            }
        }
        Ok(())
    }

    /// `x' = (x − offset) × scale`, in place, for a row whose channels come in runs of
    /// `inner` numbers ([`TensorSpec::channel_layout`]; 1 for a row of features).
    pub fn apply(&self, row: &mut [f32], inner: usize) {
        let channels = self.offset.len().max(1);
        for (run, values) in row.chunks_mut(inner.max(1)).enumerate() {
            let c = run % channels;
            let (offset, scale) = (self.offset[c], self.scale[c]);
            for x in values {
                *x = ((f64::from(*x) - offset) * scale) as f32;
            }
        }
    }
}

/// What a model output means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// `[batch, classes]` scores, one per class (probabilities or logits): the output a
    /// device serves, whose argmax is the predicted class.
    ClassScores,
    /// `[batch]` the label the graph itself predicts (scikit-learn's `label` output). The
    /// device does not compute it: the class is the scores' argmax, named by the scores
    /// output's `names`.
    ClassLabels,
    /// `[batch]` or `[batch, 1]`: one predicted value per input (a regression), served as
    /// it is. `names` may hold the one name of what it predicts. Prediction drift is
    /// watched on its distribution against the reference profile's `predicted_value`;
    /// true values sent as feedback give the mean absolute and root mean squared error.
    Regression,
}

impl OutputKind {
    /// Whether a device serves this output (class scores or a regression value) rather
    /// than declaring it only.
    pub fn is_served(kind: Option<OutputKind>) -> bool {
        kind.is_none_or(|k| k != OutputKind::ClassLabels)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    Zstd,
}

/// What the artifact is and how to check it. [`pack`] fills it in; build a manifest with
/// `Artifact::default()`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    pub media_type: String,
    pub compression: Compression,
    /// SHA-256 of the compressed bytes stored in the bundle.
    pub sha256: String,
    pub compressed_size: u64,
    /// SHA-256 of the ONNX model after decompression.
    pub raw_sha256: String,
    pub raw_size: u64,
    /// Set in a delta bundle: the SHA-256 of the model (raw ONNX) the artifact was
    /// compressed against, zstd with that model as its reference prefix ("patch-from").
    /// Only a device that holds exactly that model can decompress it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_base_sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u16,
    pub name: String,
    /// Monotonic per model name: devices refuse a version not above the active one.
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub created_ms: u64,
    /// Filled in by [`pack`].
    pub artifact: Artifact,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Reference distribution of the inputs, for drift monitoring.
    pub reference: ReferenceProfile,
    /// When a feature and a window count as drifted; the defaults when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftPolicy>,
    /// Inputs with the outputs the publisher computed; a device checks them after loading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub golden: Option<Golden>,
    /// What a device must satisfy before it activates the model.
    #[serde(default, skip_serializing_if = "Requirements::is_empty")]
    pub requirements: Requirements,
    /// Where the model comes from (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<Lineage>,
}

/// Golden vectors: rows of the first input with the first output the publisher's runtime
/// computed for them. A device whose runtime disagrees beyond the tolerance refuses the
/// model (a miscompiled or misoptimized graph, a runtime bug).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Golden {
    /// Largest accepted difference: `|got − expected| ≤ tolerance · max(1, |expected|)`.
    pub tolerance: f64,
    pub vectors: Vec<GoldenVector>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenVector {
    pub input: Vec<f64>,
    pub output: Vec<f64>,
}

/// What a device must satisfy before it activates a model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    /// Largest median time of one single-row inference on the device, in milliseconds,
    /// measured at install on the golden vectors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_budget_ms: Option<f64>,
    /// The oldest agent version that may run the model (dotted numbers, `0.2.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_agent_version: Option<String>,
    /// CPU architectures the model is for, by Rust's names (`x86_64`, `aarch64`, `arm`);
    /// empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    /// Boards the model is for, by their ids in `edgeloop-firmware-targets` (`rpi4`,
    /// `jetson-orin-nano`…); empty: any. A device that names no board is none of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub boards: Vec<String>,
}

/// Why a device is not one the model is for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetMismatch {
    #[error("the model is for {targets:?}; this device is {arch}")]
    Arch { targets: Vec<String>, arch: String },
    #[error("the model is for the boards {boards:?}; this device is {}",
        board.as_deref().map_or("no named board".to_string(), |b| format!("a {b}")))]
    Board {
        boards: Vec<String>,
        board: Option<String>,
    },
}

impl Requirements {
    pub fn is_empty(&self) -> bool {
        *self == Requirements::default()
    }

    /// Whether a device of this CPU architecture and board (when it names one) is one the
    /// model is for.
    pub fn fits(&self, arch: &str, board: Option<&str>) -> Result<(), TargetMismatch> {
        if !self.targets.is_empty() && !self.targets.iter().any(|t| t == arch) {
            return Err(TargetMismatch::Arch {
                targets: self.targets.clone(),
                arch: arch.to_string(),
            });
        }
        if !self.boards.is_empty() && !board.is_some_and(|b| self.boards.iter().any(|t| t == b)) {
            return Err(TargetMismatch::Board {
                boards: self.boards.clone(),
                board: board.map(str::to_string),
            });
        }
        Ok(())
    }
}

/// Where a model comes from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    /// The version this one was trained from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_version: Option<u64>,
    /// SHA-256 of the training data, lowercase hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_data_sha256: Option<String>,
    /// Quality metrics measured before publishing (name → value).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// Results of the gates the model passed (name → result).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub gates: std::collections::BTreeMap<String, String>,
}

/// Parses a dotted version (`0.2.10`) into its numbers, for comparing.
pub fn parse_version(text: &str) -> Option<Vec<u64>> {
    text.split('.').map(|p| p.parse().ok()).collect()
}

/// Whether `running` is at least `required`: dotted numbers compared with missing parts as
/// zero (`0.2` is `0.2.0`), a pre-release or build suffix (`-rc.1`, `+abc`) ignored. A
/// version that does not parse is never enough.
pub fn version_at_least(running: &str, required: &str) -> bool {
    let numbers = |v: &str| parse_version(v.split(['-', '+']).next().unwrap_or(v));
    let (Some(mut a), Some(mut b)) = (numbers(running), numbers(required)) else {
        return false;
    };
    let len = a.len().max(b.len());
    a.resize(len, 0);
    b.resize(len, 0);
    a >= b
}

impl Manifest {
    /// A manifest for the shape the reference agent serves: one f32 `[batch, features]`
    /// input named `features` and one f32 `[batch, classes]` output of class scores named
    /// `probabilities`, with the reference profile of `columns` (one per feature). Label,
    /// class labels, artifact, golden vectors, requirements and lineage start empty; set
    /// what differs.
    pub fn classifier(
        name: &str,
        version: u64,
        features: &[String],
        columns: &[Vec<f64>],
        classes: u64,
    ) -> Result<Manifest, DriftError> {
        Ok(Manifest {
            format: FORMAT,
            name: name.to_string(),
            version,
            label: None,
            created_ms: 0,
            artifact: Artifact::default(),
            inputs: vec![TensorSpec {
                name: "features".into(),
                dtype: DType::F32,
                shape: vec![None, Some(features.len() as u64)],
                names: features.to_vec(),
                kind: None,
                preprocess: None,
                layout: None,
                channel_axis: None,
            }],
            outputs: vec![TensorSpec {
                name: "probabilities".into(),
                dtype: DType::F32,
                shape: vec![None, Some(classes)],
                names: Vec::new(),
                kind: None,
                preprocess: None,
                layout: None,
                channel_axis: None,
            }],
            reference: ReferenceProfile::from_columns(
                features,
                columns,
                crate::drift::DEFAULT_BINS,
            )?,
            drift: None,
            golden: None,
            requirements: Requirements::default(),
            lineage: None,
        })
    }

    /// The output a device serves: the one of class scores or the regression value
    /// (checked to be exactly one when the manifest was verified).
    pub fn served_output(&self) -> &TensorSpec {
        self.outputs
            .iter()
            .find(|o| OutputKind::is_served(o.kind))
            .unwrap_or(&self.outputs[0])
    }

    /// Whether the model predicts a value (a regression) rather than a class.
    pub fn is_regression(&self) -> bool {
        self.served_output().kind == Some(OutputKind::Regression)
    }

    pub fn model_ref(&self) -> crate::protocol::ModelRef {
        crate::protocol::ModelRef {
            name: self.name.clone(),
            version: self.version,
        }
    }

    /// A manifest of several inputs: each a `[batch, width]` table of a fixed width, their
    /// widths adding up to the reference profile's features (a row is every input's
    /// features, in order), and their names distinct.
    fn validate_inputs(&self) -> Result<(), String> {
        let mut total = 0usize;
        for (i, input) in self.inputs.iter().enumerate() {
            let width = match input.shape.as_slice() {
                [_, Some(width)] if !input.is_tensor() => *width as usize,
                _ => {
                    return Err(format!(
                        "input `{}`: a model of several inputs takes a [batch, width] table \
                         of a fixed width in each, not {:?}",
                        input.name, input.shape
                    ));
                }
            };
            if !input.names.is_empty() && input.names.len() != width {
                return Err(format!(
                    "input `{}` is {width} wide but names {} features",
                    input.name,
                    input.names.len()
                ));
            }
            if self.inputs[..i].iter().any(|o| o.name == input.name) {
                return Err(format!("two inputs are named `{}`", input.name));
            }
            total += width;
        }
        let features = self.reference.features.len();
        if total != features {
            return Err(format!(
                "the inputs take {total} features together, but the reference profiles {features}"
            ));
        }
        Ok(())
    }

    /// The scaling of a row of features, every input's in order: `None` when no input is
    /// preprocessed, otherwise each input's (unscaled where an input has none). For a
    /// model of one `[batch, features]` input, its own.
    pub fn row_preprocess(&self) -> Option<Preprocess> {
        if let [one] = self.inputs.as_slice() {
            return one.preprocess.clone();
        }
        self.inputs.iter().any(|i| i.preprocess.is_some()).then(|| {
            let mut row = Preprocess {
                offset: Vec::new(),
                scale: Vec::new(),
            };
            for input in &self.inputs {
                let width = input.row_len().unwrap_or(0);
                match &input.preprocess {
                    Some(p) => {
                        row.offset.extend(&p.offset);
                        row.scale.extend(&p.scale);
                    }
                    None => {
                        row.offset.extend(std::iter::repeat_n(0.0, width));
                        row.scale.extend(std::iter::repeat_n(1.0, width));
                    }
                }
            }
            row
        })
    }

    fn validate(&self) -> Result<(), BundleError> {
        let bad = |m: String| BundleError::MalformedManifest(m);
        if self.format != FORMAT {
            return Err(bad(format!(
                "manifest format {} is not {FORMAT}",
                self.format
            )));
        }
        if !is_valid_identifier(&self.name) {
            return Err(bad(format!(
                "model name `{}` is not a valid identifier",
                self.name
            )));
        }
        if self.inputs.is_empty() || self.outputs.is_empty() {
            return Err(bad("a model needs at least one input and one output".into()));
        }
        let served = self
            .outputs
            .iter()
            .filter(|o| OutputKind::is_served(o.kind))
            .count();
        if served != 1 {
            return Err(bad(format!(
                "a model serves exactly one output, of class scores or a regression value; \
                 the manifest declares {served}"
            )));
        }
        self.reference
            .validate()
            .map_err(|e: DriftError| bad(e.to_string()))?;
        if self.is_regression() {
            let output = self.served_output();
            let one_value = match output.shape.as_slice() {
                [_] => true,
                [_, width] => *width == Some(1),
                _ => false,
            };
            if !one_value {
                return Err(bad(format!(
                    "regression output `{}` must be one value per input, `[batch]` or \
                     `[batch, 1]`",
                    output.name
                )));
            }
            if output.names.len() > 1 {
                return Err(bad(format!(
                    "regression output `{}` predicts one value, but {} names are given",
                    output.name,
                    output.names.len()
                )));
            }
            if self
                .outputs
                .iter()
                .any(|o| o.kind == Some(OutputKind::ClassLabels))
            {
                return Err(bad("a regression has no class labels output".into()));
            }
            if self.reference.predicted_value.is_none() {
                return Err(bad(
                    "a regression's reference profile needs its predicted values \
                     (`predicted_value`)"
                        .into(),
                ));
            }
        } else if self.reference.predicted_value.is_some() {
            return Err(bad(
                "a classifier's reference profile holds a class histogram, not predicted values"
                    .into(),
            ));
        }
        if self
            .outputs
            .iter()
            .any(|o| o.preprocess.is_some() || o.layout.is_some())
        {
            return Err(bad("only inputs are preprocessed".into()));
        }
        if let Some(input) = self
            .inputs
            .iter()
            .find(|i| i.layout.is_some() && (!i.is_tensor() || i.channel_axis.unwrap_or(1) != 1))
        {
            return Err(bad(format!(
                "input `{}`: a channels_last layout is for a tensor input whose channels come \
                 first (channel_axis 1)",
                input.name
            )));
        }
        if self.inputs.len() > 1 {
            self.validate_inputs().map_err(bad)?;
        }
        for input in &self.inputs {
            let channels = if input.is_tensor() {
                let Some((channels, _)) = input.channel_layout() else {
                    return Err(bad(format!(
                        "tensor input `{}` needs every dimension after the batch fixed and a \
                         channel axis within them",
                        input.name
                    )));
                };
                channels
            } else {
                input
                    .shape
                    .last()
                    .copied()
                    .flatten()
                    .map_or(self.reference.features.len(), |w| w as usize)
            };
            if let Some(p) = &input.preprocess {
                p.validate(channels)
                    .map_err(|e| bad(format!("input `{}`: {e}", input.name)))?;
            }
        }
        let served = &self.inputs[0];
        if served.is_tensor() {
            let expected = served.tensor_feature_names();
            let profiled: Vec<&str> = self.reference.feature_names().collect();
            if profiled != expected {
                return Err(bad(format!(
                    "tensor input `{}` is watched on its channels' means and deviations ({}); \
                     the reference profiles {}",
                    served.name,
                    expected.join(", "),
                    profiled.join(", ")
                )));
            }
        }
        if let Some(policy) = &self.drift {
            policy.validate().map_err(|e| bad(e.to_string()))?;
        }
        if let Some(golden) = &self.golden {
            if !(golden.tolerance.is_finite() && golden.tolerance >= 0.0) {
                return Err(bad("golden tolerance must be a finite number ≥ 0".into()));
            }
            let width = match &self.inputs[0] {
                tensor if tensor.is_tensor() => tensor.row_len().unwrap_or(0),
                _ => self.reference.features.len(),
            };
            if let Some((i, _)) = golden.vectors.iter().enumerate().find(|(_, v)| {
                v.input.len() != width || v.input.iter().chain(&v.output).any(|x| !x.is_finite())
            }) {
                return Err(bad(format!(
                    "golden vector {i} must have {width} finite inputs and finite outputs"
                )));
            }
        }
        let r = &self.requirements;
        if r.latency_budget_ms
            .is_some_and(|b| !(b.is_finite() && b > 0.0))
        {
            return Err(bad(
                "latency budget must be a positive number of milliseconds".into(),
            ));
        }
        if let Some(v) = &r.min_agent_version
            && parse_version(v).is_none()
        {
            return Err(bad(format!(
                "minimum agent version `{v}` is not dotted numbers"
            )));
        }
        if let Some(sha) = self
            .lineage
            .as_ref()
            .and_then(|l| l.training_data_sha256.as_ref())
            && !(sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(bad(format!(
                "training data digest `{sha}` is not a SHA-256"
            )));
        }
        Ok(())
    }
}

/// A bundle whose signature, digests and sizes all checked out.
#[derive(Debug, Clone)]
pub struct VerifiedBundle {
    pub manifest: Manifest,
    pub key_id: KeyId,
    /// The decompressed ONNX model.
    pub model: Vec<u8>,
}

/// Compresses `model`, fills in `manifest.artifact`, signs the manifest and lays out the file.
pub fn pack(manifest: Manifest, model: &[u8], key: &SecretKey) -> Result<Vec<u8>, BundleError> {
    let compressed = zstd::bulk::compress(model, ZSTD_LEVEL)
        .map_err(|e| BundleError::Compress(e.to_string()))?;
    lay_out(manifest, model, compressed, None, key)
}

/// A delta bundle: `model` compressed against `base` (the model a device runs now), so
/// that what is unchanged between the two costs almost nothing. It verifies only with
/// that base ([`verify_delta`]); a device without it needs the full bundle.
pub fn pack_delta(
    manifest: Manifest,
    model: &[u8],
    base: &[u8],
    key: &SecretKey,
) -> Result<Vec<u8>, BundleError> {
    let compress = || -> std::io::Result<Vec<u8>> {
        let mut encoder =
            zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), ZSTD_LEVEL, base)?;
        encoder.window_log(delta_window_log(base.len(), model.len()))?;
        encoder.long_distance_matching(true)?;
        encoder.set_pledged_src_size(Some(model.len() as u64))?;
        std::io::Write::write_all(&mut encoder, model)?;
        encoder.finish()
    };
    let compressed = compress().map_err(|e| BundleError::Compress(e.to_string()))?;
    lay_out(manifest, model, compressed, Some(sha256_hex(base)), key)
}

/// The zstd window a delta needs: the base and the model both in reach.
fn delta_window_log(base: usize, model: usize) -> u32 {
    let span = (base + model).max(1) as u64;
    (64 - (span - 1).leading_zeros()).clamp(10, 31)
}

fn lay_out(
    mut manifest: Manifest,
    model: &[u8],
    compressed: Vec<u8>,
    delta_base_sha256: Option<String>,
    key: &SecretKey,
) -> Result<Vec<u8>, BundleError> {
    manifest.format = FORMAT;
    manifest.artifact = Artifact {
        media_type: "application/onnx".into(),
        compression: Compression::Zstd,
        sha256: sha256_hex(&compressed),
        compressed_size: compressed.len() as u64,
        raw_sha256: sha256_hex(model),
        raw_size: model.len() as u64,
        delta_base_sha256,
    };
    manifest.validate()?;
    let manifest_bytes = serde_json::to_vec(&manifest).expect("manifests always serialize");
    let signature = key.sign(Context::BundleManifest, &manifest_bytes);

    let mut out = Vec::with_capacity(
        HEADER_LEN + manifest_bytes.len() + 8 + SIGNATURE_LEN + 8 + compressed.len(),
    );
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_be_bytes());
    let manifest_len = u32::try_from(manifest_bytes.len()).map_err(|_| BundleError::TooLarge {
        what: "manifest",
        size: manifest_bytes.len() as u64,
        limit: u64::from(u32::MAX),
    })?;
    out.extend_from_slice(&manifest_len.to_be_bytes());
    out.extend_from_slice(&manifest_bytes);
    out.extend_from_slice(&key.id().0);
    out.extend_from_slice(&signature);
    out.extend_from_slice(&(compressed.len() as u64).to_be_bytes());
    out.extend_from_slice(&compressed);
    Ok(out)
}

/// Byte ranges of the parts of a bundle, after the framing checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub manifest: std::ops::Range<usize>,
    pub key_id: std::ops::Range<usize>,
    pub signature: std::ops::Range<usize>,
    pub artifact: std::ops::Range<usize>,
}

/// Where the head of a bundle (everything before the artifact) lies.
struct Head {
    manifest: std::ops::Range<usize>,
    key_id: std::ops::Range<usize>,
    signature: std::ops::Range<usize>,
    /// Where the artifact starts.
    artifact_at: usize,
    artifact_len: u64,
}

/// Checks magic, format, lengths and size caps of a bundle's head. `Truncated` means
/// `bytes` ends before the head does.
fn parse_head(bytes: &[u8], limits: &Limits) -> Result<Head, BundleError> {
    if bytes.len() < MAGIC.len() {
        return Err(BundleError::Truncated("header"));
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(BundleError::NotABundle);
    }
    if bytes.len() < HEADER_LEN {
        return Err(BundleError::Truncated("header"));
    }
    let format = u16::from_be_bytes([bytes[8], bytes[9]]);
    if format != FORMAT {
        return Err(BundleError::UnsupportedFormat(format));
    }
    let manifest_len = u32::from_be_bytes(bytes[10..14].try_into().expect("4 bytes")) as usize;
    if manifest_len > limits.max_manifest_bytes {
        return Err(BundleError::TooLarge {
            what: "manifest",
            size: manifest_len as u64,
            limit: limits.max_manifest_bytes as u64,
        });
    }
    let manifest = HEADER_LEN..HEADER_LEN + manifest_len;
    let key_id = manifest.end..manifest.end + 8;
    let signature = key_id.end..key_id.end + SIGNATURE_LEN;
    let artifact_len_at = signature.end..signature.end + 8;
    for (range, what) in [
        (&manifest, "manifest"),
        (&key_id, "key id"),
        (&signature, "signature"),
        (&artifact_len_at, "artifact length"),
    ] {
        if bytes.len() < range.end {
            return Err(BundleError::Truncated(what));
        }
    }
    let artifact_len =
        u64::from_be_bytes(bytes[artifact_len_at.clone()].try_into().expect("8 bytes"));
    if artifact_len > limits.max_artifact_bytes {
        return Err(BundleError::TooLarge {
            what: "artifact",
            size: artifact_len,
            limit: limits.max_artifact_bytes,
        });
    }
    Ok(Head {
        manifest,
        key_id,
        signature,
        artifact_at: artifact_len_at.end,
        artifact_len,
    })
}

/// Checks the manifest's signature, then parses and validates it, and checks that the
/// artifact length the framing gives is the one the manifest signs.
fn check_head(
    bytes: &[u8],
    head: &Head,
    trusted: &TrustedKeys,
) -> Result<(Manifest, KeyId), BundleError> {
    let manifest_bytes = &bytes[head.manifest.clone()];
    let key_id = KeyId(bytes[head.key_id.clone()].try_into().expect("8 bytes"));
    trusted.verify(
        key_id,
        Context::BundleManifest,
        manifest_bytes,
        &bytes[head.signature.clone()],
    )?;
    let manifest: Manifest = serde_json::from_slice(manifest_bytes)
        .map_err(|e| BundleError::MalformedManifest(e.to_string()))?;
    manifest.validate()?;
    if head.artifact_len != manifest.artifact.compressed_size {
        return Err(BundleError::SizeMismatch {
            what: "compressed artifact",
            expected: manifest.artifact.compressed_size,
            actual: head.artifact_len,
        });
    }
    Ok((manifest, key_id))
}

/// Checks magic, format, lengths and size caps, and returns where each part lies.
pub fn layout(bytes: &[u8], limits: &Limits) -> Result<Layout, BundleError> {
    let head = parse_head(bytes, limits)?;
    let artifact = head.artifact_range(bytes.len())?;
    Ok(Layout {
        manifest: head.manifest,
        key_id: head.key_id,
        signature: head.signature,
        artifact,
    })
}

impl Head {
    /// Where the artifact lies in a bundle of `total` bytes, which must end with it.
    fn artifact_range(&self, total: usize) -> Result<std::ops::Range<usize>, BundleError> {
        let available = (total - self.artifact_at) as u64;
        if available < self.artifact_len {
            return Err(BundleError::Truncated("artifact"));
        }
        if available > self.artifact_len {
            return Err(BundleError::TrailingBytes(available - self.artifact_len));
        }
        Ok(self.artifact_at..total)
    }
}

/// Verifies a whole bundle against the trusted keys and returns its manifest and model.
/// A delta bundle is refused: it needs its base ([`verify_delta`]).
pub fn verify(
    bytes: &[u8],
    trusted: &TrustedKeys,
    limits: &Limits,
) -> Result<VerifiedBundle, BundleError> {
    verify_delta(bytes, trusted, limits, None)
}

/// [`verify`], for a full bundle or a delta bundle against `base`, the model the device
/// holds: a delta whose base is another model (or none) is refused before decompression.
pub fn verify_delta(
    bytes: &[u8],
    trusted: &TrustedKeys,
    limits: &Limits,
    base: Option<&[u8]>,
) -> Result<VerifiedBundle, BundleError> {
    let (manifest, key_id, artifact) = check_signed(bytes, trusted, limits)?;
    let a = &manifest.artifact;
    // The cap is the signed raw size: a decompression bomb fails here, not in memory.
    let model = match &a.delta_base_sha256 {
        None => decompress_full(artifact, a)?,
        Some(expected) => {
            let Some(base) = base else {
                return Err(BundleError::DeltaBase {
                    expected: expected.clone(),
                    found: "no base model was given".into(),
                });
            };
            let found = sha256_hex(base);
            if &found != expected {
                return Err(BundleError::DeltaBase {
                    expected: expected.clone(),
                    found: format!("the model here is {found}"),
                });
            }
            decompress_delta(artifact, base, a.raw_size)?
        }
    };
    check_model(a, &model)?;
    Ok(VerifiedBundle {
        manifest,
        key_id,
        model,
    })
}

/// [`verify`], for a bundle as a device keeps it: a delta bundle (whose base may be gone
/// by now) with the model it expanded to, `kept`. The signature and the artifact's digest
/// are checked as always, then the kept model against the signed raw size and digest
/// instead of decompressing. A full bundle is decompressed and `kept` is ignored.
pub fn verify_expanded(
    bytes: &[u8],
    kept: Option<Vec<u8>>,
    trusted: &TrustedKeys,
    limits: &Limits,
) -> Result<VerifiedBundle, BundleError> {
    let (manifest, key_id, artifact) = check_signed(bytes, trusted, limits)?;
    let a = &manifest.artifact;
    let model = match (&a.delta_base_sha256, kept) {
        (None, _) => decompress_full(artifact, a)?,
        (Some(_), Some(model)) => model,
        (Some(expected), None) => {
            return Err(BundleError::DeltaBase {
                expected: expected.clone(),
                found: "the model it expanded to is not kept beside it".into(),
            });
        }
    };
    check_model(a, &model)?;
    Ok(VerifiedBundle {
        manifest,
        key_id,
        model,
    })
}

/// Framing and sizes first, then the signature, then the artifact's digest and the
/// signed model size against the limits. Returns the manifest and the artifact.
fn check_signed<'b>(
    bytes: &'b [u8],
    trusted: &TrustedKeys,
    limits: &Limits,
) -> Result<(Manifest, KeyId, &'b [u8]), BundleError> {
    let head = parse_head(bytes, limits)?;
    let artifact = head.artifact_range(bytes.len())?;
    let (manifest, key_id) = check_head(bytes, &head, trusted)?;
    let artifact = &bytes[artifact];
    let a = &manifest.artifact;
    let digest = sha256_hex(artifact);
    if digest != a.sha256 {
        return Err(BundleError::DigestMismatch {
            what: "compressed artifact",
            expected: a.sha256.clone(),
            actual: digest,
        });
    }
    if a.raw_size > limits.max_model_bytes {
        return Err(BundleError::TooLarge {
            what: "model",
            size: a.raw_size,
            limit: limits.max_model_bytes,
        });
    }
    Ok((manifest, key_id, artifact))
}

/// A full bundle's artifact, decompressed with the signed raw size as its cap: a
/// decompression bomb fails here, not in memory.
fn decompress_full(artifact: &[u8], a: &Artifact) -> Result<Vec<u8>, BundleError> {
    zstd::bulk::decompress(artifact, a.raw_size as usize)
        .map_err(|e| BundleError::Decompress(e.to_string()))
}

/// The model bytes against the signed raw size and digest.
fn check_model(a: &Artifact, model: &[u8]) -> Result<(), BundleError> {
    if model.len() as u64 != a.raw_size {
        return Err(BundleError::SizeMismatch {
            what: "model",
            expected: a.raw_size,
            actual: model.len() as u64,
        });
    }
    let digest = sha256_hex(model);
    if digest != a.raw_sha256 {
        return Err(BundleError::DigestMismatch {
            what: "model",
            expected: a.raw_sha256.clone(),
            actual: digest,
        });
    }
    Ok(())
}

/// Decompresses a delta artifact against its base, reading at most `raw_size` + 1 bytes.
fn decompress_delta(artifact: &[u8], base: &[u8], raw_size: u64) -> Result<Vec<u8>, BundleError> {
    use std::io::Read;
    let failed = |e: std::io::Error| BundleError::Decompress(e.to_string());
    let mut decoder =
        zstd::stream::read::Decoder::with_ref_prefix(artifact, base).map_err(failed)?;
    decoder
        .window_log_max(delta_window_log(base.len(), raw_size as usize))
        .map_err(failed)?;
    let mut model = Vec::with_capacity(raw_size as usize);
    decoder
        .take(raw_size + 1)
        .read_to_end(&mut model)
        .map_err(failed)?;
    Ok(model)
}

/// The signed manifest at the head of a bundle, its signature checked, without reading
/// the artifact: for what needs only the manifest (not for installing, which [`verify`]
/// is for).
pub fn signed_manifest(
    bytes: &[u8],
    trusted: &TrustedKeys,
    limits: &Limits,
) -> Result<Manifest, BundleError> {
    let head = parse_head(bytes, limits)?;
    Ok(check_head(bytes, &head, trusted)?.0)
}

/// Checks a bundle while its bytes arrive, so that a download can stop at the first bad
/// byte: framing and the manifest signature as soon as the head is in (a tampered or
/// foreign bundle is refused before its artifact is fetched), then the artifact's length
/// and SHA-256 as it streams. [`verify`] still runs on the complete file: it is what
/// decompresses, with its cap.
pub struct StreamCheck<'t> {
    trusted: &'t TrustedKeys,
    limits: Limits,
    /// The bytes of the head, until it is complete.
    head: Vec<u8>,
    /// Set once the head checked out.
    artifact: Option<ArtifactProgress>,
}

struct ArtifactProgress {
    manifest: Manifest,
    seen: u64,
    digest: sha2::Sha256,
}

impl<'t> StreamCheck<'t> {
    pub fn new(trusted: &'t TrustedKeys, limits: Limits) -> Self {
        StreamCheck {
            trusted,
            limits,
            head: Vec::new(),
            artifact: None,
        }
    }

    /// The signed manifest, once the head has arrived and checked out.
    pub fn manifest(&self) -> Option<&Manifest> {
        self.artifact.as_ref().map(|a| &a.manifest)
    }

    /// Takes the next bytes of the bundle. Fails as soon as they cannot belong to a bundle
    /// the trusted keys signed.
    pub fn update(&mut self, mut bytes: &[u8]) -> Result<(), BundleError> {
        use sha2::Digest;
        // The head is taken no further than it reaches, so its buffer stays within the
        // manifest cap.
        while self.artifact.is_none() {
            if bytes.is_empty() {
                return Ok(());
            }
            let take = self.head_needs().min(bytes.len());
            self.head.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            match parse_head(&self.head, &self.limits) {
                Ok(head) => {
                    let (manifest, _) = check_head(&self.head, &head, self.trusted)?;
                    self.head = Vec::new();
                    self.artifact = Some(ArtifactProgress {
                        manifest,
                        seen: 0,
                        digest: sha2::Sha256::new(),
                    });
                }
                Err(BundleError::Truncated(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let progress = self.artifact.as_mut().expect("set above");
        let expected = progress.manifest.artifact.compressed_size;
        let seen = progress.seen + bytes.len() as u64;
        if seen > expected {
            return Err(BundleError::TrailingBytes(seen - expected));
        }
        progress.digest.update(bytes);
        progress.seen = seen;
        Ok(())
    }

    /// How many more bytes the head needs before it can be parsed further.
    fn head_needs(&self) -> usize {
        let have = self.head.len();
        if have < HEADER_LEN {
            return HEADER_LEN - have;
        }
        let manifest_len = u32::from_be_bytes(self.head[10..14].try_into().expect("4 bytes"));
        HEADER_LEN + manifest_len as usize + 8 + SIGNATURE_LEN + 8 - have
    }

    /// After the last byte: the whole artifact arrived and its digest is the signed one.
    pub fn finish(self) -> Result<Manifest, BundleError> {
        use sha2::Digest;
        let Some(progress) = self.artifact else {
            return Err(parse_head(&self.head, &self.limits)
                .err()
                .unwrap_or(BundleError::Truncated("header")));
        };
        let a = &progress.manifest.artifact;
        if progress.seen < a.compressed_size {
            return Err(BundleError::Truncated("artifact"));
        }
        let digest = hex::encode(progress.digest.finalize());
        if digest != a.sha256 {
            return Err(BundleError::DigestMismatch {
                what: "compressed artifact",
                expected: a.sha256.clone(),
                actual: digest,
            });
        }
        Ok(progress.manifest)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::drift::DEFAULT_BINS;

    #[test]
    fn the_signed_manifest_is_read_without_the_artifact() {
        let key = SecretKey::from_seed([5; 32]);
        let trusted = TrustedKeys::new([key.public().clone()]);
        let bytes = pack(manifest(4), &model_bytes(), &key).unwrap();
        let read = signed_manifest(&bytes, &trusted, &Limits::default()).unwrap();
        assert_eq!(
            read,
            verify(&bytes, &trusted, &Limits::default())
                .unwrap()
                .manifest
        );
        // The artifact is not read: a cut one still gives the manifest, which verify refuses.
        let cut = &bytes[..bytes.len() - 10];
        assert!(signed_manifest(cut, &trusted, &Limits::default()).is_ok());
        assert!(verify(cut, &trusted, &Limits::default()).is_err());
        // The signature is checked.
        let layout = layout(&bytes, &Limits::default()).unwrap();
        let mut flipped = bytes.clone();
        flipped[layout.manifest.start + 3] ^= 1;
        assert!(signed_manifest(&flipped, &trusted, &Limits::default()).is_err());
        let stranger = TrustedKeys::new([SecretKey::from_seed([6; 32]).public().clone()]);
        assert!(signed_manifest(&bytes, &stranger, &Limits::default()).is_err());
    }

    #[test]
    fn dtypes_have_their_manifest_names_and_know_what_they_represent() {
        for d in DType::ALL {
            assert_eq!(DType::parse(d.name()), Some(d));
            assert_eq!(serde_json::to_value(d).unwrap(), d.name());
        }
        assert_eq!(DType::parse("f16"), None);
        assert!(DType::F64.represents(0.25) && !DType::F32.represents(f32::NAN));
        assert!(DType::I64.represents(-3.0) && DType::I64.represents(1e18));
        assert!(!DType::I64.represents(2.5) && !DType::I64.represents(1e19));
        assert!(DType::I32.represents(2_000_000_000.0) && !DType::I32.represents(3e9));
        assert!(DType::U8.represents(255.0) && !DType::U8.represents(256.0));
        assert!(!DType::U8.represents(-1.0));
        assert!(DType::Bool.represents(1.0) && DType::Bool.represents(0.0));
        assert!(!DType::Bool.represents(2.0) && !DType::Bool.represents(0.5));
    }

    pub(crate) fn manifest(version: u64) -> Manifest {
        let names = vec!["a".to_string(), "b".to_string()];
        let columns = vec![
            (0..50).map(f64::from).collect(),
            (0..50).map(|i| f64::from(i) * 2.0).collect(),
        ];
        Manifest {
            format: FORMAT,
            name: "demo".into(),
            version,
            label: Some("test".into()),
            created_ms: 1,
            artifact: Artifact::default(),
            inputs: vec![TensorSpec {
                name: "x".into(),
                dtype: DType::F32,
                shape: vec![None, Some(2)],
                names: names.clone(),
                kind: None,
                preprocess: None,
                layout: None,
                channel_axis: None,
            }],
            outputs: vec![TensorSpec {
                name: "y".into(),
                dtype: DType::F32,
                shape: vec![None, Some(2)],
                names: vec!["no".into(), "yes".into()],
                kind: None,
                preprocess: None,
                layout: None,
                channel_axis: None,
            }],
            reference: ReferenceProfile::from_columns(&names, &columns, DEFAULT_BINS).unwrap(),
            drift: None,
            golden: None,
            requirements: Requirements::default(),
            lineage: None,
        }
    }

    fn model_bytes() -> Vec<u8> {
        (0..4096u32).flat_map(|i| (i % 251).to_le_bytes()).collect()
    }

    fn setup() -> (SecretKey, TrustedKeys, Vec<u8>) {
        let key = SecretKey::from_seed([5; 32]);
        let trusted = TrustedKeys::new([key.public().clone()]);
        let bytes = pack(manifest(3), &model_bytes(), &key).unwrap();
        (key, trusted, bytes)
    }

    use crate::pseudo_random_bytes as noise;

    #[test]
    fn a_delta_bundle_verifies_only_against_its_base_and_is_small() {
        let (key, trusted, _) = setup();
        // The base and the new model share all but their last 4 KiB ("the last layer").
        let base = noise(256 * 1024, 1);
        let mut model = base.clone();
        let tail = model.len() - 4096;
        model[tail..].copy_from_slice(&noise(4096, 2));
        let full = pack(manifest(4), &model, &key).unwrap();
        let delta = pack_delta(manifest(4), &model, &base, &key).unwrap();
        assert!(
            delta.len() * 10 < full.len(),
            "delta {} vs full {}",
            delta.len(),
            full.len()
        );
        let verified = verify_delta(&delta, &trusted, &Limits::default(), Some(&base)).unwrap();
        assert_eq!(verified.model, model);
        assert_eq!(
            verified.manifest.artifact.delta_base_sha256,
            Some(sha256_hex(&base))
        );
        // A full bundle verifies with or without a base.
        assert_eq!(
            verify_delta(&full, &trusted, &Limits::default(), Some(&base))
                .unwrap()
                .model,
            model
        );
        assert!(matches!(
            verify(&delta, &trusted, &Limits::default()),
            Err(BundleError::DeltaBase { .. })
        ));
        let other = noise(256 * 1024, 3);
        let err = verify_delta(&delta, &trusted, &Limits::default(), Some(&other)).unwrap_err();
        assert!(
            matches!(&err, BundleError::DeltaBase { found, .. } if found.contains(&sha256_hex(&other))),
            "{err}"
        );
        // The base is named in the signed manifest: a delta cannot be re-pointed.
        let mut tampered = delta.clone();
        let at = tampered.len() - 10;
        tampered[at] ^= 1;
        assert!(matches!(
            verify_delta(&tampered, &trusted, &Limits::default(), Some(&base)),
            Err(BundleError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn an_expanded_bundle_is_checked_against_its_signed_model_digest() {
        let (key, trusted, _) = setup();
        let base = noise(64 * 1024, 1);
        let mut model = base.clone();
        model[..100].copy_from_slice(&noise(100, 2));
        let delta = pack_delta(manifest(4), &model, &base, &key).unwrap();
        let limits = Limits::default();
        let verified = verify_expanded(&delta, Some(model.clone()), &trusted, &limits).unwrap();
        assert_eq!(verified.model, model);
        assert_eq!(verified.manifest.version, 4);
        // Another model, one flipped byte, a cut model: each refused with what differs.
        let mut flipped = model.clone();
        flipped[5] ^= 1;
        assert!(matches!(
            verify_expanded(&delta, Some(flipped), &trusted, &limits),
            Err(BundleError::DigestMismatch { what: "model", .. })
        ));
        assert!(matches!(
            verify_expanded(&delta, Some(base.clone()), &trusted, &limits),
            Err(BundleError::DigestMismatch { what: "model", .. })
        ));
        assert!(matches!(
            verify_expanded(&delta, Some(model[1..].to_vec()), &trusted, &limits),
            Err(BundleError::SizeMismatch { what: "model", .. })
        ));
        // The bundle beside the model is still checked: its signature and its artifact.
        let mut tampered = delta.clone();
        let at = tampered.len() - 10;
        tampered[at] ^= 1;
        assert!(matches!(
            verify_expanded(&tampered, Some(model.clone()), &trusted, &limits),
            Err(BundleError::DigestMismatch {
                what: "compressed artifact",
                ..
            })
        ));
        let stranger = TrustedKeys::new([SecretKey::from_seed([9; 32]).public().clone()]);
        assert!(matches!(
            verify_expanded(&delta, Some(model.clone()), &stranger, &limits),
            Err(BundleError::Signature(SignatureError::UnknownKey(_)))
        ));
        // A delta without its model is refused; a full bundle needs none and ignores one.
        assert!(matches!(
            verify_expanded(&delta, None, &trusted, &limits),
            Err(BundleError::DeltaBase { .. })
        ));
        let full = pack(manifest(4), &model, &key).unwrap();
        for kept in [None, Some(base)] {
            let verified = verify_expanded(&full, kept, &trusted, &limits).unwrap();
            assert_eq!(verified.model, model);
        }
    }

    #[test]
    fn a_delta_that_inflates_past_its_signed_size_is_refused() {
        let (key, trusted, _) = setup();
        let base = noise(64 * 1024, 1);
        // The signed raw size is the real one; a lying manifest cannot be signed by
        // someone else, so the bomb here is the key holder's own: still capped.
        let model = vec![0u8; 8 << 20];
        let bytes = pack_delta(manifest(5), &model, &base, &key).unwrap();
        let manifest_len = u32::from_be_bytes(bytes[10..14].try_into().unwrap()) as usize;
        let signed_as = |raw_size: u64| {
            let mut m: Manifest = serde_json::from_slice(&bytes[14..14 + manifest_len]).unwrap();
            m.artifact.raw_size = raw_size;
            let lying = serde_json::to_vec(&m).unwrap();
            let mut out = bytes[..10].to_vec();
            out.extend_from_slice(&(lying.len() as u32).to_be_bytes());
            out.extend_from_slice(&lying);
            out.extend_from_slice(&key.id().0);
            out.extend_from_slice(&key.sign(Context::BundleManifest, &lying));
            out.extend_from_slice(&bytes[14 + manifest_len + 8 + SIGNATURE_LEN..]);
            out
        };
        // The decoder's window is sized from the signed sizes too: a frame that needs more
        // is refused before it allocates for 8 MiB.
        let err =
            verify_delta(&signed_as(1024), &trusted, &Limits::default(), Some(&base)).unwrap_err();
        assert!(
            matches!(&err, BundleError::Decompress(e) if e.contains("memory")),
            "{err}"
        );
        // Within the window, output stops one byte past the signed size.
        let err = verify_delta(
            &signed_as((8 << 20) - 1),
            &trusted,
            &Limits::default(),
            Some(&base),
        )
        .unwrap_err();
        assert!(
            matches!(err, BundleError::SizeMismatch { actual, .. } if actual == 8 << 20),
            "{err}"
        );
    }

    #[test]
    fn a_packed_bundle_verifies_and_yields_the_model() {
        let (key, trusted, bytes) = setup();
        let v = verify(&bytes, &trusted, &Limits::default()).unwrap();
        assert_eq!(v.model, model_bytes());
        assert_eq!(v.key_id, key.id());
        assert_eq!(v.manifest.version, 3);
        assert_eq!(v.manifest.artifact.raw_size, model_bytes().len() as u64);
        assert!(v.manifest.artifact.compressed_size < v.manifest.artifact.raw_size);
    }

    #[test]
    fn a_flipped_byte_anywhere_is_refused() {
        let (_, trusted, bytes) = setup();
        let l = layout(&bytes, &Limits::default()).unwrap();
        // Every single byte of the file matters; flipping it must never verify.
        for i in 0..bytes.len() {
            let mut t = bytes.clone();
            t[i] ^= 0x01;
            assert!(
                verify(&t, &trusted, &Limits::default()).is_err(),
                "byte {i} flipped and accepted"
            );
        }
        let flip = |at: usize| {
            let mut t = bytes.clone();
            t[at] ^= 0x20;
            verify(&t, &trusted, &Limits::default()).unwrap_err()
        };
        assert!(matches!(
            flip(l.manifest.start + 20),
            BundleError::Signature(SignatureError::Invalid(_))
        ));
        assert!(matches!(
            flip(l.signature.start + 3),
            BundleError::Signature(SignatureError::Invalid(_))
        ));
        assert!(matches!(
            flip(l.key_id.start),
            BundleError::Signature(SignatureError::UnknownKey(_))
        ));
        assert!(matches!(
            flip(l.artifact.start + 10),
            BundleError::DigestMismatch {
                what: "compressed artifact",
                ..
            }
        ));
        assert_eq!(flip(0), BundleError::NotABundle);
    }

    #[test]
    fn truncation_and_trailing_bytes_are_refused() {
        let (_, trusted, bytes) = setup();
        let limits = Limits::default();
        for cut in [0, 5, 12, 40, bytes.len() - 1] {
            assert!(
                matches!(
                    verify(&bytes[..cut], &trusted, &limits),
                    Err(BundleError::Truncated(_))
                ),
                "cut at {cut}"
            );
        }
        assert_eq!(
            verify(&bytes[..bytes.len() - 1], &trusted, &limits).unwrap_err(),
            BundleError::Truncated("artifact")
        );
        let mut longer = bytes.clone();
        longer.extend_from_slice(b"xx");
        assert_eq!(
            verify(&longer, &trusted, &limits).unwrap_err(),
            BundleError::TrailingBytes(2)
        );
    }

    #[test]
    fn a_bundle_signed_by_an_untrusted_key_is_refused() {
        let (_, trusted, _) = setup();
        let stranger = SecretKey::from_seed([6; 32]);
        let bytes = pack(manifest(3), &model_bytes(), &stranger).unwrap();
        assert_eq!(
            verify(&bytes, &trusted, &Limits::default()).unwrap_err(),
            BundleError::Signature(SignatureError::UnknownKey(stranger.id()))
        );
    }

    #[test]
    fn size_limits_apply_before_any_work() {
        let (_, trusted, bytes) = setup();
        let tight = Limits {
            max_manifest_bytes: 10,
            ..Limits::default()
        };
        assert!(matches!(
            verify(&bytes, &trusted, &tight),
            Err(BundleError::TooLarge {
                what: "manifest",
                ..
            })
        ));
        let tight = Limits {
            max_model_bytes: 100,
            ..Limits::default()
        };
        assert!(matches!(
            verify(&bytes, &trusted, &tight),
            Err(BundleError::TooLarge { what: "model", .. })
        ));
    }

    #[test]
    fn a_signed_manifest_cannot_smuggle_a_decompression_bomb() {
        // A key holder who lies about the raw size still cannot make the verifier inflate
        // more than the signed size: decompression stops at the cap.
        let key = SecretKey::from_seed([5; 32]);
        let trusted = TrustedKeys::new([key.public().clone()]);
        let bomb = vec![0u8; 8 << 20];
        let bytes = pack(manifest(1), &bomb, &key).unwrap();
        let l = layout(&bytes, &Limits::default()).unwrap();
        let mut m: Manifest = serde_json::from_slice(&bytes[l.manifest.clone()]).unwrap();
        m.artifact.raw_size = 1024;
        let manifest_bytes = serde_json::to_vec(&m).unwrap();
        let mut forged = Vec::new();
        forged.extend_from_slice(MAGIC);
        forged.extend_from_slice(&FORMAT.to_be_bytes());
        forged.extend_from_slice(&(manifest_bytes.len() as u32).to_be_bytes());
        forged.extend_from_slice(&manifest_bytes);
        forged.extend_from_slice(&key.id().0);
        forged.extend_from_slice(&key.sign(Context::BundleManifest, &manifest_bytes));
        forged.extend_from_slice(&bytes[l.artifact.start - 8..]);
        assert!(matches!(
            verify(&forged, &trusted, &Limits::default()),
            Err(BundleError::Decompress(_))
        ));
    }

    #[test]
    fn install_requirements_golden_vectors_and_lineage_travel_and_are_checked() {
        let key = SecretKey::from_seed([5; 32]);
        let trusted = TrustedKeys::new([key.public().clone()]);
        let mut m = manifest(4);
        m.golden = Some(Golden {
            tolerance: 1e-4,
            vectors: vec![GoldenVector {
                input: vec![1.0, 2.0],
                output: vec![0.25, 0.75],
            }],
        });
        m.requirements = Requirements {
            latency_budget_ms: Some(5.0),
            min_agent_version: Some("0.2.0".into()),
            targets: vec!["aarch64".into()],
            boards: vec!["rpi4".into()],
        };
        m.lineage = Some(Lineage {
            parent_version: Some(3),
            training_data_sha256: Some("ab".repeat(32)),
            ..Lineage::default()
        });
        let bytes = pack(m.clone(), &model_bytes(), &key).unwrap();
        let got = verify(&bytes, &trusted, &Limits::default())
            .unwrap()
            .manifest;
        assert_eq!(
            (got.golden, got.requirements, got.lineage),
            (m.golden.clone(), m.requirements.clone(), m.lineage.clone())
        );
        // Without them, the manifest is what it was before they existed.
        let plain = serde_json::to_value(manifest(4)).unwrap();
        for field in ["golden", "requirements", "lineage"] {
            assert!(plain.get(field).is_none(), "{field}");
        }
        let refused = |change: fn(&mut Manifest)| {
            let mut bad = m.clone();
            change(&mut bad);
            pack(bad, b"x", &key).unwrap_err().to_string()
        };
        assert!(
            refused(|m| m.golden.as_mut().unwrap().vectors[0]
                .input
                .pop()
                .map_or((), drop))
            .contains("golden vector 0")
        );
        assert!(refused(|m| m.golden.as_mut().unwrap().tolerance = f64::NAN).contains("tolerance"));
        assert!(
            refused(|m| m.requirements.latency_budget_ms = Some(0.0)).contains("latency budget")
        );
        assert!(refused(|m| m.requirements.min_agent_version = Some("v2".into())).contains("`v2`"));
        assert!(
            refused(|m| m.lineage.as_mut().unwrap().training_data_sha256 = Some("xyz".into()))
                .contains("`xyz`")
        );
        assert_eq!(parse_version("0.10.2"), Some(vec![0, 10, 2]));
        assert!(parse_version("0.10.2") > parse_version("0.9.9"));
        assert_eq!(parse_version("1.x"), None);
        assert!(version_at_least("0.2.0", "0.2"));
        assert!(version_at_least("0.2", "0.2.0"));
        assert!(version_at_least("0.3.0-rc.1", "0.3.0"));
        assert!(!version_at_least("0.1.9", "0.2.0"));
        assert!(!version_at_least("dev", "0.1.0"));
    }

    #[test]
    fn a_manifest_with_a_hostile_name_is_refused_at_pack_time() {
        let key = SecretKey::from_seed([5; 32]);
        let mut m = manifest(1);
        m.name = "../etc".into();
        assert!(matches!(
            pack(m, b"x", &key),
            Err(BundleError::MalformedManifest(_))
        ));
    }

    #[test]
    fn outputs_declare_their_kinds_and_exactly_one_is_served() {
        let key = SecretKey::from_seed([5; 32]);
        let trusted = TrustedKeys::new([key.public().clone()]);
        let label = TensorSpec {
            name: "label".into(),
            dtype: DType::I64,
            shape: vec![None],
            names: Vec::new(),
            kind: Some(OutputKind::ClassLabels),
            preprocess: None,
            layout: None,
            channel_axis: None,
        };
        // The label first, the scores second: the scores are served.
        let mut m = manifest(1);
        m.outputs[0].kind = Some(OutputKind::ClassScores);
        m.outputs.insert(0, label.clone());
        let verified = verify(&pack(m, b"x", &key).unwrap(), &trusted, &Limits::default()).unwrap();
        assert_eq!(verified.manifest.served_output().name, "y");
        assert_eq!(
            verified.manifest.outputs[0].kind,
            Some(OutputKind::ClassLabels)
        );
        let text = serde_json::to_string(&verified.manifest.outputs).unwrap();
        assert!(text.contains(r#""kind":"class_labels""#), "{text}");
        // A manifest of one output without a kind (as before kinds existed) serves it.
        assert_eq!(manifest(1).served_output().name, "y");
        // Labels alone, or two outputs of scores, leave nothing or too much to serve.
        let mut m = manifest(1);
        m.outputs = vec![label];
        let err = pack(m, b"x", &key).unwrap_err();
        assert!(err.to_string().contains("declares 0"), "{err}");
        let mut m = manifest(1);
        m.outputs.push(m.outputs[0].clone());
        let err = pack(m, b"x", &key).unwrap_err();
        assert!(err.to_string().contains("declares 2"), "{err}");
    }

    /// A regression serves one value per input and its profile holds the values it
    /// predicted on the reference (not a class histogram).
    #[test]
    fn a_regression_serves_one_value_profiled_by_its_predictions() {
        let key = SecretKey::from_seed([5; 32]);
        let trusted = TrustedKeys::new([key.public().clone()]);
        let regression = || {
            let mut m = manifest(1);
            m.outputs[0].kind = Some(OutputKind::Regression);
            m.outputs[0].shape = vec![None, Some(1)];
            m.outputs[0].names = vec!["remaining_hours".into()];
            m.reference
                .set_predicted_values(&[1.0, 2.0, 3.0, 5.0, 8.0])
                .unwrap();
            m
        };
        let verified = verify(
            &pack(regression(), b"x", &key).unwrap(),
            &trusted,
            &Limits::default(),
        )
        .unwrap();
        assert!(verified.manifest.is_regression());
        assert!(!manifest(1).is_regression());
        let text = serde_json::to_string(&verified.manifest).unwrap();
        assert!(
            text.contains(r#""kind":"regression""#) && text.contains(r#""predicted_value""#),
            "{text}"
        );
        let refused = |m: Manifest| pack(m, b"x", &key).unwrap_err().to_string();
        let mut m = regression();
        m.outputs[0].shape = vec![None, Some(2)];
        assert!(refused(m).contains("one value per input"));
        let mut m = regression();
        m.outputs[0].shape = vec![None];
        pack(m, b"x", &key).unwrap();
        let mut m = regression();
        m.outputs[0].names.push("other".into());
        assert!(refused(m).contains("2 names"));
        let mut m = regression();
        m.reference.predicted_value = None;
        assert!(refused(m).contains("needs its predicted values"));
        let mut m = manifest(1);
        m.reference.predicted_value = regression().reference.predicted_value;
        assert!(refused(m).contains("not predicted values"));
        let mut m = regression();
        m.reference.predictions = vec![0.5, 0.5];
        assert!(refused(m).contains("not both"));
    }

    /// A tensor input is watched on each channel's mean and deviation, along its channel
    /// axis, and scaled by channel.
    #[test]
    fn tensor_inputs_are_watched_and_scaled_by_channel() {
        let spec = |shape: &[u64], axis: Option<u32>| TensorSpec {
            name: "x".into(),
            dtype: DType::F32,
            shape: std::iter::once(None)
                .chain(shape.iter().map(|&d| Some(d)))
                .collect(),
            names: Vec::new(),
            kind: None,
            preprocess: None,
            layout: None,
            channel_axis: axis,
        };
        // NCHW, 2 channels of 2×2: channel 0 is 1, 2, 3, 4; channel 1 is 10, 10, 10, 10.
        let image = spec(&[2, 2, 2], None);
        assert_eq!(image.row_len(), Some(8));
        assert_eq!(image.channel_layout(), Some((2, 4)));
        let row = [1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0];
        assert_eq!(
            image.tensor_feature_names(),
            ["c0.mean", "c0.std", "c1.mean", "c1.std"]
        );
        let watched = image.tensor_features(&row);
        assert_eq!(watched[0], 2.5);
        assert!((watched[1] - 1.25f32.sqrt()).abs() < 1e-6, "{watched:?}");
        assert_eq!(watched[2..], [10.0, 0.0]);
        // The same numbers as NHWC (channels last): pairs alternate channels.
        let nhwc = spec(&[2, 2, 2], Some(3));
        assert_eq!(nhwc.channel_layout(), Some((2, 1)));
        let watched = nhwc.tensor_features(&row);
        assert_eq!(watched[0], 6.0); // 1, 3, 10, 10
        assert_eq!(watched[2], 6.5); // 2, 4, 10, 10
        // Named channels name the features; a NaN makes its channel's features NaN.
        let named = TensorSpec {
            names: vec!["red".into(), "green".into()],
            ..image.clone()
        };
        assert_eq!(named.tensor_feature_names()[2], "green.mean");
        let mut gap = row;
        gap[5] = f32::NAN;
        let watched = image.tensor_features(&gap);
        assert!(watched[2].is_nan() && watched[0] == 2.5, "{watched:?}");

        let mut scaled = row;
        Preprocess {
            offset: vec![1.0, 10.0],
            scale: vec![2.0, 0.5],
        }
        .apply(&mut scaled, 4);
        assert_eq!(scaled, [0.0, 2.0, 4.0, 6.0, 0.0, 0.0, 0.0, 0.0]);

        // Out of range or open: no layout.
        assert_eq!(spec(&[2, 2, 2], Some(4)).channel_layout(), None);
        assert_eq!(spec(&[2, 2, 2], Some(0)).channel_layout(), None);
        let mut open = spec(&[2, 2, 2], None);
        open.shape[2] = None;
        assert_eq!(open.channel_layout(), None);
        assert_eq!(open.row_len(), None);

        // A manifest of a tensor input must profile exactly its channel statistics.
        let key = SecretKey::from_seed([7; 32]);
        let names = image.tensor_feature_names();
        let columns = vec![vec![1.0, 2.0, 3.0]; names.len()];
        let mut m = Manifest::classifier("camera", 1, &names, &columns, 2).unwrap();
        m.inputs[0] = image.clone();
        pack(m.clone(), b"x", &key).unwrap();
        let mut wrong = m.clone();
        wrong.reference =
            ReferenceProfile::from_columns(&names[..2], &columns[..2], crate::drift::DEFAULT_BINS)
                .unwrap();
        let err = pack(wrong, b"x", &key).unwrap_err().to_string();
        assert!(err.contains("c1.mean"), "{err}");
        let mut open_manifest = m.clone();
        open_manifest.inputs[0] = open;
        let err = pack(open_manifest, b"x", &key).unwrap_err().to_string();
        assert!(err.contains("every dimension after the batch"), "{err}");

        // A channels-first model whose devices send rows channels last: the row is
        // `[H, W, C]`, its channels alternate, and the statistics are the channels'.
        let sent_last = TensorSpec {
            layout: Some(RowLayout::ChannelsLast),
            ..image.clone()
        };
        assert_eq!(sent_last.row_shape(), Some(vec![2, 2, 2]));
        let camera = TensorSpec {
            shape: vec![None, Some(3), Some(4), Some(5)],
            ..sent_last.clone()
        };
        assert_eq!(camera.row_shape(), Some(vec![4, 5, 3]));
        assert_eq!(camera.channel_layout(), Some((3, 1)));
        let hwc = [1.0, 10.0, 3.0, 10.0, 2.0, 10.0, 4.0, 10.0];
        assert_eq!(sent_last.tensor_features(&hwc), image.tensor_features(&row));
        m.inputs[0] = sent_last.clone();
        let text = serde_json::to_string(&m.inputs[0]).unwrap();
        assert!(text.contains(r#""layout":"channels_last""#), "{text}");
        pack(m.clone(), b"x", &key).unwrap();
        // Only for channels that come first, of a tensor.
        m.inputs[0].channel_axis = Some(3);
        let err = pack(m, b"x", &key).unwrap_err().to_string();
        assert!(err.contains("channels come first"), "{err}");
    }

    #[test]
    fn inputs_may_declare_preprocessing_of_one_finite_number_per_feature() {
        let key = SecretKey::from_seed([6; 32]);
        let trusted = TrustedKeys::new([key.public().clone()]);
        let width = manifest(1).reference.features.len();
        let preprocess = Preprocess {
            offset: vec![1.0; width],
            scale: vec![0.5; width],
        };
        let mut m = manifest(1);
        m.inputs[0].preprocess = Some(preprocess.clone());
        let verified = verify(&pack(m, b"x", &key).unwrap(), &trusted, &Limits::default()).unwrap();
        assert_eq!(
            verified.manifest.inputs[0].preprocess,
            Some(preprocess.clone())
        );
        let text = serde_json::to_string(&verified.manifest.inputs).unwrap();
        assert!(text.contains(r#""preprocess":{"offset":[1.0"#), "{text}");
        // Without it, a manifest serialises as it did before preprocessing existed.
        let text = serde_json::to_string(&manifest(1).inputs).unwrap();
        assert!(!text.contains("preprocess"), "{text}");

        let mut row = vec![3.0f32; width];
        preprocess.apply(&mut row, 1);
        assert!(row.iter().all(|&x| x == 1.0), "{row:?}");

        for (broken, needle) in [
            (
                Preprocess {
                    offset: vec![0.0; width + 1],
                    scale: vec![1.0; width],
                },
                format!("offset has {} values for {width} features", width + 1),
            ),
            (
                Preprocess {
                    offset: vec![0.0; width],
                    scale: vec![f64::NAN; width],
                },
                "scale[0] is NaN".to_string(),
            ),
        ] {
            let mut m = manifest(1);
            m.inputs[0].preprocess = Some(broken);
            let err = pack(m, b"x", &key).unwrap_err().to_string();
            assert!(err.contains(&needle), "{err}");
        }
        let mut m = manifest(1);
        m.outputs[0].preprocess = Some(preprocess);
        let err = pack(m, b"x", &key).unwrap_err().to_string();
        assert!(err.contains("only inputs"), "{err}");
    }

    /// A manifest of two inputs: `[batch, width]` tables whose widths add up to the
    /// profiled features; a row's preprocessing is every input's in order.
    #[test]
    fn a_manifest_of_several_inputs_splits_its_features_among_them() {
        let key = SecretKey::from_seed([7; 32]);
        let two = || {
            let mut m = manifest(1);
            let first = TensorSpec {
                shape: vec![None, Some(1)],
                names: vec!["a".into()],
                ..m.inputs[0].clone()
            };
            let second = TensorSpec {
                name: "counts".into(),
                dtype: DType::I64,
                names: vec!["b".into()],
                ..first.clone()
            };
            m.inputs = vec![first, second];
            m
        };
        pack(two(), b"x", &key).unwrap();
        assert_eq!(two().row_preprocess(), None);
        let mut scaled = two();
        scaled.inputs[1].preprocess = Some(Preprocess {
            offset: vec![4.0],
            scale: vec![0.5],
        });
        pack(scaled.clone(), b"x", &key).unwrap();
        assert_eq!(
            scaled.row_preprocess(),
            Some(Preprocess {
                offset: vec![0.0, 4.0],
                scale: vec![1.0, 0.5],
            })
        );

        let mut wide = two();
        wide.inputs[1].shape = vec![None, Some(2)];
        wide.inputs[1].names.clear();
        let err = pack(wide, b"x", &key).unwrap_err().to_string();
        assert!(
            err.contains("take 3 features together, but the reference profiles 2"),
            "{err}"
        );
        let mut open = two();
        open.inputs[1].shape = vec![None, None];
        let err = pack(open, b"x", &key).unwrap_err().to_string();
        assert!(
            err.contains("input `counts`") && err.contains("fixed width"),
            "{err}"
        );
        let mut tensor = two();
        tensor.inputs[1].shape = vec![None, Some(1), Some(1)];
        let err = pack(tensor, b"x", &key).unwrap_err().to_string();
        assert!(err.contains("[batch, width] table"), "{err}");
        let mut same = two();
        same.inputs[1].name = "x".into();
        let err = pack(same, b"x", &key).unwrap_err().to_string();
        assert!(err.contains("two inputs are named `x`"), "{err}");
        let mut misnamed = two();
        misnamed.inputs[0].names = vec!["a".into(), "b".into()];
        let err = pack(misnamed, b"x", &key).unwrap_err().to_string();
        assert!(err.contains("1 wide but names 2"), "{err}");
    }

    /// Runs a stream check over `bytes` fed in pieces of `piece` bytes.
    fn stream(bytes: &[u8], trusted: &TrustedKeys, piece: usize) -> Result<Manifest, BundleError> {
        let mut check = StreamCheck::new(trusted, Limits::default());
        for chunk in bytes.chunks(piece.max(1)) {
            check.update(chunk)?;
        }
        check.finish()
    }

    #[test]
    fn a_stream_check_accepts_a_good_bundle_in_any_pieces() {
        let (_, trusted, bytes) = setup();
        for piece in [1, 7, 13, 100, 4096, bytes.len()] {
            let manifest = stream(&bytes, &trusted, piece).unwrap();
            assert_eq!(manifest.model_ref(), manifest_of(&bytes).model_ref());
        }
    }

    fn manifest_of(bytes: &[u8]) -> Manifest {
        let l = layout(bytes, &Limits::default()).unwrap();
        serde_json::from_slice(&bytes[l.manifest]).unwrap()
    }

    #[test]
    fn a_stream_check_refuses_a_bad_head_before_the_artifact_arrives() {
        let (_, trusted, bytes) = setup();
        let l = layout(&bytes, &Limits::default()).unwrap();
        let head = &bytes[..l.artifact.start];
        let refused_at_head = |bytes: &[u8]| {
            let mut check = StreamCheck::new(&trusted, Limits::default());
            check.update(&bytes[..l.artifact.start]).unwrap_err()
        };
        let mut t = head.to_vec();
        t[l.manifest.start + 20] ^= 0x20;
        assert!(matches!(
            refused_at_head(&t),
            BundleError::Signature(SignatureError::Invalid(_))
        ));
        let mut t = head.to_vec();
        t[l.key_id.start] ^= 0x20;
        assert!(matches!(
            refused_at_head(&t),
            BundleError::Signature(SignatureError::UnknownKey(_))
        ));
        let mut t = head.to_vec();
        t[0] ^= 0x20;
        assert_eq!(refused_at_head(&t), BundleError::NotABundle);
        // An artifact length that is not the signed one is caught before any of it arrives.
        let mut t = head.to_vec();
        t[l.artifact.start - 1] ^= 0x01;
        assert!(matches!(
            refused_at_head(&t),
            BundleError::SizeMismatch {
                what: "compressed artifact",
                ..
            }
        ));
        // A manifest length over the cap is refused from the first 14 bytes.
        let mut check = StreamCheck::new(
            &trusted,
            Limits {
                max_manifest_bytes: 16,
                ..Limits::default()
            },
        );
        assert!(matches!(
            check.update(&bytes[..HEADER_LEN]),
            Err(BundleError::TooLarge {
                what: "manifest",
                ..
            })
        ));
    }

    #[test]
    fn a_stream_check_refuses_every_flipped_byte_truncation_and_excess() {
        let (_, trusted, bytes) = setup();
        for i in 0..bytes.len() {
            let mut t = bytes.clone();
            t[i] ^= 0x01;
            assert!(
                stream(&t, &trusted, 512).is_err(),
                "byte {i} flipped and accepted"
            );
        }
        let l = layout(&bytes, &Limits::default()).unwrap();
        let flipped = {
            let mut t = bytes.clone();
            t[l.artifact.start + 10] ^= 0x20;
            t
        };
        assert!(matches!(
            stream(&flipped, &trusted, 512),
            Err(BundleError::DigestMismatch {
                what: "compressed artifact",
                ..
            })
        ));
        for cut in [0, 5, 12, 40, l.artifact.start, bytes.len() - 1] {
            assert!(
                matches!(
                    stream(&bytes[..cut], &trusted, 512),
                    Err(BundleError::Truncated(_))
                ),
                "cut at {cut}"
            );
        }
        let mut long = bytes.clone();
        long.extend_from_slice(b"xyz");
        assert_eq!(
            stream(&long, &trusted, 512).unwrap_err(),
            BundleError::TrailingBytes(3)
        );
    }
}
