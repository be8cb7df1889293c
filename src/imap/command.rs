//! Parses the commands a client may send before authentication from a [`Frame`].
//!
//! Only the grammar needed before login is understood: the tag, the command name, `astring` arguments
//! (atoms, quoted strings with only `\"` and `\\` escapes, literals) and the `ID` parameter list. Anything
//! else is recognised by name only, to be refused. Depends on `framing` and `credentials`.

use super::credentials::{self, Credentials, CredentialsError, Username};
use super::framing::{Fragment, Frame};

/// Longest tag accepted.
pub const MAX_TAG: usize = 64;
/// RFC 2971 bounds for ID parameters.
const ID_MAX_PAIRS: usize = 30;
const ID_MAX_KEY: usize = 30;
const ID_MAX_VALUE: usize = 1024;

/// A command tag: 1 to 64 `ASTRING-CHAR`s except `+`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag(String);

impl Tag {
    pub fn parse(bytes: &[u8]) -> Option<Tag> {
        let valid =
            !bytes.is_empty() && bytes.len() <= MAX_TAG && bytes.iter().all(|&b| is_astring_char(b) && b != b'+');
        // All bytes are ASCII once validated.
        valid.then(|| Tag(String::from_utf8_lossy(bytes).into_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The client's `ID` parameters: `NIL` is an empty list.
pub type IdParams = Vec<(String, Option<String>)>;

/// A parsed pre-authentication command.
#[derive(Clone)]
pub enum CommandBody {
    Capability,
    Noop,
    Logout,
    StartTls,
    Id(IdParams),
    Login(Credentials),
    Authenticate {
        /// Upper-cased mechanism name.
        mechanism: String,
        /// The SASL-IR initial response, still base64.
        initial_response: Option<Vec<u8>>,
    },
    /// A command that is not allowed before authentication (upper-cased name, bounded to an atom).
    NotAllowed(String),
}

impl std::fmt::Debug for CommandBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandBody::Capability => f.write_str("Capability"),
            CommandBody::Noop => f.write_str("Noop"),
            CommandBody::Logout => f.write_str("Logout"),
            CommandBody::StartTls => f.write_str("StartTls"),
            CommandBody::Id(params) => f.debug_tuple("Id").field(params).finish(),
            CommandBody::Login(credentials) => f.debug_tuple("Login").field(credentials).finish(),
            // The initial response is base64 of the password: its size only.
            CommandBody::Authenticate { mechanism, initial_response } => f
                .debug_struct("Authenticate")
                .field("mechanism", mechanism)
                .field("initial_response", &initial_response.as_ref().map(|r| format!("{} bytes", r.len())))
                .finish(),
            CommandBody::NotAllowed(name) => f.debug_tuple("NotAllowed").field(name).finish(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Command {
    pub tag: Tag,
    pub body: CommandBody,
}

/// Why a command was refused; the tag is there when it could be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}")]
pub struct ParseError {
    pub tag: Option<Tag>,
    pub kind: ParseErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    #[error("Invalid tag.")]
    InvalidTag,
    #[error("Missing or invalid command name.")]
    InvalidCommand,
    #[error("Unknown command.")]
    UnknownCommand,
    #[error("Invalid arguments.")]
    InvalidArguments,
    #[error("Invalid credentials: {0}.")]
    Credentials(CredentialsError),
}

/// `ASTRING-CHAR` (RFC 9051): `ATOM-CHAR` or `]`.
fn is_astring_char(b: u8) -> bool {
    is_atom_char(b) || b == b']'
}

/// `ATOM-CHAR`: any 7-bit CHAR except atom-specials `( ) { SP CTL % * " \ ]`.
fn is_atom_char(b: u8) -> bool {
    (0x21..0x7f).contains(&b) && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b']')
}

/// Commands known from IMAP4rev1/rev2 and common extensions that need authentication.
const AUTHENTICATED_COMMANDS: &[&str] = &[
    "SELECT",
    "EXAMINE",
    "CREATE",
    "DELETE",
    "RENAME",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "LIST",
    "LSUB",
    "NAMESPACE",
    "STATUS",
    "APPEND",
    "IDLE",
    "ENABLE",
    "CHECK",
    "CLOSE",
    "UNSELECT",
    "EXPUNGE",
    "SEARCH",
    "FETCH",
    "STORE",
    "COPY",
    "MOVE",
    "UID",
    "COMPRESS",
    "GETQUOTA",
    "GETQUOTAROOT",
    "SETQUOTA",
    "GETACL",
    "SETACL",
    "MYRIGHTS",
    "LISTRIGHTS",
    "DELETEACL",
    "GETMETADATA",
    "SETMETADATA",
    "SORT",
    "THREAD",
    "NOTIFY",
    "ESEARCH",
    "UNAUTHENTICATE",
    "XLIST",
    "REPLACE",
];

struct Cursor<'a> {
    fragments: &'a [Fragment],
    index: usize,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn line(&self) -> &'a [u8] {
        match self.fragments.get(self.index) {
            Some(Fragment::Line(l)) => l,
            _ => &[],
        }
    }

    fn peek(&self) -> Option<u8> {
        self.line().get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.index + 1 >= self.fragments.len() && self.pos >= self.line().len()
    }

    fn sp(&mut self) -> Option<()> {
        (self.peek() == Some(b' ')).then(|| self.pos += 1)
    }

    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> &'a [u8] {
        let line = self.line();
        let start = self.pos;
        while self.pos < line.len() && f(line[self.pos]) {
            self.pos += 1;
        }
        &line[start..self.pos]
    }

    fn atom(&mut self) -> Option<&'a [u8]> {
        let atom = self.take_while(is_atom_char);
        (!atom.is_empty()).then_some(atom)
    }

