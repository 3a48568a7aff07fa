//! A/B model slots on disk.
//!
//! ```text
//! {state_dir}/slots/a/bundle.elb
//! {state_dir}/slots/a/model.onnx    only beside a delta bundle: the model it expanded to
//! {state_dir}/slots/b/bundle.elb
//! {state_dir}/slots/active          "a" or "b"
//! {state_dir}/slots/highest.json    {"vibration": 7, …}: the highest version of each
//!                                   model ever made active, for anti-rollback
//! ```
//!
//! A delta bundle can only be decompressed against its base, which the next install may
//! overwrite, so its slot also keeps the model; the bundle's signed digest covers it.
//!
//! A new bundle is written to the slot that is not active (temporary file, fsync, rename,
//! directory fsync), checked, and only then made active by replacing the `active` pointer
//! the same way. A crash at any point leaves the pointer on a complete bundle.

use edgeloop_shared::protocol::ModelRef;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct SlotError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Slots {
    dir: PathBuf,
}

const BUNDLE_FILE: &str = "bundle.elb";
const MODEL_FILE: &str = "model.onnx";
const ACTIVE_FILE: &str = "active";
const HIGHEST_FILE: &str = "highest.json";

impl Slots {
    pub fn open(state_dir: &Path) -> Result<Self, SlotError> {
        let dir = state_dir.join("slots");
        for slot in [Slot::A, Slot::B] {
            let path = dir.join(slot.name());
            fs::create_dir_all(&path).map_err(|source| SlotError {
                action: "create",
                path,
                source,
            })?;
        }
        Ok(Slots { dir })
    }

    fn bundle_path(&self, slot: Slot) -> PathBuf {
        self.dir.join(slot.name()).join(BUNDLE_FILE)
    }

