//! The email action against a real SMTP server started by each test (`smtp_server.rs`): what
//! the server received (envelope, headers, decoded bodies, parsed with the independent
//! `mail-parser`) is asserted, and each SMTP answer's classification.

use std::collections::BTreeSet;

use fraiseql_observers::actions::{EmailSettings, FailureKind};
use fraiseql_observers::EventKind;
use mail_parser::{MessageParser, MimeHeaders};
use serde_json::json;

use crate::sample::{compile, env_of, order_event, run, run_delivery_id};
use crate::smtp_server::{SmtpServer, Step};

fn settings(port: u16, extra: &str) -> EmailSettings {
    let table: toml::Table = toml::from_str(&format!(
        r#"host = "127.0.0.1"
           port = {port}
           tls = "none"
           from = "Orders <orders@shop.example>"
           timeout_ms = 5000
           {extra}"#
    ))
    .unwrap();
    EmailSettings::parse(
        &table,
        "observers.runtime.email",
        &env_of(&[("SMTP_USER", "mailer"), ("SMTP_PASS", "hunter2")]),
    )
    .unwrap()
}

fn email_action(settings: &EmailSettings, fields: &str) -> fraiseql_observers::actions::Action {
    compile(
        &format!("type = \"email\"\n{fields}"),
        &env_of(&[]),
        Some(settings),
        None,
    )
    .unwrap()
}

fn paid(email: &str, note: &str) -> fraiseql_observers::EntityEvent {
    order_event(
        EventKind::Updated,
        Some(json!({"id": 7, "email": email, "status": "new", "total": "12.50", "note": note})),
        Some(json!({"id": 7, "email": email, "status": "paid", "total": "12.50", "note": note})),
    )
}

