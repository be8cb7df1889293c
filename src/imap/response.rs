//! Reads the responses a backend sends while the proxy logs in, and encodes the proxy's own commands to it.
//!
//! Only what the login sequence needs: status responses (tagged and untagged) with their response code,
//! `CAPABILITY` data and continuations. Depends on `framing`, `credentials` and `command`.

use super::command::IdParams;
use super::framing::Frame;

/// Status of a status response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    No,
    Bad,
    PreAuth,
    Bye,
}

/// One backend response, reduced to what the login sequence looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `* OK/NO/BAD/PREAUTH/BYE [code] text` or `tag OK/NO/BAD [code] text`.
    Status { tag: Option<String>, status: Status, code: Option<String>, text: String },
    /// `* CAPABILITY ...`
    Capability(Vec<String>),
    /// `+ ...`, with the text after `+ ` (a SASL challenge, or a human-readable text).
    Continuation(String),
    /// Any other untagged data (e.g. `* ID (...)`), ignored during login.
    Data,
    /// A line that is not a response.
    Malformed,
}

impl Response {
    pub fn parse(frame: &Frame) -> Response {
        let line = frame.first_line();
        let text = String::from_utf8_lossy(line);
        let mut words = text.splitn(3, ' ');
        let (Some(tag), Some(second)) = (words.next(), words.next()) else {
            return if text == "+" { Response::Continuation(String::new()) } else { Response::Malformed };
        };
        let rest = words.next().unwrap_or("");
        if tag == "+" {
            return Response::Continuation(text.split_once(' ').map_or("", |(_, rest)| rest).to_owned());
        }
        let status = match second.to_ascii_uppercase().as_str() {
            "OK" => Status::Ok,
            "NO" => Status::No,
            "BAD" => Status::Bad,
            "PREAUTH" if tag == "*" => Status::PreAuth,
            "BYE" if tag == "*" => Status::Bye,
            "CAPABILITY" if tag == "*" => return Response::Capability(words_of(rest)),
            _ if tag == "*" => return Response::Data,
            _ => return Response::Malformed,
        };
        let (code, text) = match rest.strip_prefix('[').and_then(|r| r.split_once(']')) {
            Some((code, text)) => (Some(code.to_owned()), text.trim_start().to_owned()),
            None => (None, rest.to_owned()),
        };
        let tag = (tag != "*").then(|| tag.to_owned());
        Response::Status { tag, status, code, text }
    }
}

fn words_of(text: &str) -> Vec<String> {
    text.split(' ').filter(|w| !w.is_empty()).map(str::to_owned).collect()
}

/// The capability list in a response code such as `CAPABILITY IMAP4rev1 STARTTLS`.
pub fn code_capabilities(code: Option<&str>) -> Option<Vec<String>> {
    let code = code?;
    let (name, rest) = code.split_once(' ').unwrap_or((code, ""));
    name.eq_ignore_ascii_case("CAPABILITY").then(|| words_of(rest))
}

/// The first word of a response code, upper-cased (`AUTHENTICATIONFAILED`, `REFERRAL`, ...).
pub fn code_name(code: Option<&str>) -> Option<String> {
    code.and_then(|c| c.split(' ').next()).map(str::to_ascii_uppercase)
}

/// Case-insensitive capability lookup.
pub fn has_capability(capabilities: &[String], name: &str) -> bool {
    capabilities.iter().any(|c| c.eq_ignore_ascii_case(name))
}

/// Text safe to show in a log line: control characters and non-ASCII escaped, bounded length.
pub fn loggable(bytes: &[u8]) -> String {
    const MAX: usize = 200;
    let mut out: String = bytes.iter().take(MAX).flat_map(|&b| std::ascii::escape_default(b)).map(char::from).collect();
    if bytes.len() > MAX {
        out.push_str("...");
    }
    out
}

