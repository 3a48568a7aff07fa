//! Signed controller → device commands.
//!
//! A [`Command`] is serialized once by the controller; those exact bytes are signed
//! (context `edgeloop/v1/command\0`) and travel base64-encoded inside a [`SignedCommand`].
//! The device verifies the signature over the bytes it received, then parses them, so
//! nothing is ever re-serialized before verification.
//!
//! A command names its target device, carries a per-device sequence number that must
//! increase (replays fail) and an expiry (a command held back by an attacker or a broker
//! goes stale).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::protocol::ModelRef;
use crate::signing::{Context, KeyId, OpenError, SecretKey, SignatureError, TrustedKeys};

/// How far a command's issue time may lie in the device's future (clock skew).
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    /// The device this command is for.
    pub device_id: String,
    /// Per-device sequence number; a device accepts only numbers above the last it accepted.
    pub seq: u64,
    pub issued_ms: u64,
    /// The device refuses the command after this time.
    pub expires_ms: u64,
    pub action: CommandAction,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CommandAction {
    /// Download, verify and activate a model bundle. A device refuses a version that is
    /// not above its active one of the same name (anti-rollback).
    Deploy(DeployAction),
    /// The same, for a version below the active one: the only command with which a device
    /// goes back. It names the exact version, and is refused for one that is not below.
    Rollback(DeployAction),
    /// Send the controller the device's input sample (its reservoir) as a CSV file, in
    /// [`crate::protocol::SampleChunk`]s on the samples channel.
    UploadSamples(UploadAction),
}

impl CommandAction {
    /// What to install, for a deploy or a rollback.
    pub fn deploy(&self) -> Option<&DeployAction> {
        match self {
            CommandAction::Deploy(d) | CommandAction::Rollback(d) => Some(d),
            CommandAction::UploadSamples(_) => None,
        }
    }

    pub fn is_rollback(&self) -> bool {
        matches!(self, CommandAction::Rollback(_))
    }

    /// Anti-rollback, given the model the device serves and `highest`, the highest version
    /// of the named model the device has ever made active: a deploy of the active model's
    /// name must raise its version, and no deploy goes below `highest` (switching to
    /// another model and back does not reset it); only a rollback lowers a version, and a
    /// rollback must lower it, within the active model. A deploy of `highest` itself is
    /// accepted: a version the device left by rolling back may be tried again. A device
    /// serving nothing installs a rollback, to recover. An upload changes no model: it is
    /// always carried out.
    pub fn disposition(
        &self,
        active: Option<&ModelRef>,
        highest: Option<u64>,
    ) -> Result<Disposition, CommandError> {
        let Some(deploy) = self.deploy() else {
            return Ok(Disposition::Install);
        };
        let target = &deploy.model;
        if active == Some(target) {
            return Ok(Disposition::AlreadyActive);
        }
        let version = target.version;
        let below_highest = highest.filter(|&h| version < h);
        let Some(active) = active else {
            return match (self, below_highest) {
                (CommandAction::Deploy(_), Some(highest)) => Err(CommandError::BelowHighest {
                    name: target.name.clone(),
                    version,
                    highest,
                }),
                _ => Ok(Disposition::Install),
            };
        };
        let current = active.version;
        match self {
            CommandAction::Rollback(_) if active.name != target.name => {
                Err(CommandError::RollbackOtherModel {
                    active: active.name.clone(),
                })
            }
            CommandAction::Rollback(_) if version > current => Err(CommandError::RollbackNotDown {
                version,
                active: current,
            }),
            CommandAction::Deploy(_) if active.name == target.name && version < current => {
                Err(CommandError::NotAnUpgrade {
                    version,
                    active: current,
                })
            }
            CommandAction::Deploy(_) => match below_highest {
                Some(highest) => Err(CommandError::BelowHighest {
                    name: target.name.clone(),
                    version,
                    highest,
                }),
                None => Ok(Disposition::Install),
            },
            _ => Ok(Disposition::Install),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployAction {
    pub rollout_id: u64,
    pub model: ModelRef,
    /// Where to download the bundle (HTTP GET).
    pub bundle_url: String,
    /// SHA-256 of the whole bundle file, lowercase hex.
    pub bundle_sha256: String,
    /// Exact size of the bundle file in bytes; the download stops beyond it.
    pub bundle_size: u64,
    /// A smaller bundle of the same model, compressed against the model the device is
    /// expected to serve; a device that serves exactly that model may take it instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaOffer>,
}

/// A delta bundle (PROTOCOL §7): the same signed manifest, with an artifact that only a
/// device holding the base model can decompress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaOffer {
    /// SHA-256 of the base model's ONNX bytes (its manifest's `artifact.raw_sha256`).
    pub base_sha256: String,
    pub bundle_url: String,
    pub bundle_sha256: String,
    pub bundle_size: u64,
}

/// Which sample to upload, and for which dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadAction {
    /// The dataset the controller records the upload under; every chunk names it.
    pub dataset_id: u64,
    /// At most this many rows (the sample is uniform, so its first rows are too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<u64>,
}

/// A command as it travels: the signed bytes, base64-encoded, and their signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedCommand {
    pub key_id: KeyId,
    /// Base64 (standard alphabet, padded) of the exact JSON bytes that were signed.
    pub command: String,
    /// Base64 of the 64-byte ed25519 signature.
    pub signature: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("command is not valid base64: {0}")]
    Encoding(String),
    #[error("command signature refused: {0}")]
    Signature(#[from] SignatureError),
    #[error("signed command does not parse: {0}")]
    Malformed(String),
    #[error("command is for device `{target}`, not `{this}`")]
    WrongTarget { target: String, this: String },
    #[error("command {seq} expired at {expires_ms} (now {now_ms})")]
    Expired {
        seq: u64,
        expires_ms: u64,
        now_ms: u64,
    },
    #[error("command {seq} was issued at {issued_ms}, too far in the future (now {now_ms})")]
    NotYetValid {
        seq: u64,
        issued_ms: u64,
        now_ms: u64,
    },
    #[error("command sequence {seq} is not above the last accepted {last} (replay?)")]
    Replayed { seq: u64, last: u64 },
    #[error(
        "version {version} is not above the active {active}; only a rollback command installs it"
    )]
    NotAnUpgrade { version: u64, active: u64 },
    #[error(
        "version {version} of `{name}` is below version {highest}, which this device has run; \
         a deploy never goes below it (only a rollback of the active model goes back)"
    )]
    BelowHighest {
        name: String,
        version: u64,
        highest: u64,
    },
    #[error("rollback to version {version} is not below the active {active}")]
    RollbackNotDown { version: u64, active: u64 },
    #[error("a rollback goes back within the active model's versions, and {active} is active")]
    RollbackOtherModel { active: String },
}

