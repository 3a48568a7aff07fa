//! One suite for every store backend.

use edgeloop_shared::drift::{FeatureWindow, Residuals, WindowStats};
use edgeloop_shared::protocol::{
    DeployStage, DeploymentStatus, DeviceStatus, DriftSummary, DropCounts, Envelope, Format,
    Message, ModelRef, OutboxStatus, Receipt, SAMPLE_CHUNK_BYTES, SampleChunk,
};

use super::*;

fn model_ref(version: u64) -> ModelRef {
    ModelRef {
        name: "m".into(),
        version,
    }
}

fn status(device: &str, msg_id: &str, online: bool, version: Option<u64>) -> Envelope {
    Envelope::new(
        device,
        msg_id,
        1,
        Message::Status(DeviceStatus {
            online,
            agent_version: "0.1.0".into(),
            model: version.map(model_ref),
            uptime_s: 1,
            inferences: 10,
            errors: 1,
            malformed_messages: 0,
            outbox: OutboxStatus {
                entries: 3,
                bytes: 300,
                budget_bytes: 4096,
                dropped: DropCounts {
                    control: 0,
                    telemetry: 7,
                    samples: 2,
                },
            },
            trust_version: 3,
        }),
    )
}

fn drift(device: &str, msg_id: &str, samples: u64, psi: f64) -> Envelope {
    Envelope::new(
        device,
        msg_id,
        1,
        Message::DriftSummary(DriftSummary {
            model: model_ref(1),
            window_seq: 1,
            stats: WindowStats {
                samples,
                start_ms: 10,
                end_ms: 20,
                features: vec![FeatureWindow {
                    name: "x".into(),
                    counts: vec![0, samples, 0],
                    nan: 0,
                    psi,
                    ..FeatureWindow::default()
                }],
                psi_max: psi,
                predictions: vec![samples],
                ..WindowStats::default()
            },
        }),
    )
}

fn deployment(device: &str, msg_id: &str, rollout: u64, stage: DeployStage) -> Envelope {
    Envelope::new(
        device,
        msg_id,
        1,
        Message::DeploymentStatus(DeploymentStatus {
            rollout_id: Some(rollout),
            command_seq: 1,
            model: Some(model_ref(1)),
            stage,
            detail: None,
        }),
    )
}

fn model_row(version: u64) -> ModelRow {
    ModelRow {
        name: "m".into(),
        version,
        label: None,
        created_ms: 5,
        bundle_sha256: "ab".repeat(32),
        bundle_size: 99,
        features: vec!["x".into()],
        signed_by: "0011223344556677".into(),
        lineage: (version == 2).then(|| Lineage {
            parent_version: Some(1),
            gates: [("quality".to_string(), "passed".to_string())].into(),
            ..Lineage::default()
        }),
        requirements: match version {
            2 => Requirements {
                targets: vec!["aarch64".into()],
                boards: vec!["rpi4".into()],
                ..Requirements::default()
            },
            _ => Requirements::default(),
        },
    }
}

fn new_rollout(version: u64, rollback: bool, devices: &[&str], now_ms: u64) -> NewRollout {
    NewRollout {
        name: "m".into(),
        version,
        rollback,
        devices: devices.iter().map(|d| d.to_string()).collect(),
        plan: RolloutPlan::default(),
        target: None,
        now_ms,
    }
}

