//! The HTTP side of every HTTP action: one shared client, the SSRF guard, and the one place that
//! classifies an outcome as ok, retryable, permanent or gone.
//!
//! Invariants:
//!
//! * [`classify`] is the only function that turns an HTTP status into an [`ActionError`] kind:
//!   2xx ok; 408, 429 and 5xx transient (honouring `Retry-After`, clamped to [1 s, 10 min]);
//!   410 gone; every other status permanent (redirects are not followed, so a 3xx is permanent
//!   too). A timeout or a connection failure is transient.
//! * Unless a target sets `allow_private_networks`, no request reaches a private, loopback,
//!   link-local, unspecified, CGNAT, broadcast or multicast address. Host names are checked when
//!   they are resolved (by the client's own resolver, so a DNS answer that changes between a check
//!   and the connection cannot slip through); IP literals, which skip the resolver, are checked
//!   before sending. A refused target is a permanent error naming the host.
//! * No proxy from the environment is used (the library reads no environment variables, and a
//!   proxy would resolve names where the guard cannot see them).
//! * Error messages show a URL without its query string, and without its path when the URL is a
//!   secret (a Slack incoming-webhook URL, any URL read from the environment).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use thiserror::Error;

use super::ActionError;

/// Sent as `user-agent` by every HTTP action (a configured `user-agent` header replaces it).
pub const USER_AGENT: &str = concat!("fraiseql-observers/", env!("CARGO_PKG_VERSION"));

/// The shortest and the longest wait a `Retry-After` answer can ask for.
pub const RETRY_AFTER_MIN: Duration = Duration::from_secs(1);
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(600);

/// How much of a response body is kept (for messages); the rest is read and dropped so the
/// connection can go back to the pool.
const BODY_KEPT: usize = 1024;
const BODY_READ_MAX: usize = 64 * 1024;
/// The most a [`SendOptions::body_limit`] can keep.
const BODY_LIMIT_MAX: usize = 16 * 1024 * 1024;

/// The HTTP client every action shares: keeps connections alive per host. Cloning is cheap and
/// keeps sharing the connections.
///
/// It holds two pools: one whose resolver refuses private addresses (the default for every
/// target) and one for targets that set `allow_private_networks = true`; and the same two again
/// speaking HTTP/2 only, for receivers that require it ([`SendOptions::http2_only`]). Each pool
/// is built on first use, so creating the client (at configuration load) costs nothing.
#[derive(Clone, Default)]
pub struct HttpClient {
    pools: Arc<Pools>,
}

/// Indexed by `[allow_private_networks][http2_only]`.
#[derive(Default)]
struct Pools([[OnceLock<Result<reqwest::Client, String>>; 2]; 2]);

/// How one exchange departs from the defaults.
#[derive(Debug, Clone, Copy, Default)]
pub struct SendOptions {
    /// Speak HTTP/2 only: negotiated by ALPN over `https`, with prior knowledge (h2c) over plain
    /// `http` (a local test server). APNs requires HTTP/2.
    pub http2_only: bool,
    /// Keep up to this many bytes of the response body instead of the first KiB (for answers the
    /// action must read: an OAuth2 token, a bulk API's per-item results). Capped at 16 MiB.
    pub body_limit: Option<usize>,
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient").finish_non_exhaustive()
    }
}

impl HttpClient {
    pub fn new() -> HttpClient {
        HttpClient::default()
    }

