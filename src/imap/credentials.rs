//! Credentials learned from the client: a validated username and a password that cannot be printed.
//!
//! `Secret` has no `Display`, its `Debug` is redacted and its bytes are wiped on drop, so a password cannot
//! reach a log line by accident. Depends on nothing but std.

use std::fmt;

use zeroize::Zeroize;

/// A value that must never be printed: `Debug` shows `[REDACTED]` and there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T: Zeroize>(T);

impl<T: Zeroize> Secret<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret itself, for the one place that must send it on.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T: Zeroize> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl<T: Zeroize> Drop for Secret<T> {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Longest username accepted, in bytes.
pub const MAX_USERNAME: usize = 256;
/// Longest password accepted, in bytes.
pub const MAX_PASSWORD: usize = 1024;

/// Why a username or password was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    /// The username was empty.
    #[error("empty username")]
    EmptyUsername,
    /// The username was longer than [`MAX_USERNAME`].
    #[error("username too long")]
    UsernameTooLong,
    /// The username was not valid UTF-8.
    #[error("username is not valid UTF-8")]
    UsernameNotUtf8,
    /// The username held a control character (C0, DEL or C1), e.g. a CR/LF smuggled in a literal.
    #[error("username contains a control character")]
    UsernameControl,
    /// The password was empty.
    #[error("empty password")]
    EmptyPassword,
    /// The password was longer than [`MAX_PASSWORD`].
    #[error("password too long")]
    PasswordTooLong,
    /// The password held a NUL, CR or LF, which no backend mechanism can carry.
    #[error("password contains NUL, CR or LF")]
    PasswordControl,
}

/// A username that is valid UTF-8, non-empty, bounded and free of control characters.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Username(String);

impl Username {
    pub fn parse(bytes: &[u8]) -> Result<Self, CredentialsError> {
        if bytes.is_empty() {
            return Err(CredentialsError::EmptyUsername);
        }
        if bytes.len() > MAX_USERNAME {
            return Err(CredentialsError::UsernameTooLong);
        }
        let text = std::str::from_utf8(bytes).map_err(|_| CredentialsError::UsernameNotUtf8)?;
        if text.chars().any(char::is_control) {
            return Err(CredentialsError::UsernameControl);
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The domain part after the last `@`, if any, lower-cased.
    pub fn domain(&self) -> Option<String> {
        self.0.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase()).filter(|d| !d.is_empty())
    }
}

impl fmt::Debug for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated password.
pub type Password = Secret<Vec<u8>>;

pub fn password(bytes: Vec<u8>) -> Result<Password, CredentialsError> {
    let secret = Secret::new(bytes);
    let raw = secret.expose();
    if raw.is_empty() {
        return Err(CredentialsError::EmptyPassword);
    }
    if raw.len() > MAX_PASSWORD {
        return Err(CredentialsError::PasswordTooLong);
    }
    if raw.iter().any(|b| matches!(b, 0 | b'\r' | b'\n')) {
        return Err(CredentialsError::PasswordControl);
    }
    Ok(secret)
}

/// What the client proved itself with.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: Username,
    pub password: Password,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_debug_is_redacted() {
        let creds = Credentials {
            username: Username::parse(b"alice").unwrap(),
            password: password(b"hunter2".to_vec()).unwrap(),
        };
        let shown = format!("{creds:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("alice") && shown.contains("[REDACTED]"), "{shown}");
    }

    #[test]
    fn usernames_are_validated() {
        assert_eq!(Username::parse(b""), Err(CredentialsError::EmptyUsername));
        assert_eq!(Username::parse(b"a\r\nb"), Err(CredentialsError::UsernameControl));
        assert_eq!(Username::parse(b"a\0b"), Err(CredentialsError::UsernameControl));
        assert_eq!(Username::parse(b"a\xffb"), Err(CredentialsError::UsernameNotUtf8));
        assert_eq!(Username::parse("a\u{85}b".as_bytes()), Err(CredentialsError::UsernameControl));
        assert_eq!(Username::parse(&[b'a'; 257]), Err(CredentialsError::UsernameTooLong));
        let user = Username::parse("jürgen@Example.ORG".as_bytes()).unwrap();
        assert_eq!(user.domain().as_deref(), Some("example.org"));
        assert_eq!(Username::parse(b"bob").unwrap().domain(), None);
    }

    #[test]
    fn passwords_are_validated() {
        assert_eq!(password(vec![]).unwrap_err(), CredentialsError::EmptyPassword);
        assert_eq!(password(b"a\nb".to_vec()).unwrap_err(), CredentialsError::PasswordControl);
        assert_eq!(password(vec![b'x'; 1025]).unwrap_err(), CredentialsError::PasswordTooLong);
        assert!(password("pä ss\"\\{}".as_bytes().to_vec()).is_ok());
    }
}
