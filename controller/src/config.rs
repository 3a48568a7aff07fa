//! Controller configuration: built-in defaults, then a TOML file, then `EDGELOOP_*`
//! environment variables, then command-line flags; validated right after loading.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use edgeloop_agent::config::{LoadError, load_layered};
use edgeloop_agent::link::BrokerAddr;
use edgeloop_shared::topics::Topics;
use figment::providers::Env;
use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG_TOML: &str = include_str!("default-config.toml");
pub const CONFIG_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot load controller configuration: {0}")]
    Load(#[from] LoadError),
    #[error("config_version {found} is not supported (expected {CONFIG_VERSION})")]
    Version { found: u32 },
    #[error("invalid `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    pub config_version: u32,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub http_addr: SocketAddr,
    pub mqtt_url: String,
    pub mqtt_listen: SocketAddr,
    pub topic_root: String,
    pub mqtt_client_id: String,
    pub signing_key: String,
    /// Root keys whose trust documents the controller relays (see `trust`).
    pub root_keys: Vec<String>,
    pub offline_after_s: u64,
    pub command_ttl_s: u64,
    pub resend_after_s: u64,
    pub mqtt_shared_group: String,
    pub mqtt_ca_file: PathBuf,
    pub mqtt_cert_file: PathBuf,
    pub mqtt_key_file: PathBuf,
    pub mqtt_username: String,
    pub mqtt_password: String,
    /// The embedded broker admits only the controller and enrolled devices with their
    /// issued passwords.
    pub broker_auth: bool,
    pub accept_unknown_devices: bool,
    pub retention_raw_days: u64,
    pub retention_hourly_days: u64,
    /// How often retraining policies are evaluated.
    pub retraining_check_s: u64,
    /// Retraining policies, one per model (`[[retraining]]` tables).
    #[serde(default)]
    pub retraining: Vec<crate::retrain::RetrainingPolicy>,
    /// Who may use the API and dashboard (`[[operators]]` tables); none: no login.
    #[serde(default)]
    pub operators: Vec<crate::login::Operator>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        toml::from_str(DEFAULT_CONFIG_TOML).expect("the built-in default config parses")
    }
}

