//! The flow-control keys every action accepts (and `[observers.runtime]` sets defaults for):
//!
//! ```toml
//! max_in_flight = 8                              # requests at once to this action's endpoint
//! rate_limit = { per_second = 50, burst = 10 }   # burst defaults to per_second, at least 1
//! ```
//!
//! Read here, with every mistake reported at its path; applied per endpoint by
//! `delivery::flow` (actions sharing an endpoint share the strictest limits).

use crate::error::ConfigError;
use crate::fields::parse_fields;
use serde::Deserialize;

/// The most `max_in_flight` can be.
pub const MAX_IN_FLIGHT: usize = 10_000;

/// A rate limit: `per_second` on average, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

/// An action's own flow-control settings; `None` takes the runtime-wide default.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Limits {
    pub max_in_flight: Option<usize>,
    pub rate_limit: Option<RateLimit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    per_second: Option<f64>,
    burst: Option<u32>,
}

/// Take the flow-control keys out of `table` (so the action's own parser sees only its keys) and
/// read them.
pub fn take(table: &mut toml::Table, path: &str) -> Result<Limits, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut limits = Limits::default();
    if let Some(value) = table.remove("max_in_flight") {
        limits.max_in_flight = max_in_flight(&value, &format!("{path}.max_in_flight"), &mut errors);
    }
    if let Some(value) = table.remove("rate_limit") {
        limits.rate_limit = rate_limit(&value, &format!("{path}.rate_limit"), &mut errors);
    }
    if errors.is_empty() {
        Ok(limits)
    } else {
        Err(errors)
    }
}

/// `max_in_flight`: a whole number from 1 to [`MAX_IN_FLIGHT`].
pub fn max_in_flight(
    value: &toml::Value,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<usize> {
    match value.as_integer() {
        Some(n) if (1..=MAX_IN_FLIGHT as i64).contains(&n) => Some(n as usize),
        _ => {
            errors.push(ConfigError::new(
                path,
                format!("must be a whole number from 1 to {MAX_IN_FLIGHT}"),
            ));
            None
        }
    }
}

/// `rate_limit = { per_second, burst }`: `per_second` above 0 (at most 1,000,000), `burst` from
/// 1 (default: `per_second` rounded up).
pub fn rate_limit(
    value: &toml::Value,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<RateLimit> {
    let Some(table) = value.as_table() else {
        errors.push(ConfigError::new(
            path,
            "must be a table: { per_second = N, burst = N }",
        ));
        return None;
    };
    let raw: RawRateLimit = match parse_fields(table, path) {
        Ok(raw) => raw,
        Err(e) => {
            errors.extend(e);
            return None;
        }
    };
    let per_second = match raw.per_second {
        Some(r) if r > 0.0 && r <= 1_000_000.0 => r,
        Some(_) => {
            errors.push(ConfigError::new(
                format!("{path}.per_second"),
                "must be above 0 and at most 1000000",
            ));
            return None;
        }
        None => {
            errors.push(ConfigError::new(format!("{path}.per_second"), "missing"));
            return None;
        }
    };
    let burst = match raw.burst {
        Some(0) => {
            errors.push(ConfigError::new(
                format!("{path}.burst"),
                "must be at least 1",
            ));
            return None;
        }
        Some(b) => b,
        None => per_second.ceil().max(1.0) as u32,
    };
    Some(RateLimit { per_second, burst })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(s: &str) -> toml::Table {
        toml::from_str(s).unwrap()
    }

    #[test]
    fn the_keys_are_taken_out_and_read() {
        let mut t = table("url = 'x'\nmax_in_flight = 4\nrate_limit = { per_second = 2.5 }");
        let limits = take(&mut t, "a").unwrap();
        assert_eq!(limits.max_in_flight, Some(4));
        assert_eq!(
            limits.rate_limit,
            Some(RateLimit {
                per_second: 2.5,
                burst: 3
            })
        );
        assert_eq!(
            t.keys().collect::<Vec<_>>(),
            ["url"],
            "only the action's own keys stay"
        );
        assert_eq!(
            take(&mut table("url = 'x'"), "a").unwrap(),
            Limits::default()
        );
    }

    #[test]
    fn every_mistake_is_reported_with_its_path() {
        let mut t = table("max_in_flight = 0\nrate_limit = { per_second = -1, bust = 2 }");
        let errors = take(&mut t, "observers.o.actions[0]").unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "observers.o.actions[0].max_in_flight",
                "observers.o.actions[0].rate_limit.bust"
            ],
            "{errors:?}"
        );
        let errors = take(
            &mut table("rate_limit = { burst = 0, per_second = 1 }"),
            "a",
        )
        .unwrap_err();
        assert_eq!(errors[0].path, "a.rate_limit.burst");
        let errors = take(&mut table("rate_limit = 5"), "a").unwrap_err();
        assert_eq!(errors[0].path, "a.rate_limit");
        let errors = take(&mut table("rate_limit = {}"), "a").unwrap_err();
        assert_eq!(errors[0].path, "a.rate_limit.per_second");
    }
}