/// An IMAP string for a value the proxy sends: a quoted string when it is plain ASCII without quoted
/// specials' troubles, else a literal (`{n+}` when the backend has LITERAL+/LITERAL-, which the caller
/// confirmed, or `{n}` whose continuation the caller must wait for).
pub enum Encoded {
    Quoted(Vec<u8>),
    Literal { header: Vec<u8>, data: Vec<u8> },
}

/// Encodes `value` as a quoted string if it can be, else as a literal announcement plus data.
pub fn encode_string(value: &[u8], non_sync: bool) -> Encoded {
    let quotable = value.iter().all(|&b| (0x20..0x7f).contains(&b));
    if quotable {
        let mut out = Vec::with_capacity(value.len() + 2);
        out.push(b'"');
        for &b in value {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
        Encoded::Quoted(out)
    } else {
        let plus = if non_sync { "+" } else { "" };
        Encoded::Literal { header: format!("{{{}{plus}}}", value.len()).into_bytes(), data: value.to_vec() }
    }
}

/// Field/value pairs an `ID` may carry (RFC 2971).
const ID_MAX_PAIRS: usize = 30;

/// The `ID` command the proxy sends: its own `x-` fields first, then the client's fields without any `x-`
/// field (a client must not be able to claim another address), 30 pairs in all. Values that cannot be
/// quoted are dropped.
pub fn id_command(tag: &str, proxy_fields: &[(&str, String)], client: &IdParams) -> Vec<u8> {
    let mut parts: Vec<String> = Vec::new();
    let mut push = |key: &str, value: Option<&str>| {
        let quote = |s: &str| match encode_string(s.as_bytes(), false) {
            Encoded::Quoted(q) => Some(String::from_utf8_lossy(&q).into_owned()),
            Encoded::Literal { .. } => None,
        };
        let (Some(k), v) = (quote(key), value.map(quote)) else {
            return;
        };
        match v {
            None => parts.push(format!("{k} NIL")),
            Some(Some(v)) => parts.push(format!("{k} {v}")),
            Some(None) => {}
        }
    };
    for (key, value) in proxy_fields {
        push(key, Some(value));
    }
    // RFC 2971 allows 30 pairs in all: the proxy's come first, the client's fill what is left.
    let room = ID_MAX_PAIRS.saturating_sub(proxy_fields.len());
    for (key, value) in client.iter().filter(|(key, _)| !key.to_ascii_lowercase().starts_with("x-")).take(room) {
        push(key, value.as_deref());
    }
    format!("{tag} ID ({})\r\n", parts.join(" ")).into_bytes()
}

/// Post-login capabilities for the client: the backend's, without `COMPRESS=` (the proxy terminates TLS
/// per side and compression would hide commands from it), without `STARTTLS`/`LOGINDISABLED`, and without
/// `UNAUTHENTICATE` (RFC 8437: a return to the not-authenticated state would bypass the proxy's login).
pub fn client_capabilities(backend: &[String]) -> String {
    backend
        .iter()
        .filter(|c| {
            let upper = c.to_ascii_uppercase();
            !upper.starts_with("COMPRESS=")
                && !matches!(upper.as_str(), "STARTTLS" | "LOGINDISABLED" | "UNAUTHENTICATE")
        })
        .cloned()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::framing::Fragment;

    fn parse(line: &str) -> Response {
        Response::parse(&Frame { fragments: vec![Fragment::Line(line.as_bytes().to_vec())] })
    }

    #[test]
    fn status_responses() {
        assert_eq!(
            parse("* OK [CAPABILITY IMAP4rev1 STARTTLS] Dovecot ready."),
            Response::Status {
                tag: None,
                status: Status::Ok,
                code: Some("CAPABILITY IMAP4rev1 STARTTLS".into()),
                text: "Dovecot ready.".into()
            }
        );
        assert!(matches!(parse("* PREAUTH hi"), Response::Status { status: Status::PreAuth, .. }));
        assert!(matches!(parse("S BAD nope"), Response::Status { tag: Some(t), status: Status::Bad, .. } if t == "S"));
        assert!(
            matches!(parse("L no [REFERRAL imap://x/] go"), Response::Status { status: Status::No, code: Some(c), .. } if c.starts_with("REFERRAL"))
        );
        assert_eq!(
            parse("* CAPABILITY IMAP4rev1 AUTH=PLAIN"),
            Response::Capability(vec!["IMAP4rev1".into(), "AUTH=PLAIN".into()])
        );
        assert_eq!(parse("+ "), Response::Continuation(String::new()));
        assert_eq!(parse("+"), Response::Continuation(String::new()));
        assert_eq!(parse("+ eyJzdGF0dXMiOiI0MDEifQ=="), Response::Continuation("eyJzdGF0dXMiOiI0MDEifQ==".into()));
        assert_eq!(parse("+ Ready for literal data"), Response::Continuation("Ready for literal data".into()));
        assert_eq!(parse("* ID NIL"), Response::Data);
        assert_eq!(parse("garbage"), Response::Malformed);
        assert_eq!(parse("S WHAT"), Response::Malformed);
    }

    #[test]
    fn capability_codes() {
        assert_eq!(code_capabilities(Some("CAPABILITY A B")), Some(vec!["A".into(), "B".into()]));
        assert_eq!(code_capabilities(Some("ALERT")), None);
        assert_eq!(code_name(Some("referral imap://x")).as_deref(), Some("REFERRAL"));
        assert_eq!(
            client_capabilities(&["IMAP4rev1".into(), "COMPRESS=DEFLATE".into(), "IDLE".into(), "STARTTLS".into()]),
            "IMAP4rev1 IDLE"
        );
        assert_eq!(client_capabilities(&["IMAP4rev2".into(), "unauthenticate".into(), "ID".into()]), "IMAP4rev2 ID");
    }

    #[test]
    fn strings_are_quoted_or_literal() {
        assert!(matches!(encode_string(b"a\"b\\c", false), Encoded::Quoted(q) if q == b"\"a\\\"b\\\\c\""));
        match encode_string("jürgen".as_bytes(), true) {
            Encoded::Literal { header, data } => {
                assert_eq!(header, b"{7+}");
                assert_eq!(data, "jürgen".as_bytes());
            }
            Encoded::Quoted(_) => panic!("non-ASCII must be a literal"),
        }
    }

    #[test]
    fn id_drops_client_x_fields() {
        let client = vec![
            ("name".to_owned(), Some("Thunderbird".to_owned())),
            ("X-Originating-IP".to_owned(), Some("6.6.6.6".to_owned())),
            ("os".to_owned(), None),
        ];
        let cmd = id_command("I", &[("x-originating-ip", "192.0.2.1".into())], &client);
        assert_eq!(
            String::from_utf8(cmd).unwrap(),
            "I ID (\"x-originating-ip\" \"192.0.2.1\" \"name\" \"Thunderbird\" \"os\" NIL)\r\n"
        );
    }

    #[test]
    fn id_keeps_to_thirty_pairs() {
        let client: IdParams = (0..30).map(|i| (format!("f{i:02}"), Some("v".repeat(1024)))).collect();
        let proxy: Vec<(&str, String)> = vec![("x-session-id", "s".into()), ("x-originating-ip", "192.0.2.1".into())];
        let cmd = String::from_utf8(id_command("I", &proxy, &client)).unwrap();
        assert_eq!(cmd.matches(" \"v").count(), 28, "{}", &cmd[..200]);
        assert!(cmd.contains("\"f27\"") && !cmd.contains("\"f28\""));
    }

    #[test]
    fn loggable_escapes_controls() {
        assert_eq!(loggable(b"%s%n\x07\r\n\xff"), "%s%n\\x07\\r\\n\\xff");
    }
}
