//! The catalogue of malicious inputs kept in `tests/data/`: bundles, commands and trust
//! documents an attacker could put in front of a device, each with the specific error the
//! device's own checks must refuse it with, beside one valid example of each kind.
//!
//! `cargo run -p edgeloop-tests --bin make-fixtures` writes the files and
//! `tests/data/README.md`; `tests/tests/fixtures.rs` checks that the committed files are
//! exactly what this code makes and that each is refused as listed. Everything is
//! deterministic: keys come from fixed seeds (test keys, never a fleet's), times are fixed.

use std::path::Path;

use edgeloop_shared::bundle::{self, Limits, Manifest};
use edgeloop_shared::command::{Command, CommandAction, DeployAction, SignedCommand};
use edgeloop_shared::protocol::ModelRef;
use edgeloop_shared::signing::{Context, SecretKey};
use edgeloop_shared::trust::{SignedTrust, TrustDocument, TrustState};

/// Where the catalogue lives.
pub fn data_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data")
}

/// The root key the device is configured with.
pub fn root() -> SecretKey {
    SecretKey::from_seed([0xa1; 32])
}
/// The signing key the device is configured with, revoked by the rotation document (the
/// one `trust/replayed.json` replays).
pub fn old_signing() -> SecretKey {
    SecretKey::from_seed([0xa2; 32])
}
/// The signing key the rotation document introduces.
pub fn signing() -> SecretKey {
    SecretKey::from_seed([0xa3; 32])
}
/// A key nobody trusts.
pub fn stranger() -> SecretKey {
    SecretKey::from_seed([0xa4; 32])
}

/// The device the commands are checked on, its clock, the last command sequence it
/// accepted and the model it serves.
pub const DEVICE: &str = "fixture-1";
pub const NOW_MS: u64 = 1_800_000_000_000;
pub const LAST_SEQ: u64 = 100;
pub fn active_model() -> ModelRef {
    ModelRef {
        name: "vibration".into(),
        version: 2,
    }
}
/// The highest version of `name` the device has made active: the model it serves, and
/// gearbox v4, which it ran before.
pub fn highest_run(name: &str) -> Option<u64> {
    match name {
        "vibration" => Some(2),
        "gearbox" => Some(4),
        _ => None,
    }
}

/// One file of the catalogue.
pub struct Fixture {
    /// Path below `tests/data/`.
    pub file: &'static str,
    pub what: &'static str,
    pub bytes: Vec<u8>,
    /// A part of the error message the device's check must give; empty for the valid
    /// examples, which must pass.
    pub refused_with: &'static str,
}

fn fixture(
    file: &'static str,
    what: &'static str,
    bytes: Vec<u8>,
    refused_with: &'static str,
) -> Fixture {
    Fixture {
        file,
        what,
        bytes,
        refused_with,
    }
}

/// The device's trust state: configured with `root` and `old_signing`, then the rotation
/// document applied.
pub fn device_trust() -> TrustState {
    TrustState::configured(
        &[root().public().to_text()],
        &[old_signing().public().to_text()],
    )
    .expect("valid keys")
    .apply(&rotation())
    .expect("the rotation document applies")
}

fn rotation() -> SignedTrust {
    SignedTrust::sign(
        &trust_document(1, &[&root()], &[&signing()], &[&old_signing()]),
        &root(),
    )
}

fn trust_document(
    version: u64,
    roots: &[&SecretKey],
    signing: &[&SecretKey],
    revoked: &[&SecretKey],
) -> TrustDocument {
    TrustDocument {
        version,
        issued_ms: NOW_MS - 60_000,
        root_keys: roots.iter().map(|k| k.public().to_text()).collect(),
        signing_keys: signing.iter().map(|k| k.public().to_text()).collect(),
        revoked: revoked.iter().map(|k| k.id()).collect(),
    }
}

