//! The design document's names for keys (the phase 7 plan, FraiseQL's own observer
//! configuration): accepted, rewritten to ours before a table is read, each with a deprecation
//! warning naming the key to use instead.
//!
//! Invariants: the rewriting happens before [`crate::fields::parse_fields`] sees the table, so
//! every other rule (unknown keys, types, which keys go together) is checked on our names only;
//! setting both an alias and the key it stands for is an error; the aliases are listed once, in
//! [`ALIASES`] (the README's "design-document names" table shows the same rows).

use super::ConfigWarning;
use crate::error::ConfigError;

/// Which table an alias belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `[observers.runtime]`.
    Runtime,
    /// `[observers.runtime.email]`.
    Email,
    /// An action table of this `type`.
    Action(&'static str),
}

/// How an alias's value becomes ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Convert {
    /// The same value under our key.
    Same,
    /// One string becomes a list of one (`key_pattern = "k"` -> `keys = ["k"]`).
    IntoList,
    /// A duration string (`"30s"`, `"500ms"`, `"2m"`, `"1h"`) becomes milliseconds.
    DurationToMs,
}

/// One name of the design document and ours.
#[derive(Debug, Clone, Copy)]
pub struct Alias {
    pub scope: Scope,
    /// The design document's key.
    pub key: &'static str,
    /// For an alias of one value of `key` (email `tls = "start_tls"`): that value, and ours.
    pub value: Option<(&'static str, &'static str)>,
    /// Our key.
    pub ours: &'static str,
    convert: Convert,
}

const fn key(scope: Scope, key: &'static str, ours: &'static str, convert: Convert) -> Alias {
    Alias {
        scope,
        key,
        value: None,
        ours,
        convert,
    }
}

/// Every alias, in the order the README lists them.
pub const ALIASES: &[Alias] = &[
    key(
        Scope::Runtime,
        "max_concurrency",
        "concurrency",
        Convert::Same,
    ),
    key(
        Scope::Runtime,
        "shutdown_timeout",
        "shutdown_timeout_ms",
        Convert::DurationToMs,
    ),
    Alias {
        scope: Scope::Email,
        key: "tls",
        value: Some(("start_tls", "starttls")),
        ours: "tls",
        convert: Convert::Same,
    },
    key(Scope::Action("sms"), "phone", "to", Convert::Same),
    key(
        Scope::Action("sms"),
        "phone_template",
        "to_template",
        Convert::Same,
    ),
    key(
        Scope::Action("push"),
        "device_token",
        "token_template",
        Convert::Same,
    ),
    key(
        Scope::Action("cache"),
        "key_pattern",
        "keys",
        Convert::IntoList,
    ),
    key(Scope::Action("cache"), "action", "operation", Convert::Same),
];

impl Alias {
    /// How the README's table shows the alias: `phone` or `tls = "start_tls"`.
    pub fn written(&self) -> String {
        match self.value {
            None => self.key.to_string(),
            Some((alias, _)) => format!("{} = \"{alias}\"", self.key),
        }
    }

    /// How the README's table shows what to write instead: `to` or `tls = "starttls"`.
    pub fn instead(&self) -> String {
        match self.value {
            None => self.ours.to_string(),
            Some((_, ours)) => format!("{} = \"{ours}\"", self.ours),
        }
    }
}

