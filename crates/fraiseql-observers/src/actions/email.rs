//! The email action: a message sent over SMTP (lettre, one pooled transport per server).
//!
//! ```toml
//! [observers.runtime.email]
//! host = "smtp.example.com"
//! port = 587                                 # default: 587 (starttls), 465 (tls), 25 (none)
//! from = "Orders <orders@example.com>"
//! tls = "starttls"                           # "starttls" (default), "tls" or "none"
//! username_env = "SMTP_USERNAME"             # optional; both or neither
//! password_env = "SMTP_PASSWORD"
//! timeout_ms = 10000                         # each SMTP step; default 10 s
//! pool_size = 10                             # open connections at most; default 10
//!
//! [[observers.order_paid.actions]]
//! type = "email"
//! to_template = "{{ after.email }}"          # or to = "ops@example.com" / ["a@x", "b@x"]
//! cc = ["billing@example.com"]               # optional, fixed
//! bcc = "audit@example.com"                  # optional, fixed (never in the headers)
//! reply_to = "support@example.com"           # optional, fixed
//! subject_template = "Order {{ after.id }} is paid"   # or subject = "fixed text"
//! body_template = "Hello, your order {{ after.id }} ({{ after.total }} EUR) is paid."
//! html_template = "<p>Order <b>{{ after.id }}</b> is paid.</p>"   # optional
//! ```
//!
//! Invariants:
//!
//! * Server settings come from `[observers.runtime.email]` ([`EmailSettings`]); an email action
//!   without them fails at compile. Every action compiled with the same settings shares one
//!   pooled SMTP transport, built on first use (compiling does no I/O).
//! * `tls = "starttls"` requires the upgrade: a server that does not offer STARTTLS gets nothing
//!   (no silent downgrade). Credentials with `tls = "none"` are refused at compile unless the
//!   host is loopback.
//! * Every template is rendered for every event: `to_template`, `subject_template` (text mode),
//!   `body_template` (text mode, the `text/plain` part) and `html_template` (HTML mode: values
//!   are HTML-escaped; with it the message is `multipart/alternative`).
//! * Header injection is impossible: a rendered recipient list containing a line break or any
//!   other control character is a permanent error (nothing is sent); a rendered subject has each
//!   run of control characters (CR, LF, tab...) replaced by one space and is trimmed, since a
//!   subject template that spans lines is a formatting accident rather than an attack on the
//!   recipient. Fixed addresses are checked at compile.
//! * Recipients: `to`/`to_template` are comma-separated lists (`"Name" <a@x>, b@x`); every
//!   address must parse completely (trailing text is an error, not dropped). The list is the
//!   template's own: `to_template` is split at the commas of its literal text and each item
//!   must render to at most one address, so a value from the event containing commas or several
//!   addresses is a permanent error, never extra recipients. Empty items are
//!   skipped; no recipient at all is a permanent error. The envelope goes to `to`, `cc` and
//!   `bcc`; the `Bcc` header is not sent.
//! * `Message-ID` is `<delivery id@from domain>`: the same on every retry, so receivers and
//!   mail stores can deduplicate.
//! * Outcomes: SMTP 4xx, connection, network, TLS and timeout failures are transient; 5xx
//!   (including a refused login) and client-side refusals (a server without STARTTLS, non-ASCII
//!   addresses to a server without SMTPUTF8) are permanent. The SMTP reply text is kept in the
//!   message; addresses and bodies are never logged above debug.

use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Deserialize;

use super::{
    secret_from_env, template, timeout_setting, ActionError, CompileContext, DeliveryRequest,
};
use crate::error::ConfigError;
use crate::fields::parse_fields;
use crate::template::{EventContext, Template, TemplateMode};

/// Default and largest `pool_size`.
const DEFAULT_POOL_SIZE: u32 = 10;
const MAX_POOL_SIZE: u32 = 100;

/// How the SMTP connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmailTls {
    /// Plain connection upgraded with STARTTLS; the upgrade is required.
    StartTls,
    /// TLS from the first byte (SMTPS, port 465).
    Tls,
    /// No encryption (local relays and tests only).
    None,
}

