//! A typed read of MessagePack for the payloads devices send most (drift summaries: some
//! 500 small integers each), in half the instructions of rmp-serde's generic one.
//!
//! It reads what rmp-serde reads, calling the same visitor methods for the same bytes, but
//! only the spellings the protocol's messages use: integers, floats, booleans, nil, UTF-8
//! strings, arrays and maps. Anything else (binary data, extension types, an enum, invalid
//! UTF-8, 128-bit integers, nesting deeper than [`MAX_DEPTH`], a container whose entries the
//! type does not all take, bytes after the value) is an error here, without a message:
//! [`from_slice`] then reads the bytes again with rmp-serde, whose answer, value or error,
//! is the one returned. So a value read here is the value rmp-serde reads (for the types
//! [`from_slice`] is for), and an error is rmp-serde's own; a property test checks both on
//! mutated payloads of every message kind devices send.
//!
//! It also leaves to rmp-serde every string holding NUL and every float that is NaN or
//! infinite, which the protocol refuses: a value this reader gives holds neither, so the
//! envelope's decoder need not walk a payload it read here to look for them.

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Visitor};

use super::{Head, head};

/// Reads a `T` from the MessagePack value `bytes` begins with: quickly when it is spelled
/// as the protocol spells it and ends `bytes`, otherwise by rmp-serde (module doc).
///
/// Not for a type with a `#[serde(flatten)]` field inside an `Option`: field names reach
/// visitors as bytes here, a flattened type's visitor may refuse them, and serde turns that
/// refusal into `None` instead of an error. No protocol message flattens a field.
pub fn from_slice<'de, T: Deserialize<'de>>(
    bytes: &'de [u8],
) -> Result<T, rmp_serde::decode::Error> {
    match read_quickly(bytes) {
        Some(value) => Ok(value),
        None => rmp_serde::from_slice(bytes),
    }
}

/// This reader's own answer: `None` for anything it leaves to rmp-serde (module doc).
pub(crate) fn read_quickly<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Option<T> {
    let mut reader = Reader {
        bytes,
        at: 0,
        depth: 0,
    };
    let value = T::deserialize(&mut reader).ok()?;
    (reader.at == bytes.len()).then_some(value)
}

/// Most containers nested in one another that this reader reads; the protocol's messages
/// nest a handful. Deeper values are left to rmp-serde, which has its own limit.
const MAX_DEPTH: usize = 32;

/// Anything this reader leaves to rmp-serde; it carries nothing, as it is never shown.
#[derive(Debug)]
struct Unread;

impl std::fmt::Display for Unread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("left to rmp-serde")
    }
}

impl std::error::Error for Unread {}

impl de::Error for Unread {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Unread
    }
}

type Read<T> = std::result::Result<T, Unread>;

struct Reader<'de> {
    bytes: &'de [u8],
    at: usize,
    depth: usize,
}

impl<'de> Reader<'de> {
    #[inline]
    fn peek(&self) -> Read<u8> {
        self.bytes.get(self.at).copied().ok_or(Unread)
    }

    #[inline]
    fn take<const N: usize>(&mut self) -> Read<[u8; N]> {
        let end = self.at + N;
        let taken = self.bytes.get(self.at..end).ok_or(Unread)?;
        self.at = end;
        Ok(taken.try_into().expect("N bytes"))
    }

