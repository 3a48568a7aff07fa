//! The outbox: every message the agent sends is written here first and removed only when
//! the broker has acknowledged it (PUBACK), so a dead broker, a lost connection or a killed
//! agent loses nothing that was produced.
//!
//! [`OutboxStore`] is the storage seam; [`SqliteOutbox`] is the durable store used on
//! devices and [`MemoryOutbox`] the in-memory one for tests. [`Outbox`] is the cheap,
//! cloneable handle the rest of the agent uses; it wakes the MQTT link when something new
//! is queued.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::Notify;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

/// One queued message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Increases with every entry; the send order.
    pub id: u64,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// Storage of queued messages, oldest first.
pub trait OutboxStore: Send {
    fn push(&mut self, topic: &str, payload: &[u8]) -> Result<u64, OutboxError>;
    /// Up to `limit` entries with an id above `after`, in id order.
    fn after(&mut self, after: u64, limit: usize) -> Result<Vec<OutboxEntry>, OutboxError>;
    fn remove(&mut self, id: u64) -> Result<(), OutboxError>;
    /// Number of queued entries.
    fn count(&mut self) -> Result<u64, OutboxError>;
}

/// The durable outbox: a SQLite database in WAL mode.
pub struct SqliteOutbox {
    conn: Connection,
    path: PathBuf,
}

impl SqliteOutbox {
    pub fn open(path: &Path) -> Result<Self, OutboxError> {
        let err = |source| OutboxError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        // NORMAL in WAL mode survives a process crash; a power cut may lose the last
        // transactions, which were then never acknowledged to anybody either.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS outbox (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                topic TEXT NOT NULL,
                payload BLOB NOT NULL
            );",
        )
        .map_err(err)?;
        Ok(SqliteOutbox {
            conn,
            path: path.to_path_buf(),
        })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> OutboxError + '_ {
        |source| OutboxError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }
}

impl OutboxStore for SqliteOutbox {
    fn push(&mut self, topic: &str, payload: &[u8]) -> Result<u64, OutboxError> {
        self.conn
            .execute(
                "INSERT INTO outbox (topic, payload) VALUES (?1, ?2)",
                params![topic, payload],
            )
            .map_err(self.err())?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    fn after(&mut self, after: u64, limit: usize) -> Result<Vec<OutboxEntry>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, topic, payload FROM outbox WHERE id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map(params![after as i64, limit as i64], |r| {
                Ok(OutboxEntry {
                    id: r.get::<_, i64>(0)? as u64,
                    topic: r.get(1)?,
                    payload: r.get(2)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    fn remove(&mut self, id: u64) -> Result<(), OutboxError> {
        self.conn
            .execute("DELETE FROM outbox WHERE id = ?1", params![id as i64])
            .map_err(self.err())?;
        Ok(())
    }

    fn count(&mut self) -> Result<u64, OutboxError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0))
            .optional()
            .map_err(self.err())
            .map(|n| n.unwrap_or(0) as u64)
    }
}

/// An outbox in memory, for tests and for agents that accept losing data on restart.
#[derive(Debug, Default)]
pub struct MemoryOutbox {
    entries: BTreeMap<u64, OutboxEntry>,
    next_id: u64,
}

impl OutboxStore for MemoryOutbox {
    fn push(&mut self, topic: &str, payload: &[u8]) -> Result<u64, OutboxError> {
        self.next_id += 1;
        let entry = OutboxEntry {
            id: self.next_id,
            topic: topic.to_string(),
            payload: payload.to_vec(),
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

    fn remove(&mut self, id: u64) -> Result<(), OutboxError> {
        self.entries.remove(&id);
        Ok(())
    }

    fn count(&mut self) -> Result<u64, OutboxError> {
        Ok(self.entries.len() as u64)
    }
}

/// A shared handle on an outbox store that wakes the link when an entry is queued.
#[derive(Clone)]
pub struct Outbox {
    store: Arc<Mutex<Box<dyn OutboxStore>>>,
    queued: Arc<Notify>,
}

impl Outbox {
    pub fn new(store: impl OutboxStore + 'static) -> Self {
        Outbox {
            store: Arc::new(Mutex::new(Box::new(store))),
            queued: Arc::new(Notify::new()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut dyn OutboxStore) -> T) -> T {
        // A panic while holding the lock cannot leave a SQLite transaction half-done.
        let mut guard = self.store.lock().unwrap_or_else(|p| p.into_inner());
        f(guard.as_mut())
    }

    /// Queues a message durably and wakes the sender.
    pub fn enqueue(&self, topic: &str, payload: &[u8]) -> Result<u64, OutboxError> {
        let id = self.with(|s| s.push(topic, payload))?;
        self.queued.notify_one();
        Ok(id)
    }

    pub fn after(&self, after: u64, limit: usize) -> Result<Vec<OutboxEntry>, OutboxError> {
        self.with(|s| s.after(after, limit))
    }

    pub fn acknowledge(&self, id: u64) -> Result<(), OutboxError> {
        self.with(|s| s.remove(id))
    }

    /// Resolves when something was queued since the last call.
    pub async fn queued(&self) {
        self.queued.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One suite for every store.
    fn exercise(store: &mut dyn OutboxStore) {
        assert_eq!(store.count().unwrap(), 0);
        let a = store.push("t/a", b"1").unwrap();
        let b = store.push("t/b", b"2").unwrap();
        let c = store.push("t/c", b"3").unwrap();
        assert!(a < b && b < c);
        let all = store.after(0, 10).unwrap();
        assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), [a, b, c]);
        assert_eq!(all[1].topic, "t/b");
        assert_eq!(all[1].payload, b"2");
        assert_eq!(store.after(a, 1).unwrap()[0].id, b);
        store.remove(b).unwrap();
        store.remove(b).unwrap();
        assert_eq!(store.after(0, 10).unwrap().len(), 2);
        assert_eq!(store.count().unwrap(), 2);
        let d = store.push("t/d", b"4").unwrap();
        assert!(d > c, "ids are never reused");
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
        assert_eq!(again.count().unwrap(), 3);
        let ids: Vec<u64> = again.after(0, 10).unwrap().iter().map(|e| e.id).collect();
        let next = again.push("t/e", b"5").unwrap();
        assert!(
            ids.iter().all(|&i| i < next),
            "AUTOINCREMENT never reuses an id"
        );
    }
}
