//! Asking an HTTP service where a user lives, in nginx's `auth_http` protocol, so that existing lookup
//! services work unchanged. Sans-IO: the request's headers, the answer's parsing and a bounded cache of
//! answers; the HTTP exchange itself is `net::lookup`.
//!
//! Request headers: `Auth-Method` (`plain` or `login`), `Auth-User` and (only with `send_password`)
//! `Auth-Pass`, both percent-escaped as nginx does, `Auth-Protocol: imap`, `Auth-Login-Attempt`,
//! `Client-IP`, `Client-Host`. Answer: `Auth-Status: OK` with `Auth-Server` (an IP address) and
//! `Auth-Port`, optionally `Auth-User` (the name to log in with); any other `Auth-Status` refuses the
//! login, after `Auth-Wait` seconds when given.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// What a login asks.
#[derive(Debug, Clone)]
pub struct Question<'a> {
    /// `plain` (LOGIN command, AUTHENTICATE PLAIN) or `login` (AUTHENTICATE LOGIN).
    pub method: &'static str,
    pub user: &'a str,
    /// Sent only when configured.
    pub password: Option<&'a [u8]>,
    /// 1 for the first login on the connection.
    pub attempt: u32,
    pub client: IpAddr,
}

/// The service's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Log in at this server, as this user when given.
    Server { ip: IpAddr, port: u16, user: Option<String> },
    /// Refused: the generic failure reply, after `wait`.
    Refused { status: String, wait: Option<Duration> },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("lookup service answered HTTP {0}")]
    Status(u16),
    #[error("lookup answer without Auth-Status")]
    NoStatus,
    #[error("lookup answer with a bad {0} header")]
    BadHeader(&'static str),
    #[error("lookup timed out")]
    Timeout,
    #[error("lookup service unreachable: {0}")]
    Unreachable(String),
}

/// Longest `Auth-Wait` honoured: a lookup service cannot park a connection for long.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// nginx's escaping of `Auth-User`/`Auth-Pass`: `%`, space, controls and non-ASCII as `%XX`.
pub fn escape(value: &[u8]) -> String {
    let mut out = String::with_capacity(value.len());
    for &b in value {
        if b <= b' ' || b == b'%' || b >= 0x7f {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(char::from(b));
        }
    }
    out
}

/// The inverse of [`escape`]; `None` for a malformed escape or a result that is not UTF-8.
pub fn unescape(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The request headers for `question`.
pub fn headers(question: &Question<'_>) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        ("Auth-Method", question.method.to_owned()),
        ("Auth-User", escape(question.user.as_bytes())),
        ("Auth-Protocol", "imap".to_owned()),
        ("Auth-Login-Attempt", question.attempt.to_string()),
        ("Client-IP", question.client.to_string()),
        ("Client-Host", "[UNAVAILABLE]".to_owned()),
    ];
    if let Some(password) = question.password {
        headers.insert(2, ("Auth-Pass", escape(password)));
    }
    headers
}

/// Reads an answer from its HTTP status and headers (names case-insensitive).
pub fn parse<'h>(status: u16, headers: impl IntoIterator<Item = (&'h str, &'h [u8])>) -> Result<Answer, LookupError> {
    if status != 200 {
        return Err(LookupError::Status(status));
    }
    let mut fields: HashMap<String, String> = HashMap::new();
    for (name, value) in headers {
        let value = std::str::from_utf8(value).map_err(|_| LookupError::BadHeader("non-UTF-8"))?;
        fields.insert(name.to_ascii_lowercase(), value.trim().to_owned());
    }
    let status = fields.get("auth-status").ok_or(LookupError::NoStatus)?;
    if status != "OK" {
        let wait = match fields.get("auth-wait") {
            Some(w) => {
                Some(Duration::from_secs(w.parse().map_err(|_| LookupError::BadHeader("Auth-Wait"))?).min(MAX_WAIT))
            }
            None => None,
        };
        return Ok(Answer::Refused { status: status.chars().take(200).collect(), wait });
    }
    let ip = fields
        .get("auth-server")
        .and_then(|s| s.trim_start_matches('[').trim_end_matches(']').parse().ok())
        .ok_or(LookupError::BadHeader("Auth-Server"))?;
    let port = fields.get("auth-port").and_then(|p| p.parse().ok()).ok_or(LookupError::BadHeader("Auth-Port"))?;
    let user = match fields.get("auth-user") {
        Some(u) => Some(unescape(u).filter(|u| !u.is_empty()).ok_or(LookupError::BadHeader("Auth-User"))?),
        None => None,
    };
    Ok(Answer::Server { ip, port, user })
}

/// Answers by user, each until its time is up; bounded, the soonest to expire go first.
#[derive(Debug)]
pub struct Cache {
    entries: HashMap<String, (Answer, Instant)>,
    max: usize,
    positive: Duration,
    negative: Duration,
}

impl Cache {
    pub fn new(max: usize, positive: Duration, negative: Duration) -> Self {
        Self { entries: HashMap::new(), max: max.max(1), positive, negative }
    }

