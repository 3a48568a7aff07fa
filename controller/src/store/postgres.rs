//! The PostgreSQL store, for fleets that outgrow one machine: several controller replicas
//! can share it. Same schema and semantics as the SQLite store; the same suite tests both.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use edgeloop_shared::protocol::{
    DeploymentStatus, DeviceStatus, DriftSummary, DropCounts, Envelope, Message, SampleChunk,
    join_sample_chunks,
};
use tokio_postgres::{GenericClient, NoTls, Row};

use super::*;

const SCHEMA_VERSION: i32 = 11;
/// Serializes migrations of replicas that start at the same time.
const MIGRATION_LOCK: i64 = 0x6564_6765_6c6f_6f70; // "edgeloop"
const POOL_SIZE: usize = 16;

const SCHEMA_V1: &str = "
CREATE TABLE seen_messages (
    msg_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    received_ms BIGINT NOT NULL
);
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    online BOOLEAN NOT NULL DEFAULT FALSE,
    agent_version TEXT,
    model_name TEXT,
    model_version BIGINT,
    last_seen_ms BIGINT NOT NULL,
    inferences BIGINT NOT NULL DEFAULT 0,
    errors BIGINT NOT NULL DEFAULT 0,
    malformed_messages BIGINT NOT NULL DEFAULT 0,
    last_psi_max DOUBLE PRECISION,
    last_command_seq BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE telemetry (
    msg_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    received_ms BIGINT NOT NULL,
    model_name TEXT NOT NULL,
    model_version BIGINT NOT NULL,
    window_seq BIGINT NOT NULL,
    window_start_ms BIGINT NOT NULL,
    window_end_ms BIGINT NOT NULL,
    samples BIGINT NOT NULL,
    psi_max DOUBLE PRECISION NOT NULL,
    summary TEXT NOT NULL
);
CREATE INDEX telemetry_by_device ON telemetry (device_id, received_ms);
CREATE TABLE models (
    name TEXT NOT NULL,
    version BIGINT NOT NULL,
    label TEXT,
    created_ms BIGINT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    bundle_size BIGINT NOT NULL,
    features TEXT NOT NULL,
    signed_by TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE rollouts (
    id BIGSERIAL PRIMARY KEY,
    model_name TEXT NOT NULL,
    model_version BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    status TEXT NOT NULL
);
CREATE TABLE deployments (
    rollout_id BIGINT NOT NULL REFERENCES rollouts (id),
    device_id TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT,
    command_seq BIGINT,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE TABLE deployment_events (
    id BIGSERIAL PRIMARY KEY,
    device_id TEXT NOT NULL,
    received_ms BIGINT NOT NULL,
    rollout_id BIGINT,
    command_seq BIGINT NOT NULL,
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
    model_version BIGINT NOT NULL,
    hour_ms BIGINT NOT NULL,
    windows BIGINT NOT NULL,
    samples BIGINT NOT NULL,
    psi_max DOUBLE PRECISION NOT NULL,
    psi_sum DOUBLE PRECISION NOT NULL,
    stats TEXT NOT NULL,
    PRIMARY KEY (device_id, model_name, model_version, hour_ms)
);
CREATE INDEX telemetry_hourly_by_time ON telemetry_hourly (hour_ms);
CREATE INDEX telemetry_by_time ON telemetry (received_ms);
CREATE INDEX seen_messages_by_time ON seen_messages (received_ms);
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_ms BIGINT NOT NULL
);
ALTER TABLE devices ADD COLUMN outbox_entries BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN outbox_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN outbox_budget_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN dropped_control BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN dropped_telemetry BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN dropped_samples BIGINT NOT NULL DEFAULT 0;
";

/// Version 3: rollbacks (a rollout devices accept below their active version); the trust
/// document being relayed.
const SCHEMA_V3: &str = "
ALTER TABLE rollouts ADD COLUMN rollback BOOLEAN NOT NULL DEFAULT FALSE;
CREATE TABLE trust (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL,
    state TEXT NOT NULL,
    signed TEXT NOT NULL
);
";

/// Version 4: rollout plans (waves, thresholds, timeouts), pause and abort, the audit log.
const SCHEMA_V4: &str = "
ALTER TABLE rollouts ADD COLUMN plan TEXT;
ALTER TABLE models ADD COLUMN lineage TEXT;
ALTER TABLE rollouts ADD COLUMN current_wave BIGINT NOT NULL DEFAULT 0;
ALTER TABLE rollouts ADD COLUMN wave_opened_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE rollouts ADD COLUMN reason TEXT;
ALTER TABLE rollouts ADD COLUMN failure_gated BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE deployments ADD COLUMN wave BIGINT NOT NULL DEFAULT 0;
ALTER TABLE deployments ADD COLUMN deadline_ms BIGINT;
ALTER TABLE deployments ADD COLUMN previous_model TEXT;
ALTER TABLE deployments ADD COLUMN previous_version BIGINT;
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
    expires_ms BIGINT NOT NULL,
    uses_left BIGINT,
    auto_approve BOOLEAN NOT NULL,
    created_ms BIGINT NOT NULL,
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
    created_ms BIGINT NOT NULL,
    decided_ms BIGINT,
    decided_by TEXT
);
CREATE TABLE retrainings (
    id BIGSERIAL PRIMARY KEY,
    model_name TEXT NOT NULL,
    from_version BIGINT NOT NULL,
    fired_ms BIGINT NOT NULL,
    reason TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT,
    candidate_version BIGINT,
    gate TEXT,
    rollout_id BIGINT,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX retrainings_by_model ON retrainings (model_name, fired_ms);
CREATE INDEX telemetry_by_model ON telemetry (model_name, received_ms);
CREATE TABLE audit (
    id BIGSERIAL PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT
);
";

/// Version 7: delta bundles of published models.
const SCHEMA_V7: &str = "
CREATE TABLE model_deltas (
    name TEXT NOT NULL,
    version BIGINT NOT NULL,
    base_version BIGINT NOT NULL,
    base_sha256 TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    bundle_size BIGINT NOT NULL,
    PRIMARY KEY (name, version, base_version),
    FOREIGN KEY (name, version) REFERENCES models (name, version)
);
";

/// Version 8: what a device must satisfy to run a model (architectures, boards…), so that
/// rollouts leave out the devices it is not for.
const SCHEMA_V8: &str = "ALTER TABLE models ADD COLUMN requirements TEXT;";

/// Version 9: each window's mean absolute error on true values (regressions), for the
/// retraining trigger and the rollout gate.
const SCHEMA_V9: &str = "ALTER TABLE telemetry ADD COLUMN mae DOUBLE PRECISION;";

/// Version 10: no index of the telemetry by model (as SQLite's version 10): a model's
/// recent windows are found by the index by time, and each summary's insert is one B-tree
/// lighter.
const SCHEMA_V10: &str = "DROP INDEX IF EXISTS telemetry_by_model;";

/// Version 11: an hourly aggregate's merged statistics as MessagePack (`stats_msgpack`),
/// read and written again at every fold several times faster than JSON; `stats` keeps the
/// JSON of rows written before, which are still read, and is NULL once a row is folded
/// again.
const SCHEMA_V11: &str = "
ALTER TABLE telemetry_hourly ALTER COLUMN stats DROP NOT NULL;
ALTER TABLE telemetry_hourly ADD COLUMN stats_msgpack BYTEA;
";

/// Version 5: each window's dataset-drift share, labelled predictions and accuracy, for
/// the retraining triggers; the target of a rollout to a group or tags.
const SCHEMA_V5: &str = "
ALTER TABLE telemetry ADD COLUMN drift_share DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE telemetry ADD COLUMN labelled BIGINT NOT NULL DEFAULT 0;
ALTER TABLE telemetry ADD COLUMN accuracy DOUBLE PRECISION;
ALTER TABLE rollouts ADD COLUMN target TEXT;
ALTER TABLE devices ADD COLUMN trust_version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE telemetry ADD COLUMN errors BIGINT NOT NULL DEFAULT 0;
ALTER TABLE telemetry ADD COLUMN latency_p99_ms DOUBLE PRECISION;
";

/// Version 6: datasets of device input samples, their per-device parts and the chunks of
/// uploads under way.
const SCHEMA_V6: &str = "
CREATE TABLE datasets (
    id BIGSERIAL PRIMARY KEY,
    model_name TEXT,
    created_ms BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    reason TEXT,
    max_rows BIGINT
);
CREATE TABLE dataset_parts (
    dataset_id BIGINT NOT NULL REFERENCES datasets (id),
    device_id TEXT NOT NULL,
    status TEXT NOT NULL,
    command_seq BIGINT,
    sent_ms BIGINT,
    upload_seq BIGINT,
    model_name TEXT,
    model_version BIGINT,
    rows BIGINT,
    bytes BIGINT,
    sha256 TEXT,
    chunks BIGINT,
    detail TEXT,
    updated_ms BIGINT NOT NULL,
    content BYTEA,
    PRIMARY KEY (dataset_id, device_id)
);
CREATE INDEX dataset_parts_by_status ON dataset_parts (status);
ALTER TABLE enrollments ADD COLUMN broker_password_sha256 TEXT;
ALTER TABLE telemetry ADD COLUMN prediction_drift BOOLEAN NOT NULL DEFAULT FALSE;
CREATE TABLE dataset_chunks (
    dataset_id BIGINT NOT NULL,
    device_id TEXT NOT NULL,
    idx BIGINT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (dataset_id, device_id, idx)
);
";

/// A PostgreSQL database reached through a connection pool.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db`, libpq options such as
    /// `?options=-csearch_path%3Dfleet` allowed) and migrates the schema.
    pub async fn connect(url: &str) -> Result<Self> {
        let config: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
            StoreError::Postgres(format!("database URL: {e}"))
        })?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .build()
            .map_err(|e| StoreError::Postgres(e.to_string()))?;
        let store = PgStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Postgres(format!("cannot get a connection: {e}")))
    }

    async fn migrate(&self) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS edgeloop_schema (version INTEGER NOT NULL)")
            .await?;
        let version: Option<i32> = tx
            .query_opt("SELECT version FROM edgeloop_schema", &[])
            .await?
            .map(|r| r.get(0));
        match version {
            None => {
                tx.batch_execute(SCHEMA_V1).await?;
                tx.batch_execute(SCHEMA_V2).await?;
                tx.batch_execute(SCHEMA_V3).await?;
                tx.batch_execute(SCHEMA_V4).await?;
                tx.batch_execute(SCHEMA_V5).await?;
                tx.batch_execute(SCHEMA_V6).await?;
                tx.batch_execute(SCHEMA_V7).await?;
                tx.batch_execute(SCHEMA_V8).await?;
                tx.batch_execute(SCHEMA_V9).await?;
                tx.batch_execute(SCHEMA_V10).await?;
                tx.batch_execute(SCHEMA_V11).await?;
                tx.execute(
                    "INSERT INTO edgeloop_schema (version) VALUES ($1)",
                    &[&SCHEMA_VERSION],
                )
                .await?;
            }
            Some(old @ 1..SCHEMA_VERSION) => {
                if old < 2 {
                    tx.batch_execute(SCHEMA_V2).await?;
                }
                if old < 3 {
                    tx.batch_execute(SCHEMA_V3).await?;
                }
                if old < 4 {
                    tx.batch_execute(SCHEMA_V4).await?;
                }
                if old < 5 {
                    tx.batch_execute(SCHEMA_V5).await?;
                }
                if old < 6 {
                    tx.batch_execute(SCHEMA_V6).await?;
                }
                if old < 7 {
                    tx.batch_execute(SCHEMA_V7).await?;
                }
                if old < 8 {
                    tx.batch_execute(SCHEMA_V8).await?;
                }
                if old < 9 {
                    tx.batch_execute(SCHEMA_V9).await?;
                }
                if old < 10 {
                    tx.batch_execute(SCHEMA_V10).await?;
                }
                tx.batch_execute(SCHEMA_V11).await?;
                tx.execute(
                    "UPDATE edgeloop_schema SET version = $1",
                    &[&SCHEMA_VERSION],
                )
                .await?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(newer) => {
                return Err(StoreError::Corrupt(format!(
                    "database has schema version {newer}, newer than this build's {SCHEMA_VERSION}"
                )));
            }
        }
        tx.commit().await?;
        Ok(())
    }
}

