//! Input sources: where the rows the agent infers on come from.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand_distr::{Distribution, Normal};

use crate::config::{SourceConfig, SourceKind};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path} line {line}, column `{column}`: `{value}` is not a number")]
    BadCell {
        path: String,
        line: u64,
        column: String,
        value: String,
    },
    #[error("{path} has no data rows")]
    Empty { path: String },
    #[error("a csv source needs a path")]
    NoPath,
}

/// A stream of input rows with named columns.
pub trait InputSource: Send {
    /// Column names, in the order of the values `next_row` returns.
    fn columns(&self) -> &[String];
    /// The next row, or `None` when the source is exhausted.
    fn next_row(&mut self) -> Option<Vec<f32>>;
    /// The ground truth of the row `next_row` returned last, when the source knows it
    /// (it is then counted as feedback).
    fn label(&self) -> Option<usize> {
        None
    }
}

/// Builds the source a config describes.
pub fn from_config(config: &SourceConfig) -> Result<Box<dyn InputSource>, SourceError> {
    Ok(match config.kind {
        SourceKind::Synthetic => Box::new(
            VibrationGenerator::new(config.seed, ShiftControl::default())
                .with_labels(config.labels),
        ),
        SourceKind::Csv => Box::new(CsvReplay::open(
            config.path.as_deref().ok_or(SourceError::NoPath)?,
            config.repeat,
        )?),
        SourceKind::Api => Box::new(NoSource),
    })
}

/// No inputs of its own: the agent infers only what the local API sends.
#[derive(Debug)]
pub struct NoSource;

impl InputSource for NoSource {
    fn columns(&self) -> &[String] {
        &[]
    }

    fn next_row(&mut self) -> Option<Vec<f32>> {
        None
    }
}

/// How far the synthetic machine has drifted from its original regime: 0 is the regime the
/// example model v1 was trained on, 1 the shifted regime model v2 was trained on.
/// Shared between the generator and whoever steers it (the demo).
#[derive(Debug, Clone, Default)]
pub struct ShiftControl(Arc<AtomicU32>);

