//! A uniform sample of the inputs the served model has seen, with what it predicted and
//! any ground truth that came back, kept in SQLite within a byte budget: the data a
//! retraining needs from the field.
//!
//! Reservoir sampling (Vitter's algorithm R): the first `capacity` inputs are kept; the
//! i-th after them replaces a random kept one with probability `capacity / i`, so that at
//! any time every input seen has the same chance to be in the sample. The capacity is the
//! byte budget over the size of one stored row. The sample belongs to one model version: a
//! new version starts a new one (its inputs may be other features, and a retraining wants
//! the traffic the current model sees).
//!
//! A table model's sample exports as CSV; a tensor model's (images, sequences) as an NPY
//! array of records (see [`edgeloop_shared::npy`]). Where the caller cannot afford to hand
//! every input over (a tensor crossing from the API's tasks to the agent's loop), it thins
//! them first: it attaches an input with at least the [`Reservoir::chance`] that the next
//! one is kept, counts the others with [`Reservoir::pass`], and the reservoir keeps an
//! attached one with the rest of that chance, so every input still has the same chance.

use std::path::{Path, PathBuf};

use edgeloop_shared::protocol::ModelRef;
use rand::{Rng, SeedableRng, rngs::SmallRng};
use rusqlite::{Connection, OptionalExtension, params};

/// A [`Reservoir::chance`] shared with the tasks that hand inputs over, as an f64's bits.
#[derive(Debug)]
pub struct SharedChance(std::sync::atomic::AtomicU64);

impl Default for SharedChance {
    /// Every input, until the reservoir says otherwise.
    fn default() -> Self {
        SharedChance(std::sync::atomic::AtomicU64::new(1f64.to_bits()))
    }
}

impl SharedChance {
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }

    pub fn set(&self, chance: f64) {
        self.0
            .store(chance.to_bits(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether to hand the next input over: true with the chance.
    pub fn draw(&self) -> Option<f64> {
        let chance = self.get();
        (chance >= 1.0 || (chance > 0.0 && rand::random::<f64>() < chance)).then_some(chance)
    }
}

/// The reservoir's file in the agent's state directory.
pub const FILE: &str = "reservoir.sqlite";

/// Writes are batched: kept inputs wait in memory until this many are pending, and the
/// count of inputs seen is written with them or after four times this many inputs. An
/// input, kept or not, then costs no transaction of its own. A crash loses at most the
/// pending rows and part of the count (the sample is a statistic: the next inputs are then
/// slightly likelier to be kept). Labelling, reading and dropping the reservoir write first.
const WRITE_EVERY: u64 = 64;

/// Bytes counted per stored row besides its values: ids, prediction, label, time, and
/// SQLite's own overhead, roughly.
const ROW_OVERHEAD_BYTES: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum ReservoirError {
    #[error("reservoir {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot write the sample as CSV: {0}")]
    Csv(String),
    #[error("cannot write the sample as NPY: {0}")]
    Npy(String),
}

/// The model a sample belongs to, with its feature names, and for a tensor model the
/// shape of one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampledModel {
    pub model: ModelRef,
    pub features: Vec<String>,
    /// A tensor model's input shape without the batch (`[3, 32, 32]`); None for a table.
    pub shape: Option<Vec<usize>>,
}

/// One input offered to the sample.
#[derive(Debug, Clone, Copy)]
pub struct Offered<'a> {
    /// Names the input for a later label (the local API's request id and row).
    pub request_key: Option<&'a str>,
    pub values: &'a [f32],
    /// What the model predicted: a class index, or a regression's value.
    pub predicted: Option<f64>,
    /// The ground truth, when already known.
    pub label: Option<f64>,
    pub seen_ms: u64,
    /// The chance with which the caller handed this input over (1: every input is).
    pub chance: f64,
}

/// One kept input.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub values: Vec<f32>,
    /// What the model predicted: a class index, or a regression's value.
    pub predicted: Option<f64>,
    /// The ground truth, as a class index or a true value.
    pub label: Option<f64>,
    pub seen_ms: u64,
}

pub use edgeloop_shared::protocol::SampleFormat;

