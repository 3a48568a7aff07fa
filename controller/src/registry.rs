//! The model registry: publishing a model checks it with tract, computes its reference
//! profile, signs the bundle and stores it in the artifact store and the database.

use std::path::{Path, PathBuf};

use edgeloop_agent::runtime::{LoadedModel, Plan, RuntimeError};
use edgeloop_agent::slots::write_atomic;
use edgeloop_agent::source::{SourceError, read_numeric_csv};
use edgeloop_shared::bundle::{
    self, BundleError, Golden, GoldenVector, Limits, Lineage, Manifest, OutputKind, Preprocess,
    Requirements, TensorSpec, VerifiedBundle,
};
use edgeloop_shared::drift::{DriftError, DriftPolicy};
use edgeloop_shared::signing::{SecretKey, TrustedKeys};
use edgeloop_shared::{is_valid_identifier, sha256_hex};

use tracing::{info, warn};

use crate::gate::{self, GateError, GatePolicy, GateReport, Holdout};
use crate::store::{ModelDelta, ModelRow, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("model name `{0}` must be 1-64 characters of [A-Za-z0-9_.-]")]
    BadName(String),
    #[error("model version must be at least 1")]
    BadVersion,
    #[error("targets: {0}")]
    Targets(String),
    #[error(
        "{name} v{version} is not above the newest published version {newest}; versions only go up"
    )]
    NotNewer {
        name: String,
        version: u64,
        newest: u64,
    },
    #[error("reference data: {0}")]
    Reference(#[from] SourceError),
    #[error("reference data has no column `{0}` to leave out")]
    NoLabelColumn(String),
    #[error("reference profile: {0}")]
    Profile(#[from] DriftError),
    #[error("the model does not run with tract: {0}")]
    Model(#[from] RuntimeError),
    #[error("the model has {classes} outputs but {labels} class labels were given")]
    Labels { classes: usize, labels: usize },
    #[error(
        "the model's output `{0}` has one column: a classifier needs one score per class \
         (export a binary classifier with both probabilities); publish a model that predicts \
         a value as a regression (`--regression`)"
    )]
    OneColumn(String),
    #[error(
        "a regression predicts one value per input, but the model's output `{output}` has \
         {columns} columns"
    )]
    RegressionWidth { output: String, columns: usize },
    #[error("a regression predicts one value: {0} names were given for it")]
    RegressionLabels(usize),
    #[error("bundle: {0}")]
    Bundle(#[from] BundleError),
    #[error("cannot write the artifact: {0}")]
    Artifact(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("quality gate {}", .0.summary())]
    GateFailed(Box<GateReport>),
    #[error("quality gate: {0}")]
    Gate(#[from] GateError),
    #[error("quality gate: {name} v{version} to compare with is not published")]
    NoBaseline { name: String, version: u64 },
    #[error("quality gate: cannot open {name} v{version} to compare with: {message}")]
    Baseline {
        name: String,
        version: u64,
        message: String,
    },
}

/// The quality and bias gate a model must pass to be published.
#[derive(Debug, Clone)]
pub struct QualityGate<'a> {
    /// Labelled holdout data (CSV).
    pub holdout: &'a Path,
    pub policy: GatePolicy,
    /// The version to compare with; the newest published version of the name when none
    /// (and nothing to compare with for a first version).
    pub against: Option<u64>,
}

/// What to publish.
#[derive(Debug, Clone)]
pub struct PublishRequest<'a> {
    pub name: &'a str,
    pub version: u64,
    pub label: Option<String>,
    pub onnx: &'a [u8],
    /// Reference data: a CSV file with a header, its columns the model's features; or,
    /// for a model of tensor input, a NumPy `.npy` array `(N, d1, d2, …)` of N inputs.
    pub reference_csv: &'a Path,
    /// A column of the reference data to leave out (for example the label).
    pub label_column: Option<&'a str>,
    /// Features to profile as categorical (their distinct reference values are the
    /// categories) rather than numeric.
    pub categorical: Vec<String>,
    /// Class labels, in output order. When empty: the classes the graph names (a
    /// scikit-learn export carries them), else `class_0`, `class_1`, …. For a regression,
    /// at most one: the name of what it predicts.
    pub class_labels: Vec<String>,
    /// The model predicts a value (one output column) rather than class scores.
    pub regression: bool,
    /// Per-feature scaling devices apply before the model (the reference data and the
    /// holdout stay in the units devices receive); per channel for a tensor input.
    pub preprocess: Option<Preprocess>,
    /// For a tensor model (reference data in an NPY file): the axis of its channels,
    /// counting the batch as 0. Default: the last of a `[batch, time, features]`
    /// sequence, 1 (NCHW) for images.
    pub channel_axis: Option<u32>,
    /// For a tensor model whose channels come first: devices send rows channels last
    /// (`[H, W, C]` images), and so does the NPY reference.
    pub layout: Option<edgeloop_shared::bundle::RowLayout>,
    pub created_ms: u64,
    /// What a device must satisfy before it activates the model.
    pub requirements: Requirements,
    /// When a feature and a window drift; the defaults when `None`.
    pub drift: Option<DriftPolicy>,
    pub lineage: Option<Lineage>,
    /// When set, the model is published only if it passes; the result goes into its lineage.
    pub gate: Option<QualityGate<'a>>,
}

impl<'a> PublishRequest<'a> {
    /// A request for `name` v`version` made now, with nothing optional: no label, class
    /// labels or categorical features, the default requirements and drift policy, no
    /// lineage and no gate. Set the fields that differ.
    pub fn new(name: &'a str, version: u64, onnx: &'a [u8], reference_csv: &'a Path) -> Self {
        PublishRequest {
            name,
            version,
            label: None,
            onnx,
            reference_csv,
            label_column: None,
            categorical: Vec::new(),
            class_labels: Vec::new(),
            regression: false,
            preprocess: None,
            layout: None,
            channel_axis: None,
            created_ms: edgeloop_agent::now_ms(),
            requirements: Requirements::default(),
            drift: None,
            lineage: None,
            gate: None,
        }
    }
}

/// Reference rows turned into golden vectors at publish.
const GOLDEN_VECTORS: usize = 8;
/// The most numbers the golden vectors' inputs hold together, so that a large tensor's
/// manifest stays small (a 3×224×224 image gets none: its smoke test is the reference
/// means).
const GOLDEN_NUMBERS: usize = 1 << 16;
/// Their tolerance: tract on the device against tract here, so only float noise differs.
const GOLDEN_TOLERANCE: f64 = 1e-4;

/// Where bundles live on disk: `{root}/{name}/{version}.elb`.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    root: PathBuf,
}

impl ArtifactStore {
    pub fn new(root: PathBuf) -> Self {
        ArtifactStore { root }
    }

    /// Where a bundle with this digest lives. Files are named by content, so a file never
    /// changes once written and two publishes racing for one version cannot overwrite each
    /// other's bundle: the registry row says which file is the version's. `name` must be a
    /// valid identifier and `sha256` hex (both are checked before use), so the path cannot
    /// climb out of the store.
    pub fn path(&self, name: &str, version: u64, sha256: &str) -> PathBuf {
        self.root
            .join(name)
            .join(format!("{version}-{sha256}.{}", bundle::FILE_EXTENSION))
    }

    /// The bundle file with this SHA-256 (full or delta bundle of any version), if the
    /// store has one. Anything but 64 lowercase hex digits names no file.
    pub fn find(&self, sha256: &str) -> std::io::Result<Option<PathBuf>> {
        if sha256.len() != 64
            || !sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Ok(None);
        }
        let suffix = format!("-{sha256}.{}", bundle::FILE_EXTENSION);
        let models = match std::fs::read_dir(&self.root) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        for model in models {
            let model = model?;
            if !model.file_type()?.is_dir() {
                continue;
            }
            for file in std::fs::read_dir(model.path())? {
                let file = file?;
                if file
                    .file_name()
                    .to_str()
                    .is_some_and(|n| n.ends_with(&suffix))
                {
                    return Ok(Some(file.path()));
                }
            }
        }
        Ok(None)
    }

    /// The URL path devices download the bundle from.
    pub fn url_path(name: &str, version: u64) -> String {
        format!("/artifacts/{name}/{version}")
    }

    /// The URL path of the delta bundle of `version` against `base_version`.
    pub fn delta_url_path(name: &str, version: u64, base_version: u64) -> String {
        format!("/artifacts/{name}/{version}/delta/{base_version}")
    }
}

