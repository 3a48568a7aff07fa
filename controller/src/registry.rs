//! The model registry: publishing a model checks it with tract, computes its reference
//! profile, signs the bundle and stores it in the artifact store and the database.

use std::path::{Path, PathBuf};

use edgeloop_agent::runtime::{LoadedModel, Plan, RuntimeError, inspect_onnx};
use edgeloop_agent::slots::write_atomic;
use edgeloop_agent::source::{SourceError, read_numeric_csv};
use edgeloop_shared::bundle::{
    self, BundleError, Golden, GoldenVector, Limits, Lineage, Manifest, Requirements,
};
use edgeloop_shared::drift::DriftError;
use edgeloop_shared::signing::{SecretKey, TrustedKeys};
use edgeloop_shared::{is_valid_identifier, sha256_hex};

use crate::store::{ModelRow, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("model name `{0}` must be 1-64 characters of [A-Za-z0-9_.-]")]
    BadName(String),
    #[error("model version must be at least 1")]
    BadVersion,
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
    #[error("bundle: {0}")]
    Bundle(#[from] BundleError),
    #[error("cannot write the artifact: {0}")]
    Artifact(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What to publish.
#[derive(Debug, Clone)]
pub struct PublishRequest<'a> {
    pub name: &'a str,
    pub version: u64,
    pub label: Option<String>,
    pub onnx: &'a [u8],
    /// Reference data: a CSV file with a header; its columns are the model's features.
    pub reference_csv: &'a Path,
    /// A column of the reference data to leave out (for example the label).
    pub label_column: Option<&'a str>,
    /// Class labels, in output order; `class_0`, `class_1`, … when empty.
    pub class_labels: Vec<String>,
    pub created_ms: u64,
    /// What a device must satisfy before it activates the model.
    pub requirements: Requirements,
    pub lineage: Option<Lineage>,
}

/// Reference rows turned into golden vectors at publish.
const GOLDEN_VECTORS: usize = 8;
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

    /// The URL path devices download the bundle from.
    pub fn url_path(name: &str, version: u64) -> String {
        format!("/artifacts/{name}/{version}")
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
    if let Some(newest) = store
        .models()
        .await?
        .iter()
        .filter(|m| m.name == name)
        .map(|m| m.version)
        .max()
        && newest >= request.version
    {
        return Err(PublishError::NotNewer {
            name: name.to_string(),
            version: request.version,
            newest,
        });
    }

    let bundle_bytes = build_bundle(key, &request)?;
    let manifest = verify_as_a_device_would(&bundle_bytes, key)?;

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
    };
    if let Err(e) = store.insert_model(&row).await {
        let _ = std::fs::remove_file(&path);
        return Err(e.into());
    }
    Ok(row)
}

/// Reads the reference data, checks the model against it and packs the signed bundle.
fn build_bundle(key: &SecretKey, request: &PublishRequest<'_>) -> Result<Vec<u8>, PublishError> {
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
    let signature = inspect_onnx(request.onnx)?;
    let plan = Plan::compile(request.onnx, columns.len())?;
    // Every reference row must run: a model that fails on its own reference data would
    // fail on devices too. The first few, with their outputs, become the golden vectors.
    let mut golden = Vec::new();
    for row in rows.iter().filter(|r| r.iter().all(|v| v.is_finite())) {
        let scores = plan.infer(row, &columns)?.scores;
        if golden.len() < GOLDEN_VECTORS {
            golden.push(GoldenVector {
                input: row.iter().map(|v| f64::from(*v)).collect(),
                output: scores.iter().map(|v| f64::from(*v)).collect(),
            });
        }
    }
    let classes = plan.classes();
    let labels = if request.class_labels.is_empty() {
        (0..classes).map(|i| format!("class_{i}")).collect()
    } else if request.class_labels.len() == classes {
        request.class_labels.clone()
    } else {
        return Err(PublishError::Labels {
            classes,
            labels: request.class_labels.len(),
        });
    };
    let by_column: Vec<Vec<f64>> = (0..columns.len())
        .map(|c| rows.iter().map(|r| f64::from(r[c])).collect())
        .collect();
    let mut manifest = Manifest::classifier(
        request.name,
        request.version,
        &columns,
        &by_column,
        classes as u64,
    )?;
    manifest.label = request.label.clone();
    manifest.created_ms = request.created_ms;
    manifest.inputs[0].name = signature.input_name;
    manifest.outputs[0].name = signature.output_name;
    manifest.outputs[0].names = labels;
    manifest.golden = Some(Golden {
        tolerance: GOLDEN_TOLERANCE,
        vectors: golden,
    });
    manifest.requirements = request.requirements.clone();
    manifest.lineage = request.lineage.clone();
    Ok(bundle::pack(manifest, request.onnx, key)?)
}

/// Verifies the packed bundle with the public key and loads it exactly as an agent does.
fn verify_as_a_device_would(
    bundle_bytes: &[u8],
    key: &SecretKey,
) -> Result<Manifest, PublishError> {
    let trusted = TrustedKeys::new([key.public().clone()]);
    let verified = bundle::verify(bundle_bytes, &trusted, &Limits::default())?;
    LoadedModel::load(&verified)?;
    Ok(verified.manifest)
}
