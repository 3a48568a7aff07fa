//! The embedded SQLite store (WAL mode). Calls run on tokio's blocking pool.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use edgeloop_shared::protocol::{
    DeploymentStatus, DeviceStatus, DriftSummary, DropCounts, Envelope, Message, SampleChunk,
    join_sample_chunks,
};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::*;

const SCHEMA_VERSION: i64 = 11;
/// The page size of a new database file.
const PAGE_SIZE: i64 = 8192;
/// How often at most the checkpointer copies the WAL into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// WAL pages (64 MiB) past which a commit checkpoints by itself, as SQLite does past 1 000
/// by default: only when the checkpointer falls behind.
const WAL_BACKSTOP_PAGES: i64 = 8192;

pub(super) const SCHEMA_V1: &str = "
CREATE TABLE seen_messages (
    msg_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    received_ms INTEGER NOT NULL
);
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    online INTEGER NOT NULL DEFAULT 0,
    agent_version TEXT,
    model_name TEXT,
    model_version INTEGER,
    last_seen_ms INTEGER NOT NULL,
    inferences INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    malformed_messages INTEGER NOT NULL DEFAULT 0,
    last_psi_max REAL,
    last_command_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE telemetry (
    msg_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    model_name TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    window_seq INTEGER NOT NULL,
    window_start_ms INTEGER NOT NULL,
    window_end_ms INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    psi_max REAL NOT NULL,
    summary TEXT NOT NULL
);
CREATE INDEX telemetry_by_device ON telemetry (device_id, received_ms);
CREATE TABLE models (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    label TEXT,
    created_ms INTEGER NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    bundle_size INTEGER NOT NULL,
    features TEXT NOT NULL,
    signed_by TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_name TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    status TEXT NOT NULL
);
CREATE TABLE deployments (
    rollout_id INTEGER NOT NULL REFERENCES rollouts (id),
    device_id TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT,
    command_seq INTEGER,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE TABLE deployment_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    rollout_id INTEGER,
    command_seq INTEGER NOT NULL,
    stage TEXT NOT NULL,
    model TEXT,
    detail TEXT
);
CREATE INDEX deployment_events_by_device ON deployment_events (device_id, id);
";

/// Version 2: each device's outbox state and drop counts; hourly aggregates; indexes for
/// retention.
const SCHEMA_V2: &str = "
CREATE TABLE telemetry_hourly (
    device_id TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    hour_ms INTEGER NOT NULL,
    windows INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    psi_max REAL NOT NULL,
    psi_sum REAL NOT NULL,
    stats TEXT NOT NULL,
    PRIMARY KEY (device_id, model_name, model_version, hour_ms)
);
CREATE INDEX telemetry_hourly_by_time ON telemetry_hourly (hour_ms);
CREATE INDEX telemetry_by_time ON telemetry (received_ms);
CREATE INDEX seen_messages_by_time ON seen_messages (received_ms);
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
);
ALTER TABLE devices ADD COLUMN outbox_entries INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN outbox_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN outbox_budget_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN dropped_control INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN dropped_telemetry INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN dropped_samples INTEGER NOT NULL DEFAULT 0;
";

/// Version 3: rollbacks (a rollout devices accept below their active version); the trust
/// document being relayed.
const SCHEMA_V3: &str = "
ALTER TABLE rollouts ADD COLUMN rollback INTEGER NOT NULL DEFAULT 0;
CREATE TABLE trust (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    signed TEXT NOT NULL
);
";

/// Version 4: rollout plans (waves, thresholds, timeouts), pause and abort, the audit log.
const SCHEMA_V4: &str = "
ALTER TABLE rollouts ADD COLUMN plan TEXT;
ALTER TABLE models ADD COLUMN lineage TEXT;
ALTER TABLE rollouts ADD COLUMN current_wave INTEGER NOT NULL DEFAULT 0;
ALTER TABLE rollouts ADD COLUMN wave_opened_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE rollouts ADD COLUMN reason TEXT;
ALTER TABLE rollouts ADD COLUMN failure_gated INTEGER NOT NULL DEFAULT 0;
ALTER TABLE deployments ADD COLUMN wave INTEGER NOT NULL DEFAULT 0;
ALTER TABLE deployments ADD COLUMN deadline_ms INTEGER;
ALTER TABLE deployments ADD COLUMN previous_model TEXT;
ALTER TABLE deployments ADD COLUMN previous_version INTEGER;
CREATE INDEX deployments_by_status ON deployments (status);
ALTER TABLE devices ADD COLUMN group_name TEXT;
ALTER TABLE devices ADD COLUMN tags TEXT;
ALTER TABLE devices ADD COLUMN board TEXT;
ALTER TABLE devices ADD COLUMN arch TEXT;
CREATE TABLE enrollment_tokens (
    id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL UNIQUE,
    group_name TEXT NOT NULL,
    tags TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    uses_left INTEGER,
    auto_approve BOOL NOT NULL,
    created_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL
);
CREATE TABLE enrollments (
    device_id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    token_id TEXT NOT NULL,
    group_name TEXT NOT NULL,
    tags TEXT NOT NULL,
    board TEXT,
    arch TEXT,
    agent_version TEXT,
    status TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    decided_ms INTEGER,
    decided_by TEXT
);
CREATE TABLE retrainings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_name TEXT NOT NULL,
    from_version INTEGER NOT NULL,
    fired_ms INTEGER NOT NULL,
    reason TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT,
    candidate_version INTEGER,
    gate TEXT,
    rollout_id INTEGER,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX retrainings_by_model ON retrainings (model_name, fired_ms);
CREATE INDEX telemetry_by_model ON telemetry (model_name, received_ms);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT
);
";

/// Version 5: each window's dataset-drift share, labelled predictions and accuracy, for
/// the retraining triggers; the target of a rollout to a group or tags.
const SCHEMA_V5: &str = "
ALTER TABLE telemetry ADD COLUMN drift_share REAL NOT NULL DEFAULT 0;
ALTER TABLE telemetry ADD COLUMN labelled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE telemetry ADD COLUMN accuracy REAL;
ALTER TABLE rollouts ADD COLUMN target TEXT;
ALTER TABLE devices ADD COLUMN trust_version INTEGER NOT NULL DEFAULT 0;
ALTER TABLE telemetry ADD COLUMN errors INTEGER NOT NULL DEFAULT 0;
ALTER TABLE telemetry ADD COLUMN latency_p99_ms REAL;
";

/// Version 6: datasets of device input samples, their per-device parts and the chunks of
/// uploads under way.
const SCHEMA_V6: &str = "
CREATE TABLE datasets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_name TEXT,
    created_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    reason TEXT,
    max_rows INTEGER
);
CREATE TABLE dataset_parts (
    dataset_id INTEGER NOT NULL REFERENCES datasets (id),
    device_id TEXT NOT NULL,
    status TEXT NOT NULL,
    command_seq INTEGER,
    sent_ms INTEGER,
    upload_seq INTEGER,
    model_name TEXT,
    model_version INTEGER,
    rows INTEGER,
    bytes INTEGER,
    sha256 TEXT,
    chunks INTEGER,
    detail TEXT,
    updated_ms INTEGER NOT NULL,
    content BLOB,
    PRIMARY KEY (dataset_id, device_id)
);
CREATE INDEX dataset_parts_by_status ON dataset_parts (status);
ALTER TABLE enrollments ADD COLUMN broker_password_sha256 TEXT;
ALTER TABLE telemetry ADD COLUMN prediction_drift INTEGER NOT NULL DEFAULT 0;
CREATE TABLE dataset_chunks (
    dataset_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (dataset_id, device_id, idx)
);
";

/// Version 7: delta bundles of published models.
const SCHEMA_V7: &str = "
CREATE TABLE model_deltas (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    base_version INTEGER NOT NULL,
    base_sha256 TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    bundle_size INTEGER NOT NULL,
    PRIMARY KEY (name, version, base_version),
    FOREIGN KEY (name, version) REFERENCES models (name, version)
);
";

/// Version 8: what a device must satisfy to run a model (architectures, boards…), so that
/// rollouts leave out the devices it is not for.
const SCHEMA_V8: &str = "ALTER TABLE models ADD COLUMN requirements TEXT;";

/// Version 9: each window's mean absolute error on true values (regressions), for the
/// retraining trigger and the rollout gate.
const SCHEMA_V9: &str = "ALTER TABLE telemetry ADD COLUMN mae REAL;";

/// Version 10: no index of the telemetry by model. Its one query asks for a model's recent
/// windows, which the index by time finds as well (with the other models' windows of that
/// span), and every drift summary paid a B-tree insert for it: 5 800 of the store's 44 300
/// instructions per summary.
const SCHEMA_V10: &str = "DROP INDEX IF EXISTS telemetry_by_model;";

/// Version 11: hourly aggregates are written behind ingest ([`PendingHours`]). `folded_to`
/// is the last telemetry row (by rowid) whose summary the aggregates hold: every row
/// written before this version.
const SCHEMA_V11: &str = "
CREATE TABLE hourly_folded (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    folded_to INTEGER NOT NULL
);
INSERT INTO hourly_folded (id, folded_to) SELECT 1, ifnull(max(rowid), 0) FROM telemetry;
";

/// A model's latest `?3` windows per device received since `?2`, newest first per device.
/// It names the index by time: without statistics SQLite would rather read the whole table
/// in device order than sort the recent span.
pub(super) const RECENT_WINDOWS: &str = "SELECT device_id, model_version, window_end_ms, psi_max, drift_share, labelled, accuracy, latency_p99_ms, samples, errors, prediction_drift, mae FROM (
         SELECT device_id, model_version, window_end_ms, psi_max, drift_share, labelled, accuracy, latency_p99_ms, samples, errors, prediction_drift, mae,
                ROW_NUMBER() OVER (PARTITION BY device_id ORDER BY window_end_ms DESC) AS n
         FROM telemetry INDEXED BY telemetry_by_time WHERE model_name = ?1 AND received_ms >= ?2)
     WHERE n <= ?3 ORDER BY device_id, window_end_ms DESC";

impl From<rusqlite::Error> for StoreError {
    fn from(source: rusqlite::Error) -> Self {
        StoreError::Sqlite {
            path: String::new(),
            source,
        }
    }
}

/// The embedded store: one SQLite database file.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: Arc<str>,
    checkpointer: Arc<Checkpointer>,
    /// Locked only by a call that holds `conn`.
    pending: Arc<Mutex<PendingHours>>,
    /// A flush of the pending hours is spawned and has not yet ended: ingest calls that
    /// find the hours full meanwhile spawn no other.
    flush_queued: Arc<AtomicBool>,
}

impl SqliteStore {
    /// Writes the pending hours ([`flush_hours`]); `queued`, the mark of a flush ingest
    /// queued, is dropped once they are written, under their lock, so that the next flush
    /// may be queued from then on.
    async fn write_pending_hours(&self, queued: Option<FlushQueued>) -> Result<()> {
        let pending = self.pending.clone();
        self.call(move |conn| {
            let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
            // Declared after the lock, so dropped before it.
            let _queued = queued;
            flush_hours(conn, &mut pending)
        })
        .await
    }
}

