//! How to reach one NATS server: the URL, the credentials and TLS. One reading of these keys,
//! used by the `nats` action (`url` / `url_env`) and by `[distributed]` (`nats_url` /
//! `nats_url_env`), and one way of turning them into the client's connect options.
//!
//! Invariants:
//! * At most one of `creds_file`, `nkey_seed_env`, `token_env`. Files are read and secrets
//!   looked up when the configuration compiles (through the compile context), so a missing
//!   variable, an unreadable file or a malformed seed is an error at load, with its key path.
//! * A secret (password in the URL, token, seed, credentials) never appears in a message or in
//!   `Debug`: [`NatsConnection::shown`] is `host:port`, and settings are told apart by
//!   [`NatsConnection::identity`] (the URL and the names of the variables and files).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use async_nats::{ConnectErrorKind, ServerAddr};

use super::super::{resolve_url, secret_from_env, CompileContext, UrlSetting};
use crate::error::ConfigError;

/// The connection keys of a table, as written; `url_key` / `url_env_key` are their names in
/// that table (`url` for the action, `nats_url` for `[distributed]`).
#[derive(Debug, Clone, Copy, Default)]
pub struct NatsConnectionKeys<'a> {
    pub url_key: &'static str,
    pub url: Option<&'a str>,
    pub url_env_key: &'static str,
    pub url_env: Option<&'a str>,
    pub creds_file: Option<&'a str>,
    pub nkey_seed_env: Option<&'a str>,
    pub token_env: Option<&'a str>,
    pub tls: Option<bool>,
    pub ca_file: Option<&'a str>,
}

/// How the client authenticates (secrets already resolved; never shown).
#[derive(Clone)]
enum Auth {
    None,
    Creds(String),
    NKey(String),
    Token(String),
}

impl Auth {
    fn kind(&self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Creds(_) => "creds_file",
            Auth::NKey(_) => "nkey_seed_env",
            Auth::Token(_) => "token_env",
        }
    }
}

/// One NATS server's connection settings, compiled: the URL, resolved credentials, TLS.
#[derive(Clone)]
pub struct NatsConnection {
    url: String,
    auth: Auth,
    tls: bool,
    ca_file: Option<String>,
    identity: String,
    shown: String,
}

impl fmt::Debug for NatsConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConnection")
            .field("server", &self.shown)
            .field("auth", &self.auth.kind())
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// Two settings are the same when they name the same URL, variables and files.
impl PartialEq for NatsConnection {
    fn eq(&self, other: &NatsConnection) -> bool {
        self.identity == other.identity
    }
}

impl Eq for NatsConnection {}