/// The sample as one file, for an upload.
#[derive(Debug, Clone, PartialEq)]
pub struct Export {
    pub model: Option<ModelRef>,
    /// Inputs in the file.
    pub rows: u64,
    pub format: SampleFormat,
    pub bytes: Vec<u8>,
}

/// Where the sample stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReservoirStatus {
    pub model: Option<ModelRef>,
    /// Inputs offered since the model's sample started.
    pub seen: u64,
    pub kept: u64,
    pub capacity: u64,
    pub labelled: u64,
}

pub struct Reservoir {
    conn: Connection,
    path: PathBuf,
    budget_bytes: u64,
    rng: SmallRng,
    /// `reservoir_state`, kept here so that an input costs no read; `seen` may be ahead of
    /// the committed one by `unsaved`.
    sampling: Option<Sampling>,
    unsaved: u64,
    /// Kept inputs not written yet, in the order they were kept.
    pending: Vec<PendingRow>,
}

/// A kept input waiting for the next write.
#[derive(Debug)]
struct PendingRow {
    slot: u64,
    request_key: Option<String>,
    seen_ms: u64,
    predicted: Option<f64>,
    label: Option<f64>,
    values: Vec<u8>,
}

/// Whose sample the reservoir holds, how many inputs it has seen and how many it keeps.
#[derive(Debug, Clone)]
struct Sampling {
    model: ModelRef,
    seen: u64,
    capacity: u64,
}

impl Reservoir {
    /// Opens (creating if needed) the reservoir at `path`, holding at most about
    /// `budget_bytes` of samples.
    pub fn open(path: &Path, budget_bytes: u64) -> Result<Self, ReservoirError> {
        let err = |source| ReservoirError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS reservoir_state (
                 id INTEGER PRIMARY KEY CHECK (id = 1),
                 model_name TEXT NOT NULL,
                 model_version INTEGER NOT NULL,
                 features TEXT NOT NULL,
                 seen INTEGER NOT NULL,
                 capacity INTEGER NOT NULL,
                 shape TEXT
             );
             CREATE TABLE IF NOT EXISTS samples (
                 slot INTEGER PRIMARY KEY,
                 request_key TEXT,
                 seen_ms INTEGER NOT NULL,
                 predicted INTEGER,
                 label INTEGER,
                 vals BLOB NOT NULL
             );
             CREATE INDEX IF NOT EXISTS samples_by_request ON samples (request_key);",
        )
        .map_err(err)?;
        // A reservoir written before tensor samples has no `shape`: its sample is a table's.
        let has_shape: bool = conn
            .query_row(
                "SELECT COUNT(*) > 0 FROM pragma_table_info('reservoir_state') WHERE name = 'shape'",
                [],
                |r| r.get(0),
            )
            .map_err(err)?;
        if !has_shape {
            conn.execute("ALTER TABLE reservoir_state ADD COLUMN shape TEXT", [])
                .map_err(err)?;
        }
        let sampling = conn
            .query_row(
                "SELECT model_name, model_version, seen, capacity FROM reservoir_state",
                [],
                |r| {
                    Ok(Sampling {
                        model: ModelRef {
                            name: r.get(0)?,
                            version: r.get::<_, i64>(1)? as u64,
                        },
                        seen: r.get::<_, i64>(2)? as u64,
                        capacity: r.get::<_, i64>(3)? as u64,
                    })
                },
            )
            .optional()
            .map_err(err)?;
        Ok(Reservoir {
            conn,
            path: path.to_path_buf(),
            budget_bytes,
            rng: SmallRng::from_rng(&mut rand::rng()),
            sampling,
            unsaved: 0,
            pending: Vec::new(),
        })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> ReservoirError + use<> {
        let path = self.path.clone();
        move |source| ReservoirError::Sqlite {
            path: path.clone(),
            source,
        }
    }

    /// Offers one input of `of`'s model.
    pub fn offer(&mut self, of: &SampledModel, input: Offered<'_>) -> Result<(), ReservoirError> {
        self.draw(of, Some(input))
    }

    /// Counts an input of `of`'s model that the caller's thinning did not hand over.
    pub fn pass(&mut self, of: &SampledModel) -> Result<(), ReservoirError> {
        self.draw(of, None)
    }