/// Checks, profiles, signs and stores a model. Returns the registry row.
pub async fn publish(
    store: &dyn Store,
    artifacts: &ArtifactStore,
    key: &SecretKey,
    request: PublishRequest<'_>,
) -> Result<ModelRow, PublishError> {
    let name = request.name;
    if !is_valid_identifier(name) {
        return Err(PublishError::BadName(name.to_string()));
    }
    if request.version == 0 {
        return Err(PublishError::BadVersion);
    }
    check_targets(&request.requirements)?;
    let earlier: Vec<u64> = store
        .models()
        .await?
        .iter()
        .filter(|m| m.name == name)
        .map(|m| m.version)
        .collect();
    let newest = earlier.iter().max().copied();
    if let Some(newest) = newest
        && newest >= request.version
    {
        return Err(PublishError::NotNewer {
            name: name.to_string(),
            version: request.version,
            newest,
        });
    }
    let baseline = match &request.gate {
        Some(g) => match g.against.or(newest) {
            Some(version) => Some(open_published(store, artifacts, key, name, version).await?),
            None => None,
        },
        None => None,
    };

    let bundle_bytes = build_bundle(key, &request, baseline.as_ref())?;
    let published = verify_as_a_device_would(&bundle_bytes, key)?;
    let manifest = &published.manifest;

    let sha256 = sha256_hex(&bundle_bytes);
    let path = artifacts.path(name, request.version, &sha256);
    let dir = path.parent().expect("artifact paths have a parent");
    std::fs::create_dir_all(dir)
        .map_err(|e| PublishError::Artifact(format!("{}: {e}", dir.display())))?;
    // The file first, then the row that points at it: a crash in between leaves an
    // unreferenced file, never a row without its bundle.
    write_atomic(&path, &bundle_bytes).map_err(|e| PublishError::Artifact(e.to_string()))?;

    let row = ModelRow {
        name: name.to_string(),
        version: request.version,
        label: request.label.clone(),
        created_ms: request.created_ms,
        bundle_sha256: sha256,
        bundle_size: bundle_bytes.len() as u64,
        features: manifest
            .reference
            .feature_names()
            .map(str::to_string)
            .collect(),
        signed_by: key.id().to_string(),
        lineage: manifest.lineage.clone(),
        requirements: manifest.requirements.clone(),
    };
    if let Err(e) = store.insert_model(&row).await {
        let _ = std::fs::remove_file(&path);
        return Err(e.into());
    }
    // Devices running the previous version, or another earlier one devices run now, fetch
    // a delta instead, when it is worth it.
    let running = match store.devices().await {
        Ok(devices) => devices
            .into_iter()
            .filter(|d| d.model_name.as_deref() == Some(name))
            .filter_map(|d| d.model_version)
            .filter(|v| earlier.contains(v))
            .collect(),
        Err(e) => {
            warn!(model = name, error = %e, "cannot list the versions devices run");
            Vec::new()
        }
    };
    for base in delta_bases(newest, &running, request.version) {
        match publish_delta(store, artifacts, key, &row, &published, base).await {
            Ok(Some(delta)) => info!(
                model = name,
                version = row.version,
                base,
                delta_bytes = delta.bundle_size,
                full_bytes = row.bundle_size,
                "delta bundle made"
            ),
            Ok(None) => info!(
                model = name,
                version = row.version,
                base,
                "no delta bundle: it would not be much smaller than the full one"
            ),
            Err(e) => warn!(model = name, version = row.version, base, error = %e,
                "cannot make a delta bundle; devices download the full one"),
        }
    }
    Ok(row)
}

/// A delta bundle is offered only below this share of the full bundle's size.
pub const DELTA_WORTH: f64 = 0.8;

/// Most earlier versions a new version gets delta bundles against.
pub const MAX_DELTA_BASES: usize = 4;

/// The earlier versions a new `version` gets delta bundles against: the newest earlier
/// one, then the versions devices run now (`running`, one entry per device), the most run
/// first, at most [`MAX_DELTA_BASES`] in all.
pub fn delta_bases(newest: Option<u64>, running: &[u64], version: u64) -> Vec<u64> {
    let mut counts: std::collections::BTreeMap<u64, usize> = std::collections::BTreeMap::new();
    for &v in running.iter().filter(|&&v| v < version) {
        *counts.entry(v).or_default() += 1;
    }
    let mut by_use: Vec<(u64, usize)> = counts.into_iter().collect();
    // The most run first; among equals, the newer.
    by_use.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    let mut bases: Vec<u64> = newest.into_iter().collect();
    for (v, _) in by_use {
        if !bases.contains(&v) {
            bases.push(v);
        }
    }
    bases.truncate(MAX_DELTA_BASES);
    bases
}

/// Makes, checks and records a delta bundle of a model just published (`row`,
/// `published`) against `base_version` of the same name. `None` when it would not be
/// enough smaller than the full bundle to be worth offering.
pub async fn publish_delta(
    store: &dyn Store,
    artifacts: &ArtifactStore,
    key: &SecretKey,
    row: &ModelRow,
    published: &VerifiedBundle,
    base_version: u64,
) -> Result<Option<ModelDelta>, PublishError> {
    let (_, base) = open_published(store, artifacts, key, &row.name, base_version).await?;
    let bytes = bundle::pack_delta(
        published.manifest.clone(),
        &published.model,
        &base.model,
        key,
    )?;
    if bytes.len() as f64 > row.bundle_size as f64 * DELTA_WORTH {
        return Ok(None);
    }
    let trusted = TrustedKeys::new([key.public().clone()]);
    let check = bundle::verify_delta(&bytes, &trusted, &Limits::default(), Some(&base.model))?;
    debug_assert_eq!(check.model, published.model);
    let sha256 = sha256_hex(&bytes);
    let path = artifacts.path(&row.name, row.version, &sha256);
    write_atomic(&path, &bytes).map_err(|e| PublishError::Artifact(e.to_string()))?;
    let delta = ModelDelta {
        name: row.name.clone(),
        version: row.version,
        base_version,
        base_sha256: base.manifest.artifact.raw_sha256.clone(),
        bundle_sha256: sha256,
        bundle_size: bytes.len() as u64,
    };
    store.insert_model_delta(&delta).await?;
    Ok(Some(delta))
}

/// A published model's verified bundle, read back from the artifact store.
pub async fn open_published(
    store: &dyn Store,
    artifacts: &ArtifactStore,
    key: &SecretKey,
    name: &str,
    version: u64,
) -> Result<(u64, VerifiedBundle), PublishError> {
    let bytes = published_bytes(store, artifacts, name, version).await?;
    let trusted = TrustedKeys::new([key.public().clone()]);
    let verified = bundle::verify(&bytes, &trusted, &Limits::default())
        .map_err(|e| baseline_error(name, version, e))?;
    Ok((version, verified))
}

/// A published model's bundle file, read back from the artifact store.
async fn published_bytes(
    store: &dyn Store,
    artifacts: &ArtifactStore,
    name: &str,
    version: u64,
) -> Result<Vec<u8>, PublishError> {
    let row = store
        .model(name, version)
        .await?
        .ok_or_else(|| PublishError::NoBaseline {
            name: name.to_string(),
            version,
        })?;
    std::fs::read(artifacts.path(name, version, &row.bundle_sha256))
        .map_err(|e| baseline_error(name, version, e))
}

fn baseline_error(name: &str, version: u64, e: impl std::fmt::Display) -> PublishError {
    PublishError::Baseline {
        name: name.to_string(),
        version,
        message: e.to_string(),
    }
}

/// The signed manifest of a published model, without decompressing its artifact.
pub async fn published_manifest(
    store: &dyn Store,
    artifacts: &ArtifactStore,
    key: &SecretKey,
    name: &str,
    version: u64,
) -> Result<Manifest, PublishError> {
    let bytes = published_bytes(store, artifacts, name, version).await?;
    let trusted = TrustedKeys::new([key.public().clone()]);
    bundle::signed_manifest(&bytes, &trusted, &Limits::default())
        .map_err(|e| baseline_error(name, version, e))
}

