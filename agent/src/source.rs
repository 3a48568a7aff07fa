//! Input sources: where the rows the agent infers on come from.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand_distr::{Distribution, Normal};

use edgeloop_shared::drift::Target;

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
    #[error("a csv or npy source needs a path")]
    NoPath,
    #[error("{path} has no label column `{column}`: its columns are {columns:?}")]
    NoLabelColumn {
        path: String,
        column: String,
        columns: Vec<String>,
    },
    #[error("{path}: {reason}")]
    Npy { path: String, reason: String },
    #[error("sensor source: {0}")]
    Sensor(String),
}

/// A stream of input rows with named columns.
pub trait InputSource: Send {
    /// Column names, in the order of the values `next_row` returns.
    fn columns(&self) -> &[String];
    /// The next row, or `None` when there is none: the source is exhausted, or (for a
    /// live source) its next row is not ready yet. [`InputSource::finished`] tells which.
    fn next_row(&mut self) -> Option<Vec<f32>>;
    /// Whether a `None` from `next_row` means the source has ended for good. Sources
    /// that read files or generate rows have a row whenever they have not ended.
    fn finished(&self) -> bool {
        true
    }
    /// The ground truth of the row `next_row` returned last, when the source knows it (it
    /// is then counted as feedback): a class, from a source that knows the machine's
    /// condition; or a number, from a replayed file's label column, which is a class index
    /// or a true value, whichever the served model predicts.
    fn label(&self) -> Option<Target> {
        None
    }
    /// The shape of each row, for a source of tensors (images, sequences: an NPY array
    /// `(N, d1, d2, …)`), whose rows have no named columns; `None` for a source of
    /// columns.
    fn row_shape(&self) -> Option<&[usize]> {
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
        SourceKind::Csv => Box::new(
            Replay::csv(
                config.path.as_deref().ok_or(SourceError::NoPath)?,
                config.repeat,
            )?
            .with_label_column(config.label_column.as_deref())?,
        ),
        SourceKind::Npy => Box::new(
            Replay::npy(
                config.path.as_deref().ok_or(SourceError::NoPath)?,
                &config.columns,
                config.repeat,
            )?
            .with_label_column(config.label_column.as_deref())?,
        ),
        SourceKind::Sensor => Box::new(crate::sensor::SensorSource::open(
            &config.sensor,
            config.seed,
            config.labels,
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

    fn label(&self) -> Option<Target> {
        self.last_label.map(Target::Class)
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

/// Replays the rows of a file, once or over and over: a CSV file with a header line
/// ([`Replay::csv`]) or a NumPy array ([`Replay::npy`]).
pub struct Replay {
    /// The file, for errors.
    path: String,
    columns: Vec<String>,
    rows: Vec<Vec<f32>>,
    next: usize,
    repeat: bool,
    /// The column that holds each row's ground truth, if any.
    label_column: Option<usize>,
    /// Each row's shape, for an array of tensors.
    row_shape: Option<Vec<usize>>,
}

impl Replay {
    /// A CSV file with a header line. Empty cells and `nan` read as NaN.
    pub fn csv(path: &Path, repeat: bool) -> Result<Self, SourceError> {
        let (columns, rows) = read_numeric_csv(path)?;
        Ok(Replay {
            path: path.display().to_string(),
            columns,
            rows,
            next: 0,
            repeat,
            label_column: None,
            row_shape: None,
        })
    }

    /// Reads each row's ground truth from the column `name` (a class index, or a
    /// regression's true value; NaN, an empty cell, is a row without one).
    pub fn with_label_column(mut self, name: Option<&str>) -> Result<Self, SourceError> {
        let Some(name) = name else {
            return Ok(self);
        };
        if let Some(shape) = &self.row_shape {
            return Err(SourceError::Npy {
                path: self.path,
                reason: format!(
                    "an array of tensors (each of shape {shape:?}) has no column to read \
                     labels from: source.label_column is for tables"
                ),
            });
        }
        match self.columns.iter().position(|c| c == name) {
            Some(i) => {
                self.label_column = Some(i);
                Ok(self)
            }
            None => Err(SourceError::NoLabelColumn {
                path: self.path,
                column: name.to_string(),
                columns: self.columns,
            }),
        }
    }

    /// A NumPy `.npy` array of shape `(rows, columns)` (or `(rows,)`, one column), whose
    /// columns `columns` names, as an NPY file carries no names; or an array of tensors
    /// `(rows, d1, d2, …)` (images, sequences), one tensor per row, which has no columns
    /// to name. Element types: little-endian `f4`, `f8`, `i1`, `i2`, `i4`, `i8`, `u1`,
    /// `u2`, `u4`, `b1`, in C or Fortran order (format versions 1, 2 and 3). Values are
    /// read as 32-bit floats; NaN stands for a missing value, as in CSV.
    pub fn npy(path: &Path, columns: &[String], repeat: bool) -> Result<Self, SourceError> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| SourceError::Read {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        let bad = |reason: String| SourceError::Npy {
            path: shown.clone(),
            reason,
        };
        let (values, dims) = read_npy_array(&bytes).map_err(bad)?;
        if dims.len() >= 3 {
            return Replay::tensors(shown, values, &dims, columns, repeat);
        }
        let (rows, width) = match dims[..] {
            [rows] => (rows, 1),
            [rows, width] => (rows, width),
            _ => {
                return Err(bad(format!(
                    "the array's shape is {dims:?}; a replay needs (rows, columns), (rows,) or \
                     tensors (rows, d1, d2, …)"
                )));
            }
        };
        if columns.is_empty() {
            return Err(bad(format!(
                "an array of shape {dims:?} is a table: source.columns must name its {width} \
                 column(s)"
            )));
        }
        if columns.len() != width {
            return Err(bad(format!(
                "the array has {width} column(s) but source.columns names {}",
                columns.len()
            )));
        }
        if rows == 0 {
            return Err(SourceError::Empty { path: shown });
        }
        Ok(Replay {
            path: shown,
            columns: columns.to_vec(),
            rows: values.chunks(width).map(<[f32]>::to_vec).collect(),
            next: 0,
            repeat,
            label_column: None,
            row_shape: None,
        })
    }

    /// The rows of an NPY array of tensors `(rows, d1, d2, …)`, flat in row-major order.
    fn tensors(
        path: String,
        values: Vec<f32>,
        dims: &[usize],
        columns: &[String],
        repeat: bool,
    ) -> Result<Self, SourceError> {
        let bad = |reason: String| SourceError::Npy {
            path: path.clone(),
            reason,
        };
        if !columns.is_empty() {
            return Err(bad(format!(
                "an array of shape {dims:?} holds one tensor per row and has no columns to \
                 name: leave source.columns out"
            )));
        }
        let len: usize = dims[1..].iter().product();
        if len == 0 {
            return Err(bad(format!("an array of shape {dims:?} has empty rows")));
        }
        if dims[0] == 0 {
            return Err(SourceError::Empty { path });
        }
        Ok(Replay {
            path,
            columns: Vec::new(),
            rows: values.chunks(len).map(<[f32]>::to_vec).collect(),
            next: 0,
            repeat,
            label_column: None,
            row_shape: Some(dims[1..].to_vec()),
        })
    }
}

impl InputSource for Replay {
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

    fn row_shape(&self) -> Option<&[usize]> {
        self.row_shape.as_deref()
    }

    fn label(&self) -> Option<Target> {
        let row = self.rows.get(self.next.checked_sub(1)?)?;
        row.get(self.label_column?)
            .map(|&v| f64::from(v))
            .filter(|v| v.is_finite())
            .map(Target::Value)
    }
}

/// Reads an NPY file of any shape (see [`edgeloop_shared::npy`]): its values in row-major
/// (C) order as f32, and its shape.
pub fn read_npy_array(bytes: &[u8]) -> Result<(Vec<f32>, Vec<usize>), String> {
    let header = edgeloop_shared::npy::parse_header(bytes)?;
    let descr = header
        .descr
        .strip_prefix('\'')
        .and_then(|d| d.strip_suffix('\''))
        .filter(|d| d.len() >= 2 && d.is_ascii())
        .ok_or("`descr` is not a simple type string (structured arrays are not supported)")?;
    let (fortran, dims) = (header.fortran_order, header.shape.clone());
    let (order, kind) = descr.split_at(1);
    if order == ">" && !matches!(kind, "i1" | "u1" | "b1") {
        return Err(format!(
            "`{descr}` is big-endian; save the array little-endian"
        ));
    }
    let size: usize = match kind {
        "f8" | "i8" => 8,
        "f4" | "i4" | "u4" => 4,
        "i2" | "u2" => 2,
        "i1" | "u1" | "b1" => 1,
        _ => {
            return Err(format!(
                "element type `{descr}` is not supported (f4, f8, i1, i2, i4, i8, u1, u2, u4, b1)"
            ));
        }
    };
    let count = header.count().ok_or("the shape is too large")?;
    let data = &bytes[header.data_start..];
    if Some(data.len()) != count.checked_mul(size) {
        let dims_text: Vec<String> = dims.iter().map(usize::to_string).collect();
        return Err(format!(
            "the header promises {} values of {size} byte(s) ({} bytes) but {} \
             follow it: the file is truncated or has trailing bytes",
            dims_text.join("×"),
            count.saturating_mul(size),
            data.len()
        ));
    }
    let read = |c: &[u8]| -> f32 {
        match kind {
            "f8" => f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32,
            "i8" => i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32,
            "f4" => f32::from_le_bytes(c.try_into().expect("4 bytes")),
            "i4" => i32::from_le_bytes(c.try_into().expect("4 bytes")) as f32,
            "u4" => u32::from_le_bytes(c.try_into().expect("4 bytes")) as f32,
            "i2" => f32::from(i16::from_le_bytes(c.try_into().expect("2 bytes"))),
            "u2" => f32::from(u16::from_le_bytes(c.try_into().expect("2 bytes"))),
            "i1" => f32::from(c[0] as i8),
            _ => f32::from(c[0]),
        }
    };
    let stored: Vec<f32> = data.chunks_exact(size).map(read).collect();
    let values = if fortran && dims.len() > 1 {
        // Column-major: the first index varies fastest. Element i in row-major order has
        // the index its row-major strides give; its place in the file, the column-major
        // strides of that index.
        let column_major: Vec<usize> = dims
            .iter()
            .scan(1usize, |stride, &d| {
                let here = *stride;
                *stride *= d;
                Some(here)
            })
            .collect();
        (0..count)
            .map(|i| {
                let (mut rest, mut at) = (i, 0);
                for (j, &d) in dims.iter().enumerate().rev() {
                    at += (rest % d) * column_major[j];
                    rest /= d;
                }
                stored[at]
            })
            .collect()
    } else {
        stored
    };
    Ok((values, dims))
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
    use edgeloop_shared::npy::f32_array;

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
        let mut r = Replay::csv(&path, true).unwrap();
        assert_eq!(r.columns(), ["a", "b"]);
        assert_eq!(r.next_row(), Some(vec![1.0, 2.0]));
        let second = r.next_row().unwrap();
        assert!(second[1].is_nan());
        assert_eq!(r.next_row(), Some(vec![1.0, 2.0]));
        let mut once = Replay::csv(&path, false).unwrap();
        assert!(once.next_row().is_some() && once.next_row().is_some());
        assert_eq!(once.next_row(), None);
    }

    #[test]
    fn a_replayed_files_label_column_gives_each_rows_ground_truth() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.csv");
        std::fs::write(&path, "a,hours_left\n1,39.5\n2,\n3,7\n").unwrap();
        let config = SourceConfig {
            kind: SourceKind::Csv,
            path: Some(path.clone()),
            repeat: false,
            label_column: Some("hours_left".into()),
            ..crate::config::AgentConfig::default().source
        };
        let mut r = from_config(&config).unwrap();
        assert_eq!(r.label(), None, "no row yet");
        let mut seen = Vec::new();
        while let Some(row) = r.next_row() {
            seen.push((row[0], r.label()));
        }
        assert_eq!(
            seen,
            [
                (1.0, Some(Target::Value(39.5))),
                (2.0, None),
                (3.0, Some(Target::Value(7.0)))
            ],
            "an empty cell is a row without ground truth"
        );
        let err = from_config(&SourceConfig {
            label_column: Some("fault".into()),
            ..config.clone()
        })
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("no label column `fault`: its columns are [\"a\", \"hours_left\"]"),
            "{err}"
        );
        let unlabelled = SourceConfig {
            label_column: None,
            ..config
        };
        let mut r = from_config(&unlabelled).unwrap();
        r.next_row().unwrap();
        assert_eq!(r.label(), None);
    }

    /// An NPY file as numpy writes one: the header padded with spaces to a multiple of
    /// 64 bytes, ending in a newline.
    fn npy(version: u8, descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
        let dict = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
            if fortran { "True" } else { "False" }
        );
        let prefix = if version == 1 { 10 } else { 12 };
        let mut header = dict.into_bytes();
        while (prefix + header.len() + 1) % 64 != 0 {
            header.push(b' ');
        }
        header.push(b'\n');
        let mut out = b"\x93NUMPY".to_vec();
        out.extend([version, 0]);
        if version == 1 {
            out.extend((header.len() as u16).to_le_bytes());
        } else {
            out.extend((header.len() as u32).to_le_bytes());
        }
        out.extend(header);
        out.extend(data);
        out
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("c{i}")).collect()
    }

