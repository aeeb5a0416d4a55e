//! Byte scans of JSON text, for the per-event paths that must not parse what they only copy.
//! Pure: no I/O.
//!
//! * [`scan_json`]: the nesting depth of any text and whether it holds a number serde_json may
//!   refuse to read (not a validation: what a stored event's reader checks before parsing).
//! * [`scan_object`]: one validating pass over a JSON object's text that also reports its
//!   top-level fields (keys and values' text), its depth and long numbers. It accepts only what
//!   serde_json's own pass (`deserialize_map` of `&RawValue` values, then `end()`) accepts;
//!   what it cannot decide cheaply (a nesting deeper than [`SCAN_DEPTH`], a key whose escapes do
//!   not decode) it leaves to serde_json by answering `None`, so callers keep serde_json's path
//!   for those texts and for every error message.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// What a scan of JSON text finds without parsing it (strings skipped, escapes included; the
/// text is not otherwise validated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonScan {
    /// How deeply it nests arrays and objects (0 for a scalar).
    pub depth: usize,
    /// Whether it holds a number serde_json may not read without parsing it in full: one written
    /// with an exponent, or with 300 and more digits (beyond f64's range).
    pub long_number: bool,
}

/// Scan `text` once: its nesting depth and whether it holds a long number.
pub fn scan_json(text: &str) -> JsonScan {
    let (mut depth, mut max) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    let (mut digits, mut long_number) = (0usize, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'0'..=b'9' => {
                digits += 1;
                long_number |= digits >= LONG_DIGITS;
                continue;
            }
            b'e' | b'E' if digits > 0 => long_number = true,
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        digits = 0;
    }
    JsonScan {
        depth: max,
        long_number,
    }
}

/// A run of this many digits makes a number "long" (see [`JsonScan::long_number`]).
const LONG_DIGITS: usize = 300;

/// The deepest nesting [`scan_object`] follows (the object itself is level 1); deeper text is
/// left to serde_json. One more than the depth the parser accepts, so that its limit is decided
/// by the scan's `depth`.
pub const SCAN_DEPTH: usize = 128;

/// A JSON object's top-level fields: each key (decoded) and its value's text.
pub type Fields<'a> = Vec<(Cow<'a, str>, &'a str)>;

/// A JSON object's text, scanned: see [`scan_object`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectScan<'a> {
    /// The object's text, without the whitespace around it (as a `RawValue` of it would be).
    pub object: &'a str,
    /// Its top-level fields in text order (repeated keys repeated): the key (decoded when it
    /// has escapes) and the value's text (without the whitespace around it).
    pub fields: Fields<'a>,
    /// How deeply it nests arrays and objects (at least 1: the object).
    pub depth: usize,
    /// As [`JsonScan::long_number`].
    pub long_number: bool,
}

/// One pass over `text`: `Some` when it is one JSON object (whitespace around it allowed)
/// that serde_json reads without error when it skips the values (as it does deserializing
/// `&RawValue`s), nested at most [`SCAN_DEPTH`] levels, every key decoding; `None` otherwise
/// (invalid, not an object, or left to serde_json).
///
/// Strings are checked as serde_json checks them when it skips them: no control character,
/// escapes among `\" \\ \/ \b \f \n \r \t \uXXXX` (the text is UTF-8 already, being a `str`).
/// Numbers follow JSON's grammar; literals are `true`, `false`, `null`.
pub fn scan_object(text: &str) -> Option<ObjectScan<'_>> {
    let mut s = Scanner {
        bytes: text.as_bytes(),
        at: 0,
        depth: 1,
        max_depth: 1,
        long_number: false,
    };
    s.whitespace();
    let start = s.at;
    if s.next()? != b'{' {
        return None;
    }
    let mut fields = Vec::with_capacity(24);
    s.whitespace();
    if s.peek() == Some(b'}') {
        s.at += 1;
    } else {
        loop {
            if s.next()? != b'"' {
                return None;
            }
            let key_start = s.at - 1;
            let escaped = s.string()?;
            let key = if escaped {
                Cow::Owned(serde_json::from_str::<String>(&text[key_start..s.at]).ok()?)
            } else {
                Cow::Borrowed(&text[key_start + 1..s.at - 1])
            };
            s.whitespace();
            if s.next()? != b':' {
                return None;
            }
            s.whitespace();
            let value_start = s.at;
            s.value()?;
            fields.push((key, &text[value_start..s.at]));
            s.whitespace();
            match s.next()? {
                b',' => s.whitespace(),
                b'}' => break,
                _ => return None,
            }
        }
    }
    let end = s.at;
    s.whitespace();
    if s.at != text.len() {
        return None;
    }
    Some(ObjectScan {
        object: &text[start..end],
        fields,
        depth: s.max_depth,
        long_number: s.long_number,
    })
}

/// The bytes that end the fast part of a string: `"`, `\` and control characters.
const STOPS_STRING: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