    /// The pool for these options, built on first use.
    fn pool(&self, open: bool, http2_only: bool) -> Result<&reqwest::Client, ActionError> {
        self.pools.0[usize::from(open)][usize::from(http2_only)]
            .get_or_init(|| {
                let mut builder = reqwest::Client::builder()
                    .use_rustls_tls()
                    .user_agent(USER_AGENT)
                    .no_proxy()
                    .redirect(reqwest::redirect::Policy::none())
                    .connect_timeout(Duration::from_secs(10))
                    .pool_idle_timeout(Duration::from_secs(90))
                    .tcp_nodelay(true);
                if !open {
                    builder = builder.dns_resolver(Arc::new(GuardedResolver));
                }
                if http2_only {
                    builder = builder.http2_prior_knowledge();
                }
                builder.build().map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| ActionError::permanent(format!("cannot build the HTTP client: {e}")))
    }

    /// Send one request. `Ok` for any answer, whatever its status (see [`classify`]); `Err` when
    /// there is no answer: refused target (permanent), timeout or connection failure (transient).
    pub async fn send(&self, request: HttpRequest<'_>) -> Result<HttpResponse, ActionError> {
        self.send_with(request, SendOptions::default()).await
    }

    /// [`HttpClient::send`], with [`SendOptions`].
    pub async fn send_with(
        &self,
        request: HttpRequest<'_>,
        options: SendOptions,
    ) -> Result<HttpResponse, ActionError> {
        let target = request.target;
        if !target.allow_private_networks {
            check_literal_host(target)?;
        }
        let client = self.pool(target.allow_private_networks, options.http2_only)?;
        let kept = options
            .body_limit
            .map_or(BODY_KEPT, |limit| limit.min(BODY_LIMIT_MAX));
        let read_max = kept.max(BODY_READ_MAX);
        let started = Instant::now();
        let result = client
            .request(request.method, target.url.clone())
            .headers(request.headers)
            .timeout(request.timeout)
            .body(request.body)
            .send()
            .await;
        let mut response = match result {
            Ok(response) => response,
            Err(e) => {
                let error = describe_send_error(&e, request.timeout);
                tracing::debug!(
                    target_url = %target.shown,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    error = %error,
                    "HTTP request failed"
                );
                return Err(error);
            }
        };
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        let mut body = Vec::new();
        let mut read = 0usize;
        // The status decides the outcome; the body is only kept for messages. A body that fails
        // halfway does not change the outcome.
        while read < read_max {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    read += chunk.len();
                    let room = kept.saturating_sub(body.len());
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                _ => break,
            }
        }
        tracing::debug!(
            target_url = %target.shown,
            status = status.as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "HTTP request answered"
        );
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    }
}

/// One request to send.
pub struct HttpRequest<'a> {
    pub method: Method,
    pub target: &'a Target,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// The whole exchange, from connecting to the end of the response headers.
    pub timeout: Duration,
}

/// An answer: status, headers, and the first KiB of the body (or [`SendOptions::body_limit`]).
#[derive(Debug)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The start of the body as text, on one line, for messages (at most `max` characters).
    pub fn body_snippet(&self, max: usize) -> String {
        String::from_utf8_lossy(&self.body)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .take(max)
            .collect()
    }
}

/// `host:port` of `url` (the scheme's default port when it names none).
pub fn host_port(url: &Url) -> String {
    format!(
        "{}:{}",
        url.host_str().unwrap_or_default(),
        url.port_or_known_default().unwrap_or_default()
    )
}

/// A URL an action sends to, with the form of it that may be shown in messages and logs.
#[derive(Clone)]
pub struct Target {
    url: Url,
    shown: String,
    allow_private_networks: bool,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("url", &self.shown)
            .field("allow_private_networks", &self.allow_private_networks)
            .finish()
    }
}

impl Target {
    /// `host:port` of the URL: where requests go, for flow control (never a secret).
    pub fn endpoint(&self) -> String {
        host_port(&self.url)
    }

    /// Parse an `http`/`https` URL. When `secret` is true (a URL from the environment, a Slack
    /// incoming webhook), messages show only its scheme, host and port. The error never repeats
    /// the URL.
    pub fn parse(raw: &str, secret: bool, allow_private_networks: bool) -> Result<Target, String> {
        let url = Url::parse(raw.trim()).map_err(|e| format!("not a valid URL ({e})"))?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(format!(
                "the URL scheme must be http or https, not '{}'",
                url.scheme()
            ));
        }
        let Some(host) = url.host_str() else {
            return Err("the URL has no host".to_string());
        };
        let mut shown = format!("{}://{host}", url.scheme());
        if let Some(port) = url.port() {
            shown.push_str(&format!(":{port}"));
        }
        if !secret {
            shown.push_str(url.path());
        }
        Ok(Target {
            url,
            shown,
            allow_private_networks,
        })
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The URL as messages show it: no query string, no user info, no path when secret.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    pub fn allow_private_networks(&self) -> bool {
        self.allow_private_networks
    }