pub async fn suite(store: &dyn Store) {
    // Devices register themselves with their first message; duplicates change nothing.
    assert_eq!(
        store
            .ingest(&status("d1", "s1", true, None), 100)
            .await
            .unwrap(),
        Ingested::Stored
    );
    assert_eq!(
        store
            .ingest(&status("d1", "s1", true, None), 101)
            .await
            .unwrap(),
        Ingested::Duplicate
    );
    store
        .ingest(&status("d2", "s2", true, Some(1)), 100)
        .await
        .unwrap();
    let devices = store.devices().await.unwrap();
    assert_eq!(devices.len(), 2);
    assert_eq!(devices[1].model_version, Some(1));
    assert_eq!(devices[0].last_seen_ms, 100);
    assert_eq!(devices[0].outbox.dropped.telemetry, 7);
    assert_eq!(devices[0].outbox.dropped.samples, 2);
    assert_eq!(devices[0].outbox.budget_bytes, 4096);
    assert_eq!(devices[0].trust_version, 3, "the trust version it reports");

    // A batch is one transaction with one result per message.
    assert_eq!(
        store
            .ingest_many(
                Arc::from([
                    status("d1", "s1", true, None),
                    status("d3", "b1", true, None),
                    status("d3", "b2", true, None),
                ]),
                120,
            )
            .await
            .unwrap(),
        [Ingested::Duplicate, Ingested::Stored, Ingested::Stored]
    );
    // A message no device may send fails the whole batch, which then leaves no trace.
    let poisoned = [
        status("d4", "b3", true, None),
        Envelope::new("d4", "b4", 1, Message::Receipt(Receipt::default())),
    ];
    assert!(matches!(
        store.ingest_many(Arc::from(poisoned.clone()), 130).await,
        Err(StoreError::Corrupt(_))
    ));
    assert_eq!(
        store.ingest(&poisoned[0], 131).await.unwrap(),
        Ingested::Stored,
        "the failed batch's first message was rolled back"
    );
    let devices = store.devices().await.unwrap();
    assert_eq!(
        devices.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["d1", "d2", "d3", "d4"]
    );

    // The last will only changes presence.
    store
        .ingest(&status("d2", "s3", false, None), 150)
        .await
        .unwrap();
    let d2 = store.devices().await.unwrap().remove(1);
    assert!(!d2.online);
    assert_eq!(d2.model_version, Some(1));
    assert_eq!(d2.last_seen_ms, 150);

    // Telemetry is stored once per message id, newest first.
    store
        .ingest(&drift("d1", "t1", 100, 0.05), 200)
        .await
        .unwrap();
    store
        .ingest(&drift("d1", "t2", 40, 0.3), 300)
        .await
        .unwrap();
    assert_eq!(
        store
            .ingest(&drift("d1", "t2", 40, 0.3), 301)
            .await
            .unwrap(),
        Ingested::Duplicate
    );
    let t = store.telemetry("d1", 10).await.unwrap();
    assert_eq!(t.iter().map(|r| r.samples).collect::<Vec<_>>(), [40, 100]);
    assert_eq!(t[0].summary["stats"]["samples"], 40);
    assert_eq!(store.telemetry("d1", 1).await.unwrap().len(), 1);
    // d1 reported no model yet, so any summary is its current figure.
    assert_eq!(store.devices().await.unwrap()[0].last_psi_max, Some(0.3));
    // Once it serves v2, a late v1 summary no longer counts as its drift figure.
    store
        .ingest(&status("d1", "s5", true, Some(2)), 310)
        .await
        .unwrap();
    assert_eq!(store.devices().await.unwrap()[0].last_psi_max, None);
    store
        .ingest(&drift("d1", "t3", 10, 0.9), 320)
        .await
        .unwrap();
    assert_eq!(store.devices().await.unwrap()[0].last_psi_max, None);
    assert_eq!(store.telemetry("d1", 10).await.unwrap().len(), 3);
    // In one transaction, the last summary of the served model gives the figure, and a
    // late one of the previous model does not. A summary as received (here spelled with
    // spaces) is stored as it came and reads back as what it says.
    let v2 = |msg_id: &str, psi: f64| {
        let mut e = drift("d1", msg_id, 5, psi);
        if let Message::DriftSummary(s) = &mut e.message {
            s.model = model_ref(2);
        }
        e
    };
    let spaced = String::from_utf8(v2("t5", 0.4).encode())
        .unwrap()
        .replace(r#""payload":"#, r#""payload":  "#)
        .replace(r#""samples":"#, r#""samples" : "#);
    let received = Envelope::decode(spaced.as_bytes()).unwrap();
    assert!(matches!(
        received.received_payload(),
        Some(ReceivedPayload::Json(text)) if text.contains(r#""samples" : "#)
    ));
    // The same summary in MessagePack, kept as received too.
    let packed = Envelope::decode(&v2("t7", 0.4).encode_as(Format::Msgpack)).unwrap();
    assert!(matches!(
        packed.received_payload(),
        Some(ReceivedPayload::Msgpack(_))
    ));
    // A summary stored before, or twice in the transaction, is a duplicate.
    assert_eq!(
        store
            .ingest_many(
                Arc::from([
                    v2("t4", 0.7),
                    received.clone(),
                    drift("d1", "t6", 5, 0.2),
                    drift("d1", "t6", 5, 0.2),
                    drift("d1", "t2", 40, 0.3),
                    packed.clone(),
                    packed.clone(),
                ]),
                330,
            )
            .await
            .unwrap(),
        [
            Ingested::Stored,
            Ingested::Stored,
            Ingested::Stored,
            Ingested::Duplicate,
            Ingested::Duplicate,
            Ingested::Stored,
            Ingested::Duplicate
        ]
    );
    assert_eq!(store.devices().await.unwrap()[0].last_psi_max, Some(0.4));
    let stored = store.telemetry("d1", 10).await.unwrap();
    assert_eq!(stored.len(), 7);
    let Message::DriftSummary(s) = &received.message else {
        unreachable!()
    };
    // Read back the same whichever spelling it came in.
    for id in ["t5", "t7"] {
        let row = stored.iter().find(|r| r.msg_id == id).unwrap();
        assert_eq!(row.summary, serde_json::to_value(s).unwrap(), "{id}");
    }

    // Models: unique per name and version.
    store.insert_model(&model_row(1)).await.unwrap();
    assert!(matches!(
        store.insert_model(&model_row(1)).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.models().await.unwrap(), vec![model_row(1)]);
    assert_eq!(store.model("m", 1).await.unwrap(), Some(model_row(1)));
    assert_eq!(store.model("m", 2).await.unwrap(), None);

    // Rollouts need a known model and known devices.
    assert!(matches!(
        store
            .create_rollout(&new_rollout(9, false, &["d1"], 400))
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store
            .create_rollout(&new_rollout(1, false, &["nope"], 400))
            .await,
        Err(StoreError::NotFound(_))
    ));
    let r = store
        .create_rollout(&new_rollout(1, false, &["d1", "d2"], 400))
        .await
        .unwrap();
    assert_eq!(r.status, RolloutStatus::InProgress);
    assert_eq!(r.deployments.len(), 2);

    // Only online devices are due; a sent command is not due again until it goes quiet.
    let due = store.due_deployments(0).await.unwrap();
    assert_eq!(
        due.iter().map(|d| d.device_id.as_str()).collect::<Vec<_>>(),
        ["d1"]
    );
    assert_eq!(due[0].bundle_size, 99);
    let seq = store.mark_sent(r.id, "d1", 500).await.unwrap().unwrap();
    assert!(seq >= 500, "sequence never below the clock");
    let again = store.mark_sent(r.id, "d1", 500).await.unwrap().unwrap();
    assert!(again > seq, "sequences only go up");
    assert!(store.due_deployments(400).await.unwrap().is_empty());
    assert_eq!(store.due_deployments(501).await.unwrap().len(), 1);

    // Reports move deployments on; finished ones stay finished.
    store
        .ingest(&deployment("d1", "p1", r.id, DeployStage::Downloading), 600)
        .await
        .unwrap();
    store
        .ingest(&deployment("d1", "p2", r.id, DeployStage::Active), 610)
        .await
        .unwrap();
    store
        .ingest(&deployment("d1", "p3", r.id, DeployStage::Verifying), 620)
        .await
        .unwrap();
    let row = store.rollout(r.id).await.unwrap().unwrap();
    assert_eq!(row.deployments[0].status, "active");
    assert_eq!(
        store.mark_sent(r.id, "d1", 630).await.unwrap(),
        None,
        "a finished deployment is not sent again"
    );
    assert_eq!(
        store.rollout(r.id).await.unwrap().unwrap().deployments[0].command_seq,
        Some(again)
    );
    assert_eq!(row.status, RolloutStatus::InProgress);
    let events = store.deployment_events("d1", 10).await.unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0].stage, "verifying");

    // A new rollout supersedes the unfinished deployment of the old one.
    store.insert_model(&model_row(2)).await.unwrap();
    assert_eq!(
        store.model("m", 2).await.unwrap(),
        Some(model_row(2)),
        "lineage and requirements kept"
    );
    let r2 = store
        .create_rollout(&new_rollout(2, true, &["d2"], 700))
        .await
        .unwrap();
    assert!(r2.rollback && !r.rollback);
    let old = store.rollout(r.id).await.unwrap().unwrap();
    assert_eq!(old.deployments[1].status, "superseded");
    assert_eq!(old.status, RolloutStatus::Completed);
    // The health window's verdict still changes an active deployment, and then nothing does.
    store
        .ingest(&deployment("d1", "p5", r.id, DeployStage::RolledBack), 705)
        .await
        .unwrap();
    store
        .ingest(&deployment("d1", "p6", r.id, DeployStage::Committed), 706)
        .await
        .unwrap();
    let old = store.rollout(r.id).await.unwrap().unwrap();
    assert_eq!(old.deployments[0].status, "rolled_back");
    assert_eq!(old.status, RolloutStatus::Failed);
    store
        .ingest(&status("d2", "s4", true, Some(1)), 710)
        .await
        .unwrap();
    let due = store.due_deployments(0).await.unwrap();
    assert!(
        due.iter().any(|d| d.rollout_id == r2.id && d.rollback),
        "{due:?}"
    );
    store
        .ingest(&deployment("d2", "p4", r2.id, DeployStage::Failed), 720)
        .await
        .unwrap();
    assert_eq!(
        store.rollout(r2.id).await.unwrap().unwrap().status,
        RolloutStatus::Failed
    );
    assert_eq!(store.rollouts().await.unwrap().len(), 2);
    assert!(store.rollout(99).await.unwrap().is_none());

    hourly_aggregates_and_retention(store).await;
    waves_pauses_aborts_timeouts_and_the_audit_log(store).await;
    retraining_windows_and_records(store).await;
    enrollment_tokens_and_approvals(store).await;
    devices_enrolled_later_join_the_rollout_of_their_group(store).await;
    the_trust_document_is_replaced_only_from_the_version_it_was_checked_against(store).await;
    dataset_uploads_are_put_together_checked_and_expired(store).await;
    deltas_are_offered_to_devices_running_their_base(store).await;

    // Registration adds what is new and leaves known devices as they are.
    assert!(!store.device_exists("reg-1").await.unwrap());
    assert_eq!(
        store
            .register_devices(&["reg-1".into(), "d1".into()])
            .await
            .unwrap(),
        1
    );
    assert!(store.device_exists("reg-1").await.unwrap());
    let devices = store.devices().await.unwrap();
    let reg = devices.iter().find(|d| d.id == "reg-1").unwrap();
    assert!(!reg.online && reg.last_seen_ms == 0 && reg.model_name.is_none());
    assert_eq!(
        devices.iter().find(|d| d.id == "d1").unwrap().inferences,
        10
    );

    // One holder at a time; the lease passes on when it expires.
    assert!(store.acquire_lease("job", "a", 1000, 100).await.unwrap());
    assert!(!store.acquire_lease("job", "b", 1050, 100).await.unwrap());
    assert!(
        store.acquire_lease("job", "a", 1090, 100).await.unwrap(),
        "renewed"
    );
    assert!(!store.acquire_lease("job", "b", 1180, 100).await.unwrap());
    assert!(
        store.acquire_lease("job", "b", 1191, 100).await.unwrap(),
        "expired: taken over"
    );
    assert!(!store.acquire_lease("job", "a", 1200, 100).await.unwrap());
    assert!(store.acquire_lease("other", "a", 1200, 100).await.unwrap());
}

/// A deployment carries the delta bundle whose base the device reports running, of the
/// same model; none for a device running another model or nothing, none for a rollback.
async fn deltas_are_offered_to_devices_running_their_base(store: &dyn Store) {
    for version in 1..=3 {
        store
            .insert_model(&ModelRow {
                name: "dm".into(),
                ..model_row(version)
            })
            .await
            .unwrap();
    }
    let delta = |version: u64, base_version: u64, size: u64| ModelDelta {
        name: "dm".into(),
        version,
        base_version,
        base_sha256: format!("{base_version:02}").repeat(32),
        bundle_sha256: format!("{version}{base_version}").repeat(32),
        bundle_size: size,
    };
    store.insert_model_delta(&delta(3, 2, 10)).await.unwrap();
    store.insert_model_delta(&delta(3, 1, 30)).await.unwrap();
    store.insert_model_delta(&delta(3, 2, 20)).await.unwrap();
    store.insert_model_delta(&delta(1, 2, 5)).await.unwrap();
    assert_eq!(
        store.model_deltas("dm", 3).await.unwrap(),
        vec![delta(3, 1, 30), delta(3, 2, 20)],
        "by base; recording again replaces"
    );
    assert!(store.model_deltas("dm", 2).await.unwrap().is_empty());

    let running = |device: &str, msg_id: &str, model: Option<(&str, u64)>| {
        let mut envelope = status(device, msg_id, true, None);
        if let Message::Status(s) = &mut envelope.message {
            s.model = model.map(|(name, version)| ModelRef {
                name: name.into(),
                version,
            });
        }
        envelope
    };
    for (device, model) in [
        ("x1", Some(("dm", 2))),
        ("x2", Some(("dm", 1))),
        ("x3", Some(("m", 2))),
        ("x4", None),
    ] {
        store
            .ingest(&running(device, &format!("{device}-s"), model), 9000)
            .await
            .unwrap();
    }
    let rollout = store
        .create_rollout(&NewRollout {
            name: "dm".into(),
            ..new_rollout(3, false, &["x1", "x2", "x3", "x4"], 9100)
        })
        .await
        .unwrap();
    let offered = |due: Vec<DueDeployment>, id: u64| -> Vec<(String, Option<u64>)> {
        due.into_iter()
            .filter(|d| d.rollout_id == id)
            .map(|d| (d.device_id, d.delta.map(|x| x.base_version)))
            .collect()
    };
    assert_eq!(
        offered(store.due_deployments(0).await.unwrap(), rollout.id),
        vec![
            ("x1".to_string(), Some(2)),
            ("x2".to_string(), Some(1)),
            ("x3".to_string(), None),
            ("x4".to_string(), None),
        ]
    );
    let due = store.due_deployments(0).await.unwrap();
    let x1 = due
        .iter()
        .find(|d| d.rollout_id == rollout.id && d.device_id == "x1")
        .unwrap();
    assert_eq!(x1.delta, Some(delta(3, 2, 20)));

    let rollback = store
        .create_rollout(&NewRollout {
            name: "dm".into(),
            ..new_rollout(1, true, &["x1"], 9200)
        })
        .await
        .unwrap();
    assert_eq!(
        offered(store.due_deployments(0).await.unwrap(), rollback.id),
        vec![("x1".to_string(), None)],
        "a rollback takes the full bundle"
    );
}

fn chunk_envelope(device: &str, msg_id: &str, chunk: SampleChunk) -> Envelope {
    Envelope::new(device, msg_id, 1, Message::SampleChunk(chunk))
}

/// Upload commands go to online devices that have not answered; chunks in any order and
/// repeated make one checked file; a newer command's upload replaces an older one's; a
/// device's refusal or silence fails its part; the dataset's files are the complete parts.
async fn dataset_uploads_are_put_together_checked_and_expired(store: &dyn Store) {
    for (device, online) in [("ds-a", true), ("ds-b", true), ("ds-c", false)] {
        store
            .ingest(
                &status(device, &format!("ds-s-{device}"), online, Some(1)),
                5000,
            )
            .await
            .unwrap();
    }
    let row = store
        .create_dataset(&NewDataset {
            model_name: Some("m".into()),
            devices: vec!["ds-a".into(), "ds-b".into(), "ds-c".into()],
            created_by: "alice".into(),
            reason: Some("drift".into()),
            max_rows: Some(1000),
            now_ms: 6000,
        })
        .await
        .unwrap();
    assert_eq!(row.parts.len(), 3);
    assert!(row.parts.iter().all(|p| p.status == PartStatus::Requested));
    assert!(!row.is_settled());
    assert_eq!(
        (row.created_by.as_str(), row.max_rows),
        ("alice", Some(1000))
    );

    let due = store.due_uploads(6000).await.unwrap();
    let due: Vec<&str> = due
        .iter()
        .filter(|d| d.dataset_id == row.id)
        .map(|d| d.device_id.as_str())
        .collect();
    assert_eq!(due, ["ds-a", "ds-b"], "only online devices");
    let seq_a = store
        .mark_upload_sent(row.id, "ds-a", 7000)
        .await
        .unwrap()
        .unwrap();
    let seq_b = store
        .mark_upload_sent(row.id, "ds-b", 7000)
        .await
        .unwrap()
        .unwrap();
    assert!(seq_a >= 7000 && seq_b >= 7000);
    assert!(
        store
            .due_uploads(6500)
            .await
            .unwrap()
            .iter()
            .all(|d| d.dataset_id != row.id),
        "sent, and not quiet for long enough"
    );
    let resend = store
        .mark_upload_sent(row.id, "ds-a", 9000)
        .await
        .unwrap()
        .unwrap();
    assert!(resend > seq_a, "each send takes a new sequence number");

    // ds-a answers the first command with a file of three chunks, out of order and one twice.
    let file_a: Vec<u8> = (0..SAMPLE_CHUNK_BYTES * 2 + 5)
        .map(|i| b"a,b,predicted,label\n"[i % 20])
        .collect();
    let chunks = SampleChunk::split(row.id, seq_a, Some(model_ref(1)), 40, &file_a);
    store
        .ingest(&chunk_envelope("ds-a", "ds-c2", chunks[2].clone()), 9100)
        .await
        .unwrap();
    store
        .ingest(&chunk_envelope("ds-a", "ds-c0", chunks[0].clone()), 9100)
        .await
        .unwrap();
    let mut other_file = chunks[0].clone();
    other_file.sha256 = "00".repeat(32);
    store
        .ingest(&chunk_envelope("ds-a", "ds-cx", other_file), 9100)
        .await
        .unwrap();
    let receiving = store.dataset(row.id).await.unwrap().unwrap();
    let part = &receiving.parts[0];
    assert_eq!(part.status, PartStatus::Receiving);
    assert_eq!((part.chunks, part.chunks_received), (Some(3), 2));
    assert_eq!(part.model, Some(model_ref(1)));
    // The same chunk again under another message id changes nothing.
    store
        .ingest(&chunk_envelope("ds-a", "ds-c0b", chunks[0].clone()), 9100)
        .await
        .unwrap();
    assert!(store.dataset_files(row.id).await.unwrap().is_empty());
    // Then the resent command's upload starts: it replaces the first.
    let newer = b"a,b,predicted,label\n1,2,0,1\n".to_vec();
    let newer_chunks = SampleChunk::split(row.id, resend, Some(model_ref(1)), 1, &newer);
    store
        .ingest(
            &chunk_envelope("ds-a", "ds-n0", newer_chunks[0].clone()),
            9200,
        )
        .await
        .unwrap();
    // The older upload's last chunk arrives late and is dropped.
    store
        .ingest(&chunk_envelope("ds-a", "ds-c1", chunks[1].clone()), 9300)
        .await
        .unwrap();
    let done = store.dataset(row.id).await.unwrap().unwrap();
    let part = &done.parts[0];
    assert_eq!(part.status, PartStatus::Complete, "{part:?}");
    assert_eq!((part.rows, part.bytes), (Some(1), Some(newer.len() as u64)));
    assert_eq!(
        part.sha256.as_deref(),
        Some(edgeloop_shared::sha256_hex(&newer).as_str())
    );
    assert_eq!(
        store.dataset_files(row.id).await.unwrap(),
        vec![("ds-a".to_string(), newer.clone())]
    );
    // A complete part never changes.
    let late = SampleChunk::split(row.id, resend + 1, None, 0, b"x\n");
    store
        .ingest(&chunk_envelope("ds-a", "ds-late", late[0].clone()), 9400)
        .await
        .unwrap();
    assert_eq!(store.dataset_files(row.id).await.unwrap()[0].1, newer);
    assert!(
        store
            .mark_upload_sent(row.id, "ds-a", 9500)
            .await
            .unwrap()
            .is_none()
    );

    // ds-b cannot send its sample.
    store
        .ingest(
            &chunk_envelope(
                "ds-b",
                "ds-b-err",
                SampleChunk::failed(row.id, seq_b, "this device keeps no input sample".into()),
            ),
            9500,
        )
        .await
        .unwrap();
    // Chunks for a dataset that does not exist, or from a device that was not asked, are
    // dropped without harm.
    for (device, dataset) in [("ds-b", row.id + 100), ("d1", row.id)] {
        let stray = SampleChunk::split(dataset, 1, None, 0, b"x\n");
        assert_eq!(
            store
                .ingest(
                    &chunk_envelope(device, &format!("ds-stray-{device}"), stray[0].clone()),
                    9500
                )
                .await
                .unwrap(),
            Ingested::Stored
        );
    }
    // ds-c never came online: its part expires.
    assert_eq!(store.expire_uploads(6001, 20_000).await.unwrap(), 1);
    assert_eq!(store.expire_uploads(6001, 20_000).await.unwrap(), 0);
    let settled = store.dataset(row.id).await.unwrap().unwrap();
    assert!(settled.is_settled());
    let by_device: Vec<(&str, PartStatus, Option<&str>)> = settled
        .parts
        .iter()
        .map(|p| (p.device_id.as_str(), p.status, p.detail.as_deref()))
        .collect();
    assert_eq!(
        by_device,
        [
            ("ds-a", PartStatus::Complete, None),
            (
                "ds-b",
                PartStatus::Failed,
                Some("this device keeps no input sample")
            ),
            ("ds-c", PartStatus::Failed, Some(UPLOAD_EXPIRED)),
        ]
    );
    assert!(store.dataset(row.id + 100).await.unwrap().is_none());
    assert_eq!(store.datasets(10).await.unwrap()[0], settled);

    // A file whose pieces do not add up to its digest fails the part.
    let second = store
        .create_dataset(&NewDataset {
            model_name: None,
            devices: vec!["ds-b".into()],
            created_by: "bob".into(),
            reason: None,
            max_rows: None,
            now_ms: 30_000,
        })
        .await
        .unwrap();
    let seq = store
        .mark_upload_sent(second.id, "ds-b", 30_000)
        .await
        .unwrap()
        .unwrap();
    let mut lying = SampleChunk::split(second.id, seq, None, 1, b"a\n1\n");
    lying[0].sha256 = "11".repeat(32);
    store
        .ingest(&chunk_envelope("ds-b", "ds-lie", lying[0].clone()), 30_100)
        .await
        .unwrap();
    let part = &store.dataset(second.id).await.unwrap().unwrap().parts[0];
    assert_eq!(part.status, PartStatus::Failed);
    assert!(
        part.detail.as_deref().unwrap().contains("SHA-256"),
        "{part:?}"
    );
    let ids: Vec<u64> = store
        .datasets(10)
        .await
        .unwrap()
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids, [second.id, row.id], "newest first");
}

/// A rollout's waves open one at a time; deployments past their deadline time out; pause,
/// resume and abort are compare-and-set; the audit log keeps its order.
async fn waves_pauses_aborts_timeouts_and_the_audit_log(store: &dyn Store) {
    use crate::plan::WaveSize;
    use std::collections::BTreeSet;

    let devices: Vec<String> = (0..6).map(|i| format!("w{i}")).collect();
    for (i, d) in devices.iter().enumerate() {
        store
            .ingest(&status(d, &format!("w-status-{i}"), true, Some(1)), 1000)
            .await
            .unwrap();
    }
    store.insert_model(&model_row(3)).await.unwrap();
    let plan = RolloutPlan {
        waves: vec![WaveSize::Devices(2), WaveSize::Percent(100.0)],
        failure_threshold: Some(0.5),
        device_timeout_s: 10,
        ..RolloutPlan::default()
    };
    let r = store
        .create_rollout(&NewRollout {
            name: "m".into(),
            version: 3,
            rollback: false,
            devices: devices.clone(),
            plan: plan.clone(),
            target: None,
            now_ms: 1000,
        })
        .await
        .unwrap();
    assert_eq!((r.plan.clone(), r.current_wave), (plan.clone(), 0));
    let assigned = plan.assign(r.id, &devices);
    for d in &r.deployments {
        let i = devices.iter().position(|x| *x == d.device_id).unwrap();
        assert_eq!(d.wave, assigned[i], "{}", d.device_id);
        assert_eq!(d.previous, Some(model_ref(1)), "what an abort goes back to");
    }
    let wave = |k: u32| -> BTreeSet<String> {
        r.deployments
            .iter()
            .filter(|d| d.wave == k)
            .map(|d| d.device_id.clone())
            .collect()
    };
    assert_eq!(wave(0).len(), 2);
    // Due with `quiet_since` 0: deployments never sent.
    let due = || async {
        store
            .due_deployments(0)
            .await
            .unwrap()
            .into_iter()
            .filter(|d| d.rollout_id == r.id)
            .map(|d| d.device_id)
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(due().await, wave(0), "only the open wave is due");
    assert!(
        store
            .rollouts_in_progress()
            .await
            .unwrap()
            .iter()
            .any(|x| x.id == r.id)
    );

    // Opening a wave is a compare-and-set on the current one.
    use RolloutStatus::*;
    assert_eq!(r.wave_opened_ms, 1000);
    assert!(
        !store
            .open_wave(r.id, InProgress, 1, 1500, 5000)
            .await
            .unwrap()
    );
    assert!(!store.open_wave(r.id, Paused, 0, 1500, 5000).await.unwrap());
    assert!(
        store
            .open_wave(r.id, InProgress, 0, 1500, 5000)
            .await
            .unwrap()
    );
    assert!(
        !store
            .open_wave(r.id, InProgress, 0, 1500, 5000)
            .await
            .unwrap()
    );
    let opened = store.rollout(r.id).await.unwrap().unwrap();
    assert_eq!((opened.current_wave, opened.wave_opened_ms), (1, 1500));
    assert_eq!(due().await.len(), 6);

    // Wave 1's deadline (5000) passes before wave 0's (11000). One canary commits.
    let canary = wave(0).into_iter().next().unwrap();
    store
        .ingest(
            &deployment(&canary, "w-d1", r.id, DeployStage::Committed),
            2000,
        )
        .await
        .unwrap();
    assert_eq!(store.expire_deployments(4999).await.unwrap(), 0);
    assert_eq!(store.expire_deployments(6000).await.unwrap(), 4);
    let row = store.rollout(r.id).await.unwrap().unwrap();
    for d in row.deployments.iter().filter(|d| d.wave == 1) {
        assert_eq!(d.status, "timed_out");
        assert!(
            d.detail.as_deref().unwrap().contains("last: pending"),
            "{d:?}"
        );
    }
    // A late verdict still lands on a timed-out deployment.
    let late = wave(1).into_iter().next().unwrap();
    store
        .ingest(
            &deployment(&late, "w-d2", r.id, DeployStage::Committed),
            6100,
        )
        .await
        .unwrap();
    let row = store.rollout(r.id).await.unwrap().unwrap();
    assert_eq!(
        row.deployments
            .iter()
            .find(|d| d.device_id == late)
            .unwrap()
            .status,
        "committed"
    );

    // Pause is a compare-and-set; a paused rollout has nothing due and nothing expires.
    assert!(
        store
            .set_rollout_status(r.id, InProgress, Paused, Some("looking"), None, 7000)
            .await
            .unwrap()
    );
    assert!(
        !store
            .set_rollout_status(r.id, InProgress, Paused, None, None, 7000)
            .await
            .unwrap()
    );
    let row = store.rollout(r.id).await.unwrap().unwrap();
    assert_eq!(
        (row.status, row.reason.as_deref()),
        (Paused, Some("looking"))
    );
    assert!(due().await.is_empty());
    assert_eq!(store.expire_deployments(20_000).await.unwrap(), 0);
    // A report does not end a paused rollout.
    let other = wave(0).into_iter().nth(1).unwrap();
    store
        .ingest(
            &deployment(&other, "w-d3", r.id, DeployStage::Downloading),
            7100,
        )
        .await
        .unwrap();
    assert_eq!(store.rollout(r.id).await.unwrap().unwrap().status, Paused);

    // Resume moves the open deployments' deadline.
    assert!(
        store
            .set_rollout_status(r.id, Paused, InProgress, Some("go on"), Some(30_000), 8000)
            .await
            .unwrap()
    );
    assert_eq!(store.expire_deployments(20_000).await.unwrap(), 0);
    let quiet: Vec<_> = store
        .due_deployments(100_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|d| d.rollout_id == r.id)
        .map(|d| d.device_id)
        .collect();
    assert_eq!(
        quiet,
        std::slice::from_ref(&other),
        "the unfinished one goes again"
    );

    // Abort cancels only what was never sent; the rollout stays aborted.
    let r2 = store
        .create_rollout(&NewRollout {
            name: "m".into(),
            version: 3,
            rollback: false,
            devices: vec![devices[0].clone(), devices[1].clone()],
            plan: RolloutPlan::default(),
            target: None,
            now_ms: 9000,
        })
        .await
        .unwrap();
    store
        .mark_sent(r2.id, &devices[0], 9001)
        .await
        .unwrap()
        .unwrap();
    assert!(
        store
            .set_rollout_status(r2.id, InProgress, Aborted, Some("bad canary"), None, 9002)
            .await
            .unwrap()
    );
    let row = store.rollout(r2.id).await.unwrap().unwrap();
    assert_eq!(row.status, Aborted);
    assert_eq!(row.deployments[0].status, "sent");
    assert_eq!(row.deployments[1].status, "cancelled");
    assert_eq!(
        row.deployments[1].detail.as_deref(),
        Some("rollout aborted: bad canary")
    );
    store
        .ingest(
            &deployment(&devices[0], "w-d4", r2.id, DeployStage::Failed),
            9100,
        )
        .await
        .unwrap();
    assert_eq!(store.rollout(r2.id).await.unwrap().unwrap().status, Aborted);
    assert!(
        !store
            .rollouts_in_progress()
            .await
            .unwrap()
            .iter()
            .any(|x| x.id == r2.id)
    );

    // A report about a rollout this controller does not know (another controller's, or a
    // lost database's) is kept as an event and changes nothing else.
    store
        .ingest(
            &deployment(&devices[3], "w-unknown", 777, DeployStage::Active),
            9150,
        )
        .await
        .unwrap();
    assert!(store.rollout(777).await.unwrap().is_none());

    // With a failure threshold, a rollout whose deployments all ended with failures is
    // left in progress for the engine to judge.
    let gated = store
        .create_rollout(&NewRollout {
            name: "m".into(),
            version: 3,
            rollback: false,
            devices: vec![devices[2].clone()],
            plan: RolloutPlan {
                failure_threshold: Some(0.5),
                ..RolloutPlan::default()
            },
            target: None,
            now_ms: 9200,
        })
        .await
        .unwrap();
    store
        .ingest(
            &deployment(&devices[2], "w-d5", gated.id, DeployStage::Failed),
            9300,
        )
        .await
        .unwrap();
    assert_eq!(
        store.rollout(gated.id).await.unwrap().unwrap().status,
        InProgress
    );
    assert!(
        store
            .set_rollout_status(gated.id, InProgress, Failed, Some("judged"), None, 9400)
            .await
            .unwrap()
    );

    // The audit log: newest first, limited.
    for (i, action) in ["rollout.create", "rollout.pause", "rollout.resume"]
        .iter()
        .enumerate()
    {
        store
            .record_audit(&AuditEntry {
                at_ms: 10_000 + i as u64,
                actor: "alice".into(),
                action: action.to_string(),
                target: format!("rollout/{}", r.id),
                detail: (i == 1).then(|| "looking".to_string()),
            })
            .await
            .unwrap();
    }
    let log = store.audit(2).await.unwrap();
    assert_eq!(
        log.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        ["rollout.resume", "rollout.pause"]
    );
    assert_eq!(log[1].detail.as_deref(), Some("looking"));
}

/// The windows a trigger reads; one retraining under way per model, and a cooldown.
async fn retraining_windows_and_records(store: &dyn Store) {
    let window = |device: &str, seq: u64, end_ms: u64, psi: f64| {
        Envelope::new(
            device,
            format!("rt-{device}-{seq}"),
            1,
            Message::DriftSummary(DriftSummary {
                model: ModelRef {
                    name: "rt".into(),
                    version: 1,
                },
                window_seq: seq,
                stats: WindowStats {
                    samples: 10,
                    start_ms: end_ms - 5,
                    end_ms,
                    features: vec![],
                    psi_max: psi,
                    predictions: vec![10],
                    drift_share: psi,
                    // seq windows labelled, one of them wrongly
                    confusion: vec![vec![seq - 1, 1], vec![0, 0]],
                    accuracy: Some((seq - 1) as f64 / seq as f64),
                    // ten inferences between 0.25 and 0.5 ms
                    latency_ms: [0, 0, 0, 10].to_vec(),
                    errors: 2,
                    prediction_drift: seq.is_multiple_of(2),
                    ..WindowStats::default()
                },
            }),
        )
    };
    for seq in 1..=4 {
        store
            .ingest(
                &window("rt-a", seq, 100 * seq, seq as f64 / 10.0),
                50_000 + seq,
            )
            .await
            .unwrap();
    }
    store
        .ingest(&window("rt-b", 1, 100, 0.9), 40_000)
        .await
        .unwrap();
    let recent = store.recent_windows("rt", 2, 45_000).await.unwrap();
    assert_eq!(
        recent
            .iter()
            .map(|w| (w.device_id.as_str(), w.window_end_ms, w.psi_max))
            .collect::<Vec<_>>(),
        [("rt-a", 400, 0.4), ("rt-a", 300, 0.3)],
        "newest two of each device, received since 45000"
    );
    assert_eq!(
        (
            recent[0].drift_share,
            recent[0].labelled,
            recent[0].accuracy,
            recent[0].latency_p99_ms
        ),
        (0.4, 4, Some(0.75), Some(0.5)),
        "each window's drift share, accuracy and p99 latency"
    );
    assert_eq!(
        (recent[0].samples, recent[0].errors),
        (10, 2),
        "each window's inputs and failed inferences"
    );
    assert_eq!(
        (recent[0].prediction_drift, recent[1].prediction_drift),
        (true, false),
        "whether each window's predictions drifted"
    );
    assert_eq!(store.recent_windows("rt", 9, 0).await.unwrap().len(), 5);
    assert_eq!(recent[0].mae, None, "a classifier's window has no error");
    // A regression's window: its true values count as labelled, with their mean error.
    let mut residuals = Residuals::default();
    for (predicted, truth) in [(1.0, 2.0), (3.0, 1.5), (4.0, 4.0), (0.5, 0.0)] {
        residuals.push(predicted, truth);
    }
    let mut regression = WindowStats {
        samples: 10,
        start_ms: 0,
        end_ms: 100,
        residuals: Some(residuals),
        ..WindowStats::default()
    };
    regression.mae = residuals.mae();
    let envelope = Envelope::new(
        "rt-a",
        "rt-regression-1",
        1,
        Message::DriftSummary(DriftSummary {
            model: ModelRef {
                name: "rt-value".into(),
                version: 1,
            },
            window_seq: 1,
            stats: regression,
        }),
    );
    store.ingest(&envelope, 60_000).await.unwrap();
    let values = store.recent_windows("rt-value", 2, 0).await.unwrap();
    assert_eq!(
        (values[0].labelled, values[0].mae, values[0].accuracy),
        (4, Some(0.75), None),
        "a regression's true values and its mean absolute error"
    );

    use RetrainingStatus::*;
    let first = store
        .start_retraining("rt", 1, "drift", 1000, 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.status, first.from_version), (Training, 1));
    assert!(
        store
            .start_retraining("rt", 1, "again", 2000, 0)
            .await
            .unwrap()
            .is_none(),
        "one under way per model"
    );
    assert!(
        store
            .start_retraining("other", 1, "drift", 2000, 0)
            .await
            .unwrap()
            .is_some(),
        "another model is independent"
    );
    let update = RetrainingUpdate {
        status: RollingOut,
        detail: Some("v2 passed".into()),
        candidate_version: Some(2),
        gate: Some("passed: accuracy 0.95".into()),
        rollout_id: Some(7),
    };
    assert!(
        store
            .update_retraining(first.id, &update, 3000)
            .await
            .unwrap()
    );
    assert!(
        !store
            .update_retraining(
                first.id,
                &RetrainingUpdate::status(Training, "trainer done"),
                3500
            )
            .await
            .unwrap(),
        "a trainer's late word does not undo the rollout"
    );
    assert!(
        store
            .update_retraining(first.id, &RetrainingUpdate::status(Completed, "done"), 4000)
            .await
            .unwrap()
    );
    assert!(
        !store
            .update_retraining(first.id, &RetrainingUpdate::status(Failed, "late"), 5000)
            .await
            .unwrap(),
        "an ended retraining stays ended"
    );
    let row = store
        .retrainings(10)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.id == first.id)
        .unwrap();
    assert_eq!(row.status, Completed);
    assert_eq!(row.detail.as_deref(), Some("done"));
    assert_eq!((row.candidate_version, row.rollout_id), (Some(2), Some(7)));
    assert_eq!(row.gate.as_deref(), Some("passed: accuracy 0.95"));
    // Ended, but within the cooldown: nothing; after it, a new one.
    assert!(
        store
            .start_retraining("rt", 2, "drift", 6000, 1000)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .start_retraining("rt", 2, "drift", 6000, 1001)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(store.retrainings(1).await.unwrap()[0].from_version, 2);
}

/// A rollout created for a group keeps its target; a device that enrolls into the group
/// afterwards joins it once, in its current wave; other groups' devices do not.
async fn devices_enrolled_later_join_the_rollout_of_their_group(store: &dyn Store) {
    let token = |id: &str, group: &str| TokenRow {
        id: id.into(),
        group: group.into(),
        tags: vec!["cam".into()],
        expires_ms: u64::MAX / 2,
        uses_left: None,
        auto_approve: true,
        created_ms: 100,
        created_by: "alice".into(),
    };
    store
        .create_token(&token("t-j", "line-j"), "secret-j")
        .await
        .unwrap();
    store
        .create_token(&token("t-k", "line-k"), "secret-k")
        .await
        .unwrap();
    let enroll = |secret: &'static str, device: &'static str| async move {
        let request = EnrollRequest {
            device_id: device.into(),
            public_key: format!("key-{device}"),
            board: None,
            arch: None,
            agent_version: None,
        };
        assert!(matches!(
            store.enroll(secret, &request, 2000).await.unwrap(),
            EnrollOutcome::Enrolled(_)
        ));
    };
    enroll("secret-j", "j1").await;
    let target = Target {
        group: Some("line-j".into()),
        tags: vec!["cam".into()],
    };
    let rollout = store
        .create_rollout(&NewRollout {
            target: Some(target.clone()),
            ..new_rollout(3, false, &["j1"], 3000)
        })
        .await
        .unwrap();
    assert_eq!(rollout.target, Some(target));
    assert!(
        store.join_rollouts(3500).await.unwrap().is_empty(),
        "nobody new"
    );

    enroll("secret-j", "j2").await;
    enroll("secret-k", "k1").await;
    assert_eq!(
        store.join_rollouts(4000).await.unwrap(),
        [(rollout.id, "j2".to_string())],
        "j2 joins; k1 is in another group"
    );
    assert!(store.join_rollouts(4100).await.unwrap().is_empty(), "once");
    let row = store.rollout(rollout.id).await.unwrap().unwrap();
    let joined = row
        .deployments
        .iter()
        .find(|d| d.device_id == "j2")
        .unwrap();
    assert_eq!(
        (joined.status.as_str(), joined.wave),
        ("pending", row.current_wave)
    );
}

#[test]
fn a_late_device_joins_only_the_newest_matching_rollout_it_has_not_seen() {
    let target = |group: &str| Target {
        group: Some(group.into()),
        tags: Vec::new(),
    };
    let rollouts = [
        Joinable {
            id: 3,
            model_name: "m".into(),
            model_version: 2,
            target: target("a"),
            requirements: Requirements::default(),
        },
        Joinable {
            id: 5,
            model_name: "m".into(),
            model_version: 3,
            target: target("a"),
            requirements: Requirements {
                targets: vec!["aarch64".into()],
                ..Requirements::default()
            },
        },
    ];
    let device = |id: &str, model: Option<u64>, newest: Option<u64>, busy: bool| JoinCandidate {
        id: id.into(),
        group: Some("a".into()),
        tags: vec!["x".into()],
        model: model.map(|version| ModelRef {
            name: "m".into(),
            version,
        }),
        newest_rollout: newest,
        busy,
        arch: None,
        board: None,
    };
    let joins = late_joiners(
        &rollouts,
        &[
            device("new", None, None, false),
            device("old-v1", Some(1), Some(2), false),
            device("runs-v3", Some(3), None, false),
            device("in-5", Some(2), Some(5), false),
            device("in-a-newer-one", Some(1), Some(7), false),
            device("installing", None, Some(4), true),
            JoinCandidate {
                group: Some("b".into()),
                ..device("elsewhere", None, None, false)
            },
            JoinCandidate {
                arch: Some("aarch64".into()),
                ..device("arm", None, None, false)
            },
            JoinCandidate {
                arch: Some("x86_64".into()),
                ..device("x86", None, None, false)
            },
        ],
    );
    assert_eq!(
        joins,
        [
            (5, "new".to_string()),
            (5, "old-v1".to_string()),
            (5, "arm".to_string()),
            (3, "x86".to_string())
        ],
        "the newest rollout whose model is for the device; not who runs v3 already, was in it, \
         is in a newer one, is busy, or is in another group"
    );
}

/// Tokens are checked and spent in one step; a pending enrollment waits for approval;
/// approved devices join the registry with their group, tags and board.
async fn enrollment_tokens_and_approvals(store: &dyn Store) {
    let token = |id: &str, uses: Option<u64>, auto: bool, expires_ms: u64| TokenRow {
        id: id.into(),
        group: "line-a".into(),
        tags: vec!["hall-2".into(), "rev-b".into()],
        expires_ms,
        uses_left: uses,
        auto_approve: auto,
        created_ms: 100,
        created_by: "alice".into(),
    };
    let request = |device: &str, key: &str| EnrollRequest {
        device_id: device.into(),
        public_key: key.into(),
        board: Some("rpi4".into()),
        arch: Some("aarch64".into()),
        agent_version: Some("0.1.0".into()),
    };
    store
        .create_token(&token("t-auto", Some(1), true, 10_000), "secret-auto")
        .await
        .unwrap();
    store
        .create_token(&token("t-review", None, false, 10_000), "secret-review")
        .await
        .unwrap();
    store
        .create_token(&token("t-old", None, true, 500), "secret-old")
        .await
        .unwrap();
    let listed = store.tokens().await.unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0], token("t-auto", Some(1), true, 10_000));

    use EnrollOutcome::*;
    assert_eq!(
        store
            .enroll("nope", &request("e1", "k1"), 1000)
            .await
            .unwrap(),
        BadToken
    );
    assert_eq!(
        store
            .enroll("secret-old", &request("e1", "k1"), 1000)
            .await
            .unwrap(),
        BadToken,
        "expired"
    );
    let Enrolled(e1) = store
        .enroll("secret-auto", &request("e1", "k1"), 1000)
        .await
        .unwrap()
    else {
        panic!("enrolled");
    };
    assert_eq!(e1.status, EnrollmentStatus::Approved);
    assert_eq!(e1.decided_by.as_deref(), Some("token t-auto"));
    // Again with the same key: the same enrollment, no use spent; another key: refused.
    assert_eq!(
        store
            .enroll("secret-auto", &request("e1", "k1"), 1100)
            .await
            .unwrap(),
        Enrolled(e1.clone())
    );
    assert_eq!(
        store
            .enroll("secret-review", &request("e1", "k2"), 1100)
            .await
            .unwrap(),
        KeyConflict
    );
    assert_eq!(
        store
            .enroll("secret-auto", &request("e2", "k2"), 1100)
            .await
            .unwrap(),
        UsedUp
    );
    assert_eq!(store.tokens().await.unwrap()[0].uses_left, Some(0));
    let device = store
        .devices()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.id == "e1")
        .unwrap();
    assert_eq!(device.group.as_deref(), Some("line-a"));
    assert_eq!(device.tags, ["hall-2", "rev-b"]);
    assert_eq!(
        (device.board.as_deref(), device.arch.as_deref()),
        (Some("rpi4"), Some("aarch64"))
    );

    // A reviewed token: pending until approved, and not in the registry meanwhile.
    let Enrolled(e3) = store
        .enroll("secret-review", &request("e3", "k3"), 1200)
        .await
        .unwrap()
    else {
        panic!("enrolled");
    };
    assert_eq!(e3.status, EnrollmentStatus::Pending);
    assert!(!store.device_exists("e3").await.unwrap());
    assert!(
        !store
            .set_broker_password("e3", &"ab".repeat(32))
            .await
            .unwrap(),
        "no broker password before approval"
    );
    assert!(!store.broker_login("e3", &"ab".repeat(32)).await.unwrap());
    assert_eq!(
        store
            .approve_enrollment("nobody", "bob", 1300)
            .await
            .unwrap(),
        None
    );
    let approved = store
        .approve_enrollment("e3", "bob", 1300)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(approved.status, EnrollmentStatus::Approved);
    assert_eq!(
        (approved.decided_ms, approved.decided_by.as_deref()),
        (Some(1300), Some("bob"))
    );
    assert!(store.device_exists("e3").await.unwrap());
    assert_eq!(
        store.approve_enrollment("e3", "bob", 1400).await.unwrap(),
        None,
        "once"
    );
    assert_eq!(store.enrollments().await.unwrap().len(), 2);

    // An approved device's broker password: only its hash, replaced as a whole.
    assert!(
        !store.broker_login("e3", &"ab".repeat(32)).await.unwrap(),
        "none yet"
    );
    assert!(
        store
            .set_broker_password("e3", &"ab".repeat(32))
            .await
            .unwrap()
    );
    assert!(store.broker_login("e3", &"ab".repeat(32)).await.unwrap());
    assert!(!store.broker_login("e3", &"ac".repeat(32)).await.unwrap());
    assert!(
        !store
            .broker_login("nobody", &"ab".repeat(32))
            .await
            .unwrap()
    );
    assert!(
        store
            .set_broker_password("e3", &"cd".repeat(32))
            .await
            .unwrap()
    );
    assert!(
        !store.broker_login("e3", &"ab".repeat(32)).await.unwrap(),
        "replaced"
    );
    assert!(
        !store
            .set_broker_password("nobody", &"cd".repeat(32))
            .await
            .unwrap()
    );
}