    #[inline]
    fn slice(&mut self, n: usize) -> Read<&'de [u8]> {
        let end = self.at.checked_add(n).ok_or(Unread)?;
        let taken = self.bytes.get(self.at..end).ok_or(Unread)?;
        self.at = end;
        Ok(taken)
    }

    /// A number, boolean or nil, visited as rmp-serde visits it (`any_num`); the marker
    /// has been read.
    #[inline]
    fn scalar<V: Visitor<'de>>(&mut self, marker: u8, visitor: V) -> Read<V::Value> {
        match marker {
            0x00..=0x7f => visitor.visit_u8(marker),
            0xe0..=0xff => visitor.visit_i8(marker as i8),
            0xc0 => visitor.visit_unit(),
            0xc2 => visitor.visit_bool(false),
            0xc3 => visitor.visit_bool(true),
            0xcc => visitor.visit_u8(u8::from_be_bytes(self.take()?)),
            0xcd => visitor.visit_u16(u16::from_be_bytes(self.take()?)),
            0xce => visitor.visit_u32(u32::from_be_bytes(self.take()?)),
            0xcf => visitor.visit_u64(u64::from_be_bytes(self.take()?)),
            0xd0 => visitor.visit_i8(i8::from_be_bytes(self.take()?)),
            0xd1 => visitor.visit_i16(i16::from_be_bytes(self.take()?)),
            0xd2 => visitor.visit_i32(i32::from_be_bytes(self.take()?)),
            0xd3 => visitor.visit_i64(i64::from_be_bytes(self.take()?)),
            0xca => visitor.visit_f32(finite(f32::from_be_bytes(self.take()?))?),
            0xcb => visitor.visit_f64(finite(f64::from_be_bytes(self.take()?))?),
            _ => Err(Unread),
        }
    }

    /// Any value, visited as rmp-serde's `any_inner` visits it, for the spellings this
    /// reader knows.
    fn any<V: Visitor<'de>>(&mut self, visitor: V) -> Read<V::Value> {
        let (kind, after_header) = head(self.bytes, self.at).map_err(|_| Unread)?;
        let (len, container) = match kind {
            Head::Str(n) => {
                self.at = after_header;
                return self.str(n, visitor);
            }
            Head::Array(n) => (n, Container::Array),
            Head::Map(n) => (n, Container::Map),
            Head::Skip(_) | Head::F32 | Head::F64 => {
                let marker = self.bytes[self.at];
                self.at += 1;
                return self.scalar(marker, visitor);
            }
        };
        self.at = after_header;
        if self.depth >= MAX_DEPTH {
            return Err(Unread);
        }
        self.depth += 1;
        let mut entries = Entries {
            reader: self,
            left: len,
        };
        let value = match container {
            Container::Array => visitor.visit_seq(&mut entries)?,
            Container::Map => visitor.visit_map(&mut entries)?,
        };
        // rmp-serde refuses a container whose entries were not all taken.
        if entries.left != 0 {
            return Err(Unread);
        }
        self.depth -= 1;
        Ok(value)
    }

    fn str<V: Visitor<'de>>(&mut self, len: usize, visitor: V) -> Read<V::Value> {
        let bytes = self.text(len)?;
        visitor.visit_borrowed_str(std::str::from_utf8(bytes).map_err(|_| Unread)?)
    }

    /// The `len` bytes of a string, without NUL.
    #[inline]
    fn text(&mut self, len: usize) -> Read<&'de [u8]> {
        let bytes = self.slice(len)?;
        if bytes.contains(&0) {
            return Err(Unread);
        }
        Ok(bytes)
    }
}

/// `x` when it is finite.
#[inline]
fn finite<F: Into<f64> + Copy>(x: F) -> Read<F> {
    if x.into().is_finite() {
        Ok(x)
    } else {
        Err(Unread)
    }
}

enum Container {
    Array,
    Map,
}

/// The entries of an array or a map, `left` of them still to read.
struct Entries<'a, 'de> {
    reader: &'a mut Reader<'de>,
    left: usize,
}

impl<'de> de::SeqAccess<'de> for Entries<'_, 'de> {
    type Error = Unread;

    #[inline]
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Read<Option<T::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.reader).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

impl<'de> de::MapAccess<'de> for Entries<'_, 'de> {
    type Error = Unread;