/// Addresses of a parsed address header, in order.
fn addresses(address: Option<&mail_parser::Address<'_>>) -> Vec<String> {
    address
        .map(|a| {
            a.iter()
                .filter_map(|a| a.address().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn crlf_to_lf(s: &str) -> String {
    s.replace("\r\n", "\n")
}

#[tokio::test]
async fn email_is_delivered_with_recipients_subject_and_both_bodies() {
    let server = SmtpServer::start().await;
    let settings = settings(
        server.port,
        r#"username_env = "SMTP_USER"
           password_env = "SMTP_PASS""#,
    );
    let action = email_action(
        &settings,
        r#"to_template = '"Buyer, Jane" <{{ after.email }}>, ops@shop.example'
           cc = ["billing@shop.example"]
           bcc = "audit@shop.example"
           reply_to = "support@shop.example"
           subject_template = "Commande {{ after.id }} payée ✓"
           body_template = """Hello,
your order {{ after.id }} ({{ after.total }} EUR) is {{ after.status }}.
.a line that starts with a dot
Note: {{ after.note }}"""
           html_template = "<p>Order <b>{{ after.id }}</b> is paid.</p><p>{{ after.note }}</p>""#,
    );
    let event = paid("jane@buyer.example", "<script>alert(1)</script> & co");
    run(&action, &event, 1).await.expect("delivered");

    let accepted = server.accepted();
    assert_eq!(accepted.len(), 1, "{:?}", server.commands());
    let mail = &accepted[0];
    // The envelope: the sender, and every recipient including cc and bcc.
    assert_eq!(mail.mail_from, "orders@shop.example");
    assert_eq!(
        mail.rcpt_to.iter().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([
            "jane@buyer.example".to_string(),
            "ops@shop.example".to_string(),
            "billing@shop.example".to_string(),
            "audit@shop.example".to_string(),
        ])
    );
    assert_eq!(
        server.logins(),
        [("mailer".to_string(), "hunter2".to_string())]
    );

    let message = MessageParser::default().parse(&mail.data).expect("parses");
    assert_eq!(
        addresses(message.to()),
        ["jane@buyer.example", "ops@shop.example"]
    );
    assert_eq!(
        message.to().unwrap().first().unwrap().name(),
        Some("Buyer, Jane")
    );
    assert_eq!(addresses(message.cc()), ["billing@shop.example"]);
    assert_eq!(addresses(message.reply_to()), ["support@shop.example"]);
    assert_eq!(addresses(message.from()), ["orders@shop.example"]);
    assert!(message.bcc().is_none(), "the Bcc header is never sent");
    let raw = String::from_utf8_lossy(&mail.data);
    assert!(!raw.contains("audit@shop.example"), "{raw}");
    assert_eq!(message.subject(), Some("Commande 7 payée ✓"));
    let delivery_id = run_delivery_id(&event);
    assert_eq!(
        message.message_id(),
        Some(format!("{delivery_id}@shop.example").as_str())
    );

    // multipart/alternative with the text part and the HTML part, each as rendered.
    let content_type = message.content_type().unwrap();
    assert_eq!(
        (content_type.ctype(), content_type.subtype()),
        ("multipart", Some("alternative"))
    );
    assert_eq!((message.text_body.len(), message.html_body.len()), (1, 1));
    let text_part = &message.parts[message.text_body[0] as usize];
    assert_eq!(text_part.content_type().unwrap().subtype(), Some("plain"));
    assert_eq!(
        crlf_to_lf(&message.body_text(0).unwrap()),
        "Hello,\nyour order 7 (12.50 EUR) is paid.\n.a line that starts with a dot\nNote: <script>alert(1)</script> & co"
    );
    let html_part = &message.parts[message.html_body[0] as usize];
    assert_eq!(html_part.content_type().unwrap().subtype(), Some("html"));
    assert_eq!(
        crlf_to_lf(&message.body_html(0).unwrap()),
        "<p>Order <b>7</b> is paid.</p><p>&lt;script&gt;alert(1)&lt;&#x2f;script&gt; &amp; co</p>"
    );
}

#[tokio::test]
async fn text_only_message_with_fixed_recipients_and_subject() {
    let server = SmtpServer::start().await;
    let settings = settings(server.port, "");
    let action = email_action(
        &settings,
        r#"to = ["a@shop.example", "B <b@shop.example>"]
           subject = "Order update"
           body_template = "{{ event.entity_type }} {{ event.kind }}""#,
    );
    run(&action, &paid("x@y.example", ""), 1).await.unwrap();
    let accepted = server.accepted();
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].rcpt_to, ["a@shop.example", "b@shop.example"]);
    let message = MessageParser::default().parse(&accepted[0].data).unwrap();
    let content_type = message.content_type().unwrap();
    assert_eq!(
        (content_type.ctype(), content_type.subtype()),
        ("text", Some("plain"))
    );
    assert_eq!(message.subject(), Some("Order update"));
    // SMTP ends the data with a line break of its own.
    assert_eq!(
        crlf_to_lf(&message.body_text(0).unwrap()).trim_end_matches('\n'),
        "Order UPDATE"
    );
    assert!(server.logins().is_empty(), "no credentials, no AUTH");
}

#[tokio::test]
async fn line_breaks_cannot_inject_headers() {
    let server = SmtpServer::start().await;
    let settings = settings(server.port, "");
    // A subject from the event with CR/LF: folded into one line, no header added.
    let action = email_action(
        &settings,
        r#"to = "ops@shop.example"
           subject_template = "Note: {{ after.note }}"
           body_template = "b""#,
    );
    let event = paid(
        "x@y.example",
        "paid\r\nBcc: evil@attacker.example\r\nX-Evil: 1",
    );
    run(&action, &event, 1).await.unwrap();
    let accepted = server.accepted();
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].rcpt_to, ["ops@shop.example"]);
    let message = MessageParser::default().parse(&accepted[0].data).unwrap();
    assert_eq!(
        message.subject(),
        Some("Note: paid Bcc: evil@attacker.example X-Evil: 1")
    );
    assert!(message.header("X-Evil").is_none());
    assert!(message.bcc().is_none());

    // A recipient from the event with CR/LF: refused, permanently, and nothing is sent.
    let action = email_action(
        &settings,
        r#"to_template = "{{ after.email }}"
           subject = "s"
           body_template = "b""#,
    );
    let before = server.commands().len();
    let err = run(
        &action,
        &paid("victim@y.example\r\nBcc: evil@attacker.example", ""),
        1,
    )
    .await
    .unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert!(err.message().contains("header injection"), "{err}");
    assert_eq!(server.commands().len(), before, "nothing was sent");
    // Trailing text after an address is refused too, rather than silently dropped.
    let err = run(&action, &paid("a@y.example; evil@attacker.example", ""), 1)
        .await
        .unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    let err = run(&action, &paid("", ""), 1).await.unwrap_err();
    assert!(err.message().contains("no recipient"), "{err}");
    assert_eq!(server.accepted().len(), 1);
}

