//! The proxy's side of a backend login, sans-IO: greeting, STARTTLS (in `starttls` mode), CAPABILITY and
//! `ID` in one write, the credentials (`AUTHENTICATE PLAIN`, with SASL-IR when offered, else `LOGIN`; an
//! OAuth client's message with `AUTHENTICATE XOAUTH2`/`OAUTHBEARER`), the outcome. A backend's OAuth error
//! challenge is acknowledged here and kept for the client ([`LoginError::challenge`]), so the backend
//! connection never waits for the client. Bytes from the backend go in with [`BackendLogin::feed`]; [`BackendLogin::next_want`] says what to
//! do: send, read, start TLS, or stop. A health check runs the same machine up to the credentials.
//!
//! Fails closed: credentials are produced only after the backend behaved at every step, and in `starttls`
//! mode only after [`BackendLogin::tls_established`]; bytes behind the STARTTLS `OK` (response injection)
//! end the attempt. Depends on `framing`, `response`, `credentials`, `sasl`, `oauth`.

use std::collections::VecDeque;

use super::credentials::{Credentials, Secret};
use super::framing::{Event, Framer, Limits};
use super::oauth::{self, OAuthMechanism};
use super::response::{self, Encoded, Response, Status};
use super::sasl;

/// How the connection is secured: implicit TLS (done by the caller before the greeting), STARTTLS (asked
/// for by the machine) or plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    Implicit,
    StartTls,
    Plain,
}

/// A step of a backend login, each with its own deadline (`[backend_tls]`): every step but the credentials
/// is one round trip that a healthy server answers at once, so a short deadline there tells a hung server
/// from a slow authentication. [`BackendLogin::step`] names the machine's; the caller adds the connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// TCP connect (and a PROXY header).
    Connect,
    /// Waiting for the greeting.
    Greeting,
    /// STARTTLS (its capabilities and reply) and the TLS handshake; for implicit TLS, the handshake.
    Tls,
    /// CAPABILITY and `ID` after TLS; on a pooled connection, the `ID` reply that precedes the login's.
    Capabilities,
    /// The credentials (authentication backends, LDAP: the one step that may take long).
    Credentials,
}

impl Step {
    pub const ALL: [Step; 5] = [Step::Connect, Step::Greeting, Step::Tls, Step::Capabilities, Step::Credentials];

    pub fn as_str(self) -> &'static str {
        match self {
            Step::Connect => "connect",
            Step::Greeting => "greeting",
            Step::Tls => "tls",
            Step::Capabilities => "capability",
            Step::Credentials => "credentials",
        }
    }

    /// Whether a healthy server answers the step at once (all but the credentials).
    pub fn is_short(self) -> bool {
        self != Step::Credentials
    }
}

/// What the machine is for.
pub enum Goal {
    /// Log in with these credentials, sending this `ID` command (tag `I`) with the capabilities. With
    /// `oauth`, the password is the bearer token and the message is what is replayed.
    Login { credentials: Credentials, id: Vec<u8>, oauth: Option<OAuthReplay> },
    /// A health check: the login's path up to the credentials, then LOGOUT.
    Check,
    /// A connection made ready for a later login (the pool's): the login's path up to the credentials, then
    /// [`Want::Done`] with the capabilities, the connection left open; resumed by [`BackendLogin::resume`].
    Ready,
}

/// An OAuth client message to replay.
#[derive(Clone)]
pub struct OAuthReplay {
    pub mechanism: OAuthMechanism,
    /// The decoded message, for this user (rebuilt by the caller when a lookup renamed the user).
    pub message: Secret<Vec<u8>>,
}

/// What the caller does next.
#[derive(Debug)]
pub enum Want {
    /// Write these bytes (they may hold credentials: wiped when dropped).
    Send(Secret<Vec<u8>>),
    /// Read from the backend and [`BackendLogin::feed`] it.
    Read,
    /// STARTTLS was accepted with nothing behind it: run the TLS handshake, then
    /// [`BackendLogin::tls_established`].
    StartTls,
    /// Logged in (or, for a check, the backend behaved).
    Done(LoggedIn),
    Failed(LoginError),
}

/// A successful login.
#[derive(Debug, Default)]
pub struct LoggedIn {
    /// Post-login capabilities.
    pub capabilities: Vec<String>,
    /// Bytes the backend sent behind its login reply.
    pub pending: Vec<u8>,
    /// The backend refused the proxy's `ID` (the client address is then not passed on).
    pub id_refused: Option<String>,
}

/// Why a login stopped, as the failure classification needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The backend broke the protocol.
    Protocol,
    /// STARTTLS missing, refused, or followed by injected bytes.
    StartTls,
    /// The credentials were refused.
    AuthFailed,
    /// A temporary refusal (`[UNAVAILABLE]`, `[SERVERBUG]`, ...).
    TempFail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginError {
    pub kind: ErrorKind,
    pub detail: String,
    /// A refused OAuth login's error challenge as the backend sent it (base64 of its JSON), for the client.
    pub challenge: Option<String>,
}

