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