impl EmailTls {
    fn default_port(self) -> u16 {
        match self {
            EmailTls::StartTls => 587,
            EmailTls::Tls => 465,
            EmailTls::None => 25,
        }
    }
}

/// `[observers.runtime.email]` as written in the configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailSettingsConfig {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub from: Option<String>,
    pub tls: Option<String>,
    pub username_env: Option<String>,
    pub password_env: Option<String>,
    pub timeout_ms: Option<u64>,
    pub pool_size: Option<u32>,
}

/// The SMTP server every email action sends through, with its shared connection pool.
/// Cloning is cheap and keeps sharing the pool.
#[derive(Clone)]
pub struct EmailSettings {
    shared: Arc<SmtpServer>,
}

struct SmtpServer {
    host: String,
    port: u16,
    tls: EmailTls,
    from: Mailbox,
    credentials: Option<Credentials>,
    timeout: Duration,
    pool_size: u32,
    /// Built on first use, inside the runtime (lettre's pool spawns its cleanup task).
    transport: OnceLock<Result<AsyncSmtpTransport<Tokio1Executor>, String>>,
}

impl fmt::Debug for EmailSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.shared;
        f.debug_struct("EmailSettings")
            .field("host", &s.host)
            .field("port", &s.port)
            .field("tls", &s.tls)
            .field("from", &s.from.to_string())
            .field("credentials", &s.credentials.is_some())
            .field("timeout", &s.timeout)
            .field("pool_size", &s.pool_size)
            .finish()
    }
}