    pub fn get(&mut self, user: &str, now: Instant) -> Option<Answer> {
        match self.entries.get(user) {
            Some((answer, until)) if *until > now => Some(answer.clone()),
            Some(_) => {
                self.entries.remove(user);
                None
            }
            None => None,
        }
    }

    pub fn insert(&mut self, user: &str, answer: Answer, now: Instant) {
        let ttl = match answer {
            Answer::Server { .. } => self.positive,
            Answer::Refused { .. } => self.negative,
        };
        if ttl.is_zero() {
            return;
        }
        if self.entries.len() >= self.max && !self.entries.contains_key(user) {
            self.entries.retain(|_, (_, until)| *until > now);
            if self.entries.len() >= self.max {
                if let Some(soonest) = self.entries.iter().min_by_key(|(_, (_, until))| *until).map(|(k, _)| k.clone())
                {
                    self.entries.remove(&soonest);
                }
            }
        }
        self.entries.insert(user.to_owned(), (answer, now + ttl));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_headers_are_nginx_s() {
        let q = Question {
            method: "plain",
            user: "jürgen @x",
            password: Some(b"p%ss w"),
            attempt: 2,
            client: "192.0.2.7".parse().unwrap(),
        };
        let h = headers(&q);
        assert_eq!(h[0], ("Auth-Method", "plain".into()));
        assert_eq!(h[1], ("Auth-User", "j%C3%BCrgen%20@x".into()));
        assert_eq!(h[2], ("Auth-Pass", "p%25ss%20w".into()));
        assert!(h.contains(&("Auth-Protocol", "imap".into())));
        assert!(h.contains(&("Auth-Login-Attempt", "2".into())));
        assert!(h.contains(&("Client-IP", "192.0.2.7".into())));
        let without = headers(&Question { password: None, ..q });
        assert!(without.iter().all(|(k, _)| *k != "Auth-Pass"), "no password unless configured");
        assert_eq!(unescape("j%C3%BCrgen%20@x").as_deref(), Some("jürgen @x"));
        assert_eq!(unescape("bad%2"), None);
    }

    #[test]
    fn answers() {
        let h =
            |pairs: &[(&'static str, &'static str)]| pairs.iter().map(|(k, v)| (*k, v.as_bytes())).collect::<Vec<_>>();
        assert_eq!(
            parse(200, h(&[("Auth-Status", "OK"), ("Auth-Server", "10.0.0.5"), ("Auth-Port", "143")])),
            Ok(Answer::Server { ip: "10.0.0.5".parse().unwrap(), port: 143, user: None })
        );
        assert_eq!(
            parse(
                200,
                h(&[("auth-status", "OK"), ("auth-server", "::1"), ("auth-port", "10143"), ("Auth-User", "a%40b")])
            ),
            Ok(Answer::Server { ip: "::1".parse().unwrap(), port: 10143, user: Some("a@b".into()) })
        );
        assert_eq!(
            parse(200, h(&[("Auth-Status", "Invalid login or password"), ("Auth-Wait", "3")])),
            Ok(Answer::Refused { status: "Invalid login or password".into(), wait: Some(Duration::from_secs(3)) })
        );
        assert_eq!(
            parse(200, h(&[("Auth-Status", "No"), ("Auth-Wait", "3600")])),
            Ok(Answer::Refused { status: "No".into(), wait: Some(MAX_WAIT) })
        );
        assert_eq!(parse(500, h(&[])), Err(LookupError::Status(500)));
        assert_eq!(parse(200, h(&[])), Err(LookupError::NoStatus));
        assert_eq!(
            parse(200, h(&[("Auth-Status", "OK"), ("Auth-Server", "mail.example"), ("Auth-Port", "143")])),
            Err(LookupError::BadHeader("Auth-Server")),
            "an address, not a name (as nginx)"
        );
        assert_eq!(
            parse(200, h(&[("Auth-Status", "OK"), ("Auth-Server", "10.0.0.5")])),
            Err(LookupError::BadHeader("Auth-Port"))
        );
    }

    #[test]
    fn cache_is_bounded_and_expires() {
        let t = Instant::now();
        let mut c = Cache::new(2, Duration::from_secs(60), Duration::from_secs(5));
        let ok = Answer::Server { ip: "10.0.0.1".parse().unwrap(), port: 143, user: None };
        let no = Answer::Refused { status: "No".into(), wait: None };
        c.insert("a", ok.clone(), t);
        c.insert("b", no.clone(), t);
        assert_eq!(c.get("a", t + Duration::from_secs(59)), Some(ok.clone()));
        assert_eq!(c.get("b", t + Duration::from_secs(5)), None, "negative answers expire sooner");
        c.insert("b", no, t);
        c.insert("c", ok.clone(), t);
        assert_eq!(c.len(), 2, "bounded");
        assert_eq!(c.get("b", t), None, "the soonest to expire went first");
        assert_eq!(c.get("c", t), Some(ok));
    }
}