/// The device-side check for a file of the catalogue, by its directory.
pub fn check(file: &str, bytes: &[u8]) -> Result<(), String> {
    let trust = device_trust();
    let json_error = |e: serde_json::Error| format!("does not parse: {e}");
    if file.starts_with("bundles/") {
        bundle::verify(bytes, &trust.signing(), &Limits::default())
            .map(drop)
            .map_err(|e| e.to_string())
    } else if file.starts_with("commands/") {
        let signed: SignedCommand = serde_json::from_slice(bytes).map_err(json_error)?;
        let command = signed
            .verify(&trust.signing(), DEVICE, NOW_MS, Some(LAST_SEQ))
            .map_err(|e| e.to_string())?;
        let highest = command
            .action
            .deploy()
            .and_then(|d| highest_run(&d.model.name));
        command
            .action
            .disposition(Some(&active_model()), highest)
            .map(drop)
            .map_err(|e| e.to_string())
    } else if file.starts_with("trust/") {
        let signed: SignedTrust = serde_json::from_slice(bytes).map_err(json_error)?;
        trust.apply(&signed).map(drop).map_err(|e| e.to_string())
    } else {
        Err(format!("{file} is not in the catalogue"))
    }
}

fn manifest(name: &str, version: u64) -> Manifest {
    let names: Vec<String> = ["rms", "peak", "kurtosis", "temperature"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let columns: Vec<Vec<f64>> = (0..4)
        .map(|f| (0..100).map(|i| f64::from(i * (f + 1))).collect())
        .collect();
    let mut manifest =
        Manifest::classifier(name, version, &names, &columns, 2).expect("a valid profile");
    manifest.label = Some("catalogue fixture".into());
    manifest.created_ms = NOW_MS - 3_600_000;
    manifest.outputs[0].names = vec!["normal".into(), "fault".into()];
    manifest
}

/// A bundle whose manifest is re-signed after `change`, with the artifact left as packed:
/// what someone holding a key (or forging the framing) could make that `pack` refuses to.
fn resigned(base: &[u8], key: &SecretKey, change: impl FnOnce(&mut Manifest)) -> Vec<u8> {
    let layout = bundle::layout(base, &Limits::default()).expect("a packed bundle");
    let mut manifest: Manifest =
        serde_json::from_slice(&base[layout.manifest.clone()]).expect("its manifest");
    change(&mut manifest);
    let manifest = serde_json::to_vec(&manifest).expect("manifests serialize");
    let mut out = Vec::new();
    out.extend_from_slice(bundle::MAGIC);
    out.extend_from_slice(&bundle::FORMAT.to_be_bytes());
    out.extend_from_slice(&(manifest.len() as u32).to_be_bytes());
    out.extend_from_slice(&manifest);
    out.extend_from_slice(&key.id().0);
    out.extend_from_slice(&key.sign(Context::BundleManifest, &manifest));
    out.extend_from_slice(&base[layout.signature.end..]);
    out
}

fn bundles() -> Vec<Fixture> {
    let model = edgeloop_controller::demo::MODEL_V1;
    let pack = |key: &SecretKey| bundle::pack(manifest("vibration", 3), model, key).unwrap();
    let valid = pack(&signing());
    let layout = bundle::layout(&valid, &Limits::default()).unwrap();
    let flipped = |at: usize| {
        let mut b = valid.clone();
        b[at] ^= 0x20;
        b
    };
    let bomb = {
        let zeros = vec![0u8; 8 << 20];
        let packed = bundle::pack(manifest("vibration", 3), &zeros, &signing()).unwrap();
        resigned(&packed, &signing(), |m| m.artifact.raw_size = 1024)
    };
    let mut oversize = valid.clone();
    oversize[10..14].copy_from_slice(&(5u32 << 20).to_be_bytes());
    let mut trailing = valid.clone();
    trailing.extend_from_slice(b"appended");
    vec![
        fixture(
            "bundles/valid.elb",
            "a valid bundle signed by the current key",
            valid.clone(),
            "",
        ),
        fixture(
            "bundles/flipped-manifest.elb",
            "one byte of the manifest flipped",
            flipped(layout.manifest.start + 40),
            "does not match the signed bytes",
        ),
        fixture(
            "bundles/flipped-artifact.elb",
            "one byte of the compressed model flipped",
            flipped(layout.artifact.start + 100),
            "compressed artifact SHA-256",
        ),
        fixture(
            "bundles/flipped-signature.elb",
            "one byte of the signature flipped",
            flipped(layout.signature.start + 5),
            "does not match the signed bytes",
        ),
        fixture(
            "bundles/truncated.elb",
            "the last 100 bytes cut off",
            valid[..valid.len() - 100].to_vec(),
            "the artifact is incomplete",
        ),
        fixture(
            "bundles/trailing-bytes.elb",
            "bytes appended after the artifact",
            trailing,
            "unexpected bytes after the artifact",
        ),
        fixture(
            "bundles/wrong-key.elb",
            "signed by a key the device never trusted",
            pack(&stranger()),
            "not among the trusted keys",
        ),
        fixture(
            "bundles/revoked-key.elb",
            "signed by the key the rotation document revoked",
            pack(&old_signing()),
            "which is revoked",
        ),
        fixture(
            "bundles/oversize-manifest.elb",
            "a manifest length of 5 MiB in the header",
            oversize,
            "manifest is 5242880 bytes, over the limit",
        ),
        fixture(
            "bundles/decompression-bomb.elb",
            "8 MiB of zeros whose signed manifest claims 1 KiB",
            bomb,
            "does not decompress",
        ),
        fixture(
            "bundles/path-traversal.elb",
            "a signed manifest naming the model ../../etc/passwd",
            resigned(&valid, &signing(), |m| m.name = "../../etc/passwd".into()),
            "is not a valid identifier",
        ),
    ]
}

fn command(seq: u64, version: u64, device: &str, expires_ms: u64) -> Command {
    command_of("vibration", seq, version, device, expires_ms)
}

fn command_of(name: &str, seq: u64, version: u64, device: &str, expires_ms: u64) -> Command {
    Command {
        device_id: device.into(),
        seq,
        issued_ms: NOW_MS - 1_000,
        expires_ms,
        action: CommandAction::Deploy(DeployAction {
            rollout_id: 7,
            model: ModelRef {
                name: name.into(),
                version,
            },
            bundle_url: format!("/artifacts/{name}/{version}"),
            bundle_sha256: "5e".repeat(32),
            bundle_size: 4242,
            delta: None,
        }),
    }
}

fn commands() -> Vec<Fixture> {
    let later = NOW_MS + 600_000;
    let json = |c: &Command, key: &SecretKey| {
        serde_json::to_vec_pretty(&SignedCommand::sign(c, key)).expect("commands serialize")
    };
    let tampered = {
        let mut signed = SignedCommand::sign(&command(101, 3, DEVICE, later), &signing());
        // The same command with another bundle digest, under the original signature.
        let mut forged = command(101, 3, DEVICE, later);
        if let CommandAction::Deploy(d) = &mut forged.action {
            d.bundle_sha256 = "66".repeat(32);
        }
        use base64::Engine;
        signed.command =
            base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&forged).unwrap());
        serde_json::to_vec_pretty(&signed).unwrap()
    };
    vec![
        fixture(
            "commands/valid.json",
            "a deploy of v3 signed by the current key",
            json(&command(101, 3, DEVICE, later), &signing()),
            "",
        ),
        fixture(
            "commands/tampered.json",
            "the signed bytes changed (another bundle digest) under the original signature",
            tampered,
            "does not match the signed bytes",
        ),
        fixture(
            "commands/forged.json",
            "signed by a key the device never trusted",
            json(&command(101, 3, DEVICE, later), &stranger()),
            "not among the trusted keys",
        ),
        fixture(
            "commands/revoked-key.json",
            "signed by the revoked key",
            json(&command(101, 3, DEVICE, later), &old_signing()),
            "which is revoked",
        ),
        fixture(
            "commands/wrong-target.json",
            "meant for another device",
            json(&command(101, 3, "fixture-2", later), &signing()),
            "is for device `fixture-2`",
        ),
        fixture(
            "commands/expired.json",
            "expired a second before the device sees it",
            json(&command(101, 3, DEVICE, NOW_MS - 1_000), &signing()),
            "expired",
        ),
        fixture(
            "commands/replayed.json",
            "a sequence number the device already accepted",
            json(&command(LAST_SEQ, 3, DEVICE, later), &signing()),
            "is not above the last accepted",
        ),
        fixture(
            "commands/older-version.json",
            "a deploy (not a rollback) of v1 while v2 is active",
            json(&command(101, 1, DEVICE, later), &signing()),
            "only a rollback command installs it",
        ),
        fixture(
            "commands/below-highest.json",
            "a deploy of gearbox v3, which the device ran up to v4 before vibration",
            json(&command_of("gearbox", 101, 3, DEVICE, later), &signing()),
            "below version 4, which this device has run",
        ),
    ]
}

