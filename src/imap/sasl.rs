//! SASL for the two password mechanisms the proxy terminates, PLAIN (RFC 4616) and LOGIN, and the base64
//! of every SASL exchange (OAuth's messages are parsed in `oauth`).
//!
//! Base64 is strict: canonical padding, no whitespace, no trailing bits; a lone `=` is the empty response
//! (RFC 4959). Depends on `credentials`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::credentials::{self, Credentials, CredentialsError, Password, Username};

/// Largest SASL response accepted, base64 text.
pub const MAX_RESPONSE: usize = 8192;

/// The LOGIN mechanism's prompts, base64 of "Username:" and "Password:".
pub const LOGIN_USERNAME_PROMPT: &str = "VXNlcm5hbWU6";
pub const LOGIN_PASSWORD_PROMPT: &str = "UGFzc3dvcmQ6";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    /// The client sent `*`.
    #[error("authentication cancelled")]
    Cancelled,
    /// Not canonical base64, or too long.
    #[error("invalid base64")]
    InvalidBase64,
    /// PLAIN without exactly two NUL separators, or with an empty authentication identity.
    #[error("malformed PLAIN message")]
    MalformedPlain,
    /// An empty response (`=`): no credentials at all, a failed authentication (as Dovecot answers it).
    #[error("empty response")]
    Empty,
    /// PLAIN asking to act as another user; the proxy does not do master-user logins.
    #[error("authorization identity differs from authentication identity")]
    AuthzidMismatch,
    /// The username or password failed validation.
    #[error("{0}")]
    Credentials(#[from] CredentialsError),
}

/// Decodes one client response line (initial response or continuation answer). The decoded bytes may
/// hold a password: they are wiped when dropped.
pub fn decode_response(line: &[u8]) -> Result<credentials::Secret<Vec<u8>>, SaslError> {
    match line {
        b"*" => Err(SaslError::Cancelled),
        b"=" => Ok(credentials::Secret::new(Vec::new())),
        _ if line.len() > MAX_RESPONSE => Err(SaslError::InvalidBase64),
        _ => STANDARD.decode(line).map(credentials::Secret::new).map_err(|_| SaslError::InvalidBase64),
    }
}

/// `[authzid] NUL authcid NUL passwd`.
pub fn parse_plain(message: &[u8]) -> Result<Credentials, SaslError> {
    if message.is_empty() {
        return Err(SaslError::Empty);
    }
    let mut parts = message.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(passwd), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::MalformedPlain);
    };
    if authcid.is_empty() {
        return Err(SaslError::MalformedPlain);
    }
    if !authzid.is_empty() && authzid != authcid {
        return Err(SaslError::AuthzidMismatch);
    }
    Ok(Credentials { username: Username::parse(authcid)?, password: credentials::password(passwd.to_vec())? })
}

/// The PLAIN initial response for a backend login, base64. The password passes through one `Secret`.
pub fn encode_plain(username: &Username, password: &Password) -> Password {
    let mut message = Vec::with_capacity(username.as_str().len() + password.expose().len() + 2);
    message.push(0);
    message.extend_from_slice(username.as_str().as_bytes());
    message.push(0);
    message.extend_from_slice(password.expose());
    let message = credentials::Secret::new(message);
    credentials::Secret::new(STANDARD.encode(message.expose()).into_bytes())
}

/// Base64 of a SASL message that may hold a secret (wiped when dropped).
pub fn encode(message: &[u8]) -> credentials::Secret<Vec<u8>> {
    credentials::Secret::new(STANDARD.encode(message).into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4616_examples() {
        // RFC 4616 section 4: "\0tim\0tanstaaftanstaaf".
        let decoded = decode_response(b"AHRpbQB0YW5zdGFhZnRhbnN0YWFm").unwrap().expose().clone();
        let creds = parse_plain(&decoded).unwrap();
        assert_eq!(creds.username.as_str(), "tim");
        assert_eq!(creds.password.expose(), b"tanstaaftanstaaf");
        // "Ursel\0Kurt\0xipj3plmq": authzid differs.
        let decoded = decode_response(b"VXJzZWwAS3VydAB4aXBqM3BsbXE=").unwrap().expose().clone();
        assert_eq!(parse_plain(&decoded).unwrap_err(), SaslError::AuthzidMismatch);
    }

    #[test]
    fn plain_shapes() {
        assert!(parse_plain(b"alice\0alice\0pw").is_ok());
        assert_eq!(parse_plain(b"\0\0pw").unwrap_err(), SaslError::MalformedPlain);
        assert_eq!(parse_plain(b"\0a\0p\0w").unwrap_err(), SaslError::MalformedPlain);
        assert_eq!(parse_plain(b"alice pw").unwrap_err(), SaslError::MalformedPlain);
        assert_eq!(parse_plain(b"\0alice\0").unwrap_err(), SaslError::Credentials(CredentialsError::EmptyPassword));
    }

    #[test]
    fn strict_base64() {
        assert_eq!(decode_response(b"=").unwrap().expose(), b"");
        assert_eq!(parse_plain(b"").unwrap_err(), SaslError::Empty);
        assert_eq!(decode_response(b"*").unwrap_err(), SaslError::Cancelled);
        for bad in [&b"AHRpbQ"[..], b"AHRp bQ==", b"AHRpbQ=", b"AHRpbR==", b"!!!!", b"AHRpbQ==\r"] {
            assert_eq!(decode_response(bad).unwrap_err(), SaslError::InvalidBase64, "{bad:?}");
        }
        assert_eq!(decode_response(&vec![b'A'; MAX_RESPONSE + 4]).unwrap_err(), SaslError::InvalidBase64);
    }

    #[test]
    fn encode_round_trips() {
        let user = Username::parse(b"alice").unwrap();
        let pass = credentials::password(b"p w".to_vec()).unwrap();
        let encoded = encode_plain(&user, &pass);
        let creds = parse_plain(decode_response(encoded.expose()).unwrap().expose()).unwrap();
        assert_eq!(creds.username, user);
        assert_eq!(creds.password, pass);
    }
}
