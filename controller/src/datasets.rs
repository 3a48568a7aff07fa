//! Dataset versions made of the devices' input samples.
//!
//! The controller asks a set of devices for their samples (a signed `upload_samples`
//! command, sent by the [`crate::rollout::Dispatcher`] while a device is online and has not
//! answered); each device sends its sample (CSV, or NPY for a tensor model) in chunks on
//! its samples channel; ingest puts each device's file together and checks its size and
//! SHA-256. The dataset is the merge of its complete parts, with a digest of its own, for a
//! trainer to fetch.

use edgeloop_agent::now_ms;
use edgeloop_shared::protocol::SampleFormat;
use edgeloop_shared::sha256_hex;
use tracing::info;

use crate::rollout::{RolloutError, Target, select_devices};
use crate::store::{DatasetRow, NewDataset, Store, StoreError, merge_parts, record_audit_now};

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error(transparent)]
    Select(#[from] RolloutError),
    #[error("device {0} is not known")]
    UnknownDevice(String),
    #[error("no device of the selection runs model {0}")]
    NoneRun(String),
    #[error("max_rows must be at least 1")]
    NoRows,
    #[error("dataset {0}: {1}")]
    Merge(u64, String),
    #[error("dataset {0} has no complete part from device {1}")]
    Incomplete(u64, String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Which devices to ask for their samples.
#[derive(Debug, Clone, Default)]
pub struct DatasetRequest {
    /// Only devices that run this model (unless devices are listed by name); recorded with
    /// the dataset.
    pub model: Option<String>,
    /// These devices, or those matching `target`, or every known device.
    pub devices: Option<Vec<String>>,
    pub target: Option<Target>,
    /// At most this many rows per device.
    pub max_rows: Option<u64>,
    /// Who asks, and why, for the audit log.
    pub actor: String,
    pub reason: Option<String>,
}

/// Records a dataset request; the dispatcher sends the commands.
pub async fn request(
    store: &dyn Store,
    request: DatasetRequest,
) -> Result<DatasetRow, DatasetError> {
    if request.max_rows == Some(0) {
        return Err(DatasetError::NoRows);
    }
    let listed = request.devices.is_some();
    if let Some(devices) = &request.devices {
        for d in devices {
            if !store.device_exists(d).await? {
                return Err(DatasetError::UnknownDevice(d.clone()));
            }
        }
    }
    let mut devices = select_devices(store, request.devices, request.target).await?;
    if let (Some(model), false) = (&request.model, listed) {
        let running: std::collections::HashSet<String> = store
            .devices()
            .await?
            .into_iter()
            .filter(|d| d.model_name.as_deref() == Some(model.as_str()))
            .map(|d| d.id)
            .collect();
        devices.retain(|d| running.contains(d));
        if devices.is_empty() {
            return Err(DatasetError::NoneRun(model.clone()));
        }
    }
    let row = store
        .create_dataset(&NewDataset {
            model_name: request.model,
            devices,
            created_by: request.actor.clone(),
            reason: request.reason.clone(),
            max_rows: request.max_rows,
            now_ms: now_ms(),
        })
        .await?;
    record_audit_now(
        store,
        &request.actor,
        "dataset.request",
        format!("dataset/{}", row.id),
        Some(format!(
            "samples of {} devices{}{}",
            row.parts.len(),
            row.model_name
                .as_deref()
                .map(|m| format!(" running {m}"))
                .unwrap_or_default(),
            request.reason.map(|r| format!(": {r}")).unwrap_or_default()
        )),
    )
    .await;
    info!(
        dataset = row.id,
        devices = row.parts.len(),
        "dataset requested"
    );
    Ok(row)
}

/// A dataset's file: its complete parts merged, and the merge's SHA-256.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetFile {
    pub row: DatasetRow,
    /// CSV for a table model's samples, NPY for a tensor model's.
    pub format: SampleFormat,
    pub bytes: Vec<u8>,
    pub sha256: String,
    /// Devices whose part is in it.
    pub devices: Vec<String>,
}

/// The dataset's file as it stands: the parts complete so far, or exactly the parts of
/// `only` (which must all be complete; a complete part never changes, so that file never
/// does either). `None`: no such dataset.
pub async fn file(
    store: &dyn Store,
    id: u64,
    only: Option<&[String]>,
) -> Result<Option<DatasetFile>, DatasetError> {
    let Some(row) = store.dataset(id).await? else {
        return Ok(None);
    };
    let mut parts = store.dataset_files(id).await?;
    if let Some(only) = only {
        if let Some(missing) = only.iter().find(|d| !parts.iter().any(|(p, _)| p == *d)) {
            return Err(DatasetError::Incomplete(id, missing.clone()));
        }
        parts.retain(|(d, _)| only.contains(d));
    }
    let bytes = merge_parts(&parts).map_err(|e| DatasetError::Merge(id, e))?;
    Ok(Some(DatasetFile {
        row,
        format: SampleFormat::of(&bytes),
        sha256: sha256_hex(&bytes),
        bytes,
        devices: parts.into_iter().map(|(d, _)| d).collect(),
    }))
}