/// What a device does with an authentic, current deploy or rollback command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The named model is the one serving: nothing to install.
    AlreadyActive,
    Install,
}

impl SignedCommand {
    pub fn sign(command: &Command, key: &SecretKey) -> Self {
        let bytes = serde_json::to_vec(command).expect("commands always serialize");
        let signature = key.sign(Context::Command, &bytes);
        SignedCommand {
            key_id: key.id(),
            command: B64.encode(&bytes),
            signature: B64.encode(signature),
        }
    }

    /// Checks signature, target, time and sequence, in that order, and returns the command.
    /// `last_seq` is the highest sequence this device accepted so far, if any.
    pub fn verify(
        &self,
        trusted: &TrustedKeys,
        this_device: &str,
        now_ms: u64,
        last_seq: Option<u64>,
    ) -> Result<Command, CommandError> {
        let command = self.open(trusted)?;
        command.check(this_device, now_ms, last_seq)?;
        Ok(command)
    }

    /// Checks the signature over the exact bytes received, then parses them. The command
    /// is authentic but not yet checked for target, time and sequence: see
    /// [`Command::check`].
    pub fn open(&self, trusted: &TrustedKeys) -> Result<Command, CommandError> {
        let bytes = trusted
            .open_encoded(
                self.key_id,
                Context::Command,
                &self.command,
                &self.signature,
            )
            .map_err(|e| match e {
                OpenError::Encoding(e) => CommandError::Encoding(e),
                OpenError::Signature(e) => CommandError::Signature(e),
            })?;
        serde_json::from_slice(&bytes).map_err(|e| CommandError::Malformed(e.to_string()))
    }

    /// The sequence number the command claims, read without trusting it (for error reports).
    pub fn claimed_seq(&self) -> Option<u64> {
        let bytes = B64.decode(&self.command).ok()?;
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()?
            .get("seq")?
            .as_u64()
    }
}

