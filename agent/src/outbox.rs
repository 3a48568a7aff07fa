//! The outbox: every message the agent sends is written here first and removed only when
//! the controller's receipt names it (which comes after the broker's PUBACK), so a dead
//! broker, a restarted controller or a killed agent loses nothing that was produced.
//!
//! The outbox is bounded in bytes. When a new message does not fit, the oldest entries of
//! the lowest priority (never higher than the new message's) make room; when nothing may
//! go, the new message itself is dropped. Every drop is counted by priority, persisted, and
//! reported in the device's heartbeat: nothing is dropped silently.
//!
//! [`OutboxStore`] is the storage seam; [`SqliteOutbox`] is the durable store used on
//! devices and [`MemoryOutbox`] the in-memory one for tests. [`Outbox`] is the cheap,
//! cloneable handle the rest of the agent uses; it applies the budget and wakes the MQTT
//! link when something new is queued.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use edgeloop_shared::protocol::{DropCounts, OutboxStatus};
use rusqlite::{Connection, params};
use tokio::sync::Notify;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "outbox database {path} has schema version {found}, newer than this agent's {supported}"
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
}

/// What is dropped last when the outbox is full. Ordered: `Samples` < `Telemetry` < `Control`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Raw input samples.
    Samples = 0,
    /// Drift summaries and heartbeats.
    Telemetry = 1,
    /// Deployment statuses and command results.
    Control = 2,
}

impl Priority {
    fn from_i64(v: i64) -> Self {
        match v {
            i64::MIN..=0 => Priority::Samples,
            1 => Priority::Telemetry,
            _ => Priority::Control,
        }
    }
}

/// A message to queue.
#[derive(Debug, Clone, Copy)]
pub struct NewEntry<'a> {
    pub topic: &'a str,
    /// The envelope's message id, which receipts name.
    pub msg_id: &'a str,
    pub priority: Priority,
    pub payload: &'a [u8],
}

/// One queued message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Increases with every entry; the send order.
    pub id: u64,
    pub topic: String,
    pub msg_id: String,
    pub priority: Priority,
    pub payload: Vec<u8>,
}

/// An entry that may be dropped to make room: (id, priority, payload bytes).
pub type Victim = (u64, Priority, u64);

