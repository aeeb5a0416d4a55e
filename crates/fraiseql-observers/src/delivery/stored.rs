//! Events as the retry queue and the dead letter queue store them (JSON), read back. Pure.
//!
//! Invariant: whatever the parser decodes can be read back. The parser parses a row's JSON with
//! serde_json's default nesting limit ([`DECODE_DEPTH`] levels); the stored event nests the
//! row's values up to two levels deeper (`changes` holds `{field, old, new}` objects), so reading
//! back with the default limit would refuse the deepest events that decode. Stored events are
//! read as text and parsed without serde_json's limit, after a scan ([`json_depth`]) checked they
//! nest at most [`STORED_DEPTH`] levels (the stack is never at risk); a deeper or invalid one is
//! an error naming the row, never a panic.

use crate::event::EntityEvent;
use serde::de::DeserializeOwned;

/// The deepest nesting serde_json parses by default, which the parser decodes a row's JSON with.
pub const DECODE_DEPTH: usize = 127;

/// The deepest stored event read back: [`DECODE_DEPTH`], plus the two levels an event adds to
/// a row's values, plus a margin.
pub const STORED_DEPTH: usize = DECODE_DEPTH + 8;

pub use crate::json_scan::{scan_json, JsonScan};

/// How deeply `text` nests arrays and objects (0 for a scalar): [`scan_json`]'s depth.
pub fn json_depth(text: &str) -> usize {
    scan_json(text).depth
}

/// Parse stored JSON text nesting at most [`STORED_DEPTH`] levels.
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let depth = json_depth(text);
    if depth > STORED_DEPTH {
        return Err(format!(
            "nests {depth} levels deep, more than the {STORED_DEPTH} read back"
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    deserializer.disable_recursion_limit();
    let value = T::deserialize(&mut deserializer).map_err(|e| e.to_string())?;
    deserializer.end().map_err(|e| e.to_string())?;
    Ok(value)
}

/// A stored event, from its JSON text.
pub fn event(text: &str) -> Result<EntityEvent, String> {
    parse(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;
    use crate::testing::order_event;
    use serde_json::{json, Value};

    fn nested(levels: usize) -> Value {
        (0..levels).fold(json!(1), |inner, _| json!({ "k": inner }))
    }

    #[test]
    fn the_scan_counts_containers_and_long_numbers_not_what_strings_hold() {
        assert_eq!(json_depth("1"), 0);
        assert!(scan_json("[1e400]").long_number);
        assert!(scan_json(&format!("[{}]", "9".repeat(300))).long_number);
        assert!(!scan_json(r#"{"e": 12.5, "s": "1e5"}"#).long_number);
        assert!(!scan_json(&format!("[\"{}\"]", "9".repeat(300))).long_number);
        assert_eq!(json_depth(r#"{"a":[1,{"b":"}}]]{{"}]}"#), 3);
        assert_eq!(json_depth(r#"["\"[[[", []]"#), 2);
        assert_eq!(json_depth(&nested(200).to_string()), 200);
    }

    #[test]
    fn the_deepest_event_that_decodes_reads_back() {
        // DECODE_DEPTH is serde_json's default limit.
        assert!(serde_json::from_str::<Value>(&nested(DECODE_DEPTH).to_string()).is_ok());
        assert!(serde_json::from_str::<Value>(&nested(DECODE_DEPTH + 1).to_string()).is_err());
        // The deepest value the parser accepts, as a field of an after-image (one level).
        let deepest = nested(DECODE_DEPTH - 1);
        assert!(serde_json::from_str::<Value>(&json!({ "doc": deepest }).to_string()).is_ok());
        let event = order_event(
            EventKind::Updated,
            Some(json!({ "doc": 1 })),
            Some(json!({ "doc": deepest })),
        );
        let text = serde_json::to_string(&event).unwrap();
        assert!(json_depth(&text) > DECODE_DEPTH, "the event nests deeper");
        assert!(
            serde_json::from_str::<EntityEvent>(&text).is_err(),
            "serde_json's default limit refuses it"
        );
        let back = super::event(&text).unwrap();
        assert_eq!(back.after, event.after);
        assert_eq!(back.changes_owned(), event.changes_owned());
    }

    #[test]
    fn too_deep_or_invalid_is_an_error_not_a_panic() {
        let deep = nested(STORED_DEPTH + 1).to_string();
        let e = parse::<Value>(&deep).unwrap_err();
        assert!(e.contains("nests 136 levels deep"), "{e}");
        let bottomless = "[".repeat(100_000);
        assert!(parse::<Value>(&bottomless).is_err());
        assert!(parse::<Value>("{\"a\": 1} trailing").is_err());
        assert!(event("{}").is_err());
    }
}
