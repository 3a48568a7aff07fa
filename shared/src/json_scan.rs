//! Where JSON values begin and end, found without parsing what they hold.
//!
//! An envelope's payload is parsed into its typed message, and its text is also kept (the
//! store writes it as received). serde_json's `RawValue` finds the text's end by parsing
//! the value, every number digit by digit, and then the typed parse reads it all again: for
//! a drift summary of about 500 numbers that first pass was a third of the decode. This
//! scan only follows strings and brackets. It trusts nothing: whatever it finds is parsed
//! by serde_json afterwards, and callers fall back to serde_json's own parse, which gives
//! the precise error, as soon as anything is not as expected.

use std::ops::Range;

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn skip_space(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && is_space(b[i]) {
        i += 1;
    }
    i
}

const ONES: u64 = 0x0101_0101_0101_0101;
const LOW7: u64 = 0x7f * ONES;

/// The high bit of each byte of `w` that is zero, and no other bit (no carry crosses a
/// byte: each byte's low seven bits plus 0x7f stay under 0x100).
fn zero_bytes(w: u64) -> u64 {
    !(((w & LOW7) + LOW7) | w | LOW7)
}

/// The high bit of each of eight bytes (little-endian) that is `"`, `[`, `]`, `{` or `}`
/// (`[` and `{`, `]` and `}` differ only in bit 5).
fn quotes_and_brackets(w: u64) -> u64 {
    let folded = w | (0x20 * ONES);
    zero_bytes(w ^ (b'"' as u64 * ONES))
        | zero_bytes(folded ^ (b'{' as u64 * ONES))
        | zero_bytes(folded ^ (b'}' as u64 * ONES))
}

/// The index just past the string whose opening quote is at `start`.
fn string_end(b: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    None
}