/// Storage of queued messages, oldest first, with drop counters and named sequences.
pub trait OutboxStore: Send {
    fn insert(&mut self, entry: NewEntry<'_>) -> Result<u64, OutboxError>;
    /// Up to `limit` entries with an id above `after`, in id order.
    fn after(&mut self, after: u64, limit: usize) -> Result<Vec<OutboxEntry>, OutboxError>;
    /// The first `limit` entries to drop among those of priority `max` or lower, in drop
    /// order: lowest priority first, then oldest. Each is (id, priority, payload bytes).
    fn eviction_candidates(
        &mut self,
        max: Priority,
        limit: usize,
    ) -> Result<Vec<Victim>, OutboxError>;
    fn remove(&mut self, ids: &[u64]) -> Result<(), OutboxError>;
    /// Removes the entries carrying these message ids; returns their outbox ids.
    fn remove_by_msg_id(&mut self, msg_ids: &[&str]) -> Result<Vec<u64>, OutboxError>;
    /// Number of entries and their payload bytes.
    fn size(&mut self) -> Result<(u64, u64), OutboxError>;
    fn count_drops(&mut self, priority: Priority, n: u64) -> Result<(), OutboxError>;
    fn drops(&mut self) -> Result<DropCounts, OutboxError>;
    /// The next value of a named counter, starting at 1; it survives restarts.
    fn next_sequence(&mut self, name: &str) -> Result<u64, OutboxError>;
}

fn add_drop(counts: &mut DropCounts, priority: Priority, n: u64) {
    let slot = match priority {
        Priority::Samples => &mut counts.samples,
        Priority::Telemetry => &mut counts.telemetry,
        Priority::Control => &mut counts.control,
    };
    *slot += n;
}

const SCHEMA_VERSION: i64 = 1;

/// The durable outbox: a SQLite database in WAL mode.
pub struct SqliteOutbox {
    conn: Connection,
    path: PathBuf,
    /// Number of entries and their payload bytes, kept in step with every insert and
    /// delete (counted once at open).
    count: u64,
    bytes: u64,
}

impl SqliteOutbox {
    pub fn open(path: &Path) -> Result<Self, OutboxError> {
        let err = |source| OutboxError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let mut conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        // NORMAL in WAL mode survives a process crash; a power cut may lose the last
        // transactions, which were then never acknowledged to anybody either.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(err)?;
        if version > SCHEMA_VERSION {
            return Err(OutboxError::NewerSchema {
                path: path.to_path_buf(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version < 1 {
            let tx = conn.transaction().map_err(err)?;
            // Version 0 is the first agent's table (id, topic, payload), or nothing.
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS outbox (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    topic TEXT NOT NULL,
                    payload BLOB NOT NULL
                );
                ALTER TABLE outbox ADD COLUMN msg_id TEXT NOT NULL DEFAULT '';
                ALTER TABLE outbox ADD COLUMN priority INTEGER NOT NULL DEFAULT 1;
                UPDATE outbox SET
                    msg_id = CASE WHEN json_valid(CAST(payload AS TEXT))
                                  THEN COALESCE(json_extract(CAST(payload AS TEXT), '$.msg_id'), '')
                                  ELSE '' END,
                    priority = CASE WHEN topic LIKE '%/deployment' THEN 2 ELSE 1 END;
                CREATE INDEX outbox_by_msg_id ON outbox (msg_id);
                CREATE TABLE outbox_drops (
                    priority INTEGER PRIMARY KEY,
                    count INTEGER NOT NULL
                );
                CREATE TABLE sequences (
                    name TEXT PRIMARY KEY,
                    value INTEGER NOT NULL
                );",
            )
            .map_err(err)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(err)?;
            tx.commit().map_err(err)?;
        }
        let (count, bytes): (i64, i64) = conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(length(payload)), 0) FROM outbox",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(err)?;
        Ok(SqliteOutbox {
            conn,
            path: path.to_path_buf(),
            count: count as u64,
            bytes: bytes as u64,
        })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> OutboxError + '_ {
        |source| OutboxError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }
}

impl SqliteOutbox {
    /// Runs a `DELETE … RETURNING id, length(payload)` once per key, in one transaction;
    /// returns the ids deleted and keeps the counters in step.
    fn delete_returning(
        &mut self,
        sql: &str,
        keys: Vec<rusqlite::types::Value>,
    ) -> Result<Vec<u64>, OutboxError> {
        let path = self.path.clone();
        let err = move |source| OutboxError::Sqlite {
            path: path.clone(),
            source,
        };
        // One statement commits alone; several share a transaction.
        let tx = if keys.len() > 1 {
            Some(self.conn.unchecked_transaction().map_err(&err)?)
        } else {
            None
        };
        let mut deleted = Vec::new();
        let mut bytes = 0u64;
        {
            let mut stmt = self.conn.prepare_cached(sql).map_err(&err)?;
            for key in keys {
                let rows = stmt
                    .query_map(params![key], |r| {
                        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
                    })
                    .map_err(&err)?;
                for row in rows {
                    let (id, size) = row.map_err(&err)?;
                    deleted.push(id);
                    bytes += size;
                }
            }
        }
        if let Some(tx) = tx {
            tx.commit().map_err(&err)?;
        }
        self.count = self.count.saturating_sub(deleted.len() as u64);
        self.bytes = self.bytes.saturating_sub(bytes);
        Ok(deleted)
    }
}

impl OutboxStore for SqliteOutbox {
    fn insert(&mut self, e: NewEntry<'_>) -> Result<u64, OutboxError> {
        self.conn
            .prepare_cached(
                "INSERT INTO outbox (topic, msg_id, priority, payload) VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut s| s.execute(params![e.topic, e.msg_id, e.priority as i64, e.payload]))
            .map_err(self.err())?;
        self.count += 1;
        self.bytes += e.payload.len() as u64;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    fn after(&mut self, after: u64, limit: usize) -> Result<Vec<OutboxEntry>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, topic, msg_id, priority, payload FROM outbox
                 WHERE id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map(params![after as i64, limit as i64], |r| {
                Ok(OutboxEntry {
                    id: r.get::<_, i64>(0)? as u64,
                    topic: r.get(1)?,
                    msg_id: r.get(2)?,
                    priority: Priority::from_i64(r.get(3)?),
                    payload: r.get(4)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    fn eviction_candidates(
        &mut self,
        max: Priority,
        limit: usize,
    ) -> Result<Vec<Victim>, OutboxError> {
        // A scan, on purpose: eviction happens only when the outbox is full, while an index
        // on (priority, id) would slow down every insert and delete.
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, priority, length(payload) FROM outbox
                 WHERE priority <= ?1 ORDER BY priority, id LIMIT ?2",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map(params![max as i64, limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    Priority::from_i64(r.get(1)?),
                    r.get::<_, i64>(2)? as u64,
                ))
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    fn remove(&mut self, ids: &[u64]) -> Result<(), OutboxError> {
        let keys: Vec<rusqlite::types::Value> = ids.iter().map(|&id| (id as i64).into()).collect();
        self.delete_returning(
            "DELETE FROM outbox WHERE id = ?1 RETURNING id, length(payload)",
            keys,
        )
        .map(|_| ())
    }

    fn remove_by_msg_id(&mut self, msg_ids: &[&str]) -> Result<Vec<u64>, OutboxError> {
        let keys: Vec<rusqlite::types::Value> =
            msg_ids.iter().map(|id| id.to_string().into()).collect();
        self.delete_returning(
            "DELETE FROM outbox WHERE msg_id = ?1 RETURNING id, length(payload)",
            keys,
        )
    }

    fn size(&mut self) -> Result<(u64, u64), OutboxError> {
        Ok((self.count, self.bytes))
    }

    fn count_drops(&mut self, priority: Priority, n: u64) -> Result<(), OutboxError> {
        self.conn
            .execute(
                "INSERT INTO outbox_drops (priority, count) VALUES (?1, ?2)
                 ON CONFLICT (priority) DO UPDATE SET count = count + excluded.count",
                params![priority as i64, n as i64],
            )
            .map_err(self.err())?;
        Ok(())
    }

    fn drops(&mut self) -> Result<DropCounts, OutboxError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT priority, count FROM outbox_drops")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
            .map_err(self.err())?;
        let mut counts = DropCounts::default();
        for row in rows {
            let (priority, n) = row.map_err(self.err())?;
            add_drop(&mut counts, Priority::from_i64(priority), n.max(0) as u64);
        }
        Ok(counts)
    }

    fn next_sequence(&mut self, name: &str) -> Result<u64, OutboxError> {
        self.conn
            .query_row(
                "INSERT INTO sequences (name, value) VALUES (?1, 1)
                 ON CONFLICT (name) DO UPDATE SET value = value + 1
                 RETURNING value",
                params![name],
                |r| r.get::<_, i64>(0),
            )
            .map(|v| v as u64)
            .map_err(self.err())
    }
}

/// An outbox in memory, for tests and for agents that accept losing data on restart.
#[derive(Debug, Default)]
pub struct MemoryOutbox {
    entries: BTreeMap<u64, OutboxEntry>,
    next_id: u64,
    drops: DropCounts,
    sequences: BTreeMap<String, u64>,
}

impl OutboxStore for MemoryOutbox {
    fn insert(&mut self, e: NewEntry<'_>) -> Result<u64, OutboxError> {
        self.next_id += 1;
        let entry = OutboxEntry {
            id: self.next_id,
            topic: e.topic.to_string(),
            msg_id: e.msg_id.to_string(),
            priority: e.priority,
            payload: e.payload.to_vec(),
        };
        self.entries.insert(entry.id, entry);
        Ok(self.next_id)
    }

    fn after(&mut self, after: u64, limit: usize) -> Result<Vec<OutboxEntry>, OutboxError> {
        Ok(self
            .entries
            .range(after + 1..)
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect())
    }

    fn eviction_candidates(
        &mut self,
        max: Priority,
        limit: usize,
    ) -> Result<Vec<Victim>, OutboxError> {
        let mut all: Vec<Victim> = self
            .entries
            .values()
            .filter(|e| e.priority <= max)
            .map(|e| (e.id, e.priority, e.payload.len() as u64))
            .collect();
        all.sort_by_key(|&(id, priority, _)| (priority, id));
        all.truncate(limit);
        Ok(all)
    }

    fn remove(&mut self, ids: &[u64]) -> Result<(), OutboxError> {
        for id in ids {
            self.entries.remove(id);
        }
        Ok(())
    }

    fn remove_by_msg_id(&mut self, msg_ids: &[&str]) -> Result<Vec<u64>, OutboxError> {
        let ids: Vec<u64> = self
            .entries
            .values()
            .filter(|e| msg_ids.contains(&e.msg_id.as_str()))
            .map(|e| e.id)
            .collect();
        self.remove(&ids)?;
        Ok(ids)
    }

    fn size(&mut self) -> Result<(u64, u64), OutboxError> {
        Ok((
            self.entries.len() as u64,
            self.entries.values().map(|e| e.payload.len() as u64).sum(),
        ))
    }

    fn count_drops(&mut self, priority: Priority, n: u64) -> Result<(), OutboxError> {
        add_drop(&mut self.drops, priority, n);
        Ok(())
    }

    fn drops(&mut self) -> Result<DropCounts, OutboxError> {
        Ok(self.drops)
    }

    fn next_sequence(&mut self, name: &str) -> Result<u64, OutboxError> {
        let v = self.sequences.entry(name.to_string()).or_default();
        *v += 1;
        Ok(*v)
    }
}

/// What became of a message handed to [`Outbox::enqueue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued under this outbox id; `evicted` older entries were dropped to make room.
    Queued { id: u64, evicted: u64 },
    /// Not queued: everything that could make room has a higher priority. Counted.
    Dropped,
}

/// A shared handle on an outbox store that keeps it within its byte budget and wakes the
/// link when an entry is queued.
#[derive(Clone)]
pub struct Outbox {
    store: Arc<Mutex<Box<dyn OutboxStore>>>,
    budget_bytes: u64,
    queued: Arc<Notify>,
}

impl Outbox {
    pub fn new(store: impl OutboxStore + 'static, budget_bytes: u64) -> Self {
        Outbox {
            store: Arc::new(Mutex::new(Box::new(store))),
            budget_bytes,
            queued: Arc::new(Notify::new()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut dyn OutboxStore) -> T) -> T {
        // A panic while holding the lock cannot leave a SQLite transaction half-done.
        let mut guard = self.store.lock().unwrap_or_else(|p| p.into_inner());
        f(guard.as_mut())
    }

    /// Queues a message durably, making room within the budget, and wakes the sender.
    pub fn enqueue(&self, entry: NewEntry<'_>) -> Result<Enqueued, OutboxError> {
        let size = entry.payload.len() as u64;
        let budget = self.budget_bytes;
        let outcome = self.with(|s| {
            if size > budget {
                s.count_drops(entry.priority, 1)?;
                return Ok(Enqueued::Dropped);
            }
            let (_, used) = s.size()?;
            let victims =
                match choose_victims(s, entry.priority, (used + size).saturating_sub(budget))? {
                    Some(victims) => victims,
                    None => {
                        s.count_drops(entry.priority, 1)?;
                        return Ok(Enqueued::Dropped);
                    }
                };
            if !victims.is_empty() {
                let ids: Vec<u64> = victims.iter().map(|v| v.0).collect();
                s.remove(&ids)?;
                for priority in [Priority::Samples, Priority::Telemetry, Priority::Control] {
                    let n = victims.iter().filter(|v| v.1 == priority).count() as u64;
                    if n > 0 {
                        s.count_drops(priority, n)?;
                    }
                }
            }
            let id = s.insert(entry)?;
            Ok(Enqueued::Queued {
                id,
                evicted: victims.len() as u64,
            })
        })?;
        if matches!(outcome, Enqueued::Queued { .. }) {
            self.queued.notify_one();
        }
        Ok(outcome)
    }

    pub fn after(&self, after: u64, limit: usize) -> Result<Vec<OutboxEntry>, OutboxError> {
        self.with(|s| s.after(after, limit))
    }

    /// Removes entries the controller has confirmed (or refused for good), by message id.
    /// Returns the outbox ids removed.
    pub fn confirm(&self, msg_ids: &[&str]) -> Result<Vec<u64>, OutboxError> {
        self.with(|s| s.remove_by_msg_id(msg_ids))
    }

    /// Drops entries that can never be sent (too large for a packet), counting them.
    pub fn discard(&self, entries: &[(u64, Priority)]) -> Result<(), OutboxError> {
        self.with(|s| {
            let ids: Vec<u64> = entries.iter().map(|e| e.0).collect();
            s.remove(&ids)?;
            for (_, priority) in entries {
                s.count_drops(*priority, 1)?;
            }
            Ok(())
        })
    }

    pub fn status(&self) -> Result<OutboxStatus, OutboxError> {
        self.with(|s| {
            let (entries, bytes) = s.size()?;
            Ok(OutboxStatus {
                entries,
                bytes,
                budget_bytes: self.budget_bytes,
                dropped: s.drops()?,
            })
        })
    }

    pub fn next_sequence(&self, name: &str) -> Result<u64, OutboxError> {
        self.with(|s| s.next_sequence(name))
    }

    /// Resolves when something was queued since the last call.
    pub async fn queued(&self) {
        self.queued.notified().await
    }
}

/// The entries to drop so that `needed` bytes are freed, taking none above `max`; `None`
/// when even dropping all of those would not free enough. Nothing is deleted here, so a
/// message that cannot fit leaves the outbox as it was.
fn choose_victims(
    s: &mut dyn OutboxStore,
    max: Priority,
    needed: u64,
) -> Result<Option<Vec<Victim>>, OutboxError> {
    if needed == 0 {
        return Ok(Some(Vec::new()));
    }
    let mut limit = 8;
    loop {
        let candidates = s.eviction_candidates(max, limit)?;
        let mut freed = 0;
        for (i, victim) in candidates.iter().enumerate() {
            freed += victim.2;
            if freed >= needed {
                return Ok(Some(candidates[..=i].to_vec()));
            }
        }
        if candidates.len() < limit {
            return Ok(None);
        }
        limit *= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(
        topic: &'a str,
        msg_id: &'a str,
        priority: Priority,
        payload: &'a [u8],
    ) -> NewEntry<'a> {
        NewEntry {
            topic,
            msg_id,
            priority,
            payload,
        }
    }

    /// One suite for every store.
    fn exercise(store: &mut dyn OutboxStore) {
        assert_eq!(store.size().unwrap(), (0, 0));
        let a = store
            .insert(entry("t/a", "m-a", Priority::Telemetry, b"1"))
            .unwrap();
        let b = store
            .insert(entry("t/b", "m-b", Priority::Control, b"22"))
            .unwrap();
        let c = store
            .insert(entry("t/c", "m-c", Priority::Samples, b"333"))
            .unwrap();
        assert!(a < b && b < c);
        let all = store.after(0, 10).unwrap();
        assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), [a, b, c]);
        assert_eq!(all[1].topic, "t/b");
        assert_eq!(all[1].msg_id, "m-b");
        assert_eq!(all[1].priority, Priority::Control);
        assert_eq!(all[1].payload, b"22");
        assert_eq!(store.after(a, 1).unwrap()[0].id, b);
        assert_eq!(store.size().unwrap(), (3, 6));
        assert_eq!(
            store.eviction_candidates(Priority::Control, 10).unwrap(),
            [
                (c, Priority::Samples, 3),
                (a, Priority::Telemetry, 1),
                (b, Priority::Control, 2)
            ]
        );
        assert_eq!(
            store.eviction_candidates(Priority::Telemetry, 1).unwrap(),
            [(c, Priority::Samples, 3)]
        );
        assert_eq!(store.remove_by_msg_id(&["m-b", "unknown"]).unwrap(), [b]);
        store.remove(&[b, c]).unwrap();
        assert_eq!(store.size().unwrap(), (1, 1));
        let d = store
            .insert(entry("t/d", "m-d", Priority::Telemetry, b"4"))
            .unwrap();
        assert!(d > c, "ids are never reused");
        store.count_drops(Priority::Telemetry, 2).unwrap();
        store.count_drops(Priority::Control, 1).unwrap();
        store.count_drops(Priority::Telemetry, 1).unwrap();
        let drops = store.drops().unwrap();
        assert_eq!((drops.control, drops.telemetry, drops.samples), (1, 3, 0));
        assert_eq!(store.next_sequence("w").unwrap(), 1);
        assert_eq!(store.next_sequence("w").unwrap(), 2);
        assert_eq!(store.next_sequence("other").unwrap(), 1);
    }

    #[test]
    fn memory_store_passes_the_suite() {
        exercise(&mut MemoryOutbox::default());
    }

    #[test]
    fn sqlite_store_passes_the_suite_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.sqlite");
        exercise(&mut SqliteOutbox::open(&path).unwrap());
        let mut again = SqliteOutbox::open(&path).unwrap();
        assert_eq!(again.size().unwrap(), (2, 2));
        assert_eq!(again.drops().unwrap().telemetry, 3);
        assert_eq!(again.next_sequence("w").unwrap(), 3, "sequences survive");
        let ids: Vec<u64> = again.after(0, 10).unwrap().iter().map(|e| e.id).collect();
        let next = again
            .insert(entry("t/e", "m-e", Priority::Control, b"5"))
            .unwrap();
        assert!(
            ids.iter().all(|&i| i < next),
            "AUTOINCREMENT never reuses an id"
        );
    }

    #[test]
    fn a_first_generation_outbox_is_migrated_with_its_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.sqlite");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL);
             INSERT INTO outbox (topic, payload) VALUES ('r/v1/devices/d/deployment', CAST('{\"v\":1,\"msg_id\":\"old-1\"}' AS BLOB));
             INSERT INTO outbox (topic, payload) VALUES ('r/v1/devices/d/telemetry', CAST('{\"v\":1,\"msg_id\":\"old-2\"}' AS BLOB));",
        )
        .unwrap();
        drop(conn);
        let mut store = SqliteOutbox::open(&path).unwrap();
        let entries = store.after(0, 10).unwrap();
        assert_eq!(entries[0].msg_id, "old-1");
        assert_eq!(entries[0].priority, Priority::Control);
        assert_eq!(entries[1].msg_id, "old-2");
        assert_eq!(entries[1].priority, Priority::Telemetry);
        assert_eq!(store.remove_by_msg_id(&["old-2"]).unwrap().len(), 1);
    }

    fn queue(outbox: &Outbox, msg_id: &str, priority: Priority, bytes: usize) -> Enqueued {
        outbox
            .enqueue(entry("t", msg_id, priority, &vec![b'x'; bytes]))
            .unwrap()
    }

    fn queued_ids(outbox: &Outbox) -> Vec<String> {
        outbox
            .after(0, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.msg_id)
            .collect()
    }

    #[test]
    fn a_full_outbox_drops_the_oldest_of_the_lowest_priority_and_counts_it() {
        let outbox = Outbox::new(MemoryOutbox::default(), 100);
        assert!(matches!(
            queue(&outbox, "c1", Priority::Control, 30),
            Enqueued::Queued { evicted: 0, .. }
        ));
        queue(&outbox, "t1", Priority::Telemetry, 30);
        queue(&outbox, "s1", Priority::Samples, 20);
        queue(&outbox, "t2", Priority::Telemetry, 20);
        // 100 of 100 bytes used. A telemetry message evicts the sample first, then the
        // oldest telemetry.
        assert!(matches!(
            queue(&outbox, "t3", Priority::Telemetry, 40),
            Enqueued::Queued { evicted: 2, .. }
        ));
        assert_eq!(queued_ids(&outbox), ["c1", "t2", "t3"]);
        // A sample cannot push out anything of higher priority: it is dropped itself.
        assert_eq!(
            queue(&outbox, "s2", Priority::Samples, 20),
            Enqueued::Dropped
        );
        // A control message pushes out all telemetry before any control message.
        queue(&outbox, "c2", Priority::Control, 60);
        assert_eq!(queued_ids(&outbox), ["c1", "c2"]);
        // Then the oldest control message makes room for the newest.
        queue(&outbox, "c3", Priority::Control, 20);
        assert_eq!(queued_ids(&outbox), ["c2", "c3"]);
        assert_eq!(
            queue(&outbox, "huge", Priority::Control, 101),
            Enqueued::Dropped
        );
        let status = outbox.status().unwrap();
        assert_eq!(
            (status.entries, status.bytes, status.budget_bytes),
            (2, 80, 100)
        );
        assert_eq!(
            (
                status.dropped.control,
                status.dropped.telemetry,
                status.dropped.samples
            ),
            (2, 3, 2)
        );
        assert_eq!(
            queued_ids(&outbox),
            ["c2", "c3"],
            "a refused message changed nothing"
        );
    }

    #[test]
    fn confirmed_messages_leave_by_message_id() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::new(
            SqliteOutbox::open(&dir.path().join("o.sqlite")).unwrap(),
            1000,
        );
        queue(&outbox, "a", Priority::Telemetry, 10);
        queue(&outbox, "b", Priority::Telemetry, 10);
        assert_eq!(outbox.confirm(&["a", "zzz"]).unwrap().len(), 1);
        assert_eq!(queued_ids(&outbox), ["b"]);
        assert_eq!(outbox.status().unwrap().bytes, 10);
    }
}
