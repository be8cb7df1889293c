//! The two OAuth 2.0 SASL mechanisms' client messages, parsed strictly (no I/O): OAUTHBEARER (RFC 7628:
//! a GS2 header, then `key=value` pairs separated by ^A, `auth=Bearer <token>` among them) and Google's
//! and Microsoft's XOAUTH2 (`user=<name>^Aauth=Bearer <token>^A^A`). The user to route comes from the
//! message (OAUTHBEARER's `a=`, XOAUTH2's `user=`); the token is a secret (redacted, wiped on drop), and the
//! whole message is kept to be replayed to the backend unchanged. The backend validates the token.
//! A message is rebuilt (same user and token, the other mechanism's framing, or another user name) only when
//! the backend needs it so: a lookup renamed the user, or the backend offers only the other mechanism.
//! Depends on `credentials`.

use super::credentials::{Secret, Username};

/// Which OAuth mechanism a message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthMechanism {
    OAuthBearer,
    XOAuth2,
}

impl OAuthMechanism {
    /// The SASL name.
    pub fn as_str(self) -> &'static str {
        match self {
            OAuthMechanism::OAuthBearer => "OAUTHBEARER",
            OAuthMechanism::XOAuth2 => "XOAUTH2",
        }
    }

    /// What a client answers to an error challenge, base64 (RFC 7628 3.2.3: a lone ^A; XOAUTH2 clients
    /// answer an empty response, which Dovecot and Google accept as well).
    pub fn error_acknowledgement(self) -> &'static [u8] {
        match self {
            OAuthMechanism::OAuthBearer => b"AQ==",
            OAuthMechanism::XOAuth2 => b"",
        }
    }

    /// The error challenge the proxy gives itself when it refuses a token without asking the backend (a
    /// token already refused): base64 of the JSON Dovecot sends, `{"status":"invalid_token"}` (RFC 7628)
    /// and `{"status":"401","schemes":"bearer","scope":"mail"}` (Google's XOAUTH2).
    pub fn error_challenge(self) -> &'static str {
        match self {
            OAuthMechanism::OAuthBearer => "eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=",
            OAuthMechanism::XOAuth2 => "eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=",
        }
    }
}

/// A parsed client message.
#[derive(Debug, PartialEq, Eq)]
pub struct OAuthMessage {
    pub mechanism: OAuthMechanism,
    pub username: Username,
    /// The bearer token alone (b64token syntax, RFC 6750).
    pub token: Secret<Vec<u8>>,
    /// The message as the client sent it, decoded: what the backend gets.
    pub message: Secret<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OAuthError {
    #[error("malformed GS2 header")]
    Gs2Header,
    /// `p=...`: channel binding, which a TLS-terminating proxy cannot offer.
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("malformed key/value pairs")]
    Pairs,
    #[error("no user in the message")]
    NoUser,
    #[error("no auth=Bearer token")]
    NoToken,
    #[error("invalid bearer token")]
    Token,
    #[error("invalid user name")]
    Username,
}

/// One `key=value` of a message.
type Pair<'a> = (&'a [u8], &'a [u8]);

/// Key/value pairs separated (and terminated) by ^A, the list closed by an empty pair: `k=v^Ak=v^A^A`.
fn pairs(body: &[u8]) -> Result<Vec<Pair<'_>>, OAuthError> {
    let inner = body.strip_suffix(b"\x01\x01").ok_or(OAuthError::Pairs)?;
    let mut out = Vec::new();
    for pair in inner.split(|&b| b == 0x01) {
        let eq = pair.iter().position(|&b| b == b'=').ok_or(OAuthError::Pairs)?;
        let (key, value) = (&pair[..eq], &pair[eq + 1..]);
        // RFC 7628: key = 1*(ALPHA); values are printable or SP/HTAB.
        if key.is_empty() || !key.iter().all(u8::is_ascii_alphabetic) {
            return Err(OAuthError::Pairs);
        }
        if value.iter().any(|&b| b < 0x20 && b != b'\t' || b == 0x7f) {
            return Err(OAuthError::Pairs);
        }
        if out.iter().any(|(k, _): &Pair<'_>| k.eq_ignore_ascii_case(key)) {
            return Err(OAuthError::Pairs);
        }
        out.push((key, value));
    }
    Ok(out)
}