    #[test]
    fn an_f32_array_written_reads_back() {
        let values: Vec<f32> = (0..24).map(|v| v as f32 * 0.5 - 3.0).collect();
        let bytes = f32_array(&[2, 3, 4], &values);
        assert_eq!((bytes.len() - values.len() * 4) % 64, 0);
        assert_eq!(read_npy_array(&bytes).unwrap(), (values, vec![2, 3, 4]));
        // A 1-D shape is written as numpy writes it, `(5,)`.
        let bytes = f32_array(&[5], &[1.0; 5]);
        let header = std::str::from_utf8(&bytes[10..bytes.len() - 20]).unwrap();
        assert!(header.contains("'shape': (5,)"), "{header}");
        assert_eq!(read_npy_array(&bytes).unwrap().1, [5]);
    }

    /// Arrays of three dimensions (reference images, sequences) in either order come back
    /// in row-major order with their shape.
    #[test]
    fn npy_arrays_of_any_rank_read_in_row_major_order() {
        let (d0, d1, d2) = (2, 3, 4);
        let c_order: Vec<u8> = (0..24u8).collect();
        // Fortran order stores element (i, j, k) at i + 2j + 6k.
        let mut fortran = vec![0u8; 24];
        for i in 0..d0 {
            for j in 0..d1 {
                for k in 0..d2 {
                    fortran[i + d0 * j + d0 * d1 * k] = (i * d1 * d2 + j * d2 + k) as u8;
                }
            }
        }
        let expected: Vec<f32> = (0..24).map(|v| v as f32).collect();
        for (bytes, is_fortran) in [(c_order, false), (fortran, true)] {
            let file = npy(1, "|u1", is_fortran, "(2, 3, 4)", &bytes);
            let (values, dims) = read_npy_array(&file).unwrap();
            assert_eq!(dims, [2, 3, 4]);
            assert_eq!(values, expected, "fortran: {is_fortran}");
        }
        let err = read_npy_array(&npy(1, "<f4", false, "(2, 3, 4)", &[0; 95])).unwrap_err();
        assert!(
            err.contains("2×3×4 values of 4 byte(s) (96 bytes) but 95"),
            "{err}"
        );
    }