/// Runs the quality gate: the candidate (`onnx` with `features`, or of the `tensor` input)
/// and the baseline, if any, on the holdout (CSV rows, or NPY records of tensors). Returns
/// the report whether it passed or not.
pub fn run_gate(
    gate: &QualityGate<'_>,
    onnx: &[u8],
    preprocess: Option<&Preprocess>,
    features: &[String],
    tensor: Option<&TensorSpec>,
    regression: bool,
    baseline: Option<&(u64, VerifiedBundle)>,
) -> Result<GateReport, GateError> {
    gate.policy.validate()?;
    let policy = gate.policy.clone().for_model(regression)?;
    if let Some((version, verified)) = baseline {
        let mismatch = if verified.manifest.is_regression() != regression {
            Some(if regression {
                "a classifier, this model a regression"
            } else {
                "a regression, this model a classifier"
            })
        } else if verified.manifest.inputs[0].is_tensor() != tensor.is_some() {
            Some(if tensor.is_some() {
                "a model of feature rows, this model one of tensors"
            } else {
                "a model of tensors, this model one of feature rows"
            })
        } else {
            None
        };
        if let Some(mismatch) = mismatch {
            return Err(GateError::Policy(format!(
                "v{version} to compare with is {mismatch}"
            )));
        }
    }
    let metric = policy.metric();
    // Each model reads the holdout as it takes its inputs: its features by name, or
    // tensors of its shape.
    let judge = |onnx: &[u8],
                 preprocess: Option<&Preprocess>,
                 features: &[String],
                 tensor: Option<&TensorSpec>|
     -> Result<gate::Evaluation, GateError> {
        match tensor {
            Some(input) => {
                let plan = Plan::compile_tensor(onnx, input)?;
                let holdout = Holdout::read_tensors(gate.holdout, plan.row_shape(), &policy)?;
                gate::evaluate_plan(&plan, &holdout, metric)
            }
            None => {
                let holdout = Holdout::read(gate.holdout, features, &policy)?;
                gate::evaluate(onnx, preprocess, &holdout, metric)
            }
        }
    };
    let candidate = judge(onnx, preprocess, features, tensor)?;
    let current = match baseline {
        Some((_, verified)) => {
            let manifest = &verified.manifest;
            let features: Vec<String> = manifest
                .reference
                .feature_names()
                .map(str::to_string)
                .collect();
            Some(judge(
                &verified.model,
                manifest.row_preprocess().as_ref(),
                &features,
                manifest.inputs.first().filter(|i| i.is_tensor()),
            )?)
        }
        None => None,
    };
    Ok(gate::judge(&policy, candidate, current))
}

/// Refuses target architectures and boards no agent is built for, and boards whose
/// architecture the model leaves out: devices would refuse such a model, or never be offered
/// it.
fn check_targets(requirements: &Requirements) -> Result<(), PublishError> {
    use edgeloop_firmware_targets::{Arch, BOARDS, board};
    let arches: Vec<&str> = Arch::ALL.iter().map(|a| a.rust_name()).collect();
    for target in &requirements.targets {
        if !arches.contains(&target.as_str()) {
            return Err(PublishError::Targets(format!(
                "`{target}` is not an architecture the agent is built for ({})",
                arches.join(", ")
            )));
        }
    }
    for id in &requirements.boards {
        let Some(profile) = board(id) else {
            let known: Vec<&str> = BOARDS.iter().map(|b| b.id).collect();
            return Err(PublishError::Targets(format!(
                "board `{id}` is not one of {}",
                known.join(", ")
            )));
        };
        let arch = profile.arch.rust_name();
        if !requirements.targets.is_empty() && !requirements.targets.iter().any(|t| t == arch) {
            return Err(PublishError::Targets(format!(
                "board `{id}` is {arch}, which the targets {:?} leave out",
                requirements.targets
            )));
        }
    }
    Ok(())
}

/// The lineage a gated model is signed with: the request's, with the baseline as parent
/// (unless given), the metrics and the verdict.
fn gated_lineage(lineage: Option<Lineage>, report: &GateReport, baseline: Option<u64>) -> Lineage {
    let mut lineage = lineage.unwrap_or_default();
    if lineage.parent_version.is_none() {
        lineage.parent_version = baseline;
    }
    let metric = report.policy.metric();
    lineage
        .metrics
        .insert(metric.to_string(), report.candidate.value);
    if let Some(current) = &report.current {
        lineage
            .metrics
            .insert(format!("{metric}/baseline"), current.value);
    }
    for (segment, score) in &report.candidate.segments {
        lineage
            .metrics
            .insert(format!("{metric}/{segment}"), score.value);
    }
    lineage.gates.insert("quality".into(), report.summary());
    lineage
}

/// Reads the reference data, checks the model against it (and the quality gate, when
/// asked) and packs the signed bundle.
fn build_bundle(
    key: &SecretKey,
    request: &PublishRequest<'_>,
    baseline: Option<&(u64, VerifiedBundle)>,
) -> Result<Vec<u8>, PublishError> {
    let Reference {
        plan,
        inputs,
        columns,
        rows,
        by_column,
    } = if is_npy(request.reference_csv) {
        tensor_reference(request)?
    } else {
        table_reference(request)?
    };
    let signature = plan.signature().clone();
    // Every reference row must run: a model that fails on its own reference data would
    // fail on devices too. The first few, with their outputs, become the golden vectors
    // (as many as fit in GOLDEN_NUMBERS for large tensors). Their predicted classes are the
    // reference for prediction drift (their values, for a regression).
    let mut golden = Vec::new();
    let mut predicted = Vec::with_capacity(rows.len());
    let names = if inputs[0].is_tensor() {
        &[][..]
    } else {
        &columns[..]
    };
    for row in rows.iter().filter(|r| r.iter().all(|v| v.is_finite())) {
        let prediction = plan.infer(row, names)?;
        predicted.push(prediction.target(request.regression).number());
        let scores = prediction.scores;
        if golden.len() < GOLDEN_VECTORS && (golden.len() + 1) * row.len() <= GOLDEN_NUMBERS {
            golden.push(GoldenVector {
                input: row.iter().map(|v| f64::from(*v)).collect(),
                output: scores.iter().map(|v| f64::from(*v)).collect(),
            });
        }
    }
    let classes = plan.classes();
    if request.regression && classes != 1 {
        return Err(PublishError::RegressionWidth {
            output: signature.output_name,
            columns: classes,
        });
    }
    if !request.regression && classes < 2 {
        return Err(PublishError::OneColumn(signature.output_name));
    }
    let labels = if request.regression {
        if request.class_labels.len() > 1 {
            return Err(PublishError::RegressionLabels(request.class_labels.len()));
        }
        request.class_labels.clone()
    } else if request.class_labels.is_empty() {
        // The classes the graph names (scikit-learn's), else `class_0`, `class_1`, ….
        signature
            .class_labels
            .filter(|names| names.len() == classes)
            .unwrap_or_else(|| (0..classes).map(|i| format!("class_{i}")).collect())
    } else if request.class_labels.len() == classes {
        request.class_labels.clone()
    } else {
        return Err(PublishError::Labels {
            classes,
            labels: request.class_labels.len(),
        });
    };
    let mut manifest = Manifest::classifier(
        request.name,
        request.version,
        &columns,
        &by_column,
        classes as u64,
    )?;
    if request.regression {
        manifest.reference.set_predicted_values(&predicted)?;
        manifest.outputs[0].kind = Some(OutputKind::Regression);
    } else {
        // Class indices, as numbers.
        let classes_predicted = predicted.iter().map(|&class| class as usize);
        manifest
            .reference
            .set_predictions(classes_predicted, classes);
    }
    for name in &request.categorical {
        let at = columns.iter().position(|c| c == name).ok_or_else(|| {
            PublishError::Profile(edgeloop_shared::drift::DriftError::BadReference {
                feature: name.clone(),
                reason: "named categorical, but it is not a feature of the reference data".into(),
            })
        })?;
        manifest.reference.set_categorical(name, &by_column[at])?;
    }
    manifest.label = request.label.clone();
    manifest.created_ms = request.created_ms;
    manifest.inputs = inputs;
    manifest.outputs[0].name = signature.output_name;
    manifest.outputs[0].names = labels;
    // The graph's other outputs are declared for what they are; a device computes only
    // the scores. A label output is named as such; any other is left out, as it is never
    // served.
    if signature.outputs.len() > 1 && !request.regression {
        manifest.outputs[0].kind = Some(OutputKind::ClassScores);
        manifest.outputs.extend(
            signature
                .outputs
                .iter()
                .enumerate()
                .filter(|(i, o)| *i != signature.scores && o.is_label)
                .filter_map(|(_, o)| {
                    Some(TensorSpec {
                        name: o.name.clone(),
                        dtype: o.dtype?,
                        shape: vec![None],
                        names: Vec::new(),
                        kind: Some(OutputKind::ClassLabels),
                        preprocess: None,
                        layout: None,
                        channel_axis: None,
                    })
                }),
        );
    }
    manifest.golden = Some(Golden {
        tolerance: GOLDEN_TOLERANCE,
        vectors: golden,
    });
    manifest.requirements = request.requirements.clone();
    if let Some(policy) = &request.drift {
        policy.validate()?;
    }
    manifest.drift = request.drift;
    manifest.lineage = request.lineage.clone();
    if let Some(gate) = &request.gate {
        let report = run_gate(
            gate,
            request.onnx,
            request.preprocess.as_ref(),
            &columns,
            manifest.inputs.first().filter(|i| i.is_tensor()),
            request.regression,
            baseline,
        )?;
        if !report.passed {
            return Err(PublishError::GateFailed(Box::new(report)));
        }
        manifest.lineage = Some(gated_lineage(
            manifest.lineage.take(),
            &report,
            baseline.map(|(v, _)| *v),
        ));
    }
    Ok(bundle::pack(manifest, request.onnx, key)?)
}