impl PgStore {
    /// Takes the device's next command sequence number (its row locked) and runs `update`
    /// (parameters: the row's id, the device, the sequence number, now) to record it on the
    /// row being sent; nothing is kept, and `None` returned, when the update touches no row.
    async fn mark_with_seq(
        &self,
        update: &str,
        id: u64,
        device_id: &str,
        now_ms: u64,
    ) -> Result<Option<u64>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let seq = take_command_seq(&*tx, device_id, now_ms).await?;
        let updated = tx
            .execute(update, &[&i(id), &device_id, &i(seq), &i(now_ms)])
            .await?;
        if updated == 0 {
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(seq))
    }
}

impl From<tokio_postgres::Error> for StoreError {
    /// The database's own message and SQLSTATE when it answered with an error (the
    /// driver's text is only "db error" then).
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Postgres(match e.as_db_error() {
            Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
            None => e.to_string(),
        })
    }
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    v.max(0) as u64
}

async fn touch_device(tx: &impl GenericClient, device_id: &str, now_ms: u64) -> Result<()> {
    tx.execute(
        "INSERT INTO devices (id, last_seen_ms) VALUES ($1, $2)
         ON CONFLICT (id) DO UPDATE SET last_seen_ms = GREATEST(devices.last_seen_ms, EXCLUDED.last_seen_ms)",
        &[&device_id, &i(now_ms)],
    )
    .await?;
    Ok(())
}

async fn apply_status(tx: &impl GenericClient, device_id: &str, s: &DeviceStatus) -> Result<()> {
    if s.online {
        let name = s.model.as_ref().map(|m| m.name.as_str());
        let version = s.model.as_ref().map(|m| i(m.version));
        tx.execute(
            "UPDATE devices SET online = TRUE, agent_version = $2,
                 last_psi_max = CASE WHEN model_name IS NOT DISTINCT FROM $3
                                      AND model_version IS NOT DISTINCT FROM $4
                                     THEN last_psi_max END,
                 model_name = $3, model_version = $4,
                 inferences = $5, errors = $6, malformed_messages = $7,
                 outbox_entries = $8, outbox_bytes = $9, outbox_budget_bytes = $10,
                 dropped_control = $11, dropped_telemetry = $12, dropped_samples = $13,
                 trust_version = $14
             WHERE id = $1",
            &[
                &device_id,
                &s.agent_version,
                &name,
                &version,
                &i(s.inferences),
                &i(s.errors),
                &i(s.malformed_messages),
                &i(s.outbox.entries),
                &i(s.outbox.bytes),
                &i(s.outbox.budget_bytes),
                &i(s.outbox.dropped.control),
                &i(s.outbox.dropped.telemetry),
                &i(s.outbox.dropped.samples),
                &i(s.trust_version),
            ],
        )
        .await?;
    } else {
        tx.execute(
            "UPDATE devices SET online = FALSE WHERE id = $1",
            &[&device_id],
        )
        .await?;
    }
    Ok(())
}

/// Stores a drift summary's row unless its message id has one already: whether it was
/// stored (false: a duplicate).
async fn apply_drift(
    tx: &impl GenericClient,
    e: &Envelope,
    s: &DriftSummary,
    now_ms: u64,
) -> Result<bool> {
    let summary = summary_json(e, s);
    let summary: &str = &summary;
    tx.execute(
        "INSERT INTO telemetry (msg_id, device_id, received_ms, model_name, model_version, window_seq,
             window_start_ms, window_end_ms, samples, psi_max, summary, drift_share, labelled, accuracy, latency_p99_ms, errors,
             prediction_drift, mae)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
         ON CONFLICT (msg_id) DO NOTHING",
        &[
            &e.msg_id,
            &e.device_id,
            &i(now_ms),
            &s.model.name,
            &i(s.model.version),
            &i(s.window_seq),
            &i(s.stats.start_ms),
            &i(s.stats.end_ms),
            &i(s.stats.samples),
            &s.stats.psi_max,
            &summary,
            &s.stats.drift_share,
            &i(s.stats.labelled()),
            &s.stats.accuracy,
            &s.stats.latency_quantile_ms(0.99),
            &i(s.stats.errors),
            &s.stats.prediction_drift,
            &s.stats.mae,
        ],
    )
    .await
    .map(|stored| stored > 0)
    .map_err(Into::into)
}

/// Sets devices' current drift figure from a transaction's summaries. Only a summary of
/// the model a device now serves is its current figure; a late summary of the previous
/// model is kept in `telemetry` but does not overwrite it.
async fn apply_psi(tx: &impl GenericClient, summaries: &[(&str, &DriftSummary)]) -> Result<()> {
    for ((device, model, version), psi) in latest_psi(summaries) {
        tx.execute(
            "UPDATE devices SET last_psi_max = $2
             WHERE id = $1 AND (model_name IS NULL OR (model_name = $3 AND model_version = $4))",
            &[&device, &psi, &model, &i(version)],
        )
        .await?;
    }
    Ok(())
}

