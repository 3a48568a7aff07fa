//! A/B model slots on disk.
//!
//! ```text
//! {state_dir}/slots/a/bundle.elb
//! {state_dir}/slots/a/model.onnx    only beside a delta bundle: the model it expanded to
//! {state_dir}/slots/b/bundle.elb
//! {state_dir}/slots/active          "a" or "b"
//! ```
//!
//! A delta bundle can only be decompressed against its base, which the next install may
//! overwrite, so its slot also keeps the model; the bundle's signed digest covers it.
//!
//! A new bundle is written to the slot that is not active (temporary file, fsync, rename,
//! directory fsync), checked, and only then made active by replacing the `active` pointer
//! the same way. A crash at any point leaves the pointer on a complete bundle.

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

    /// Makes `slot` the active one, atomically and durably.
    pub fn activate(&self, slot: Slot) -> Result<(), SlotError> {
        write_atomic(&self.dir.join(ACTIVE_FILE), slot.name().as_bytes())
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
        slots.activate(Slot::A).unwrap();
        assert_eq!(slots.active(), Some(Slot::A));
        slots.write(Slot::B, b"two", Some(b"model two")).unwrap();
        assert_eq!(slots.active(), Some(Slot::A), "writing does not switch");
        slots.activate(Slot::B).unwrap();
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

    #[test]
    fn a_garbled_pointer_reads_as_no_active_slot() {
        let dir = tempfile::tempdir().unwrap();
        let slots = Slots::open(dir.path()).unwrap();
        fs::write(dir.path().join("slots/active"), "zz").unwrap();
        assert_eq!(slots.active(), None);
    }
}