    /// The chance that the next input of `model` is kept: 1 until the sample is full (or
    /// while it belongs to another model), then its capacity over the inputs seen. It
    /// only falls while the model stays the same.
    pub fn chance(&self, model: &ModelRef) -> f64 {
        match &self.sampling {
            _ if self.budget_bytes == 0 => 0.0,
            Some(s) if s.model == *model => (s.capacity as f64 / (s.seen + 1) as f64).min(1.0),
            _ => 1.0,
        }
    }

    fn draw(
        &mut self,
        of: &SampledModel,
        input: Option<Offered<'_>>,
    ) -> Result<(), ReservoirError> {
        if self.budget_bytes == 0 {
            return Ok(());
        }
        let width = of
            .shape
            .as_ref()
            .map_or(of.features.len(), |s| s.iter().product());
        let row_bytes = width as u64 * 4 + ROW_OVERHEAD_BYTES;
        if self.sampling.as_ref().is_none_or(|s| s.model != of.model) {
            // A new model: a new sample. What waits belongs to the old one.
            self.pending.clear();
            let capacity = (self.budget_bytes / row_bytes).max(1);
            let err = self.err();
            let tx = self.conn.transaction().map_err(&err)?;
            tx.execute("DELETE FROM samples", []).map_err(&err)?;
            tx.execute(
                "INSERT OR REPLACE INTO reservoir_state (id, model_name, model_version, features, seen, capacity, shape)
                 VALUES (1, ?1, ?2, ?3, 0, ?4, ?5)",
                params![
                    of.model.name,
                    of.model.version as i64,
                    serde_json::to_string(&of.features).expect("names serialize"),
                    capacity as i64,
                    of.shape
                        .as_ref()
                        .map(|s| serde_json::to_string(s).expect("sizes serialize")),
                ],
            )
            .map_err(&err)?;
            tx.commit().map_err(&err)?;
            self.sampling = Some(Sampling {
                model: of.model.clone(),
                seen: 0,
                capacity,
            });
            self.unsaved = 0;
        }
        let sampling = self.sampling.as_mut().expect("set above");
        sampling.seen += 1;
        let (seen, capacity) = (sampling.seen, sampling.capacity);
        self.unsaved += 1;
        // Vitter's algorithm R: the seen-th input is kept with chance capacity / seen, in
        // a slot drawn uniformly; one handed over with chance c is kept with the rest of
        // it, (capacity / seen) / c.
        let slot = match input {
            None => None,
            Some(_) if seen <= capacity => Some(seen - 1),
            Some(input) if input.chance >= 1.0 => {
                let j = self.rng.random_range(0..seen);
                (j < capacity).then_some(j)
            }
            Some(input) => {
                let keep = capacity as f64 / seen as f64 / input.chance;
                (self.rng.random::<f64>() < keep).then(|| self.rng.random_range(0..capacity))
            }
        };
        if let (Some(slot), Some(input)) = (slot, input) {
            self.pending.push(PendingRow {
                slot,
                request_key: input.request_key.map(str::to_string),
                seen_ms: input.seen_ms,
                predicted: input.predicted,
                label: input.label,
                values: input.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            });
        }
        if self.pending.len() as u64 >= WRITE_EVERY || self.unsaved >= WRITE_EVERY * 4 {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the kept inputs still in memory and the count of inputs seen, in one
    /// transaction. Labelling, reading and dropping the reservoir (as the agent does when
    /// it stops) call it.
    pub fn flush(&mut self) -> Result<(), ReservoirError> {
        let Some(sampling) = self.sampling.as_ref() else {
            return Ok(());
        };
        if self.unsaved == 0 && self.pending.is_empty() {
            return Ok(());
        }
        let seen = sampling.seen;
        let err = self.err();
        let tx = self.conn.transaction().map_err(&err)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO samples (slot, request_key, seen_ms, predicted, label, vals)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(&err)?;
            for row in &self.pending {
                insert
                    .execute(params![
                        row.slot as i64,
                        row.request_key,
                        row.seen_ms as i64,
                        row.predicted,
                        row.label,
                        row.values
                    ])
                    .map_err(&err)?;
            }
        }
        tx.prepare_cached("UPDATE reservoir_state SET seen = ?1")
            .map_err(&err)?
            .execute(params![seen as i64])
            .map_err(&err)?;
        tx.commit().map_err(&err)?;
        self.pending.clear();
        self.unsaved = 0;
        Ok(())
    }

    /// Attaches a ground-truth label to the kept input named `request_key`, if it was kept.
    pub fn label(&mut self, request_key: &str, label: f64) -> Result<bool, ReservoirError> {
        let mut waiting = false;
        for row in &mut self.pending {
            if row.request_key.as_deref() == Some(request_key) {
                row.label = Some(label);
                waiting = true;
            }
        }
        let err = self.err();
        let changed = self
            .conn
            .prepare_cached("UPDATE samples SET label = ?2 WHERE request_key = ?1")
            .map_err(&err)?
            .execute(params![request_key, label])
            .map_err(&err)?;
        Ok(waiting || changed > 0)
    }

    /// The kept inputs, oldest first, the model they belong to and its feature names.
    pub fn samples(&mut self) -> Result<(Option<SampledModel>, Vec<Sample>), ReservoirError> {
        self.flush()?;
        let err = self.err();
        let model = self.model()?;
        let mut statement = self
            .conn
            .prepare("SELECT vals, predicted, label, seen_ms FROM samples ORDER BY seen_ms, slot")
            .map_err(&err)?;
        let rows = statement
            .query_map([], |r| {
                let bytes: Vec<u8> = r.get(0)?;
                Ok(Sample {
                    values: bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                    predicted: r.get(1)?,
                    label: r.get(2)?,
                    seen_ms: r.get::<_, i64>(3)? as u64,
                })
            })
            .map_err(&err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(&err)?;
        Ok((model, rows))
    }

    /// The sample as a file (CSV for a table model, NPY for a tensor model), oldest input
    /// first, of at most `max_rows` inputs and `max_bytes` bytes: when it must be cut, an
    /// evenly spaced subset of the inputs is kept, so the file still spans the whole time
    /// the sample covers. A reservoir that holds no sample yet writes an empty file as
    /// `serving`'s would be (for a tensor model an NPY of its shape), so that it merges
    /// with other devices' samples of that model.
    pub fn export(
        &mut self,
        max_rows: Option<u64>,
        max_bytes: u64,
        serving: Option<&SampledModel>,
    ) -> Result<Export, ReservoirError> {
        let (model, samples) = self.samples()?;
        let written_as = model.as_ref().or(serving);
        let format = match written_as.and_then(|m| m.shape.as_ref()) {
            Some(_) => SampleFormat::Npy,
            None => SampleFormat::Csv,
        };
        let write = |keep: usize| -> Result<Vec<u8>, ReservoirError> {
            let chosen = evenly_spaced(&samples, keep);
            write_file(written_as, &chosen)
        };
        let mut keep = samples
            .len()
            .min(max_rows.map_or(usize::MAX, |m| m as usize));
        let mut bytes = write(keep)?;
        while bytes.len() as u64 > max_bytes && keep > 0 {
            // Rows are about the same size: aim just under the limit, then step down.
            let per_row = bytes.len() as f64 / (keep as f64 + 1.0);
            let aim = ((max_bytes as f64 / per_row) as usize).saturating_sub(1);
            keep = aim.min(keep - keep.div_ceil(20));
            bytes = write(keep)?;
        }
        if bytes.len() as u64 > max_bytes {
            let message = format!(
                "even the header ({} bytes) is over the {max_bytes}-byte limit",
                bytes.len()
            );
            return Err(match format {
                SampleFormat::Csv => ReservoirError::Csv(message),
                SampleFormat::Npy => ReservoirError::Npy(message),
            });
        }
        Ok(Export {
            model: model.map(|m| m.model),
            rows: keep as u64,
            format,
            bytes,
        })
    }

    fn model(&self) -> Result<Option<SampledModel>, ReservoirError> {
        self.conn
            .query_row(
                "SELECT model_name, model_version, features, shape FROM reservoir_state",
                [],
                |r| {
                    let model = ModelRef {
                        name: r.get(0)?,
                        version: r.get::<_, i64>(1)? as u64,
                    };
                    let features: String = r.get(2)?;
                    let shape: Option<String> = r.get(3)?;
                    Ok(SampledModel {
                        model,
                        features: serde_json::from_str(&features).unwrap_or_default(),
                        shape: shape.and_then(|s| serde_json::from_str(&s).ok()),
                    })
                },
            )
            .optional()
            .map_err(self.err())
    }

    pub fn status(&mut self) -> Result<ReservoirStatus, ReservoirError> {
        self.flush()?;
        let err = self.err();
        let (seen, capacity) = self
            .sampling
            .as_ref()
            .map(|s| (s.seen, s.capacity))
            .unwrap_or_default();
        let (kept, labelled) = self
            .conn
            .query_row("SELECT COUNT(*), COUNT(label) FROM samples", [], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })
            .map_err(&err)?;
        Ok(ReservoirStatus {
            model: self.model()?.map(|m| m.model),
            seen,
            kept,
            capacity,
            labelled,
        })
    }
}

impl Drop for Reservoir {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!("reservoir: the last kept inputs and count were not written: {e}");
        }
    }
}

