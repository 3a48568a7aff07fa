//! NumPy's NPY format: the header both sides of the fleet read and write, an array of f32
//! tensors, and the structured array a tensor model's input sample travels as.
//!
//! An NPY file is `\x93NUMPY`, a major and minor version, the header's length (2 bytes
//! little-endian in version 1, 4 in versions 2 and 3), the header (a Python dict literal with
//! `descr`, `fortran_order` and `shape`, padded with spaces and ended by a newline so that
//! the data starts on a multiple of 64), then the data.
//!
//! A device's sample of a tensor model's inputs (what the controller asks for before a
//! retraining) is one structured array of shape `(rows,)` whose records are packed as numpy
//! writes them: `x`, the input as the device received it (f32, the model's row shape), then
//! `predicted` and `label` (f64, NaN when unknown: a class index, or a regression's value).
//! `np.load(path)["x"]` is then an array `(rows, d1, d2, …)`. Samples of several devices
//! merge by concatenating their records ([`merge_samples`]).

/// The first bytes of every NPY file.
pub const MAGIC: &[u8] = b"\x93NUMPY";

/// What an NPY header says, and where the data starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The element type as written: a type string such as `<f4`, or a structured type's
    /// list (`[('x', '<f4', (3,)), …]`).
    pub descr: String,
    pub fortran_order: bool,
    pub shape: Vec<usize>,
    /// Offset of the first data byte.
    pub data_start: usize,
}

impl Header {
    /// The number of elements the shape holds; None when it overflows.
    pub fn count(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }
}

/// An NPY header (magic, version, length, dict) for an array of `descr` and `shape` in
/// row-major order, as `np.save` writes it: version 1.0 unless the header needs more than
/// 65 535 bytes, and room for the first dimension to grow to 21 digits (numpy's
/// `GROWTH_AXIS_MAX_DIGITS`), so that the header's length does not depend on it.
pub fn header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let mut dict = format!(
        "{{'descr': {descr}, 'fortran_order': False, 'shape': {}, }}",
        tuple(shape)
    );
    if let Some(first) = shape.first() {
        dict.push_str(&" ".repeat(21usize.saturating_sub(first.to_string().len())));
    }
    let (version, prefix) = if dict.len() + 11 <= usize::from(u16::MAX) {
        (1u8, 10)
    } else {
        (2u8, 12)
    };
    while (prefix + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&[version, 0]);
    if version == 1 {
        bytes.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    } else {
        bytes.extend_from_slice(&(dict.len() as u32).to_le_bytes());
    }
    bytes.extend_from_slice(dict.as_bytes());
    bytes
}

/// A shape as Python writes a tuple: `(3,)`, `(3, 32, 32)`, `()`.
fn tuple(shape: &[usize]) -> String {
    match shape {
        [] => "()".into(),
        [one] => format!("({one},)"),
        _ => {
            let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
            format!("({})", dims.join(", "))
        }
    }
}

/// An NPY file of f32 values of this shape in row-major order, as numpy's `np.save` writes
/// one. Tools and tests write reference arrays of tensor models with it.
pub fn f32_array(shape: &[usize], values: &[f32]) -> Vec<u8> {
    let mut bytes = header("'<f4'", shape);
    bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    bytes
}

/// Reads an NPY file's header. An error says what is wrong with it.
pub fn parse_header(bytes: &[u8]) -> Result<Header, String> {
    if bytes.len() < 10 || !bytes.starts_with(MAGIC) {
        return Err("not an NPY file (no \\x93NUMPY magic)".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        major => {
            return Err(format!(
                "NPY format version {major} is not supported (1, 2, 3)"
            ));
        }
    };
    let dict = bytes
        .get(start..start + header_len)
        .ok_or("the header is cut short")?;
    let dict = std::str::from_utf8(dict).map_err(|_| "the header is not text")?;
    let field = |key: &str| -> Result<&str, String> {
        let at = dict
            .find(&format!("'{key}'"))
            .ok_or_else(|| format!("the header has no `{key}`"))?;
        let rest = dict[at + key.len() + 2..].trim_start();
        rest.strip_prefix(':')
            .map(str::trim_start)
            .ok_or_else(|| format!("the header's `{key}` has no value"))
    };
    let descr = field("descr")?;
    let descr = if let Some(quoted) = descr.strip_prefix('\'') {
        let end = quoted
            .find('\'')
            .ok_or("`descr` is an unterminated string")?;
        format!("'{}'", &quoted[..end])
    } else if descr.starts_with('[') {
        // A structured type: the list up to its closing bracket (names hold no brackets).
        let mut depth = 0usize;
        let end = descr
            .char_indices()
            .find_map(|(i, c)| {
                match c {
                    '[' => depth += 1,
                    ']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i);
                        }
                    }
                    _ => {}
                }
                None
            })
            .ok_or("`descr` is an unterminated list")?;
        descr[..=end].to_string()
    } else {
        return Err("`descr` is neither a type string nor a list of fields".into());
    };
    let fortran_order = field("fortran_order")?.starts_with("True");
    let shape = field("shape")?;
    let shape = shape
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("`shape` is not a tuple")?;
    let shape: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.trim_end_matches('L').parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("`shape` ({shape}) is not a tuple of sizes"))?;
    Ok(Header {
        descr,
        fortran_order,
        shape,
        data_start: start + header_len,
    })
}