impl ShiftControl {
    pub fn set(&self, intensity: f32) {
        self.0
            .store(intensity.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }

    pub fn get(&self) -> f32 {
        f32::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// A simulated vibration sensor on a machine that is normal most of the time and faulty
/// sometimes. Keep these distributions in step with
/// `controller/assets/vibration/make_model.py`, which trains the example models on them.
pub struct VibrationGenerator {
    rng: SmallRng,
    shift: ShiftControl,
    columns: Vec<String>,
    /// Whether `label` gives the ground truth, and the last row's.
    labels: bool,
    last_label: Option<usize>,
}

pub const VIBRATION_FEATURES: [&str; 4] = ["rms", "peak", "kurtosis", "temperature"];
const FAULT_RATE: f64 = 0.1;
const SHIFT_TEMPERATURE: f64 = 12.0;
const SHIFT_RMS_FACTOR: f64 = 1.4;

impl VibrationGenerator {
    pub fn new(seed: u64, shift: ShiftControl) -> Self {
        VibrationGenerator {
            rng: SmallRng::seed_from_u64(seed),
            shift,
            columns: VIBRATION_FEATURES.iter().map(|s| s.to_string()).collect(),
            labels: false,
            last_label: None,
        }
    }

    /// Gives each row's ground truth as feedback (`label`), as inspections would.
    pub fn with_labels(mut self, labels: bool) -> Self {
        self.labels = labels;
        self
    }

    fn normal(&mut self, mean: f64, std: f64) -> f64 {
        Normal::new(mean, std)
            .expect("constant, valid parameters")
            .sample(&mut self.rng)
    }
}

impl InputSource for VibrationGenerator {
    fn columns(&self) -> &[String] {
        &self.columns
    }

    fn next_row(&mut self) -> Option<Vec<f32>> {
        let (row, label) = self.labelled_row();
        self.last_label = self.labels.then_some(label);
        Some(row)
    }

    fn label(&self) -> Option<usize> {
        self.last_label
    }
}

impl VibrationGenerator {
    /// The next row with its ground truth: 1 for a faulty machine, 0 for a normal one.
    /// Simulations and tests use the label to measure accuracy; devices never see it.
    pub fn labelled_row(&mut self) -> (Vec<f32>, usize) {
        let fault = rand::Rng::random_bool(&mut self.rng, FAULT_RATE);
        let (rms, crest, kurtosis, temperature) = if fault {
            (
                self.normal(1.8, 0.3),
                self.normal(4.5, 0.5),
                self.normal(6.0, 1.2),
                self.normal(55.0, 4.0),
            )
        } else {
            (
                self.normal(1.0, 0.15),
                self.normal(3.0, 0.3),
                self.normal(3.0, 0.4),
                self.normal(45.0, 3.0),
            )
        };
        let s = f64::from(self.shift.get());
        let rms = rms * (1.0 + (SHIFT_RMS_FACTOR - 1.0) * s);
        let temperature = temperature + SHIFT_TEMPERATURE * s;
        (
            vec![
                rms as f32,
                (rms * crest) as f32,
                kurtosis as f32,
                temperature as f32,
            ],
            usize::from(fault),
        )
    }
}

/// Replays the rows of a CSV file with a header line. Empty cells and `nan` read as NaN.
pub struct CsvReplay {
    columns: Vec<String>,
    rows: Vec<Vec<f32>>,
    next: usize,
    repeat: bool,
}

impl CsvReplay {
    pub fn open(path: &Path, repeat: bool) -> Result<Self, SourceError> {
        let (columns, rows) = read_numeric_csv(path)?;
        Ok(CsvReplay {
            columns,
            rows,
            next: 0,
            repeat,
        })
    }
}

impl InputSource for CsvReplay {
    fn columns(&self) -> &[String] {
        &self.columns
    }

    fn next_row(&mut self) -> Option<Vec<f32>> {
        if self.next == self.rows.len() {
            if !self.repeat {
                return None;
            }
            self.next = 0;
        }
        self.next += 1;
        Some(self.rows[self.next - 1].clone())
    }
}

/// Reads a CSV file of numbers with a header line: the column names and the rows.
pub fn read_numeric_csv(path: &Path) -> Result<(Vec<String>, Vec<Vec<f32>>), SourceError> {
    let shown = path.display().to_string();
    let read_err = |e: csv::Error| SourceError::Read {
        path: shown.clone(),
        reason: e.to_string(),
    };
    let mut reader = csv::Reader::from_path(path).map_err(read_err)?;
    let columns: Vec<String> = reader
        .headers()
        .map_err(read_err)?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(read_err)?;
        let line = record.position().map_or(0, |p| p.line());
        let row = record
            .iter()
            .zip(&columns)
            .map(|(cell, column)| {
                parse_cell(cell).ok_or_else(|| SourceError::BadCell {
                    path: shown.clone(),
                    line,
                    column: column.clone(),
                    value: cell.chars().take(40).collect(),
                })
            })
            .collect::<Result<Vec<f32>, _>>()?;
        rows.push(row);
    }
    if rows.is_empty() {
        return Err(SourceError::Empty { path: shown });
    }
    Ok((columns, rows))
}

fn parse_cell(cell: &str) -> Option<f32> {
    let cell = cell.trim();
    if cell.is_empty() || cell.eq_ignore_ascii_case("nan") {
        return Some(f32::NAN);
    }
    cell.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_deterministic_and_the_shift_moves_it() {
        let mut a = VibrationGenerator::new(3, ShiftControl::default());
        let mut b = VibrationGenerator::new(3, ShiftControl::default());
        assert_eq!(a.next_row(), b.next_row());
        let shift = ShiftControl::default();
        let mut g = VibrationGenerator::new(4, shift.clone());
        let mean_temp = |g: &mut VibrationGenerator| {
            (0..2000)
                .map(|_| f64::from(g.next_row().unwrap()[3]))
                .sum::<f64>()
                / 2000.0
        };
        let before = mean_temp(&mut g);
        shift.set(1.0);
        let after = mean_temp(&mut g);
        assert!(
            (after - before - SHIFT_TEMPERATURE).abs() < 1.0,
            "{before} → {after}"
        );
    }

    #[test]
    fn csv_replay_reads_numbers_nans_and_loops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.csv");
        std::fs::write(&path, "a, b\n1,2\n3,\n").unwrap();
        let mut r = CsvReplay::open(&path, true).unwrap();
        assert_eq!(r.columns(), ["a", "b"]);
        assert_eq!(r.next_row(), Some(vec![1.0, 2.0]));
        let second = r.next_row().unwrap();
        assert!(second[1].is_nan());
        assert_eq!(r.next_row(), Some(vec![1.0, 2.0]));
        let mut once = CsvReplay::open(&path, false).unwrap();
        assert!(once.next_row().is_some() && once.next_row().is_some());
        assert_eq!(once.next_row(), None);
    }

    #[test]
    fn csv_errors_name_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.csv");
        std::fs::write(&path, "a,b\n1,2\n3,zz\n").unwrap();
        let err = CsvReplay::open(&path, true).err().unwrap().to_string();
        assert!(
            err.contains("line 3") && err.contains("`b`") && err.contains("zz"),
            "{err}"
        );
        std::fs::write(&path, "a,b\n").unwrap();
        assert!(matches!(
            CsvReplay::open(&path, true),
            Err(SourceError::Empty { .. })
        ));
        std::fs::write(&path, "a,b\n1\n").unwrap();
        assert!(
            CsvReplay::open(&path, true).is_err(),
            "ragged rows are refused"
        );
    }
}