/// The samples of `model` as its file: CSV for a table model, NPY for a tensor model.
fn write_file(model: Option<&SampledModel>, samples: &[Sample]) -> Result<Vec<u8>, ReservoirError> {
    match model {
        Some(SampledModel {
            shape: Some(shape), ..
        }) => edgeloop_shared::npy::write_sample(
            shape,
            samples.iter().map(|s| edgeloop_shared::npy::SampleRecord {
                x: &s.values,
                predicted: s.predicted,
                label: s.label,
            }),
        )
        .map_err(ReservoirError::Npy),
        _ => {
            let features = model.map(|m| m.features.as_slice()).unwrap_or(&[]);
            let mut csv = Vec::new();
            write_csv(&mut csv, features, samples)
                .map_err(|e| ReservoirError::Csv(e.to_string()))?;
            Ok(csv)
        }
    }
}

/// `keep` of `samples`, evenly spaced, in their order.
fn evenly_spaced(samples: &[Sample], keep: usize) -> Vec<Sample> {
    if keep >= samples.len() {
        return samples.to_vec();
    }
    (0..keep)
        .map(|i| samples[i * samples.len() / keep].clone())
        .collect()
}

/// A number as written in a CSV sample: a value an f32 holds exactly (a regression's
/// prediction is the model's f32 output) is written as the shortest text that reads back as
/// that f32 (`41.37`, not `41.37000274658203`); any other as an f64.
fn shortest(v: f64) -> String {
    let narrow = v as f32;
    if f64::from(narrow) == v {
        narrow.to_string()
    } else {
        v.to_string()
    }
}