    fn quoted(&mut self) -> Option<Vec<u8>> {
        let line = self.line();
        if line.get(self.pos) != Some(&b'"') {
            return None;
        }
        let mut out = Vec::new();
        let mut i = self.pos + 1;
        loop {
            match *line.get(i)? {
                b'"' => break,
                b'\\' => {
                    let escaped = *line.get(i + 1)?;
                    if escaped != b'"' && escaped != b'\\' {
                        return None;
                    }
                    out.push(escaped);
                    i += 2;
                }
                0 | b'\r' | b'\n' => return None,
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        self.pos = i + 1;
        Some(out)
    }

    /// `{n}` / `{n+}` ending this line, followed by its literal fragment.
    fn literal(&mut self) -> Option<Vec<u8>> {
        let line = self.line();
        let rest = &line[self.pos..];
        if !rest.starts_with(b"{") || !rest.ends_with(b"}") {
            return None;
        }
        let Some(Fragment::Literal(data)) = self.fragments.get(self.index + 1) else {
            return None;
        };
        let inner = &rest[1..rest.len() - 1];
        let digits = inner.strip_suffix(b"+").unwrap_or(inner);
        let announced = std::str::from_utf8(digits).ok()?.parse::<usize>().ok()?;
        if !digits.iter().all(u8::is_ascii_digit) || announced != data.len() {
            return None;
        }
        self.index += 2;
        self.pos = 0;
        Some(data.clone())
    }

    fn astring(&mut self) -> Option<Vec<u8>> {
        match self.peek()? {
            b'"' => self.quoted(),
            b'{' => self.literal(),
            _ => {
                let atom = self.take_while(is_astring_char);
                (!atom.is_empty()).then(|| atom.to_vec())
            }
        }
    }

    fn string(&mut self) -> Option<Vec<u8>> {
        match self.peek()? {
            b'"' => self.quoted(),
            b'{' => self.literal(),
            _ => None,
        }
    }

    fn nstring(&mut self) -> Option<Option<Vec<u8>>> {
        let line = self.line();
        if line[self.pos..].len() >= 3 && line[self.pos..self.pos + 3].eq_ignore_ascii_case(b"NIL") {
            let after = line.get(self.pos + 3).copied();
            if after.is_none_or(|b| !is_atom_char(b)) {
                self.pos += 3;
                return Some(None);
            }
        }
        self.string().map(Some)
    }
}

/// Parses one pre-authentication command.
pub fn parse(frame: &Frame) -> Result<Command, ParseError> {
    let mut cur = Cursor { fragments: &frame.fragments, index: 0, pos: 0 };
    let raw_tag = cur.take_while(|b| b != b' ');
    let tag = Tag::parse(raw_tag).ok_or(ParseError { tag: None, kind: ParseErrorKind::InvalidTag })?;
    let fail = |kind| ParseError { tag: Some(tag.clone()), kind };
    cur.sp().ok_or_else(|| fail(ParseErrorKind::InvalidCommand))?;
    let name = cur.atom().ok_or_else(|| fail(ParseErrorKind::InvalidCommand))?;
    let name = String::from_utf8_lossy(name).to_ascii_uppercase();
    let body = match name.as_str() {
        "CAPABILITY" => CommandBody::Capability,
        "NOOP" => CommandBody::Noop,
        "LOGOUT" => CommandBody::Logout,
        "STARTTLS" => CommandBody::StartTls,
        "ID" => {
            cur.sp().ok_or_else(|| fail(ParseErrorKind::InvalidArguments))?;
            CommandBody::Id(id_params(&mut cur).ok_or_else(|| fail(ParseErrorKind::InvalidArguments))?)
        }
        "LOGIN" => {
            let args = (|| {
                cur.sp()?;
                let user = cur.astring()?;
                cur.sp()?;
                let pass = cur.astring()?;
                Some((user, pass))
            })();
            let (user, pass) = args.ok_or_else(|| fail(ParseErrorKind::InvalidArguments))?;
            let password = credentials::password(pass).map_err(|e| fail(ParseErrorKind::Credentials(e)))?;
            let username = Username::parse(&user).map_err(|e| fail(ParseErrorKind::Credentials(e)))?;
            CommandBody::Login(Credentials { username, password })
        }
        "AUTHENTICATE" => {
            cur.sp().ok_or_else(|| fail(ParseErrorKind::InvalidArguments))?;
            let mechanism = cur.atom().ok_or_else(|| fail(ParseErrorKind::InvalidArguments))?;
            let mechanism = String::from_utf8_lossy(mechanism).to_ascii_uppercase();
            let initial_response = cur
                .sp()
                .map(|()| cur.take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')).to_vec());
            if initial_response.as_ref().is_some_and(Vec::is_empty) {
                return Err(fail(ParseErrorKind::InvalidArguments));
            }
            CommandBody::Authenticate { mechanism, initial_response }
        }
        // Arguments of commands refused anyway are not looked at.
        other if AUTHENTICATED_COMMANDS.contains(&other) => {
            return Ok(Command { tag, body: CommandBody::NotAllowed(name) });
        }
        _ => return Err(fail(ParseErrorKind::UnknownCommand)),
    };
    if !cur.at_end() {
        return Err(fail(ParseErrorKind::InvalidArguments));
    }
    Ok(Command { tag, body })
}

/// The client address a trusted webmail server forwards in its pre-login `ID` (`x-originating-ip`, and
/// `x-originating-port` or else `default_port`), as Dovecot reads it from `login_trusted_networks`.
/// Keys are case-insensitive; a value that is not an address is ignored.
pub fn forwarded_client(params: &IdParams, default_port: u16) -> Option<std::net::SocketAddr> {
    let field = |name: &str| {
        params.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).and_then(|(_, v)| v.as_deref()).map(str::trim)
    };
    let ip: std::net::IpAddr = field("x-originating-ip")?.trim_matches(['[', ']']).parse().ok()?;
    let port = field("x-originating-port").and_then(|p| p.parse().ok()).unwrap_or(default_port);
    Some(std::net::SocketAddr::new(ip.to_canonical(), port))
}

/// `"(" [string SP nstring *(SP string SP nstring)] ")" / nil`, flat, within RFC 2971's bounds.
fn id_params(cur: &mut Cursor<'_>) -> Option<IdParams> {
    let mut params = Vec::new();
    if cur.peek()? != b'(' {
        return cur.nstring()?.is_none().then_some(params);
    }
    cur.pos += 1;
    if cur.peek() == Some(b')') {
        cur.pos += 1;
        return Some(params);
    }
    loop {
        let key = String::from_utf8(cur.string()?).ok()?;
        cur.sp()?;
        let value = match cur.nstring()? {
            Some(v) => Some(String::from_utf8(v).ok()?),
            None => None,
        };
        let too_long = key.len() > ID_MAX_KEY || value.as_ref().is_some_and(|v| v.len() > ID_MAX_VALUE);
        let control = key.chars().chain(value.iter().flat_map(|v| v.chars())).any(char::is_control);
        if too_long || control || params.len() == ID_MAX_PAIRS {
            return None;
        }
        params.push((key, value));
        match cur.peek()? {
            b' ' => cur.pos += 1,
            b')' => {
                cur.pos += 1;
                return Some(params);
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::framing::{Event, Framer, Limits};

    fn frame(input: &[u8]) -> Frame {
        let mut framer = Framer::new(Limits::CLIENT_PREAUTH);
        framer.push(input);
        loop {
            match framer.next_event() {
                Some(Ok(Event::Frame(f))) => return f,
                Some(Ok(Event::LiteralAccepted { .. })) => continue,
                other => panic!("no frame: {other:?}"),
            }
        }
    }

    fn login(input: &[u8]) -> Result<(String, Vec<u8>), ParseError> {
        match parse(&frame(input))?.body {
            CommandBody::Login(c) => Ok((c.username.to_string(), c.password.expose().clone())),
            other => panic!("{other:?}"),
        }
    }

    fn kind(input: &[u8]) -> ParseErrorKind {
        parse(&frame(input)).unwrap_err().kind
    }

    #[test]
    fn login_atoms_quoted_and_literals() {
        assert_eq!(login(b"a LOGIN alice secret\r\n").unwrap(), ("alice".into(), b"secret".to_vec()));
        assert_eq!(login(b"a LOGIN \"al ice\" \"p\\\"w\\\\d\"\r\n").unwrap(), ("al ice".into(), b"p\"w\\d".to_vec()));
        assert_eq!(login(b"a LOGIN {5}\r\nalice {6+}\r\n(){}%*\r\n").unwrap(), ("alice".into(), b"(){}%*".to_vec()));
        assert_eq!(login("a login \"jürgen\" x\r\n".as_bytes()).unwrap().0, "jürgen");
    }

    #[test]
    fn login_rejects_bad_escapes_nul_and_smuggled_crlf() {
        assert_eq!(kind(b"a LOGIN \"a\\nb\" x\r\n"), ParseErrorKind::InvalidArguments);
        assert_eq!(kind(b"a LOGIN \"a\0b\" x\r\n"), ParseErrorKind::InvalidArguments);
        assert_eq!(kind(b"a LOGIN a\rb x\r\n"), ParseErrorKind::InvalidArguments);
        assert_eq!(
            kind(b"a LOGIN {17}\r\nx\r\nb DELETE INBOX secret\r\n"),
            ParseErrorKind::Credentials(CredentialsError::UsernameControl)
        );
        assert_eq!(kind(b"a LOGIN alice\r\n"), ParseErrorKind::InvalidArguments);
        assert_eq!(kind(b"a LOGIN alice pw extra\r\n"), ParseErrorKind::InvalidArguments);
        assert_eq!(kind(b"a LOGIN  alice pw\r\n"), ParseErrorKind::InvalidArguments);
        assert_eq!(kind(b"a LOGIN alice {-1}\r\n"), ParseErrorKind::InvalidArguments);
    }

    #[test]
    fn tags() {
        assert_eq!(parse(&frame(b"A]1 NOOP\r\n")).unwrap().tag.as_str(), "A]1");
        for bad in [&b"a+ NOOP\r\n"[..], b"* NOOP\r\n", b"a% NOOP\r\n", b"a\0 NOOP\r\n", b" NOOP\r\n"] {
            assert_eq!(parse(&frame(bad)).unwrap_err(), ParseError { tag: None, kind: ParseErrorKind::InvalidTag });
        }
        let long = [b"x".repeat(65), b" NOOP\r\n".to_vec()].concat();
        assert_eq!(kind(&long), ParseErrorKind::InvalidTag);
    }

    #[test]
    fn simple_commands_and_refusals() {
        assert!(matches!(parse(&frame(b"a capability\r\n")).unwrap().body, CommandBody::Capability));
        assert!(matches!(parse(&frame(b"a STARTTLS\r\n")).unwrap().body, CommandBody::StartTls));
        assert!(
            matches!(parse(&frame(b"a SELECT INBOX\r\n")).unwrap().body, CommandBody::NotAllowed(n) if n == "SELECT")
        );
        assert!(matches!(parse(&frame(b"a COMPRESS DEFLATE\r\n")).unwrap().body, CommandBody::NotAllowed(_)));
        assert_eq!(kind(b"a FOO\r\n"), ParseErrorKind::UnknownCommand);
        assert_eq!(kind(b"a NOOP x\r\n"), ParseErrorKind::InvalidArguments);
        assert_eq!(kind(b"a\r\n"), ParseErrorKind::InvalidCommand);
    }

    #[test]
    fn authenticate() {
        match parse(&frame(b"a AUTHENTICATE plain AGFsaWNlAHNlY3JldA==\r\n")).unwrap().body {
            CommandBody::Authenticate { mechanism, initial_response } => {
                assert_eq!(mechanism, "PLAIN");
                assert_eq!(initial_response.as_deref(), Some(&b"AGFsaWNlAHNlY3JldA=="[..]));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&frame(b"a AUTHENTICATE LOGIN\r\n")).unwrap().body,
            CommandBody::Authenticate { initial_response: None, .. }
        ));
        assert_eq!(kind(b"a AUTHENTICATE PLAIN a b\r\n"), ParseErrorKind::InvalidArguments);
        assert_eq!(kind(b"a AUTHENTICATE\r\n"), ParseErrorKind::InvalidArguments);
    }

    #[test]
    fn forwarded_client_address() {
        let params: IdParams = vec![
            ("name".into(), Some("Roundcube".into())),
            ("X-Originating-IP".into(), Some("2001:db8::7".into())),
            ("x-originating-port".into(), Some("51000".into())),
        ];
        assert_eq!(forwarded_client(&params, 1), Some("[2001:db8::7]:51000".parse().unwrap()));
        let v4: IdParams = vec![("x-originating-ip".into(), Some("192.0.2.9".into()))];
        assert_eq!(forwarded_client(&v4, 4000), Some("192.0.2.9:4000".parse().unwrap()));
        let bad: IdParams = vec![("x-originating-ip".into(), Some("not-an-ip".into()))];
        assert_eq!(forwarded_client(&bad, 1), None);
        assert_eq!(forwarded_client(&Vec::new(), 1), None);
    }

    #[test]
    fn id_params() {
        match parse(&frame(b"a ID (\"name\" \"Thunderbird\" \"version\" NIL \"x-originating-ip\" \"1.2.3.4\")\r\n"))
            .unwrap()
            .body
        {
            CommandBody::Id(p) => assert_eq!(
                p,
                vec![
                    ("name".into(), Some("Thunderbird".into())),
                    ("version".into(), None),
                    ("x-originating-ip".into(), Some("1.2.3.4".into()))
                ]
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse(&frame(b"a ID NIL\r\n")).unwrap().body, CommandBody::Id(p) if p.is_empty()));
        assert!(matches!(parse(&frame(b"a ID ()\r\n")).unwrap().body, CommandBody::Id(p) if p.is_empty()));
        assert_eq!(kind(b"a ID ((\"a\" \"b\"))\r\n"), ParseErrorKind::InvalidArguments);
        let deep = [b"a ID ".to_vec(), b"(".repeat(4000), b")".repeat(4000), b"\r\n".to_vec()].concat();
        assert_eq!(kind(&deep), ParseErrorKind::InvalidArguments);
        assert_eq!(kind(b"a ID (\"odd\")\r\n"), ParseErrorKind::InvalidArguments);
        let many: String = (0..31).map(|i| format!("\"k{i}\" \"v\" ")).collect();
        assert_eq!(kind(format!("a ID ({})\r\n", many.trim_end()).as_bytes()), ParseErrorKind::InvalidArguments);
    }
}
