//! The admin API's bearer tokens (no I/O but reading the file): one per line, `name role token`, `#`
//! comments. Roles: `read` (look) and `operator` (look and act). Tokens are compared in constant time,
//! against every entry, so a guess learns nothing from timing; a token is never printed (its name is what
//! the audit log records).

use std::fmt;
use std::path::Path;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Read,
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Operator => "operator",
        }
    }
}

/// Who presented a valid token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

struct Entry {
    caller: Caller,
    token: Vec<u8>,
}

/// The tokens of a token file.
pub struct Tokens {
    entries: Vec<Entry>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.entries.iter().map(|e| &e.caller)).finish()
    }
}

/// Shortest token accepted: 128 bits as hex.
pub const MIN_TOKEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("line {line}: {message}")]
    Line { line: usize, message: String },
    #[error("no token in the file")]
    Empty,
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens, TokenError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| TokenError::Read { path: path.display().to_string(), source })?;
        Tokens::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Tokens, TokenError> {
        let mut entries: Vec<Entry> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let fail = |message: &str| TokenError::Line { line: line_no, message: message.to_owned() };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, role, token] = fields[..] else {
                return Err(fail("expected `name role token`"));
            };
            let role = match role {
                "read" => Role::Read,
                "operator" => Role::Operator,
                _ => return Err(fail("the role is `read` or `operator`")),
            };
            if token.len() < MIN_TOKEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(fail("a token is at least 32 printable characters (openssl rand -hex 32)"));
            }
            if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b)) || name.len() > 64 {
                return Err(fail("a name is up to 64 letters, digits, `-_.@`"));
            }
            if entries.iter().any(|e| e.caller.name == name) {
                return Err(fail("the name is used twice"));
            }
            if entries.iter().any(|e| e.token == token.as_bytes()) {
                return Err(fail("the token is used twice"));
            }
            entries.push(Entry { caller: Caller { name: name.to_owned(), role }, token: token.as_bytes().to_vec() });
        }
        if entries.is_empty() {
            return Err(TokenError::Empty);
        }
        Ok(Tokens { entries })
    }

    /// The caller an `Authorization` header value names, if it is `Bearer <a known token>`.
    pub fn check(&self, authorization: Option<&[u8]>) -> Option<Caller> {
        let presented = authorization?.strip_prefix(b"Bearer ")?;
        let mut found = None;
        for entry in &self.entries {
            // Every entry is compared, whatever matched before.
            if constant_time_eq(presented, &entry.token) && found.is_none() {
                found = Some(entry.caller.clone());
            }
        }
        found
    }
}

/// Equal contents, in time that depends on the lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPS: &str = "0123456789abcdef0123456789abcdef";
    const VIEW: &str = "fedcba9876543210fedcba9876543210";

    #[test]
    fn roles_by_token() {
        let tokens =
            Tokens::parse(&format!("# who role token\nalice operator {OPS}\n\ngrafana read {VIEW}\n")).unwrap();
        let header = |t: &str| format!("Bearer {t}");
        assert_eq!(tokens.check(Some(header(OPS).as_bytes())).map(|c| c.role), Some(Role::Operator));
        let viewer = tokens.check(Some(header(VIEW).as_bytes())).unwrap();
        assert_eq!((viewer.name.as_str(), viewer.role), ("grafana", Role::Read));
        assert!(tokens.check(Some(header(&OPS[..31]).as_bytes())).is_none());
        assert!(tokens.check(Some(OPS.as_bytes())).is_none(), "the scheme is required");
        assert!(tokens.check(None).is_none());
        assert!(!format!("{tokens:?}").contains(OPS), "tokens never print");
    }

    #[test]
    fn bad_files() {
        for (text, line) in [
            (format!("alice admin {OPS}"), 1),
            ("alice operator short".to_owned(), 1),
            (format!("alice operator {OPS}\nalice read {VIEW}"), 2),
            (format!("alice operator {OPS}\nbob read {OPS}"), 2),
            (format!("alice operator {OPS} extra"), 1),
        ] {
            match Tokens::parse(&text) {
                Err(TokenError::Line { line: l, .. }) => assert_eq!(l, line, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(Tokens::parse("# nothing\n"), Err(TokenError::Empty)));
    }
}
