//! A small SMTP server for the email tests (tokio, 127.0.0.1:0): EHLO/HELO, AUTH PLAIN, MAIL
//! FROM, RCPT TO, DATA (with dot-unstuffing), RSET, NOOP, QUIT. It records every connection,
//! every command line, every envelope and every message, and can be told to answer a given
//! step with a given code once (`fail_next`).
//!
//! Written here rather than taken from a crate: the embeddable SMTP servers on crates.io either
//! run blocking threads that cannot be stopped per test or cannot refuse a chosen step with a
//! chosen code, which the retry-classification tests need.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Where an injected failure answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The answer to `MAIL FROM`.
    Mail,
    /// The answer to `RCPT TO`.
    Rcpt,
    /// The answer to `DATA` (before the message).
    Data,
    /// The answer after the message's final `.`.
    DataEnd,
}

/// One message the server received after `DATA`, accepted or not.
#[derive(Debug, Clone)]
pub struct Received {
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// The message as sent, dot-unstuffed, lines ending in CRLF.
    pub data: Vec<u8>,
    /// Whether the server answered 250 after the final `.`.
    pub accepted: bool,
}

#[derive(Default)]
struct State {
    connections: usize,
    commands: Vec<String>,
    messages: Vec<Received>,
    failures: VecDeque<(Step, u16, String)>,
    /// `(user, password)` of each successful AUTH PLAIN.
    logins: Vec<(String, String)>,
}

pub struct SmtpServer {
    pub port: u16,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SmtpServer {
    pub async fn start() -> SmtpServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                shared.lock().unwrap().connections += 1;
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = session(stream, state).await;
                });
            }
        });
        SmtpServer { port, state, task }
    }

    /// Answer the next `step` with `code text` (once).
    pub fn fail_next(&self, step: Step, code: u16, text: &str) {
        self.state
            .lock()
            .unwrap()
            .failures
            .push_back((step, code, text.to_string()));
    }

    /// Messages accepted with 250 after DATA.
    pub fn accepted(&self) -> Vec<Received> {
        self.messages().into_iter().filter(|m| m.accepted).collect()
    }

    /// Every message received after DATA, accepted or refused.
    pub fn messages(&self) -> Vec<Received> {
        self.state.lock().unwrap().messages.clone()
    }

    pub fn commands(&self) -> Vec<String> {
        self.state.lock().unwrap().commands.clone()
    }

    pub fn connections(&self) -> usize {
        self.state.lock().unwrap().connections
    }

    pub fn logins(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().logins.clone()
    }
}

/// The answer for `step`: an injected failure, or `ok`.
fn answer(state: &Mutex<State>, step: Step, ok: &str) -> (bool, String) {
    let mut state = state.lock().unwrap();
    if let Some(i) = state.failures.iter().position(|(s, _, _)| *s == step) {
        let (_, code, text) = state.failures.remove(i).unwrap();
        return (false, format!("{code} {text}\r\n"));
    }
    (true, ok.to_string())
}

async fn session(stream: TcpStream, state: Arc<Mutex<State>>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    write.write_all(b"220 test.local ESMTP ready\r\n").await?;
    let mut mail_from: Option<String> = None;
    let mut rcpt_to: Vec<String> = Vec::new();
    loop {
        let mut line = String::new();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let command = line.trim_end_matches(['\r', '\n']).to_string();
        state.lock().unwrap().commands.push(command.clone());
        let upper = command.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") {
            "250-test.local\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 AUTH PLAIN\r\n".into()
        } else if upper.starts_with("HELO") {
            "250 test.local\r\n".into()
        } else if let Some(encoded) = upper
            .starts_with("AUTH PLAIN ")
            .then(|| &command["AUTH PLAIN ".len()..])
        {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .unwrap_or_default();
            let parts: Vec<String> = decoded
                .split(|b| *b == 0)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            if parts.len() == 3 {
                state
                    .lock()
                    .unwrap()
                    .logins
                    .push((parts[1].clone(), parts[2].clone()));
                "235 2.7.0 Authentication successful\r\n".into()
            } else {
                "501 5.5.2 Cannot decode\r\n".into()
            }
        } else if upper.starts_with("MAIL FROM:") {
            let (ok, reply) = answer(&state, Step::Mail, "250 2.1.0 Ok\r\n");
            if ok {
                mail_from = Some(path_of(&command["MAIL FROM:".len()..]));
                rcpt_to.clear();
            }
            reply
        } else if upper.starts_with("RCPT TO:") {
            if mail_from.is_none() {
                "503 5.5.1 MAIL first\r\n".into()
            } else {
                let (ok, reply) = answer(&state, Step::Rcpt, "250 2.1.5 Ok\r\n");
                if ok {
                    rcpt_to.push(path_of(&command["RCPT TO:".len()..]));
                }
                reply
            }
        } else if upper == "DATA" {
            if rcpt_to.is_empty() {
                "503 5.5.1 RCPT first\r\n".into()
            } else {
                let (ok, reply) = answer(
                    &state,
                    Step::Data,
                    "354 End data with <CR><LF>.<CR><LF>\r\n",
                );
                if !ok {
                    reply
                } else {
                    write.write_all(reply.as_bytes()).await?;
                    let data = read_data(&mut lines).await?;
                    let (accepted, reply) =
                        answer(&state, Step::DataEnd, "250 2.0.0 Ok: queued\r\n");
                    state.lock().unwrap().messages.push(Received {
                        mail_from: mail_from.take().unwrap_or_default(),
                        rcpt_to: std::mem::take(&mut rcpt_to),
                        data,
                        accepted,
                    });
                    reply
                }
            }
        } else if upper == "RSET" {
            mail_from = None;
            rcpt_to.clear();
            "250 2.0.0 Ok\r\n".into()
        } else if upper == "NOOP" {
            "250 2.0.0 Ok\r\n".into()
        } else if upper == "QUIT" {
            write.write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(());
        } else {
            "502 5.5.2 Command not recognized\r\n".into()
        };
        write.write_all(reply.as_bytes()).await?;
    }
}

/// `<a@b> SIZE=10` -> `a@b`.
fn path_of(argument: &str) -> String {
    let argument = argument.trim();
    let end = argument.find('>').map(|i| i + 1).unwrap_or(argument.len());
    argument[..end]
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string()
}

/// The message up to the line holding a single `.`, dot-unstuffed.
async fn read_data<R: AsyncBufReadExt + Unpin>(lines: &mut R) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::new();
    loop {
        let mut line = Vec::new();
        if lines.read_until(b'\n', &mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == b".\r\n" || line == b".\n" {
            return Ok(data);
        }
        let unstuffed = if line.starts_with(b"..") {
            &line[1..]
        } else {
            &line[..]
        };
        data.extend_from_slice(unstuffed);
    }
}