impl EmailSettings {
    /// Read `[observers.runtime.email]` (`path` is where it sits, for messages). Pure; reports
    /// every error; secrets are read through `env`.
    pub fn parse(
        table: &toml::Table,
        path: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<EmailSettings, Vec<ConfigError>> {
        let config: EmailSettingsConfig = parse_fields::<_, ConfigError>(table, path)?;
        EmailSettings::compile(&config, path, env)
    }

    /// Check settings already read into an [`EmailSettingsConfig`].
    pub fn compile(
        config: &EmailSettingsConfig,
        path: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<EmailSettings, Vec<ConfigError>> {
        let mut errors = Vec::new();

        let host = match config.host.as_deref().map(str::trim) {
            None | Some("") => {
                errors.push(ConfigError::new(
                    format!("{path}.host"),
                    "missing; the SMTP server's host name",
                ));
                None
            }
            Some(h) if h.contains(|c: char| c.is_whitespace() || c == '/' || c == ':') => {
                errors.push(ConfigError::new(
                    format!("{path}.host"),
                    "must be a host name or an IP address (the port goes in 'port')",
                ));
                None
            }
            Some(h) => Some(h.to_string()),
        };

        let tls = match config.tls.as_deref() {
            None | Some("starttls") => EmailTls::StartTls,
            Some("tls") => EmailTls::Tls,
            Some("none") => EmailTls::None,
            Some(other) => {
                errors.push(ConfigError::new(
                    format!("{path}.tls"),
                    format!("must be \"starttls\", \"tls\" or \"none\", not '{other}'"),
                ));
                EmailTls::StartTls
            }
        };

        let port = match config.port {
            Some(0) => {
                errors.push(ConfigError::new(format!("{path}.port"), "must not be 0"));
                0
            }
            Some(p) => p,
            None => tls.default_port(),
        };

        let from = match config.from.as_deref() {
            None => {
                errors.push(ConfigError::new(
                    format!("{path}.from"),
                    "missing; the sender, e.g. \"Orders <orders@example.com>\"",
                ));
                None
            }
            Some(raw) => match parse_address_list(raw) {
                Ok(list) if list.len() == 1 => list.into_iter().next(),
                Ok(_) => {
                    errors.push(ConfigError::new(
                        format!("{path}.from"),
                        "must be exactly one address",
                    ));
                    None
                }
                Err(e) => {
                    errors.push(ConfigError::new(format!("{path}.from"), e));
                    None
                }
            },
        };

        let credentials = match (&config.username_env, &config.password_env) {
            (None, None) => None,
            (Some(user_var), Some(pass_var)) => {
                let user =
                    secret_from_env(user_var, &format!("{path}.username_env"), env, &mut errors);
                let pass =
                    secret_from_env(pass_var, &format!("{path}.password_env"), env, &mut errors);
                match (user, pass) {
                    (Some(u), Some(p)) => Some(Credentials::new(u, p)),
                    _ => None,
                }
            }
            (Some(_), None) => {
                errors.push(ConfigError::new(
                    format!("{path}.password_env"),
                    "missing; 'username_env' needs 'password_env'",
                ));
                None
            }
            (None, Some(_)) => {
                errors.push(ConfigError::new(
                    format!("{path}.username_env"),
                    "missing; 'password_env' needs 'username_env'",
                ));
                None
            }
        };
        if tls == EmailTls::None
            && (config.username_env.is_some() || config.password_env.is_some())
            && !host.as_deref().is_some_and(is_loopback_host)
        {
            errors.push(ConfigError::new(
                format!("{path}.tls"),
                "is \"none\" but credentials are configured: the password would cross the network in clear text; use \"starttls\" or \"tls\"",
            ));
        }

        let timeout = timeout_setting(config.timeout_ms, path, &mut errors);

        let pool_size = match config.pool_size {
            None => DEFAULT_POOL_SIZE,
            Some(n) if (1..=MAX_POOL_SIZE).contains(&n) => n,
            Some(n) => {
                errors.push(ConfigError::new(
                    format!("{path}.pool_size"),
                    format!("must be between 1 and {MAX_POOL_SIZE}, not {n}"),
                ));
                DEFAULT_POOL_SIZE
            }
        };

        match (errors.is_empty(), host, from) {
            (true, Some(host), Some(from)) => Ok(EmailSettings {
                shared: Arc::new(SmtpServer {
                    host,
                    port,
                    tls,
                    from,
                    credentials,
                    timeout,
                    pool_size,
                    transport: OnceLock::new(),
                }),
            }),
            _ => Err(errors),
        }
    }

    /// The sender of every message.
    pub fn from(&self) -> &Mailbox {
        &self.shared.from
    }

    /// The shared transport, built on first use.
    fn transport(&self) -> Result<&AsyncSmtpTransport<Tokio1Executor>, ActionError> {
        let s = &self.shared;
        s.transport
            .get_or_init(|| {
                let tls = match s.tls {
                    EmailTls::None => Tls::None,
                    EmailTls::StartTls => Tls::Required(
                        TlsParameters::new(s.host.clone()).map_err(|e| e.to_string())?,
                    ),
                    EmailTls::Tls => {
                        Tls::Wrapper(TlsParameters::new(s.host.clone()).map_err(|e| e.to_string())?)
                    }
                };
                let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&s.host)
                    .port(s.port)
                    .tls(tls)
                    .timeout(Some(s.timeout))
                    .pool_config(PoolConfig::new().max_size(s.pool_size));
                if let Some(credentials) = &s.credentials {
                    builder = builder.credentials(credentials.clone());
                }
                Ok(builder.build())
            })
            .as_ref()
            .map_err(|e| ActionError::permanent(format!("cannot set up TLS for {}: {e}", s.host)))
    }

    /// `smtp host:port`, for messages.
    fn shown(&self) -> String {
        format!("email smtp {}:{}", self.shared.host, self.shared.port)
    }
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// One address or several, as written in the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum AddressList {
    One(String),
    Many(Vec<String>),
}

impl AddressList {
    fn items(&self) -> Vec<&str> {
        match self {
            AddressList::One(s) => vec![s.as_str()],
            AddressList::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// The email action as written in the configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    pub to: Option<AddressList>,
    pub to_template: Option<String>,
    pub cc: Option<AddressList>,
    pub bcc: Option<AddressList>,
    pub reply_to: Option<AddressList>,
    pub subject: Option<String>,
    pub subject_template: Option<String>,
    pub body_template: Option<String>,
    pub html_template: Option<String>,
}

/// Where the `To` list comes from. (Templates are boxed: they are large, and an [`Action`]
/// holds its variant inline.)
///
/// [`Action`]: super::Action
enum Recipients {
    Fixed(Vec<Mailbox>),
    /// One template per comma-separated item of `to_template`'s own text; each renders to at
    /// most one address.
    Template(Vec<Template>),
}

enum Subject {
    Fixed(String),
    Template(Box<Template>),
}

/// A compiled email action.
pub struct Email {
    server: EmailSettings,
    to: Recipients,
    cc: Vec<Mailbox>,
    bcc: Vec<Mailbox>,
    reply_to: Vec<Mailbox>,
    subject: Subject,
    body: Box<Template>,
    html: Option<Box<Template>>,
}

impl fmt::Debug for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Email")
            .field("server", &self.server)
            .field("to_template", &matches!(self.to, Recipients::Template(_)))
            .field("cc", &self.cc.len())
            .field("bcc", &self.bcc.len())
            .field("html", &self.html.is_some())
            .finish_non_exhaustive()
    }
}

/// Compile an email action. Pure; reports every error with its path.
pub fn compile(
    config: &EmailConfig,
    path: &str,
    ctx: &CompileContext<'_>,
) -> Result<Email, Vec<ConfigError>> {
    let mut errors = Vec::new();

    let to = match (&config.to, &config.to_template) {
        (None, None) => {
            errors.push(ConfigError::new(
                format!("{path}.to"),
                "missing; set 'to' (fixed addresses) or 'to_template' (addresses from the event)",
            ));
            None
        }
        (Some(_), Some(_)) => {
            errors.push(ConfigError::new(
                format!("{path}.to"),
                "set either 'to' or 'to_template', not both",
            ));
            None
        }
        (Some(list), None) => {
            let list = fixed_addresses(Some(list), "to", path, &mut errors);
            (!list.is_empty()).then_some(Recipients::Fixed(list))
        }
        (None, Some(source)) => recipient_templates(source, path, &mut errors),
    };

    let subject = match (&config.subject, &config.subject_template) {
        (None, None) => {
            errors.push(ConfigError::new(
                format!("{path}.subject"),
                "missing; set 'subject' or 'subject_template'",
            ));
            None
        }
        (Some(_), Some(_)) => {
            errors.push(ConfigError::new(
                format!("{path}.subject"),
                "set either 'subject' or 'subject_template', not both",
            ));
            None
        }
        (Some(text), None) => Some(Subject::Fixed(sanitize_subject(text))),
        (None, Some(source)) => template(
            source,
            TemplateMode::Text,
            "subject_template",
            path,
            &mut errors,
        )
        .map(|t| Subject::Template(Box::new(t))),
    };

    let body = match &config.body_template {
        None => {
            errors.push(ConfigError::new(
                format!("{path}.body_template"),
                "missing; the text body of the message",
            ));
            None
        }
        Some(source) => template(
            source,
            TemplateMode::Text,
            "body_template",
            path,
            &mut errors,
        ),
    };
    let html = config.html_template.as_deref().and_then(|source| {
        template(
            source,
            TemplateMode::Html,
            "html_template",
            path,
            &mut errors,
        )
    });

    let cc = fixed_addresses(config.cc.as_ref(), "cc", path, &mut errors);
    let bcc = fixed_addresses(config.bcc.as_ref(), "bcc", path, &mut errors);
    let reply_to = fixed_addresses(config.reply_to.as_ref(), "reply_to", path, &mut errors);

    let server = match ctx.email {
        Some(settings) => Some(settings.clone()),
        None => {
            errors.push(ConfigError::new(
                format!("{path}.type"),
                "an email action needs [observers.runtime.email] (host, from, ...)",
            ));
            None
        }
    };

    match (errors.is_empty(), server, to, subject, body) {
        (true, Some(server), Some(to), Some(subject), Some(body)) => Ok(Email {
            server,
            to,
            cc,
            bcc,
            reply_to,
            subject,
            body: Box::new(body),
            html: html.map(Box::new),
        }),
        _ => Err(errors),
    }
}

/// Fixed addresses (`to`, `cc`, `bcc`, `reply_to`), checked at compile.
fn fixed_addresses(
    list: Option<&AddressList>,
    key: &str,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Vec<Mailbox> {
    let Some(list) = list else {
        return Vec::new();
    };
    let errors_before = errors.len();
    let mut out = Vec::new();
    for item in list.items() {
        if item.contains("{{") || item.contains("{%") {
            errors.push(ConfigError::new(
                format!("{path}.{key}"),
                if key == "to" {
                    "is a fixed address list, not a template; use 'to_template' to take recipients from the event".to_string()
                } else {
                    format!("is a fixed address list, not a template; '{key}' cannot use event values")
                },
            ));
            continue;
        }
        match parse_address_list(item) {
            Ok(list) => out.extend(list),
            Err(e) => errors.push(ConfigError::new(format!("{path}.{key}"), e)),
        }
    }
    if out.is_empty() && errors.len() == errors_before {
        errors.push(ConfigError::new(
            format!("{path}.{key}"),
            "is empty; give at least one address or leave it out",
        ));
    }
    out
}

/// `to_template` compiled item by item: its source is split at the commas of its own text
/// (outside quotes, `<...>` and `{{ }}`, `{% %}`, `{# #}` blocks), and each item is a template of
/// its own whose rendering must be at most one address. So the recipients are the ones the
/// template lists: a value from the event (`"a@x, evil@y"`) can never add one.
fn recipient_templates(
    source: &str,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<Recipients> {
    let key = format!("{path}.to_template");
    if let Err(e) = Template::compile(source, TemplateMode::Text) {
        errors.push(ConfigError::new(key, e.to_string()));
        return None;
    }
    let mut items = Vec::new();
    for item in split_recipient_template(source) {
        match Template::compile(item, TemplateMode::Text) {
            Ok(t) => items.push(t),
            Err(e) => {
                errors.push(ConfigError::new(
                    key,
                    format!(
                        "each comma-separated recipient is rendered on its own, and '{}' is not a \
                         template by itself ({e}); a block cannot produce several recipients",
                        item.trim()
                    ),
                ));
                return None;
            }
        }
    }
    if items.is_empty() {
        errors.push(ConfigError::new(
            key,
            "is empty; give at least one recipient",
        ));
        return None;
    }
    Some(Recipients::Template(items))
}

/// The comma-separated items of a recipient template's own text (empty items dropped).
fn split_recipient_template(source: &str) -> Vec<&str> {
    let bytes = source.as_bytes();
    let mut items = Vec::new();
    let (mut start, mut i) = (0, 0);
    let (mut close, mut quoted, mut escaped, mut angle): (Option<&[u8]>, bool, bool, bool) =
        (None, false, false, false);
    while i < bytes.len() {
        if let Some(end) = close {
            if bytes[i..].starts_with(end) {
                close = None;
                i += end.len();
            } else {
                i += 1;
            }
            continue;
        }
        let open = match &bytes[i..] {
            [b'{', b'{', ..] => Some(b"}}".as_slice()),
            [b'{', b'%', ..] => Some(b"%}".as_slice()),
            [b'{', b'#', ..] => Some(b"#}".as_slice()),
            _ => None,
        };
        if open.is_some() {
            close = open;
            i += 2;
            continue;
        }
        match bytes[i] {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'<' if !quoted => angle = true,
            b'>' if !quoted => angle = false,
            b',' if !quoted && !angle => {
                items.push(&source[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    items.push(&source[start..]);
    items.retain(|item| !item.trim().is_empty());
    items
}

/// A comma-separated address list (`"Doe, J" <j@x>, b@x`). Every item must parse completely;
/// empty items are skipped. Line breaks and other control characters are refused.
pub fn parse_address_list(raw: &str) -> Result<Vec<Mailbox>, String> {
    if raw.chars().any(char::is_control) {
        return Err(
            "contains a line break or another control character (refused: header injection)".into(),
        );
    }
    let mut items = Vec::new();
    let (mut start, mut quoted, mut escaped, mut angle) = (0, false, false, false);
    for (i, c) in raw.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            ',' if !quoted && !angle => {
                items.push(&raw[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&raw[start..]);
    let mut out = Vec::new();
    for (n, item) in items.iter().map(|s| s.trim()).enumerate() {
        if item.is_empty() {
            continue;
        }
        out.push(parse_mailbox(item).ok_or_else(|| {
            format!(
                "address #{} is not a valid address (expected a@example.com or \"Name\" <a@example.com>)",
                n + 1
            )
        })?);
    }
    Ok(out)
}

/// One mailbox, parsed completely (lettre's parser ignores trailing text; this does not).
fn parse_mailbox(item: &str) -> Option<Mailbox> {
    let mailbox: Mailbox = item.parse().ok()?;
    let address = mailbox.email.to_string();
    let complete = match item.rfind('<') {
        Some(open) => item.ends_with('>') && item[open + 1..item.len() - 1].trim() == address,
        None => item == address,
    };
    complete.then_some(mailbox)
}

/// A subject on one line: every run of control characters becomes one space; trimmed.
pub fn sanitize_subject(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut in_control = false;
    for c in raw.chars() {
        if c.is_control() {
            if !in_control {
                out.push(' ');
            }
            in_control = true;
        } else {
            out.push(c);
            in_control = false;
        }
    }
    out.trim().to_string()
}

impl Email {
    pub(crate) fn endpoint(&self) -> String {
        format!("{}:{}", self.server.shared.host, self.server.shared.port)
    }

    /// Send the message once. `Ok` only when the server accepted it (2xx after DATA).
    pub async fn execute(&self, request: &DeliveryRequest<'_>) -> Result<(), ActionError> {
        let context = self.server.shown();
        let message = self.message(request).map_err(|e| e.context(&context))?;
        let recipients = message.envelope().to().len();
        let transport = self.server.transport().map_err(|e| e.context(&context))?;
        let outcome = transport
            .send(message)
            .await
            .map(|_| ())
            .map_err(|e| classify_smtp(&e, self.server.shared.timeout).context(&context));
        tracing::debug!(
            action = "email",
            delivery_id = request.delivery_id,
            attempt = request.attempt,
            smtp_host = %self.server.shared.host,
            recipients,
            ok = outcome.is_ok(),
            "email sent"
        );
        outcome
    }

    /// The message for this event: every template rendered, every header checked.
    fn message(&self, request: &DeliveryRequest<'_>) -> Result<Message, ActionError> {
        let ctx = EventContext::new(request.event);
        let render = |key: &str, t: &Template| {
            t.render_context(&ctx)
                .map_err(|e| ActionError::permanent(format!("{key} cannot render this event: {e}")))
        };
        let to = match &self.to {
            Recipients::Fixed(list) => list.clone(),
            Recipients::Template(items) => {
                let mut list = Vec::with_capacity(items.len());
                for (n, t) in items.iter().enumerate() {
                    let rendered = render("to_template", t)?;
                    let mut one = parse_address_list(&rendered).map_err(|e| {
                        ActionError::permanent(format!(
                            "to_template recipient #{} rendered a value that {e}",
                            n + 1
                        ))
                    })?;
                    if one.len() > 1 {
                        return Err(ActionError::permanent(format!(
                            "to_template recipient #{} rendered {} addresses; a value from the \
                             event is one recipient at most (list recipients in the template's \
                             own text)",
                            n + 1,
                            one.len()
                        )));
                    }
                    list.append(&mut one);
                }
                if list.is_empty() {
                    return Err(ActionError::permanent(
                        "to_template rendered no recipient for this event",
                    ));
                }
                list
            }
        };
        let subject = match &self.subject {
            Subject::Fixed(s) => s.clone(),
            Subject::Template(t) => sanitize_subject(&render("subject_template", t)?),
        };
        let text = render("body_template", &self.body)?;
        let html = self
            .html
            .as_ref()
            .map(|t| render("html_template", t))
            .transpose()?;

        let from = &self.server.shared.from;
        let mut builder = Message::builder()
            .from(from.clone())
            .subject(subject)
            .message_id(Some(format!(
                "<{}@{}>",
                request.delivery_id,
                from.email.domain()
            )));
        for m in to {
            builder = builder.to(m);
        }
        for m in &self.cc {
            builder = builder.cc(m.clone());
        }
        for m in &self.bcc {
            builder = builder.bcc(m.clone());
        }
        for m in &self.reply_to {
            builder = builder.reply_to(m.clone());
        }
        let built = match html {
            Some(html) => builder.multipart(MultiPart::alternative_plain_html(text, html)),
            None => builder.singlepart(
                SinglePart::builder()
                    .header(ContentType::TEXT_PLAIN)
                    .body(text),
            ),
        };
        built.map_err(|e| ActionError::permanent(format!("cannot build the message: {e}")))
    }
}

/// An SMTP failure as an action error: 4xx and the connection's failures are transient; 5xx and
/// the client's own refusals are permanent.
fn classify_smtp(e: &lettre::transport::smtp::Error, timeout: Duration) -> ActionError {
    if e.is_permanent() {
        ActionError::permanent(format!("the server refused: {e}"))
    } else if e.is_transient() {
        ActionError::transient(format!("the server answered: {e}"))
    } else if e.is_timeout() {
        ActionError::transient(format!("no answer within {} ms: {e}", timeout.as_millis()))
    } else if e.is_client() {
        ActionError::permanent(format!("cannot send: {e}"))
    } else {
        ActionError::transient(format!("the exchange failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "SMTP_USERNAME" => Some("mailer".into()),
            "SMTP_PASSWORD" => Some("hunter2".into()),
            _ => None,
        }
    }

    fn settings_table(source: &str) -> toml::Table {
        let file: toml::Table = toml::from_str(source).unwrap();
        file["observers"]["runtime"]["email"]
            .as_table()
            .unwrap()
            .clone()
    }

    #[test]
    fn doc_example_compiles() {
        let source = include_str!("email.rs");
        let docs: String = source
            .lines()
            .filter_map(|l| l.strip_prefix("//!"))
            .map(|l| l.strip_prefix(' ').unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let start = docs.find("```toml").unwrap() + 7;
        let end = start + docs[start..].find("```").unwrap();
        let settings = EmailSettings::parse(
            &settings_table(&docs[start..end]),
            "observers.runtime.email",
            &env,
        )
        .unwrap();
        assert_eq!(settings.shared.port, 587);
        assert_eq!(settings.shared.tls, EmailTls::StartTls);
        assert_eq!(settings.shared.pool_size, 10);
        assert_eq!(settings.from().email.to_string(), "orders@example.com");
        let debug = format!("{settings:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("mailer"),
            "{debug}"
        );

        let table = crate::actions::tests::doc_example(source);
        let config = match crate::actions::ActionConfig::parse(&table, "p")
            .unwrap()
            .settings
        {
            crate::actions::Settings::Email(c) => c,
            other => panic!("{other:?}"),
        };
        let ctx = CompileContext {
            email: Some(&settings),
            ..CompileContext::new(&env)
        };
        let email = compile(&config, "p", &ctx).unwrap();
        assert_eq!(email.cc.len(), 1);
        assert_eq!(email.bcc.len(), 1);
        assert!(email.html.is_some());
    }

    #[test]
    fn settings_errors_are_all_reported() {
        let errors = EmailSettings::parse(
            &toml::from_str(
                r#"port = 0
                   tls = "ssl"
                   from = "not an address"
                   username_env = "SMTP_USERNAME"
                   timeout_ms = 0
                   pool_size = 0"#,
            )
            .unwrap(),
            "e",
            &env,
        )
        .unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "e.host",
                "e.tls",
                "e.port",
                "e.from",
                "e.password_env",
                "e.timeout_ms",
                "e.pool_size"
            ],
            "{errors:#?}"
        );
    }

    #[test]
    fn credentials_over_plain_text_only_to_loopback() {
        let table = |host: &str| {
            toml::from_str::<toml::Table>(&format!(
                r#"host = "{host}"
                   from = "a@example.com"
                   tls = "none"
                   username_env = "SMTP_USERNAME"
                   password_env = "SMTP_PASSWORD""#
            ))
            .unwrap()
        };
        let errors = EmailSettings::parse(&table("smtp.example.com"), "e", &env).unwrap_err();
        assert_eq!(errors[0].path, "e.tls");
        assert!(!errors[0].message.contains("hunter2"));
        let ok = EmailSettings::parse(&table("127.0.0.1"), "e", &env).unwrap();
        assert_eq!(ok.shared.port, 25);
        let errors = EmailSettings::parse(
            &toml::from_str(
                r#"host = "h"
                   from = "a@example.com"
                   username_env = "NOPE"
                   password_env = "SMTP_PASSWORD""#,
            )
            .unwrap(),
            "e",
            &env,
        )
        .unwrap_err();
        assert_eq!(errors[0].path, "e.username_env");
        assert!(errors[0].message.contains("'NOPE' is not set"));
    }

    #[test]
    fn a_recipient_template_is_split_at_its_own_commas_only() {
        assert_eq!(
            split_recipient_template(r#""Buyer, Jane" <{{ after.email }}>, ops@x.example,"#),
            [r#""Buyer, Jane" <{{ after.email }}>"#, " ops@x.example"]
        );
        assert_eq!(
            split_recipient_template(r#"{{ after.emails | join(", ") }}, {# a, b #}x@y.example"#),
            [
                r#"{{ after.emails | join(", ") }}"#,
                r#" {# a, b #}x@y.example"#
            ]
        );
        let mut errors = Vec::new();
        assert!(recipient_templates(
            "{% for e in after.emails %}{{ e }}, {% endfor %}",
            "p",
            &mut errors
        )
        .is_none());
        assert_eq!(errors[0].path, "p.to_template");
        assert!(
            errors[0].message.contains("rendered on its own"),
            "{errors:#?}"
        );
    }

    #[test]
    fn address_lists_parse_completely() {
        let list = parse_address_list(r#""Doe, Jane" <jane@example.com>, b@example.com,"#).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].name.as_deref(), Some("Doe, Jane"));
        assert_eq!(list[1].email.to_string(), "b@example.com");
        assert!(parse_address_list("a@example.com; b@example.com").is_err());
        assert!(parse_address_list("a@example.com garbage").is_err());
        assert!(parse_address_list("Name <a@example.com> trailing").is_err());
        assert!(parse_address_list("a@example.com\r\nBcc: evil@example.com").is_err());
        assert!(parse_address_list("a@example.com\n").is_err());
        assert!(parse_address_list(" , ").unwrap().is_empty());
    }

    #[test]
    fn subjects_are_kept_on_one_line() {
        assert_eq!(
            sanitize_subject("Order 7\r\nBcc: evil@example.com\n"),
            "Order 7 Bcc: evil@example.com"
        );
        assert_eq!(sanitize_subject("  a\tb  "), "a b");
    }

    #[test]
    fn action_errors_are_all_reported() {
        let config = EmailConfig {
            to: Some(AddressList::One("{{ after.email }}".into())),
            cc: Some(AddressList::Many(vec!["bad".into()])),
            subject: Some("s".into()),
            subject_template: Some("t".into()),
            html_template: Some("{{ after.x".into()),
            ..Default::default()
        };
        let errors = compile(&config, "p", &CompileContext::new(&env)).unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "p.to",
                "p.subject",
                "p.body_template",
                "p.html_template",
                "p.cc",
                "p.type"
            ],
            "{errors:#?}"
        );
        assert!(errors[0].message.contains("to_template"), "{errors:#?}");
        assert!(errors[5].message.contains("[observers.runtime.email]"));
    }
}