/// Rewrite the aliases of `scope` in `table` (at `path`) to our keys: a warning for each alias
/// used, an error for an alias set beside its key or a value that cannot be converted.
pub(super) fn rewrite(
    table: &mut toml::Table,
    scope: Scope,
    path: &str,
    errors: &mut Vec<ConfigError>,
    warnings: &mut Vec<ConfigWarning>,
) {
    for alias in ALIASES.iter().filter(|a| a.scope == scope) {
        let at = format!("{path}.{}", alias.key);
        if let Some((old, new)) = alias.value {
            if table.get(alias.key).and_then(|v| v.as_str()) == Some(old) {
                table.insert(alias.ours.to_string(), toml::Value::String(new.into()));
                warnings.push(ConfigWarning::new(
                    at,
                    format!(
                        "{} is the design document's spelling, deprecated; write {}",
                        alias.written(),
                        alias.instead()
                    ),
                ));
            }
            continue;
        }
        let Some(value) = table.remove(alias.key) else {
            continue;
        };
        if table.contains_key(alias.ours) {
            errors.push(ConfigError::new(
                at,
                format!(
                    "'{}' is the design document's name for '{}', which is also set: keep only '{}'",
                    alias.key, alias.ours, alias.ours
                ),
            ));
            continue;
        }
        let converted = match alias.convert {
            Convert::Same => Ok(value),
            Convert::IntoList => match value {
                toml::Value::String(_) => Ok(toml::Value::Array(vec![value])),
                other => Err(format!("must be a string, not {}", other.type_str())),
            },
            Convert::DurationToMs => match value.as_str().map(duration_ms) {
                Some(Some(ms)) => Ok(toml::Value::Integer(ms)),
                _ => Err(format!(
                    "must be a duration such as \"30s\", \"500ms\" or \"2m\"; or write {} in milliseconds",
                    alias.ours
                )),
            },
        };
        match converted {
            Ok(value) => {
                let instead = match alias.convert {
                    Convert::DurationToMs => format!("{} = {value}", alias.ours),
                    Convert::IntoList => format!("{} = [...]", alias.ours),
                    Convert::Same => format!("'{}'", alias.ours),
                };
                table.insert(alias.ours.to_string(), value);
                warnings.push(ConfigWarning::new(
                    at,
                    format!(
                        "'{}' is the design document's name, deprecated; write {instead}",
                        alias.key
                    ),
                ));
            }
            Err(message) => errors.push(ConfigError::new(at, message)),
        }
    }
}

/// `"30s"`, `"500ms"`, `"2m"`, `"1h"` in milliseconds; `None` for anything else.
fn duration_ms(text: &str) -> Option<i64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: i64 = number.parse().ok()?;
    let factor = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    n.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(scope: Scope, toml: &str) -> (toml::Table, Vec<ConfigError>, Vec<ConfigWarning>) {
        let mut table: toml::Table = toml::from_str(toml).unwrap();
        let (mut errors, mut warnings) = (Vec::new(), Vec::new());
        rewrite(&mut table, scope, "t", &mut errors, &mut warnings);
        (table, errors, warnings)
    }

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(duration_ms("30s"), Some(30_000));
        assert_eq!(duration_ms("500ms"), Some(500));
        assert_eq!(duration_ms("2m"), Some(120_000));
        assert_eq!(duration_ms("1h"), Some(3_600_000));
        for bad in ["30", "s", "", "1.5s", "3d", "-1s"] {
            assert_eq!(duration_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_alias_becomes_our_key_with_a_warning() {
        let (table, errors, warnings) = run(
            Scope::Action("cache"),
            r#"key_pattern = "order:*"
               action = "invalidate""#,
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            table["keys"].as_array().unwrap()[0].as_str(),
            Some("order:*")
        );
        assert_eq!(table["operation"].as_str(), Some("invalidate"));
        assert!(!table.contains_key("key_pattern") && !table.contains_key("action"));
        let paths: Vec<_> = warnings.iter().map(|w| w.path.as_str()).collect();
        assert_eq!(paths, ["t.key_pattern", "t.action"]);
        assert!(warnings[0].message.contains("keys"), "{warnings:?}");
    }

    #[test]
    fn an_alias_beside_its_key_is_an_error() {
        let (_, errors, warnings) = run(
            Scope::Runtime,
            "max_concurrency = 4\nconcurrency = 8\nshutdown_timeout = \"soon\"",
        );
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["t.max_concurrency", "t.shutdown_timeout"]);
        assert!(errors[0].message.contains("keep only 'concurrency'"));
        assert!(warnings.is_empty());
    }

    #[test]
    fn a_value_alias_is_rewritten_and_other_values_are_left_alone() {
        let (table, errors, warnings) = run(Scope::Email, r#"tls = "start_tls""#);
        assert!(errors.is_empty());
        assert_eq!(table["tls"].as_str(), Some("starttls"));
        assert!(warnings[0].message.contains(r#"write tls = "starttls""#));
        let (table, _, warnings) = run(Scope::Email, r#"tls = "tls""#);
        assert_eq!(table["tls"].as_str(), Some("tls"));
        assert!(warnings.is_empty());
    }
}
