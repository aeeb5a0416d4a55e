//! The scan against serde_json: whatever the scan accepts, serde_json accepts, with the same
//! fields; what serde_json accepts, the scan accepts too (except what it leaves to serde_json).

use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// serde_json's answer for `text`: its top-level fields (text order) and the object's text.
fn by_serde(text: &str) -> Option<(Fields<'_>, &str)> {
    let fields = object_fields_by_serde(text).ok()?;
    let object: &serde_json::value::RawValue = serde_json::from_str(text).ok()?;
    Some((fields, object.get()))
}

/// Check the scan against serde_json on one text; whether the scan accepted it.
fn agree(text: &str) -> bool {
    let serde = by_serde(text);
    match scan_object(text) {
        Some(scan) => {
            let (fields, object) = serde.unwrap_or_else(|| panic!("serde refuses {text:?}"));
            assert_eq!(scan.fields, fields, "{text:?}");
            assert_eq!(scan.object, object, "{text:?}");
            let bytes = scan_json(text);
            assert_eq!(scan.depth, bytes.depth, "{text:?}");
            assert_eq!(scan.long_number, bytes.long_number, "{text:?}");
            true
        }
        None => false,
    }
}

fn accepted(text: &str) {
    assert!(agree(text), "the scan refuses {text:?}");
}

fn refused(text: &str) {
    assert!(!agree(text), "the scan accepts {text:?}");
    assert!(by_serde(text).is_none(), "serde accepts {text:?}");
}

