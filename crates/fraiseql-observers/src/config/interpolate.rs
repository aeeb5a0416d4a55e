//! `${VAR}` references in string values, expanded through the caller's environment lookup.

use crate::error::ConfigError;

/// Replace `${VAR}` (and `${VAR:-default}`) in every string value; `$$` is a literal `$`.
pub(super) fn interpolate_table(
    table: &mut toml::Table,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) {
    for (key, value) in table.iter_mut() {
        let p = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        interpolate_value(value, &p, env, errors);
    }
}

fn interpolate_value(
    value: &mut toml::Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) {
    match value {
        toml::Value::String(s) if s.contains('$') => match interpolate(s, env) {
            Ok(v) => *s = v,
            Err(message) => errors.push(ConfigError::new(path, message)),
        },
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate_value(item, &format!("{path}[{i}]"), env, errors);
            }
        }
        toml::Value::Table(t) => interpolate_table(t, path, env, errors),
        _ => {}
    }
}

/// Expand `${VAR}`, `${VAR:-default}` and `$$` in `s`.
pub fn interpolate(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unclosed '${{' in '{s}'"))?;
            let inner = &body[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("'${{{inner}}}' is not a valid variable reference"));
            }
            match (env(name), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => return Err(format!("environment variable {name} is not set")),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "HOOK_URL").then(|| "http://127.0.0.1:9/hook".into())
    }

    #[test]
    fn interpolation_expands_defaults_and_escapes() {
        assert_eq!(
            interpolate("a${HOOK_URL}b", &env).unwrap(),
            "ahttp://127.0.0.1:9/hookb"
        );
        assert_eq!(interpolate("${NOPE:-x}", &env).unwrap(), "x");
        assert_eq!(interpolate("$$5 and $x", &env).unwrap(), "$5 and $x");
        assert!(interpolate("${NOPE}", &env)
            .unwrap_err()
            .contains("NOPE is not set"));
        assert!(interpolate("${OPEN", &env).is_err());
    }
}