    /// The host (and port, when explicit), for messages.
    fn host(&self) -> String {
        match (self.url.host_str(), self.url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => String::new(),
        }
    }
}

/// Classify an answer by its status. The one place that decides what is worth retrying.
pub fn classify(status: StatusCode, headers: &HeaderMap) -> Result<(), ActionError> {
    let code = status.as_u16();
    let reason = status.canonical_reason().unwrap_or("");
    let answered = format!("the receiver answered {code} {reason}")
        .trim_end()
        .to_string();
    if status.is_success() {
        return Ok(());
    }
    if code == 408 || code == 429 || status.is_server_error() {
        let retry_after = headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, Utc::now()));
        return Err(ActionError::transient_after(answered, retry_after).with_status(code));
    }
    if code == 410 {
        return Err(
            ActionError::gone(format!("{answered}: the endpoint no longer exists"))
                .with_status(code),
        );
    }
    if status.is_redirection() {
        return Err(ActionError::permanent(format!(
            "{answered}: redirects are not followed; configure the final URL"
        ))
        .with_status(code));
    }
    Err(ActionError::permanent(answered).with_status(code))
}

/// A `Retry-After` value (delay in seconds, or an HTTP date) as a wait, clamped to
/// [[`RETRY_AFTER_MIN`], [`RETRY_AFTER_MAX`]]. `None` when it cannot be read.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    let wait = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = DateTime::parse_from_rfc2822(value)
            .ok()?
            .with_timezone(&Utc);
        (at - now).to_std().unwrap_or(Duration::ZERO)
    };
    Some(wait.clamp(RETRY_AFTER_MIN, RETRY_AFTER_MAX))
}

/// Why an address may not be reached without `allow_private_networks`, or `None` if it may.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_v4(v4);
            }
            let first = v6.segments()[0];
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if first & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if first & 0xffc0 == 0xfec0 {
                Some("site-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if v6.segments()[..6] == [0, 0, 0, 0, 0, 0] {
                // IPv4-compatible (deprecated) ::a.b.c.d
                forbidden_v4(Ipv4Addr::from(
                    (u32::from(v6.segments()[6]) << 16) | u32::from(v6.segments()[7]),
                ))
            } else if v6.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                // NAT64 well-known prefix: the embedded IPv4 address is where it goes.
                forbidden_v4(Ipv4Addr::from(
                    (u32::from(v6.segments()[6]) << 16) | u32::from(v6.segments()[7]),
                ))
            } else {
                None
            }
        }
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("shared address space (CGNAT)")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if ip.is_multicast() {
        Some("multicast")
    } else {
        None
    }
}

/// A target the guard refused. Travels through reqwest's error chain from the resolver.
#[derive(Debug, Error)]
#[error("refused to send to {host}: {ip} is a {reason} address; set allow_private_networks = true on the action to allow it")]
struct RefusedTarget {
    host: String,
    ip: IpAddr,
    reason: &'static str,
}

/// Resolves names with the system resolver and drops every address the guard forbids.
struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|addr| match forbidden_reason(addr.ip()) {
                    Some(reason) => {
                        refused.get_or_insert((addr.ip(), reason));
                        false
                    }
                    None => true,
                })
                .collect();
            if allowed.is_empty() {
                if let Some((ip, reason)) = refused {
                    return Err(Box::new(RefusedTarget { host, ip, reason }) as _);
                }
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// IP literals never reach the resolver: check them before sending.
fn check_literal_host(target: &Target) -> Result<(), ActionError> {
    let host = target.url.host_str().unwrap_or_default();
    let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    else {
        return Ok(());
    };
    match forbidden_reason(ip) {
        Some(reason) => Err(ActionError::permanent(
            RefusedTarget {
                host: target.host(),
                ip,
                reason,
            }
            .to_string(),
        )),
        None => Ok(()),
    }
}

/// A failed exchange, as an action error. The message never contains the URL (the action
/// prefixes the shown form of it).
fn describe_send_error(e: &reqwest::Error, timeout: Duration) -> ActionError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(refused) = err.downcast_ref::<RefusedTarget>() {
            return ActionError::permanent(refused.to_string());
        }
        source = err.source();
    }
    if e.is_timeout() {
        return ActionError::transient(format!("no answer within {} ms", timeout.as_millis()));
    }
    let chain = error_chain(e);
    if e.is_builder() {
        return ActionError::permanent(format!("cannot build the request: {chain}"));
    }
    let what = if e.is_connect() {
        "cannot connect"
    } else {
        "the exchange failed"
    };
    ActionError::transient(format!("{what}: {chain}"))
}