/// Hourly aggregates fold each stored summary once; retention prunes by age.
async fn the_trust_document_is_replaced_only_from_the_version_it_was_checked_against(
    store: &dyn Store,
) {
    let document = |version: u64| StoredTrust {
        version,
        state: format!("state {version}"),
        signed: format!("signed {version}"),
    };
    assert_eq!(store.trust().await.unwrap(), None);
    assert!(store.replace_trust(0, &document(1)).await.unwrap());
    // Another replica that also checked against "none yet" loses.
    assert!(!store.replace_trust(0, &document(1)).await.unwrap());
    assert!(!store.replace_trust(5, &document(2)).await.unwrap());
    assert_eq!(store.trust().await.unwrap(), Some(document(1)));
    assert!(store.replace_trust(1, &document(2)).await.unwrap());
    assert_eq!(store.trust().await.unwrap(), Some(document(2)));
}

async fn hourly_aggregates_and_retention(store: &dyn Store) {
    const HOUR: u64 = 3_600_000;
    let at = |id: &str, end: u64, psi: f64| {
        let mut e = drift("h1", id, 10, psi);
        if let Message::DriftSummary(s) = &mut e.message {
            s.stats.start_ms = end - 5;
            s.stats.end_ms = end;
        }
        e
    };
    store.ingest(&at("h-a", HOUR + 5, 0.1), 1000).await.unwrap();
    store
        .ingest(&at("h-b", HOUR + 50, 0.3), 2000)
        .await
        .unwrap();
    assert_eq!(
        store
            .ingest(&at("h-b", HOUR + 50, 0.3), 2001)
            .await
            .unwrap(),
        Ingested::Duplicate
    );
    store
        .ingest(&at("h-c", 2 * HOUR + 1, 0.2), 3000)
        .await
        .unwrap();
    let hours = store.hourly("h1", 10).await.unwrap();
    assert_eq!(
        hours
            .iter()
            .map(|h| (h.hour_ms, h.windows, h.samples))
            .collect::<Vec<_>>(),
        [(2 * HOUR, 1, 10), (HOUR, 2, 20)],
        "a duplicate is not counted twice"
    );
    assert_eq!(hours[1].psi_max, 0.3);
    assert!((hours[1].psi_mean - 0.2).abs() < 1e-9);
    assert_eq!(hours[1].stats["features"][0]["counts"][1], 20);
    assert_eq!(hours[1].stats["start_ms"], HOUR);

    let pruned = store.prune(2500, 2 * HOUR).await.unwrap();
    // Every summary received before 2500 (d1's seven and h1's two), the hours before the
    // second (d1's hour 0 of v1 and of v2, and h1's hour 1).
    assert_eq!((pruned.telemetry, pruned.hourly), (9, 3), "{pruned:?}");
    let left = store.telemetry("h1", 10).await.unwrap();
    assert_eq!(
        left.iter().map(|r| r.msg_id.as_str()).collect::<Vec<_>>(),
        ["h-c"]
    );
    assert_eq!(store.hourly("h1", 10).await.unwrap().len(), 1);
    // The duplicate record goes with the raw summary; newer ones stay.
    assert_eq!(
        store
            .ingest(&at("h-c", 2 * HOUR + 1, 0.2), 3001)
            .await
            .unwrap(),
        Ingested::Duplicate
    );
    assert_eq!(
        store.ingest(&at("h-a", HOUR + 5, 0.1), 3002).await.unwrap(),
        Ingested::Stored
    );
}