/// Clears [`SqliteStore::flush_queued`] when dropped: when its flush has run, and as well
/// when the flush is dropped unrun (the runtime shutting down), so that the flag never
/// stays set.
struct FlushQueued(Arc<AtomicBool>);

impl Drop for FlushQueued {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Device-hours' aggregates by key, in the order they are written.
type HourMap = std::collections::BTreeMap<HourKey, Hourly>;

/// Most device-hours ingest keeps folded in memory before it writes them (each holds its
/// merged statistics: about 10 KB).
pub(super) const MAX_PENDING_HOURS: usize = 2048;
/// Telemetry rows a flush folds again from their raw summaries per transaction.
const RECOVERY_CHUNK: i64 = 2048;

/// The hourly aggregates ingest has folded and not yet written.
///
/// Folding each transaction's summaries into the database costs a read, a parse, a merge
/// and a write of the device-hour's merged statistics (about 900 integers): with many
/// devices, once per summary and most of the store's work (BENCHMARKS.md, rows (m)). Ingest
/// folds into memory instead, and [`flush_hours`] writes each device-hour once for all the
/// summaries it gathered: once [`MAX_PENDING_HOURS`] are held (after the ingest call that
/// filled them, so that its acknowledgements do not wait), when the retention actor asks
/// (every minute), and before anything reads or prunes the aggregates, so that a read sees
/// every stored summary.
///
/// A raw summary is committed before it is acknowledged, as ever; what memory loses with
/// the process, the next flush folds again from the raw rows. `hourly_folded.folded_to` is
/// the last row the aggregates hold, and a row's rowid only grows: ingest sets it, since
/// SQLite would hand a pruned one out again.
struct PendingHours {
    /// `hourly_folded.folded_to` as this connection last read or wrote it.
    folded_to: i64,
    /// Rows after `folded_to` up to this one are folded from their raw summaries: those
    /// stored before this process opened the file, or whose folding was lost.
    recover_to: i64,
    /// The summaries of the rows after `recover_to`, folded.
    hours: HourMap,
    /// The last row ingest has stored.
    last: i64,
}

impl PendingHours {
    /// Nothing in memory: the rows after `folded_to`, up to `stored`, are folded from
    /// their raw summaries.
    fn starting(folded_to: i64, stored: i64) -> Self {
        let stored = stored.max(folded_to);
        PendingHours {
            folded_to,
            recover_to: stored,
            hours: HourMap::new(),
            last: stored,
        }
    }

    fn read(conn: &Connection) -> rusqlite::Result<Self> {
        let folded_to: i64 =
            conn.query_row("SELECT folded_to FROM hourly_folded", [], |r| r.get(0))?;
        Ok(PendingHours::starting(folded_to, last_telemetry_row(conn)?))
    }

    /// The row after which ingest stores, given the table's `last` row. Rows another
    /// connection stored are not in memory: everything after `folded_to` is then folded
    /// again from the raw rows.
    fn after_rows(&mut self, last: i64) -> i64 {
        if last > self.last {
            tracing::warn!(
                last,
                "telemetry stored by another connection; folding again from raw summaries"
            );
            *self = PendingHours::starting(self.folded_to, last);
        }
        self.last
    }
}

/// Folds a summary into its hour among `hours`.
fn fold_in(hours: &mut HourMap, device_id: &str, s: &DriftSummary) {
    use std::collections::btree_map::Entry;
    match hours.entry(hour_key(device_id, s)) {
        Entry::Occupied(mut hour) => hour.get_mut().add(s),
        Entry::Vacant(hour) => {
            hour.insert(Hourly::of(s));
        }
    }
}

fn last_telemetry_row(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT ifnull(max(rowid), 0) FROM telemetry", [], |r| {
        r.get(0)
    })
}

/// Writes what `pending` holds into the hourly aggregates: first the rows to fold again
/// from their raw summaries, a chunk per transaction, then the summaries ingest folded.
/// Should it fail, what memory held is folded again from the raw rows at the next flush.
fn flush_hours(conn: &mut Connection, pending: &mut PendingHours) -> Result<()> {
    loop {
        let tx = conn.transaction()?;
        let folded_to: i64 =
            tx.query_row("SELECT folded_to FROM hourly_folded", [], |r| r.get(0))?;
        if folded_to != pending.folded_to {
            // Another connection to the file has folded rows (it found them unfolded when
            // it opened): what this one holds may be among them, so it starts again from
            // the raw rows after theirs.
            tracing::warn!(
                folded_to,
                "hourly aggregates written by another connection; folding again from raw summaries"
            );
            let stored = last_telemetry_row(&tx)?.max(pending.last);
            *pending = PendingHours::starting(folded_to, stored);
        }
        if pending.folded_to < pending.recover_to {
            let (hours, to) = fold_raw_rows(&tx, pending.folded_to, pending.recover_to)?;
            write_hours(&tx, hours)?;
            set_folded_to(&tx, to)?;
            tx.commit()?;
            pending.folded_to = to;
            continue;
        }
        if pending.folded_to == pending.last {
            return Ok(());
        }
        // Taken before writing: if anything below fails, the raw rows are folded again.
        let hours = std::mem::take(&mut pending.hours);
        pending.recover_to = pending.last;
        write_hours(&tx, hours)?;
        set_folded_to(&tx, pending.last)?;
        tx.commit()?;
        pending.folded_to = pending.last;
        return Ok(());
    }
}

fn set_folded_to(tx: &Transaction<'_>, row: i64) -> Result<()> {
    exec(tx, "UPDATE hourly_folded SET folded_to = ?1", params![row])?;
    Ok(())
}

/// Folds the raw summaries of the rows after `after`, up to `until` and at most
/// [`RECOVERY_CHUNK`] of them; returns them with the last row they cover.
fn fold_raw_rows(tx: &Transaction<'_>, after: i64, until: i64) -> Result<(HourMap, i64)> {
    let mut hours = HourMap::new();
    let mut rows = 0;
    let mut last = after;
    let mut select = tx.prepare_cached(
        "SELECT rowid, msg_id, device_id, summary FROM telemetry
         WHERE rowid > ?1 AND rowid <= ?2 ORDER BY rowid LIMIT ?3",
    )?;
    let mut found = select.query(params![after, until, RECOVERY_CHUNK])?;
    while let Some(r) = found.next()? {
        rows += 1;
        last = r.get(0)?;
        let device_id: String = r.get(2)?;
        let summary = match r.get_ref(3)? {
            ValueRef::Blob(bytes) => edgeloop_shared::msgpack::from_slice::<DriftSummary>(bytes)
                .map_err(|e| e.to_string()),
            ValueRef::Text(text) => {
                serde_json::from_slice::<DriftSummary>(text).map_err(|e| e.to_string())
            }
            other => Err(format!("a summary of type {:?}", other.data_type())),
        };
        match summary {
            Ok(s) => fold_in(&mut hours, &device_id, &s),
            Err(e) => {
                let msg_id: String = r.get(1)?;
                tracing::error!(device = %device_id, %msg_id, error = %e,
                    "unreadable raw summary left out of its hourly aggregate");
            }
        }
    }
    Ok((hours, if rows < RECOVERY_CHUNK { until } else { last }))
}

fn write_hours(tx: &Transaction<'_>, hours: HourMap) -> Result<()> {
    for (key, hour) in hours {
        write_hourly(tx, &key, hour)?;
    }
    Ok(())
}

/// Copies the WAL into the database file from a thread and a connection of its own, so that
/// no commit waits for it: SQLite's automatic checkpoint runs inside the commit that crosses
/// its threshold (in the ingest bench, a 10 ms stall every 1 500 drift summaries). A passive
/// checkpoint never blocks the writer. The thread sleeps until a store call has run (at most
/// one checkpoint every [`CHECKPOINT_EVERY`]), and ends when the store is dropped.
struct Checkpointer {
    wake: std::sync::mpsc::SyncSender<()>,
}

impl Checkpointer {
    /// Starts checkpointing through `conn`, a connection to the store's file at `shown`.
    fn start(conn: Connection, shown: Arc<str>) -> Result<Self> {
        // One pending wake-up is enough: the calls between two checkpoints share it.
        let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                while woken.recv().is_ok() {
                    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        Ok(()) => {}
                        // Another checkpoint is running (a commit past the backstop).
                        Err(rusqlite::Error::SqliteFailure(e, _))
                            if e.code == rusqlite::ErrorCode::DatabaseBusy => {}
                        Err(e) => tracing::warn!(path = %shown, error = %e,
                            "WAL checkpoint failed; commits checkpoint by themselves past the backstop"),
                    }
                    std::thread::sleep(CHECKPOINT_EVERY);
                }
            })
            .map_err(|e| StoreError::Task(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(Checkpointer { wake })
    }

    /// Asks for a checkpoint soon (the WAL may have grown).
    fn nudge(&self) {
        let _ = self.wake.try_send(());
    }
}

impl SqliteStore {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let shown: Arc<str> = path.display().to_string().into();
        let with_path = |e: rusqlite::Error| StoreError::Sqlite {
            path: shown.to_string(),
            source: e,
        };
        let mut conn = Connection::open(path).map_err(with_path)?;
        // A drift summary's row is about 2.5 kB: on 4 KiB pages each fills a page of its
        // own, on 8 KiB pages three share one, and ingest writes a fifth fewer bytes
        // (BENCHMARKS.md). It applies when the file is created; an existing one keeps its size.
        conn.pragma_update(None, "page_size", PAGE_SIZE)
            .map_err(with_path)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(with_path)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(with_path)?;
        conn.pragma_update(None, "wal_autocheckpoint", WAL_BACKSTOP_PAGES)
            .map_err(with_path)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(with_path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(with_path)?;
        // Every statement of the ingest path stays prepared, with room for the API's.
        conn.set_prepared_statement_cache_capacity(64);
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(with_path)?;
        match version {
            0..SCHEMA_VERSION => {
                let tx = conn.transaction().map_err(with_path)?;
                if version < 1 {
                    tx.execute_batch(SCHEMA_V1).map_err(with_path)?;
                }
                if version < 2 {
                    tx.execute_batch(SCHEMA_V2).map_err(with_path)?;
                }
                if version < 3 {
                    tx.execute_batch(SCHEMA_V3).map_err(with_path)?;
                }
                if version < 4 {
                    tx.execute_batch(SCHEMA_V4).map_err(with_path)?;
                }
                if version < 5 {
                    tx.execute_batch(SCHEMA_V5).map_err(with_path)?;
                }
                if version < 6 {
                    tx.execute_batch(SCHEMA_V6).map_err(with_path)?;
                }
                if version < 7 {
                    tx.execute_batch(SCHEMA_V7).map_err(with_path)?;
                }
                if version < 8 {
                    tx.execute_batch(SCHEMA_V8).map_err(with_path)?;
                }
                if version < 9 {
                    tx.execute_batch(SCHEMA_V9).map_err(with_path)?;
                }
                if version < 10 {
                    tx.execute_batch(SCHEMA_V10).map_err(with_path)?;
                }
                tx.execute_batch(SCHEMA_V11).map_err(with_path)?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                    .map_err(with_path)?;
                tx.commit().map_err(with_path)?;
            }
            SCHEMA_VERSION => {}
            newer => {
                return Err(StoreError::Corrupt(format!(
                    "{shown} has schema version {newer}, newer than this build's {SCHEMA_VERSION}"
                )));
            }
        }
        let checkpointer =
            Checkpointer::start(Connection::open(path).map_err(with_path)?, shown.clone())?;
        let pending = PendingHours::read(&conn).map_err(with_path)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path: shown,
            checkpointer: Arc::new(checkpointer),
            pending: Arc::new(Mutex::new(pending)),
            flush_queued: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self.conn.clone();
        let path = self.path.clone();
        let done = tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard).map_err(|e| match e {
                StoreError::Sqlite { path: p, source } if p.is_empty() => StoreError::Sqlite {
                    path: path.to_string(),
                    source,
                },
                other => other,
            })
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?;
        self.checkpointer.nudge();
        done
    }
}