/// Folds a transaction's summaries of one hour into its aggregate: one read, one write,
/// under a lock on the hour so that replicas folding into it wait for each other.
async fn fold_hourly(
    tx: &impl GenericClient,
    key: &HourKey,
    summaries: &[&DriftSummary],
) -> Result<()> {
    let (device, model, version, hour) = key;
    let (version, hour) = (i(*version), i(*hour));
    // A row lock cannot cover an hour that has no row yet: two replicas would both start
    // it and one would overwrite the other. A transaction lock on the key covers both.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&format!("hourly/{device}/{model}/{version}/{hour}")],
    )
    .await?;
    let existing = tx
        .query_opt(
            "SELECT windows, samples, psi_max, psi_sum, stats, stats_msgpack FROM telemetry_hourly
             WHERE device_id = $1 AND model_name = $2 AND model_version = $3 AND hour_ms = $4",
            &[device, model, &version, &hour],
        )
        .await?
        .and_then(|r| {
            let stats = stored_stats(&r, 4);
            Hourly::from_row(u(r.get(0)), u(r.get(1)), r.get(2), r.get(3), stats)
        });
    let Some(h) = Hourly::fold(existing, summaries) else {
        return Ok(());
    };
    tx.execute(
        "INSERT INTO telemetry_hourly (device_id, model_name, model_version, hour_ms,
             windows, samples, psi_max, psi_sum, stats_msgpack)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (device_id, model_name, model_version, hour_ms) DO UPDATE SET
             windows = EXCLUDED.windows, samples = EXCLUDED.samples,
             psi_max = EXCLUDED.psi_max, psi_sum = EXCLUDED.psi_sum, stats = NULL,
             stats_msgpack = EXCLUDED.stats_msgpack",
        &[
            device,
            model,
            &version,
            &hour,
            &i(h.windows),
            &i(h.samples),
            &h.psi_max,
            &h.psi_sum,
            &h.stats_msgpack(),
        ],
    )
    .await?;
    Ok(())
}

/// An hourly aggregate's statistics: the MessagePack column at `at + 1`, or else the JSON
/// at `at` of a row written before schema version 11.
fn stored_stats(r: &Row, at: usize) -> StoredStats<'_> {
    match r.get::<_, Option<&[u8]>>(at + 1) {
        Some(bytes) => StoredStats::Msgpack(bytes),
        None => StoredStats::Json(r.get::<_, Option<&str>>(at).unwrap_or_default()),
    }
}

async fn apply_deployment(
    tx: &impl GenericClient,
    device_id: &str,
    d: &DeploymentStatus,
    now_ms: u64,
) -> Result<()> {
    let rollout = d.rollout_id.map(i);
    let model = d.model.as_ref().map(ToString::to_string);
    tx.execute(
        "INSERT INTO deployment_events (device_id, received_ms, rollout_id, command_seq, stage, model, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[&device_id, &i(now_ms), &rollout, &i(d.command_seq), &d.stage.as_str(), &model, &d.detail],
    )
    .await?;
    let Some(rollout_id) = d.rollout_id else {
        return Ok(());
    };
    tx.execute(
        &format!(
            "UPDATE deployments SET status = $3, detail = $4, updated_ms = $5
             WHERE rollout_id = $1 AND device_id = $2
               AND (status NOT IN ({FINAL_STATES_SQL})
                    OR (status IN ({AWAITING_VERDICT_SQL}) AND $3 IN ({HEALTH_VERDICTS_SQL})))"
        ),
        &[
            &i(rollout_id),
            &device_id,
            &d.stage.as_str(),
            &d.detail,
            &i(now_ms),
        ],
    )
    .await?;
    refresh_rollout_status(tx, rollout_id).await
}

async fn fail_part(
    tx: &impl GenericClient,
    device_id: &str,
    c: &SampleChunk,
    detail: &str,
    now_ms: u64,
) -> Result<()> {
    let dataset = i(c.dataset_id);
    tx.execute(
        "UPDATE dataset_parts SET status = 'failed', upload_seq = $3, detail = $4, updated_ms = $5
         WHERE dataset_id = $1 AND device_id = $2",
        &[&dataset, &device_id, &i(c.command_seq), &detail, &i(now_ms)],
    )
    .await?;
    tx.execute(
        "DELETE FROM dataset_chunks WHERE dataset_id = $1 AND device_id = $2",
        &[&dataset, &device_id],
    )
    .await?;
    Ok(())
}