    /// The slot the pointer names, if any. An unreadable or garbled pointer reads as none.
    pub fn active(&self) -> Option<Slot> {
        match fs::read_to_string(self.dir.join(ACTIVE_FILE)).ok()?.trim() {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }

    pub fn read(&self, slot: Slot) -> Result<Vec<u8>, SlotError> {
        let path = self.bundle_path(slot);
        fs::read(&path).map_err(|source| SlotError {
            action: "read",
            path,
            source,
        })
    }

    /// The model kept beside the slot's bundle, if there is one.
    pub fn read_model(&self, slot: Slot) -> Result<Option<Vec<u8>>, SlotError> {
        let path = self.dir.join(slot.name()).join(MODEL_FILE);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SlotError {
                action: "read",
                path,
                source,
            }),
        }
    }

    /// Writes `bundle` durably into `slot`, replacing what was there, with the model it
    /// expands to when it is a delta bundle. The model goes first: until the bundle that
    /// names it is in place, it is a stray file that nothing reads.
    pub fn write(&self, slot: Slot, bundle: &[u8], model: Option<&[u8]>) -> Result<(), SlotError> {
        let model_path = self.dir.join(slot.name()).join(MODEL_FILE);
        if let Some(model) = model {
            write_atomic(&model_path, model)?;
        }
        write_atomic(&self.bundle_path(slot), bundle)?;
        if model.is_none() {
            match fs::remove_file(&model_path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(SlotError {
                        action: "remove",
                        path: model_path,
                        source: e,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Makes `slot`, which holds `model`, the active one, atomically and durably. The
    /// model's version is recorded first (see [`Slots::record_version`]): a crash between
    /// the two leaves a record at most one install ahead, never behind what runs.
    pub fn activate(&self, slot: Slot, model: &ModelRef) -> Result<(), SlotError> {
        self.record_version(model)?;
        write_atomic(&self.dir.join(ACTIVE_FILE), slot.name().as_bytes())
    }

    /// Makes `slot` the active one again: a model that was active before (going back
    /// never raises a version), so the record is not needed, and going back works even
    /// when the record cannot be read.
    pub fn reactivate(&self, slot: Slot) -> Result<(), SlotError> {
        write_atomic(&self.dir.join(ACTIVE_FILE), slot.name().as_bytes())
    }

    /// The highest version of the model `name` this device has made active, if any. A
    /// record that cannot be read is an error, not "none": anti-rollback fails closed.
    pub fn highest(&self, name: &str) -> Result<Option<u64>, SlotError> {
        Ok(self.highest_versions()?.get(name).copied())
    }

    /// Raises the record of `model`'s name to its version, if that is higher.
    pub fn record_version(&self, model: &ModelRef) -> Result<(), SlotError> {
        let mut highest = self.highest_versions()?;
        if highest.get(&model.name) >= Some(&model.version) {
            return Ok(());
        }
        highest.insert(model.name.clone(), model.version);
        let bytes = serde_json::to_vec(&highest).expect("a map of numbers serializes");
        write_atomic(&self.dir.join(HIGHEST_FILE), &bytes)
    }

    fn highest_versions(&self) -> Result<BTreeMap<String, u64>, SlotError> {
        let path = self.dir.join(HIGHEST_FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(source) => {
                return Err(SlotError {
                    action: "read",
                    path,
                    source,
                });
            }
        };
        serde_json::from_slice(&bytes).map_err(|e| SlotError {
            action: "parse",
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new content:
/// write a temporary file beside it, fsync it, rename it over `path`, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SlotError> {
    let tmp = path.with_extension("tmp");
    let err = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| SlotError {
            action,
            path,
            source,
        }
    };
    let mut file = fs::File::create(&tmp).map_err(err("create", &tmp))?;
    file.write_all(bytes).map_err(err("write", &tmp))?;
    file.sync_all().map_err(err("fsync", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(err("rename into", path))?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err("fsync", dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writing_and_switching_slots() {
        let dir = tempfile::tempdir().unwrap();
        let slots = Slots::open(dir.path()).unwrap();
        assert_eq!(slots.active(), None);
        slots.write(Slot::A, b"one", None).unwrap();
        slots.activate(Slot::A, &model("m", 1)).unwrap();
        assert_eq!(slots.active(), Some(Slot::A));
        slots.write(Slot::B, b"two", Some(b"model two")).unwrap();
        assert_eq!(slots.active(), Some(Slot::A), "writing does not switch");
        slots.activate(Slot::B, &model("m", 2)).unwrap();
        let reopened = Slots::open(dir.path()).unwrap();
        assert_eq!(reopened.active(), Some(Slot::B));
        assert_eq!(reopened.read(Slot::B).unwrap(), b"two");
        assert_eq!(reopened.read(Slot::A).unwrap(), b"one");
        assert_eq!(reopened.read_model(Slot::B).unwrap().unwrap(), b"model two");
        assert_eq!(reopened.read_model(Slot::A).unwrap(), None);
        assert!(!dir.path().join("slots/b/bundle.tmp").exists());
        // A full bundle written over a delta's slot takes its model away.
        reopened.write(Slot::B, b"three", None).unwrap();
        assert_eq!(reopened.read_model(Slot::B).unwrap(), None);
    }

    fn model(name: &str, version: u64) -> ModelRef {
        ModelRef {
            name: name.into(),
            version,
        }
    }

    #[test]
    fn activating_records_the_highest_version_of_each_model() {
        let dir = tempfile::tempdir().unwrap();
        let slots = Slots::open(dir.path()).unwrap();
        assert_eq!(slots.highest("m").unwrap(), None);
        slots.activate(Slot::A, &model("m", 5)).unwrap();
        slots.activate(Slot::B, &model("x", 1)).unwrap();
        // Going back (a rollback) lowers nothing.
        slots.activate(Slot::A, &model("m", 3)).unwrap();
        let reopened = Slots::open(dir.path()).unwrap();
        assert_eq!(reopened.highest("m").unwrap(), Some(5));
        assert_eq!(reopened.highest("x").unwrap(), Some(1));
        assert_eq!(reopened.highest("y").unwrap(), None);
        reopened.record_version(&model("m", 6)).unwrap();
        assert_eq!(reopened.highest("m").unwrap(), Some(6));
        // A record that cannot be read is an error: anti-rollback fails closed.
        fs::write(dir.path().join("slots/highest.json"), "{garbled").unwrap();
        let error = reopened.highest("m").unwrap_err().to_string();
        assert!(error.contains("parse"), "{error}");
        assert!(reopened.activate(Slot::B, &model("m", 7)).is_err());
        assert_eq!(
            reopened.active(),
            Some(Slot::A),
            "no switch without the record"
        );
        // Going back does not need it.
        reopened.reactivate(Slot::B).unwrap();
        assert_eq!(reopened.active(), Some(Slot::B));
    }

    #[test]
    fn a_garbled_pointer_reads_as_no_active_slot() {
        let dir = tempfile::tempdir().unwrap();
        let slots = Slots::open(dir.path()).unwrap();
        fs::write(dir.path().join("slots/active"), "zz").unwrap();
        assert_eq!(slots.active(), None);
    }
}