fn error(kind: ErrorKind, detail: impl Into<String>) -> LoginError {
    LoginError { kind, detail: detail.into(), challenge: None }
}

/// A tagged reply, reduced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: Status,
    pub code: Option<String>,
    pub text: String,
}

impl Reply {
    pub fn describe(&self) -> String {
        let status = match self.status {
            Status::Ok => "OK",
            Status::No => "NO",
            Status::Bad => "BAD",
            Status::PreAuth => "PREAUTH",
            Status::Bye => "BYE",
        };
        let code = self.code.as_deref().map(|c| format!("[{c}] ")).unwrap_or_default();
        response::loggable(format!("{status} {code}{}", self.text).as_bytes())
    }
}

#[derive(Debug)]
enum State {
    Greeting,
    /// Capabilities asked before STARTTLS (the greeting carried none).
    PreTlsCapabilities,
    StartTlsReply,
    AwaitTls,
    Capabilities,
    IdReply,
    /// `AUTHENTICATE PLAIN` without SASL-IR: the response follows the `+`.
    PlainContinuation,
    /// `LOGIN` with synchronising literals: each piece follows a `+`.
    LoginPieces,
    LoginReply,
    FinalCapabilities,
    Finished,
}

/// One backend login (or check).
pub struct BackendLogin {
    security: Security,
    goal: Goal,
    framer: Framer,
    state: State,
    out: VecDeque<Want>,
    /// Capabilities seen in untagged `CAPABILITY` data while waiting for a tagged reply.
    collected: Option<Vec<String>>,
    capabilities: Vec<String>,
    id_refused: Option<String>,
    /// What is sent after each continuation (PLAIN response, LOGIN pieces).
    pieces: VecDeque<Secret<Vec<u8>>>,
    /// The OAuth mechanism used at the backend, once the message was sent.
    oauth_sent: Option<OAuthMechanism>,
    /// The backend's OAuth error challenge: `Some` once one came (empty when it was not base64).
    challenge: Option<String>,
    /// A resumed (pooled) login sent its credentials with its `ID`: the state to go on in once the `ID` is
    /// answered.
    after_id: Option<State>,
}

impl std::fmt::Debug for BackendLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendLogin").field("security", &self.security).field("state", &self.state).finish()
    }
}

impl BackendLogin {
    pub fn new(security: Security, goal: Goal) -> Self {
        Self {
            security,
            goal,
            framer: Framer::new(Limits::BACKEND_LOGIN),
            state: State::Greeting,
            out: VecDeque::new(),
            collected: None,
            capabilities: Vec::new(),
            id_refused: None,
            pieces: VecDeque::new(),
            oauth_sent: None,
            challenge: None,
            after_id: None,
        }
    }

    /// A login on a connection a [`Goal::Ready`] machine prepared (greeting, STARTTLS, TLS and capabilities
    /// done): the `ID` and, when the backend takes them in one line (SASL-IR), the credentials go in one
    /// write, so the login costs one round trip.
    pub fn resume(security: Security, capabilities: Vec<String>, goal: Goal) -> Self {
        let mut machine = Self::new(security, goal);
        machine.capabilities = capabilities;
        let Goal::Login { id, oauth, .. } = &machine.goal else {
            machine.fail(error(ErrorKind::Protocol, "internal: a resumed machine needs a login"));
            return machine;
        };
        let caps = &machine.capabilities;
        let one_line = response::has_capability(caps, "SASL-IR")
            && match oauth {
                Some(_) => {
                    response::has_capability(caps, "AUTH=XOAUTH2") || response::has_capability(caps, "AUTH=OAUTHBEARER")
                }
                None => response::has_capability(caps, "AUTH=PLAIN"),
            };
        machine.send(id.clone());
        machine.state = State::IdReply;
        if one_line {
            if let Err(e) = machine.authenticate() {
                machine.fail(e);
                return machine;
            }
            // The ID is answered first; then the login's reply.
            machine.after_id = Some(std::mem::replace(&mut machine.state, State::IdReply));
        }
        machine
    }

    /// The step the machine waits in (what its next read or write belongs to).
    pub fn step(&self) -> Step {
        match self.state {
            State::Greeting => Step::Greeting,
            State::PreTlsCapabilities | State::StartTlsReply | State::AwaitTls => Step::Tls,
            State::Capabilities | State::IdReply => Step::Capabilities,
            State::PlainContinuation
            | State::LoginPieces
            | State::LoginReply
            | State::FinalCapabilities
            | State::Finished => Step::Credentials,
        }
    }