/// The token of `auth=Bearer <token>` (scheme case-insensitive, one space), in b64token syntax.
fn bearer(pairs: &[Pair<'_>]) -> Result<Vec<u8>, OAuthError> {
    let (_, value) = pairs.iter().find(|(k, _)| k.eq_ignore_ascii_case(b"auth")).ok_or(OAuthError::NoToken)?;
    let scheme = value.get(..7).ok_or(OAuthError::NoToken)?;
    if !scheme.eq_ignore_ascii_case(b"Bearer ") {
        return Err(OAuthError::NoToken);
    }
    let token = &value[7..];
    let body_len = token.iter().position(|&b| b == b'=').unwrap_or(token.len());
    let (body, padding) = token.split_at(body_len);
    let valid = !body.is_empty()
        && body.iter().all(|&b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
        && padding.iter().all(|&b| b == b'=');
    if !valid {
        return Err(OAuthError::Token);
    }
    Ok(token.to_vec())
}

/// RFC 5801 saslname: `=2C` for ',' and `=3D` for '='; any other '=' or a raw ',' is invalid.
fn unescape_saslname(raw: &[u8]) -> Result<Vec<u8>, OAuthError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'=' => {
                match raw.get(i + 1..i + 3) {
                    Some(b"2C") | Some(b"2c") => out.push(b','),
                    Some(b"3D") | Some(b"3d") => out.push(b'='),
                    _ => return Err(OAuthError::Gs2Header),
                }
                i += 3;
            }
            b',' => return Err(OAuthError::Gs2Header),
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

/// An OAUTHBEARER client message (RFC 7628 section 3.1).
pub fn parse_oauthbearer(message: &[u8]) -> Result<OAuthMessage, OAuthError> {
    // gs2-header = gs2-cb-flag "," [ "a=" saslname ] "," ; then kvsep.
    let first = message.iter().position(|&b| b == b',').ok_or(OAuthError::Gs2Header)?;
    match &message[..first] {
        b"n" | b"y" => {}
        flag if flag.starts_with(b"p=") => return Err(OAuthError::ChannelBinding),
        _ => return Err(OAuthError::Gs2Header),
    }
    let rest = &message[first + 1..];
    let second = rest.iter().position(|&b| b == b',').ok_or(OAuthError::Gs2Header)?;
    let authzid = &rest[..second];
    let body = rest[second + 1..].strip_prefix(b"\x01").ok_or(OAuthError::Pairs)?;
    let user = match authzid {
        [] => return Err(OAuthError::NoUser),
        _ => authzid.strip_prefix(b"a=").ok_or(OAuthError::Gs2Header).and_then(unescape_saslname)?,
    };
    let pairs = pairs(body)?;
    let token = bearer(&pairs)?;
    let username = Username::parse(&user).map_err(|_| OAuthError::Username)?;
    Ok(OAuthMessage {
        mechanism: OAuthMechanism::OAuthBearer,
        username,
        token: Secret::new(token),
        message: Secret::new(message.to_vec()),
    })
}

/// An XOAUTH2 client message: `user=<name>^Aauth=Bearer <token>^A^A`.
pub fn parse_xoauth2(message: &[u8]) -> Result<OAuthMessage, OAuthError> {
    let pairs = pairs(message)?;
    let (_, user) = pairs.iter().find(|(k, _)| k.eq_ignore_ascii_case(b"user")).ok_or(OAuthError::NoUser)?;
    let token = bearer(&pairs)?;
    let username = Username::parse(user).map_err(|_| OAuthError::Username)?;
    Ok(OAuthMessage {
        mechanism: OAuthMechanism::XOAuth2,
        username,
        token: Secret::new(token),
        message: Secret::new(message.to_vec()),
    })
}

/// A message for `mechanism` carrying `user` and `token` (a token that came out of a parsed message, so in
/// b64token syntax): `n,a=<saslname>,^Aauth=Bearer <token>^A^A` or `user=<name>^Aauth=Bearer <token>^A^A`.
pub fn build(mechanism: OAuthMechanism, user: &Username, token: &Secret<Vec<u8>>) -> Secret<Vec<u8>> {
    let mut out = Vec::with_capacity(user.as_str().len() + token.expose().len() + 32);
    match mechanism {
        OAuthMechanism::OAuthBearer => {
            out.extend_from_slice(b"n,a=");
            for &b in user.as_str().as_bytes() {
                match b {
                    b',' => out.extend_from_slice(b"=2C"),
                    b'=' => out.extend_from_slice(b"=3D"),
                    b => out.push(b),
                }
            }
            out.extend_from_slice(b",\x01");
        }
        OAuthMechanism::XOAuth2 => {
            out.extend_from_slice(b"user=");
            out.extend_from_slice(user.as_str().as_bytes());
            out.push(0x01);
        }
    }
    out.extend_from_slice(b"auth=Bearer ");
    out.extend_from_slice(token.expose());
    out.extend_from_slice(b"\x01\x01");
    Secret::new(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oauthbearer_as_rfc_7628_shows_it() {
        let m = b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01";
        let parsed = parse_oauthbearer(m).unwrap();
        assert_eq!(parsed.mechanism, OAuthMechanism::OAuthBearer);
        assert_eq!(parsed.username.as_str(), "user@example.com");
        assert_eq!(parsed.token.expose(), b"vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==");
        assert_eq!(parsed.message.expose(), m);
        let debug = format!("{parsed:?}");
        assert!(!debug.contains("vF9dft4q"), "the token must not print: {debug}");
    }

    #[test]
    fn xoauth2_as_google_documents_it() {
        let m = b"user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg\x01\x01";
        let parsed = parse_xoauth2(m).unwrap();
        assert_eq!(parsed.username.as_str(), "someuser@example.com");
        assert_eq!(parsed.token.expose(), b"ya29.vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg");
    }

    #[test]
    fn saslname_escapes_and_header_errors() {
        let m = b"n,a=we=2Cird=3Dname@example.org,\x01auth=Bearer abc\x01\x01";
        assert_eq!(parse_oauthbearer(m).unwrap().username.as_str(), "we,ird=name@example.org");
        let cases: [(&[u8], OAuthError); 9] = [
            (b"p=tls-unique,a=u@x.org,\x01auth=Bearer abc\x01\x01", OAuthError::ChannelBinding),
            (b"x,a=u@x.org,\x01auth=Bearer abc\x01\x01", OAuthError::Gs2Header),
            (b"n,,\x01auth=Bearer abc\x01\x01", OAuthError::NoUser),
            (b"n,a=u=ZZ,\x01auth=Bearer abc\x01\x01", OAuthError::Gs2Header),
            (b"n,a=u@x.org,\x01auth=Bearer abc\x01", OAuthError::Pairs),
            (b"n,a=u@x.org,\x01auth=Basic abc\x01\x01", OAuthError::NoToken),
            (b"n,a=u@x.org,\x01auth=Bearer a b\x01\x01", OAuthError::Token),
            (b"n,a=u@x.org,\x01auth=Bearer abc\x01auth=Bearer def\x01\x01", OAuthError::Pairs),
            (b"n,a=u@x.org,\x01host=a\x00b\x01auth=Bearer abc\x01\x01", OAuthError::Pairs),
        ];
        for (message, error) in cases {
            assert_eq!(parse_oauthbearer(message).err(), Some(error), "{:?}", String::from_utf8_lossy(message));
        }
        assert_eq!(parse_xoauth2(b"auth=Bearer abc\x01\x01").err(), Some(OAuthError::NoUser));
        assert_eq!(parse_xoauth2(b"user=bad\r\nname\x01auth=Bearer abc\x01\x01").err(), Some(OAuthError::Pairs));
    }

    #[test]
    fn built_messages_parse_back_to_the_same_user_and_token() {
        let user = Username::parse(b"we,ird=name@example.org").unwrap();
        let token = Secret::new(b"ya29.a0-b_c~d+e/f==".to_vec());
        let bearer = build(OAuthMechanism::OAuthBearer, &user, &token);
        assert_eq!(bearer.expose(), b"n,a=we=2Cird=3Dname@example.org,\x01auth=Bearer ya29.a0-b_c~d+e/f==\x01\x01");
        let parsed = parse_oauthbearer(bearer.expose()).unwrap();
        assert_eq!((parsed.username.as_str(), parsed.token.expose()), (user.as_str(), token.expose()));
        let xoauth2 = build(OAuthMechanism::XOAuth2, &user, &token);
        let parsed = parse_xoauth2(xoauth2.expose()).unwrap();
        assert_eq!((parsed.username.as_str(), parsed.token.expose()), (user.as_str(), token.expose()));
    }
}
