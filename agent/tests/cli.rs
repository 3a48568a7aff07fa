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
        ("[api]\nlisten = \"localhost\"\n", "api.listen"),
        ("[api]\nmax_rows = 0\n", "api.max_rows"),
    ] {
        std::fs::write(&path, text).unwrap();
        let (ok, _, err) = run(&["check-config", "--config", path.to_str().unwrap()]);
        assert!(!ok, "{text} was accepted");
        assert!(err.contains(key), "{text}: {err}");
    }
}

fn compat_model(name: &str) -> String {
    format!("{}/tests/compat/{name}.onnx", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn bench_prints_one_json_object_on_its_last_line() {
    let model = compat_model("cnn");
    let (ok, out, err) = run(&[
        "bench",
        &model,
        "--input",
        "image:2x3x32x32",
        "--runs",
        "10",
        "--output",
        "json",
    ]);
    assert!(ok, "{err}");
    let last = out.lines().last().unwrap();
    let report: serde_json::Value = serde_json::from_str(last).unwrap();
    for key in ["load_ms", "p50_ms", "p99_ms", "peak_rss_kb"] {
        assert!(report[key].is_number(), "{key} in {last}");
    }
    assert!(report["p50_ms"].as_f64() <= report["p99_ms"].as_f64());
    assert_eq!(report["runs"], 10);
    assert_eq!(
        report["inputs"][0]["shape"],
        serde_json::json!([2, 3, 32, 32])
    );
    assert_eq!(report["outputs"][0]["name"], "scores");
    assert_eq!(report["outputs"][0]["shape"], serde_json::json!([2, 10]));

    let (ok, text, err) = run(&["bench", &model, "--runs", "5"]);
    assert!(ok, "{err}");
    assert!(text.contains("p99") && text.contains("peak RSS"), "{text}");
    assert!(text.contains("axis 0 is symbolic"), "{text}");
}

#[test]
fn bench_refuses_what_it_cannot_run_and_says_why() {
    let model = compat_model("cnn");
    for (args, needle) in [
        (vec!["--input", "image:1x3x32"], "declared as ?x3x32x32"),
        (
            vec!["--input", "pixels:1x3x32x32"],
            "no input named `pixels`",
        ),
        (vec!["--input", "image:1by3"], "NAME:DIMS[:DTYPE]"),
        (vec!["--runs", "0"], "--runs"),
    ] {
        let mut all = vec!["bench", model.as_str()];
        all.extend(args.iter().copied());
        let (ok, _, err) = run(&all);
        assert!(!ok, "{args:?} was accepted");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let (ok, _, err) = run(&["bench", "/nonexistent/model.onnx"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/model.onnx"), "{err}");
}

#[test]
fn samples_exports_the_kept_inputs_as_csv() {
    use edgeloop_agent::reservoir::{FILE, Offered, Reservoir, SampledModel};
    use edgeloop_shared::protocol::ModelRef;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_str().unwrap();
    let (ok, _, err) = run(&["samples", "--state-dir", state]);
    assert!(!ok && err.contains("has kept no sample"), "{err}");

    let mut reservoir = Reservoir::open(&dir.path().join(FILE), 1 << 20).unwrap();
    let model = ModelRef {
        name: "vibration".into(),
        version: 3,
    };
    let sampled = SampledModel {
        model: model.clone(),
        features: vec!["rms".into(), "temperature".into()],
        shape: None,
    };
    let first = Offered {
        request_key: Some("r/0"),
        values: &[1.5, 40.0],
        predicted: Some(0.0),
        label: None,
        seen_ms: 1,
        chance: 1.0,
    };
    reservoir.offer(&sampled, first).unwrap();
    let second = Offered {
        request_key: None,
        values: &[2.5, 60.0],
        predicted: Some(1.0),
        label: Some(1.0),
        seen_ms: 2,
        ..first
    };
    reservoir.offer(&sampled, second).unwrap();
    reservoir.label("r/0", 1.0).unwrap();
    drop(reservoir);

    let out = dir.path().join("samples.csv");
    let (ok, _, err) = run(&[
        "samples",
        "--state-dir",
        state,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("2 inputs of vibration v3 kept (2 labelled) from 2 seen"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "rms,temperature,predicted,label\n1.5,40,0,1\n2.5,60,1,1\n"
    );

    // A tensor model's sample is an NPY file of records, which needs --out.
    let mut reservoir = Reservoir::open(&dir.path().join(FILE), 1 << 20).unwrap();
    let images = SampledModel {
        model: ModelRef {
            name: "cnn".into(),
            version: 1,
        },
        features: vec!["image".into()],
        shape: Some(vec![2, 2]),
    };
    let image = Offered {
        values: &[1.0, 2.0, 3.0, 4.0],
        ..first
    };
    reservoir.offer(&images, image).unwrap();
    drop(reservoir);
    let (ok, _, err) = run(&["samples", "--state-dir", state]);
    assert!(!ok && err.contains("name it with --out"), "{err}");
    let npy = dir.path().join("samples.npy");
    let (ok, _, err) = run(&[
        "samples",
        "--state-dir",
        state,
        "--out",
        npy.to_str().unwrap(),
    ]);
    assert!(ok && err.contains("1 inputs of cnn v1 kept"), "{err}");
    let file = edgeloop_shared::npy::read_sample(&std::fs::read(&npy).unwrap()).unwrap();
    assert_eq!((file.row_shape, file.rows), (vec![2, 2], 1));
}

#[test]
fn device_key_prints_the_key_it_makes_once_and_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let args = ["device-key", "--state-dir", state.to_str().unwrap()];
    let (ok, first, err) = run(&args);
    assert!(ok, "{err}");
    let first = first.trim();
    assert!(first.starts_with("ed25519:"), "{first}");
    edgeloop_shared::signing::PublicKey::parse(first).unwrap();
    let (ok, second, _) = run(&args);
    assert!(ok);
    assert_eq!(second.trim(), first, "the key is made once and kept");
    assert!(state.join("device.key").exists());
}