    /// Bytes read from the backend.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.framer.push(bytes);
    }

    /// The TLS handshake after STARTTLS succeeded (and the peer was verified).
    pub fn tls_established(&mut self) {
        if matches!(self.state, State::AwaitTls) {
            self.framer = Framer::new(Limits::BACKEND_LOGIN);
            self.ask_capabilities();
        }
    }

    /// What to do next.
    pub fn next_want(&mut self) -> Want {
        loop {
            if let Some(want) = self.out.pop_front() {
                return want;
            }
            if matches!(self.state, State::Finished | State::AwaitTls) {
                return Want::Read;
            }
            let response = match self.framer.next_event() {
                None => return Want::Read,
                Some(Ok(Event::LiteralAccepted { .. })) => continue,
                Some(Ok(Event::Frame(frame))) => match Response::parse(&frame) {
                    Response::Malformed => Err(error(
                        ErrorKind::Protocol,
                        format!("malformed response: {}", response::loggable(frame.first_line())),
                    )),
                    parsed => Ok(parsed),
                },
                Some(Err(e)) => Err(error(ErrorKind::Protocol, format!("backend response: {e}"))),
            };
            if let Err(e) = response.and_then(|r| self.advance(r)) {
                self.fail(e);
            }
        }
    }

    fn fail(&mut self, e: LoginError) {
        self.state = State::Finished;
        self.pieces.clear();
        self.out.clear();
        self.out.push_back(Want::Failed(e));
    }

    fn send(&mut self, bytes: Vec<u8>) {
        self.out.push_back(Want::Send(Secret::new(bytes)));
    }

    /// CAPABILITY again (they change with TLS), and the `ID` (or LOGOUT for a check) in the same write.
    fn ask_capabilities(&mut self) {
        let second: &[u8] = match &self.goal {
            Goal::Login { id, .. } => id,
            Goal::Check => b"L LOGOUT\r\n",
            Goal::Ready => b"",
        };
        let bytes = [b"C CAPABILITY\r\n".as_slice(), second].concat();
        self.send(bytes);
        self.collected = None;
        self.state = State::Capabilities;
    }

    fn advance(&mut self, response: Response) -> Result<(), LoginError> {
        match self.state {
            State::Greeting => self.greeting(response),
            State::PreTlsCapabilities => {
                let Some(reply) = self.tagged("C", response).map_err(starttls_kind)? else { return Ok(()) };
                let caps = self.capability_reply(reply)?;
                self.starttls(&caps)
            }
            State::StartTlsReply => {
                let Some(reply) = self.tagged("S", response).map_err(starttls_kind)? else { return Ok(()) };
                if reply.status != Status::Ok {
                    return Err(error(ErrorKind::StartTls, format!("STARTTLS refused: {}", reply.describe())));
                }
                if self.framer.buffered() > 0 {
                    return Err(error(
                        ErrorKind::StartTls,
                        "backend sent data after its STARTTLS OK before the handshake (response injection)",
                    ));
                }
                self.state = State::AwaitTls;
                self.out.push_back(Want::StartTls);
                Ok(())
            }
            State::Capabilities => {
                let Some(reply) = self.tagged("C", response)? else { return Ok(()) };
                self.capabilities = self.capability_reply(reply)?;
                match &self.goal {
                    Goal::Check | Goal::Ready => self.finish(),
                    Goal::Login { .. } => self.state = State::IdReply,
                }
                Ok(())
            }
            State::IdReply => {
                let Some(reply) = self.tagged("I", response)? else { return Ok(()) };
                if reply.status != Status::Ok {
                    self.id_refused = Some(reply.describe());
                }
                match self.after_id.take() {
                    Some(next) => {
                        self.collected = None;
                        self.state = next;
                        Ok(())
                    }
                    None => self.authenticate(),
                }
            }
            State::PlainContinuation | State::LoginPieces => match response {
                Response::Continuation(_) => {
                    let Some(piece) = self.pieces.pop_front() else {
                        return Err(error(ErrorKind::Protocol, "unexpected continuation"));
                    };
                    self.out.push_back(Want::Send(piece));
                    if self.pieces.is_empty() || matches!(self.state, State::PlainContinuation) {
                        self.collected = None;
                        self.state = State::LoginReply;
                    }
                    Ok(())
                }
                Response::Status { tag: Some(t), status, code, text } if t == "L" => {
                    self.pieces.clear();
                    self.outcome(Reply { status, code, text })
                }
                Response::Status { tag: None, status: Status::Bye, .. } | Response::Status { tag: Some(_), .. } => {
                    Err(error(ErrorKind::Protocol, "unexpected reply while waiting for continuation"))
                }
                _ => Ok(()),
            },
            State::LoginReply => {
                if let (Some(mechanism), None, Response::Continuation(text)) =
                    (self.oauth_sent, &self.challenge, &response)
                {
                    // RFC 7628 3.2.2: the error comes as a challenge, answered with a dummy response, then NO.
                    let valid = !text.is_empty() && sasl::decode_response(text.as_bytes()).is_ok();
                    self.challenge = Some(if valid { text.clone() } else { String::new() });
                    self.send([mechanism.error_acknowledgement(), b"\r\n"].concat());
                    return Ok(());
                }
                let Some(reply) = self.tagged("L", response)? else { return Ok(()) };
                self.outcome(reply)
            }
            State::FinalCapabilities => {
                let Some(reply) = self.tagged("C", response)? else { return Ok(()) };
                self.capabilities = self.capability_reply(reply)?;
                self.finish();
                Ok(())
            }
            State::AwaitTls | State::Finished => Ok(()),
        }
    }

    fn greeting(&mut self, response: Response) -> Result<(), LoginError> {
        let caps = match response {
            Response::Status { tag: None, status: Status::Ok, code, .. } => {
                response::code_capabilities(code.as_deref())
            }
            Response::Status { tag: None, status: Status::PreAuth, text, .. } => {
                return Err(error(
                    ErrorKind::Protocol,
                    format!("backend greeted with PREAUTH: {}", response::loggable(text.as_bytes())),
                ));
            }
            Response::Status { status: Status::Bye, text, .. } => {
                return Err(error(
                    ErrorKind::Protocol,
                    format!("backend greeted with BYE: {}", response::loggable(text.as_bytes())),
                ));
            }
            _ => return Err(error(ErrorKind::Protocol, "backend greeting is not * OK")),
        };
        if self.security != Security::StartTls {
            self.ask_capabilities();
            return Ok(());
        }
        match caps {
            Some(caps) => self.starttls(&caps),
            None => {
                self.send(b"C CAPABILITY\r\n".to_vec());
                self.collected = None;
                self.state = State::PreTlsCapabilities;
                Ok(())
            }
        }
    }

    fn starttls(&mut self, caps: &[String]) -> Result<(), LoginError> {
        if !response::has_capability(caps, "STARTTLS") {
            return Err(error(ErrorKind::StartTls, "backend does not advertise STARTTLS"));
        }
        self.send(b"S STARTTLS\r\n".to_vec());
        self.state = State::StartTlsReply;
        Ok(())
    }

    /// The tagged reply for `tag`, or `None` for untagged data (kept when it is CAPABILITY).
    fn tagged(&mut self, tag: &str, response: Response) -> Result<Option<Reply>, LoginError> {
        match response {
            Response::Status { tag: Some(t), status, code, text } if t == tag => Ok(Some(Reply { status, code, text })),
            Response::Status { tag: None, status: Status::Bye, text, .. } => {
                Err(error(ErrorKind::Protocol, format!("backend said BYE: {}", response::loggable(text.as_bytes()))))
            }
            Response::Status { tag: Some(t), .. } => {
                Err(error(ErrorKind::Protocol, format!("reply for unknown tag {}", response::loggable(t.as_bytes()))))
            }
            Response::Continuation(_) => Err(error(ErrorKind::Protocol, format!("unexpected continuation for {tag}"))),
            Response::Capability(c) => {
                self.collected = Some(c);
                Ok(None)
            }
            Response::Status { tag: None, .. } | Response::Data | Response::Malformed => Ok(None),
        }
    }

    fn capability_reply(&mut self, reply: Reply) -> Result<Vec<String>, LoginError> {
        match (reply.status, self.collected.take().or_else(|| response::code_capabilities(reply.code.as_deref()))) {
            (Status::Ok, Some(caps)) => Ok(caps),
            _ => Err(error(ErrorKind::Protocol, format!("CAPABILITY answered {}", reply.describe()))),
        }
    }

    /// Replays the credentials: `AUTHENTICATE PLAIN` when offered (with SASL-IR when offered), else `LOGIN`
    /// with values re-encoded from their decoded form, each synchronising literal after its `+`.
    fn authenticate(&mut self) -> Result<(), LoginError> {
        let Goal::Login { credentials, oauth, .. } = &self.goal else { return Ok(()) };
        let caps = &self.capabilities;
        self.collected = None;
        if let Some(replay) = oauth {
            // The client's mechanism when offered, else the other one with the same user and token.
            let other = match replay.mechanism {
                OAuthMechanism::XOAuth2 => OAuthMechanism::OAuthBearer,
                OAuthMechanism::OAuthBearer => OAuthMechanism::XOAuth2,
            };
            let offered = |m: OAuthMechanism| response::has_capability(caps, &format!("AUTH={}", m.as_str()));
            let (mechanism, message) = if offered(replay.mechanism) {
                (replay.mechanism, Secret::new(replay.message.expose().clone()))
            } else if offered(other) {
                (other, oauth::build(other, &credentials.username, &credentials.password))
            } else {
                return Err(error(ErrorKind::TempFail, "backend offers neither AUTH=XOAUTH2 nor AUTH=OAUTHBEARER"));
            };
            let encoded = sasl::encode(message.expose());
            let name = mechanism.as_str();
            if response::has_capability(caps, "SASL-IR") {
                let line = [format!("L AUTHENTICATE {name} ").as_bytes(), encoded.expose(), b"\r\n"].concat();
                self.send(line);
                self.state = State::LoginReply;
            } else {
                self.send(format!("L AUTHENTICATE {name}\r\n").into_bytes());
                self.pieces.push_back(Secret::new([encoded.expose().as_slice(), b"\r\n"].concat()));
                self.state = State::PlainContinuation;
            }
            self.oauth_sent = Some(mechanism);
            return Ok(());
        }
        if response::has_capability(caps, "AUTH=PLAIN") {
            let ir = sasl::encode_plain(&credentials.username, &credentials.password);
            if response::has_capability(caps, "SASL-IR") {
                let line = [b"L AUTHENTICATE PLAIN ", ir.expose().as_slice(), b"\r\n"].concat();
                self.send(line);
                self.state = State::LoginReply;
            } else {
                self.send(b"L AUTHENTICATE PLAIN\r\n".to_vec());
                self.pieces.push_back(Secret::new([ir.expose().as_slice(), b"\r\n"].concat()));
                self.state = State::PlainContinuation;
            }
            return Ok(());
        }
        if response::has_capability(caps, "LOGINDISABLED") {
            return Err(error(ErrorKind::Protocol, "backend offers neither AUTH=PLAIN nor LOGIN"));
        }
        let non_sync = response::has_capability(caps, "LITERAL+");
        let mut segments: Vec<Secret<Vec<u8>>> = Vec::new();
        let mut pending = b"L LOGIN ".to_vec();
        let values = [credentials.username.as_str().as_bytes(), credentials.password.expose().as_slice()];
        for (i, value) in values.into_iter().enumerate() {
            if i == 1 {
                pending.push(b' ');
            }
            match response::encode_string(value, non_sync) {
                Encoded::Quoted(q) => {
                    pending.extend_from_slice(&q);
                    drop(Secret::new(q));
                }
                Encoded::Literal { header, data } => {
                    pending.extend_from_slice(&header);
                    pending.extend_from_slice(b"\r\n");
                    if non_sync {
                        pending.extend_from_slice(&data);
                        drop(Secret::new(data));
                    } else {
                        segments.push(Secret::new(std::mem::replace(&mut pending, data)));
                    }
                }
            }
        }
        pending.extend_from_slice(b"\r\n");
        segments.push(Secret::new(pending));
        let mut segments = VecDeque::from(segments);
        if let Some(first) = segments.pop_front() {
            self.out.push_back(Want::Send(first));
        }
        self.pieces = segments;
        self.state = if self.pieces.is_empty() { State::LoginReply } else { State::LoginPieces };
        Ok(())
    }

    fn outcome(&mut self, reply: Reply) -> Result<(), LoginError> {
        match reply.status {
            Status::Ok => {}
            Status::No => {
                let code = response::code_name(reply.code.as_deref());
                let temporary =
                    matches!(code.as_deref(), Some("UNAVAILABLE" | "SERVERBUG" | "LIMIT" | "INUSE" | "CONTACTADMIN"));
                let kind = if temporary { ErrorKind::TempFail } else { ErrorKind::AuthFailed };
                let detail = if temporary { format!("login refused: {}", reply.describe()) } else { reply.describe() };
                let challenge = self.challenge.take().filter(|c| !c.is_empty() && kind == ErrorKind::AuthFailed);
                return Err(LoginError { challenge, ..error(kind, detail) });
            }
            _ => return Err(error(ErrorKind::Protocol, format!("login answered {}", reply.describe()))),
        }
        match response::code_capabilities(reply.code.as_deref()).or_else(|| self.collected.take()) {
            Some(caps) => {
                self.capabilities = caps;
                self.finish();
            }
            None => {
                self.send(b"C CAPABILITY\r\n".to_vec());
                self.state = State::FinalCapabilities;
            }
        }
        Ok(())
    }

    fn finish(&mut self) {
        self.state = State::Finished;
        let done = LoggedIn {
            capabilities: std::mem::take(&mut self.capabilities),
            pending: self.framer.take_unprocessed(),
            id_refused: self.id_refused.take(),
        };
        self.out.push_back(Want::Done(done));
    }
}