impl ControllerConfig {
    /// Defaults, then `file` (if given), then `EDGELOOP_*` variables. Not yet validated:
    /// flags may still override; call [`validate`](Self::validate) after them.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        // Only the keys this config has: EDGELOOP_TEST_* and EDGELOOP_AGENT_* belong to others.
        let keys: Vec<String> = DEFAULT_CONFIG_TOML
            .lines()
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k.trim().to_string()))
            .filter(|k| !k.starts_with('#'))
            .collect();
        let env =
            Env::prefixed("EDGELOOP_").filter(move |k| keys.iter().any(|key| k == key.as_str()));
        Ok(load_layered(&ControllerConfig::default(), file, env)?)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.config_version != CONFIG_VERSION {
            return Err(ConfigError::Version {
                found: self.config_version,
            });
        }
        let invalid = |key, reason: String| ConfigError::Invalid { key, reason };
        if !(self.database_url.is_empty()
            || self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://"))
        {
            return Err(invalid(
                "database_url",
                "must be empty (SQLite) or a postgres:// URL".into(),
            ));
        }
        if !self.mqtt_url.is_empty() {
            BrokerAddr::parse(&self.mqtt_url).map_err(|e| invalid("mqtt_url", e.to_string()))?;
        }
        Topics::new(&self.topic_root).map_err(|e| invalid("topic_root", e.to_string()))?;
        crate::login::validate(&self.operators).map_err(|e| invalid("operators", e))?;
        for key in &self.root_keys {
            edgeloop_shared::signing::PublicKey::parse(key)
                .map_err(|e| invalid("root_keys", format!("`{key}`: {e}")))?;
        }
        if self.broker_auth && !self.mqtt_url.is_empty() {
            return Err(invalid(
                "broker_auth",
                "needs the embedded broker; an external broker keeps its own users (mqtt_username, mqtt_password)".into(),
            ));
        }
        if self.mqtt_password.is_empty() != self.mqtt_username.is_empty() {
            return Err(invalid(
                "mqtt_password",
                "mqtt_username and mqtt_password go together".into(),
            ));
        }
        if self.mqtt_client_id.is_empty() || self.mqtt_client_id.len() > 64 {
            return Err(invalid("mqtt_client_id", "must be 1-64 characters".into()));
        }
        if !self.mqtt_shared_group.is_empty()
            && !edgeloop_shared::is_valid_identifier(&self.mqtt_shared_group)
        {
            return Err(invalid(
                "mqtt_shared_group",
                "must be empty or 1-64 characters of [A-Za-z0-9_.-]".into(),
            ));
        }
        if self.retention_raw_days != 0
            && self.retention_hourly_days != 0
            && self.retention_hourly_days < self.retention_raw_days
        {
            return Err(invalid(
                "retention_hourly_days",
                "must be 0 (forever) or at least retention_raw_days".into(),
            ));
        }
        for (i, policy) in self.retraining.iter().enumerate() {
            policy.validate().map_err(|reason| {
                invalid(
                    "retraining",
                    format!("policy {i} ({}): {reason}", policy.model),
                )
            })?;
            if self.retraining[..i].iter().any(|p| p.model == policy.model) {
                return Err(invalid(
                    "retraining",
                    format!("policy {i}: a second policy for model `{}`", policy.model),
                ));
            }
        }
        for (key, value) in [
            ("retraining_check_s", self.retraining_check_s),
            ("offline_after_s", self.offline_after_s),
            ("command_ttl_s", self.command_ttl_s),
            ("resend_after_s", self.resend_after_s),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        Ok(())
    }

    pub fn signing_key_path(&self) -> PathBuf {
        if self.signing_key.is_empty() {
            self.data_dir.join("keys").join(crate::keys::SECRET_FILE)
        } else {
            PathBuf::from(&self.signing_key)
        }
    }

    pub fn topics(&self) -> Topics {
        Topics::new(&self.topic_root).expect("validated")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readmes_retraining_policy_is_valid_and_a_bad_one_is_named() {
        let readme = include_str!("../../README.md");
        let section = &readme[readme
            .find("## Retraining: the loop closes itself")
            .expect("the README has the section")..];
        let start = section.find("```toml\n").unwrap() + "```toml\n".len();
        let end = start + section[start..].find("```").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &section[start..end]).unwrap();
        let config = ControllerConfig::load(Some(&path)).unwrap();
        config.validate().unwrap();
        assert_eq!(config.retraining.len(), 1);
        assert_eq!(config.retraining[0].min_devices, 3);
        std::fs::write(
            &path,
            section[start..end].replace("min_share = 0.5", "min_share = 5"),
        )
        .unwrap();
        let err = ControllerConfig::load(Some(&path))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("policy 0 (vibration): min_share"), "{err}");
    }

    #[test]
    fn broker_logins_are_checked_for_what_they_can_mean() {
        let external = ControllerConfig {
            mqtt_url: "mqtt://broker:1883".into(),
            broker_auth: true,
            ..ControllerConfig::default()
        };
        let err = external.validate().unwrap_err().to_string();
        assert!(
            err.contains("`broker_auth`") && err.contains("embedded"),
            "{err}"
        );
        let half = ControllerConfig {
            mqtt_password: "secret".into(),
            ..ControllerConfig::default()
        };
        let err = half.validate().unwrap_err().to_string();
        assert!(err.contains("go together"), "{err}");
        ControllerConfig {
            broker_auth: true,
            ..ControllerConfig::default()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn defaults_are_valid_and_a_file_overrides_them() {
        ControllerConfig::default().validate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "http_addr = \"0.0.0.0:9000\"\nresend_after_s = 5\n").unwrap();
        let c = ControllerConfig::load(Some(&path)).unwrap();
        assert_eq!(c.http_addr.port(), 9000);
        assert_eq!(c.resend_after_s, 5);
        assert_eq!(c.topic_root, "edgeloop");
        c.validate().unwrap();
        std::fs::write(&path, "mqtt_url = \"http://nope\"\n").unwrap();
        let err = ControllerConfig::load(Some(&path))
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("mqtt_url"), "{err}");
        std::fs::write(&path, "bogus = 1\n").unwrap();
        assert!(ControllerConfig::load(Some(&path)).is_err());
    }
}
