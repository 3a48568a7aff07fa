//! Enrollment. With an `enrollment_token` in its configuration, the agent creates its own
//! ed25519 key pair on first start (`{state_dir}/device.key`, mode 0600, never replaced)
//! and enrolls with the controller (`POST {controller_url}/api/v1/enroll`) until the
//! controller approves it; the answer is kept in `{state_dir}/enrollment.json`. Enrollment
//! runs beside the rest of the agent: inference and the outbox do not wait for it, and
//! messages the controller holds back from an unapproved device stay in the outbox.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use edgeloop_shared::signing::SecretKey;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::AgentConfig;

pub const KEY_FILE: &str = "device.key";
pub const RECORD_FILE: &str = "enrollment.json";
/// The broker login the controller issued at enrollment (0600).
pub const BROKER_LOGIN_FILE: &str = "broker-login.json";
/// Refused enrollments are tried again this much less often than pending ones: an operator
/// has to change something first.
const REFUSED_BACKOFF: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("no entropy for the device key: {0}")]
    Entropy(String),
}

/// What the controller said, as kept on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enrollment {
    pub device_id: String,
    /// `approved` or `pending`.
    pub status: String,
    pub group: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// The broker login, when the controller issued one: kept in its own file, never here.
    #[serde(default, skip_serializing)]
    pub mqtt_username: Option<String>,
    #[serde(default, skip_serializing)]
    pub mqtt_password: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct BrokerLogin {
    username: String,
    password: String,
}

/// The broker login on record (from enrollment), if any; unreadable is none, logged.
pub fn broker_login(state_dir: &Path) -> Option<(String, String)> {
    let path = state_dir.join(BROKER_LOGIN_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<BrokerLogin>(&bytes) {
            Ok(l) => Some((l.username, l.password)),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "unreadable broker login; connecting without");
                None
            }
        },
        Err(_) => None,
    }
}

/// Writes the broker login (mode 0600, then renamed into place).
fn save_broker_login(state_dir: &Path, username: &str, password: &str) -> Result<(), EnrollError> {
    let path = state_dir.join(BROKER_LOGIN_FILE);
    let tmp = state_dir.join(format!("{BROKER_LOGIN_FILE}.tmp"));
    let io = |source| EnrollError::Io {
        path: path.clone(),
        source,
    };
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    let login = BrokerLogin {
        username: username.to_string(),
        password: password.to_string(),
    };
    file.write_all(&serde_json::to_vec(&login).expect("serializes"))
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(io)
}

