//! `validate`: every configuration error with its path and exit code 1; a good configuration
//! prints the compiled observers and exits 0. No database is involved.

use crate::harness::{cli, ConfigFile, BIN};

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

/// The design document's key names: one per table that has them.
const DESIGN_DOCUMENT_NAMES: &str = r#"
[observers.runtime]
max_concurrency = 16
shutdown_timeout = "45s"

[observers.runtime.email]
host = "smtp.example.com"
from = "shop@example.com"
tls = "start_tls"

[observers.runtime.redis]
url = "redis://127.0.0.1:6379/0"

[observers.paid]
entity = "Order"
event_type = "UPDATE"

[[observers.paid.actions]]
type = "sms"
account_sid_env = "FO_TEST_TWILIO_SID"
auth_token_env = "FO_TEST_TWILIO_TOKEN"
from = "+15005550006"
phone_template = "{{ after.phone }}"
message_template = "paid"

[[observers.paid.actions]]
type = "cache"
key_pattern = "order:{{ data.id }}"
action = "invalidate"
"#;

/// `validate --config FILE` with the SMS action's secrets in the environment.
fn validate_with_secrets(file: &ConfigFile) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(BIN)
        .args(["validate", "--config", file.arg()])
        .env("FO_TEST_TWILIO_SID", "AC0123456789abcdef0123456789abcdef")
        .env("FO_TEST_TWILIO_TOKEN", "token")
        .output()
        .expect("run the binary");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_design_documents_keys_load_with_a_warning_naming_ours() {
    let file = ConfigFile::new(DESIGN_DOCUMENT_NAMES);
    let (code, stdout, stderr) = validate_with_secrets(&file);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("concurrency             16"), "{stdout}");
    assert!(
        stdout.contains("shutdown_timeout        45000 ms"),
        "{stdout}"
    );
    assert!(stderr.contains("6 warning(s)"), "{stderr}");
    for (path, ours) in [
        ("observers.runtime.max_concurrency: ", "'concurrency'"),
        (
            "observers.runtime.shutdown_timeout: ",
            "shutdown_timeout_ms = 45000",
        ),
        ("observers.runtime.email.tls: ", "tls = \"starttls\""),
        (
            "observers.paid.actions[0].phone_template: ",
            "'to_template'",
        ),
        ("observers.paid.actions[1].key_pattern: ", "keys = [...]"),
        ("observers.paid.actions[1].action: ", "'operation'"),
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(path) && l.contains("deprecated") && l.contains(ours)),
            "no warning line {path:?} naming {ours:?} in:\n{stderr}"
        );
    }
}

#[test]
fn an_alias_beside_its_key_and_on_failure_alert_are_errors() {
    let text = DESIGN_DOCUMENT_NAMES
        .replace(
            "max_concurrency = 16",
            "max_concurrency = 16\nconcurrency = 8",
        )
        .replace(
            "action = \"invalidate\"",
            "action = \"invalidate\"\noperation = \"invalidate\"",
        )
        .replace(
            "event_type = \"UPDATE\"",
            "event_type = \"UPDATE\"\non_failure = \"alert\"",
        );
    let file = ConfigFile::new(&text);
    let (code, stdout, stderr) = validate_with_secrets(&file);
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    for (path, says) in [
        (
            "observers.runtime.max_concurrency: ",
            "keep only 'concurrency'",
        ),
        (
            "observers.paid.actions[1].action: ",
            "keep only 'operation'",
        ),
        (
            "observers.paid.on_failure: ",
            "fraiseql_observers_dead_lettered_total",
        ),
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(path) && l.contains(says)),
            "no line {path:?} saying {says:?} in:\n{stderr}"
        );
    }
}
