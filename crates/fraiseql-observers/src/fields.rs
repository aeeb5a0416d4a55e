//! Reading a TOML table into a raw configuration struct, with every mistake reported.
//!
//! Invariant: this module imports nothing of the crate, so both the configuration loader and the
//! actions (which read their own tables) use it without depending on each other. Errors come out
//! as [`FieldError`]s (a path and a message); callers turn them into their own error type.

use serde::de::{DeserializeOwned, Visitor};

/// One key of a table that cannot be read: unknown, or a value of the wrong type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// `table.key`, or the table's own path when the whole table is at fault.
    pub path: String,
    pub message: String,
}

/// Read a config struct from a table with every error reported: each unknown key, then each key
/// whose value has the wrong type (this works because every field of a raw config is optional).
pub fn parse_fields<T: DeserializeOwned, E: From<FieldError>>(
    table: &toml::Table,
    path: &str,
) -> Result<T, Vec<E>> {
    let error = |path: String, message: String| E::from(FieldError { path, message });
    let known = field_names::<T>();
    let mut errors = Vec::new();
    for key in table.keys() {
        if !known.contains(&key.as_str()) {
            errors.push(error(
                format!("{path}.{key}"),
                format!("unknown key; expected one of: {}", known.join(", ")),
            ));
            continue;
        }
        let mut single = toml::Table::new();
        single.insert(key.clone(), table[key].clone());
        if let Err(e) = toml::Value::Table(single).try_into::<T>() {
            errors.push(error(
                format!("{path}.{key}"),
                e.message().trim().to_string(),
            ));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    toml::Value::Table(table.clone())
        .try_into::<T>()
        .map_err(|e| vec![error(path.to_string(), e.message().trim().to_string())])
}

/// The field names a `#[derive(Deserialize)]` struct accepts, asked from serde itself.
pub fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);

    impl<'de> serde::Deserializer<'de> for Probe<'_> {
        type Error = serde::de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("probe"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(serde::de::Error::custom("probe"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Raw {
        url: Option<String>,
        timeout_ms: Option<u64>,
    }

    #[test]
    fn field_names_come_from_serde() {
        assert_eq!(field_names::<Raw>(), ["url", "timeout_ms"]);
    }

    #[test]
    fn every_unknown_key_and_wrong_type_is_reported() {
        let table: toml::Table = toml::from_str(
            r#"url = "x"
               urll = "x"
               timeout_ms = "fast""#,
        )
        .unwrap();
        let errors = parse_fields::<Raw, FieldError>(&table, "a").unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a.urll", "a.timeout_ms"], "{errors:?}");
        assert!(errors[0]
            .message
            .contains("expected one of: url, timeout_ms"));
    }
}