impl Command {
    /// Checks that an authentic command is for `this_device`, current at `now_ms` and newer
    /// than `last_seq`, the highest sequence this device accepted so far.
    pub fn check(
        &self,
        this_device: &str,
        now_ms: u64,
        last_seq: Option<u64>,
    ) -> Result<(), CommandError> {
        if self.device_id != this_device {
            return Err(CommandError::WrongTarget {
                target: self.device_id.clone(),
                this: this_device.to_string(),
            });
        }
        if now_ms > self.expires_ms {
            return Err(CommandError::Expired {
                seq: self.seq,
                expires_ms: self.expires_ms,
                now_ms,
            });
        }
        if self.issued_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(CommandError::NotYetValid {
                seq: self.seq,
                issued_ms: self.issued_ms,
                now_ms,
            });
        }
        if let Some(last) = last_seq
            && self.seq <= last
        {
            return Err(CommandError::Replayed {
                seq: self.seq,
                last,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(seq: u64) -> Command {
        Command {
            device_id: "dev-1".into(),
            seq,
            issued_ms: 1_000,
            expires_ms: 10_000,
            action: CommandAction::Deploy(DeployAction {
                rollout_id: 1,
                model: ModelRef {
                    name: "m".into(),
                    version: 2,
                },
                bundle_url: "http://controller/artifacts/m/2".into(),
                bundle_sha256: "00".repeat(32),
                bundle_size: 123,
                delta: None,
            }),
        }
    }

    fn setup() -> (SecretKey, TrustedKeys) {
        let key = SecretKey::from_seed([9; 32]);
        let trusted = TrustedKeys::new([key.public().clone()]);
        (key, trusted)
    }

    #[test]
    fn a_valid_command_verifies_and_round_trips() {
        let (key, trusted) = setup();
        let signed = SignedCommand::sign(&command(5), &key);
        assert_eq!(signed.claimed_seq(), Some(5));
        assert_eq!(
            signed.verify(&trusted, "dev-1", 2_000, Some(4)).unwrap(),
            command(5)
        );
        assert!(signed.verify(&trusted, "dev-1", 2_000, None).is_ok());
    }

    #[test]
    fn an_upload_command_is_signed_like_any_other_and_changes_no_model() {
        let (key, trusted) = setup();
        let mut upload = command(7);
        upload.action = CommandAction::UploadSamples(UploadAction {
            dataset_id: 3,
            max_rows: Some(500),
        });
        let json = serde_json::to_value(&upload).unwrap();
        assert_eq!(json["action"]["upload_samples"]["dataset_id"], 3);
        let opened = SignedCommand::sign(&upload, &key)
            .verify(&trusted, "dev-1", 2_000, Some(6))
            .unwrap();
        assert_eq!(opened, upload);
        assert_eq!(opened.action.deploy(), None);
        let active = ModelRef {
            name: "m".into(),
            version: 9,
        };
        assert_eq!(
            opened.action.disposition(Some(&active), None),
            Ok(Disposition::Install)
        );
    }

    #[test]
    fn a_rollback_travels_as_its_own_action() {
        let (key, trusted) = setup();
        let mut rollback = command(6);
        rollback.action = CommandAction::Rollback(rollback.action.deploy().unwrap().clone());
        let json = serde_json::to_value(&rollback).unwrap();
        assert_eq!(json["action"]["rollback"]["model"]["version"], 2);
        let opened = SignedCommand::sign(&rollback, &key).open(&trusted).unwrap();
        assert!(opened.action.is_rollback());
        assert!(!command(6).action.is_rollback());
        assert_eq!(opened.action.deploy(), command(6).action.deploy());
    }

    fn model(name: &str, version: u64) -> ModelRef {
        ModelRef {
            name: name.into(),
            version,
        }
    }

    /// The deploy action of a valid command, naming `m`.
    fn deploy(m: ModelRef) -> DeployAction {
        let mut d = command(1).action.deploy().unwrap().clone();
        d.model = m;
        d
    }

    #[test]
    fn versions_only_go_down_by_rollback_and_rollbacks_only_go_down() {
        let up = CommandAction::Deploy(deploy(model("m", 3)));
        let down = CommandAction::Deploy(deploy(model("m", 1)));
        let back = CommandAction::Rollback(deploy(model("m", 1)));
        let ahead = CommandAction::Rollback(deploy(model("m", 3)));
        let other = CommandAction::Rollback(deploy(model("x", 1)));
        let active = model("m", 2);
        let at = Some(&active);
        assert_eq!(up.disposition(at, None), Ok(Disposition::Install));
        assert_eq!(back.disposition(at, None), Ok(Disposition::Install));
        assert_eq!(
            down.disposition(at, None),
            Err(CommandError::NotAnUpgrade {
                version: 1,
                active: 2
            })
        );
        assert_eq!(
            ahead.disposition(at, None),
            Err(CommandError::RollbackNotDown {
                version: 3,
                active: 2
            })
        );
        assert!(matches!(
            other.disposition(at, None),
            Err(CommandError::RollbackOtherModel { .. })
        ));
        let same = CommandAction::Deploy(deploy(model("m", 2)));
        assert_eq!(same.disposition(at, None), Ok(Disposition::AlreadyActive));
        // Another model is installed by a deploy; with nothing serving, anything is.
        let fresh = CommandAction::Deploy(deploy(model("x", 1)));
        assert_eq!(fresh.disposition(at, None), Ok(Disposition::Install));
        for action in [up, down, back, ahead, other] {
            assert_eq!(action.disposition(None, None), Ok(Disposition::Install));
        }
    }

    #[test]
    fn no_deploy_goes_below_the_highest_version_the_device_has_run() {
        let deploy = |m: ModelRef| CommandAction::Deploy(self::deploy(m));
        let rollback = |m: ModelRef| CommandAction::Rollback(self::deploy(m));
        // The device ran m v5, then switched to x: m v3 is refused, though x is active.
        let other = model("x", 1);
        assert_eq!(
            deploy(model("m", 3)).disposition(Some(&other), Some(5)),
            Err(CommandError::BelowHighest {
                name: "m".into(),
                version: 3,
                highest: 5
            })
        );
        // The same with nothing serving; a rollback still recovers such a device.
        assert!(matches!(
            deploy(model("m", 3)).disposition(None, Some(5)),
            Err(CommandError::BelowHighest { .. })
        ));
        assert_eq!(
            rollback(model("m", 3)).disposition(None, Some(5)),
            Ok(Disposition::Install)
        );
        // A rollback of the active model goes below the highest, as it names the version;
        // after it, a deploy back up to the highest (a retry) is accepted, one below is not.
        let active = model("m", 4);
        assert_eq!(
            rollback(model("m", 3)).disposition(Some(&active), Some(5)),
            Ok(Disposition::Install)
        );
        assert_eq!(
            deploy(model("m", 5)).disposition(Some(&model("m", 3)), Some(5)),
            Ok(Disposition::Install)
        );
        assert!(matches!(
            deploy(model("m", 4)).disposition(Some(&model("m", 3)), Some(5)),
            Err(CommandError::BelowHighest { .. })
        ));
        assert_eq!(
            deploy(model("m", 6)).disposition(Some(&other), Some(5)),
            Ok(Disposition::Install)
        );
        let message = deploy(model("m", 3))
            .disposition(Some(&other), Some(5))
            .unwrap_err()
            .to_string();
        assert!(message.contains("below version 5"), "{message}");
    }

    #[test]
    fn each_broken_rule_has_its_own_error() {
        let (key, trusted) = setup();
        let signed = SignedCommand::sign(&command(5), &key);
        assert!(matches!(
            signed.verify(&trusted, "dev-2", 2_000, None),
            Err(CommandError::WrongTarget { .. })
        ));
        assert!(matches!(
            signed.verify(&trusted, "dev-1", 10_001, None),
            Err(CommandError::Expired { seq: 5, .. })
        ));
        assert!(
            signed.verify(&trusted, "dev-1", 0, None).is_ok(),
            "issued 1 s in the future is within the skew allowance"
        );
        let mut future = command(5);
        future.issued_ms = 1_000 + MAX_CLOCK_SKEW_MS + 10;
        future.expires_ms = u64::MAX;
        assert!(matches!(
            SignedCommand::sign(&future, &key).verify(&trusted, "dev-1", 0, None),
            Err(CommandError::NotYetValid { .. })
        ));
        assert_eq!(
            signed.verify(&trusted, "dev-1", 2_000, Some(5)),
            Err(CommandError::Replayed { seq: 5, last: 5 })
        );

        let stranger = SecretKey::from_seed([1; 32]);
        let forged = SignedCommand::sign(&command(6), &stranger);
        assert_eq!(
            forged.verify(&trusted, "dev-1", 2_000, None),
            Err(CommandError::Signature(SignatureError::UnknownKey(
                stranger.id()
            )))
        );
    }

    #[test]
    fn tampering_with_the_signed_bytes_is_caught_before_parsing() {
        let (key, trusted) = setup();
        let mut signed = SignedCommand::sign(&command(5), &key);
        let mut bytes = B64.decode(&signed.command).unwrap();
        let pos = bytes.iter().position(|&b| b == b'5').unwrap();
        bytes[pos] = b'9';
        signed.command = B64.encode(&bytes);
        assert_eq!(
            signed.verify(&trusted, "dev-1", 2_000, None),
            Err(CommandError::Signature(SignatureError::Invalid(key.id())))
        );
        signed.command = "%%%".into();
        assert!(matches!(
            signed.verify(&trusted, "dev-1", 2_000, None),
            Err(CommandError::Encoding(_))
        ));
    }
}
