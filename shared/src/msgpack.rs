//! MessagePack, the protocol's binary spelling of an envelope: where values begin and end,
//! and the few scalars the envelope's own fields need.
//!
//! Typed payloads are read by [`from_slice`] (rmp-serde's reading, done faster for the
//! spellings the protocol uses). The rest of this module only walks the structure, which
//! every MessagePack value declares up front (each string, map and array says its length),
//! and refuses on the way what JSON cannot spell and the store could not keep: a string
//! holding NUL, a float that is NaN or infinite. The walk is iterative (a count of values
//! still to skip), so a deeply nested value cannot exhaust the stack.

use std::ops::Range;

mod typed;

pub use typed::from_slice;
pub(crate) use typed::read_quickly;

/// Whether `b` begins a MessagePack map (fixmap, map 16, map 32). No JSON text begins with
/// such a byte: 0x80–0x8f are UTF-8 continuation bytes, 0xde and 0xdf begin two-byte
/// characters, and JSON begins with an ASCII character.
pub fn is_map_start(b: u8) -> bool {
    matches!(b, 0x80..=0x8f | 0xde | 0xdf)
}

/// Why a byte string is not the MessagePack the protocol expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    #[error("the value ends early")]
    Truncated,
    #[error("byte 0x{0:02x} does not begin a MessagePack value")]
    Reserved(u8),
    #[error("a string holds the NUL character")]
    Nul,
    #[error("a float is NaN or infinite")]
    NonFinite,
    #[error("a string is not UTF-8")]
    NotUtf8,
    #[error("expected {0}")]
    Expected(&'static str),
    #[error("bytes follow the value")]
    Trailing,
}

/// What a value's first bytes say it is.
enum Head {
    /// A scalar of this many bytes after its header (nil, booleans, integers, bin, ext).
    Skip(usize),
    Str(usize),
    F32,
    F64,
    Map(usize),
    Array(usize),
}

fn be(b: &[u8], at: usize, n: usize) -> Result<usize, ScanError> {
    let bytes = b.get(at..at + n).ok_or(ScanError::Truncated)?;
    Ok(bytes
        .iter()
        .fold(0usize, |acc, &x| (acc << 8) | usize::from(x)))
}

/// The kind of the value at `at` and where its header ends.
fn head(b: &[u8], at: usize) -> Result<(Head, usize), ScanError> {
    let marker = *b.get(at).ok_or(ScanError::Truncated)?;
    let i = at + 1;
    Ok(match marker {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (Head::Skip(0), i),
        0x80..=0x8f => (Head::Map(usize::from(marker & 0x0f)), i),
        0x90..=0x9f => (Head::Array(usize::from(marker & 0x0f)), i),
        0xa0..=0xbf => (Head::Str(usize::from(marker & 0x1f)), i),
        0xc1 => return Err(ScanError::Reserved(marker)),
        // bin 8/16/32
        0xc4 => (Head::Skip(be(b, i, 1)?), i + 1),
        0xc5 => (Head::Skip(be(b, i, 2)?), i + 2),
        0xc6 => (Head::Skip(be(b, i, 4)?), i + 4),
        // ext 8/16/32: a length, a type byte, the data (saturating: a 32-bit length plus one
        // overflows a 32-bit usize, and such a value is truncated anyway)
        0xc7 => (Head::Skip(be(b, i, 1)? + 1), i + 1),
        0xc8 => (Head::Skip(be(b, i, 2)? + 1), i + 2),
        0xc9 => (Head::Skip(be(b, i, 4)?.saturating_add(1)), i + 4),
        0xca => (Head::F32, i),
        0xcb => (Head::F64, i),
        // uint and int 8/16/32/64
        0xcc | 0xd0 => (Head::Skip(1), i),
        0xcd | 0xd1 => (Head::Skip(2), i),
        0xce | 0xd2 => (Head::Skip(4), i),
        0xcf | 0xd3 => (Head::Skip(8), i),
        // fixext 1/2/4/8/16: a type byte and the data
        0xd4 => (Head::Skip(2), i),
        0xd5 => (Head::Skip(3), i),
        0xd6 => (Head::Skip(5), i),
        0xd7 => (Head::Skip(9), i),
        0xd8 => (Head::Skip(17), i),
        0xd9 => (Head::Str(be(b, i, 1)?), i + 1),
        0xda => (Head::Str(be(b, i, 2)?), i + 2),
        0xdb => (Head::Str(be(b, i, 4)?), i + 4),
        0xdc => (Head::Array(be(b, i, 2)?), i + 2),
        0xdd => (Head::Array(be(b, i, 4)?), i + 4),
        0xde => (Head::Map(be(b, i, 2)?), i + 2),
        0xdf => (Head::Map(be(b, i, 4)?), i + 4),
    })
}

/// `b[at..at + n]`, or `Truncated`.
fn take(b: &[u8], at: usize, n: usize) -> Result<&[u8], ScanError> {
    at.checked_add(n)
        .and_then(|end| b.get(at..end))
        .ok_or(ScanError::Truncated)
}