    #[inline]
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Read<Option<K::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.reader).map(Some)
    }

    #[inline]
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Read<V::Value> {
        seed.deserialize(&mut *self.reader)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

/// The integer hints: the most common value of a drift summary is a count that fits its
/// marker, read here without the general dispatch.
macro_rules! numbers {
    ($($method:ident)*) => {$(
        #[inline]
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Read<V::Value> {
            let marker = self.peek()?;
            self.at += 1;
            self.scalar(marker, visitor)
        }
    )*};
}

macro_rules! any {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Read<V::Value> {
            self.any(visitor)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for &mut Reader<'de> {
    type Error = Unread;

    fn is_human_readable(&self) -> bool {
        false
    }

    numbers! {
        deserialize_bool deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
        deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_f32 deserialize_f64
    }

    // rmp-serde reads these, and structures, through `any_inner`; a binary value it would
    // give the visitor as bytes (or, for a sequence, as a sequence of them) is left to it.
    any! {
        deserialize_any deserialize_bytes deserialize_byte_buf deserialize_unit
        deserialize_map deserialize_str deserialize_string
        deserialize_char deserialize_ignored_any deserialize_seq
    }

    /// A field's name, given to the visitor as bytes: it then needs no UTF-8 check (a
    /// tenth of a drift summary's reading). Every identifier visitor serde derives matches
    /// bytes as it matches text, and rmp-serde gives bytes too when the name is not UTF-8.
    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Read<V::Value> {
        // A short name (fixstr), as almost every field name is, without the general header.
        let marker = self.peek()?;
        if let 0xa0..=0xbf = marker {
            self.at += 1;
            return visitor.visit_borrowed_bytes(self.text(usize::from(marker & 0x1f))?);
        }
        match head(self.bytes, self.at) {
            Ok((Head::Str(len), after_header)) => {
                self.at = after_header;
                visitor.visit_borrowed_bytes(self.text(len)?)
            }
            _ => self.any(visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Read<V::Value> {
        if self.peek()? == 0xc0 {
            self.at += 1;
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Read<V::Value> {
        // rmp-serde writes a unit struct as an empty array and reads nil or that.
        match self.peek()? {
            0xc0 | 0x90 => {
                self.at += 1;
                visitor.visit_unit()
            }
            _ => self.any(visitor),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Read<V::Value> {
        // rmp-serde's name for an extension type, which this reader leaves to it.
        if name == "_ExtStruct" {
            return Err(Unread);
        }
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Read<V::Value> {
        self.any(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Read<V::Value> {
        self.any(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Read<V::Value> {
        self.any(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        _visitor: V,
    ) -> Read<V::Value> {
        Err(Unread)
    }

    fn deserialize_i128<V: Visitor<'de>>(self, _visitor: V) -> Read<V::Value> {
        Err(Unread)
    }

    fn deserialize_u128<V: Visitor<'de>>(self, _visitor: V) -> Read<V::Value> {
        Err(Unread)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Pair {
        a: u64,
        b: Option<String>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Kind {
        One,
        Two(u8),
    }

    /// `from_slice` answers as rmp-serde does, by its own read or by leaving it to it.
    fn answers_as_rmp_serde<T>(bytes: &[u8], quick: bool)
    where
        T: for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
    {
        assert_eq!(read_quickly::<T>(bytes).is_some(), quick, "{bytes:02x?}");
        // As text, which NaN equals.
        assert_eq!(
            format!("{:?}", from_slice::<T>(bytes).map_err(|e| e.to_string())),
            format!(
                "{:?}",
                rmp_serde::from_slice::<T>(bytes).map_err(|e| e.to_string())
            )
        );
    }

    #[test]
    fn what_the_protocol_spells_is_read_here_and_the_rest_by_rmp_serde() {
        let pair = |b: Option<&str>| Pair {
            a: 300,
            b: b.map(str::to_string),
        };
        // Named maps, as the protocol writes them, and arrays, as rmp-serde also reads.
        answers_as_rmp_serde::<Pair>(&rmp_serde::to_vec_named(&pair(Some("x"))).unwrap(), true);
        answers_as_rmp_serde::<Pair>(&rmp_serde::to_vec(&pair(None)).unwrap(), true);
        // Every width of integer, signed or not, into a u64 and an i64.
        for n in [
            0u64,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            u32::MAX as u64,
            u64::MAX,
        ] {
            answers_as_rmp_serde::<u64>(&rmp_serde::to_vec(&n).unwrap(), true);
        }
        for n in [-1i64, -32, -33, -128, -129, -32_768, -32_769, i64::MIN] {
            answers_as_rmp_serde::<i64>(&rmp_serde::to_vec(&n).unwrap(), true);
            // A negative number is no u64, here or in rmp-serde.
            answers_as_rmp_serde::<u64>(&rmp_serde::to_vec(&n).unwrap(), false);
        }
        answers_as_rmp_serde::<f64>(&rmp_serde::to_vec(&7u8).unwrap(), true);
        answers_as_rmp_serde::<f32>(&rmp_serde::to_vec(&1.5f32).unwrap(), true);
        answers_as_rmp_serde::<Vec<Vec<u64>>>(
            &rmp_serde::to_vec(&vec![vec![1u64, 2]]).unwrap(),
            true,
        );
        // A struct as an array with one element too many: rmp-serde refuses it.
        answers_as_rmp_serde::<Pair>(&[0x93, 0x01, 0xc0, 0x02], false);
        // A key the type does not know is skipped, here and there: {"a": 1, "c": 2}.
        answers_as_rmp_serde::<Pair>(&[0x82, 0xa1, b'a', 0x01, 0xa1, b'c', 0x02], true);
        // Enums, binary data, extension types, invalid UTF-8, trailing bytes: rmp-serde's.
        answers_as_rmp_serde::<Kind>(&rmp_serde::to_vec(&Kind::One).unwrap(), false);
        answers_as_rmp_serde::<Kind>(&rmp_serde::to_vec(&Kind::Two(3)).unwrap(), false);
        answers_as_rmp_serde::<serde_bytes_like::Bytes>(&[0xc4, 0x02, 0x01, 0x02], false);
        answers_as_rmp_serde::<Vec<u8>>(&[0xc4, 0x02, 0x01, 0x02], false);
        answers_as_rmp_serde::<u64>(&[0xd4, 0x01, 0x02], false);
        answers_as_rmp_serde::<String>(&[0xa2, 0xff, 0xfe], false);
        answers_as_rmp_serde::<u64>(&[0x01, 0x02], false);
        answers_as_rmp_serde::<u64>(&[0xcd, 0x01], false);
        answers_as_rmp_serde::<String>(&[0xdb, 0xff, 0xff, 0xff, 0xff], false);
        // What the protocol refuses: NUL in a string or a key, a float that is not finite.
        answers_as_rmp_serde::<String>(&rmp_serde::to_vec("a\0b").unwrap(), false);
        answers_as_rmp_serde::<Pair>(&[0x81, 0xa2, b'a', 0, 0x01], false);
        for x in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            answers_as_rmp_serde::<f64>(&rmp_serde::to_vec(&x).unwrap(), false);
            answers_as_rmp_serde::<f32>(&rmp_serde::to_vec(&(x as f32)).unwrap(), false);
        }
    }

    #[test]
    fn deep_nesting_is_left_to_rmp_serde() {
        let mut nested = vec![0x91; 5_000];
        nested.push(0x01);
        assert!(read_quickly::<serde::de::IgnoredAny>(&nested).is_none());
        let mut shallow = vec![0x91; 32];
        shallow.push(0x01);
        assert!(read_quickly::<serde::de::IgnoredAny>(&shallow).is_some());
    }

    /// A byte string as serde's visitor sees one (the crate `serde_bytes` does the same).
    mod serde_bytes_like {
        #[derive(Debug, PartialEq)]
        pub struct Bytes(pub Vec<u8>);

        impl<'de> serde::Deserialize<'de> for Bytes {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Visit;
                impl serde::de::Visitor<'_> for Visit {
                    type Value = Bytes;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("bytes")
                    }
                    fn visit_bytes<E>(self, v: &[u8]) -> Result<Bytes, E> {
                        Ok(Bytes(v.to_vec()))
                    }
                }
                d.deserialize_bytes(Visit)
            }
        }
    }
}