/// The part's row is locked first, so that two replicas storing the last two chunks of one
/// upload cannot each miss the other's.
async fn apply_chunk(
    tx: &impl GenericClient,
    device_id: &str,
    c: &SampleChunk,
    now_ms: u64,
) -> Result<()> {
    let dataset = i(c.dataset_id);
    let part = match tx
        .query_opt(
            "SELECT status, upload_seq, sha256 FROM dataset_parts
             WHERE dataset_id = $1 AND device_id = $2 FOR UPDATE",
            &[&dataset, &device_id],
        )
        .await?
    {
        None => None,
        Some(r) => Some(PartState {
            status: PartStatus::parse(r.get(0))?,
            upload_seq: r.get::<_, Option<i64>>(1).map(u),
            sha256: r.get(2),
        }),
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
        ChunkStep::Fail(detail) => return fail_part(tx, device_id, c, &detail, now_ms).await,
        ChunkStep::Begin => {
            tx.execute(
                "DELETE FROM dataset_chunks WHERE dataset_id = $1 AND device_id = $2",
                &[&dataset, &device_id],
            )
            .await?;
            tx.execute(
                "UPDATE dataset_parts SET status = 'receiving', upload_seq = $3, model_name = $4,
                     model_version = $5, rows = $6, bytes = $7, sha256 = $8, chunks = $9,
                     detail = NULL, updated_ms = $10
                 WHERE dataset_id = $1 AND device_id = $2",
                &[
                    &dataset,
                    &device_id,
                    &i(c.command_seq),
                    &c.model.as_ref().map(|m| m.name.as_str()),
                    &c.model.as_ref().map(|m| i(m.version)),
                    &i(c.rows),
                    &i(c.total_bytes),
                    &c.sha256,
                    &i64::from(c.count),
                    &i(now_ms),
                ],
            )
            .await?;
        }
        ChunkStep::Add => {}
    }
    let bytes = match c.bytes() {
        Ok(b) => b,
        Err(e) => return fail_part(tx, device_id, c, &e, now_ms).await,
    };
    tx.execute(
        "INSERT INTO dataset_chunks (dataset_id, device_id, idx, data) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING",
        &[&dataset, &device_id, &i64::from(c.index), &bytes],
    )
    .await?;
    tx.execute(
        "UPDATE dataset_parts SET updated_ms = $3 WHERE dataset_id = $1 AND device_id = $2",
        &[&dataset, &device_id, &i(now_ms)],
    )
    .await?;
    let have: i64 = tx
        .query_one(
            "SELECT COUNT(*) FROM dataset_chunks WHERE dataset_id = $1 AND device_id = $2",
            &[&dataset, &device_id],
        )
        .await?
        .get(0);
    if have < i64::from(c.count) {
        return Ok(());
    }
    let pieces: Vec<Vec<u8>> = tx
        .query(
            "SELECT data FROM dataset_chunks WHERE dataset_id = $1 AND device_id = $2 ORDER BY idx",
            &[&dataset, &device_id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    match join_sample_chunks(&pieces, c.total_bytes, &c.sha256) {
        Ok(file) => {
            tx.execute(
                "UPDATE dataset_parts SET status = 'complete', content = $3, updated_ms = $4
                 WHERE dataset_id = $1 AND device_id = $2",
                &[&dataset, &device_id, &file, &i(now_ms)],
            )
            .await?;
            tx.execute(
                "DELETE FROM dataset_chunks WHERE dataset_id = $1 AND device_id = $2",
                &[&dataset, &device_id],
            )
            .await?;
            Ok(())
        }
        Err(e) => fail_part(tx, device_id, c, &e, now_ms).await,
    }
}

/// The next command sequence number of a device, taken (its row locked). It never goes
/// below the clock, so a controller whose database was lost still issues numbers above any
/// the device accepted before.
async fn take_command_seq(tx: &impl GenericClient, device_id: &str, now_ms: u64) -> Result<u64> {
    let last: i64 = tx
        .query_opt(
            "SELECT last_command_seq FROM devices WHERE id = $1 FOR UPDATE",
            &[&device_id],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("device {device_id}")))?
        .get(0);
    let seq = (u(last) + 1).max(now_ms);
    tx.execute(
        "UPDATE devices SET last_command_seq = $2 WHERE id = $1",
        &[&device_id, &i(seq)],
    )
    .await?;
    Ok(seq)
}

async fn load_datasets(
    c: &impl GenericClient,
    filter: &str,
    param: i64,
) -> Result<Vec<DatasetRow>> {
    let mut rows: Vec<DatasetRow> = c
        .query(
            &format!(
                "SELECT id, model_name, created_ms, created_by, reason, max_rows FROM datasets {filter}"
            ),
            &[&param],
        )
        .await?
        .iter()
        .map(|r| DatasetRow {
            id: u(r.get(0)),
            model_name: r.get(1),
            created_ms: u(r.get(2)),
            created_by: r.get(3),
            reason: r.get(4),
            max_rows: r.get::<_, Option<i64>>(5).map(u),
            parts: Vec::new(),
        })
        .collect();
    for row in &mut rows {
        row.parts = c
            .query(
                "SELECT p.device_id, p.status, p.model_name, p.model_version, p.rows, p.bytes,
                        p.sha256, p.chunks, p.detail, p.updated_ms,
                        (SELECT COUNT(*) FROM dataset_chunks c
                         WHERE c.dataset_id = p.dataset_id AND c.device_id = p.device_id)
                 FROM dataset_parts p WHERE p.dataset_id = $1 ORDER BY p.device_id",
                &[&i(row.id)],
            )
            .await?
            .iter()
            .map(|r| {
                let status = PartStatus::parse(r.get(1))?;
                let chunks = r.get::<_, Option<i64>>(7).map(|n| u(n) as u32);
                Ok(DatasetPart {
                    device_id: r.get(0),
                    status,
                    model: previous_model(r.get(2), r.get(3)),
                    rows: r.get::<_, Option<i64>>(4).map(u),
                    bytes: r.get::<_, Option<i64>>(5).map(u),
                    sha256: r.get(6),
                    chunks,
                    detail: r.get(8),
                    updated_ms: u(r.get(9)),
                    chunks_received: if status == PartStatus::Complete {
                        chunks.unwrap_or(0)
                    } else {
                        u(r.get(10)) as u32
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
    }
    Ok(rows)
}

async fn refresh_rollout_status(tx: &impl GenericClient, rollout_id: u64) -> Result<()> {
    let row = tx
        .query_one(
            &format!(
                "SELECT COUNT(*),
                        COALESCE(SUM(CASE WHEN status IN ({RUNNING_STATES_SQL}) THEN 1 ELSE 0 END), 0),
                        COALESCE(SUM(CASE WHEN status IN ({FINAL_STATES_SQL}) THEN 1 ELSE 0 END), 0),
                        COALESCE((SELECT failure_gated FROM rollouts WHERE id = $1), FALSE)
                 FROM deployments WHERE rollout_id = $1"
            ),
            &[&i(rollout_id)],
        )
        .await?;
    let (total, active, finished, gated): (i64, i64, i64, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let status = RolloutStatus::from_counts(u(total), u(active), u(finished), gated);
    tx.execute(
        &format!(
            "UPDATE rollouts SET status = $2 WHERE id = $1 AND status IN ({SELF_FINISHING_SQL})"
        ),
        &[&i(rollout_id), &status.as_str()],
    )
    .await?;
    Ok(())
}

const DELTA_COLUMNS_BARE: &str =
    "name, version, base_version, base_sha256, bundle_sha256, bundle_size";
const DELTA_COLUMNS: &str =
    "x.name, x.version, x.base_version, x.base_sha256, x.bundle_sha256, x.bundle_size";

/// A delta bundle from the [`DELTA_COLUMNS`] starting at column `at`.
fn delta_from_row(r: &tokio_postgres::Row, at: usize) -> ModelDelta {
    ModelDelta {
        name: r.get(at),
        version: u(r.get(at + 1)),
        base_version: u(r.get(at + 2)),
        base_sha256: r.get(at + 3),
        bundle_sha256: r.get(at + 4),
        bundle_size: u(r.get(at + 5)),
    }
}

const MODEL_COLUMNS: &str = "name, version, label, created_ms, bundle_sha256, bundle_size, \
     features, signed_by, lineage, requirements";

fn model_from_row(r: &Row) -> Result<ModelRow> {
    let name: String = r.get(0);
    let version = u(r.get(1));
    let features: String = r.get(6);
    Ok(ModelRow {
        features: serde_json::from_str(&features)
            .map_err(|e| StoreError::Corrupt(format!("features of {name} v{version}: {e}")))?,
        lineage: parse_lineage(&name, version, r.get(8))?,
        requirements: parse_requirements(&name, version, r.get(9))?,
        name,
        version,
        label: r.get(2),
        created_ms: u(r.get(3)),
        bundle_sha256: r.get(4),
        bundle_size: u(r.get(5)),
        signed_by: r.get(7),
    })
}

const TOKEN_COLUMNS: &str =
    "id, group_name, tags, expires_ms, uses_left, auto_approve, created_ms, created_by";

fn token_from_row(r: &Row) -> Result<TokenRow> {
    let id: String = r.get(0);
    Ok(TokenRow {
        tags: parse_tags(&id, Some(r.get(2)))?,
        id,
        group: r.get(1),
        expires_ms: u(r.get(3)),
        uses_left: r.get::<_, Option<i64>>(4).map(u),
        auto_approve: r.get(5),
        created_ms: u(r.get(6)),
        created_by: r.get(7),
    })
}

async fn load_enrollments(
    c: &impl GenericClient,
    filter: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<EnrollmentRow>> {
    c.query(
        &format!(
            "SELECT device_id, public_key, token_id, group_name, tags, board, arch, agent_version,
                    status, created_ms, decided_ms, decided_by
             FROM enrollments {filter}"
        ),
        params,
    )
    .await?
    .iter()
    .map(|r| {
        let device_id: String = r.get(0);
        Ok(EnrollmentRow {
            tags: parse_tags(&device_id, Some(r.get(4)))?,
            status: parse_enrollment_status(r.get(8))?,
            device_id,
            public_key: r.get(1),
            token_id: r.get(2),
            group: r.get(3),
            board: r.get(5),
            arch: r.get(6),
            agent_version: r.get(7),
            created_ms: u(r.get(9)),
            decided_ms: r.get::<_, Option<i64>>(10).map(u),
            decided_by: r.get(11),
        })
    })
    .collect()
}

/// Puts an approved enrollment's device in the registry with its group, tags and board.
async fn register_enrolled(c: &impl GenericClient, row: &EnrollmentRow) -> Result<()> {
    c.execute(
        "INSERT INTO devices (id, last_seen_ms, group_name, tags, board, arch, agent_version)
         VALUES ($1, 0, $2, $3, $4, $5, $6)
         ON CONFLICT (id) DO UPDATE SET group_name = excluded.group_name, tags = excluded.tags,
             board = excluded.board, arch = excluded.arch",
        &[
            &row.device_id,
            &row.group,
            &serde_json::to_string(&row.tags).expect("strings serialize"),
            &row.board,
            &row.arch,
            &row.agent_version,
        ],
    )
    .await?;
    Ok(())
}

/// The advisory lock class that serializes retraining starts per model.
const RETRAINING_LOCK: i32 = 0x6564_6c72;

async fn load_retrainings(
    c: &impl GenericClient,
    filter: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<RetrainingRow>> {
    c.query(
        &format!(
            "SELECT id, model_name, from_version, fired_ms, reason, status, detail, candidate_version,
                    gate, rollout_id, updated_ms
             FROM retrainings {filter}"
        ),
        params,
    )
    .await?
    .iter()
    .map(|r| {
        Ok(RetrainingRow {
            id: u(r.get(0)),
            model_name: r.get(1),
            from_version: u(r.get(2)),
            fired_ms: u(r.get(3)),
            reason: r.get(4),
            status: RetrainingStatus::parse(r.get(5))?,
            detail: r.get(6),
            candidate_version: r.get::<_, Option<i64>>(7).map(u),
            gate: r.get(8),
            rollout_id: r.get::<_, Option<i64>>(9).map(u),
            updated_ms: u(r.get(10)),
        })
    })
    .collect()
}

/// The rollouts a `WHERE` clause (or none) selects, oldest first.
async fn load_rollouts(c: &impl GenericClient, filter: &str) -> Result<Vec<RolloutRow>> {
    let ids = c
        .query(
            &format!("SELECT id FROM rollouts {filter} ORDER BY id"),
            &[],
        )
        .await?;
    let mut rollouts = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(r) = load_rollout(c, u(id.get(0))).await? {
            rollouts.push(r);
        }
    }
    Ok(rollouts)
}

async fn load_rollout(c: &impl GenericClient, id: u64) -> Result<Option<RolloutRow>> {
    let Some(row) = c
        .query_opt(
            "SELECT id, model_name, model_version, created_ms, status, rollback, plan, current_wave, reason,
                    wave_opened_ms, target
             FROM rollouts WHERE id = $1",
            &[&i(id)],
        )
        .await?
    else {
        return Ok(None);
    };
    let deployments = c
        .query(
            "SELECT device_id, status, detail, command_seq, updated_ms, wave, previous_model, previous_version
             FROM deployments WHERE rollout_id = $1 ORDER BY device_id",
            &[&i(id)],
        )
        .await?
        .iter()
        .map(|r| DeploymentRow {
            device_id: r.get(0),
            status: r.get(1),
            detail: r.get(2),
            command_seq: r.get::<_, Option<i64>>(3).map(u),
            updated_ms: u(r.get(4)),
            wave: u(r.get(5)) as u32,
            previous: previous_model(r.get(6), r.get(7)),
        })
        .collect();
    StoredRollout {
        id: u(row.get(0)),
        model_name: row.get(1),
        model_version: u(row.get(2)),
        created_ms: u(row.get(3)),
        status: row.get(4),
        rollback: row.get(5),
        plan: row.get(6),
        current_wave: u(row.get(7)) as u32,
        reason: row.get(8),
        wave_opened_ms: u(row.get(9)),
        target: row.get(10),
    }
    .into_rollout(deployments)
    .map(Some)
}

#[async_trait::async_trait]
impl Store for PgStore {
    async fn ingest_many(
        &self,
        envelopes: Arc<[Envelope]>,
        received_ms: u64,
    ) -> Result<Vec<Ingested>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut results = Vec::with_capacity(envelopes.len());
        let mut summaries = Vec::new();
        let mut fresh = Vec::with_capacity(envelopes.len());
        for envelope in envelopes.iter() {
            // A drift summary's row is keyed by its message id, and is kept as long as
            // `seen_messages` keeps ids: it is its own record of having been seen.
            let inserted = match &envelope.message {
                Message::DriftSummary(s) => apply_drift(&*tx, envelope, s, received_ms).await?,
                _ => {
                    tx.execute(
                        "INSERT INTO seen_messages (msg_id, device_id, received_ms) VALUES ($1, $2, $3)
                         ON CONFLICT (msg_id) DO NOTHING",
                        &[&envelope.msg_id, &envelope.device_id, &i(received_ms)],
                    )
                    .await?
                        > 0
                }
            };
            fresh.push(inserted);
        }
        // Every device row this transaction writes is locked first, in id order, as
        // `create_rollout` locks its devices: two transactions that lock in one order
        // cannot deadlock (a deadlock aborted a rollout while a fleet was reporting).
        // Every message of a transaction has the same time: each device is touched once.
        let devices: std::collections::BTreeSet<&str> = envelopes
            .iter()
            .zip(&fresh)
            .filter(|(_, f)| **f)
            .map(|(e, _)| e.device_id.as_str())
            .collect();
        for device in devices {
            touch_device(&*tx, device, received_ms).await?;
        }
        for (envelope, fresh) in envelopes.iter().zip(fresh) {
            if !fresh {
                results.push(Ingested::Duplicate);
                continue;
            }
            match &envelope.message {
                Message::Status(s) => apply_status(&*tx, &envelope.device_id, s).await?,
                Message::DriftSummary(s) => summaries.push((envelope.device_id.as_str(), s)),
                Message::DeploymentStatus(d) => {
                    apply_deployment(&*tx, &envelope.device_id, d, received_ms).await?
                }
                Message::SampleChunk(c) => {
                    apply_chunk(&*tx, &envelope.device_id, c, received_ms).await?
                }
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
        apply_psi(&*tx, &summaries).await?;
        for (key, list) in by_hour(&summaries) {
            fold_hourly(&*tx, &key, &list).await?;
        }
        tx.commit().await?;
        Ok(results)
    }

    async fn register_devices(&self, ids: &[String]) -> Result<u64> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut added = 0;
        for id in ids {
            added += tx
                .execute(
                    "INSERT INTO devices (id, last_seen_ms) VALUES ($1, 0) ON CONFLICT (id) DO NOTHING",
                    &[id],
                )
                .await?;
        }
        tx.commit().await?;
        Ok(added)
    }

    async fn device_exists(&self, id: &str) -> Result<bool> {
        let client = self.client().await?;
        Ok(client
            .query_opt("SELECT 1 FROM devices WHERE id = $1", &[&id])
            .await?
            .is_some())
    }

    async fn devices(&self) -> Result<Vec<DeviceRow>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, online, agent_version, model_name, model_version, last_seen_ms,
                        inferences, errors, malformed_messages, last_psi_max,
                        outbox_entries, outbox_bytes, outbox_budget_bytes,
                        dropped_control, dropped_telemetry, dropped_samples,
                        group_name, tags, board, arch, trust_version
                 FROM devices ORDER BY id",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let id: String = r.get(0);
                Ok(DeviceRow {
                    tags: parse_tags(&id, r.get(17))?,
                    group: r.get(16),
                    board: r.get(18),
                    arch: r.get(19),
                    trust_version: u(r.get(20)),
                    id,
                    online: r.get(1),
                    agent_version: r.get(2),
                    model_name: r.get(3),
                    model_version: r.get::<_, Option<i64>>(4).map(u),
                    last_seen_ms: u(r.get(5)),
                    inferences: u(r.get(6)),
                    errors: u(r.get(7)),
                    malformed_messages: u(r.get(8)),
                    last_psi_max: r.get(9),
                    outbox: OutboxStatus {
                        entries: u(r.get(10)),
                        bytes: u(r.get(11)),
                        budget_bytes: u(r.get(12)),
                        dropped: DropCounts {
                            control: u(r.get(13)),
                            telemetry: u(r.get(14)),
                            samples: u(r.get(15)),
                        },
                    },
                })
            })
            .collect()
    }

    async fn hourly(&self, device_id: &str, limit: u32) -> Result<Vec<HourlyRow>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT device_id, model_name, model_version, hour_ms, windows, samples,
                        psi_max, psi_sum, stats, stats_msgpack
                 FROM telemetry_hourly WHERE device_id = $1
                 ORDER BY hour_ms DESC, model_name, model_version LIMIT $2",
                &[&device_id, &i64::from(limit)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let windows = u(r.get(4));
                Ok(HourlyRow {
                    device_id: r.get(0),
                    model_name: r.get(1),
                    model_version: u(r.get(2)),
                    hour_ms: u(r.get(3)),
                    windows,
                    samples: u(r.get(5)),
                    psi_max: r.get(6),
                    psi_mean: r.get::<_, f64>(7) / windows.max(1) as f64,
                    stats: stored_stats(r, 8).to_value()?,
                })
            })
            .collect()
    }

    async fn prune(&self, raw_before_ms: u64, aggregates_before_ms: u64) -> Result<Pruned> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let telemetry = tx
            .execute(
                "DELETE FROM telemetry WHERE received_ms < $1",
                &[&i(raw_before_ms)],
            )
            .await?;
        let hourly = tx
            .execute(
                "DELETE FROM telemetry_hourly WHERE hour_ms < $1",
                &[&i(aggregates_before_ms)],
            )
            .await?;
        let seen_messages = tx
            .execute(
                "DELETE FROM seen_messages WHERE received_ms < $1",
                &[&i(raw_before_ms)],
            )
            .await?;
        tx.commit().await?;
        Ok(Pruned {
            telemetry,
            hourly,
            seen_messages,
        })
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: u64,
        ttl_ms: u64,
    ) -> Result<bool> {
        let client = self.client().await?;
        let taken = client
            .execute(
                "INSERT INTO leases (name, holder, expires_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder,
                     expires_ms = EXCLUDED.expires_ms
                 WHERE leases.holder = EXCLUDED.holder OR leases.expires_ms < $4",
                &[&name, &holder, &i(now_ms + ttl_ms), &i(now_ms)],
            )
            .await?;
        Ok(taken == 1)
    }

    async fn telemetry(&self, device_id: &str, limit: u32) -> Result<Vec<TelemetryRow>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT msg_id, device_id, received_ms, model_name, model_version, window_seq,
                        window_start_ms, window_end_ms, samples, psi_max, summary
                 FROM telemetry WHERE device_id = $1
                 ORDER BY received_ms DESC, window_end_ms DESC LIMIT $2",
                &[&device_id, &i64::from(limit)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let msg_id: String = r.get(0);
                let summary: String = r.get(10);
                Ok(TelemetryRow {
                    summary: summary_value(&msg_id, ReceivedPayload::Json(&summary))?,
                    msg_id,
                    device_id: r.get(1),
                    received_ms: u(r.get(2)),
                    model_name: r.get(3),
                    model_version: u(r.get(4)),
                    window_seq: u(r.get(5)),
                    window_start_ms: u(r.get(6)),
                    window_end_ms: u(r.get(7)),
                    samples: u(r.get(8)),
                    psi_max: r.get(9),
                })
            })
            .collect()
    }

    async fn trust(&self) -> Result<Option<StoredTrust>> {
        let client = self.client().await?;
        Ok(client
            .query_opt("SELECT version, state, signed FROM trust WHERE id = 1", &[])
            .await?
            .map(|r| StoredTrust {
                version: u(r.get(0)),
                state: r.get(1),
                signed: r.get(2),
            }))
    }

    async fn replace_trust(&self, previous: u64, next: &StoredTrust) -> Result<bool> {
        let client = self.client().await?;
        let changed = client
            .execute(
                "INSERT INTO trust (id, version, state, signed) VALUES (1, $1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET version = excluded.version,
                     state = excluded.state, signed = excluded.signed
                 WHERE trust.version = $4",
                &[&i(next.version), &next.state, &next.signed, &i(previous)],
            )
            .await?;
        Ok(changed == 1)
    }

    async fn deployment_events(&self, device_id: &str, limit: u32) -> Result<Vec<DeploymentEvent>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT device_id, received_ms, rollout_id, command_seq, stage, model, detail
                 FROM deployment_events WHERE device_id = $1 ORDER BY id DESC LIMIT $2",
                &[&device_id, &i64::from(limit)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| DeploymentEvent {
                device_id: r.get(0),
                received_ms: u(r.get(1)),
                rollout_id: r.get::<_, Option<i64>>(2).map(u),
                command_seq: u(r.get(3)),
                stage: r.get(4),
                model: r.get(5),
                detail: r.get(6),
            })
            .collect())
    }

    async fn insert_model(&self, model: &ModelRow) -> Result<()> {
        let client = self.client().await?;
        let features = serde_json::to_string(&model.features).expect("strings serialize");
        let inserted = client
            .execute(
                &format!(
                    "INSERT INTO models ({MODEL_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                     ON CONFLICT (name, version) DO NOTHING"
                ),
                &[
                    &model.name,
                    &i(model.version),
                    &model.label,
                    &i(model.created_ms),
                    &model.bundle_sha256,
                    &i(model.bundle_size),
                    &features,
                    &model.signed_by,
                    &lineage_json(model),
                    &requirements_json(model),
                ],
            )
            .await?;
        if inserted == 0 {
            return Err(StoreError::Conflict(format!(
                "model {} v{}",
                model.name, model.version
            )));
        }
        Ok(())
    }

    async fn models(&self) -> Result<Vec<ModelRow>> {
        let client = self.client().await?;
        client
            .query(
                &format!("SELECT {MODEL_COLUMNS} FROM models ORDER BY name, version"),
                &[],
            )
            .await?
            .iter()
            .map(model_from_row)
            .collect()
    }

    async fn model(&self, name: &str, version: u64) -> Result<Option<ModelRow>> {
        let client = self.client().await?;
        client
            .query_opt(
                &format!("SELECT {MODEL_COLUMNS} FROM models WHERE name = $1 AND version = $2"),
                &[&name, &i(version)],
            )
            .await?
            .as_ref()
            .map(model_from_row)
            .transpose()
    }

    async fn insert_model_delta(&self, delta: &ModelDelta) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                &format!(
                    "INSERT INTO model_deltas ({DELTA_COLUMNS_BARE}) VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (name, version, base_version) DO UPDATE SET
                         base_sha256 = EXCLUDED.base_sha256,
                         bundle_sha256 = EXCLUDED.bundle_sha256,
                         bundle_size = EXCLUDED.bundle_size"
                ),
                &[
                    &delta.name,
                    &i(delta.version),
                    &i(delta.base_version),
                    &delta.base_sha256,
                    &delta.bundle_sha256,
                    &i(delta.bundle_size),
                ],
            )
            .await?;
        Ok(())
    }

    async fn model_deltas(&self, name: &str, version: u64) -> Result<Vec<ModelDelta>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {DELTA_COLUMNS} FROM model_deltas x
                     WHERE name = $1 AND version = $2 ORDER BY base_version"
                ),
                &[&name, &i(version)],
            )
            .await?;
        Ok(rows.iter().map(|r| delta_from_row(r, 0)).collect())
    }

    async fn create_rollout(&self, new: &NewRollout) -> Result<RolloutRow> {
        let NewRollout {
            name,
            version,
            rollback,
            devices,
            plan,
            target,
            now_ms,
        } = new;
        let (version, now_ms) = (*version, *now_ms);
        let target_json = target
            .as_ref()
            .map(|t| serde_json::to_string(t).expect("a target serializes"));
        let plan_json = serde_json::to_string(plan).expect("a plan serializes");
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Lock the devices first: two rollouts created at once for one device then run one
        // after the other, and the second supersedes the first.
        tx.execute(
            "SELECT id FROM devices WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            &[&devices],
        )
        .await?;
        if tx
            .query_opt(
                "SELECT 1 FROM models WHERE name = $1 AND version = $2",
                &[&name, &i(version)],
            )
            .await?
            .is_none()
        {
            return Err(StoreError::NotFound(format!("model {name} v{version}")));
        }
        for device in devices {
            if tx
                .query_opt("SELECT 1 FROM devices WHERE id = $1", &[device])
                .await?
                .is_none()
            {
                return Err(StoreError::NotFound(format!("device {device}")));
            }
        }
        let id: i64 = tx
            .query_one(
                "INSERT INTO rollouts (model_name, model_version, created_ms, status, rollback, plan, current_wave,
                                       failure_gated, wave_opened_ms, target)
                 VALUES ($1, $2, $3, 'in_progress', $4, $5, 0, $6, $3, $7) RETURNING id",
                &[name, &i(version), &i(now_ms), rollback, &plan_json, &plan.failure_threshold.is_some(), &target_json],
            )
            .await?
            .get(0);
        let waves = plan.assign(u(id), devices);
        let mut superseded = std::collections::BTreeSet::new();
        for (device, wave) in devices.iter().zip(waves) {
            let older = tx
                .query(
                    &format!(
                        "UPDATE deployments SET status = 'superseded', detail = $2, updated_ms = $3
                         WHERE device_id = $1 AND status NOT IN ({})
                         RETURNING rollout_id",
                        FINAL_STATES_SQL
                    ),
                    &[device, &format!("superseded by rollout {id}"), &i(now_ms)],
                )
                .await?;
            superseded.extend(older.iter().map(|r| u(r.get(0))));
            let deadline = (wave == 0).then(|| i(new.first_deadline_ms()));
            tx.execute(
                "INSERT INTO deployments (rollout_id, device_id, status, updated_ms, wave, deadline_ms,
                                          previous_model, previous_version)
                 SELECT $1, $2, 'pending', $3, $4, $5, model_name, model_version FROM devices WHERE id = $2",
                &[&id, device, &i(now_ms), &i64::from(wave), &deadline],
            )
            .await?;
        }
        for rollout in superseded {
            refresh_rollout_status(&*tx, rollout).await?;
        }
        refresh_rollout_status(&*tx, u(id)).await?;
        let row = load_rollout(&*tx, u(id)).await?.expect("just inserted");
        tx.commit().await?;
        Ok(row)
    }

    async fn join_rollouts(&self, now_ms: u64) -> Result<Vec<(u64, String)>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut rollouts = Vec::new();
        let mut plans = std::collections::HashMap::new();
        for r in tx
            .query(
                &format!(
                    "SELECT r.id, r.model_name, r.model_version, r.target, r.plan, r.current_wave,
                            m.requirements
                     FROM rollouts r
                     LEFT JOIN models m ON m.name = r.model_name AND m.version = r.model_version
                     WHERE r.target IS NOT NULL AND NOT r.rollback
                       AND r.status IN ({JOINABLE_STATUSES_SQL})"
                ),
                &[],
            )
            .await?
        {
            let id = u(r.get(0));
            let target: String = r.get(3);
            let target = serde_json::from_str(&target)
                .map_err(|e| StoreError::Corrupt(format!("target of rollout {id}: {e}")))?;
            let plan: RolloutPlan = match r.get::<_, Option<String>>(4) {
                Some(p) => serde_json::from_str(&p)
                    .map_err(|e| StoreError::Corrupt(format!("plan of rollout {id}: {e}")))?,
                None => RolloutPlan::default(),
            };
            plans.insert(id, (plan.device_timeout_s, r.get::<_, i64>(5)));
            let (model_name, model_version): (String, u64) = (r.get(1), u(r.get(2)));
            rollouts.push(Joinable {
                id,
                requirements: parse_requirements(&model_name, model_version, r.get(6))?,
                model_name,
                model_version,
                target,
            });
        }
        if rollouts.is_empty() {
            return Ok(Vec::new());
        }
        let devices = tx
            .query(
                &format!(
                    "SELECT id, group_name, tags, model_name, model_version,
                            (SELECT MAX(rollout_id) FROM deployments d WHERE d.device_id = devices.id),
                            EXISTS (SELECT 1 FROM deployments d WHERE d.device_id = devices.id
                                    AND d.status NOT IN ({FINAL_STATES_SQL})),
                            arch, board
                     FROM devices"
                ),
                &[],
            )
            .await?
            .iter()
            .map(|r| {
                let id: String = r.get(0);
                Ok(JoinCandidate {
                    arch: r.get(7),
                    board: r.get(8),
                    tags: parse_tags(&id, r.get(2))?,
                    group: r.get(1),
                    model: previous_model(r.get(3), r.get(4)),
                    newest_rollout: r.get::<_, Option<i64>>(5).map(u),
                    busy: r.get(6),
                    id,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut joined = Vec::new();
        for (rollout, device) in late_joiners(&rollouts, &devices) {
            let (timeout_s, wave) = plans[&rollout];
            let added = tx
                .execute(
                    "INSERT INTO deployments (rollout_id, device_id, status, updated_ms, wave, deadline_ms,
                                              previous_model, previous_version)
                     SELECT $1, $2, 'pending', $3, $4, $5, model_name, model_version FROM devices WHERE id = $2
                     ON CONFLICT DO NOTHING",
                    &[&i(rollout), &device, &i(now_ms), &wave, &i(now_ms + timeout_s * 1000)],
                )
                .await?;
            if added > 0 {
                refresh_rollout_status(&*tx, rollout).await?;
                joined.push((rollout, device));
            }
        }
        tx.commit().await?;
        Ok(joined)
    }

    async fn rollouts(&self) -> Result<Vec<RolloutRow>> {
        load_rollouts(&**self.client().await?, "").await
    }

    async fn rollout(&self, id: u64) -> Result<Option<RolloutRow>> {
        let client = self.client().await?;
        load_rollout(&**client, id).await
    }

    async fn rollouts_in_progress(&self) -> Result<Vec<RolloutRow>> {
        load_rollouts(&**self.client().await?, "WHERE status = 'in_progress'").await
    }

    async fn open_wave(
        &self,
        id: u64,
        status: RolloutStatus,
        from: u32,
        now_ms: u64,
        deadline_ms: u64,
    ) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let opened = tx
            .execute(
                "UPDATE rollouts SET current_wave = $2::BIGINT + 1, wave_opened_ms = $4
                 WHERE id = $1 AND current_wave = $2::BIGINT AND status = $3",
                &[&i(id), &i64::from(from), &status.as_str(), &i(now_ms)],
            )
            .await?;
        if opened == 0 {
            return Ok(false);
        }
        tx.execute(
            "UPDATE deployments SET deadline_ms = $3 WHERE rollout_id = $1 AND wave = $2::BIGINT + 1",
            &[&i(id), &i64::from(from), &i(deadline_ms)],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
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
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let changed = tx
            .execute(
                "UPDATE rollouts SET status = $3, reason = $4 WHERE id = $1 AND status = $2",
                &[&i(id), &from.as_str(), &to.as_str(), &reason],
            )
            .await?;
        if changed == 0 {
            return Ok(false);
        }
        if to == RolloutStatus::Aborted {
            tx.execute(
                "UPDATE deployments SET status = 'cancelled', detail = $2, updated_ms = $3
                 WHERE rollout_id = $1 AND status = 'pending'",
                &[
                    &i(id),
                    &format!("rollout aborted: {}", reason.unwrap_or("no reason given")),
                    &i(now_ms),
                ],
            )
            .await?;
        }
        if let Some(deadline) = deadline_ms {
            tx.execute(
                &format!(
                    "UPDATE deployments SET deadline_ms = $2
                     WHERE rollout_id = $1 AND wave <= (SELECT current_wave FROM rollouts WHERE id = $1)
                       AND (status NOT IN ({FINAL_STATES_SQL}) OR status = 'active')"
                ),
                &[&i(id), &i(deadline)],
            )
            .await?;
        }
        if to == RolloutStatus::InProgress {
            refresh_rollout_status(&*tx, id).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn expire_deployments(&self, now_ms: u64) -> Result<u64> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let touched = tx
            .query(
                &format!(
                    "UPDATE deployments SET status = 'timed_out', updated_ms = $1,
                         detail = 'no verdict within the device timeout (last: ' || status || ')'
                     WHERE deadline_ms < $1
                       AND (status NOT IN ({FINAL_STATES_SQL}) OR status = 'active')
                       AND rollout_id IN (SELECT id FROM rollouts WHERE status = 'in_progress')
                     RETURNING rollout_id"
                ),
                &[&i(now_ms)],
            )
            .await?;
        let rollouts: std::collections::BTreeSet<u64> =
            touched.iter().map(|r| u(r.get(0))).collect();
        for rollout in rollouts {
            refresh_rollout_status(&*tx, rollout).await?;
        }
        tx.commit().await?;
        Ok(touched.len() as u64)
    }

    async fn recent_windows(
        &self,
        name: &str,
        per_device: u32,
        since_ms: u64,
    ) -> Result<Vec<WindowPoint>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT device_id, model_version, window_end_ms, psi_max, drift_share, labelled, accuracy, latency_p99_ms, samples, errors, prediction_drift, mae FROM (
                     SELECT device_id, model_version, window_end_ms, psi_max, drift_share, labelled, accuracy, latency_p99_ms, samples, errors, prediction_drift, mae,
                            ROW_NUMBER() OVER (PARTITION BY device_id ORDER BY window_end_ms DESC) AS n
                     FROM telemetry WHERE model_name = $1 AND received_ms >= $2) recent
                 WHERE n <= $3 ORDER BY device_id, window_end_ms DESC",
                &[&name, &i(since_ms), &i64::from(per_device)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| WindowPoint {
                device_id: r.get(0),
                model_version: u(r.get(1)),
                window_end_ms: u(r.get(2)),
                psi_max: r.get(3),
                drift_share: r.get(4),
                labelled: u(r.get(5)),
                accuracy: r.get(6),
                latency_p99_ms: r.get(7),
                samples: u(r.get(8)),
                errors: u(r.get(9)),
                prediction_drift: r.get(10),
                mae: r.get(11),
            })
            .collect())
    }

    async fn start_retraining(
        &self,
        name: &str,
        from_version: u64,
        reason: &str,
        now_ms: u64,
        cooldown_since_ms: u64,
    ) -> Result<Option<RetrainingRow>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // One at a time per model, across replicas.
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[&RETRAINING_LOCK, &name],
        )
        .await?;
        let blocking: i64 = tx
            .query_one(
                &format!(
                    "SELECT COUNT(*) FROM retrainings WHERE model_name = $1
                     AND (status IN ({OPEN_RETRAINING_SQL}) OR fired_ms >= $2)"
                ),
                &[&name, &i(cooldown_since_ms)],
            )
            .await?
            .get(0);
        if blocking > 0 {
            return Ok(None);
        }
        let id: i64 = tx
            .query_one(
                "INSERT INTO retrainings (model_name, from_version, fired_ms, reason, status, updated_ms)
                 VALUES ($1, $2, $3, $4, 'training', $3) RETURNING id",
                &[&name, &i(from_version), &i(now_ms), &reason],
            )
            .await?
            .get(0);
        let row = load_retrainings(&*tx, "WHERE id = $1", &[&id]).await?.pop();
        tx.commit().await?;
        Ok(row)
    }

    async fn update_retraining(
        &self,
        id: u64,
        update: &RetrainingUpdate,
        now_ms: u64,
    ) -> Result<bool> {
        let client = self.client().await?;
        let changed = client
            .execute(
                &format!(
                    "UPDATE retrainings SET status = $2, detail = COALESCE($3, detail),
                         candidate_version = COALESCE($4, candidate_version), gate = COALESCE($5, gate),
                         rollout_id = COALESCE($6, rollout_id), updated_ms = $7
                     WHERE id = $1 AND status IN ({OPEN_RETRAINING_SQL})
                       AND ($2 <> 'training' OR status = 'training')"
                ),
                &[
                    &i(id),
                    &update.status.as_str(),
                    &update.detail,
                    &update.candidate_version.map(i),
                    &update.gate,
                    &update.rollout_id.map(i),
                    &i(now_ms),
                ],
            )
            .await?;
        Ok(changed > 0)
    }

    async fn retrainings(&self, limit: u32) -> Result<Vec<RetrainingRow>> {
        let client = self.client().await?;
        load_retrainings(&**client, "ORDER BY id DESC LIMIT $1", &[&i64::from(limit)]).await
    }

    async fn create_token(&self, token: &TokenRow, secret_sha256: &str) -> Result<()> {
        let client = self.client().await?;
        let inserted = client
            .execute(
                "INSERT INTO enrollment_tokens (id, secret_sha256, group_name, tags, expires_ms, uses_left,
                                                auto_approve, created_ms, created_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT DO NOTHING",
                &[
                    &token.id,
                    &secret_sha256,
                    &token.group,
                    &serde_json::to_string(&token.tags).expect("strings serialize"),
                    &i(token.expires_ms),
                    &token.uses_left.map(i),
                    &token.auto_approve,
                    &i(token.created_ms),
                    &token.created_by,
                ],
            )
            .await?;
        if inserted == 0 {
            // The same id, or the same secret (a key pre-authorized twice).
            return Err(StoreError::Conflict(format!("token {}", token.id)));
        }
        Ok(())
    }

    async fn tokens(&self) -> Result<Vec<TokenRow>> {
        let client = self.client().await?;
        client
            .query(
                &format!("SELECT {TOKEN_COLUMNS} FROM enrollment_tokens ORDER BY created_ms, id"),
                &[],
            )
            .await?
            .iter()
            .map(token_from_row)
            .collect()
    }

    async fn enroll(
        &self,
        secret_sha256: &str,
        request: &EnrollRequest,
        now_ms: u64,
    ) -> Result<EnrollOutcome> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let token = tx
            .query_opt(
                &format!(
                    "SELECT {TOKEN_COLUMNS} FROM enrollment_tokens WHERE secret_sha256 = $1 FOR UPDATE"
                ),
                &[&secret_sha256],
            )
            .await?
            .as_ref()
            .map(token_from_row)
            .transpose()?;
        let Some(token) = token.filter(|t| t.expires_ms > now_ms) else {
            return Ok(EnrollOutcome::BadToken);
        };
        if let Some(existing) =
            load_enrollments(&*tx, "WHERE device_id = $1", &[&request.device_id])
                .await?
                .pop()
        {
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
            "UPDATE enrollment_tokens SET uses_left = uses_left - 1 WHERE id = $1 AND uses_left IS NOT NULL",
            &[&token.id],
        )
        .await?;
        let row = new_enrollment(&token, request, now_ms);
        let inserted = tx
            .execute(
                "INSERT INTO enrollments (device_id, public_key, token_id, group_name, tags, board, arch,
                                          agent_version, status, created_ms, decided_ms, decided_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                 ON CONFLICT (device_id) DO NOTHING",
                &[
                    &row.device_id,
                    &row.public_key,
                    &row.token_id,
                    &row.group,
                    &serde_json::to_string(&row.tags).expect("strings serialize"),
                    &row.board,
                    &row.arch,
                    &row.agent_version,
                    &enrollment_status_str(row.status),
                    &i(row.created_ms),
                    &row.decided_ms.map(i),
                    &row.decided_by,
                ],
            )
            .await?;
        if inserted == 0 {
            // Another request enrolled this id at the same moment; the caller may try again.
            return Err(StoreError::Conflict(format!(
                "enrollment of {}",
                row.device_id
            )));
        }
        if row.status == EnrollmentStatus::Approved {
            register_enrolled(&*tx, &row).await?;
        }
        tx.commit().await?;
        Ok(EnrollOutcome::Enrolled(Box::new(row)))
    }

    async fn approve_enrollment(
        &self,
        device_id: &str,
        by: &str,
        now_ms: u64,
    ) -> Result<Option<EnrollmentRow>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let changed = tx
            .execute(
                "UPDATE enrollments SET status = 'approved', decided_ms = $2, decided_by = $3
                 WHERE device_id = $1 AND status = 'pending'",
                &[&device_id, &i(now_ms), &by],
            )
            .await?;
        if changed == 0 {
            return Ok(None);
        }
        let row = load_enrollments(&*tx, "WHERE device_id = $1", &[&device_id])
            .await?
            .pop();
        if let Some(row) = &row {
            register_enrolled(&*tx, row).await?;
        }
        tx.commit().await?;
        Ok(row)
    }

    async fn enrollments(&self) -> Result<Vec<EnrollmentRow>> {
        load_enrollments(
            &**self.client().await?,
            "ORDER BY created_ms, device_id",
            &[],
        )
        .await
    }

    async fn set_broker_password(&self, device_id: &str, password_sha256: &str) -> Result<bool> {
        let client = self.client().await?;
        Ok(client
            .execute(
                "UPDATE enrollments SET broker_password_sha256 = $2
                 WHERE device_id = $1 AND status = 'approved'",
                &[&device_id, &password_sha256],
            )
            .await?
            > 0)
    }

    async fn broker_login(&self, device_id: &str, password_sha256: &str) -> Result<bool> {
        let client = self.client().await?;
        let stored: Option<Option<String>> = client
            .query_opt(
                "SELECT broker_password_sha256 FROM enrollments
                 WHERE device_id = $1 AND status = 'approved'",
                &[&device_id],
            )
            .await?
            .map(|r| r.get(0));
        Ok(stored
            .flatten()
            .is_some_and(|s| same_secret(&s, password_sha256)))
    }

    async fn record_audit(&self, entry: &AuditEntry) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO audit (at_ms, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5)",
                &[
                    &i(entry.at_ms),
                    &entry.actor,
                    &entry.action,
                    &entry.target,
                    &entry.detail,
                ],
            )
            .await?;
        Ok(())
    }

    async fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT at_ms, actor, action, target, detail FROM audit ORDER BY id DESC LIMIT $1",
                &[&i64::from(limit)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| AuditEntry {
                at_ms: u(r.get(0)),
                actor: r.get(1),
                action: r.get(2),
                target: r.get(3),
                detail: r.get(4),
            })
            .collect())
    }

    async fn due_deployments(&self, quiet_since_ms: u64) -> Result<Vec<DueDeployment>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT d.rollout_id, d.device_id, r.model_name, r.model_version, m.bundle_sha256, m.bundle_size,
                            r.rollback, {}
                     FROM deployments d
                     JOIN rollouts r ON r.id = d.rollout_id
                     JOIN models m ON m.name = r.model_name AND m.version = r.model_version
                     JOIN devices v ON v.id = d.device_id
                     LEFT JOIN model_deltas x ON x.name = r.model_name AND x.version = r.model_version
                          AND v.model_name = r.model_name AND x.base_version = v.model_version
                          AND NOT r.rollback
                     WHERE d.status NOT IN ({})
                       AND r.status = 'in_progress' AND d.wave <= r.current_wave
                       AND v.online
                       AND (d.status = 'pending' OR d.updated_ms < $1)
                     ORDER BY d.rollout_id, d.device_id",
                    DELTA_COLUMNS, FINAL_STATES_SQL
                ),
                &[&i(quiet_since_ms)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| DueDeployment {
                rollout_id: u(r.get(0)),
                device_id: r.get(1),
                model_name: r.get(2),
                model_version: u(r.get(3)),
                bundle_sha256: r.get(4),
                bundle_size: u(r.get(5)),
                rollback: r.get(6),
                delta: r
                    .get::<_, Option<String>>(7)
                    .is_some()
                    .then(|| delta_from_row(r, 7)),
            })
            .collect())
    }

    async fn mark_sent(
        &self,
        rollout_id: u64,
        device_id: &str,
        now_ms: u64,
    ) -> Result<Option<u64>> {
        self.mark_with_seq(
            &format!(
                "UPDATE deployments SET status = CASE status WHEN 'pending' THEN 'sent' ELSE status END,
                     command_seq = $3, updated_ms = $4
                 WHERE rollout_id = $1 AND device_id = $2 AND status NOT IN ({FINAL_STATES_SQL})"
            ),
            rollout_id,
            device_id,
            now_ms,
        )
        .await
    }

    async fn create_dataset(&self, new: &NewDataset) -> Result<DatasetRow> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let id: i64 = tx
            .query_one(
                "INSERT INTO datasets (model_name, created_ms, created_by, reason, max_rows)
                 VALUES ($1, $2, $3, $4, $5) RETURNING id",
                &[
                    &new.model_name,
                    &i(new.now_ms),
                    &new.created_by,
                    &new.reason,
                    &new.max_rows.map(i),
                ],
            )
            .await?
            .get(0);
        for device in &new.devices {
            tx.execute(
                "INSERT INTO dataset_parts (dataset_id, device_id, status, updated_ms)
                 VALUES ($1, $2, 'requested', $3)",
                &[&id, device, &i(new.now_ms)],
            )
            .await?;
        }
        let row = load_datasets(&*tx, "WHERE id = $1", id)
            .await?
            .pop()
            .ok_or_else(|| StoreError::NotFound(format!("dataset {id}")))?;
        tx.commit().await?;
        Ok(row)
    }

    async fn datasets(&self, limit: u32) -> Result<Vec<DatasetRow>> {
        let client = self.client().await?;
        load_datasets(&**client, "ORDER BY id DESC LIMIT $1", i64::from(limit)).await
    }

    async fn dataset(&self, id: u64) -> Result<Option<DatasetRow>> {
        let client = self.client().await?;
        Ok(load_datasets(&**client, "WHERE id = $1", i(id))
            .await?
            .pop())
    }

    async fn dataset_files(&self, id: u64) -> Result<Vec<(String, Vec<u8>)>> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT device_id, content FROM dataset_parts
                 WHERE dataset_id = $1 AND status = 'complete' ORDER BY device_id",
                &[&i(id)],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    async fn due_uploads(&self, quiet_since_ms: u64) -> Result<Vec<DueUpload>> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT p.dataset_id, p.device_id, d.max_rows
                 FROM dataset_parts p
                 JOIN datasets d ON d.id = p.dataset_id
                 JOIN devices v ON v.id = p.device_id
                 WHERE p.status = 'requested' AND v.online
                   AND (p.sent_ms IS NULL OR p.sent_ms < $1)
                 ORDER BY p.dataset_id, p.device_id",
                &[&i(quiet_since_ms)],
            )
            .await?
            .iter()
            .map(|r| DueUpload {
                dataset_id: u(r.get(0)),
                device_id: r.get(1),
                max_rows: r.get::<_, Option<i64>>(2).map(u),
            })
            .collect())
    }

    async fn mark_upload_sent(
        &self,
        dataset_id: u64,
        device_id: &str,
        now_ms: u64,
    ) -> Result<Option<u64>> {
        self.mark_with_seq(
            "UPDATE dataset_parts SET command_seq = $3, sent_ms = $4
             WHERE dataset_id = $1 AND device_id = $2 AND status = 'requested'",
            dataset_id,
            device_id,
            now_ms,
        )
        .await
    }

    async fn expire_uploads(&self, before_ms: u64, now_ms: u64) -> Result<u64> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "DELETE FROM dataset_chunks c USING dataset_parts p
             WHERE p.dataset_id = c.dataset_id AND p.device_id = c.device_id
               AND p.status IN ('requested', 'receiving') AND p.updated_ms < $1",
            &[&i(before_ms)],
        )
        .await?;
        let expired = tx
            .execute(
                "UPDATE dataset_parts SET status = 'failed', detail = $2, updated_ms = $3
                 WHERE status IN ('requested', 'receiving') AND updated_ms < $1",
                &[&i(before_ms), &UPLOAD_EXPIRED, &i(now_ms)],
            )
            .await?;
        tx.commit().await?;
        Ok(expired)
    }
}