#[test]
fn the_scan_reads_what_serde_json_reads() {
    for text in [
        "{}",
        " \n\t\r{ }\r\n ",
        r#"{"a":1}"#,
        r#"{"id": 7, "note": "caf\u00e9 \"quoted\" \\ back\nslash", "total": 10.50}"#,
        r#"{"a\"b": 1, "c\\": 2, "\\\"": 3, "e\u00e9": 4, "\ud83d\ude00": 5, "\/": 6}"#,
        r#"{"emoji": "😀 é ü", "ctrl": "\u0001\t\b\f\r", "del": "", "slash": "a\/b"}"#,
        r#"{"s": "ends with backslash \\", "t": "\\\\\"", "u": "\"", "v": ""}"#,
        r#"{"n": [1, -0, 0.5, -12.25e3, 1E+2, 3e-4, 123456789012345678901234567890]}"#,
        r#"{"nested": {"a": [1, [2, [3, {"b": {"c": []}}]], {}], "d": {"e": [{}]}}}"#,
        r#"{"id": 7, "id": 8, "x": {"y": 1, "y": 2}}"#,
        r#"{"t": true, "f": false, "n": null, "a": [true,false,null]}"#,
        r#"{"k": "}]{[\"", "l": "]", "m": "{"}"#,
        "{\"a\" : 1 ,\n  \"b\"\t:\r[ 1 , 2 ] , \"c\" : { \"d\" : \"e\" } }",
        "{\"lone\": \"\\ud800\"}",
        "{\"lone\": \"\\udc00x\"}",
        r#"{"long": 1e400, "also": 2}"#,
    ] {
        accepted(text);
    }
    accepted(&format!(r#"{{"n": {}}}"#, "9".repeat(299)));
    accepted(&format!(r#"{{"n": -{}.5}}"#, "9".repeat(300)));
    accepted(&format!(r#"{{"n": 0.{}}}"#, "1".repeat(300)));
    accepted(&format!(r#"{{"s": "{}"}}"#, "9".repeat(300)));
    // The deepest the scan follows, and one deeper (left to serde_json).
    let deep = |levels: usize| {
        let inner = "[".repeat(levels - 1) + &"]".repeat(levels - 1);
        format!(r#"{{"a": {inner}}}"#)
    };
    accepted(&deep(SCAN_DEPTH));
    assert!(scan_object(&deep(SCAN_DEPTH + 1)).is_none());
    assert!(by_serde(&deep(SCAN_DEPTH + 1)).is_some());
}

#[test]
fn the_scan_refuses_what_serde_json_refuses() {
    for text in [
        "",
        " ",
        "[]",
        "1",
        "\"s\"",
        "null",
        "{",
        "}",
        "{\"a\"}",
        "{\"a\":}",
        "{\"a\":1,}",
        "{,}",
        "{\"a\":1 \"b\":2}",
        "{\"a\":1}}",
        "{\"a\":1} x",
        "{\"a\":1}{}",
        "{a:1}",
        "{'a':1}",
        "{\"a\":[1,]}",
        "{\"a\":[,1]}",
        "{\"a\":[1 2]}",
        "{\"a\":[}",
        "{\"a\":{]}",
        "{\"a\":{\"b\"]}",
        "{\"a\":{\"b\":1]}",
        "{\"a\":[1}",
        "{\"a\":01}",
        "{\"a\":-}",
        "{\"a\":1.}",
        "{\"a\":.5}",
        "{\"a\":1e}",
        "{\"a\":1e+}",
        "{\"a\":+1}",
        "{\"a\":0x1}",
        "{\"a\":tru}",
        "{\"a\":True}",
        "{\"a\":nul}",
        "{\"a\":NaN}",
        "{\"a\":\"\u{1}\"}",
        "{\"a\":\"line\nbreak\"}",
        "{\"a\":\"\\x\"}",
        "{\"a\":\"\\u12\"}",
        "{\"a\":\"\\u12g4\"}",
        "{\"a\":\"open}",
        "{\"a\":\"ends in \\\"}",
        "{\"a\u{1}\":1}",
        "{\"a\\q\":1}",
        "{\"a\":1\u{a0}}",
        "{\"a\":1,\"b\"",
    ] {
        refused(text);
    }
}

/// Random JSON text: the shapes jsonb writes and others (whitespace anywhere, escapes, unicode,
/// repeated keys, numbers in every form).
struct Gen {
    rng: StdRng,
}

impl Gen {
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.rng.random_range(0..items.len())]
    }

    fn space(&mut self, out: &mut String) {
        let s = self.pick(&["", "", "", " ", " ", "\n", "\t", "\r\n  ", "  "]);
        out.push_str(s);
    }

    fn string(&mut self, out: &mut String) {
        out.push('"');
        for _ in 0..self.rng.random_range(0..12) {
            let piece = self.pick(&[
                "a",
                "Z",
                "0",
                " ",
                "é",
                "😀",
                "ü",
                "日本",
                "/",
                "\\/",
                "\\\"",
                "\\\\",
                "\\n",
                "\\t",
                "\\b",
                "\\f",
                "\\r",
                "\\u0001",
                "\\u00e9",
                "\\uD83D\\uDE00",
                "\\u001F",
                "\u{7f}",
                "}",
                "]",
                "{",
                "[",
                ",",
                ":",
                "e",
                "1",
            ]);
            out.push_str(piece);
        }
        if self.rng.random_range(0..20) == 0 {
            out.push_str(&"x".repeat(self.rng.random_range(8..200)));
        }
        out.push('"');
    }

    fn number(&mut self, out: &mut String) {
        let n = self.pick(&[
            "0",
            "-0",
            "7",
            "-12",
            "10.50",
            "10.5",
            "-3.25e3",
            "1E+2",
            "2e-3",
            "123456789012345678901234567890",
            "0.000001",
            "18446744073709551616",
            "-9223372036854775809",
        ]);
        out.push_str(n);
    }

    fn value(&mut self, out: &mut String, depth: usize) {
        let kinds = if depth >= 6 { 4 } else { 6 };
        match self.rng.random_range(0..kinds) {
            0 => self.string(out),
            1 => self.number(out),
            2 => out.push_str(self.pick(&["true", "false", "null"])),
            3 => self.string(out),
            4 => self.object(out, depth + 1),
            _ => {
                out.push('[');
                self.space(out);
                for i in 0..self.rng.random_range(0..5) {
                    if i > 0 {
                        self.space(out);
                        out.push(',');
                        self.space(out);
                    }
                    self.value(out, depth + 1);
                }
                self.space(out);
                out.push(']');
            }
        }
    }

    fn object(&mut self, out: &mut String, depth: usize) {
        out.push('{');
        self.space(out);
        for i in 0..self.rng.random_range(0..8) {
            if i > 0 {
                self.space(out);
                out.push(',');
                self.space(out);
            }
            if self.rng.random_range(0..3) == 0 {
                // Keys that repeat.
                out.push_str(self.pick(&["\"id\"", "\"status\"", "\"a\\u0062\"", "\"ab\""]));
            } else {
                self.string(out);
            }
            self.space(out);
            out.push(':');
            self.space(out);
            self.value(out, depth);
        }
        self.space(out);
        out.push('}');
    }

    fn text(&mut self) -> String {
        let mut out = String::new();
        self.space(&mut out);
        self.object(&mut out, 1);
        self.space(&mut out);
        out
    }
}

#[test]
fn random_objects_scan_as_serde_json_reads_them() {
    let mut gen = Gen {
        rng: StdRng::seed_from_u64(12),
    };
    for _ in 0..20_000 {
        let text = gen.text();
        accepted(&text);
    }
}

/// Texts a byte or two away from valid ones: whatever the scan accepts, serde_json accepts
/// with the same fields.
#[test]
fn damaged_objects_are_never_accepted_by_the_scan_alone() {
    let mut gen = Gen {
        rng: StdRng::seed_from_u64(7),
    };
    let (mut kept, mut refused) = (0, 0);
    for _ in 0..30_000 {
        let mut text = gen.text();
        for _ in 0..gen.rng.random_range(1..3) {
            let mut at = gen.rng.random_range(0..=text.len());
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            match gen.rng.random_range(0..3) {
                0 if at < text.len() => {
                    text.remove(at);
                }
                _ => {
                    let piece = gen.pick(&[
                        "{", "}", "[", "]", "\"", ",", ":", "\\", " ", "0", "-", ".", "e", "\u{1}",
                        "\n", "u", "x", "n", "t", "ab",
                    ]);
                    text.insert_str(at, piece);
                }
            }
        }
        if agree(&text) {
            kept += 1;
        } else {
            // The scan refused: then serde_json refuses too, or the text is one it leaves to
            // serde_json (none of these: they are shallow and their keys decode or fail alike).
            assert!(by_serde(&text).is_none(), "the scan refuses {text:?}");
            refused += 1;
        }
    }
    assert!(kept > 1_000 && refused > 1_000, "{kept} {refused}");
}