impl SqliteStore {
    /// Takes the device's next command sequence number and runs `update` (parameters: the
    /// row's id, the device, the sequence number, now) to record it on the row being sent;
    /// nothing is kept, and `None` returned, when the update touches no row.
    async fn mark_with_seq(
        &self,
        update: String,
        id: u64,
        device_id: &str,
        now_ms: u64,
    ) -> Result<Option<u64>> {
        let device_id = device_id.to_string();
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let seq = take_command_seq(&tx, &device_id, now_ms)?;
            let updated = tx.execute(
                &update,
                params![id as i64, device_id, seq as i64, now_ms as i64],
            )?;
            if updated == 0 {
                return Ok(None);
            }
            tx.commit()?;
            Ok(Some(seq))
        })
        .await
    }
}

fn u(v: i64) -> u64 {
    v.max(0) as u64
}

/// Runs a statement through the connection's statement cache: the ingest path runs the
/// same few statements for every message, and parsing SQL each time costs more than the
/// statements themselves.
fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<usize> {
    Ok(conn.prepare_cached(sql)?.execute(params)?)
}

fn touch_device(tx: &Transaction<'_>, device_id: &str, now_ms: u64) -> Result<()> {
    exec(
        tx,
        "INSERT INTO devices (id, last_seen_ms) VALUES (?1, ?2)
         ON CONFLICT (id) DO UPDATE SET last_seen_ms = MAX(last_seen_ms, excluded.last_seen_ms)",
        params![device_id, now_ms as i64],
    )?;
    Ok(())
}

fn apply_status(tx: &Transaction<'_>, device_id: &str, s: &DeviceStatus) -> Result<()> {
    if s.online {
        exec(
            tx,
            // A drift figure belongs to a model: a new model starts without one.
            "UPDATE devices SET online = 1, agent_version = ?2,
                 last_psi_max = CASE WHEN model_name IS ?3 AND model_version IS ?4
                                     THEN last_psi_max END,
                 model_name = ?3, model_version = ?4,
                 inferences = ?5, errors = ?6, malformed_messages = ?7,
                 outbox_entries = ?8, outbox_bytes = ?9, outbox_budget_bytes = ?10,
                 dropped_control = ?11, dropped_telemetry = ?12, dropped_samples = ?13,
                 trust_version = ?14
             WHERE id = ?1",
            params![
                device_id,
                s.agent_version,
                s.model.as_ref().map(|m| m.name.as_str()),
                s.model.as_ref().map(|m| m.version as i64),
                s.inferences as i64,
                s.errors as i64,
                s.malformed_messages as i64,
                s.outbox.entries as i64,
                s.outbox.bytes as i64,
                s.outbox.budget_bytes as i64,
                s.outbox.dropped.control as i64,
                s.outbox.dropped.telemetry as i64,
                s.outbox.dropped.samples as i64,
                s.trust_version as i64,
            ],
        )?;
    } else {
        // The last will knows nothing of the current model: only presence changes.
        exec(
            tx,
            "UPDATE devices SET online = 0 WHERE id = ?1",
            params![device_id],
        )?;
    }
    Ok(())
}

/// A drift summary's row, as row `?19`; nothing when its message id has one already.
const INSERT_TELEMETRY: &str =
    "INSERT INTO telemetry (msg_id, device_id, received_ms, model_name, model_version, window_seq,
         window_start_ms, window_end_ms, samples, psi_max, summary, drift_share, labelled, accuracy, latency_p99_ms, errors,
         prediction_drift, mae, rowid)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)
     ON CONFLICT (msg_id) DO NOTHING";

/// Stores a drift summary's row as `row` unless its message id has one already: 1 stored,
/// 0 a duplicate. `insert` is [`INSERT_TELEMETRY`], prepared once for a transaction's
/// summaries (a lookup in the statement cache hashes the statement's text: 5% of the
/// store's work per summary).
fn apply_drift(
    insert: &mut rusqlite::Statement<'_>,
    e: &Envelope,
    s: &DriftSummary,
    now_ms: u64,
    row: i64,
) -> Result<usize> {
    // MessagePack as received, in a BLOB (the column's TEXT affinity leaves BLOBs as they
    // are); JSON as its text.
    let text;
    let summary = match e.received_payload() {
        Some(ReceivedPayload::Msgpack(bytes)) => ValueRef::Blob(bytes),
        _ => {
            text = summary_json(e, s);
            ValueRef::Text(text.as_bytes())
        }
    };
    let summary = ToSqlOutput::Borrowed(summary);
    Ok(insert.execute(params![
        e.msg_id,
        e.device_id,
        now_ms as i64,
        s.model.name,
        s.model.version as i64,
        s.window_seq as i64,
        s.stats.start_ms as i64,
        s.stats.end_ms as i64,
        s.stats.samples as i64,
        s.stats.psi_max,
        summary,
        s.stats.drift_share,
        s.stats.labelled() as i64,
        s.stats.accuracy,
        s.stats.latency_quantile_ms(0.99),
        s.stats.errors as i64,
        s.stats.prediction_drift,
        s.stats.mae,
        row,
    ])?)
}

/// Sets devices' current drift figure from a transaction's summaries. Only a summary of
/// the model a device now serves is its current figure; a late summary of the previous
/// model is kept in `telemetry` but does not overwrite it.
fn apply_psi(tx: &Transaction<'_>, summaries: &[(&str, &DriftSummary)]) -> Result<()> {
    for ((device, model, version), psi) in latest_psi(summaries) {
        exec(
            tx,
            "UPDATE devices SET last_psi_max = ?2
             WHERE id = ?1 AND (model_name IS NULL OR (model_name = ?3 AND model_version = ?4))",
            params![device, psi, model, version as i64],
        )?;
    }
    Ok(())
}

/// Folds the summaries of one hour, already folded together, into its aggregate: one read,
/// one write.
fn write_hourly(tx: &Transaction<'_>, key: &HourKey, folded: Hourly) -> Result<()> {
    let (device, model, version, hour) = key;
    let existing = tx
        .prepare_cached(
            "SELECT windows, samples, psi_max, psi_sum, stats FROM telemetry_hourly
             WHERE device_id = ?1 AND model_name = ?2 AND model_version = ?3 AND hour_ms = ?4",
        )?
        .query_row(params![device, model, *version as i64, *hour as i64], |r| {
            let stats = stored_stats(r, 4)?;
            Ok(Hourly::from_row(
                u(r.get(0)?),
                u(r.get(1)?),
                r.get(2)?,
                r.get(3)?,
                stats,
            ))
        })
        .optional()?
        .flatten();
    let h = match existing {
        Some(mut h) => {
            h.absorb(folded);
            h
        }
        None => folded,
    };
    exec(
        tx,
        "INSERT INTO telemetry_hourly (device_id, model_name, model_version, hour_ms,
             windows, samples, psi_max, psi_sum, stats)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (device_id, model_name, model_version, hour_ms) DO UPDATE SET
             windows = excluded.windows, samples = excluded.samples,
             psi_max = excluded.psi_max, psi_sum = excluded.psi_sum, stats = excluded.stats",
        params![
            device,
            model,
            *version as i64,
            *hour as i64,
            h.windows as i64,
            h.samples as i64,
            h.psi_max,
            h.psi_sum,
            h.stats_msgpack()
        ],
    )?;
    Ok(())
}

/// An hourly aggregate's statistics column: MessagePack in a BLOB (the column's TEXT
/// affinity leaves BLOBs as they are), or the JSON text of rows written before.
fn stored_stats<'r>(r: &'r rusqlite::Row<'_>, column: usize) -> rusqlite::Result<StoredStats<'r>> {
    match r.get_ref(column)? {
        ValueRef::Blob(bytes) => Ok(StoredStats::Msgpack(bytes)),
        ValueRef::Text(text) => std::str::from_utf8(text)
            .map(StoredStats::Json)
            .map_err(|e| rusqlite::Error::Utf8Error(column, e)),
        other => Err(rusqlite::Error::InvalidColumnType(
            column,
            "stats".into(),
            other.data_type(),
        )),
    }
}

fn apply_deployment(
    tx: &Transaction<'_>,
    device_id: &str,
    d: &DeploymentStatus,
    now_ms: u64,
) -> Result<()> {
    exec(tx,
        "INSERT INTO deployment_events (device_id, received_ms, rollout_id, command_seq, stage, model, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            device_id,
            now_ms as i64,
            d.rollout_id.map(|r| r as i64),
            d.command_seq as i64,
            d.stage.as_str(),
            d.model.as_ref().map(ToString::to_string),
            d.detail,
        ],
    )?;
    let Some(rollout_id) = d.rollout_id else {
        return Ok(());
    };
    // A finished deployment stays finished; a late progress report does not reopen it.
    exec(
        tx,
        &format!(
            "UPDATE deployments SET status = ?3, detail = ?4, updated_ms = ?5
             WHERE rollout_id = ?1 AND device_id = ?2
               AND (status NOT IN ({FINAL_STATES_SQL})
                    OR (status IN ({AWAITING_VERDICT_SQL}) AND ?3 IN ({HEALTH_VERDICTS_SQL})))"
        ),
        params![
            rollout_id as i64,
            device_id,
            d.stage.as_str(),
            d.detail,
            now_ms as i64
        ],
    )?;
    refresh_rollout_status(tx, rollout_id)
}

