//! `edgeloop-agent` as operators run it: the printed default configuration is a valid file,
//! and a bad configuration is a clear error naming the key, before anything starts.

use std::process::Command;

const AGENT: &str = env!("CARGO_BIN_EXE_edgeloop-agent");

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(AGENT).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_printed_default_config_is_a_valid_config_file() {
    let (ok, text, _) = run(&["print-default-config"]);
    assert!(ok);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).unwrap();
    let (ok, effective, err) = run(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(effective.contains("budget_bytes"), "{effective}");
}

#[test]
fn bad_configs_name_the_key_at_fault() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    for (text, key) in [
        ("[outbox]\nbudget_bytes = 10\n", "outbox.budget_bytes"),
        (
            "[batching]\nmax_payload_bytes = 999999999\n",
            "batching.max_payload_bytes",
        ),
        ("[batching]\ncompression = \"lz4\"\n", "compression"),
        (
            "broker_url = \"mqtts://127.0.0.1:8883\"\n[tls]\ncert_file = \"client.pem\"\n",
            "tls",
        ),
        ("broker_url = \"http://x\"\n", "broker_url"),
    ] {
        std::fs::write(&path, text).unwrap();
        let (ok, _, err) = run(&["check-config", "--config", path.to_str().unwrap()]);
        assert!(!ok, "{text} was accepted");
        assert!(err.contains(key), "{text}: {err}");
    }
}