    /// An array of tensors `(rows, d1, d2)` replays one flat tensor per row, in row-major
    /// order, with its shape and without columns.
    #[test]
    fn an_npy_array_of_tensors_replays_one_tensor_per_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("images.npy");
        let values: Vec<f32> = (0..24).map(|v| v as f32).collect();
        std::fs::write(&path, f32_array(&[2, 3, 4], &values)).unwrap();
        let mut r = Replay::npy(&path, &[], true).unwrap();
        assert_eq!(r.row_shape(), Some(&[3, 4][..]));
        assert!(r.columns().is_empty());
        assert_eq!(r.next_row().unwrap(), values[..12]);
        assert_eq!(r.next_row().unwrap(), values[12..]);
        assert_eq!(r.next_row().unwrap(), values[..12]);
        // An array of tensors has no label column.
        let err = Replay::npy(&path, &[], false)
            .unwrap()
            .with_label_column(Some("label"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("label_column is for tables"), "{err}");
        // A table has no shape of its own.
        std::fs::write(&path, f32_array(&[2, 3], &values[..6])).unwrap();
        let r = Replay::npy(&path, &names(3), false).unwrap();
        assert_eq!(r.row_shape(), None);
    }

    #[test]
    fn npy_replay_reads_every_element_type_and_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.npy");
        let open = |bytes: Vec<u8>, width: usize| {
            std::fs::write(&path, bytes).unwrap();
            Replay::npy(&path, &names(width), false)
        };
        let rows = |r: &mut Replay| std::iter::from_fn(|| r.next_row()).collect::<Vec<_>>();

