//! `validate`: every configuration error with its path and exit code 1; a good configuration
//! prints the compiled observers and exits 0. No database is involved.

use crate::harness::{cli, ConfigFile};

#[tokio::test]
async fn every_error_is_printed_with_its_path_and_the_exit_code_is_1() {
    let file = ConfigFile::new(
        r#"
[observers.runtime]
consumer_id = "orders"
pool_size = 4

[observers.shipped]
entity = "Order"
event_type = "UPDATE"
condition = "status == 'shipped' &&"

[[observers.shipped.actions]]
type = "webhook"
url = "https://hooks.example.com/orders"

[observers.welcome]
entity = "User"
event_type = "INSERT"

[[observers.welcome.actions]]
type = "webhook"
url = "https://hooks.example.com/users"
body_template = '{"email": {{ after.email }'
signing_secret_env = "FO_TEST_SECRET_THAT_IS_NOT_SET"
"#,
    );
    let out = cli(None, &["validate", "--config", file.arg()]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    let stderr = &out.stderr;
    for path in [
        "observers.runtime.pool_size: unknown key",
        "observers.shipped.condition: ",
        "observers.welcome.actions[0].body_template: ",
        "observers.welcome.actions[0].signing_secret_env: ",
    ] {
        assert!(
            stderr.lines().any(|l| l.starts_with(path)),
            "no line starting with {path:?} in:\n{stderr}"
        );
    }
    assert!(stderr.contains("FO_TEST_SECRET_THAT_IS_NOT_SET"));
    assert!(
        !out.stdout.contains("observer "),
        "observers printed for a bad configuration"
    );
}

#[tokio::test]
async fn a_good_configuration_prints_the_compiled_observers() {
    let file = ConfigFile::new(
        r##"
[database]
url = "postgres://nobody@127.0.0.1:1/none"

[observers.runtime]
consumer_id = "orders"
batch_size = 250

[observers.shipped]
entity = "Order"
event_type = ["UPDATE", "INSERT"]
condition = "field_changed_to('status', 'shipped') && total > 100"
tenant = "6f9619ff-8b86-d011-b42d-00c04fc964ff"
ordered = false
on_failure = "log"
retry = { max_attempts = 3, initial_delay_ms = 500, max_delay_ms = 5000, backoff_strategy = "linear", jitter = false }

[[observers.shipped.actions]]
type = "webhook"
url = "https://hooks.example.com/orders"

[[observers.shipped.actions]]
type = "slack"
webhook_url = "https://hooks.slack.com/services/T000/B000/XXXX"
channel = "#orders"
"##,
    );
    let out = cli(None, &["validate", "--config", file.arg()]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let stdout = &out.stdout;
    for expected in [
        "consumer_id             orders",
        "batch_size              250",
        "observer shipped",
        "entity                  Order",
        "event_types             UPDATE, INSERT",
        "condition               field_changed_to('status', 'shipped') && total > 100",
        "tenant                  6f9619ff-8b86-d011-b42d-00c04fc964ff",
        "ordered                 false",
        "on_failure              log",
        "max_attempts 3, linear backoff from 500 ms up to 5000 ms, jitter off",
        "actions[0]              webhook",
        "actions[1]              slack",
        "valid, 1 observer(s)",
    ] {
        assert!(stdout.contains(expected), "{expected:?} not in:\n{stdout}");
    }
    // The Slack URL is a secret: never printed.
    assert!(!stdout.contains("XXXX"));
}

#[tokio::test]
async fn validate_needs_a_configuration_file() {
    let out = cli(None, &["validate"]).await;
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("--config FILE"), "{}", out.all());
    let missing = cli(
        None,
        &["validate", "--config", "/nonexistent/observers.toml"],
    )
    .await;
    assert_eq!(missing.code, Some(1));
    assert!(missing
        .stderr
        .contains("cannot read /nonexistent/observers.toml"));
}

#[tokio::test]
async fn run_refuses_a_bad_configuration_with_every_error() {
    let file = ConfigFile::new(
        r#"
[observers.broken]
entity = "Order"
event_type = "INSERT"
condition = "total >"

[[observers.broken.actions]]
type = "email"
"#,
    );
    let out = cli(
        Some("postgres://nobody@127.0.0.1:1/none"),
        &["run", "--config", file.arg()],
    )
    .await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.stderr.contains("observers.broken.condition: "),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("observers.broken.actions[0].type: "),
        "{}",
        out.stderr
    );
}