fn trust_documents() -> Vec<Fixture> {
    let json = |signed: &SignedTrust| serde_json::to_vec_pretty(signed).expect("serializes");
    // Version 2, with these roots, signing keys and revocations, signed by `by`.
    let next = |roots: &[&SecretKey], signing: &[&SecretKey], revoked: &[&SecretKey], by| {
        json(&SignedTrust::sign(
            &trust_document(2, roots, signing, revoked),
            by,
        ))
    };
    let (root, signing, old) = (root(), signing(), old_signing());
    vec![
        fixture(
            "trust/next.json",
            "version 2 from the root, keeping the current keys",
            next(&[&root], &[&signing], &[], &root),
            "",
        ),
        fixture(
            "trust/replayed.json",
            "the rotation document (version 1) again",
            json(&rotation()),
            "is not above the applied 1",
        ),
        fixture(
            "trust/not-root.json",
            "signed by the signing key, which is no root",
            next(&[&signing], &[&signing], &[&root], &signing),
            "not among the trusted keys",
        ),
        fixture(
            "trust/revoked-signer.json",
            "signed by the revoked key",
            next(&[&old], &[&old], &[], &old),
            "signed by revoked key",
        ),
        fixture(
            "trust/lists-revoked.json",
            "a root document trusting the revoked key again",
            next(&[&root], &[&old], &[], &root),
            "both lists and revokes",
        ),
    ]
}