/// The record type of a tensor model's sample whose inputs have `row_shape`.
pub fn sample_descr(row_shape: &[usize]) -> String {
    format!(
        "[('x', '<f4', {}), ('predicted', '<f8'), ('label', '<f8')]",
        tuple(row_shape)
    )
}

/// The row shape of a sample's record type; an error when `descr` is not one.
pub fn sample_row_shape(descr: &str) -> Result<Vec<usize>, String> {
    let not = || {
        format!(
            "the record type {descr} is not a sample's ({})",
            sample_descr(&[3])
        )
    };
    let dims = descr
        .strip_prefix("[('x', '<f4', (")
        .and_then(|d| d.strip_suffix(")), ('predicted', '<f8'), ('label', '<f8')]"))
        .ok_or_else(not)?;
    let shape: Vec<usize> = dims
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| not())?;
    if shape.is_empty() || sample_descr(&shape) != descr {
        return Err(not());
    }
    Ok(shape)
}

/// One input of a sample: the tensor, what the model predicted and the ground truth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleRecord<'a> {
    pub x: &'a [f32],
    pub predicted: Option<f64>,
    pub label: Option<f64>,
}

/// Bytes of one record of a sample whose inputs have `row_shape`.
pub fn sample_record_bytes(row_shape: &[usize]) -> usize {
    row_shape.iter().product::<usize>() * 4 + 16
}

/// A sample as an NPY file of records (see the module's description). Every record's `x`
/// must hold the row shape's number of values.
pub fn write_sample<'a>(
    row_shape: &[usize],
    records: impl ExactSizeIterator<Item = SampleRecord<'a>>,
) -> Result<Vec<u8>, String> {
    let width: usize = row_shape.iter().product();
    let rows = records.len();
    let mut bytes = header(&sample_descr(row_shape), &[rows]);
    bytes.reserve(rows * sample_record_bytes(row_shape));
    for (i, record) in records.enumerate() {
        if record.x.len() != width {
            return Err(format!(
                "record {i} has {} values; the row shape {row_shape:?} holds {width}",
                record.x.len()
            ));
        }
        bytes.extend(record.x.iter().flat_map(|v| v.to_le_bytes()));
        for v in [record.predicted, record.label] {
            bytes.extend_from_slice(&v.unwrap_or(f64::NAN).to_le_bytes());
        }
    }
    Ok(bytes)
}

/// A sample file checked: its row shape and number of records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleFile {
    pub row_shape: Vec<usize>,
    pub rows: usize,
    pub data_start: usize,
}

/// Checks a sample file: a sample's record type, one dimension, and exactly its records.
pub fn read_sample(bytes: &[u8]) -> Result<SampleFile, String> {
    let header = parse_header(bytes)?;
    let row_shape = sample_row_shape(&header.descr)?;
    let [rows] = header.shape[..] else {
        return Err(format!(
            "a sample has one dimension (its records), not the shape {:?}",
            header.shape
        ));
    };
    let expected = rows
        .checked_mul(sample_record_bytes(&row_shape))
        .ok_or("the shape is too large")?;
    let data = bytes.len() - header.data_start.min(bytes.len());
    if data != expected {
        return Err(format!(
            "the header promises {rows} records of {} bytes ({expected} bytes) but {data} \
             follow it: the file is truncated or has trailing bytes",
            sample_record_bytes(&row_shape)
        ));
    }
    Ok(SampleFile {
        row_shape,
        rows,
        data_start: header.data_start,
    })
}