fn apply_chunk(tx: &Transaction<'_>, device_id: &str, c: &SampleChunk, now_ms: u64) -> Result<()> {
    let dataset = c.dataset_id as i64;
    let part = tx
        .prepare_cached(
            "SELECT status, upload_seq, sha256 FROM dataset_parts WHERE dataset_id = ?1 AND device_id = ?2",
        )?
        .query_row(params![dataset, device_id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?, r.get(2)?))
        })
        .optional()?
        .map(|(status, seq, sha256)| {
            Ok::<_, StoreError>(PartState {
                status: PartStatus::parse(&status)?,
                upload_seq: seq.map(u),
                sha256,
            })
        })
        .transpose()?;
    let fail = |detail: &str| -> Result<()> {
        exec(
            tx,
            "UPDATE dataset_parts SET status = 'failed', upload_seq = ?3, detail = ?4, updated_ms = ?5
             WHERE dataset_id = ?1 AND device_id = ?2",
            params![dataset, device_id, c.command_seq as i64, detail, now_ms as i64],
        )?;
        exec(
            tx,
            "DELETE FROM dataset_chunks WHERE dataset_id = ?1 AND device_id = ?2",
            params![dataset, device_id],
        )?;
        Ok(())
    };
    match chunk_step(part.as_ref(), c) {
        ChunkStep::Ignore(why) => {
            tracing::warn!(
                device = device_id,
                dataset = c.dataset_id,
                why,
                "sample chunk dropped"
            );
            return Ok(());
        }
        ChunkStep::Fail(detail) => return fail(&detail),
        ChunkStep::Begin => {
            exec(
                tx,
                "DELETE FROM dataset_chunks WHERE dataset_id = ?1 AND device_id = ?2",
                params![dataset, device_id],
            )?;
            exec(
                tx,
                "UPDATE dataset_parts SET status = 'receiving', upload_seq = ?3, model_name = ?4,
                     model_version = ?5, rows = ?6, bytes = ?7, sha256 = ?8, chunks = ?9,
                     detail = NULL, updated_ms = ?10
                 WHERE dataset_id = ?1 AND device_id = ?2",
                params![
                    dataset,
                    device_id,
                    c.command_seq as i64,
                    c.model.as_ref().map(|m| m.name.as_str()),
                    c.model.as_ref().map(|m| m.version as i64),
                    c.rows as i64,
                    c.total_bytes as i64,
                    c.sha256,
                    c.count as i64,
                    now_ms as i64
                ],
            )?;
        }
        ChunkStep::Add => {}
    }
    let bytes = match c.bytes() {
        Ok(b) => b,
        Err(e) => return fail(&e),
    };
    exec(
        tx,
        "INSERT OR IGNORE INTO dataset_chunks (dataset_id, device_id, idx, data) VALUES (?1, ?2, ?3, ?4)",
        params![dataset, device_id, c.index as i64, bytes],
    )?;
    exec(
        tx,
        "UPDATE dataset_parts SET updated_ms = ?3 WHERE dataset_id = ?1 AND device_id = ?2",
        params![dataset, device_id, now_ms as i64],
    )?;
    let have: i64 = tx
        .prepare_cached(
            "SELECT COUNT(*) FROM dataset_chunks WHERE dataset_id = ?1 AND device_id = ?2",
        )?
        .query_row(params![dataset, device_id], |r| r.get(0))?;
    if have < c.count as i64 {
        return Ok(());
    }
    let pieces = tx
        .prepare_cached(
            "SELECT data FROM dataset_chunks WHERE dataset_id = ?1 AND device_id = ?2 ORDER BY idx",
        )?
        .query_map(params![dataset, device_id], |r| r.get::<_, Vec<u8>>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    match join_sample_chunks(&pieces, c.total_bytes, &c.sha256) {
        Ok(file) => {
            exec(
                tx,
                "UPDATE dataset_parts SET status = 'complete', content = ?3, updated_ms = ?4
                 WHERE dataset_id = ?1 AND device_id = ?2",
                params![dataset, device_id, file, now_ms as i64],
            )?;
            exec(
                tx,
                "DELETE FROM dataset_chunks WHERE dataset_id = ?1 AND device_id = ?2",
                params![dataset, device_id],
            )?;
            Ok(())
        }
        Err(e) => fail(&e),
    }
}

/// The next command sequence number of a device, taken. It never goes below the clock, so
/// a controller whose database was lost still issues numbers above any the device accepted.
fn take_command_seq(tx: &Transaction<'_>, device_id: &str, now_ms: u64) -> Result<u64> {
    let last: i64 = tx
        .query_row(
            "SELECT last_command_seq FROM devices WHERE id = ?1",
            params![device_id],
            |r| r.get(0),
        )
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("device {device_id}")))?;
    let seq = (u(last) + 1).max(now_ms);
    tx.execute(
        "UPDATE devices SET last_command_seq = ?2 WHERE id = ?1",
        params![device_id, seq as i64],
    )?;
    Ok(seq)
}