/// The whole catalogue, in README order.
pub fn catalogue() -> Vec<Fixture> {
    let mut all = bundles();
    all.extend(commands());
    all.extend(trust_documents());
    all
}

/// `tests/data/README.md`: what each file is and what it must be refused with.
pub fn readme(catalogue: &[Fixture]) -> String {
    let mut out = String::from(
        "# Malicious fixtures\n\n\
         Generated by `cargo run -p edgeloop-tests --bin make-fixtures` (`tests/src/fixtures.rs`);\n\
         `tests/tests/fixtures.rs` checks that these files are what it makes and that the\n\
         device's checks refuse each one as listed. The device is configured with the root\n\
         key and the old signing key, has applied the rotation document (version 1: the new\n\
         signing key, the old one revoked), serves vibration v2, ran gearbox up to v4 before\n\
         it, and last accepted command sequence 100. Keys come from fixed seeds: test keys,\n\
         never a fleet's.\n\n\
         | file | what | refused with |\n|---|---|---|\n",
    );
    for f in catalogue {
        let refused = if f.refused_with.is_empty() {
            "accepted (the valid example)".to_string()
        } else {
            format!("…{}…", f.refused_with)
        };
        out.push_str(&format!("| `{}` | {} | {} |\n", f.file, f.what, refused));
    }
    out
}

/// Writes the catalogue and its README under `dir`.
pub fn write_all(dir: &Path) -> std::io::Result<()> {
    let catalogue = catalogue();
    for f in &catalogue {
        let path = dir.join(f.file);
        std::fs::create_dir_all(path.parent().expect("a directory"))?;
        std::fs::write(path, &f.bytes)?;
    }
    std::fs::write(dir.join("README.md"), readme(&catalogue))
}