/// The device's key: read from `state_dir`, or created there (0600) on first use.
pub fn device_key(state_dir: &Path) -> Result<SecretKey, EnrollError> {
    let path = state_dir.join(KEY_FILE);
    let io = |source| EnrollError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => SecretKey::parse(&text).map_err(|e| EnrollError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|e| EnrollError::Entropy(e.to_string()))?;
            let key = SecretKey::from_seed(seed);
            std::fs::create_dir_all(state_dir).map_err(io)?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(io)?;
            writeln!(file, "{}", key.to_text()).map_err(io)?;
            file.sync_all().map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

/// The enrollment on record, if any.
pub fn recorded(state_dir: &Path) -> Result<Option<Enrollment>, EnrollError> {
    let path = state_dir.join(RECORD_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| EnrollError::Corrupt {
                path,
                message: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(EnrollError::Io { path, source }),
    }
}

fn record(state_dir: &Path, enrollment: &Enrollment) -> Result<(), EnrollError> {
    let path = state_dir.join(RECORD_FILE);
    crate::slots::write_atomic(
        &path,
        &serde_json::to_vec_pretty(enrollment).expect("serializes"),
    )
    .map_err(|e| EnrollError::Corrupt {
        path,
        message: format!("cannot write: {e}"),
    })
}

/// One attempt's result.
enum Attempt {
    Approved(Enrollment),
    Pending(Enrollment),
    /// The controller said no (bad or used-up token, a device id taken by another key).
    Refused(String),
    /// The controller could not be reached or did not answer sensibly.
    Unreachable(String),
}

async fn attempt(config: &AgentConfig, key: &SecretKey) -> Attempt {
    let url = format!(
        "{}/api/v1/enroll",
        config.controller_url.trim_end_matches('/')
    );
    // Every attempt proves the key, so that a pre-authorized one needs no token.
    let issued_ms = crate::now_ms();
    let public_key = key.public().to_text();
    let proof = key.sign(
        edgeloop_shared::signing::Context::Enroll,
        &edgeloop_shared::signing::enroll_proof_bytes(&config.device_id, &public_key, issued_ms),
    );
    let body = serde_json::json!({
        "token": (!config.enrollment_token.is_empty()).then_some(&config.enrollment_token),
        "device_id": config.device_id,
        "public_key": public_key,
        "issued_ms": issued_ms,
        "signature": base64::engine::general_purpose::STANDARD.encode(proof),
        "board": (!config.board.is_empty()).then_some(&config.board),
        "arch": std::env::consts::ARCH,
        "agent_version": env!("CARGO_PKG_VERSION"),
    });
    let response = match reqwest::Client::new()
        .post(&url)
        .timeout(Duration::from_secs(10))
        .json(&body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return Attempt::Unreachable(format!("{url}: {e}")),
    };
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if status.is_success() {
        match serde_json::from_str::<Enrollment>(&text) {
            Ok(e) if e.status == "approved" => Attempt::Approved(e),
            Ok(e) => Attempt::Pending(e),
            Err(e) => Attempt::Unreachable(format!("{url} answered {status} with {e}: {text}")),
        }
    } else if status.is_client_error() {
        let reason = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or(text);
        Attempt::Refused(format!("{status}: {reason}"))
    } else {
        Attempt::Unreachable(format!("{url} answered {status}: {text}"))
    }
}

/// Enrolls until approved (or shutdown). Does nothing without a token or a pre-authorized
/// key, or once approved.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), EnrollError> {
    if config.enrollment_token.is_empty() && !config.enroll_with_key {
        return Ok(());
    }
    if recorded(&config.state_dir)?.is_some_and(|e| e.status == "approved") {
        return Ok(());
    }
    let key = device_key(&config.state_dir)?;
    let retry = Duration::from_secs(config.enrollment_retry_s);
    let mut said_pending = false;
    loop {
        let wait = match attempt(&config, &key).await {
            Attempt::Approved(e) => {
                info!(group = %e.group, tags = ?e.tags, key_id = %key.id(), "enrolled and approved");
                if let (Some(user), Some(password)) = (&e.mqtt_username, &e.mqtt_password) {
                    // The link reads it at its next connection attempt.
                    save_broker_login(&config.state_dir, user, password)?;
                    info!("broker login received");
                }
                record(&config.state_dir, &e)?;
                return Ok(());
            }
            Attempt::Pending(e) => {
                if !said_pending {
                    info!(group = %e.group, key_id = %key.id(), "enrolled; waiting for an operator to approve this device");
                    record(&config.state_dir, &e)?;
                    said_pending = true;
                }
                retry
            }
            Attempt::Refused(reason) => {
                error!(%reason, "the controller refused the enrollment; check enrollment_token and device_id");
                retry * REFUSED_BACKOFF
            }
            Attempt::Unreachable(reason) => {
                warn!(%reason, "cannot enroll yet; trying again");
                retry
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_device_key_is_made_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let key = device_key(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(device_key(dir.path()).unwrap().id(), key.id(), "kept");
        std::fs::write(&path, "garbage").unwrap();
        assert!(matches!(
            device_key(dir.path()),
            Err(EnrollError::Corrupt { .. })
        ));
        assert_eq!(recorded(dir.path()).unwrap(), None);
        let e = Enrollment {
            device_id: "d".into(),
            status: "pending".into(),
            group: "g".into(),
            tags: vec!["t".into()],
            mqtt_username: None,
            mqtt_password: None,
        };
        record(dir.path(), &e).unwrap();
        assert_eq!(recorded(dir.path()).unwrap(), Some(e));
        assert_eq!(broker_login(dir.path()), None);
        save_broker_login(dir.path(), "d", "secret").unwrap();
        let path = dir.path().join(BROKER_LOGIN_FILE);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            broker_login(dir.path()),
            Some(("d".into(), "secret".into()))
        );
        save_broker_login(dir.path(), "d", "newer").unwrap();
        assert_eq!(broker_login(dir.path()), Some(("d".into(), "newer".into())));
    }
}