#[tokio::test]
async fn sqlite_store_passes_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sqlite");
    let store = SqliteStore::open(&path).unwrap();
    suite(&store).await;
    let devices = store.devices().await.unwrap();
    let page_size: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .unwrap();
    assert_eq!(
        page_size, 8192,
        "a new file has pages that hold several summaries"
    );
    // Reopening keeps everything and does not migrate twice.
    let again = SqliteStore::open(&path).unwrap();
    assert_eq!(again.devices().await.unwrap(), devices);
}

#[tokio::test]
async fn a_models_recent_windows_are_found_by_the_index_by_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sqlite");
    let _store = SqliteStore::open(&path).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let indexes: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'telemetry'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert!(
        !indexes.iter().any(|i| i == "telemetry_by_model"),
        "{indexes:?}"
    );
    let plan: Vec<String> = conn
        .prepare(&format!(
            "EXPLAIN QUERY PLAN {}",
            super::sqlite::RECENT_WINDOWS
        ))
        .unwrap()
        .query_map(rusqlite::params!["m", 0, 3], |r| r.get(3))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert!(
        plan.iter()
            .any(|step| step.contains("USING INDEX telemetry_by_time (received_ms>?)")),
        "a scan of the whole table: {plan:?}"
    );
}

/// Hourly statistics are stored as MessagePack (`is_msgpack` says whether `device`'s row
/// holds them so); once `as_json` has rewritten the row as an earlier version wrote it, in
/// JSON text, they are still read and folded into, and stored as MessagePack again.
async fn hourly_statistics_are_messagepack_and_earlier_json_is_read(
    store: &dyn Store,
    device: &str,
    is_msgpack: impl AsyncFn() -> bool,
    as_json: impl AsyncFn(String),
) {
    store.ingest(&drift(device, "a", 10, 0.1), 1).await.unwrap();
    store.flush_hourly().await.unwrap();
    assert!(is_msgpack().await);
    let stats = store.hourly(device, 10).await.unwrap()[0].stats.clone();
    assert_eq!(
        stats["features"][0]["counts"],
        serde_json::json!([0, 10, 0])
    );
    as_json(serde_json::to_string(&stats).unwrap()).await;
    assert!(!is_msgpack().await);
    assert_eq!(store.hourly(device, 10).await.unwrap()[0].stats, stats);
    store.ingest(&drift(device, "b", 5, 0.3), 2).await.unwrap();
    let hour = &store.hourly(device, 10).await.unwrap()[0];
    assert_eq!((hour.windows, hour.samples), (2, 15));
    assert_eq!(
        hour.stats["features"][0]["counts"],
        serde_json::json!([0, 15, 0])
    );
    store.flush_hourly().await.unwrap();
    assert!(is_msgpack().await);
}