/// Every failure while STARTTLS is being negotiated is a STARTTLS failure.
fn starttls_kind(e: LoginError) -> LoginError {
    LoginError { kind: ErrorKind::StartTls, ..e }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::credentials::{Username, password};

    fn credentials(user: &str, pass: &str) -> Credentials {
        Credentials {
            username: Username::parse(user.as_bytes()).unwrap(),
            password: password(pass.as_bytes().to_vec()).unwrap(),
        }
    }

    /// Plays a transcript: `S:` lines are fed as the backend's, `C:` lines must be what the machine sends
    /// (concatenated per write), `TLS` marks the handshake. Returns the final want.
    fn play(security: Security, goal: Goal, transcript: &str) -> Want {
        let mut m = BackendLogin::new(security, goal);
        let mut expected_sends: VecDeque<String> = VecDeque::new();
        // `C:` alone (trimmed) is an empty line sent.
        let mut lines = transcript
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| if l == "C:" { "C: " } else { l })
            .peekable();
        loop {
            match m.next_want() {
                Want::Send(bytes) => {
                    while expected_sends.is_empty() {
                        match lines.next() {
                            Some(l) if l.starts_with("C: ") => expected_sends.push_back(format!("{}\r\n", &l[3..])),
                            other => panic!(
                                "machine sent {:?}, transcript has {other:?}",
                                String::from_utf8_lossy(bytes.expose())
                            ),
                        }
                        while let Some(l) = lines.peek().filter(|l| l.starts_with("C: ")) {
                            expected_sends.push_back(format!("{}\r\n", &l[3..]));
                            lines.next();
                        }
                    }
                    let sent = String::from_utf8_lossy(bytes.expose()).into_owned();
                    let want: String = expected_sends.drain(..).collect();
                    assert_eq!(sent, want);
                }
                Want::Read => match lines.next() {
                    Some(l) if l.starts_with("S: ") => m.feed(format!("{}\r\n", &l[3..]).as_bytes()),
                    Some("TLS") => m.tls_established(),
                    other => panic!("machine wants to read, transcript has {other:?}"),
                },
                Want::StartTls => {
                    assert_eq!(lines.next(), Some("TLS"), "STARTTLS not in the transcript");
                    m.tls_established();
                }
                done => {
                    assert!(lines.next().is_none(), "transcript not used up");
                    return done;
                }
            }
        }
    }

    fn login(id: &str) -> Goal {
        Goal::Login {
            credentials: credentials("alice@example.org", "alice-pw"),
            id: format!("{id}\r\n").into_bytes(),
            oauth: None,
        }
    }

    /// Dovecot 2.3's own lines (tests/support/dovecot.rs configuration), STARTTLS on 143.
    const DOVECOT_STARTTLS: &str = r#"
        S: * OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS LOGINDISABLED] Dovecot core ready.
        C: S STARTTLS
        S: S OK Begin TLS negotiation now.
        TLS
        C: C CAPABILITY
        C: I ID ("x-session-id" "abc")
        S: * CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN AUTH=LOGIN
        S: C OK Pre-login capabilities listed, post-login capabilities have more.
        S: * ID NIL
        S: I OK ID completed.
        C: L AUTHENTICATE PLAIN AGFsaWNlQGV4YW1wbGUub3JnAGFsaWNlLXB3
        S: L OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT LITERAL+ MOVE COMPRESS=DEFLATE] Logged in
    "#;

    #[test]
    fn dovecot_starttls_login() {
        match play(Security::StartTls, login("I ID (\"x-session-id\" \"abc\")"), DOVECOT_STARTTLS) {
            Want::Done(done) => {
                assert!(done.capabilities.contains(&"MOVE".to_owned()));
                assert!(done.id_refused.is_none());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_check_stops_before_the_credentials() {
        let transcript = r#"
            S: * OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready
            C: S STARTTLS
            S: S OK go
            TLS
            C: C CAPABILITY
            C: L LOGOUT
            S: * CAPABILITY IMAP4rev1 AUTH=PLAIN
            S: C OK done
        "#;
        assert!(matches!(play(Security::StartTls, Goal::Check, transcript), Want::Done(_)));
    }

    #[test]
    fn login_with_synchronising_literals_and_a_refusal() {
        let goal = Goal::Login {
            credentials: credentials("jürgen@example.org", "pässwörd"),
            id: b"I ID NIL\r\n".to_vec(),
            oauth: None,
        };
        let transcript = "
            S: * OK ready
            C: C CAPABILITY
            C: I ID NIL
            S: * CAPABILITY IMAP4rev1
            S: C OK done
            S: I BAD no id
            C: L LOGIN {19}
            S: + OK
            C: jürgen@example.org {10}
            S: + OK
            C: pässwörd
            S: L NO [AUTHENTICATIONFAILED] Authentication failed.
        ";
        match play(Security::Plain, goal, transcript) {
            Want::Failed(e) => assert_eq!(e.kind, ErrorKind::AuthFailed),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn failures_close_the_attempt() {
        let cases: &[(Security, &str, ErrorKind)] = &[
            (Security::StartTls, "S: * PREAUTH welcome", ErrorKind::Protocol),
            (Security::StartTls, "S: * OK [CAPABILITY IMAP4rev1] ready", ErrorKind::StartTls),
            (
                Security::StartTls,
                "S: * OK [CAPABILITY STARTTLS] ready\nC: S STARTTLS\nS: S NO not today",
                ErrorKind::StartTls,
            ),
            (Security::Implicit, "S: * BYE go away", ErrorKind::Protocol),
            (Security::Implicit, "S: * OK hi\nC: C CAPABILITY\nC: I ID NIL\nS: C NO", ErrorKind::Protocol),
        ];
        for (security, transcript, kind) in cases {
            let goal = Goal::Login { credentials: credentials("a", "b"), id: b"I ID NIL\r\n".to_vec(), oauth: None };
            match play(*security, goal, transcript) {
                Want::Failed(e) => assert_eq!(e.kind, *kind, "{transcript}: {e:?}"),
                other => panic!("{transcript}: {other:?}"),
            }
        }
    }

    fn oauth_login(mechanism: OAuthMechanism, message: &[u8]) -> Goal {
        let parsed = match mechanism {
            OAuthMechanism::XOAuth2 => oauth::parse_xoauth2(message),
            OAuthMechanism::OAuthBearer => oauth::parse_oauthbearer(message),
        }
        .unwrap();
        Goal::Login {
            credentials: Credentials { username: parsed.username, password: parsed.token },
            id: b"I ID NIL\r\n".to_vec(),
            oauth: Some(OAuthReplay { mechanism, message: parsed.message }),
        }
    }

    fn b64(bytes: &[u8]) -> String {
        String::from_utf8(sasl::encode(bytes).expose().clone()).unwrap()
    }

    const OAUTH_CAPABILITIES: &str = "
        S: * OK ready
        C: C CAPABILITY
        C: I ID NIL
        S: * CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN AUTH=XOAUTH2 AUTH=OAUTHBEARER
        S: C OK done
        S: I OK ID completed.";

    #[test]
    fn oauth_messages_are_replayed_unchanged() {
        let message = b"n,a=bob@example.com,\x01host=imap.example.com\x01port=993\x01auth=Bearer t0k3n\x01\x01";
        let transcript = format!(
            "{OAUTH_CAPABILITIES}
            C: L AUTHENTICATE OAUTHBEARER {}
            S: L OK [CAPABILITY IMAP4rev1 IDLE] Logged in",
            b64(message)
        );
        let goal = oauth_login(OAuthMechanism::OAuthBearer, message);
        assert!(matches!(play(Security::Plain, goal, &transcript), Want::Done(_)));
        // Without SASL-IR: the message follows the continuation.
        let message = b"user=alice@example.org\x01auth=Bearer ya29.x\x01\x01";
        let transcript = format!(
            "S: * OK ready
            C: C CAPABILITY
            C: I ID NIL
            S: * CAPABILITY IMAP4rev1 AUTH=XOAUTH2
            S: C OK done
            S: I OK ID completed.
            C: L AUTHENTICATE XOAUTH2
            S: +
            C: {}
            S: L OK [CAPABILITY IMAP4rev1 IDLE] Logged in",
            b64(message)
        );
        assert!(matches!(
            play(Security::Plain, oauth_login(OAuthMechanism::XOAuth2, message), &transcript),
            Want::Done(_)
        ));
    }

    #[test]
    fn oauth_falls_back_to_the_mechanism_the_backend_offers() {
        let message = b"user=alice@example.org\x01auth=Bearer ya29.x\x01\x01";
        let transcript = format!(
            "S: * OK ready
            C: C CAPABILITY
            C: I ID NIL
            S: * CAPABILITY IMAP4rev1 SASL-IR AUTH=OAUTHBEARER
            S: C OK done
            S: I OK ID completed.
            C: L AUTHENTICATE OAUTHBEARER {}
            S: L OK [CAPABILITY IMAP4rev1] Logged in",
            b64(b"n,a=alice@example.org,\x01auth=Bearer ya29.x\x01\x01")
        );
        assert!(matches!(
            play(Security::Plain, oauth_login(OAuthMechanism::XOAuth2, message), &transcript),
            Want::Done(_)
        ));
        let transcript = "
            S: * OK ready
            C: C CAPABILITY
            C: I ID NIL
            S: * CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN
            S: C OK done
            S: I OK ID completed.";
        match play(Security::Plain, oauth_login(OAuthMechanism::XOAuth2, message), transcript) {
            Want::Failed(e) => assert_eq!(e.kind, ErrorKind::TempFail, "{e:?}"),
            other => panic!("{other:?}"),
        }
    }

    /// Dovecot 2.3's failure exchange (mech-oauth2.c), with the acknowledgement the proxy gives.
    #[test]
    fn oauth_error_challenge_is_acknowledged_and_kept_for_the_client() {
        let challenge = b64(br#"{"status":"invalid_token"}"#);
        for (mechanism, message, ack) in [
            (OAuthMechanism::OAuthBearer, &b"n,a=bob@example.com,\x01auth=Bearer old\x01\x01"[..], "AQ=="),
            (OAuthMechanism::XOAuth2, &b"user=bob@example.com\x01auth=Bearer old\x01\x01"[..], ""),
        ] {
            let transcript = format!(
                "{OAUTH_CAPABILITIES}
                C: L AUTHENTICATE {} {}
                S: + {challenge}
                C: {ack}
                S: L NO [AUTHENTICATIONFAILED] Authentication failed.",
                mechanism.as_str(),
                b64(message)
            );
            match play(Security::Plain, oauth_login(mechanism, message), &transcript) {
                Want::Failed(e) => {
                    assert_eq!(e.kind, ErrorKind::AuthFailed);
                    assert_eq!(e.challenge.as_deref(), Some(challenge.as_str()));
                }
                other => panic!("{other:?}"),
            }
        }
        // A challenge that is not base64 is not passed on; a second challenge is a protocol error.
        let message = b"user=bob@example.com\x01auth=Bearer old\x01\x01";
        let transcript = format!(
            "{OAUTH_CAPABILITIES}
            C: L AUTHENTICATE XOAUTH2 {}
            S: + not base64!
            C: 
            S: L NO [AUTHENTICATIONFAILED] Authentication failed.",
            b64(message)
        );
        match play(Security::Plain, oauth_login(OAuthMechanism::XOAuth2, message), &transcript) {
            Want::Failed(e) => assert_eq!((e.kind, e.challenge), (ErrorKind::AuthFailed, None)),
            other => panic!("{other:?}"),
        }
        let transcript = format!(
            "{OAUTH_CAPABILITIES}
            C: L AUTHENTICATE XOAUTH2 {}
            S: + {challenge}
            C: 
            S: + {challenge}",
            b64(message)
        );
        match play(Security::Plain, oauth_login(OAuthMechanism::XOAuth2, message), &transcript) {
            Want::Failed(e) => assert_eq!(e.kind, ErrorKind::Protocol),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_pooled_connection_logs_in_in_one_round_trip() {
        // Prepared: STARTTLS and capabilities, then left open.
        let prepared = "
            S: * OK [CAPABILITY IMAP4rev1 SASL-IR ID LITERAL+ STARTTLS LOGINDISABLED] Dovecot ready.
            C: S STARTTLS
            S: S OK Begin TLS negotiation now.
            TLS
            C: C CAPABILITY
            S: * CAPABILITY IMAP4rev1 SASL-IR ID LITERAL+ AUTH=PLAIN AUTH=LOGIN
            S: C OK Pre-login capabilities listed.
        ";
        let Want::Done(ready) = play(Security::StartTls, Goal::Ready, prepared) else { panic!("not ready") };
        assert!(ready.pending.is_empty() && response::has_capability(&ready.capabilities, "AUTH=PLAIN"));
        // Taken: ID and credentials in one go, both answered.
        let mut m = BackendLogin::resume(Security::StartTls, ready.capabilities.clone(), login("I ID NIL"));
        let mut sent = Vec::new();
        while let Want::Send(bytes) = m.next_want() {
            sent.extend_from_slice(bytes.expose());
        }
        assert_eq!(
            String::from_utf8_lossy(&sent),
            "I ID NIL\r\nL AUTHENTICATE PLAIN AGFsaWNlQGV4YW1wbGUub3JnAGFsaWNlLXB3\r\n"
        );
        m.feed(b"* ID NIL\r\nI OK ID completed.\r\nL OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n");
        match m.next_want() {
            Want::Done(done) => assert!(done.capabilities.contains(&"MOVE".to_owned())),
            other => panic!("{other:?}"),
        }
        // Without SASL-IR the credentials wait for the ID's answer, as on a fresh connection.
        let caps = vec!["IMAP4rev1".to_owned(), "AUTH=PLAIN".to_owned()];
        let mut m = BackendLogin::resume(Security::StartTls, caps, login("I ID NIL"));
        let Want::Send(first) = m.next_want() else { panic!() };
        assert_eq!(first.expose(), b"I ID NIL\r\n");
        assert!(matches!(m.next_want(), Want::Read));
        m.feed(b"I OK ID completed.\r\n");
        let Want::Send(second) = m.next_want() else { panic!() };
        assert_eq!(second.expose(), b"L AUTHENTICATE PLAIN\r\n");
        // A refusal on a pooled connection is a refusal.
        let mut m = BackendLogin::resume(Security::StartTls, ready.capabilities, login("I ID NIL"));
        while let Want::Send(_) = m.next_want() {}
        m.feed(b"I OK ID completed.\r\nL NO [AUTHENTICATIONFAILED] Authentication failed.\r\n");
        assert!(matches!(m.next_want(), Want::Failed(LoginError { kind: ErrorKind::AuthFailed, .. })));
    }

    #[test]
    fn bytes_behind_the_starttls_ok_are_an_injection() {
        let mut m = BackendLogin::new(Security::StartTls, login("I ID NIL"));
        m.feed(b"* OK [CAPABILITY STARTTLS] hi\r\n");
        assert!(matches!(m.next_want(), Want::Send(_)));
        m.feed(b"S OK go\r\n* OK [CAPABILITY AUTH=PLAIN] injected\r\n");
        match m.next_want() {
            Want::Failed(e) => assert!(e.detail.contains("injection"), "{e:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn steps_follow_the_conversation() {
        let mut m = BackendLogin::new(Security::StartTls, Goal::Check);
        assert_eq!(m.step(), Step::Greeting);
        assert!(matches!(m.next_want(), Want::Read));
        m.feed(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n");
        assert!(matches!(m.next_want(), Want::Send(_)));
        assert_eq!(m.step(), Step::Tls, "STARTTLS sent");
        m.feed(b"S OK go\r\n");
        assert!(matches!(m.next_want(), Want::StartTls));
        assert_eq!(m.step(), Step::Tls, "the handshake");
        m.tls_established();
        assert!(matches!(m.next_want(), Want::Send(_)));
        assert_eq!(m.step(), Step::Capabilities);
        // A pooled login waits for its ID reply under the short deadline, then for the credentials.
        let goal =
            Goal::Login { credentials: credentials("u@example.org", "pw"), id: b"I ID NIL\r\n".to_vec(), oauth: None };
        let mut pooled = BackendLogin::resume(Security::StartTls, vec!["SASL-IR".into(), "AUTH=PLAIN".into()], goal);
        while let Want::Send(_) = pooled.next_want() {}
        assert_eq!(pooled.step(), Step::Capabilities);
        pooled.feed(b"I OK ID done\r\n");
        assert!(matches!(pooled.next_want(), Want::Read));
        assert_eq!(pooled.step(), Step::Credentials);
        assert!(Step::ALL.iter().filter(|s| s.is_short()).count() == 4);
    }
}