impl NatsConnection {
    /// Compile the connection keys at `path` (errors pushed with their key paths). Reads the
    /// `*_env` secrets through `ctx.env` and the files through `ctx.read_file`.
    pub fn compile(
        keys: &NatsConnectionKeys<'_>,
        path: &str,
        ctx: &CompileContext<'_>,
        errors: &mut Vec<ConfigError>,
    ) -> Option<NatsConnection> {
        let env = ctx.env;
        let url_key = if keys.url.is_some() || keys.url_env.is_none() {
            keys.url_key
        } else {
            keys.url_env_key
        };
        let url = resolve_url(
            UrlSetting {
                key: keys.url_key,
                value: keys.url,
                env_key: keys.url_env_key,
                env_value: keys.url_env,
            },
            true,
            path,
            env,
            errors,
        )
        .and_then(|(url, _)| match ServerAddr::from_str(&url) {
            Ok(addr) if ["nats", "tls"].contains(&addr.scheme()) => Some((url, addr)),
            // The parser's message may quote the URL, which may hold a password.
            _ => {
                errors.push(ConfigError::new(
                    format!("{path}.{url_key}"),
                    "not a valid NATS URL (nats://[user:password@]host[:port], or tls:// for TLS)",
                ));
                None
            }
        });

        let credentials = [
            ("creds_file", keys.creds_file),
            ("nkey_seed_env", keys.nkey_seed_env),
            ("token_env", keys.token_env),
        ];
        let set: Vec<_> = credentials.iter().filter(|(_, v)| v.is_some()).collect();
        if set.len() > 1 {
            errors.push(ConfigError::new(
                format!("{path}.{}", set[1].0),
                "set at most one of creds_file, nkey_seed_env, token_env",
            ));
        }
        let auth = match credentials {
            [(_, Some(file)), ..] => read(ctx, file, &format!("{path}.creds_file"), errors)
                .and_then(
                    |creds| match async_nats::ConnectOptions::new().credentials(&creds) {
                        Ok(_) => Some(Auth::Creds(creds)),
                        Err(_) => {
                            errors.push(ConfigError::new(
                                format!("{path}.creds_file"),
                                format!(
                                    "'{file}' is not a NATS credentials file (a JWT and an nkey seed)"
                                ),
                            ));
                            None
                        }
                    },
                ),
            [_, (_, Some(var)), _] => {
                secret_from_env(var, &format!("{path}.nkey_seed_env"), env, errors).and_then(
                    |seed| match nkey_seed_is_valid(&seed) {
                        true => Some(Auth::NKey(seed.trim().to_string())),
                        false => {
                            errors.push(ConfigError::new(
                                format!("{path}.nkey_seed_env"),
                                format!(
                                "environment variable '{var}' does not hold an nkey seed (SU...)"
                            ),
                            ));
                            None
                        }
                    },
                )
            }
            [_, _, (_, Some(var))] => {
                secret_from_env(var, &format!("{path}.token_env"), env, errors).map(Auth::Token)
            }
            _ => Some(Auth::None),
        };
        let ca_ok = match keys.ca_file {
            None => true,
            Some(file) => {
                let at = format!("{path}.ca_file");
                match read(ctx, file, &at, errors) {
                    Some(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => true,
                    Some(_) => {
                        errors.push(ConfigError::new(
                            at,
                            format!(
                                "'{file}' holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
                            ),
                        ));
                        false
                    }
                    None => false,
                }
            }
        };
        let (Some((url, addr)), Some(auth), true) = (url, auth, ca_ok) else {
            return None;
        };
        let tls = keys.tls.unwrap_or(false) || addr.scheme() == "tls";
        let identity = format!(
            "{url}\n{}\n{}\n{}\n{tls}\n{}",
            keys.creds_file.unwrap_or_default(),
            keys.nkey_seed_env.unwrap_or_default(),
            keys.token_env.unwrap_or_default(),
            keys.ca_file.unwrap_or_default(),
        );
        Some(NatsConnection {
            url,
            auth,
            tls,
            ca_file: keys.ca_file.map(str::to_string),
            identity,
            shown: format!("{}:{}", addr.host(), addr.port()),
        })
    }

    /// `host:port`, for messages (never the URL: it may hold a password).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// What tells two settings apart without their secrets.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The URL to connect to (it may hold a password: never show it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether TLS is required.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The client's connect options for these settings: credentials, TLS and the CA. Callers
    /// add their name, timeouts and reconnect behaviour.
    pub fn options(&self) -> Result<async_nats::ConnectOptions, String> {
        let mut options = async_nats::ConnectOptions::new().require_tls(self.tls);
        if let Some(ca) = &self.ca_file {
            options = options.add_root_certificates(PathBuf::from(ca));
        }
        Ok(match &self.auth {
            Auth::None => options,
            Auth::Creds(creds) => options
                .credentials(creds)
                .map_err(|e| format!("the credentials file is not valid: {e}"))?,
            Auth::NKey(seed) => options.nkey(seed.clone()),
            Auth::Token(token) => options.token(token.clone()),
        })
    }
}

/// Whether a connect failure is the server refusing us (credentials, permissions, a protocol
/// mismatch, TLS): trying again would fail the same way.
pub fn is_refusal(kind: ConnectErrorKind) -> bool {
    matches!(
        kind,
        ConnectErrorKind::Authentication
            | ConnectErrorKind::AuthorizationViolation
            | ConnectErrorKind::ServerParse
            | ConnectErrorKind::Tls
    )
}

fn read(
    ctx: &CompileContext<'_>,
    file: &str,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<String> {
    (ctx.read_file)(file)
        .map_err(|e| errors.push(ConfigError::new(path, format!("cannot read '{file}': {e}"))))
        .ok()
}

/// Whether `seed` looks like a user nkey seed: `SU` and 56 more base32 characters (the server
/// checks the signature it makes).
fn nkey_seed_is_valid(seed: &str) -> bool {
    let seed = seed.trim();
    seed.len() == 58
        && seed.starts_with("SU")
        && seed.chars().all(|c| matches!(c, 'A'..='Z' | '2'..='7'))
}
