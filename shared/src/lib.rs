//! edgeloop's pure core, shared by the agent, the controller and any other implementation
//! of the protocol.
//!
//! Everything here is deterministic and free of I/O: no tokio, no sockets, no files, no
//! clock. Callers pass in bytes and timestamps and get back typed values or errors that
//! say which check failed.
//!
//! - [`protocol`]: the versioned envelope and the v1 message kinds.
//! - [`topics`]: the MQTT topic scheme.
//! - [`signing`]: ed25519 keys, key ids and verification against a set of trusted keys.
//! - [`command`]: signed controller → device commands (expiry, sequence, target).
//! - [`bundle`]: the signed model bundle (manifest + zstd-compressed ONNX + signature).
//! - [`trust`]: trust documents: root keys rotate and revoke signing keys.
//! - [`drift`]: reference profiles, drift windows and PSI.
//! - [`npy`]: NumPy's NPY files: tensors, and a tensor model's sample of inputs.

pub mod batch;
pub mod bundle;
pub mod command;
pub mod drift;
mod json_scan;
pub mod msgpack;
pub mod npy;
pub mod protocol;
pub mod signing;
pub mod stats;
pub mod topics;
pub mod trust;

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// `n` pseudo-random bytes from `seed` (a linear congruential generator): incompressible,
/// and the same for the same seed. For tests and benchmarks that need model-like bytes.
pub fn pseudo_random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 56) as u8
        })
        .collect()
}

/// True when `name` is safe to use as a device id, model name or other identifier that ends
/// up in an MQTT topic level or a file name: 1–64 characters of `[A-Za-z0-9_.-]`, not
/// starting with a dot.
pub fn is_valid_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_refuse_topic_and_path_metacharacters() {
        for ok in ["dev-1", "sim_001", "a.b", "X"] {
            assert!(is_valid_identifier(ok), "{ok}");
        }
        let long = "a".repeat(65);
        for bad in [
            "",
            "a/b",
            "+",
            "#",
            "..",
            ".hidden",
            "a b",
            long.as_str(),
            "é",
        ] {
            assert!(!is_valid_identifier(bad), "{bad}");
        }
    }
}