/// The samples of several devices as one file: their records one after the other, in the
/// order given. Every part must be a sample of the same row shape; an error names the
/// device whose part is not.
pub fn merge_samples(parts: &[(String, Vec<u8>)]) -> Result<Vec<u8>, String> {
    let mut checked: Vec<(&String, SampleFile)> = Vec::with_capacity(parts.len());
    for (device, bytes) in parts {
        let file = read_sample(bytes).map_err(|e| format!("the sample of {device}: {e}"))?;
        if let Some((first_device, first)) = checked.first()
            && file.row_shape != first.row_shape
        {
            return Err(format!(
                "the sample of {device} has inputs of shape {:?}, that of {first_device} {:?}",
                file.row_shape, first.row_shape
            ));
        }
        checked.push((device, file));
    }
    let Some((_, first)) = checked.first() else {
        return Ok(Vec::new());
    };
    let rows = checked.iter().map(|(_, f)| f.rows).sum::<usize>();
    let mut merged = header(&sample_descr(&first.row_shape), &[rows]);
    for ((_, bytes), (_, file)) in parts.iter().zip(&checked) {
        merged.extend_from_slice(&bytes[file.data_start..]);
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_is_padded_to_64_bytes_and_reads_back() {
        for shape in [vec![], vec![7], vec![2, 3, 32, 32]] {
            let bytes = header("'<f4'", &shape);
            assert_eq!(bytes.len() % 64, 0);
            assert_eq!(*bytes.last().unwrap(), b'\n');
            let read = parse_header(&bytes).unwrap();
            assert_eq!(read.descr, "'<f4'");
            assert_eq!(read.shape, shape);
            assert!(!read.fortran_order);
            assert_eq!(read.data_start, bytes.len());
        }
        let text = String::from_utf8_lossy(&header("'<f4'", &[5])).into_owned();
        assert!(text.contains("'shape': (5,), }"), "{text}");
        assert_eq!(
            header("'<f4'", &[5, 2]).len(),
            header("'<f4'", &[123_456_789, 2]).len(),
            "the first dimension has room to grow"
        );
    }

    /// The bytes numpy 2.4 writes (`tests/scripts/make_sample_npy.py`) for
    /// `np.save(f, np.array([([1, 2, 3], 0, np.nan), ([4, 5, 6], 1, 1)],
    /// dtype=[('x', '<f4', (3,)), ('predicted', '<f8'), ('label', '<f8')]))`.
    const NUMPY_SAMPLE: &[u8] = include_bytes!("../tests/fixtures/sample_numpy.npy");

    #[test]
    fn a_sample_is_written_byte_for_byte_as_numpy_writes_it() {
        let records = [
            SampleRecord {
                x: &[1.0, 2.0, 3.0],
                predicted: Some(0.0),
                label: None,
            },
            SampleRecord {
                x: &[4.0, 5.0, 6.0],
                predicted: Some(1.0),
                label: Some(1.0),
            },
        ];
        let written = write_sample(&[3], records.into_iter()).unwrap();
        assert_eq!(written, NUMPY_SAMPLE);
        let read = read_sample(&written).unwrap();
        assert_eq!((read.row_shape, read.rows), (vec![3], 2));
        let err = write_sample(&[4], records.into_iter()).unwrap_err();
        assert!(err.contains("record 0 has 3 values"), "{err}");
    }

    #[test]
    fn samples_merge_by_their_records_and_refuse_another_shape_or_a_cut_file() {
        let one = |x: &[f32], label| {
            write_sample(
                &[1, 2],
                [SampleRecord {
                    x,
                    predicted: Some(2.0),
                    label,
                }]
                .into_iter(),
            )
            .unwrap()
        };
        let a = one(&[1.0, 2.0], None);
        let b = one(&[3.0, 4.0], Some(2.0));
        let merged = merge_samples(&[("a".into(), a.clone()), ("b".into(), b.clone())]).unwrap();
        let read = read_sample(&merged).unwrap();
        assert_eq!((read.row_shape.clone(), read.rows), (vec![1, 2], 2));
        let records = &merged[read.data_start..];
        assert_eq!(records.len(), 2 * 24);
        assert_eq!(&records[..24], &a[a.len() - 24..]);
        assert_eq!(&records[24..], &b[b.len() - 24..]);
        assert_eq!(merge_samples(&[]).unwrap(), Vec::<u8>::new());

        let other = write_sample(
            &[2],
            [SampleRecord {
                x: &[0.0, 0.0],
                predicted: None,
                label: None,
            }]
            .into_iter(),
        )
        .unwrap();
        let err = merge_samples(&[("a".into(), a.clone()), ("c".into(), other)]).unwrap_err();
        assert!(
            err.contains("the sample of c has inputs of shape [2], that of a [1, 2]"),
            "{err}"
        );
        let cut = a[..a.len() - 1].to_vec();
        let err = merge_samples(&[("a".into(), cut)]).unwrap_err();
        assert!(
            err.contains("the sample of a") && err.contains("truncated"),
            "{err}"
        );
        let plain = f32_array(&[2, 2], &[0.0; 4]);
        let err = merge_samples(&[("p".into(), plain)]).unwrap_err();
        assert!(err.contains("is not a sample's"), "{err}");
        let err = merge_samples(&[("t".into(), b"a,b\n1,2\n".to_vec())]).unwrap_err();
        assert!(err.contains("not an NPY file"), "{err}");
    }

    #[test]
    fn only_a_samples_record_type_gives_a_row_shape() {
        assert_eq!(
            sample_row_shape(&sample_descr(&[3, 32, 32])),
            Ok(vec![3, 32, 32])
        );
        assert_eq!(sample_row_shape(&sample_descr(&[5])), Ok(vec![5]));
        for bad in [
            "'<f4'",
            "[('x', '<f4', ()), ('predicted', '<f8'), ('label', '<f8')]",
            "[('x', '<f4', (3,2,)), ('predicted', '<f8'), ('label', '<f8')]",
            "[('x', '<f8', (3,)), ('predicted', '<f8'), ('label', '<f8')]",
            "[('x', '<f4', (3,)), ('label', '<f8')]",
        ] {
            assert!(sample_row_shape(bad).is_err(), "{bad}");
        }
    }
}
