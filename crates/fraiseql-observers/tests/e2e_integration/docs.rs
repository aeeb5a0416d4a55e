//! Every configuration example and every condition in the docs is parsed here (a README once
//! showed syntax the parser did not accept).

use fraiseql_observers::condition::Condition;
use fraiseql_observers::config;

const README: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"));

/// The fenced blocks of `markdown` whose info string is `lang`.
fn blocks<'a>(markdown: &'a str, lang: &str) -> Vec<&'a str> {
    let fence = format!("```{lang}\n");
    let mut found = Vec::new();
    let mut rest = markdown;
    while let Some(start) = rest.find(&fence) {
        let body = &rest[start + fence.len()..];
        let end = body.find("```").expect("closed fence");
        found.push(&body[..end]);
        rest = &body[end..];
    }
    found
}

/// Plausible values for whatever the examples name: a secret, a URL, or a database.
fn env(name: &str) -> Option<String> {
    Some(if name == "FCM_SERVICE_ACCOUNT" {
        crate::push::service_account_json("https://oauth2.googleapis.com/token")
    } else if name == "REDIS_URL" {
        "redis://127.0.0.1:6379/0".to_string()
    } else if name == "NATS_URL" {
        "nats://127.0.0.1:4222".to_string()
    } else if name == "RABBITMQ_URL" {
        "amqp://guest:guest@127.0.0.1:5672/%2f".to_string()
    } else if name == "TWILIO_ACCOUNT_SID" {
        "AC0123456789abcdef0123456789abcdef".to_string()
    } else if name.ends_with("SECRET") {
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_string()
    } else if name == "DATABASE_URL" {
        "postgres://app@localhost:5432/app".to_string()
    } else if name.ends_with("URL") {
        "https://hooks.example.com/from-env".to_string()
    } else {
        format!("value-of-{name}")
    })
}

#[test]
fn every_toml_example_in_the_readme_loads() {
    let examples = blocks(README, "toml");
    assert!(examples.len() >= 2, "the README has configuration examples");
    for example in examples {
        if let Err(e) = config::load(example, &env) {
            panic!("README example does not load:\n{example}\n{e}");
        }
    }
}

#[test]
fn every_condition_in_the_readme_compiles() {
    let examples = blocks(README, "cel");
    assert!(!examples.is_empty());
    let mut n = 0;
    for block in examples {
        for line in block.lines() {
            let source = line.split("//").next().unwrap().trim();
            if source.is_empty() {
                continue;
            }
            Condition::compile(source).unwrap_or_else(|e| panic!("`{source}`: {e}"));
            n += 1;
        }
    }
    assert!(n >= 10, "{n} conditions");
}

#[test]
fn conditions_quoted_in_readme_tables_and_text_compile() {
    // Conditions written inline in the TOML examples are covered by the TOML test; these are the
    // ones quoted in prose.
    for source in [
        "event.change_status.startsWith('failed:')",
        "field_changed_to('status', 'shipped') && total > 100",
        "status == 'pending' && field_changed('x')",
    ] {
        Condition::compile(source).unwrap_or_else(|e| panic!("`{source}`: {e}"));
    }
}

/// Whether the README names `key` as a key: in backticks (`` `key` ``, `` `key = ...` ``), or
/// set in an example (`key = `), never as part of a longer name (`log_format` is not `format`).
fn names_key(key: &str) -> bool {
    let part_of_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    README.match_indices(key).any(|(at, _)| {
        let before = README[..at].chars().next_back();
        let after = &README[at + key.len()..];
        !before.is_some_and(|c| part_of_name(c) || c == '.')
            && !after.chars().next().is_some_and(part_of_name)
            && (before == Some('`') || after.starts_with(" ="))
    })
}

#[test]
fn every_configuration_key_is_in_the_readme() {
    let mut missing = Vec::new();
    for (table, keys) in config::keys() {
        for key in keys {
            if !names_key(key) {
                missing.push(format!("{table}: {key}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "configuration keys missing from README.md:\n{}",
        missing.join("\n")
    );
}

#[test]
fn every_design_document_name_is_in_the_readmes_table() {
    let section = README
        .split("### Design-document names")
        .nth(1)
        .expect("a \"Design-document names\" section");
    let rows: Vec<&str> = section.lines().filter(|l| l.starts_with('|')).collect();
    for alias in config::ALIASES {
        let (written, instead) = (alias.written(), alias.instead());
        assert!(
            rows.iter().any(|row| {
                let cells: Vec<&str> = row.split('|').map(str::trim).collect();
                cells.contains(&format!("`{written}`").as_str())
                    && cells.iter().any(|c| c.contains(&format!("`{instead}`")))
            }),
            "no row for `{written}` -> `{instead}` in the README's design-document names"
        );
    }
}

#[test]
fn every_metric_is_in_the_readme() {
    const METRICS: &str = include_str!("../../src/metrics.rs");
    let names: Vec<&str> = METRICS
        .split('"')
        .filter(|s| s.starts_with("fraiseql_observers_"))
        .collect();
    assert!(names.len() >= 15, "{names:?}");
    // The README may write a name in full or, after a full one, by its suffix (`_backlog`).
    let missing: Vec<&&str> = names
        .iter()
        .filter(|name| {
            let suffix = &name["fraiseql_observers".len()..];
            !README.contains(*name)
                && !README.contains(&format!("`{suffix}`"))
                && !README.contains(&format!("`{suffix}{{"))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "metrics missing from README.md: {missing:?}"
    );
}