/// Where the string of `n` bytes at `at` ends; with `checked`, a NUL in it is an error.
fn str_end(b: &[u8], at: usize, n: usize, checked: bool) -> Result<usize, ScanError> {
    let s = take(b, at, n)?;
    if checked && s.contains(&0) {
        return Err(ScanError::Nul);
    }
    Ok(at + n)
}

/// Where the float of `width` bytes (4 or 8) at `at` ends; with `checked`, NaN or an
/// infinity is an error.
fn float_end(b: &[u8], at: usize, width: usize, checked: bool) -> Result<usize, ScanError> {
    let raw = take(b, at, width)?;
    if checked {
        let finite = match raw.try_into() {
            Ok(four) => f32::from_be_bytes(four).is_finite(),
            Err(_) => f64::from_be_bytes(raw.try_into().expect("eight bytes")).is_finite(),
        };
        if !finite {
            return Err(ScanError::NonFinite);
        }
    }
    Ok(at + width)
}

/// Where the value that begins at `at` ends. With `checked`, a string holding NUL or a
/// float that is not finite anywhere inside it is an error.
pub fn value_end(b: &[u8], mut at: usize, checked: bool) -> Result<usize, ScanError> {
    // Values still to walk; each takes at least one byte, so a count above the bytes left
    // is a truncation, found before any of it is walked.
    let mut pending: usize = 1;
    while pending > 0 {
        pending -= 1;
        // The common cases first: the small integers that are most of a drift summary's
        // counts, short strings (keys), and doubles (scores).
        match *b.get(at).ok_or(ScanError::Truncated)? {
            0x00..=0x7f | 0xe0..=0xff => {
                at += 1;
                continue;
            }
            marker @ 0xa0..=0xbf => {
                at = str_end(b, at + 1, usize::from(marker & 0x1f), checked)?;
                continue;
            }
            0xcb => {
                at = float_end(b, at + 1, 8, checked)?;
                continue;
            }
            _ => {}
        }
        let (kind, i) = head(b, at)?;
        at = match kind {
            Head::Skip(n) => i + take(b, i, n)?.len(),
            Head::Str(n) => str_end(b, i, n, checked)?,
            Head::F32 => float_end(b, i, 4, checked)?,
            Head::F64 => float_end(b, i, 8, checked)?,
            Head::Map(n) => {
                pending = pending.saturating_add(n.saturating_mul(2));
                i
            }
            Head::Array(n) => {
                pending = pending.saturating_add(n);
                i
            }
        };
        if pending > b.len().saturating_sub(at) {
            return Err(ScanError::Truncated);
        }
    }
    Ok(at)
}

/// The string that is exactly `b`.
pub fn str_of(b: &[u8]) -> Result<&str, ScanError> {
    match head(b, 0)? {
        (Head::Str(n), i) if i.checked_add(n) == Some(b.len()) => {
            std::str::from_utf8(&b[i..]).map_err(|_| ScanError::NotUtf8)
        }
        _ => Err(ScanError::Expected("a string")),
    }
}

