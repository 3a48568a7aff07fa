//! TLS and mutual TLS to a broker: a private Mosquitto with a TLS listener that requires
//! client certificates (made here with rcgen). The controller and an agent holding
//! certificates from the fleet's CA get through; an agent without a client certificate,
//! and one that does not trust the broker's CA, do not, and keep what they produced.

use std::path::Path;
use std::time::Duration;

use edgeloop_agent::link::TlsFiles;
use edgeloop_controller::config::ControllerConfig;
use edgeloop_controller::server::Controller;
use edgeloop_tests::{
    ControllerEndpoints, Mosquitto, TestAgent, agent_config, agent_outbox, free_port,
    wait_for_port, wait_until,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use tokio_util::sync::CancellationToken;

/// A CA and certificates it signed, written as PEM files into `dir`.
struct Pki {
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let ca_key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        Pki { ca, ca_key }
    }

    fn write_ca(&self, path: &Path) {
        std::fs::write(path, self.ca.pem()).unwrap();
    }

    /// Issues a certificate for `names` (DNS names or IP addresses); writes cert and key.
    fn issue(&self, names: &[&str], cert: &Path, key: &Path) {
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key_pair = KeyPair::generate().unwrap();
        let issued = params.signed_by(&key_pair, &self.ca, &self.ca_key).unwrap();
        std::fs::write(cert, issued.pem()).unwrap();
        std::fs::write(key, key_pair.serialize_pem()).unwrap();
    }
}

fn files(dir: &Path, name: &str, ca: &Path) -> TlsFiles {
    TlsFiles {
        ca_file: ca.to_path_buf(),
        cert_file: dir.join(format!("{name}.pem")),
        key_file: dir.join(format!("{name}.key")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_lets_in_holders_of_fleet_certificates_only() {
    edgeloop_tests::init_tracing();
    if !Mosquitto::available() {
        eprintln!("skipped: no mosquitto binary");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Readable by the user Mosquitto drops to.
    let pki_dir = Mosquitto::writable_dir(dir.path(), "pki");
    let fleet = Pki::new("edgeloop test fleet CA");
    let ca = pki_dir.join("ca.pem");
    fleet.write_ca(&ca);
    fleet.issue(
        &["localhost", "127.0.0.1"],
        &pki_dir.join("broker.pem"),
        &pki_dir.join("broker.key"),
    );
    for name in ["controller", "good-1"] {
        fleet.issue(
            &[name],
            &pki_dir.join(format!("{name}.pem")),
            &pki_dir.join(format!("{name}.key")),
        );
    }
    for f in std::fs::read_dir(&pki_dir).unwrap() {
        std::fs::set_permissions(
            f.unwrap().path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
    }
    let port = free_port();
    let config = dir.path().join("mosquitto.conf");
    std::fs::write(
        &config,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\ncafile {ca}\ncertfile {dir}/broker.pem\nkeyfile {dir}/broker.key\nrequire_certificate true\nlog_type error\n",
            ca = ca.display(),
            dir = pki_dir.display()
        ),
    )
    .unwrap();
    let _broker = Mosquitto::start(&config);
    wait_for_port(port).await;

    let shutdown = CancellationToken::new();
    let key = edgeloop_controller::keys::generate().unwrap();
    let url = format!("mqtts://127.0.0.1:{port}");
    let controller_tls = files(&pki_dir, "controller", &ca);
    let controller = Controller::start(
        ControllerConfig {
            data_dir: dir.path().join("controller"),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            mqtt_url: url.clone(),
            mqtt_client_id: "tls-controller".into(),
            mqtt_ca_file: controller_tls.ca_file,
            mqtt_cert_file: controller_tls.cert_file,
            mqtt_key_file: controller_tls.key_file,
            ..ControllerConfig::default()
        },
        key.clone(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let endpoints = ControllerEndpoints {
        mqtt_url: url,
        http_url: controller.http_url(),
        trusted_key: key.public().to_text(),
        root: "edgeloop".into(),
    };
    let agent = |id: &str, tls: TlsFiles| {
        let mut config = agent_config(id, 20, &endpoints, &dir.path().join(id));
        config.tls = tls;
        config
    };
    let good = agent("good-1", files(&pki_dir, "good-1", &ca));
    // No client certificate.
    let anonymous = agent(
        "anon-1",
        TlsFiles {
            ca_file: ca.clone(),
            ..TlsFiles::default()
        },
    );
    // A client certificate, but trusting another CA than the broker's.
    let stranger_ca = pki_dir.join("other-ca.pem");
    Pki::new("someone else").write_ca(&stranger_ca);
    let mut distrustful = agent("wary-1", files(&pki_dir, "good-1", &stranger_ca));
    distrustful.device_id = "wary-1".into();
    let agents: Vec<TestAgent> = [&good, &anonymous, &distrustful]
        .into_iter()
        .map(|c| TestAgent::spawn(c.clone(), &shutdown))
        .collect();

    let store = controller.store.clone();
    wait_until(
        "the certified device registers",
        Duration::from_secs(30),
        || async {
            store
                .devices()
                .await
                .unwrap()
                .iter()
                .any(|d| d.id == "good-1")
        },
    )
    .await;
    // Meanwhile the others have been producing heartbeats they cannot deliver.
    wait_until(
        "refused devices keep their heartbeats",
        Duration::from_secs(20),
        || async {
            agent_outbox(&anonymous.state_dir, "status").len() >= 3
                && agent_outbox(&distrustful.state_dir, "status").len() >= 3
        },
    )
    .await;
    let ids: Vec<String> = store
        .devices()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids, ["good-1"]);
    for a in agents {
        a.stop().await;
    }
    shutdown.cancel();
    controller.stop().await;
}

#[test]
fn incomplete_or_unreadable_tls_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let only_cert = TlsFiles {
        cert_file: dir.path().join("x.pem"),
        ..TlsFiles::default()
    };
    assert!(
        only_cert
            .client_config()
            .unwrap_err()
            .to_string()
            .contains("both or neither")
    );
    let missing = TlsFiles {
        ca_file: dir.path().join("missing.pem"),
        ..TlsFiles::default()
    };
    assert!(
        missing
            .client_config()
            .unwrap_err()
            .to_string()
            .contains("missing.pem")
    );
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let no_certs = TlsFiles {
        ca_file: empty,
        ..TlsFiles::default()
    };
    assert!(
        no_certs
            .client_config()
            .unwrap_err()
            .to_string()
            .contains("no certificate")
    );
}