/// What a model's reference data gives a bundle: the plan that runs it, the inputs'
/// specs (shape, preprocessing, channels), the names and columns of what drift is watched
/// on, and the model's input rows.
struct Reference {
    plan: Plan,
    inputs: Vec<TensorSpec>,
    /// What drift is watched on: the features of a table, a tensor's channel statistics.
    columns: Vec<String>,
    /// The model's input rows (flat, for a tensor).
    rows: Vec<Vec<f32>>,
    /// One column per watched feature, one value per row.
    by_column: Vec<Vec<f64>>,
}

/// Whether the reference data is a NumPy array (for a tensor input) rather than a CSV.
fn is_npy(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"))
}

/// A CSV with a header: its columns (but the label) are the model's features.
fn table_reference(request: &PublishRequest<'_>) -> Result<Reference, PublishError> {
    let (mut columns, mut rows) = read_numeric_csv(request.reference_csv)?;
    if let Some(label) = request.label_column {
        let at = columns
            .iter()
            .position(|c| c == label)
            .ok_or_else(|| PublishError::NoLabelColumn(label.to_string()))?;
        columns.remove(at);
        for row in &mut rows {
            row.remove(at);
        }
    }
    let plan =
        Plan::compile(request.onnx, columns.len())?.with_preprocess(request.preprocess.as_ref())?;
    let by_column = (0..columns.len())
        .map(|c| rows.iter().map(|r| f64::from(r[c])).collect())
        .collect();
    // A row is every input's features in the graph's order: the columns, in order, are
    // split among them, and so is the preprocessing.
    let mut at = 0;
    let inputs = plan
        .inputs()
        .iter()
        .map(|input| {
            let part = at..at + input.len;
            at += input.len;
            TensorSpec {
                name: input.name.clone(),
                dtype: input.dtype,
                shape: vec![None, Some(input.len as u64)],
                names: columns[part.clone()].to_vec(),
                kind: None,
                preprocess: request.preprocess.as_ref().map(|p| Preprocess {
                    offset: p.offset[part.clone()].to_vec(),
                    scale: p.scale[part].to_vec(),
                }),
                layout: None,
                channel_axis: None,
            }
        })
        .collect();
    Ok(Reference {
        plan,
        inputs,
        columns,
        rows,
        by_column,
    })
}