#[tokio::test]
async fn sqlite_hourly_statistics_are_messagepack_and_earlier_json_ones_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sqlite");
    let store = SqliteStore::open(&path).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let stats_type = || -> String {
        conn.query_row(
            "SELECT typeof(stats) FROM telemetry_hourly WHERE device_id = 'd1'",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    hourly_statistics_are_messagepack_and_earlier_json_is_read(
        &store,
        "d1",
        async || stats_type() == "blob",
        async |json| {
            conn.execute(
                "UPDATE telemetry_hourly SET stats = ?1 WHERE device_id = 'd1'",
                [json],
            )
            .unwrap();
            assert_eq!(stats_type(), "text");
        },
    )
    .await;
}

#[tokio::test]
async fn the_sqlite_wal_is_checkpointed_without_a_commit_paying_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sqlite");
    let store = SqliteStore::open(&path).unwrap();
    let group: Vec<Envelope> = (0..300)
        .map(|i| drift("d1", &format!("w{i}"), 5, 0.1))
        .collect();
    store.ingest_many(group.into(), 10).await.unwrap();
    // The rows are in the WAL, far below the size at which a commit checkpoints by itself;
    // the database file alone (read as immutable, WAL ignored) has them only once the
    // checkpointer has copied them there.
    let url = format!("file:{}?immutable=1", path.display());
    let in_file = || -> Option<i64> {
        let conn = rusqlite::Connection::open_with_flags(
            &url,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
        )
        .ok()?;
        conn.query_row("SELECT count(*) FROM telemetry", [], |r| r.get(0))
            .ok()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while in_file() != Some(300) {
        assert!(
            std::time::Instant::now() < deadline,
            "the database file has {:?} of 300 rows",
            in_file()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(store.telemetry("d1", 1000).await.unwrap().len(), 300);
}

/// A drift summary of `device` whose window ends in hour `hour`.
fn drift_in_hour(device: &str, msg_id: &str, samples: u64, hour: u64) -> Envelope {
    let mut e = drift(device, msg_id, samples, 0.1);
    if let Message::DriftSummary(s) = &mut e.message {
        s.stats.start_ms = hour * HOUR_MS;
        s.stats.end_ms = hour * HOUR_MS + 1;
    }
    e
}

/// `(windows, samples)` of each of `device`'s hours, newest first.
async fn hours_of(store: &SqliteStore, device: &str) -> Vec<(u64, u64)> {
    let hours = store.hourly(device, 100).await.unwrap();
    hours.iter().map(|h| (h.windows, h.samples)).collect()
}

/// Where a new SQLite database goes, in a directory deleted with the first value.
fn a_database_path() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sqlite");
    (dir, path)
}

fn count(path: &std::path::Path, sql: &str) -> i64 {
    rusqlite::Connection::open(path)
        .unwrap()
        .query_row(sql, [], |r| r.get(0))
        .unwrap()
}

#[tokio::test]
async fn sqlite_hourly_aggregates_are_written_behind_ingest_and_folded_again_after_a_crash() {
    let (_dir, path) = a_database_path();
    let store = SqliteStore::open(&path).unwrap();
    for id in ["a", "b", "c"] {
        store.ingest(&drift("d1", id, 10, 0.1), 1).await.unwrap();
    }
    assert_eq!(
        store.ingest(&drift("d1", "b", 10, 0.1), 2).await.unwrap(),
        Ingested::Duplicate
    );
    // Folded in memory, not yet written; a read writes them first.
    assert_eq!(count(&path, "SELECT count(*) FROM telemetry_hourly"), 0);
    assert_eq!(hours_of(&store, "d1").await, [(3, 30)]);
    assert_eq!(count(&path, "SELECT windows FROM telemetry_hourly"), 3);
    store
        .ingest_many(
            vec![drift("d1", "d", 5, 0.1), drift("d1", "e", 5, 0.1)].into(),
            3,
        )
        .await
        .unwrap();
    // The process dies with two summaries folded in memory only: the next one to open the
    // file folds them from their raw rows, once.
    drop(store);
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(hours_of(&store, "d1").await, [(5, 40)]);
    drop(store);
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(hours_of(&store, "d1").await, [(5, 40)]);
    // What a flush writes is what folding every summary into the hour at once gives.
    let summaries: Vec<DriftSummary> = store
        .telemetry("d1", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| serde_json::from_value(r.summary).unwrap())
        .collect();
    let at_once = Hourly::fold(None, &summaries.iter().collect::<Vec<_>>()).unwrap();
    let hour = &store.hourly("d1", 1).await.unwrap()[0];
    assert_eq!(hour.stats, serde_json::to_value(&at_once.stats).unwrap());
    assert_eq!(hour.psi_max, at_once.psi_max);
}

#[tokio::test]
async fn sqlite_rows_after_a_prune_of_every_row_are_folded_after_a_crash() {
    let (_dir, path) = a_database_path();
    let store = SqliteStore::open(&path).unwrap();
    for id in ["a", "b"] {
        store
            .ingest(&drift_in_hour("d1", id, 10, 1), 1000)
            .await
            .unwrap();
    }
    let pruned = store.prune(2000, 0).await.unwrap();
    assert_eq!(pruned.telemetry, 2);
    assert_eq!(count(&path, "SELECT count(*) FROM telemetry"), 0);
    // SQLite would give the next row the rowid of a pruned one, which the aggregates
    // already hold; a recovery would then skip it.
    store
        .ingest(&drift_in_hour("d1", "c", 7, 1), 3000)
        .await
        .unwrap();
    drop(store);
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(hours_of(&store, "d1").await, [(3, 27)]);
}

#[tokio::test]
async fn two_sqlite_connections_to_one_file_fold_each_summary_once() {
    let (_dir, path) = a_database_path();
    let ingesting = SqliteStore::open(&path).unwrap();
    for id in ["a", "b", "c"] {
        ingesting
            .ingest(&drift("d1", id, 10, 0.1), 1)
            .await
            .unwrap();
    }
    // Another connection finds three rows unfolded and folds them from the raw rows; the
    // first one's memory holds the same three.
    let reading = SqliteStore::open(&path).unwrap();
    assert_eq!(hours_of(&reading, "d1").await, [(3, 30)]);
    ingesting
        .ingest(&drift("d1", "d", 10, 0.1), 2)
        .await
        .unwrap();
    assert_eq!(hours_of(&ingesting, "d1").await, [(4, 40)]);
    assert_eq!(hours_of(&reading, "d1").await, [(4, 40)]);
    ingesting
        .ingest(&drift("d1", "e", 10, 0.1), 3)
        .await
        .unwrap();
    assert_eq!(hours_of(&reading, "d1").await, [(4, 40)], "not yet written");
    ingesting.flush_hourly().await.unwrap();
    assert_eq!(hours_of(&reading, "d1").await, [(5, 50)]);
    // Both store: each finds rows it did not store, and folds from the raw rows again.
    ingesting
        .ingest(&drift("d1", "f", 10, 0.1), 4)
        .await
        .unwrap();
    reading.ingest(&drift("d1", "g", 10, 0.1), 4).await.unwrap();
    ingesting
        .ingest(&drift("d1", "h", 10, 0.1), 4)
        .await
        .unwrap();
    assert_eq!(hours_of(&ingesting, "d1").await, [(8, 80)]);
    assert_eq!(hours_of(&reading, "d1").await, [(8, 80)]);
}

#[tokio::test]
async fn sqlite_ingest_writes_its_hourly_aggregates_once_it_holds_too_many() {
    let (_dir, path) = a_database_path();
    let store = SqliteStore::open(&path).unwrap();
    let hours = super::sqlite::MAX_PENDING_HOURS as u64;
    let group: Vec<Envelope> = (0..hours)
        .map(|h| drift_in_hour("d1", &format!("w{h}"), 1, h))
        .collect();
    store.ingest_many(group.into(), 1).await.unwrap();
    assert_eq!(count(&path, "SELECT count(*) FROM telemetry_hourly"), 0);
    store
        .ingest(&drift_in_hour("d1", "one more", 1, hours), 1)
        .await
        .unwrap();
    // Written right after that call, without a read or the minute's flush.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while count(&path, "SELECT folded_to FROM hourly_folded") != hours as i64 + 1 {
        assert!(std::time::Instant::now() < deadline, "not written");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        count(&path, "SELECT count(*) FROM telemetry_hourly"),
        hours as i64 + 1
    );
    // Full again: the flag that keeps a second flush from being queued beside the first is
    // cleared once the first has run, so this fill is written too.
    let again: Vec<Envelope> = (0..=hours)
        .map(|h| drift_in_hour("d1", &format!("again{h}"), 1, hours + 1 + h))
        .collect();
    store.ingest_many(again.into(), 1).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while count(&path, "SELECT folded_to FROM hourly_folded") != 2 * (hours as i64 + 1) {
        assert!(std::time::Instant::now() < deadline, "not written again");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        count(&path, "SELECT count(*) FROM telemetry_hourly"),
        2 * (hours as i64 + 1)
    );
}

#[tokio::test]
async fn a_version_1_sqlite_database_is_migrated_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sqlite");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(super::sqlite::SCHEMA_V1).unwrap();
    conn.execute_batch(
        "INSERT INTO devices (id, last_seen_ms, inferences) VALUES ('old', 5, 42);
         INSERT INTO telemetry VALUES ('t-old', 'old', 5, 'm', 1, 1, 0, 1, 10, 0.1, '{}');
         PRAGMA user_version = 1;",
    )
    .unwrap();
    drop(conn);
    let store = SqliteStore::open(&path).unwrap();
    let devices = store.devices().await.unwrap();
    assert_eq!((devices[0].id.as_str(), devices[0].inferences), ("old", 42));
    assert_eq!(devices[0].outbox, OutboxStatus::default());
    store
        .ingest(&status("old", "s1", true, None), 10)
        .await
        .unwrap();
    assert_eq!(
        store.devices().await.unwrap()[0].outbox.dropped.telemetry,
        7
    );
    let conn = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, 11);
    // Rows stored before version 11 were folded as they came (or, before version 2, never).
    let folded_to: i64 = conn
        .query_row("SELECT folded_to FROM hourly_folded", [], |r| r.get(0))
        .unwrap();
    assert_eq!(folded_to, 1);
    conn.prepare("SELECT upload_seq, content FROM dataset_parts")
        .unwrap();
    conn.prepare("SELECT mae FROM telemetry").unwrap();
    conn.prepare("SELECT requirements FROM models").unwrap();
    conn.prepare("SELECT base_version, base_sha256 FROM model_deltas")
        .unwrap();
    conn.prepare("SELECT rollback, plan, current_wave, reason FROM rollouts")
        .unwrap();
    conn.prepare("SELECT drift_share, labelled, accuracy FROM telemetry")
        .unwrap();
    conn.prepare("SELECT wave, deadline_ms, previous_model FROM deployments")
        .unwrap();
    conn.prepare("SELECT actor FROM audit").unwrap();
}

