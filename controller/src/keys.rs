//! The controller's signing key on disk.
//!
//! `signing.key` holds `ed25519-secret:<base64 seed>` and must be readable by its owner
//! only (mode 0600); `signing.pub` holds `ed25519:<base64>`, the line devices put in their
//! `trusted_keys`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use edgeloop_shared::signing::{KeyError, SecretKey};

pub const SECRET_FILE: &str = "signing.key";
pub const PUBLIC_FILE: &str = "signing.pub";

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists; refusing to overwrite a signing key")]
    Exists { path: PathBuf },
    #[error("{path} is readable by others (mode {mode:o}); run `chmod 600 {path}`")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: KeyError,
    },
    #[error("no entropy from the operating system: {0}")]
    Entropy(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A new key from the operating system's random generator.
pub fn generate() -> Result<SecretKey, KeyFileError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyFileError::Entropy(e.to_string()))?;
    Ok(SecretKey::from_seed(seed))
}

/// Writes a new key pair into `dir` (created if needed) and returns it. Never overwrites.
pub fn keygen(dir: &Path) -> Result<SecretKey, KeyFileError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let secret_path = dir.join(SECRET_FILE);
    let public_path = dir.join(PUBLIC_FILE);
    for path in [&secret_path, &public_path] {
        if path.exists() {
            return Err(KeyFileError::Exists { path: path.clone() });
        }
    }
    let key = generate()?;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&secret_path)
        .map_err(io(&secret_path))?;
    writeln!(file, "{}", key.to_text()).map_err(io(&secret_path))?;
    file.sync_all().map_err(io(&secret_path))?;
    fs::write(&public_path, format!("{}\n", key.public().to_text())).map_err(io(&public_path))?;
    Ok(key)
}

/// Loads a signing key, refusing a file that group or others can read or write.
pub fn load(path: &Path) -> Result<SecretKey, KeyFileError> {
    let meta = fs::metadata(path).map_err(io(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = fs::read_to_string(path).map_err(io(path))?;
    SecretKey::parse(&text).map_err(|source| KeyFileError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_a_private_key_and_load_reads_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let key = keygen(dir.path()).unwrap();
        let path = dir.path().join(SECRET_FILE);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(load(&path).unwrap().id(), key.id());
        let public = fs::read_to_string(dir.path().join(PUBLIC_FILE)).unwrap();
        assert_eq!(public.trim(), key.public().to_text());
        assert!(matches!(
            keygen(dir.path()),
            Err(KeyFileError::Exists { .. })
        ));
    }

    #[test]
    fn a_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        keygen(dir.path()).unwrap();
        let path = dir.path().join(SECRET_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load(&path).unwrap_err();
        assert!(
            matches!(err, KeyFileError::TooOpen { mode: 0o644, .. }),
            "{err}"
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, "garbage").unwrap();
        assert!(matches!(load(&path), Err(KeyFileError::Parse { .. })));
    }
}