#[tokio::test]
async fn smtp_4xx_is_transient_and_the_retry_delivers_the_same_message() {
    let server = SmtpServer::start().await;
    let settings = settings(server.port, "");
    let action = email_action(
        &settings,
        r#"to_template = "{{ after.email }}"
           subject_template = "Order {{ after.id }}"
           body_template = "paid""#,
    );
    let event = paid("jane@buyer.example", "");

    for step in [Step::Mail, Step::Rcpt, Step::Data, Step::DataEnd] {
        server.fail_next(step, 451, "4.3.0 Try again later");
        let err = run(&action, &event, 1).await.unwrap_err();
        assert!(err.kind == FailureKind::Transient, "{step:?}: {err:?}");
        assert!(err.message().contains("451"), "{err}");
    }
    assert!(server.accepted().is_empty());
    // The message refused after DATA was received once; the retry delivers it.
    run(&action, &event, 2)
        .await
        .expect("the retry is delivered");
    let messages = server.messages();
    assert_eq!(messages.len(), 2);
    assert!(!messages[0].accepted && messages[1].accepted);
    let ids: Vec<String> = messages
        .iter()
        .map(|m| {
            MessageParser::default()
                .parse(&m.data)
                .unwrap()
                .message_id()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids[0], ids[1], "the same Message-ID on every attempt");
}

#[tokio::test]
async fn smtp_5xx_is_permanent() {
    let server = SmtpServer::start().await;
    let settings = settings(server.port, "");
    let action = email_action(
        &settings,
        r#"to_template = "{{ after.email }}"
           subject = "s"
           body_template = "b""#,
    );
    let event = paid("nobody@buyer.example", "");
    for (step, code) in [
        (Step::Mail, 550),
        (Step::Rcpt, 550),
        (Step::Data, 554),
        (Step::DataEnd, 552),
    ] {
        server.fail_next(step, code, "5.1.1 Refused");
        let err = run(&action, &event, 1).await.unwrap_err();
        assert!(err.kind == FailureKind::Permanent, "{step:?}: {err:?}");
        assert!(err.message().contains(&code.to_string()), "{err}");
    }
    assert!(server.accepted().is_empty());
}

#[tokio::test]
async fn connection_failures_are_transient() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let settings = settings(port, "");
    let action = email_action(
        &settings,
        r#"to = "a@shop.example"
           subject = "s"
           body_template = "b""#,
    );
    let err = run(&action, &paid("x@y.example", ""), 1).await.unwrap_err();
    assert!(err.kind == FailureKind::Transient, "{err:?}");
    assert!(
        err.message().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

#[tokio::test]
async fn starttls_is_required_never_downgraded() {
    // The test server does not offer STARTTLS: nothing may be sent in clear text.
    let server = SmtpServer::start().await;
    let table: toml::Table = toml::from_str(&format!(
        r#"host = "127.0.0.1"
           port = {}
           tls = "starttls"
           from = "orders@shop.example""#,
        server.port
    ))
    .unwrap();
    let settings = EmailSettings::parse(&table, "e", &env_of(&[])).unwrap();
    let action = email_action(
        &settings,
        r#"to = "a@shop.example"
           subject = "s"
           body_template = "b""#,
    );
    let err = run(&action, &paid("x@y.example", ""), 1).await.unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert!(err.message().contains("STARTTLS"), "{err}");
    assert!(
        !server
            .commands()
            .iter()
            .any(|c| c.starts_with("MAIL") || c.starts_with("AUTH")),
        "{:?}",
        server.commands()
    );
}

#[tokio::test]
async fn actions_with_the_same_settings_share_one_pooled_connection() {
    let server = SmtpServer::start().await;
    let settings = settings(server.port, "pool_size = 2");
    let first = email_action(
        &settings,
        r#"to = "a@shop.example"
           subject = "first"
           body_template = "1""#,
    );
    let second = email_action(
        &settings,
        r#"to = "b@shop.example"
           subject = "second"
           body_template = "2""#,
    );
    let event = paid("x@y.example", "");
    // lettre hands a connection back to the pool in a task of its own: give it a moment.
    let settle = || tokio::time::sleep(std::time::Duration::from_millis(100));
    run(&first, &event, 1).await.unwrap();
    settle().await;
    run(&second, &event, 1).await.unwrap();
    settle().await;
    run(&first, &event, 1).await.unwrap();
    assert_eq!(server.accepted().len(), 3);
    assert_eq!(server.connections(), 1, "{:?}", server.commands());
}

#[test]
fn config_errors_are_caught_at_load() {
    // No [observers.runtime.email].
    let errors = compile(
        r#"type = "email"
           to = "a@shop.example"
           subject = "s"
           body_template = "b""#,
        &env_of(&[]),
        None,
        None,
    )
    .unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!(
        errors[0].to_string(),
        "observers.order_paid.actions[0].type: an email action needs [observers.runtime.email] (host, from, ...)"
    );

    // A missing field, a typo'd key.
    let settings = settings(2525, "");
    let errors = compile(
        r#"type = "email"
           to = "a@shop.example"
           subject = "s""#,
        &env_of(&[]),
        Some(&settings),
        None,
    )
    .unwrap_err();
    assert_eq!(
        errors[0].path,
        "observers.order_paid.actions[0].body_template"
    );
    let errors = compile(
        r#"type = "email"
           to = "a@shop.example"
           subjet = "s""#,
        &env_of(&[]),
        Some(&settings),
        None,
    )
    .unwrap_err();
    assert_eq!(errors[0].path, "observers.order_paid.actions[0].subjet");

    // A secret that is not in the environment.
    let table: toml::Table = toml::from_str(
        r#"host = "smtp.shop.example"
           from = "orders@shop.example"
           username_env = "SMTP_USER"
           password_env = "SMTP_PASS""#,
    )
    .unwrap();
    let errors = EmailSettings::parse(
        &table,
        "observers.runtime.email",
        &env_of(&[("SMTP_USER", "u")]),
    )
    .unwrap_err();
    assert_eq!(
        errors[0].to_string(),
        "observers.runtime.email.password_env: environment variable 'SMTP_PASS' is not set"
    );
}

/// Issue 9, 5g: a value from the event is one recipient at most. Commas or several addresses in
/// it are a permanent error (nothing is sent), while the template's own list still works.
#[tokio::test]
async fn a_value_from_the_event_can_never_add_recipients() {
    let server = SmtpServer::start().await;
    let settings = settings(server.port, "");
    let action = email_action(
        &settings,
        r#"to_template = '"{{ after.note }}" <{{ after.email }}>, ops@shop.example'
           subject = "s"
           body_template = "b""#,
    );
    for (email, note) in [
        ("victim@y.example, evil@attacker.example", "Jane"),
        ("victim@y.example>, <evil@attacker.example", "Jane"),
        ("victim@y.example", r#"Jane" <evil@attacker.example>, "x"#),
        ("evil@attacker.example,", "Jane"),
    ] {
        let err = run(&action, &paid(email, note), 1).await.unwrap_err();
        assert!(err.kind == FailureKind::Permanent, "{email}: {err:?}");
        assert!(err.message().contains("recipient #1"), "{err}");
    }
    let plain = email_action(
        &settings,
        r#"to_template = "{{ after.email }}"
           subject = "s"
           body_template = "b""#,
    );
    let err = run(
        &plain,
        &paid("victim@y.example, evil@attacker.example", ""),
        1,
    )
    .await
    .unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert!(err.message().contains("2 addresses"), "{err}");
    assert!(
        server.commands().iter().all(|c| !c.contains("RCPT")),
        "nothing was sent: {:?}",
        server.commands()
    );

    // The same template with honest values: both of its own recipients.
    run(&action, &paid("jane@buyer.example", "Doe, Jane"), 1)
        .await
        .expect("delivered");
    let accepted = server.accepted();
    assert_eq!(accepted.len(), 1);
    assert_eq!(
        accepted[0].rcpt_to.iter().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([
            "jane@buyer.example".to_string(),
            "ops@shop.example".to_string()
        ])
    );
    let message = MessageParser::default().parse(&accepted[0].data).unwrap();
    assert_eq!(
        message.to().unwrap().first().unwrap().name(),
        Some("Doe, Jane")
    );
}