/// The messages of an error and its sources, without reqwest's copy of the URL.
fn error_chain(e: &reqwest::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = err.source();
    }
    if parts.is_empty() {
        // reqwest's own message, with the URL removed.
        let mut top = e.to_string();
        if let Some(url) = e.url() {
            top = top.replace(url.as_str(), "");
        }
        parts.push(top);
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::FailureKind;
    use reqwest::header::HeaderValue;

    fn kind(status: u16, retry_after: Option<&str>) -> Result<(), ActionError> {
        let mut headers = HeaderMap::new();
        if let Some(v) = retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
        }
        classify(StatusCode::from_u16(status).unwrap(), &headers)
    }

    #[test]
    fn classification_table() {
        for ok in [200, 201, 202, 204, 299] {
            assert_eq!(kind(ok, None), Ok(()), "{ok}");
        }
        for transient in [408, 429, 500, 502, 503, 504, 599] {
            let err = kind(transient, None).unwrap_err();
            assert!(
                err.kind == FailureKind::Transient && err.retry_after.is_none(),
                "{transient}: {err:?}"
            );
            assert!(err.is_retryable());
        }
        for permanent in [301, 302, 304, 400, 401, 403, 404, 405, 409, 413, 422] {
            let err = kind(permanent, None).unwrap_err();
            assert!(err.kind == FailureKind::Permanent, "{permanent}: {err:?}");
            assert!(!err.is_retryable());
        }
        let gone = kind(410, None).unwrap_err();
        assert!(gone.kind == FailureKind::Gone, "{gone:?}");
        assert!(!gone.is_retryable());
        assert!(kind(503, None).unwrap_err().to_string().contains("503"));
    }

    #[test]
    fn retry_after_in_seconds_is_honoured_and_clamped() {
        let wait = |v| kind(429, Some(v)).unwrap_err().retry_after();
        assert_eq!(wait("30"), Some(Duration::from_secs(30)));
        assert_eq!(wait("0"), Some(RETRY_AFTER_MIN));
        assert_eq!(wait("86400"), Some(RETRY_AFTER_MAX));
        assert_eq!(wait("soon"), None);
        assert_eq!(
            kind(503, Some("5")).unwrap_err().retry_after(),
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn retry_after_as_http_date() {
        let now = DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:30:00 GMT", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(RETRY_AFTER_MIN)
        );
        assert_eq!(
            parse_retry_after("Thu, 22 Oct 2015 07:28:00 GMT", now),
            Some(RETRY_AFTER_MAX)
        );
    }

    #[test]
    fn forbidden_addresses() {
        let forbidden = [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "127.0.0.1",
            "127.8.8.8",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "100.127.255.255",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ];
        for ip in forbidden {
            assert!(
                forbidden_reason(ip.parse().unwrap()).is_some(),
                "{ip} must be refused"
            );
        }
        let allowed = [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ];
        for ip in allowed {
            assert_eq!(forbidden_reason(ip.parse().unwrap()), None, "{ip}");
        }
    }

    #[test]
    fn shown_url_has_no_query_and_no_path_when_secret() {
        let t = Target::parse(
            "https://user:pw@example.com:8443/hook?token=s3cret",
            false,
            false,
        )
        .unwrap();
        assert_eq!(t.shown(), "https://example.com:8443/hook");
        let t = Target::parse("https://hooks.slack.com/services/T/B/XYZ", true, false).unwrap();
        assert_eq!(t.shown(), "https://hooks.slack.com");
        assert!(Target::parse("ftp://example.com/", false, false).is_err());
        let err = Target::parse("not a url?token=s3cret", false, false).unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
    }
}