/// Writes samples as CSV: the feature names, then `predicted` and `label` (empty when
/// unknown); a NaN value is an empty field.
pub fn write_csv(
    out: impl std::io::Write,
    features: &[String],
    samples: &[Sample],
) -> Result<(), csv::Error> {
    let mut writer = csv::Writer::from_writer(out);
    let mut header: Vec<&str> = features.iter().map(String::as_str).collect();
    header.extend(["predicted", "label"]);
    writer.write_record(&header)?;
    for s in samples {
        let mut record: Vec<String> = s
            .values
            .iter()
            .map(|v| {
                if v.is_nan() {
                    String::new()
                } else {
                    v.to_string()
                }
            })
            .collect();
        record.push(s.predicted.map(shortest).unwrap_or_default());
        record.push(s.label.map(shortest).unwrap_or_default());
        writer.write_record(&record)?;
    }
    writer.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    fn model(version: u64) -> ModelRef {
        ModelRef {
            name: "m".into(),
            version,
        }
    }

    fn table(version: u64) -> SampledModel {
        SampledModel {
            model: model(version),
            features: names(),
            shape: None,
        }
    }

    fn input(
        values: &[f32],
        predicted: Option<f64>,
        label: Option<f64>,
        seen_ms: u64,
    ) -> Offered<'_> {
        Offered {
            request_key: None,
            values,
            predicted,
            label,
            seen_ms,
            chance: 1.0,
        }
    }

    #[test]
    fn an_export_is_cut_to_its_row_and_byte_limits_spanning_the_whole_sample() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Reservoir::open(&dir.path().join("r.sqlite"), 1 << 20).unwrap();
        let empty = r.export(None, 1000, None).unwrap();
        assert_eq!((empty.model, empty.rows), (None, 0));
        assert_eq!(empty.bytes, b"predicted,label\n");
        // Nothing kept yet while a model serves: an empty file as that model's would be.
        let empty = r.export(None, 1000, Some(&table(1))).unwrap();
        assert_eq!((empty.model, empty.rows), (None, 0));
        assert_eq!(empty.bytes, b"a,b,predicted,label\n");
        let images = SampledModel {
            shape: Some(vec![3, 2, 2]),
            ..table(1)
        };
        let empty = r.export(None, 1000, Some(&images)).unwrap();
        assert_eq!(
            (empty.format, empty.model, empty.rows),
            (SampleFormat::Npy, None, 0)
        );
        let file = edgeloop_shared::npy::read_sample(&empty.bytes).unwrap();
        assert_eq!((file.row_shape, file.rows), (vec![3, 2, 2], 0));
        for i in 0..1000u32 {
            let label = (i % 2 == 1).then_some(1.0);
            r.offer(
                &table(1),
                input(&[i as f32, 0.5], Some(0.0), label, u64::from(i)),
            )
            .unwrap();
        }
        let all = r.export(None, u64::MAX, None).unwrap();
        assert_eq!((all.model, all.rows), (Some(model(1)), 1000));
        let text = String::from_utf8(all.bytes.clone()).unwrap();
        assert!(
            text.starts_with("a,b,predicted,label\n0,0.5,0,\n1,0.5,0,1\n"),
            "{text:.60}"
        );

        let ten = r.export(Some(10), u64::MAX, None).unwrap();
        assert_eq!(ten.rows, 10);
        let firsts: Vec<&str> = std::str::from_utf8(&ten.bytes)
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').next().unwrap())
            .collect();
        assert_eq!(
            firsts,
            [
                "0", "100", "200", "300", "400", "500", "600", "700", "800", "900"
            ]
        );

        let small = r.export(None, 2000, None).unwrap();
        assert!(
            small.bytes.len() <= 2000 && small.bytes.len() > 1500,
            "{}",
            small.bytes.len()
        );
        assert_eq!(
            small.rows as usize,
            std::str::from_utf8(&small.bytes).unwrap().lines().count() - 1
        );
        assert!(matches!(
            r.export(None, 5, None),
            Err(ReservoirError::Csv(_))
        ));
    }

    #[test]
    fn the_sample_stays_within_its_budget_and_is_uniform_over_what_was_seen() {
        let dir = tempfile::tempdir().unwrap();
        // Rows of 2 values: 72 bytes each, so 100 rows in 7200 bytes.
        let mut r = Reservoir::open(&dir.path().join("r.sqlite"), 7200).unwrap();
        for i in 0..5000u32 {
            r.offer(
                &table(1),
                input(&[i as f32, 0.0], Some(0.0), None, u64::from(i)),
            )
            .unwrap();
        }
        let status = r.status().unwrap();
        assert_eq!(
            (status.seen, status.kept, status.capacity),
            (5000, 100, 100)
        );
        let (m, samples) = r.samples().unwrap();
        assert_eq!(m, Some(table(1)));
        // Uniform: about a fifth of the kept inputs come from each fifth of the stream.
        let mut fifths = [0u32; 5];
        for s in &samples {
            fifths[(s.values[0] as usize) / 1000] += 1;
        }
        assert!(fifths.iter().all(|&n| (5..=40).contains(&n)), "{fifths:?}");
        assert!(fifths[0] > 0, "old inputs stay in the sample");
    }

    #[test]
    fn the_count_of_inputs_seen_is_written_when_it_matters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite");
        let offer_all = |r: &mut Reservoir, from: u32, to: u32| {
            for i in from..to {
                r.offer(&table(1), input(&[i as f32, 0.0], None, None, 0))
                    .unwrap();
            }
        };
        // 100 rows of capacity; 3000 inputs, most of them not kept.
        let mut r = Reservoir::open(&path, 7200).unwrap();
        offer_all(&mut r, 0, 3000);
        drop(r);
        let mut r = Reservoir::open(&path, 7200).unwrap();
        assert_eq!(
            r.status().unwrap().seen,
            3000,
            "a clean stop writes the count"
        );
        // A crash (no drop) loses less than one write interval of the count.
        offer_all(&mut r, 3000, 6000);
        std::mem::forget(r);
        let mut r = Reservoir::open(&path, 7200).unwrap();
        let seen = r.status().unwrap().seen;
        assert!(
            (6000 - 4 * WRITE_EVERY..=6000).contains(&seen),
            "{seen} after a crash"
        );
        assert_eq!(r.status().unwrap().kept, 100);
    }

    #[test]
    fn labels_follow_their_request_and_a_new_model_starts_a_new_sample() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite");
        let mut r = Reservoir::open(&path, 1 << 20).unwrap();
        r.offer(
            &table(1),
            Offered {
                request_key: Some("req-a/0"),
                ..input(&[1.0, f32::NAN], Some(1.0), None, 5)
            },
        )
        .unwrap();
        r.offer(&table(1), input(&[2.0, 3.0], Some(0.0), Some(0.0), 6))
            .unwrap();
        assert!(r.label("req-a/0", 0.0).unwrap());
        assert!(
            !r.label("req-b/0", 1.0).unwrap(),
            "not kept, nothing to label"
        );
        drop(r);
        let mut r = Reservoir::open(&path, 1 << 20).unwrap();
        let (_, samples) = r.samples().unwrap();
        assert_eq!(samples.len(), 2, "the sample survives a restart");
        assert_eq!(
            (samples[0].predicted, samples[0].label),
            (Some(1.0), Some(0.0))
        );
        assert!(samples[0].values[1].is_nan());
        let mut csv = Vec::new();
        write_csv(&mut csv, &["a".into(), "b".into()], &samples).unwrap();
        assert_eq!(
            String::from_utf8(csv).unwrap(),
            "a,b,predicted,label\n1,,1,0\n2,3,0,0\n"
        );
        // A regression's values: its f32 prediction as written, a true value as sent.
        let values = [Sample {
            predicted: Some(f64::from(41.37f32)),
            label: Some(0.1),
            ..samples[0].clone()
        }];
        let mut csv = Vec::new();
        write_csv(&mut csv, &["a".into(), "b".into()], &values).unwrap();
        assert_eq!(
            String::from_utf8(csv).unwrap(),
            "a,b,predicted,label\n1,,41.37,0.1\n"
        );
        assert_eq!(r.status().unwrap().labelled, 2);
        // After a restart the same model's sample goes on where it was.
        r.offer(&table(1), input(&[4.0, 5.0], Some(0.0), None, 8))
            .unwrap();
        let status = r.status().unwrap();
        assert_eq!((status.seen, status.kept), (3, 3));

        r.offer(&table(2), input(&[9.0, 9.0], None, None, 7))
            .unwrap();
        let status = r.status().unwrap();
        assert_eq!(
            (status.model, status.seen, status.kept),
            (Some(model(2)), 1, 1)
        );
        let mut off = Reservoir::open(&dir.path().join("off.sqlite"), 0).unwrap();
        off.offer(&table(1), input(&[1.0], None, None, 1)).unwrap();
        assert_eq!(off.status().unwrap().kept, 0, "a budget of 0 keeps nothing");
    }

    #[test]
    fn a_tensor_models_sample_exports_as_npy_records_of_its_shape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite");
        let mut r = Reservoir::open(&path, 1 << 20).unwrap();
        let images = SampledModel {
            model: model(1),
            features: vec!["image".into()],
            shape: Some(vec![2, 2, 2]),
        };
        for i in 0..10u32 {
            let x: Vec<f32> = (0..8).map(|j| (i * 8 + j) as f32).collect();
            let label = (i % 2 == 0).then_some(1.0);
            r.offer(
                &images,
                input(&x, Some(f64::from(i % 3)), label, u64::from(i)),
            )
            .unwrap();
        }
        drop(r);
        let mut r = Reservoir::open(&path, 1 << 20).unwrap();
        assert_eq!(
            r.samples().unwrap().0,
            Some(images.clone()),
            "the shape is kept"
        );
        let export = r.export(None, u64::MAX, None).unwrap();
        assert_eq!((export.format, export.rows), (SampleFormat::Npy, 10));
        let file = edgeloop_shared::npy::read_sample(&export.bytes).unwrap();
        assert_eq!((file.row_shape, file.rows), (vec![2, 2, 2], 10));
        // The second record: its tensor, predicted class 1, no label (NaN).
        let record = &export.bytes[file.data_start + 48..file.data_start + 96];
        let x: Vec<f32> = record[..32]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(x, (8..16).map(|v| v as f32).collect::<Vec<_>>());
        assert_eq!(f64::from_le_bytes(record[32..40].try_into().unwrap()), 1.0);
        assert!(f64::from_le_bytes(record[40..].try_into().unwrap()).is_nan());
        // Cut to a byte limit, evenly spaced, still a whole file.
        let header = file.data_start as u64;
        let cut = r.export(None, header + 3 * 48, None).unwrap();
        assert_eq!((cut.rows, cut.bytes.len() as u64), (3, header + 3 * 48));
        assert_eq!(
            edgeloop_shared::npy::read_sample(&cut.bytes).unwrap().rows,
            3
        );
        assert!(matches!(
            r.export(None, 10, None),
            Err(ReservoirError::Npy(_))
        ));
        // A table model after it: CSV again.
        r.offer(&table(2), input(&[1.0, 2.0], None, None, 11))
            .unwrap();
        assert_eq!(
            r.export(None, u64::MAX, None).unwrap().format,
            SampleFormat::Csv
        );
    }

    #[test]
    fn inputs_thinned_by_the_caller_have_the_same_chance_as_every_other() {
        let dir = tempfile::tempdir().unwrap();
        // 100 rows of capacity, as above.
        let mut r = Reservoir::open(&dir.path().join("r.sqlite"), 7200).unwrap();
        let mut rng = rand::rng();
        let mut handed = 0;
        for i in 0..20_000u32 {
            let chance = r.chance(&model(1));
            if rng.random::<f64>() < chance {
                handed += 1;
                let values = [i as f32, 0.0];
                let offered = Offered {
                    chance,
                    ..input(&values, None, None, u64::from(i))
                };
                r.offer(&table(1), offered).unwrap();
            } else {
                r.pass(&table(1)).unwrap();
            }
        }
        // About 100 × (1 + ln(20 000 / 100)) ≈ 630 inputs crossed over, not 20 000.
        assert!((400..1000).contains(&handed), "{handed} handed over");
        let status = r.status().unwrap();
        assert_eq!((status.seen, status.kept), (20_000, 100));
        let (_, samples) = r.samples().unwrap();
        let mut fifths = [0u32; 5];
        for s in &samples {
            fifths[(s.values[0] as usize) / 4000] += 1;
        }
        assert!(fifths.iter().all(|&n| (5..=40).contains(&n)), "{fifths:?}");
        assert_eq!(r.chance(&model(1)), 100.0 / 20_001.0);
        assert_eq!(
            r.chance(&model(2)),
            1.0,
            "another model starts a new sample"
        );
    }

    #[test]
    fn a_reservoir_written_before_tensor_samples_opens_as_a_tables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE reservoir_state (id INTEGER PRIMARY KEY CHECK (id = 1),
                 model_name TEXT NOT NULL, model_version INTEGER NOT NULL,
                 features TEXT NOT NULL, seen INTEGER NOT NULL, capacity INTEGER NOT NULL);
             INSERT INTO reservoir_state VALUES (1, 'm', 1, '[\"a\",\"b\"]', 7, 100);",
        )
        .unwrap();
        drop(old);
        let mut r = Reservoir::open(&path, 7200).unwrap();
        assert_eq!(r.samples().unwrap().0, Some(table(1)));
        assert_eq!(r.status().unwrap().seen, 7);
    }
}