struct Scanner<'a> {
    bytes: &'a [u8],
    at: usize,
    /// The current nesting (1 inside the top-level object).
    depth: usize,
    max_depth: usize,
    long_number: bool,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.at += 1;
        Some(b)
    }

    /// JSON's whitespace, as serde_json skips it.
    fn whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    /// The rest of a string whose opening quote was read; `Some(true)` when it had escapes.
    fn string(&mut self) -> Option<bool> {
        let mut escaped = false;
        loop {
            self.skip_plain();
            match self.next()? {
                b'"' => return Some(escaped),
                b'\\' => {
                    escaped = true;
                    match self.next()? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                        b'u' => {
                            let hex = self.bytes.get(self.at..self.at + 4)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            self.at += 4;
                        }
                        _ => return None,
                    }
                }
                _ => return None, // a control character
            }
        }
    }

    /// Move to the next `"`, `\` or control character (or the end), eight bytes at a time
    /// where it can (the test serde_json uses, without `unsafe`).
    fn skip_plain(&mut self) {
        const ONES: u64 = u64::MAX / 255;
        const HIGH: u64 = ONES << 7;
        while let Some(chunk) = self.bytes.get(self.at..self.at + 8) {
            let chars = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
            let control = chars.wrapping_sub(ONES * 0x20) & !chars;
            let quote = chars ^ (ONES * u64::from(b'"'));
            let quote = quote.wrapping_sub(ONES) & !quote;
            let backslash = chars ^ (ONES * u64::from(b'\\'));
            let backslash = backslash.wrapping_sub(ONES) & !backslash;
            let found = (control | quote | backslash) & HIGH;
            if found != 0 {
                // The lowest flagged byte is the first stop (a borrow only flags bytes above).
                self.at += found.trailing_zeros() as usize / 8;
                break;
            }
            self.at += 8;
        }
        while let Some(&b) = self.bytes.get(self.at) {
            if STOPS_STRING[usize::from(b)] {
                return;
            }
            self.at += 1;
        }
    }

    /// A run of digits; how many.
    fn digits(&mut self) -> usize {
        let start = self.at;
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
        let n = self.at - start;
        self.long_number |= n >= LONG_DIGITS;
        n
    }

    /// The rest of a number whose first byte (`-` or a digit) was read.
    fn number(&mut self, first: u8) -> Option<()> {
        let first = if first == b'-' { self.next()? } else { first };
        match first {
            b'0' => {
                if let Some(b'0'..=b'9') = self.peek() {
                    return None;
                }
            }
            b'1'..=b'9' => {
                if 1 + self.digits() >= LONG_DIGITS {
                    self.long_number = true;
                }
            }
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            self.long_number = true;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    fn literal(&mut self, rest: &[u8]) -> Option<()> {
        if self.bytes.get(self.at..self.at + rest.len())? != rest {
            return None;
        }
        self.at += rest.len();
        Some(())
    }

    /// One key and its colon inside an object (the text starts at the key's quote).
    fn key(&mut self) -> Option<()> {
        if self.next()? != b'"' {
            return None;
        }
        self.string()?;
        self.whitespace();
        if self.next()? != b':' {
            return None;
        }
        self.whitespace();
        Some(())
    }

    /// One value (the text starts at its first byte), ending at its last byte. Nested
    /// containers are followed with a bit per level (object or array), not recursion.
    fn value(&mut self) -> Option<()> {
        let base = self.depth;
        // Bit `level - base - 1`: whether that level is an object.
        let mut objects: u128 = 0;
        loop {
            // At the first byte of a value.
            match self.next()? {
                b'"' => {
                    self.string()?;
                }
                open @ (b'{' | b'[') => {
                    if self.depth >= SCAN_DEPTH {
                        return None;
                    }
                    let is_object = open == b'{';
                    let bit = 1u128 << (self.depth - base);
                    if is_object {
                        objects |= bit;
                    } else {
                        objects &= !bit;
                    }
                    self.depth += 1;
                    self.max_depth = self.max_depth.max(self.depth);
                    self.whitespace();
                    let close = if is_object { b'}' } else { b']' };
                    if self.peek() == Some(close) {
                        self.at += 1;
                        self.depth -= 1;
                    } else {
                        if is_object {
                            self.key()?;
                        }
                        continue;
                    }
                }
                b't' => self.literal(b"rue")?,
                b'f' => self.literal(b"alse")?,
                b'n' => self.literal(b"ull")?,
                first @ (b'-' | b'0'..=b'9') => self.number(first)?,
                _ => return None,
            }
            // After a value: close containers until one goes on with a comma.
            loop {
                if self.depth == base {
                    return Some(());
                }
                let is_object = objects & (1u128 << (self.depth - base - 1)) != 0;
                self.whitespace();
                match self.next()? {
                    b',' => {
                        self.whitespace();
                        if is_object {
                            self.key()?;
                        }
                        break;
                    }
                    b'}' if is_object => self.depth -= 1,
                    b']' if !is_object => self.depth -= 1,
                    _ => return None,
                }
            }
        }
    }
}

/// serde_json's reading of a JSON object's top-level fields (text order, keys decoded, values'
/// text without the whitespace around them), for what [`scan_object`] leaves to it, and for its
/// error messages. No nesting limit: the caller checks the depth first.
pub fn object_fields_by_serde(text: &str) -> Result<Fields<'_>, serde_json::Error> {
    struct Fields;
    impl<'de> Visitor<'de> for Fields {
        type Value = Vec<(Cow<'de, str>, &'de str)>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(16));
            while let Some(key) = map.next_key::<Key<'de>>()? {
                fields.push((key.0, map.next_value::<&'de RawValue>()?.get()));
            }
            Ok(fields)
        }
    }
    struct Key<'a>(Cow<'a, str>);
    impl<'de> Deserialize<'de> for Key<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct KeyVisitor;
            impl<'de> Visitor<'de> for KeyVisitor {
                type Value = Key<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a string")
                }
                fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                    Ok(Key(Cow::Borrowed(v)))
                }
                fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                    Ok(Key(Cow::Owned(v.to_string())))
                }
                fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                    Ok(Key(Cow::Owned(v)))
                }
            }
            d.deserialize_str(KeyVisitor)
        }
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    deserializer.disable_recursion_limit();
    let fields = deserializer.deserialize_map(Fields)?;
    deserializer.end()?;
    Ok(fields)
}

#[cfg(test)]
mod tests;