#[tokio::test]
async fn a_database_from_a_newer_build_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sqlite");
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    assert!(matches!(
        SqliteStore::open(&path),
        Err(StoreError::Corrupt(_))
    ));
}

/// `url` with `search_path` set to `schema`, so each test run gets its own tables.
pub fn with_search_path(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}

#[tokio::test]
async fn postgres_store_passes_the_suite() {
    let Some(url) = std::env::var("EDGELOOP_TEST_PG_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        eprintln!("skipped: EDGELOOP_TEST_PG_URL is not set");
        return;
    };
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!("EDGELOOP_TEST_PG_URL={url} is set but PostgreSQL is unreachable: {e}")
        });
    tokio::spawn(connection);
    let schema = format!("edgeloop_test_{}", uuid::Uuid::new_v4().simple());
    admin
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    let scoped = with_search_path(&url, &schema);
    let store = PgStore::connect(&scoped).await.unwrap();
    suite(&store).await;

    // Hourly statistics are MessagePack; a row an earlier version wrote as JSON is read,
    // and folded into.
    let forms = async || {
        let row = admin
            .query_one(
                &format!(
                    "SELECT stats IS NULL, stats_msgpack IS NULL FROM {schema}.telemetry_hourly
                     WHERE device_id = 'pg-h'"
                ),
                &[],
            )
            .await
            .unwrap();
        (row.get::<_, bool>(0), row.get::<_, bool>(1))
    };
    hourly_statistics_are_messagepack_and_earlier_json_is_read(
        &store,
        "pg-h",
        async || forms().await == (true, false),
        async |json| {
            admin
                .execute(
                    &format!(
                        "UPDATE {schema}.telemetry_hourly SET stats = $1, stats_msgpack = NULL
                         WHERE device_id = 'pg-h'"
                    ),
                    &[&json],
                )
                .await
                .unwrap();
            assert_eq!(forms().await, (false, true));
        },
    )
    .await;

    // A database of version 10 (statistics as JSON only) is brought to 11 in place.
    admin
        .batch_execute(&format!(
            "DELETE FROM {schema}.telemetry_hourly;
             ALTER TABLE {schema}.telemetry_hourly DROP COLUMN stats_msgpack;
             ALTER TABLE {schema}.telemetry_hourly ALTER COLUMN stats SET NOT NULL;
             UPDATE {schema}.edgeloop_schema SET version = 10"
        ))
        .await
        .unwrap();
    let migrated = PgStore::connect(&scoped).await.unwrap();
    migrated
        .ingest(&drift("pg-h", "c", 5, 0.3), 3)
        .await
        .unwrap();
    assert_eq!(forms().await, (true, false), "migrated");
    let version = admin
        .query_one(
            &format!("SELECT version FROM {schema}.edgeloop_schema"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(version.get::<_, i32>(0), 11);
    let devices = store.devices().await.unwrap();
    let again = PgStore::connect(&scoped).await.unwrap();
    assert_eq!(
        again.devices().await.unwrap(),
        devices,
        "reopening keeps everything"
    );
    admin
        .batch_execute(&format!("UPDATE {schema}.edgeloop_schema SET version = 99"))
        .await
        .unwrap();
    assert!(matches!(
        PgStore::connect(&scoped).await,
        Err(StoreError::Corrupt(_))
    ));
    admin
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

#[test]
fn a_dataset_merges_its_parts_under_one_header_and_refuses_other_columns() {
    let part = |d: &str, text: &str| (d.to_string(), text.as_bytes().to_vec());
    let merged = merge_parts(&[
        part("a", "x,label\n1,0\n2,1\n"),
        part("b", "x,label\n"),
        part("c", "x,label\n3,1\n"),
    ])
    .unwrap();
    assert_eq!(merged, b"x,label\n1,0\n2,1\n3,1\n");
    assert_eq!(merge_parts(&[]).unwrap(), b"");
    let err = merge_parts(&[part("a", "x,label\n1,0\n"), part("b", "y,label\n1,0\n")]).unwrap_err();
    assert!(
        err.contains("sample of b has other columns (y,label)"),
        "{err}"
    );
}

#[test]
fn a_dataset_of_a_tensor_models_samples_merges_their_records() {
    use edgeloop_shared::npy::{SampleRecord, read_sample, write_sample};
    let sample = |device: &str, rows: usize| {
        let records = (0..rows).map(|i| SampleRecord {
            x: if i % 2 == 0 { &[1.0, 2.0] } else { &[3.0, 4.0] },
            predicted: Some(i as f64),
            label: None,
        });
        (device.to_string(), write_sample(&[2], records).unwrap())
    };
    let merged = merge_parts(&[sample("a", 2), sample("b", 0), sample("c", 3)]).unwrap();
    let file = read_sample(&merged).unwrap();
    assert_eq!((file.row_shape, file.rows), (vec![2], 5));
    let err = merge_parts(&[sample("a", 1), ("b".into(), b"x,label\n1,0\n".to_vec())]).unwrap_err();
    assert!(
        err.contains("the sample of b is CSV, that of a NPY"),
        "{err}"
    );
}