/// The index just past the JSON value that starts at `start`; `None` when the text ends
/// first or the value is empty. Brackets are counted, not matched: in valid JSON the count
/// finds the end, and invalid JSON fails the parse that follows.
pub(crate) fn value_end(b: &[u8], start: usize) -> Option<usize> {
    match *b.get(start)? {
        b'"' => string_end(b, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            loop {
                // Numbers and commas are most of a summary: eight bytes at a time past them,
                // to the next quote or bracket.
                while let Some(chunk) = b.get(i..i + 8) {
                    let found = quotes_and_brackets(u64::from_le_bytes(chunk.try_into().ok()?));
                    if found != 0 {
                        i += found.trailing_zeros() as usize / 8;
                        break;
                    }
                    i += 8;
                }
                match *b.get(i)? {
                    b'"' => {
                        i = string_end(b, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        b',' | b'}' | b']' | b':' => None,
        _ => {
            let mut i = start;
            while i < b.len() && !matches!(b[i], b',' | b'}' | b']' | b':') && !is_space(b[i]) {
                i += 1;
            }
            Some(i)
        }
    }
}

/// Walks the comma-separated list between `open` and `close` that `b` holds, whitespace
/// around it allowed: `item` reads the element that starts at an index (not whitespace)
/// and returns the index just past it. `None` when `b` is not one such list.
fn walk_list(
    b: &[u8],
    open: u8,
    close: u8,
    mut item: impl FnMut(usize) -> Option<usize>,
) -> Option<()> {
    let mut i = skip_space(b, 0);
    if b.get(i) != Some(&open) {
        return None;
    }
    i = skip_space(b, i + 1);
    if b.get(i) != Some(&close) {
        loop {
            i = skip_space(b, item(i)?);
            match b.get(i) {
                Some(b',') => i = skip_space(b, i + 1),
                Some(c) if *c == close => break,
                _ => return None,
            }
        }
    }
    (skip_space(b, i + 1) == b.len()).then_some(())
}

/// The fields of the JSON object that `b` holds, whitespace around it allowed: each key's
/// text (between its quotes, as written) and its value's range in `b`. `None` when `b` is
/// not one object or a key holds an escape (the caller's full parse decides those).
pub(crate) fn object_fields(b: &[u8]) -> Option<Vec<(&[u8], Range<usize>)>> {
    let mut fields = Vec::with_capacity(8);
    walk_list(b, b'{', b'}', |i| {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(b, i)?;
        let key = &b[i + 1..key_end - 1];
        if key.contains(&b'\\') {
            return None;
        }
        let colon = skip_space(b, key_end);
        if b.get(colon) != Some(&b':') {
            return None;
        }
        let start = skip_space(b, colon + 1);
        let end = value_end(b, start)?;
        fields.push((key, start..end));
        Some(end)
    })?;
    Some(fields)
}

/// The ranges of the items of the JSON array that `b` holds, whitespace around it allowed;
/// `None` when `b` is not one array.
pub(crate) fn array_items(b: &[u8]) -> Option<Vec<Range<usize>>> {
    let mut items = Vec::new();
    walk_list(b, b'[', b']', |i| {
        let end = value_end(b, i)?;
        items.push(i..end);
        Some(end)
    })?;
    Some(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts<'a>(b: &'a str, ranges: &[Range<usize>]) -> Vec<&'a str> {
        ranges.iter().map(|r| &b[r.clone()]).collect()
    }

    #[test]
    fn values_end_where_serde_json_says_they_do() {
        let doc = r#" { "a" : [1, {"b":"]}\"\\"}, -2.5e3] ,"c":"x,y}","d":null, "e" : {} } "#;
        let fields = object_fields(doc.as_bytes()).unwrap();
        let keys: Vec<&[u8]> = fields.iter().map(|f| f.0).collect();
        assert_eq!(keys, [&b"a"[..], b"c", b"d", b"e"]);
        let values: Vec<Range<usize>> = fields.into_iter().map(|f| f.1).collect();
        let values = texts(doc, &values);
        assert_eq!(
            values,
            [r#"[1, {"b":"]}\"\\"}, -2.5e3]"#, r#""x,y}""#, "null", "{}"]
        );
        for v in values {
            let raw: &serde_json::value::RawValue = serde_json::from_str(v).unwrap();
            assert_eq!(raw.get(), v);
        }
        let array = r#"[ {"a":[1,2]} , "s" ,3,[ ]]"#;
        let items = array_items(array.as_bytes()).unwrap();
        assert_eq!(
            texts(array, &items),
            [r#"{"a":[1,2]}"#, r#""s""#, "3", "[ ]"]
        );
        assert_eq!(array_items(b" [ ] ").unwrap(), Vec::<Range<usize>>::new());
        assert_eq!(object_fields(b"{}").unwrap().len(), 0);
    }

    #[test]
    fn eight_bytes_at_a_time_miss_no_quote_or_bracket() {
        for special in *b"\"[]{}" {
            for at in 0..8 {
                let mut w = *b"12,34.5e";
                w[at] = special;
                let found = quotes_and_brackets(u64::from_le_bytes(w));
                assert_eq!(found, 0x80 << (8 * at), "{special} at {at}");
                // Every special byte is marked, not only the first.
                w[7 - at] = b'"';
                let found = quotes_and_brackets(u64::from_le_bytes(w));
                assert_eq!(found, (0x80 << (8 * at)) | (0x80 << (8 * (7 - at))));
            }
        }
        for byte in (0..=255u8).filter(|b| !b"\"[]{}".contains(b)) {
            assert_eq!(
                quotes_and_brackets(u64::from_le_bytes([byte; 8])),
                0,
                "{byte}"
            );
        }
        // A bracket at every offset of a long run of digits.
        for at in 0..40 {
            let mut text = vec![b'1'; 40];
            text[at] = b']';
            let mut doc = b"[[".to_vec();
            doc.extend_from_slice(&text);
            doc.push(b']');
            assert_eq!(value_end(&doc, 1), Some(2 + at + 1));
        }
    }

    #[test]
    fn anything_unexpected_is_left_to_the_full_parse() {
        for bad in [
            "",
            "[]",
            "{",
            r#"{"a":1"#,
            r#"{"a":1,}"#,
            r#"{"a" 1}"#,
            r#"{"a":}"#,
            r#"{a:1}"#,
            r#"{"a":1} x"#,
            r#"{"a":1}{}"#,
            r#"{"a\u0062":1}"#,
            r#"{"a":"open}"#,
            r#"{"a":[1,2}"#,
        ] {
            assert!(object_fields(bad.as_bytes()).is_none(), "{bad}");
        }
        for bad in ["", "{}", "[", "[1,]", "[1 2]", "[1],", "[,]", r#"["a]"#] {
            assert!(array_items(bad.as_bytes()).is_none(), "{bad}");
        }
    }
}