fn load_datasets(conn: &Connection, filter: &str, param: i64) -> Result<Vec<DatasetRow>> {
    let mut rows = conn
        .prepare(&format!(
            "SELECT id, model_name, created_ms, created_by, reason, max_rows FROM datasets {filter}"
        ))?
        .query_map(params![param], |r| {
            Ok(DatasetRow {
                id: u(r.get(0)?),
                model_name: r.get(1)?,
                created_ms: u(r.get(2)?),
                created_by: r.get(3)?,
                reason: r.get(4)?,
                max_rows: r.get::<_, Option<i64>>(5)?.map(u),
                parts: Vec::new(),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut parts = conn.prepare_cached(
        "SELECT p.device_id, p.status, p.model_name, p.model_version, p.rows, p.bytes, p.sha256,
                p.chunks, p.detail, p.updated_ms,
                (SELECT COUNT(*) FROM dataset_chunks c
                 WHERE c.dataset_id = p.dataset_id AND c.device_id = p.device_id)
         FROM dataset_parts p WHERE p.dataset_id = ?1 ORDER BY p.device_id",
    )?;
    for row in &mut rows {
        row.parts = parts
            .query_map(params![row.id as i64], |r| {
                Ok((
                    r.get::<_, String>(1)?,
                    DatasetPart {
                        device_id: r.get(0)?,
                        status: PartStatus::Requested,
                        model: previous_model(r.get(2)?, r.get(3)?),
                        rows: r.get::<_, Option<i64>>(4)?.map(u),
                        bytes: r.get::<_, Option<i64>>(5)?.map(u),
                        sha256: r.get(6)?,
                        chunks: r.get::<_, Option<i64>>(7)?.map(|n| u(n) as u32),
                        detail: r.get(8)?,
                        updated_ms: u(r.get(9)?),
                        chunks_received: u(r.get(10)?) as u32,
                    },
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?
            .into_iter()
            .map(|(status, mut part)| {
                part.status = PartStatus::parse(&status)?;
                if part.status == PartStatus::Complete {
                    part.chunks_received = part.chunks.unwrap_or(0);
                }
                Ok(part)
            })
            .collect::<Result<Vec<_>>>()?;
    }
    Ok(rows)
}

fn refresh_rollout_status(tx: &Transaction<'_>, rollout_id: u64) -> Result<()> {
    let (total, active, finished, gated): (i64, i64, i64, bool) = tx
        .prepare_cached(&format!(
            "SELECT COUNT(*),
                    COALESCE(SUM(status IN ({RUNNING_STATES_SQL})), 0),
                    COALESCE(SUM(status IN ({FINAL_STATES_SQL})), 0),
                    COALESCE((SELECT failure_gated FROM rollouts WHERE id = ?1), 0)
             FROM deployments WHERE rollout_id = ?1"
        ))?
        .query_row(params![rollout_id as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?;
    let status = RolloutStatus::from_counts(u(total), u(active), u(finished), gated);
    exec(
        tx,
        &format!(
            "UPDATE rollouts SET status = ?2 WHERE id = ?1 AND status IN ({SELF_FINISHING_SQL})"
        ),
        params![rollout_id as i64, status.as_str()],
    )?;
    Ok(())
}

/// A model row with its features, lineage and requirements as stored (JSON).
type StoredModel = (ModelRow, String, Option<String>, Option<String>);

fn model_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredModel> {
    Ok((
        ModelRow {
            name: r.get(0)?,
            version: u(r.get(1)?),
            label: r.get(2)?,
            created_ms: u(r.get(3)?),
            bundle_sha256: r.get(4)?,
            bundle_size: u(r.get(5)?),
            features: Vec::new(),
            signed_by: r.get(7)?,
            lineage: None,
            requirements: Default::default(),
        },
        r.get(6)?,
        r.get(8)?,
        r.get(9)?,
    ))
}

fn with_features((mut model, features, lineage, requirements): StoredModel) -> Result<ModelRow> {
    model.features = serde_json::from_str(&features).map_err(|e| {
        StoreError::Corrupt(format!(
            "features of {} v{}: {e}",
            model.name, model.version
        ))
    })?;
    model.lineage = parse_lineage(&model.name, model.version, lineage)?;
    model.requirements = parse_requirements(&model.name, model.version, requirements)?;
    Ok(model)
}

const DELTA_COLUMNS_BARE: &str =
    "name, version, base_version, base_sha256, bundle_sha256, bundle_size";
const DELTA_COLUMNS: &str =
    "x.name, x.version, x.base_version, x.base_sha256, x.bundle_sha256, x.bundle_size";

/// A delta bundle from the [`DELTA_COLUMNS`] starting at column `at`.
fn delta_from_row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<ModelDelta> {
    Ok(ModelDelta {
        name: r.get(at)?,
        version: u(r.get(at + 1)?),
        base_version: u(r.get(at + 2)?),
        base_sha256: r.get(at + 3)?,
        bundle_sha256: r.get(at + 4)?,
        bundle_size: u(r.get(at + 5)?),
    })
}

const MODEL_COLUMNS: &str = "name, version, label, created_ms, bundle_sha256, bundle_size, \
     features, signed_by, lineage, requirements";

fn token_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(TokenRow, String)> {
    Ok((
        TokenRow {
            id: r.get(0)?,
            group: r.get(1)?,
            tags: Vec::new(),
            expires_ms: u(r.get(3)?),
            uses_left: r.get::<_, Option<i64>>(4)?.map(u),
            auto_approve: r.get(5)?,
            created_ms: u(r.get(6)?),
            created_by: r.get(7)?,
        },
        r.get(2)?,
    ))
}

fn with_token_tags((mut token, tags): (TokenRow, String)) -> Result<TokenRow> {
    token.tags = parse_tags(&token.id, Some(tags))?;
    Ok(token)
}

fn load_enrollments(
    conn: &Connection,
    filter: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<EnrollmentRow>> {
    let rows = conn
        .prepare_cached(&format!(
            "SELECT device_id, public_key, token_id, group_name, tags, board, arch, agent_version,
                    status, created_ms, decided_ms, decided_by
             FROM enrollments {filter}"
        ))?
        .query_map(params, |r| {
            Ok((
                EnrollmentRow {
                    device_id: r.get(0)?,
                    public_key: r.get(1)?,
                    token_id: r.get(2)?,
                    group: r.get(3)?,
                    tags: Vec::new(),
                    board: r.get(5)?,
                    arch: r.get(6)?,
                    agent_version: r.get(7)?,
                    status: EnrollmentStatus::Pending,
                    created_ms: u(r.get(9)?),
                    decided_ms: r.get::<_, Option<i64>>(10)?.map(u),
                    decided_by: r.get(11)?,
                },
                r.get::<_, String>(4)?,
                r.get::<_, String>(8)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|(mut row, tags, status)| {
            row.tags = parse_tags(&row.device_id, Some(tags))?;
            row.status = parse_enrollment_status(&status)?;
            Ok(row)
        })
        .collect()
}

/// Puts an approved enrollment's device in the registry with its group, tags and board.
fn register_enrolled(tx: &Transaction<'_>, row: &EnrollmentRow) -> Result<()> {
    tx.execute(
        "INSERT INTO devices (id, last_seen_ms, group_name, tags, board, arch, agent_version)
         VALUES (?1, 0, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (id) DO UPDATE SET group_name = excluded.group_name, tags = excluded.tags,
             board = excluded.board, arch = excluded.arch",
        params![
            row.device_id,
            row.group,
            serde_json::to_string(&row.tags).expect("strings serialize"),
            row.board,
            row.arch,
            row.agent_version
        ],
    )?;
    Ok(())
}

fn load_retrainings(
    conn: &Connection,
    filter: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<RetrainingRow>> {
    let rows = conn
        .prepare_cached(&format!(
            "SELECT id, model_name, from_version, fired_ms, reason, status, detail, candidate_version,
                    gate, rollout_id, updated_ms
             FROM retrainings {filter}"
        ))?
        .query_map(params, |r| {
            Ok((
                RetrainingRow {
                    id: u(r.get(0)?),
                    model_name: r.get(1)?,
                    from_version: u(r.get(2)?),
                    fired_ms: u(r.get(3)?),
                    reason: r.get(4)?,
                    status: RetrainingStatus::Training,
                    detail: r.get(6)?,
                    candidate_version: r.get::<_, Option<i64>>(7)?.map(u),
                    gate: r.get(8)?,
                    rollout_id: r.get::<_, Option<i64>>(9)?.map(u),
                    updated_ms: u(r.get(10)?),
                },
                r.get::<_, String>(5)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|(mut row, status)| {
            row.status = RetrainingStatus::parse(&status)?;
            Ok(row)
        })
        .collect()
}

/// The rollouts a `WHERE` clause (or none) selects, oldest first.
fn load_rollouts(conn: &Connection, filter: &str) -> Result<Vec<RolloutRow>> {
    let ids: Vec<i64> = conn
        .prepare_cached(&format!("SELECT id FROM rollouts {filter} ORDER BY id"))?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    ids.into_iter()
        .filter_map(|id| load_rollout(conn, u(id)).transpose())
        .collect()
}

fn load_rollout(conn: &Connection, id: u64) -> Result<Option<RolloutRow>> {
    let row = conn
        .query_row(
            "SELECT id, model_name, model_version, created_ms, status, rollback, plan, current_wave, reason,
                    wave_opened_ms, target
             FROM rollouts WHERE id = ?1",
            params![id as i64],
            |r| {
                Ok(StoredRollout {
                    id: u(r.get(0)?),
                    model_name: r.get(1)?,
                    model_version: u(r.get(2)?),
                    created_ms: u(r.get(3)?),
                    status: r.get(4)?,
                    rollback: r.get(5)?,
                    plan: r.get(6)?,
                    current_wave: u(r.get(7)?) as u32,
                    reason: r.get(8)?,
                    wave_opened_ms: u(r.get(9)?),
                    target: r.get(10)?,
                })
            },
        )
        .optional()?;
    let Some(row) = row else {
        return Ok(None);
    };
    let mut stmt = conn.prepare_cached(
        "SELECT device_id, status, detail, command_seq, updated_ms, wave, previous_model, previous_version
         FROM deployments WHERE rollout_id = ?1 ORDER BY device_id",
    )?;
    let deployments = stmt
        .query_map(params![id as i64], |r| {
            Ok(DeploymentRow {
                device_id: r.get(0)?,
                status: r.get(1)?,
                detail: r.get(2)?,
                command_seq: r.get::<_, Option<i64>>(3)?.map(u),
                updated_ms: u(r.get(4)?),
                wave: u(r.get(5)?) as u32,
                previous: previous_model(r.get(6)?, r.get(7)?),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    row.into_rollout(deployments).map(Some)
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn ingest_many(
        &self,
        envelopes: Arc<[Envelope]>,
        received_ms: u64,
    ) -> Result<Vec<Ingested>> {
        let (pending, queued) = (self.pending.clone(), self.flush_queued.clone());
        let (results, full) = self.call(move |conn| {
            let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
            let tx = conn.transaction()?;
            let mut results = Vec::with_capacity(envelopes.len());
            let mut summaries = Vec::new();
            let mut touched = std::collections::HashSet::new();
            let mut insert_drift = None;
            // The next drift summary's row: after every row there is and every row folded,
            // even pruned ones (see `PendingHours`).
            let mut next_row = None;
            for envelope in envelopes.iter() {
                // A drift summary's row is keyed by its message id, and is kept as long as
                // `seen_messages` keeps ids: it is its own record of having been seen.
                let fresh = match &envelope.message {
                    Message::DriftSummary(s) => {
                        let (insert, row) = match (&mut insert_drift, next_row) {
                            (Some(insert), Some(row)) => (insert, row),
                            _ => (
                                insert_drift.insert(tx.prepare_cached(INSERT_TELEMETRY)?),
                                pending.after_rows(last_telemetry_row(&tx)?) + 1,
                            ),
                        };
                        let stored = apply_drift(insert, envelope, s, received_ms, row)?;
                        next_row = Some(row + stored as i64);
                        stored
                    }
                    _ => exec(&tx,
                        "INSERT OR IGNORE INTO seen_messages (msg_id, device_id, received_ms) VALUES (?1, ?2, ?3)",
                        params![envelope.msg_id, envelope.device_id, received_ms as i64],
                    )?,
                };
                if fresh == 0 {
                    results.push(Ingested::Duplicate);
                    continue;
                }
                // Every message of a transaction has the same time: once per device.
                if touched.insert(envelope.device_id.as_str()) {
                    touch_device(&tx, &envelope.device_id, received_ms)?;
                }
                match &envelope.message {
                    Message::Status(s) => apply_status(&tx, &envelope.device_id, s)?,
                    Message::DriftSummary(s) => summaries.push((envelope.device_id.as_str(), s)),
                    Message::DeploymentStatus(d) => {
                        apply_deployment(&tx, &envelope.device_id, d, received_ms)?
                    }
                    Message::SampleChunk(c) => apply_chunk(&tx, &envelope.device_id, c, received_ms)?,
                    // Served by the ingestor once stored; nothing to keep but its id.
                    Message::BundleRequest(_) => {}
                    Message::Command(_) | Message::Receipt(_) | Message::BundleChunk(_) => {
                        return Err(StoreError::Corrupt(format!(
                            "devices do not send `{}` messages",
                            envelope.message.kind()
                        )));
                    }
                }
                results.push(Ingested::Stored);
            }
            apply_psi(&tx, &summaries)?;
            drop(insert_drift);
            tx.commit()?;
            if let Some(next) = next_row {
                for (device, s) in &summaries {
                    fold_in(&mut pending.hours, device, s);
                }
                pending.last = next - 1;
            }
            // Decided under the pending hours' lock, which a flush holds too.
            let full = pending.hours.len() > MAX_PENDING_HOURS
                && !queued.swap(true, Ordering::AcqRel);
            Ok((results, full))
        })
        .await?;
        if full {
            // After this call, so that the group's acknowledgements do not wait for it.
            let store = self.clone();
            let queued = FlushQueued(self.flush_queued.clone());
            tokio::spawn(async move {
                if let Err(e) = store.write_pending_hours(Some(queued)).await {
                    // The next flush folds the raw rows again.
                    tracing::warn!(error = %e, "cannot write hourly aggregates; trying again later");
                }
            });
        }
        Ok(results)
    }

    async fn register_devices(&self, ids: &[String]) -> Result<u64> {
        let ids = ids.to_vec();
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let mut added = 0;
            for id in &ids {
                added += tx.execute(
                    "INSERT INTO devices (id, last_seen_ms) VALUES (?1, 0) ON CONFLICT (id) DO NOTHING",
                    params![id],
                )? as u64;
            }
            tx.commit()?;
            Ok(added)
        })
        .await
    }

    async fn device_exists(&self, id: &str) -> Result<bool> {
        let id = id.to_string();
        self.call(move |conn| {
            Ok(conn
                .query_row("SELECT 1 FROM devices WHERE id = ?1", params![id], |_| {
                    Ok(())
                })
                .optional()?
                .is_some())
        })
        .await
    }

    async fn devices(&self) -> Result<Vec<DeviceRow>> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, online, agent_version, model_name, model_version, last_seen_ms,
                        inferences, errors, malformed_messages, last_psi_max,
                        outbox_entries, outbox_bytes, outbox_budget_bytes,
                        dropped_control, dropped_telemetry, dropped_samples,
                        group_name, tags, board, arch, trust_version
                 FROM devices ORDER BY id",
            )?;
            let rows = stmt
                .query_map([], |r| {
                    let tags: Option<String> = r.get(17)?;
                    Ok((
                        DeviceRow {
                            id: r.get(0)?,
                            online: r.get(1)?,
                            agent_version: r.get(2)?,
                            model_name: r.get(3)?,
                            model_version: r.get::<_, Option<i64>>(4)?.map(u),
                            last_seen_ms: u(r.get(5)?),
                            inferences: u(r.get(6)?),
                            errors: u(r.get(7)?),
                            malformed_messages: u(r.get(8)?),
                            last_psi_max: r.get(9)?,
                            outbox: OutboxStatus {
                                entries: u(r.get(10)?),
                                bytes: u(r.get(11)?),
                                budget_bytes: u(r.get(12)?),
                                dropped: DropCounts {
                                    control: u(r.get(13)?),
                                    telemetry: u(r.get(14)?),
                                    samples: u(r.get(15)?),
                                },
                            },
                            group: r.get(16)?,
                            tags: Vec::new(),
                            board: r.get(18)?,
                            arch: r.get(19)?,
                            trust_version: u(r.get(20)?),
                        },
                        tags,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter()
                .map(|(mut row, tags)| {
                    row.tags = parse_tags(&row.id, tags)?;
                    Ok(row)
                })
                .collect()
        })
        .await
    }

    async fn telemetry(&self, device_id: &str, limit: u32) -> Result<Vec<TelemetryRow>> {
        let device_id = device_id.to_string();
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT msg_id, device_id, received_ms, model_name, model_version, window_seq,
                        window_start_ms, window_end_ms, samples, psi_max, summary
                 FROM telemetry WHERE device_id = ?1
                 ORDER BY received_ms DESC, window_end_ms DESC LIMIT ?2",
            )?;
            let rows = stmt
                .query_map(params![device_id, limit], |r| {
                    Ok((
                        TelemetryRow {
                            msg_id: r.get(0)?,
                            device_id: r.get(1)?,
                            received_ms: u(r.get(2)?),
                            model_name: r.get(3)?,
                            model_version: u(r.get(4)?),
                            window_seq: u(r.get(5)?),
                            window_start_ms: u(r.get(6)?),
                            window_end_ms: u(r.get(7)?),
                            samples: u(r.get(8)?),
                            psi_max: r.get(9)?,
                            summary: serde_json::Value::Null,
                        },
                        r.get::<_, rusqlite::types::Value>(10)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter()
                .map(|(mut row, summary)| {
                    row.summary = match summary {
                        rusqlite::types::Value::Text(text) => {
                            summary_value(&row.msg_id, ReceivedPayload::Json(&text))?
                        }
                        rusqlite::types::Value::Blob(bytes) => {
                            summary_value(&row.msg_id, ReceivedPayload::Msgpack(&bytes))?
                        }
                        other => {
                            return Err(StoreError::Corrupt(format!(
                                "summary {}: a {:?}",
                                row.msg_id,
                                other.data_type()
                            )));
                        }
                    };
                    Ok(row)
                })
                .collect()
        })
        .await
    }

    async fn hourly(&self, device_id: &str, limit: u32) -> Result<Vec<HourlyRow>> {
        let device_id = device_id.to_string();
        let pending = self.pending.clone();
        self.call(move |conn| {
            flush_hours(conn, &mut pending.lock().unwrap_or_else(|p| p.into_inner()))?;
            let mut stmt = conn.prepare_cached(
                "SELECT device_id, model_name, model_version, hour_ms, windows, samples,
                        psi_max, psi_sum, stats
                 FROM telemetry_hourly WHERE device_id = ?1
                 ORDER BY hour_ms DESC, model_name, model_version LIMIT ?2",
            )?;
            let rows = stmt
                .query_map(params![device_id, limit], |r| {
                    let windows = u(r.get(4)?);
                    Ok((
                        HourlyRow {
                            device_id: r.get(0)?,
                            model_name: r.get(1)?,
                            model_version: u(r.get(2)?),
                            hour_ms: u(r.get(3)?),
                            windows,
                            samples: u(r.get(5)?),
                            psi_max: r.get(6)?,
                            psi_mean: r.get::<_, f64>(7)? / windows.max(1) as f64,
                            stats: serde_json::Value::Null,
                        },
                        stored_stats(r, 8)?.to_value(),
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter()
                .map(|(mut row, stats)| {
                    row.stats = stats?;
                    Ok(row)
                })
                .collect()
        })
        .await
    }

    async fn flush_hourly(&self) -> Result<()> {
        self.write_pending_hours(None).await
    }

    async fn prune(&self, raw_before_ms: u64, aggregates_before_ms: u64) -> Result<Pruned> {
        let pending = self.pending.clone();
        self.call(move |conn| {
            // No raw summary goes before its hour holds it.
            flush_hours(conn, &mut pending.lock().unwrap_or_else(|p| p.into_inner()))?;
            let tx = conn.transaction()?;
            let telemetry = tx.execute(
                "DELETE FROM telemetry WHERE received_ms < ?1",
                params![raw_before_ms as i64],
            )?;
            let hourly = tx.execute(
                "DELETE FROM telemetry_hourly WHERE hour_ms < ?1",
                params![aggregates_before_ms as i64],
            )?;
            let seen_messages = tx.execute(
                "DELETE FROM seen_messages WHERE received_ms < ?1",
                params![raw_before_ms as i64],
            )?;
            tx.commit()?;
            Ok(Pruned {
                telemetry: telemetry as u64,
                hourly: hourly as u64,
                seen_messages: seen_messages as u64,
            })
        })
        .await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: u64,
        ttl_ms: u64,
    ) -> Result<bool> {
        let (name, holder) = (name.to_string(), holder.to_string());
        self.call(move |conn| {
            let taken = conn.execute(
                "INSERT INTO leases (name, holder, expires_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,
                     expires_ms = excluded.expires_ms
                 WHERE leases.holder = excluded.holder OR leases.expires_ms < ?4",
                params![name, holder, (now_ms + ttl_ms) as i64, now_ms as i64],
            )?;
            Ok(taken == 1)
        })
        .await
    }

    async fn trust(&self) -> Result<Option<StoredTrust>> {
        self.call(|conn| {
            Ok(conn
                .query_row(
                    "SELECT version, state, signed FROM trust WHERE id = 1",
                    [],
                    |r| {
                        Ok(StoredTrust {
                            version: u(r.get(0)?),
                            state: r.get(1)?,
                            signed: r.get(2)?,
                        })
                    },
                )
                .optional()?)
        })
        .await
    }

    async fn replace_trust(&self, previous: u64, next: &StoredTrust) -> Result<bool> {
        let next = next.clone();
        self.call(move |conn| {
            let changed = conn.execute(
                "INSERT INTO trust (id, version, state, signed) VALUES (1, ?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET version = excluded.version,
                     state = excluded.state, signed = excluded.signed
                 WHERE trust.version = ?4",
                params![
                    next.version as i64,
                    next.state,
                    next.signed,
                    previous as i64
                ],
            )?;
            Ok(changed == 1)
        })
        .await
    }

    async fn deployment_events(&self, device_id: &str, limit: u32) -> Result<Vec<DeploymentEvent>> {
        let device_id = device_id.to_string();
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT device_id, received_ms, rollout_id, command_seq, stage, model, detail
                 FROM deployment_events WHERE device_id = ?1 ORDER BY id DESC LIMIT ?2",
            )?;
            let rows = stmt
                .query_map(params![device_id, limit], |r| {
                    Ok(DeploymentEvent {
                        device_id: r.get(0)?,
                        received_ms: u(r.get(1)?),
                        rollout_id: r.get::<_, Option<i64>>(2)?.map(u),
                        command_seq: u(r.get(3)?),
                        stage: r.get(4)?,
                        model: r.get(5)?,
                        detail: r.get(6)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn insert_model(&self, model: &ModelRow) -> Result<()> {
        let model = model.clone();
        self.call(move |conn| {
            let features = serde_json::to_string(&model.features).expect("strings serialize");
            let inserted = conn.execute(
                &format!("INSERT OR IGNORE INTO models ({MODEL_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
                params![
                    model.name,
                    model.version as i64,
                    model.label,
                    model.created_ms as i64,
                    model.bundle_sha256,
                    model.bundle_size as i64,
                    features,
                    model.signed_by,
                    lineage_json(&model),
                    requirements_json(&model),
                ],
            )?;
            if inserted == 0 {
                return Err(StoreError::Conflict(format!("model {} v{}", model.name, model.version)));
            }
            Ok(())
        })
        .await
    }

    async fn models(&self) -> Result<Vec<ModelRow>> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {MODEL_COLUMNS} FROM models ORDER BY name, version"
            ))?;
            let rows = stmt
                .query_map([], model_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter().map(with_features).collect()
        })
        .await
    }

    async fn model(&self, name: &str, version: u64) -> Result<Option<ModelRow>> {
        let name = name.to_string();
        self.call(move |conn| {
            conn.query_row(
                &format!("SELECT {MODEL_COLUMNS} FROM models WHERE name = ?1 AND version = ?2"),
                params![name, version as i64],
                model_from_row,
            )
            .optional()?
            .map(with_features)
            .transpose()
        })
        .await
    }

    async fn insert_model_delta(&self, delta: &ModelDelta) -> Result<()> {
        let delta = delta.clone();
        self.call(move |conn| {
            conn.execute(
                &format!(
                    "INSERT OR REPLACE INTO model_deltas ({DELTA_COLUMNS_BARE}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
                ),
                params![
                    delta.name,
                    delta.version as i64,
                    delta.base_version as i64,
                    delta.base_sha256,
                    delta.bundle_sha256,
                    delta.bundle_size as i64,
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn model_deltas(&self, name: &str, version: u64) -> Result<Vec<ModelDelta>> {
        let name = name.to_string();
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {DELTA_COLUMNS} FROM model_deltas x
                 WHERE name = ?1 AND version = ?2 ORDER BY base_version"
            ))?;
            let rows = stmt
                .query_map(params![name, version as i64], |r| delta_from_row(r, 0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn create_rollout(&self, new: &NewRollout) -> Result<RolloutRow> {
        let new = new.clone();
        self.call(move |conn| {
            let NewRollout { name, version, rollback, devices, plan, target, now_ms } = &new;
            let target_json = target.as_ref().map(|t| serde_json::to_string(t).expect("a target serializes"));
            let (version, now_ms, rollback) = (*version, *now_ms, *rollback);
            let plan_json = serde_json::to_string(plan).expect("a plan serializes");
            let tx = conn.transaction()?;
            let known: i64 = tx.query_row(
                "SELECT COUNT(*) FROM models WHERE name = ?1 AND version = ?2",
                params![name, version as i64],
                |r| r.get(0),
            )?;
            if known == 0 {
                return Err(StoreError::NotFound(format!("model {name} v{version}")));
            }
            for device in devices {
                let exists: i64 =
                    tx.query_row("SELECT COUNT(*) FROM devices WHERE id = ?1", params![device], |r| r.get(0))?;
                if exists == 0 {
                    return Err(StoreError::NotFound(format!("device {device}")));
                }
            }
            tx.execute(
                "INSERT INTO rollouts (model_name, model_version, created_ms, status, rollback, plan, current_wave,
                                       failure_gated, wave_opened_ms, target)
                 VALUES (?1, ?2, ?3, 'in_progress', ?4, ?5, 0, ?6, ?3, ?7)",
                params![name, version as i64, now_ms as i64, rollback, plan_json, plan.failure_threshold.is_some(), target_json],
            )?;
            let id = tx.last_insert_rowid() as u64;
            let waves = plan.assign(id, devices);
            let mut superseded = std::collections::BTreeSet::new();
            for (device, wave) in devices.iter().zip(waves) {
                let mut stmt = tx.prepare_cached(&format!(
                    "SELECT rollout_id FROM deployments WHERE device_id = ?1
                     AND status NOT IN ({FINAL_STATES_SQL})"
                ))?;
                let older: Vec<i64> = stmt
                    .query_map(params![device], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                for rollout in older {
                    tx.execute(
                        "UPDATE deployments SET status = 'superseded', detail = ?3, updated_ms = ?4
                         WHERE rollout_id = ?1 AND device_id = ?2",
                        params![rollout, device, format!("superseded by rollout {id}"), now_ms as i64],
                    )?;
                    superseded.insert(rollout as u64);
                }
                let (previous_model, previous_version): (Option<String>, Option<i64>) = tx.query_row(
                    "SELECT model_name, model_version FROM devices WHERE id = ?1",
                    params![device],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                let deadline = (wave == 0).then(|| new.first_deadline_ms() as i64);
                tx.execute(
                    "INSERT INTO deployments (rollout_id, device_id, status, updated_ms, wave, deadline_ms,
                                              previous_model, previous_version)
                     VALUES (?1, ?2, 'pending', ?3, ?4, ?5, ?6, ?7)",
                    params![id as i64, device, now_ms as i64, wave, deadline, previous_model, previous_version],
                )?;
            }
            for rollout in superseded {
                refresh_rollout_status(&tx, rollout)?;
            }
            refresh_rollout_status(&tx, id)?;
            let row = load_rollout(&tx, id)?.expect("just inserted");
            tx.commit()?;
            Ok(row)
        })
        .await
    }

    async fn join_rollouts(&self, now_ms: u64) -> Result<Vec<(u64, String)>> {
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let mut rollouts = Vec::new();
            let mut plans = std::collections::HashMap::new();
            type Row = (i64, String, i64, String, Option<String>, i64, Option<String>);
            let rows: Vec<Row> = tx
                .prepare(&format!(
                    "SELECT r.id, r.model_name, r.model_version, r.target, r.plan, r.current_wave,
                            m.requirements
                     FROM rollouts r
                     LEFT JOIN models m ON m.name = r.model_name AND m.version = r.model_version
                     WHERE r.target IS NOT NULL AND r.rollback = 0
                       AND r.status IN ({JOINABLE_STATUSES_SQL})"
                ))?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)))?
                .collect::<rusqlite::Result<_>>()?;
            for (id, model_name, model_version, target, plan, wave, requirements) in rows {
                let requirements = parse_requirements(&model_name, u(model_version), requirements)?;
                let target = serde_json::from_str(&target)
                    .map_err(|e| StoreError::Corrupt(format!("target of rollout {id}: {e}")))?;
                let plan: RolloutPlan = match plan {
                    Some(p) => serde_json::from_str(&p)
                        .map_err(|e| StoreError::Corrupt(format!("plan of rollout {id}: {e}")))?,
                    None => RolloutPlan::default(),
                };
                plans.insert(u(id), (plan.device_timeout_s, wave));
                rollouts.push(Joinable {
                    id: u(id),
                    model_name,
                    model_version: u(model_version),
                    target,
                    requirements,
                });
            }
            if rollouts.is_empty() {
                return Ok(Vec::new());
            }
            let devices: Vec<JoinCandidate> = tx
                .prepare(&format!(
                    "SELECT id, group_name, tags, model_name, model_version,
                            (SELECT MAX(rollout_id) FROM deployments d WHERE d.device_id = devices.id),
                            EXISTS (SELECT 1 FROM deployments d WHERE d.device_id = devices.id
                                    AND d.status NOT IN ({FINAL_STATES_SQL})),
                            arch, board
                     FROM devices"
                ))?
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get(1)?, r.get::<_, Option<String>>(2)?, r.get(3)?,
                        r.get::<_, Option<i64>>(4)?, r.get::<_, Option<i64>>(5)?, r.get::<_, bool>(6)?,
                        r.get::<_, Option<String>>(7)?, r.get::<_, Option<String>>(8)?))
                })?
                .map(|row| {
                    let (id, group, tags, name, version, newest, busy, arch, board) = row?;
                    Ok(JoinCandidate {
                        arch,
                        board,
                        tags: parse_tags(&id, tags)?,
                        model: previous_model(name, version),
                        newest_rollout: newest.map(u),
                        id,
                        group,
                        busy,
                    })
                })
                .collect::<Result<_>>()?;
            let joins = late_joiners(&rollouts, &devices);
            for (rollout, device) in &joins {
                let (timeout_s, wave) = plans[rollout];
                tx.execute(
                    "INSERT INTO deployments (rollout_id, device_id, status, updated_ms, wave, deadline_ms,
                                              previous_model, previous_version)
                     SELECT ?1, ?2, 'pending', ?3, ?4, ?5, model_name, model_version FROM devices WHERE id = ?2",
                    params![*rollout as i64, device, now_ms as i64, wave, (now_ms + timeout_s * 1000) as i64],
                )?;
                refresh_rollout_status(&tx, *rollout)?;
            }
            tx.commit()?;
            Ok(joins)
        })
        .await
    }

    async fn rollouts(&self) -> Result<Vec<RolloutRow>> {
        self.call(|conn| load_rollouts(conn, "")).await
    }

    async fn rollout(&self, id: u64) -> Result<Option<RolloutRow>> {
        self.call(move |conn| load_rollout(conn, id)).await
    }

    async fn rollouts_in_progress(&self) -> Result<Vec<RolloutRow>> {
        self.call(|conn| load_rollouts(conn, "WHERE status = 'in_progress'"))
            .await
    }

    async fn open_wave(
        &self,
        id: u64,
        status: RolloutStatus,
        from: u32,
        now_ms: u64,
        deadline_ms: u64,
    ) -> Result<bool> {
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let opened = tx.execute(
                "UPDATE rollouts SET current_wave = ?2 + 1, wave_opened_ms = ?4
                 WHERE id = ?1 AND current_wave = ?2 AND status = ?3",
                params![id as i64, from, status.as_str(), now_ms as i64],
            )?;
            if opened == 0 {
                return Ok(false);
            }
            tx.execute(
                "UPDATE deployments SET deadline_ms = ?3 WHERE rollout_id = ?1 AND wave = ?2 + 1",
                params![id as i64, from, deadline_ms as i64],
            )?;
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn set_rollout_status(
        &self,
        id: u64,
        from: RolloutStatus,
        to: RolloutStatus,
        reason: Option<&str>,
        deadline_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<bool> {
        let reason = reason.map(str::to_string);
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let changed = tx.execute(
                "UPDATE rollouts SET status = ?3, reason = ?4 WHERE id = ?1 AND status = ?2",
                params![id as i64, from.as_str(), to.as_str(), reason],
            )?;
            if changed == 0 {
                return Ok(false);
            }
            if to == RolloutStatus::Aborted {
                tx.execute(
                    "UPDATE deployments SET status = 'cancelled', detail = ?2, updated_ms = ?3
                     WHERE rollout_id = ?1 AND status = 'pending'",
                    params![id as i64, format!("rollout aborted: {}", reason.as_deref().unwrap_or("no reason given")), now_ms as i64],
                )?;
            }
            if let Some(deadline) = deadline_ms {
                tx.execute(
                    &format!(
                        "UPDATE deployments SET deadline_ms = ?2
                         WHERE rollout_id = ?1 AND wave <= (SELECT current_wave FROM rollouts WHERE id = ?1)
                           AND (status NOT IN ({FINAL_STATES_SQL}) OR status = 'active')"
                    ),
                    params![id as i64, deadline as i64],
                )?;
            }
            if to == RolloutStatus::InProgress {
                refresh_rollout_status(&tx, id)?;
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn expire_deployments(&self, now_ms: u64) -> Result<u64> {
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let mut stmt = tx.prepare_cached(&format!(
                "UPDATE deployments SET status = 'timed_out', updated_ms = ?1,
                     detail = 'no verdict within the device timeout (last: ' || status || ')'
                 WHERE deadline_ms < ?1
                   AND (status NOT IN ({FINAL_STATES_SQL}) OR status = 'active')
                   AND rollout_id IN (SELECT id FROM rollouts WHERE status = 'in_progress')
                 RETURNING rollout_id"
            ))?;
            let touched: Vec<i64> = stmt
                .query_map(params![now_ms as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            drop(stmt);
            let rollouts: std::collections::BTreeSet<i64> = touched.iter().copied().collect();
            for rollout in rollouts {
                refresh_rollout_status(&tx, u(rollout))?;
            }
            tx.commit()?;
            Ok(touched.len() as u64)
        })
        .await
    }

    async fn recent_windows(
        &self,
        name: &str,
        per_device: u32,
        since_ms: u64,
    ) -> Result<Vec<WindowPoint>> {
        let name = name.to_string();
        self.call(move |conn| {
            let rows = conn
                .prepare_cached(RECENT_WINDOWS)?
                .query_map(params![name, since_ms as i64, per_device], |r| {
                    Ok(WindowPoint {
                        device_id: r.get(0)?,
                        model_version: u(r.get(1)?),
                        window_end_ms: u(r.get(2)?),
                        psi_max: r.get(3)?,
                        drift_share: r.get(4)?,
                        labelled: u(r.get(5)?),
                        accuracy: r.get(6)?,
                        latency_p99_ms: r.get(7)?,
                        samples: u(r.get(8)?),
                        errors: u(r.get(9)?),
                        prediction_drift: r.get(10)?,
                        mae: r.get(11)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn start_retraining(
        &self,
        name: &str,
        from_version: u64,
        reason: &str,
        now_ms: u64,
        cooldown_since_ms: u64,
    ) -> Result<Option<RetrainingRow>> {
        let (name, reason) = (name.to_string(), reason.to_string());
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let blocking: i64 = tx.query_row(
                &format!(
                    "SELECT COUNT(*) FROM retrainings WHERE model_name = ?1
                     AND (status IN ({OPEN_RETRAINING_SQL}) OR fired_ms >= ?2)"
                ),
                params![name, cooldown_since_ms as i64],
                |r| r.get(0),
            )?;
            if blocking > 0 {
                return Ok(None);
            }
            tx.execute(
                "INSERT INTO retrainings (model_name, from_version, fired_ms, reason, status, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, 'training', ?3)",
                params![name, from_version as i64, now_ms as i64, reason],
            )?;
            let id = tx.last_insert_rowid();
            let row = load_retrainings(&tx, "WHERE id = ?1", params![id])?.pop();
            tx.commit()?;
            Ok(row)
        })
        .await
    }

    async fn update_retraining(
        &self,
        id: u64,
        update: &RetrainingUpdate,
        now_ms: u64,
    ) -> Result<bool> {
        let update = update.clone();
        self.call(move |conn| {
            let changed = conn.execute(
                &format!(
                    "UPDATE retrainings SET status = ?2, detail = COALESCE(?3, detail),
                         candidate_version = COALESCE(?4, candidate_version), gate = COALESCE(?5, gate),
                         rollout_id = COALESCE(?6, rollout_id), updated_ms = ?7
                     WHERE id = ?1 AND status IN ({OPEN_RETRAINING_SQL})
                       AND (?2 <> 'training' OR status = 'training')"
                ),
                params![
                    id as i64,
                    update.status.as_str(),
                    update.detail,
                    update.candidate_version.map(|v| v as i64),
                    update.gate,
                    update.rollout_id.map(|v| v as i64),
                    now_ms as i64
                ],
            )?;
            Ok(changed > 0)
        })
        .await
    }

    async fn retrainings(&self, limit: u32) -> Result<Vec<RetrainingRow>> {
        self.call(move |conn| load_retrainings(conn, "ORDER BY id DESC LIMIT ?1", params![limit]))
            .await
    }

    async fn create_token(&self, token: &TokenRow, secret_sha256: &str) -> Result<()> {
        let (token, secret) = (token.clone(), secret_sha256.to_string());
        self.call(move |conn| {
            let inserted = conn.execute(
                "INSERT INTO enrollment_tokens (id, secret_sha256, group_name, tags, expires_ms, uses_left,
                                                auto_approve, created_ms, created_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT DO NOTHING",
                params![
                    token.id,
                    secret,
                    token.group,
                    serde_json::to_string(&token.tags).expect("strings serialize"),
                    token.expires_ms as i64,
                    token.uses_left.map(|u| u as i64),
                    token.auto_approve,
                    token.created_ms as i64,
                    token.created_by
                ],
            )?;
            if inserted == 0 {
                // The same id, or the same secret (a key pre-authorized twice).
                return Err(StoreError::Conflict(format!("token {}", token.id)));
            }
            Ok(())
        })
        .await
    }

    async fn tokens(&self) -> Result<Vec<TokenRow>> {
        self.call(|conn| {
            let rows = conn
                .prepare_cached(
                    "SELECT id, group_name, tags, expires_ms, uses_left, auto_approve, created_ms, created_by
                     FROM enrollment_tokens ORDER BY created_ms, id",
                )?
                .query_map([], token_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter().map(with_token_tags).collect()
        })
        .await
    }

    async fn enroll(
        &self,
        secret_sha256: &str,
        request: &EnrollRequest,
        now_ms: u64,
    ) -> Result<EnrollOutcome> {
        let (secret, request) = (secret_sha256.to_string(), request.clone());
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let token = tx
                .query_row(
                    "SELECT id, group_name, tags, expires_ms, uses_left, auto_approve, created_ms, created_by
                     FROM enrollment_tokens WHERE secret_sha256 = ?1",
                    params![secret],
                    token_from_row,
                )
                .optional()?
                .map(with_token_tags)
                .transpose()?;
            let Some(token) = token.filter(|t| t.expires_ms > now_ms) else {
                return Ok(EnrollOutcome::BadToken);
            };
            if let Some(existing) = load_enrollments(&tx, "WHERE device_id = ?1", params![request.device_id])?.pop() {
                return Ok(if existing.public_key == request.public_key {
                    EnrollOutcome::Enrolled(Box::new(existing))
                } else {
                    EnrollOutcome::KeyConflict
                });
            }
            if token.uses_left == Some(0) {
                return Ok(EnrollOutcome::UsedUp);
            }
            tx.execute(
                "UPDATE enrollment_tokens SET uses_left = uses_left - 1 WHERE id = ?1 AND uses_left IS NOT NULL",
                params![token.id],
            )?;
            let row = new_enrollment(&token, &request, now_ms);
            tx.execute(
                "INSERT INTO enrollments (device_id, public_key, token_id, group_name, tags, board, arch,
                                          agent_version, status, created_ms, decided_ms, decided_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    row.device_id,
                    row.public_key,
                    row.token_id,
                    row.group,
                    serde_json::to_string(&row.tags).expect("strings serialize"),
                    row.board,
                    row.arch,
                    row.agent_version,
                    enrollment_status_str(row.status),
                    row.created_ms as i64,
                    row.decided_ms.map(|v| v as i64),
                    row.decided_by
                ],
            )?;
            if row.status == EnrollmentStatus::Approved {
                register_enrolled(&tx, &row)?;
            }
            tx.commit()?;
            Ok(EnrollOutcome::Enrolled(Box::new(row)))
        })
        .await
    }

    async fn approve_enrollment(
        &self,
        device_id: &str,
        by: &str,
        now_ms: u64,
    ) -> Result<Option<EnrollmentRow>> {
        let (device_id, by) = (device_id.to_string(), by.to_string());
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let changed = tx.execute(
                "UPDATE enrollments SET status = 'approved', decided_ms = ?2, decided_by = ?3
                 WHERE device_id = ?1 AND status = 'pending'",
                params![device_id, now_ms as i64, by],
            )?;
            if changed == 0 {
                return Ok(None);
            }
            let row = load_enrollments(&tx, "WHERE device_id = ?1", params![device_id])?.pop();
            if let Some(row) = &row {
                register_enrolled(&tx, row)?;
            }
            tx.commit()?;
            Ok(row)
        })
        .await
    }

    async fn enrollments(&self) -> Result<Vec<EnrollmentRow>> {
        self.call(|conn| load_enrollments(conn, "ORDER BY created_ms, device_id", []))
            .await
    }

    async fn set_broker_password(&self, device_id: &str, password_sha256: &str) -> Result<bool> {
        let (device_id, hash) = (device_id.to_string(), password_sha256.to_string());
        self.call(move |conn| {
            Ok(conn.execute(
                "UPDATE enrollments SET broker_password_sha256 = ?2
                 WHERE device_id = ?1 AND status = 'approved'",
                params![device_id, hash],
            )? > 0)
        })
        .await
    }

    async fn broker_login(&self, device_id: &str, password_sha256: &str) -> Result<bool> {
        let (device_id, hash) = (device_id.to_string(), password_sha256.to_string());
        self.call(move |conn| {
            let stored: Option<Option<String>> = conn
                .prepare_cached(
                    "SELECT broker_password_sha256 FROM enrollments
                     WHERE device_id = ?1 AND status = 'approved'",
                )?
                .query_row(params![device_id], |r| r.get(0))
                .optional()?;
            Ok(stored.flatten().is_some_and(|s| same_secret(&s, &hash)))
        })
        .await
    }

    async fn record_audit(&self, entry: &AuditEntry) -> Result<()> {
        let entry = entry.clone();
        self.call(move |conn| {
            conn.prepare_cached(
                "INSERT INTO audit (at_ms, actor, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                entry.at_ms as i64,
                entry.actor,
                entry.action,
                entry.target,
                entry.detail
            ])?;
            Ok(())
        })
        .await
    }

    async fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>> {
        self.call(move |conn| {
            let rows = conn
                .prepare_cached(
                    "SELECT at_ms, actor, action, target, detail FROM audit ORDER BY id DESC LIMIT ?1",
                )?
                .query_map(params![limit], |r| {
                    Ok(AuditEntry {
                        at_ms: u(r.get(0)?),
                        actor: r.get(1)?,
                        action: r.get(2)?,
                        target: r.get(3)?,
                        detail: r.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn due_deployments(&self, quiet_since_ms: u64) -> Result<Vec<DueDeployment>> {
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT d.rollout_id, d.device_id, r.model_name, r.model_version, m.bundle_sha256, m.bundle_size,
                        r.rollback, {DELTA_COLUMNS}
                 FROM deployments d
                 JOIN rollouts r ON r.id = d.rollout_id
                 JOIN models m ON m.name = r.model_name AND m.version = r.model_version
                 JOIN devices v ON v.id = d.device_id
                 LEFT JOIN model_deltas x ON x.name = r.model_name AND x.version = r.model_version
                      AND v.model_name = r.model_name AND x.base_version = v.model_version
                      AND NOT r.rollback
                 WHERE d.status NOT IN ({FINAL_STATES_SQL})
                   AND r.status = 'in_progress' AND d.wave <= r.current_wave
                   AND v.online = 1
                   AND (d.status = 'pending' OR d.updated_ms < ?1)
                 ORDER BY d.rollout_id, d.device_id"
            ))?;
            let rows = stmt
                .query_map(params![quiet_since_ms as i64], |r| {
                    Ok(DueDeployment {
                        rollout_id: u(r.get(0)?),
                        device_id: r.get(1)?,
                        model_name: r.get(2)?,
                        model_version: u(r.get(3)?),
                        bundle_sha256: r.get(4)?,
                        bundle_size: u(r.get(5)?),
                        rollback: r.get(6)?,
                        delta: match r.get::<_, Option<String>>(7)? {
                            Some(_) => Some(delta_from_row(r, 7)?),
                            None => None,
                        },
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn mark_sent(
        &self,
        rollout_id: u64,
        device_id: &str,
        now_ms: u64,
    ) -> Result<Option<u64>> {
        // Finished or superseded since it was found due: nothing to send.
        self.mark_with_seq(
            format!(
                "UPDATE deployments SET status = CASE status WHEN 'pending' THEN 'sent' ELSE status END,
                     command_seq = ?3, updated_ms = ?4
                 WHERE rollout_id = ?1 AND device_id = ?2
                   AND status NOT IN ({FINAL_STATES_SQL})"
            ),
            rollout_id,
            device_id,
            now_ms,
        )
        .await
    }

    async fn create_dataset(&self, new: &NewDataset) -> Result<DatasetRow> {
        let new = new.clone();
        self.call(move |conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO datasets (model_name, created_ms, created_by, reason, max_rows)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    new.model_name,
                    new.now_ms as i64,
                    new.created_by,
                    new.reason,
                    new.max_rows.map(|m| m as i64)
                ],
            )?;
            let id = tx.last_insert_rowid();
            for device in &new.devices {
                tx.execute(
                    "INSERT INTO dataset_parts (dataset_id, device_id, status, updated_ms)
                     VALUES (?1, ?2, 'requested', ?3)",
                    params![id, device, new.now_ms as i64],
                )?;
            }
            let row = load_datasets(&tx, "WHERE id = ?1", id)?
                .pop()
                .ok_or_else(|| StoreError::NotFound(format!("dataset {id}")))?;
            tx.commit()?;
            Ok(row)
        })
        .await
    }

    async fn datasets(&self, limit: u32) -> Result<Vec<DatasetRow>> {
        self.call(move |conn| load_datasets(conn, "ORDER BY id DESC LIMIT ?1", i64::from(limit)))
            .await
    }

    async fn dataset(&self, id: u64) -> Result<Option<DatasetRow>> {
        self.call(move |conn| Ok(load_datasets(conn, "WHERE id = ?1", id as i64)?.pop()))
            .await
    }

    async fn dataset_files(&self, id: u64) -> Result<Vec<(String, Vec<u8>)>> {
        self.call(move |conn| {
            let files = conn
                .prepare(
                    "SELECT device_id, content FROM dataset_parts
                     WHERE dataset_id = ?1 AND status = 'complete' ORDER BY device_id",
                )?
                .query_map(params![id as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(files)
        })
        .await
    }

    async fn due_uploads(&self, quiet_since_ms: u64) -> Result<Vec<DueUpload>> {
        self.call(move |conn| {
            let due = conn
                .prepare_cached(
                    "SELECT p.dataset_id, p.device_id, d.max_rows
                     FROM dataset_parts p
                     JOIN datasets d ON d.id = p.dataset_id
                     JOIN devices v ON v.id = p.device_id
                     WHERE p.status = 'requested' AND v.online = 1
                       AND (p.sent_ms IS NULL OR p.sent_ms < ?1)
                     ORDER BY p.dataset_id, p.device_id",
                )?
                .query_map(params![quiet_since_ms as i64], |r| {
                    Ok(DueUpload {
                        dataset_id: u(r.get(0)?),
                        device_id: r.get(1)?,
                        max_rows: r.get::<_, Option<i64>>(2)?.map(u),
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(due)
        })
        .await
    }

    async fn mark_upload_sent(
        &self,
        dataset_id: u64,
        device_id: &str,
        now_ms: u64,
    ) -> Result<Option<u64>> {
        self.mark_with_seq(
            "UPDATE dataset_parts SET command_seq = ?3, sent_ms = ?4
             WHERE dataset_id = ?1 AND device_id = ?2 AND status = 'requested'"
                .into(),
            dataset_id,
            device_id,
            now_ms,
        )
        .await
    }

    async fn expire_uploads(&self, before_ms: u64, now_ms: u64) -> Result<u64> {
        self.call(move |conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "DELETE FROM dataset_chunks WHERE EXISTS (
                     SELECT 1 FROM dataset_parts p
                     WHERE p.dataset_id = dataset_chunks.dataset_id
                       AND p.device_id = dataset_chunks.device_id
                       AND p.status IN ('requested', 'receiving') AND p.updated_ms < ?1)",
                params![before_ms as i64],
            )?;
            let expired = tx.execute(
                "UPDATE dataset_parts SET status = 'failed', detail = ?2, updated_ms = ?3
                 WHERE status IN ('requested', 'receiving') AND updated_ms < ?1",
                params![before_ms as i64, UPLOAD_EXPIRED, now_ms as i64],
            )?;
            tx.commit()?;
            Ok(expired as u64)
        })
        .await
    }
}