        // f4, C order, 3 rows × 2, with a NaN.
        let f4: Vec<u8> = [1.0f32, 2.0, 3.0, f32::NAN, 5.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut r = open(npy(1, "<f4", false, "(3, 2)", &f4), 2).unwrap();
        assert_eq!(r.columns(), ["c0", "c1"]);
        let got = rows(&mut r);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], [1.0, 2.0]);
        assert!(got[1][1].is_nan());
        // f8 in Fortran order: the same rows stored column by column.
        let f8: Vec<u8> = [1.0f64, 3.0, 5.0, 2.0, 4.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut r = open(npy(2, "<f8", true, "(3, 2)", &f8), 2).unwrap();
        assert_eq!(rows(&mut r), [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]);
        // Integers and booleans; a one-dimensional array is one column.
        let i8s: Vec<u8> = [-3i64, 7].iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut r = open(npy(3, "<i8", false, "(2,)", &i8s), 1).unwrap();
        assert_eq!(rows(&mut r), [[-3.0], [7.0]]);
        let mut r = open(npy(1, "|u1", false, "(1, 3)", &[0, 200, 255]), 3).unwrap();
        assert_eq!(rows(&mut r), [[0.0, 200.0, 255.0]]);
        let mut r = open(npy(1, "|b1", false, "(2, 1)", &[1, 0]), 1).unwrap();
        assert_eq!(rows(&mut r), [[1.0], [0.0]]);
        // `loop` starts over.
        std::fs::write(&path, npy(1, "<f4", false, "(3, 2)", &f4)).unwrap();
        let mut r = Replay::npy(&path, &names(2), true).unwrap();
        for _ in 0..3 {
            r.next_row().unwrap();
        }
        assert_eq!(r.next_row(), Some(vec![1.0, 2.0]));
    }

    /// Files numpy itself wrote (`agent/tests/data/make_replay_npy.py`), through the
    /// config, as the agent opens its source.
    #[test]
    fn npy_files_written_by_numpy_replay_as_written() {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let config = |file: &str, columns: &[&str]| SourceConfig {
            kind: SourceKind::Npy,
            path: Some(data.join(file)),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            repeat: false,
            ..crate::config::AgentConfig::default().source
        };
        let all = |c: SourceConfig| {
            let mut source = from_config(&c).unwrap();
            std::iter::from_fn(move || source.next_row()).collect::<Vec<_>>()
        };
        let rows = all(config("replay_f8_fortran.npy", &VIBRATION_FEATURES));
        assert_eq!(rows.len(), 6);
        assert_eq!(rows[0], [1.0, 3.0, 3.0, 45.0]);
        assert_eq!(rows[2], [1.9, 8.5, 6.5, 56.0]);
        assert!(rows[3][1].is_nan() && rows[3][3] == 44.5);
        assert_eq!(
            all(config("replay_i4.npy", &["a", "b"])),
            [[1.0, -2.0], [300.0, 4.0], [-5.0, 60000.0]]
        );
        assert_eq!(
            all(config("replay_f4.npy", &["x"])),
            [[0.0], [0.25], [0.5], [0.75], [1.0]]
        );
        let mut named_wrong = config("replay_i4.npy", &["a"]);
        let err = from_config(&named_wrong).err().unwrap().to_string();
        assert!(err.contains("2 column(s)"), "{err}");
        named_wrong.path = None;
        assert!(matches!(
            from_config(&named_wrong),
            Err(SourceError::NoPath)
        ));
    }

    #[test]
    fn npy_errors_say_what_is_wrong_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.npy");
        let err = |bytes: Vec<u8>, width: usize| {
            std::fs::write(&path, bytes).unwrap();
            Replay::npy(&path, &names(width), false)
                .err()
                .unwrap()
                .to_string()
        };
        let f4 = [0u8; 24];
        let e = err(npy(1, "<f4", false, "(3, 2)", &f4[..20]), 2);
        assert!(e.contains("truncated") && e.contains("bad.npy"), "{e}");
        let e = err(npy(1, "<f4", false, "(3, 2)", &[0u8; 28]), 2);
        assert!(e.contains("trailing"), "{e}");
        let e = err(npy(1, "<f4", false, "(3, 2)", &f4), 3);
        assert!(e.contains("2 column(s)") && e.contains("names 3"), "{e}");
        let e = err(npy(1, ">f4", false, "(3, 2)", &f4), 2);
        assert!(e.contains("big-endian"), "{e}");
        let e = err(npy(1, "<c8", false, "(3, 1)", &f4), 1);
        assert!(e.contains("`<c8` is not supported"), "{e}");
        // An array of tensors has no columns to name; a table needs them named.
        let e = err(npy(1, "<f4", false, "(3, 1, 2)", &f4), 2);
        assert!(e.contains("leave source.columns out"), "{e}");
        let e = err(npy(1, "<f4", false, "(3, 2)", &f4), 0);
        assert!(e.contains("must name its 2 column(s)"), "{e}");
        let e = err(npy(1, "<f4", false, "(3, 0, 2)", &[]), 0);
        assert!(e.contains("empty rows"), "{e}");
        let e = err(npy(1, "<f4", false, "()", &f4[..4]), 1);
        assert!(e.contains("()") || e.contains("[]"), "{e}");
        let e = err(b"PK\x03\x04 not numpy at all".to_vec(), 1);
        assert!(e.contains("not an NPY file"), "{e}");
        let mut v9 = npy(1, "<f4", false, "(3, 2)", &f4);
        v9[6] = 9;
        assert!(err(v9, 2).contains("version 9"));
        let e = err(npy(1, "<f4", false, "(0, 2)", &[]), 2);
        assert!(e.contains("no data rows"), "{e}");
    }

    #[test]
    fn csv_errors_name_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.csv");
        std::fs::write(&path, "a,b\n1,2\n3,zz\n").unwrap();
        let err = Replay::csv(&path, true).err().unwrap().to_string();
        assert!(
            err.contains("line 3") && err.contains("`b`") && err.contains("zz"),
            "{err}"
        );
        std::fs::write(&path, "a,b\n").unwrap();
        assert!(matches!(
            Replay::csv(&path, true),
            Err(SourceError::Empty { .. })
        ));
        std::fs::write(&path, "a,b\n1\n").unwrap();
        assert!(Replay::csv(&path, true).is_err(), "ragged rows are refused");
    }
}
