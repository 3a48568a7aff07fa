//! The outbox's cost per drift summary against bare SQLite doing the least the same
//! durability needs, measured in one run: each summary is queued (budget check, insert)
//! and later confirmed by message id (delete), one transaction each, WAL mode,
//! `synchronous = NORMAL`; the peer inserts and deletes the same rows with prepared
//! statements and no budget.
//!
//! Run: `cargo bench -p edgeloop-agent --bench outbox`

use std::time::Instant;

use edgeloop_agent::outbox::{NewEntry, Outbox, Priority, SqliteOutbox};
use rusqlite::{Connection, params};

const N: usize = 20_000;
/// A drift summary of the example model is about this size (see the ingest benchmark).
const PAYLOAD: usize = 1_400;

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let payload = vec![b'x'; PAYLOAD];
    let ids: Vec<String> = (0..N).map(|_| uuid::Uuid::now_v7().to_string()).collect();

    // Peer: bare SQLite.
    let conn = Connection::open(dir.path().join("bare.sqlite")).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "NORMAL").unwrap();
    conn.execute_batch(
        "CREATE TABLE q (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT, msg_id TEXT,
             priority INTEGER, payload BLOB);
         CREATE INDEX q_msg ON q (msg_id);",
    )
    .unwrap();
    let start = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        conn.prepare_cached(
            "INSERT INTO q (topic, msg_id, priority, payload) VALUES (?1, ?2, 1, ?3)",
        )
        .unwrap()
        .execute(params!["edgeloop/v1/devices/d/telemetry", id, payload])
        .unwrap();
        // Confirm in arrears, as receipts do: 16 behind.
        if i >= 16 {
            conn.prepare_cached("DELETE FROM q WHERE msg_id = ?1")
                .unwrap()
                .execute(params![ids[i - 16]])
                .unwrap();
        }
    }
    let bare = start.elapsed();

    // edgeloop's outbox.
    let outbox = Outbox::new(
        SqliteOutbox::open(&dir.path().join("outbox.sqlite")).unwrap(),
        16 << 20,
    );
    let start = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        outbox
            .enqueue(NewEntry {
                topic: "edgeloop/v1/devices/d/telemetry",
                msg_id: id,
                priority: Priority::Telemetry,
                payload: &payload,
            })
            .unwrap();
        if i >= 16 {
            outbox.confirm(&[ids[i - 16].as_str()]).unwrap();
        }
    }
    let ours = start.elapsed();
    let per = |d: std::time::Duration| d.as_secs_f64() * 1e6 / N as f64;
    println!("outbox cost per summary ({N} summaries of {PAYLOAD} B, queued then confirmed):");
    println!("  bare SQLite insert + delete  {:>6.1} µs", per(bare));
    println!(
        "  edgeloop outbox              {:>6.1} µs  ratio {:.2}x",
        per(ours),
        per(ours) / per(bare)
    );
}