/// The unsigned integer that is exactly `b` (a signed encoding of a value ≥ 0 too: some
/// encoders write every integer signed).
pub fn uint_of(b: &[u8]) -> Result<u64, ScanError> {
    let not = ScanError::Expected("an unsigned integer");
    let (&marker, rest) = b.split_first().ok_or(ScanError::Truncated)?;
    let exact = |n: usize| -> Result<u64, ScanError> {
        if rest.len() != n {
            return Err(not);
        }
        Ok(rest.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    };
    let signed = |n: usize| -> Result<u64, ScanError> {
        let v = exact(n)?;
        // The sign bit of an n-byte two's complement integer.
        if v >> (8 * n - 1) == 1 {
            return Err(not);
        }
        Ok(v)
    };
    match marker {
        0x00..=0x7f if rest.is_empty() => Ok(u64::from(marker)),
        0xcc => exact(1),
        0xcd => exact(2),
        0xce => exact(4),
        0xcf => exact(8),
        0xd0 => signed(1),
        0xd1 => signed(2),
        0xd2 => signed(4),
        0xd3 => signed(8),
        _ => Err(not),
    }
}

/// The fields of the map that is exactly `b`, in order: each key's text and the range of
/// its value. Keys must be strings. See [`value_end`] for `checked`.
pub fn map_fields(b: &[u8], checked: bool) -> Result<Vec<(&str, Range<usize>)>, ScanError> {
    let (Head::Map(n), at) = head(b, 0)? else {
        return Err(ScanError::Expected("a map"));
    };
    entries(b, n, at, |at| {
        let key_end = value_end(b, at, false)?;
        let key = str_of(&b[at..key_end]).map_err(|_| ScanError::Expected("string keys"))?;
        let end = value_end(b, key_end, checked)?;
        Ok(((key, key_end..end), end))
    })
}

/// The ranges of the items of the array that is exactly `b`. See [`value_end`] for
/// `checked`.
pub fn array_items(b: &[u8], checked: bool) -> Result<Vec<Range<usize>>, ScanError> {
    let (Head::Array(n), at) = head(b, 0)? else {
        return Err(ScanError::Expected("an array"));
    };
    entries(b, n, at, |at| {
        let end = value_end(b, at, checked)?;
        Ok((at..end, end))
    })
}

/// The `n` entries of a container whose header ends at `at` and which must end `b`, each
/// read by `entry` from where it begins (giving what it found and where it ends).
fn entries<T>(
    b: &[u8],
    n: usize,
    mut at: usize,
    mut entry: impl FnMut(usize) -> Result<(T, usize), ScanError>,
) -> Result<Vec<T>, ScanError> {
    if n > b.len() - at {
        return Err(ScanError::Truncated);
    }
    let mut found = Vec::with_capacity(n);
    for _ in 0..n {
        let (item, end) = entry(at)?;
        found.push(item);
        at = end;
    }
    if at != b.len() {
        return Err(ScanError::Trailing);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named<T: serde::Serialize>(value: &T) -> Vec<u8> {
        rmp_serde::to_vec_named(value).unwrap()
    }

    #[test]
    fn a_value_ends_where_rmp_serde_says() {
        let value = serde_json::json!({
            "a": [1, -1, 300, -300, 70000, -70000, 5_000_000_000u64, -5_000_000_000i64],
            "b": {"c": null, "d": true, "e": 1.5, "f": "x".repeat(40), "g": "y".repeat(300)},
            "h": [[[]], {}, ""],
        });
        let bytes = named(&value);
        let mut with_tail = bytes.clone();
        with_tail.extend_from_slice(&[0xc0, 0x01]);
        assert_eq!(value_end(&with_tail, 0, true), Ok(bytes.len()));
        let fields = map_fields(&bytes, true).unwrap();
        let keys: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["a", "b", "h"]);
        let a: Vec<i64> = rmp_serde::from_slice(&bytes[fields[0].1.clone()]).unwrap();
        assert_eq!(a[6], 5_000_000_000);
        assert_eq!(map_fields(&with_tail, true), Err(ScanError::Trailing));
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = named(&serde_json::json!({"k": [1, "two", 3.5, {"x": [null]}]}));
        for len in 0..bytes.len() {
            assert_eq!(
                value_end(&bytes[..len], 0, true),
                Err(ScanError::Truncated),
                "{len}"
            );
        }
    }

    #[test]
    fn a_huge_declared_length_is_refused_before_it_is_walked() {
        assert_eq!(
            value_end(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01], 0, true),
            Err(ScanError::Truncated)
        );
        assert_eq!(
            value_end(&[0xdb, 0xff, 0xff, 0xff, 0xff, b'a'], 0, true),
            Err(ScanError::Truncated)
        );
        // Deep nesting walks in constant stack.
        let mut deep = vec![0x91; 1 << 20];
        deep.push(0xc0);
        assert_eq!(value_end(&deep, 0, true), Ok(deep.len()));
    }

    #[test]
    fn nul_and_non_finite_floats_are_refused_only_when_checked() {
        for bad in [
            named(&vec!["a\0b"]),
            named(&vec![f64::NAN]),
            named(&vec![f64::INFINITY]),
            vec![0x91, 0xca, 0x7f, 0x80, 0, 0], // f32 infinity
        ] {
            assert!(value_end(&bad, 0, true).is_err(), "{bad:02x?}");
            assert_eq!(value_end(&bad, 0, false), Ok(bad.len()));
        }
        assert_eq!(value_end(&[0xc1], 0, false), Err(ScanError::Reserved(0xc1)));
    }

    #[test]
    fn scalars_read_exactly() {
        assert_eq!(uint_of(&named(&7u64)), Ok(7));
        assert_eq!(uint_of(&named(&u64::MAX)), Ok(u64::MAX));
        assert_eq!(uint_of(&[0xd0, 0x05]), Ok(5));
        assert_eq!(uint_of(&[0xd3, 0, 0, 0, 0, 0, 0, 1, 0]), Ok(256));
        assert!(uint_of(&named(&-1i64)).is_err());
        assert!(uint_of(&[0xd1, 0x80, 0x00]).is_err());
        assert!(uint_of(&named(&1.0f64)).is_err());
        assert!(uint_of(&[0xcd, 0x01]).is_err());
        assert_eq!(str_of(&named(&"dev-1")), Ok("dev-1"));
        assert_eq!(str_of(&[0xa2, 0xff, 0xfe]), Err(ScanError::NotUtf8));
        assert!(str_of(&named(&3u8)).is_err());
        assert!(is_map_start(named(&serde_json::json!({}))[0]));
        assert!(!is_map_start(b'{'));
    }
}