/// A NumPy array `(N, d1, d2, …)` of N reference inputs of a tensor model: drift is
/// watched on each channel's mean and deviation (the channels along `channel_axis`, by
/// default the last axis of a `[batch, time, features]` sequence and axis 1 of an NCHW
/// image).
fn tensor_reference(request: &PublishRequest<'_>) -> Result<Reference, PublishError> {
    let path = request.reference_csv;
    let npy = |reason: String| SourceError::Npy {
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| SourceError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let (values, dims) = edgeloop_agent::source::read_npy_array(&bytes).map_err(npy)?;
    if dims.len() < 3 {
        return Err(npy(format!(
            "an array of shape {dims:?}: an NPY reference is for tensor inputs, (N, d1, d2, …); \
             give a CSV with a header for a model of [batch, features]"
        ))
        .into());
    }
    if request.label_column.is_some() {
        return Err(npy("an NPY reference has no columns to leave out".into()).into());
    }
    // The reference is laid out as devices send rows; a channels-last layout is the
    // model's with its channel axis (1) moved last.
    let channels_last = request.layout == Some(edgeloop_shared::bundle::RowLayout::ChannelsLast);
    if channels_last && request.channel_axis.is_some_and(|a| a != 1) {
        return Err(npy(format!(
            "channel axis {}: a channels-last reference is for a model whose channels come \
             first (axis 1)",
            request.channel_axis.unwrap_or_default()
        ))
        .into());
    }
    let mut row_shape = dims[1..].to_vec();
    if channels_last {
        row_shape.rotate_right(1);
    }
    let mut input = TensorSpec {
        name: String::new(),
        // The graph's, once the plan is made.
        dtype: edgeloop_shared::bundle::DType::F32,
        shape: std::iter::once(None)
            .chain(row_shape.iter().map(|&d| Some(d as u64)))
            .collect(),
        names: Vec::new(),
        kind: None,
        preprocess: request.preprocess.clone(),
        layout: request.layout,
        channel_axis: Some(if channels_last {
            1
        } else {
            request
                .channel_axis
                .unwrap_or(if dims.len() == 3 { 2 } else { 1 })
        }),
    };
    let axis = input.channel_axis.unwrap_or(1);
    if input.channel_layout().is_none() {
        return Err(npy(format!(
            "channel axis {axis} is not one of the axes after the batch (1..={})",
            row_shape.len()
        ))
        .into());
    }
    let plan = Plan::compile_tensor(request.onnx, &input)?;
    // A tensor model's one input.
    input.dtype = plan.inputs()[0].dtype;
    input.name = plan.inputs()[0].name.clone();
    let columns = input.tensor_feature_names();
    let rows: Vec<Vec<f32>> = values
        .chunks(plan.features().max(1))
        .map(<[f32]>::to_vec)
        .collect();
    let watched: Vec<Vec<f32>> = rows.iter().map(|r| input.tensor_features(r)).collect();
    let by_column = (0..columns.len())
        .map(|c| watched.iter().map(|w| f64::from(w[c])).collect())
        .collect();
    Ok(Reference {
        plan,
        inputs: vec![input],
        columns,
        rows,
        by_column,
    })
}

/// Verifies the packed bundle with the public key and loads it exactly as an agent does.
fn verify_as_a_device_would(
    bundle_bytes: &[u8],
    key: &SecretKey,
) -> Result<VerifiedBundle, PublishError> {
    let trusted = TrustedKeys::new([key.public().clone()]);
    let verified = bundle::verify(bundle_bytes, &trusted, &Limits::default())?;
    LoadedModel::load(&verified)?;
    Ok(verified)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::{CLASS_LABELS, MODEL_V1, MODEL_V2, REFERENCE_V1, REFERENCE_V2};
    use crate::gate::Segments;
    use crate::store::SqliteStore;
    use edgeloop_shared::bundle::DType;
    use edgeloop_shared::drift::MAX_CATEGORIES;

    const HOLDOUT_V2: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/vibration/holdout_v2.csv"
    );

    struct Registry {
        dir: tempfile::TempDir,
        store: SqliteStore,
        artifacts: ArtifactStore,
        key: SecretKey,
    }

    impl Registry {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            Registry {
                store: SqliteStore::open(&dir.path().join("db.sqlite")).unwrap(),
                artifacts: ArtifactStore::new(dir.path().join("artifacts")),
                key: crate::keys::generate().unwrap(),
                dir,
            }
        }

        async fn deltas(&self, version: u64) -> Vec<ModelDelta> {
            self.store.model_deltas("vibration", version).await.unwrap()
        }

        async fn publish(
            &self,
            version: u64,
            onnx: &[u8],
            reference: &str,
            gate: Option<QualityGate<'_>>,
        ) -> Result<ModelRow, PublishError> {
            let csv = self.dir.path().join(format!("reference-{version}.csv"));
            std::fs::write(&csv, reference).unwrap();
            publish(
                &self.store,
                &self.artifacts,
                &self.key,
                PublishRequest {
                    name: "vibration",
                    version,
                    label: None,
                    onnx,
                    reference_csv: &csv,
                    label_column: None,
                    categorical: Vec::new(),
                    regression: false,
                    class_labels: CLASS_LABELS.iter().map(|s| s.to_string()).collect(),
                    preprocess: None,
                    layout: None,
                    channel_axis: None,
                    created_ms: 1,
                    requirements: Requirements::default(),
                    drift: None,
                    lineage: None,
                    gate,
                },
            )
            .await
        }
    }

    fn gate(policy: GatePolicy) -> Option<QualityGate<'static>> {
        Some(QualityGate {
            holdout: Path::new(HOLDOUT_V2),
            policy,
            against: None,
        })
    }

    /// The compatibility suite's model of two inputs (`sensors` f32 [N,3], `counts` i64
    /// [N,2]) is published from one CSV of five columns: the manifest declares each input
    /// with its columns and its part of the preprocessing, a device loads it, and a
    /// manifest that reorders or retypes the inputs is refused at load.
    #[tokio::test]
    async fn a_model_of_two_inputs_is_published_with_each_input_declared() {
        let r = Registry::new();
        let compat = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/compat");
        let onnx = std::fs::read(compat.join("two_inputs.onnx")).unwrap();
        let preprocess = Preprocess {
            offset: vec![0.0, 0.0, 0.0, 1.0, 0.0],
            scale: vec![1.0, 1.0, 1.0, 1.0, 1.0],
        };
        publish(
            &r.store,
            &r.artifacts,
            &r.key,
            PublishRequest {
                preprocess: Some(preprocess),
                ..PublishRequest::new(
                    "vibration",
                    1,
                    &onnx,
                    &compat.join("two_inputs_reference.csv"),
                )
            },
        )
        .await
        .unwrap();
        let (_, bundle) = open_published(&r.store, &r.artifacts, &r.key, "vibration", 1)
            .await
            .unwrap();
        let inputs: Vec<String> = bundle
            .manifest
            .inputs
            .iter()
            .map(|i| {
                format!(
                    "{} {} {:?} {}",
                    i.name,
                    i.dtype.name(),
                    i.shape,
                    i.names.join(",")
                )
            })
            .collect();
        assert_eq!(
            inputs,
            [
                "sensors f32 [None, Some(3)] temperature,pressure,flow",
                "counts i64 [None, Some(2)] starts,faults"
            ]
        );
        assert_eq!(
            bundle.manifest.inputs[1]
                .preprocess
                .as_ref()
                .unwrap()
                .offset,
            [1.0, 0.0]
        );
        assert_eq!(
            bundle.manifest.outputs[0].names,
            ["class_0", "class_1", "class_2"]
        );
        let model = LoadedModel::load(&bundle).unwrap();
        assert_eq!(
            model
                .infer(&[1.0, -0.5, 2.0, 2.0, 1.0])
                .unwrap()
                .scores
                .len(),
            3
        );

        let mut swapped = bundle.clone();
        swapped.manifest.inputs.swap(0, 1);
        let err = LoadedModel::load(&swapped).unwrap_err();
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
        let mut renamed = bundle.clone();
        renamed.manifest.inputs[0].name = "measurements".into();
        let err = LoadedModel::load(&renamed).unwrap_err().to_string();
        assert!(
            err.contains("input 0 is `measurements`, the graph's `sensors`"),
            "{err}"
        );
        let mut retyped = bundle.clone();
        retyped.manifest.inputs[1].dtype = DType::F32;
        let err = LoadedModel::load(&retyped).unwrap_err().to_string();
        assert!(
            err.contains("`counts`") && err.contains("i64 in the graph but f32 in the manifest"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn models_of_every_input_type_are_published_loaded_and_checked() {
        use tract_onnx::pb::tensor_proto::DataType as Onnx;
        let r = Registry::new();
        let reference = crate::trainer::typed_reference_csv();
        let types = [
            (Onnx::Double, DType::F64),
            (Onnx::Int64, DType::I64),
            (Onnx::Int32, DType::I32),
            (Onnx::Uint8, DType::U8),
            (Onnx::Bool, DType::Bool),
        ];
        for (version, (onnx_type, dtype)) in (1..).zip(types) {
            r.publish(
                version,
                &crate::trainer::typed_classifier(onnx_type),
                &reference,
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
            let (_, bundle) = open_published(&r.store, &r.artifacts, &r.key, "vibration", version)
                .await
                .unwrap();
            assert_eq!(bundle.manifest.inputs[0].dtype, dtype);
            assert!(bundle.manifest.golden.is_some());
            // The device loads it (golden vectors through the cast) and checks each value.
            let model = LoadedModel::load(&bundle).unwrap();
            let prediction = model.infer(&[1.0, 0.0, 1.0, 1.0]).unwrap();
            assert_eq!(prediction.scores.len(), 2);
            let (bad, shown) = match dtype {
                DType::F64 => continue,
                DType::Bool => (2.0, "bool"),
                DType::U8 => (-1.0, "u8"),
                _ => (0.5, dtype.name()),
            };
            let err = model.infer(&[1.0, bad, 1.0, 1.0]).unwrap_err();
            assert!(
                matches!(&err, RuntimeError::NotRepresentable { feature, .. } if feature == "peak"),
                "{err}"
            );
            assert!(
                err.to_string()
                    .contains(&format!("input type, {shown}, cannot")),
                "{err}"
            );
        }
        // A manifest that says f32 for an i64 graph is refused at load.
        let (_, mut bundle) = open_published(&r.store, &r.artifacts, &r.key, "vibration", 2)
            .await
            .unwrap();
        bundle.manifest.inputs[0].dtype = DType::F32;
        let err = LoadedModel::load(&bundle).unwrap_err();
        assert!(
            err.to_string()
                .contains("i64 in the graph but f32 in the manifest"),
            "{err}"
        );
    }

    #[test]
    fn deltas_are_made_against_the_newest_version_and_those_devices_run() {
        assert_eq!(delta_bases(None, &[], 1), Vec::<u64>::new());
        assert_eq!(delta_bases(Some(4), &[], 5), [4]);
        assert_eq!(delta_bases(Some(4), &[4, 4, 2, 3, 2, 2, 3], 5), [4, 2, 3]);
        // Versions not below the new one (a device ahead of the registry) are no base.
        assert_eq!(delta_bases(Some(4), &[7, 5, 1], 5), [4, 1]);
        assert_eq!(
            delta_bases(Some(9), &[1, 2, 3, 4, 5, 6, 6], 10),
            [9, 6, 5, 4],
            "at most four"
        );
    }

    #[test]
    fn targets_must_name_known_architectures_and_boards_that_agree() {
        let needs = |targets: &[&str], boards: &[&str]| Requirements {
            targets: targets.iter().map(|t| t.to_string()).collect(),
            boards: boards.iter().map(|b| b.to_string()).collect(),
            ..Requirements::default()
        };
        assert!(check_targets(&needs(&[], &[])).is_ok());
        assert!(check_targets(&needs(&["x86_64", "aarch64", "arm"], &[])).is_ok());
        assert!(check_targets(&needs(&["aarch64"], &["rpi4", "jetson-orin-nano"])).is_ok());
        assert!(check_targets(&needs(&[], &["beaglebone-black"])).is_ok());
        let refused = |r: Requirements| check_targets(&r).unwrap_err().to_string();
        let e = refused(needs(&["armv7"], &[]));
        assert!(
            e.contains("`armv7` is not an architecture") && e.contains("arm"),
            "{e}"
        );
        let e = refused(needs(&[], &["rpi3"]));
        assert!(
            e.contains("board `rpi3` is not one of") && e.contains("rpi4"),
            "{e}"
        );
        let e = refused(needs(&["x86_64"], &["rpi4"]));
        assert!(e.contains("board `rpi4` is aarch64"), "{e}");
    }

    /// One output column is no classifier edgeloop can serve (its argmax is always 0):
    /// a regression value, or a binary classifier's single probability.
    #[tokio::test]
    async fn a_model_of_one_output_column_is_refused_with_the_reason() {
        let r = Registry::new();
        let err = r
            .publish(
                1,
                &crate::trainer::mlp(&[4, 8, 1], &[1, 2]),
                REFERENCE_V1,
                None,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, PublishError::OneColumn(_)), "{err}");
        assert!(err.to_string().contains("one column"), "{err}");
    }

    /// A regression (scikit-learn's, from the agent's compatibility suite) is published
    /// with its predicted values profiled and gated on its mean absolute error: a better
    /// one passes against the current version, a worse one fails naming the rule.
    #[tokio::test]
    async fn a_regression_is_profiled_by_its_predictions_and_gated_on_its_error() {
        let r = Registry::new();
        let compat = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/compat");
        let model = |name: &str| std::fs::read(compat.join(format!("{name}.onnx"))).unwrap();
        let (forest, linear, boosting) = (
            model("forest_regressor"),
            model("linear_regression"),
            model("boosting_regressor"),
        );
        let reference = compat.join("regression_reference.csv");
        let holdout = compat.join("regression_holdout.csv");
        fn gated<'a>(
            version: u64,
            onnx: &'a [u8],
            reference: &'a Path,
            holdout: &'a Path,
        ) -> PublishRequest<'a> {
            PublishRequest {
                regression: true,
                class_labels: vec!["hours_left".into()],
                gate: Some(QualityGate {
                    holdout,
                    policy: GatePolicy::default(),
                    against: None,
                }),
                ..PublishRequest::new("life", version, onnx, reference)
            }
        }
        let v1 = publish(
            &r.store,
            &r.artifacts,
            &r.key,
            gated(1, &forest, &reference, &holdout),
        )
        .await
        .unwrap();
        let lineage = v1.lineage.unwrap();
        assert!(lineage.metrics["mae"] > 1.0, "{lineage:?}");
        assert!(
            lineage.gates["quality"].starts_with("passed: mae"),
            "{lineage:?}"
        );
        let (_, bundle) = open_published(&r.store, &r.artifacts, &r.key, "life", 1)
            .await
            .unwrap();
        let m = &bundle.manifest;
        assert!(m.is_regression());
        assert_eq!(m.outputs.len(), 1);
        assert_eq!(m.outputs[0].names, ["hours_left"]);
        let predicted = m.reference.predicted_value.as_ref().unwrap();
        assert_eq!(predicted.count, 300);
        assert!((30.0..50.0).contains(&predicted.mean), "{predicted:?}");
        assert!(m.reference.predictions.is_empty());
        assert!(m.golden.as_ref().unwrap().vectors[0].output.len() == 1);

        // The linear model's error is a tenth of the forest's: it passes against v1.
        let v2 = publish(
            &r.store,
            &r.artifacts,
            &r.key,
            gated(2, &linear, &reference, &holdout),
        )
        .await
        .unwrap();
        let metrics = v2.lineage.unwrap().metrics;
        assert!(
            metrics["mae"] < 0.5 && metrics["mae/baseline"] > 1.0,
            "{metrics:?}"
        );
        // Boosted trees against the linear model: ten times its error, refused.
        let err = publish(
            &r.store,
            &r.artifacts,
            &r.key,
            gated(3, &boosting, &reference, &holdout),
        )
        .await
        .unwrap_err();
        let PublishError::GateFailed(report) = &err else {
            panic!("{err}");
        };
        assert!(
            report.failures[0].contains("above the current model's"),
            "{:?}",
            report.failures
        );
        // A classifier's metric does not judge a regression; two columns are no regression.
        let mut f1 = gated(3, &linear, &reference, &holdout);
        f1.gate.as_mut().unwrap().policy.metric = Some(crate::gate::Metric::F1);
        let err = publish(&r.store, &r.artifacts, &r.key, f1)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("metric f1 judges classifiers"),
            "{err}"
        );
        let classifier = crate::trainer::mlp(&[4, 8, 2], &[1, 2]);
        let two_columns = PublishRequest {
            gate: None,
            ..gated(3, &classifier, &reference, &holdout)
        };
        let err = publish(&r.store, &r.artifacts, &r.key, two_columns)
            .await
            .unwrap_err();
        assert!(
            matches!(err, PublishError::RegressionWidth { columns: 2, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_model_with_a_retrained_head_gets_a_delta_against_the_previous_version() {
        let r = Registry::new();
        let dims = [4, 256, 256, 2];
        let v1 = r
            .publish(
                1,
                &crate::trainer::mlp(&dims, &[1, 2, 3]),
                REFERENCE_V1,
                None,
            )
            .await
            .unwrap();
        assert!(r.deltas(1).await.is_empty());
        let head_retrained = crate::trainer::mlp(&dims, &[1, 2, 4]);
        let v2 = r
            .publish(2, &head_retrained, REFERENCE_V1, None)
            .await
            .unwrap();
        let deltas = r.deltas(2).await;
        assert_eq!(deltas.len(), 1);
        let delta = &deltas[0];
        assert_eq!(delta.base_version, 1);
        assert!(
            delta.bundle_size * 10 < v2.bundle_size,
            "delta {} vs full {}",
            delta.bundle_size,
            v2.bundle_size
        );
        // The stored delta is the full bundle's manifest and model, against v1's model.
        let (_, base) = open_published(&r.store, &r.artifacts, &r.key, "vibration", 1)
            .await
            .unwrap();
        assert_eq!(delta.base_sha256, base.manifest.artifact.raw_sha256);
        let bytes = std::fs::read(r.artifacts.path("vibration", 2, &delta.bundle_sha256)).unwrap();
        assert_eq!(sha256_hex(&bytes), delta.bundle_sha256);
        let trusted = TrustedKeys::new([r.key.public().clone()]);
        let verified =
            bundle::verify_delta(&bytes, &trusted, &Limits::default(), Some(&base.model)).unwrap();
        assert_eq!(verified.model, head_retrained);
        let (_, full) = open_published(&r.store, &r.artifacts, &r.key, "vibration", 2)
            .await
            .unwrap();
        let mut expected = full.manifest.clone();
        expected.artifact = verified.manifest.artifact.clone();
        assert_eq!(verified.manifest, expected);
        assert_eq!(v1.version, 1);

        // A model retrained through and through: the delta would not pay, none is kept.
        r.publish(
            3,
            &crate::trainer::mlp(&dims, &[5, 6, 7]),
            REFERENCE_V1,
            None,
        )
        .await
        .unwrap();
        assert!(r.deltas(3).await.is_empty());
    }

    #[tokio::test]
    async fn a_retrained_model_passes_the_gate_and_carries_the_result_in_its_lineage() {
        let r = Registry::new();
        // The first version has nothing to compare with: judged on its own.
        let v1 = r
            .publish(1, MODEL_V1, REFERENCE_V1, gate(GatePolicy::default()))
            .await
            .unwrap();
        assert!(v1.lineage.unwrap().gates["quality"].starts_with("passed"));
        let v2 = r
            .publish(2, MODEL_V2, REFERENCE_V2, gate(GatePolicy::default()))
            .await
            .unwrap();
        let lineage = v2.lineage.unwrap();
        assert_eq!(lineage.parent_version, Some(1));
        assert!(
            lineage.metrics["accuracy"] > lineage.metrics["accuracy/baseline"] + 0.1,
            "v2 was trained on the shifted regime the holdout comes from: {lineage:?}"
        );
        assert!(
            lineage.gates["quality"].starts_with("passed"),
            "{lineage:?}"
        );
        // What the registry stores is what the bundle was signed with.
        let (_, verified) = open_published(&r.store, &r.artifacts, &r.key, "vibration", 2)
            .await
            .unwrap();
        assert_eq!(verified.manifest.lineage, Some(lineage));
        // The classes the model predicts on its reference data are the reference for
        // prediction drift: both classes occur in the example's reference data.
        let predictions = &verified.manifest.reference.predictions;
        assert_eq!(predictions.len(), CLASS_LABELS.len());
        assert!((predictions.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(predictions.iter().all(|&p| p > 0.0), "{predictions:?}");
    }

    #[tokio::test]
    async fn a_worse_candidate_fails_the_gate_and_nothing_is_published() {
        let r = Registry::new();
        r.publish(1, MODEL_V2, REFERENCE_V2, None).await.unwrap();
        // v1's network, trained on the old regime, as a candidate on the new one.
        let err = r
            .publish(2, MODEL_V1, REFERENCE_V1, gate(GatePolicy::default()))
            .await
            .unwrap_err();
        let PublishError::GateFailed(report) = &err else {
            panic!("{err}");
        };
        assert!(!report.passed);
        assert!(
            report.failures[0].contains("below the current model's"),
            "{:?}",
            report.failures
        );
        assert!(
            err.to_string().starts_with("quality gate failed: accuracy"),
            "{err}"
        );
        assert_eq!(
            r.store.models().await.unwrap().len(),
            1,
            "nothing published"
        );
        let stored = std::fs::read_dir(r.dir.path().join("artifacts/vibration")).unwrap();
        assert_eq!(stored.count(), 1, "no artifact written");
    }

    #[tokio::test]
    async fn a_candidate_much_worse_on_one_segment_fails_the_parity_bound() {
        let r = Registry::new();
        // The old-regime model on the new regime: good enough where the shift is small
        // (cool machines), poorer where it is large; cut by temperature, the hotter quarters
        // break a parity bound of 95 % of the overall accuracy.
        let policy = GatePolicy {
            tolerance: 1.0,
            parity: 0.95,
            segments: Some(Segments::Buckets {
                feature: "temperature".into(),
                buckets: 4,
            }),
            ..GatePolicy::default()
        };
        let err = r
            .publish(1, MODEL_V1, REFERENCE_V1, gate(policy.clone()))
            .await
            .unwrap_err();
        let PublishError::GateFailed(report) = &err else {
            panic!("{err}");
        };
        assert!(report.current.is_none());
        assert_eq!(report.candidate.segments.len(), 4, "{report:?}");
        assert!(
            report
                .failures
                .iter()
                .all(|f| f.starts_with("segment temperature[q")),
            "{:?}",
            report.failures
        );
        // The model trained on this regime keeps parity.
        r.publish(1, MODEL_V2, REFERENCE_V2, gate(policy))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_feature_named_categorical_is_profiled_by_category() {
        let r = Registry::new();
        // The example's reference with the temperature rounded to whole degrees: a few
        // dozen categories.
        let mut lines = REFERENCE_V1.lines();
        let mut csv = format!("{}\n", lines.next().unwrap());
        for line in lines {
            let mut cells: Vec<String> = line.split(',').map(str::to_string).collect();
            cells[3] = format!("{}", cells[3].parse::<f64>().unwrap().round());
            csv.push_str(&cells.join(","));
            csv.push('\n');
        }
        let path = r.dir.path().join("rounded.csv");
        std::fs::write(&path, &csv).unwrap();
        let request = |version, categorical: &[&str]| PublishRequest {
            name: "vibration",
            version,
            label: None,
            onnx: MODEL_V1,
            reference_csv: &path,
            label_column: None,
            categorical: categorical.iter().map(|s| s.to_string()).collect(),
            regression: false,
            class_labels: Vec::new(),
            preprocess: None,
            layout: None,
            channel_axis: None,
            created_ms: 1,
            requirements: Requirements::default(),
            drift: None,
            lineage: None,
            gate: None,
        };
        publish(&r.store, &r.artifacts, &r.key, request(1, &["temperature"]))
            .await
            .unwrap();
        let (_, verified) = open_published(&r.store, &r.artifacts, &r.key, "vibration", 1)
            .await
            .unwrap();
        let features = &verified.manifest.reference.features;
        let temperature = &features[3];
        assert!(temperature.categorical && !temperature.has_sketch());
        assert!(temperature.edges.iter().all(|c| c.fract() == 0.0));
        assert!((10..=MAX_CATEGORIES).contains(&temperature.edges.len()));
        assert!(
            features[..3]
                .iter()
                .all(|f| !f.categorical && f.has_sketch())
        );
        // A name that is no feature, and a feature with too many values, are refused.
        for (names, expected) in [(&["site"][..], "`site`"), (&["rms"][..], "at most")] {
            let err = publish(&r.store, &r.artifacts, &r.key, request(2, names))
                .await
                .unwrap_err();
            assert!(err.to_string().contains(expected), "{err}");
        }
    }

    #[tokio::test]
    async fn a_bad_holdout_is_refused_with_the_row_and_column() {
        let r = Registry::new();
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "rms,peak,kurtosis,label\n1,2,3,0\n",
                "no column `temperature`",
            ),
            (
                "rms,peak,kurtosis,temperature,label\n1,2,3,40,0\n1,2,NaN,40,1\n",
                "row 3: `kurtosis` is `NaN`",
            ),
            (
                "rms,peak,kurtosis,temperature,label\n1,2,3,40,fault\n",
                "label `fault` is not a class index",
            ),
            (
                "rms,peak,kurtosis,temperature,label\n1,2,3,40,7\n",
                "label 7 is not one of the model's 2 classes",
            ),
            (
                "rms,peak,kurtosis,temperature,label\n",
                "the holdout has no rows",
            ),
        ];
        for (i, (csv, expected)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("h{i}.csv"));
            std::fs::write(&path, csv).unwrap();
            let err = r
                .publish(
                    1,
                    MODEL_V1,
                    REFERENCE_V1,
                    Some(QualityGate {
                        holdout: &path,
                        policy: GatePolicy::default(),
                        against: None,
                    }),
                )
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{err} should say {expected}");
        }
        let err = r
            .publish(
                1,
                MODEL_V1,
                REFERENCE_V1,
                Some(QualityGate {
                    holdout: Path::new(HOLDOUT_V2),
                    policy: GatePolicy::default(),
                    against: Some(9),
                }),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, PublishError::NoBaseline { version: 9, .. }),
            "{err}"
        );
    }

    /// Devices that report rms and peak in milli-g and temperature in °F serve a model
    /// trained in g and °C through the manifest's preprocessing: the reference profile and
    /// golden vectors are in the devices' units, and the device's predictions on its units
    /// are the model's on the model's units.
    #[tokio::test]
    async fn preprocessing_lets_devices_send_their_own_units() {
        let r = Registry::new();
        // x' = (x - offset) * scale: mg → g, °F → °C.
        let preprocess = Preprocess {
            offset: vec![0.0, 0.0, 0.0, 32.0],
            scale: vec![1e-3, 1e-3, 1.0, 5.0 / 9.0],
        };
        let to_device = |row: &[f32]| -> Vec<f32> {
            vec![
                row[0] * 1e3,
                row[1] * 1e3,
                row[2],
                row[3] * 9.0 / 5.0 + 32.0,
            ]
        };
        let mut lines = REFERENCE_V1.lines();
        let mut csv = format!("{}\n", lines.next().unwrap());
        let model_rows: Vec<Vec<f32>> = lines
            .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
            .collect();
        for row in &model_rows {
            let device = to_device(row);
            let cells: Vec<String> = device.iter().map(|v| v.to_string()).collect();
            csv.push_str(&format!("{}\n", cells.join(",")));
        }
        let path = r.dir.path().join("device-units.csv");
        std::fs::write(&path, &csv).unwrap();
        let request = |preprocess: Option<Preprocess>| PublishRequest {
            class_labels: CLASS_LABELS.iter().map(|s| s.to_string()).collect(),
            preprocess,
            ..PublishRequest::new("vibration", 1, MODEL_V1, &path)
        };

        // A mismatched preprocessing is refused before anything is signed.
        let short = Preprocess {
            offset: vec![0.0; 3],
            scale: vec![1.0; 3],
        };
        let err = publish(&r.store, &r.artifacts, &r.key, request(Some(short)))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 values for 4 features"), "{err}");

        publish(
            &r.store,
            &r.artifacts,
            &r.key,
            request(Some(preprocess.clone())),
        )
        .await
        .unwrap();
        let (_, bundle) = open_published(&r.store, &r.artifacts, &r.key, "vibration", 1)
            .await
            .unwrap();
        let manifest = &bundle.manifest;
        assert_eq!(manifest.inputs[0].preprocess.as_ref(), Some(&preprocess));
        // The profile is in the devices' units: around 113 °F, 1000 mg.
        let temperature = &manifest.reference.features[3];
        assert!(
            (100.0..130.0).contains(&temperature.mean),
            "{}",
            temperature.mean
        );
        assert!(manifest.reference.features[0].mean > 500.0);

        let device = LoadedModel::load(&bundle).unwrap();
        let bare = Plan::compile(MODEL_V1, 4).unwrap();
        let names: Vec<String> = manifest
            .reference
            .feature_names()
            .map(str::to_string)
            .collect();
        for row in model_rows.iter().take(200) {
            let expected = bare.infer(row, &names).unwrap();
            let got = device.infer(&to_device(row)).unwrap();
            assert_eq!(got.class, expected.class, "{row:?}");
            for (g, e) in got.scores.iter().zip(&expected.scores) {
                assert!((g - e).abs() < 1e-3, "{got:?} vs {expected:?}");
            }
        }
        // Without it, the same numbers mean something else to the model.
        let raw = Plan::compile(MODEL_V1, 4).unwrap();
        let faults = model_rows
            .iter()
            .take(200)
            .filter(|row| raw.infer(&to_device(row), &names).unwrap().class == 1)
            .count();
        assert!(
            faults > 150,
            "{faults} of 200 read as faults without preprocessing"
        );
    }

    /// A scikit-learn export published without `--labels` names its classes as the graph
    /// does; explicit labels still win.
    #[tokio::test]
    async fn classes_are_named_by_the_graph_unless_the_publisher_names_them() {
        let r = Registry::new();
        let compat = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/compat");
        let onnx = std::fs::read(compat.join("random_forest.onnx")).unwrap();
        let fixture: serde_json::Value =
            serde_json::from_slice(&std::fs::read(compat.join("random_forest.json")).unwrap())
                .unwrap();
        let values: Vec<f64> = fixture["inputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let mut csv = String::from("f0,f1,f2,f3\n");
        for row in values.chunks(4) {
            let cells: Vec<String> = row.iter().map(|v| v.to_string()).collect();
            csv.push_str(&format!("{}\n", cells.join(",")));
        }
        let path = r.dir.path().join("forest.csv");
        std::fs::write(&path, csv).unwrap();
        let classes = fixture["outputs"][1]["shape"][1].as_u64().unwrap() as usize;

        let request = PublishRequest::new("forest", 1, &onnx, &path);
        publish(&r.store, &r.artifacts, &r.key, request)
            .await
            .unwrap();
        let (_, bundle) = open_published(&r.store, &r.artifacts, &r.key, "forest", 1)
            .await
            .unwrap();
        let expected: Vec<String> = (0..classes).map(|c| c.to_string()).collect();
        assert_eq!(bundle.manifest.served_output().names, expected);

        let named: Vec<String> = (0..classes).map(|c| format!("grade-{c}")).collect();
        let request = PublishRequest {
            class_labels: named.clone(),
            ..PublishRequest::new("forest", 2, &onnx, &path)
        };
        publish(&r.store, &r.artifacts, &r.key, request)
            .await
            .unwrap();
        let (_, bundle) = open_published(&r.store, &r.artifacts, &r.key, "forest", 2)
            .await
            .unwrap();
        assert_eq!(bundle.manifest.served_output().names, named);
    }

    /// A sequence model (`[batch, 20, 6]`, the compatibility suite's LSTM) is published from
    /// an NPY array of reference sequences: watched on each of its 6 features' mean and
    /// deviation over time, with golden vectors a device reproduces. What a tensor model
    /// cannot be published with is refused, saying why.
    #[tokio::test]
    async fn a_sequence_model_is_published_from_an_npy_reference() {
        let r = Registry::new();
        let compat = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/compat");
        let onnx = std::fs::read(compat.join("lstm.onnx")).unwrap();
        let fixture: serde_json::Value =
            serde_json::from_slice(&std::fs::read(compat.join("lstm.json")).unwrap()).unwrap();
        let sequences: Vec<f32> = fixture["inputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let mut reference = Vec::new();
        for n in 0..30 {
            let shift = n as f32 * 0.01;
            reference.extend(sequences[(n % 4) * 120..][..120].iter().map(|x| x + shift));
        }
        let npy = r.dir.path().join("sequences.npy");
        std::fs::write(
            &npy,
            edgeloop_shared::npy::f32_array(&[30, 20, 6], &reference),
        )
        .unwrap();

        let request = PublishRequest::new("sequence", 1, &onnx, &npy);
        publish(&r.store, &r.artifacts, &r.key, request)
            .await
            .unwrap();
        let (_, bundle) = open_published(&r.store, &r.artifacts, &r.key, "sequence", 1)
            .await
            .unwrap();
        let m = &bundle.manifest;
        assert_eq!(m.inputs[0].shape, [None, Some(20), Some(6)]);
        assert_eq!(m.inputs[0].channel_axis, Some(2));
        let names: Vec<&str> = m.reference.feature_names().collect();
        assert_eq!(names.len(), 12);
        assert_eq!(names[..3], ["c0.mean", "c0.std", "c1.mean"]);
        let golden = m.golden.as_ref().unwrap();
        assert_eq!(golden.vectors.len(), GOLDEN_VECTORS);
        assert_eq!(golden.vectors[0].input.len(), 120);
        assert_eq!(m.served_output().names, ["class_0", "class_1", "class_2"]);
        let device = LoadedModel::load(&bundle).unwrap();
        assert!(device.is_tensor());
        assert_eq!(device.drift_row(&reference[..120]).len(), 12);

        // Wrongly shaped, a table, a label column or a gate: refused with the reason.
        let refused = async |request: PublishRequest<'_>| -> String {
            publish(&r.store, &r.artifacts, &r.key, request)
                .await
                .unwrap_err()
                .to_string()
        };
        std::fs::write(
            &npy,
            edgeloop_shared::npy::f32_array(&[30, 20, 5], &reference[..3000]),
        )
        .unwrap();
        let err = refused(PublishRequest::new("sequence", 2, &onnx, &npy)).await;
        assert!(
            err.contains("[30, 20, 5]") || err.contains("[20, 5]"),
            "{err}"
        );
        std::fs::write(&npy, edgeloop_shared::npy::f32_array(&[600, 6], &reference)).unwrap();
        let err = refused(PublishRequest::new("sequence", 2, &onnx, &npy)).await;
        assert!(err.contains("tensor inputs"), "{err}");
        std::fs::write(
            &npy,
            edgeloop_shared::npy::f32_array(&[30, 20, 6], &reference),
        )
        .unwrap();
        let err = refused(PublishRequest {
            label_column: Some("label"),
            ..PublishRequest::new("sequence", 2, &onnx, &npy)
        })
        .await;
        assert!(err.contains("no columns"), "{err}");
        let err = refused(PublishRequest {
            channel_axis: Some(3),
            ..PublishRequest::new("sequence", 2, &onnx, &npy)
        })
        .await;
        assert!(err.contains("channel axis 3"), "{err}");
        let err = refused(PublishRequest {
            channel_axis: Some(2),
            layout: Some(edgeloop_shared::bundle::RowLayout::ChannelsLast),
            ..PublishRequest::new("sequence", 2, &onnx, &npy)
        })
        .await;
        assert!(err.contains("channels come first"), "{err}");

        // Gated on an NPY holdout of labelled sequences (the devices' sample format): the
        // labels are v1's own answers, so v2, the same model, matches it.
        let labels: Vec<f64> = reference
            .chunks(120)
            .map(|x| device.infer(x).unwrap().class as f64)
            .collect();
        let write_holdout = |shape: &[usize], labels: &[f64]| {
            let width: usize = shape.iter().product();
            let records = reference.chunks(width).zip(labels).map(|(x, &l)| {
                edgeloop_shared::npy::SampleRecord {
                    x,
                    predicted: None,
                    label: Some(l).filter(|l| !l.is_nan()),
                }
            });
            let path = r.dir.path().join("holdout.npy");
            std::fs::write(
                &path,
                edgeloop_shared::npy::write_sample(shape, records).unwrap(),
            )
            .unwrap();
            path
        };
        let holdout = write_holdout(&[20, 6], &labels);
        fn gated<'a>(
            onnx: &'a [u8],
            npy: &'a Path,
            holdout: &'a Path,
            policy: GatePolicy,
        ) -> PublishRequest<'a> {
            PublishRequest {
                gate: Some(QualityGate {
                    holdout,
                    policy,
                    against: None,
                }),
                ..PublishRequest::new("sequence", 2, onnx, npy)
            }
        }
        let err = refused(gated(
            &onnx,
            &npy,
            Path::new(HOLDOUT_V2),
            GatePolicy::default(),
        ))
        .await;
        assert!(
            err.contains("not an NPY file") && err.contains("records `x`"),
            "{err}"
        );
        let err = refused(gated(
            &onnx,
            &npy,
            &write_holdout(&[10, 12], &labels),
            GatePolicy::default(),
        ))
        .await;
        assert!(err.contains("its inputs are of shape [10, 12]"), "{err}");
        let mut unlabelled = labels.clone();
        unlabelled[3] = f64::NAN;
        let err = refused(gated(
            &onnx,
            &npy,
            &write_holdout(&[20, 6], &unlabelled),
            GatePolicy::default(),
        ))
        .await;
        assert!(err.contains("record 3: has no label"), "{err}");
        let segmented = GatePolicy {
            segments: Some(crate::gate::Segments::Column("site".into())),
            ..GatePolicy::default()
        };
        let err = refused(gated(&onnx, &npy, &holdout, segmented)).await;
        assert!(err.contains("no columns to segment by"), "{err}");
        let holdout = write_holdout(&[20, 6], &labels);
        publish(
            &r.store,
            &r.artifacts,
            &r.key,
            gated(&onnx, &npy, &holdout, GatePolicy::default()),
        )
        .await
        .unwrap();
        let (_, v2) = open_published(&r.store, &r.artifacts, &r.key, "sequence", 2)
            .await
            .unwrap();
        let gate = &v2.manifest.lineage.as_ref().unwrap().gates["quality"];
        assert!(
            gate.starts_with("passed: accuracy 1.0000 against 1.0000"),
            "{gate}"
        );
    }
}
