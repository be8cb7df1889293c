//! The pre-authentication conversation the proxy holds itself, as a sans-IO state machine.
//!
//! Bytes from the client go in with [`PreAuth::feed`]; [`PreAuth::next_action`] says what to do: send bytes,
//! try a login at a backend, or close. Only `CAPABILITY`, `NOOP`, `LOGOUT`, `ID`, `LOGIN` and `AUTHENTICATE`
//! are served; nothing the client sends before login is ever forwarded. The mechanisms on offer are the
//! configuration's ([`Offer`]); OAuth messages are parsed here and replayed by the backend login, and a
//! backend's OAuth error challenge is played back to the client ([`PreAuth::oauth_failed`]). Depends on
//! `framing`, `command`, `sasl`, `oauth` and `credentials`.

use std::collections::VecDeque;

use super::command::{self, CommandBody, IdParams, ParseErrorKind, Tag};
use super::credentials::{Credentials, Secret, Username};
use super::framing::{Event, Framer, FramingError, Limits};
use super::oauth::{self, OAuthError, OAuthMechanism};
pub use super::reply::Rejection;
use super::sasl::{self, SaslError};

/// What the proxy advertises before login, before the `AUTH=` of the mechanisms on offer: only what it
/// implements itself.
pub const BASE_CAPABILITIES: &str = "IMAP4rev1 SASL-IR LITERAL- ID";

/// The SASL mechanisms on offer (`[auth] mechanisms`). Without PLAIN and LOGIN, passwords are not taken at
/// all: `LOGINDISABLED` is advertised and the `LOGIN` command refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    pub plain: bool,
    pub login: bool,
    pub xoauth2: bool,
    pub oauthbearer: bool,
}

impl Default for Offer {
    fn default() -> Self {
        Self { plain: true, login: true, xoauth2: false, oauthbearer: false }
    }
}

impl Offer {
    fn passwords(self) -> bool {
        self.plain || self.login
    }

    /// The capability list for the greeting and `CAPABILITY`.
    pub fn capabilities(self) -> String {
        let mut caps = BASE_CAPABILITIES.to_owned();
        for (offered, name) in [
            (self.plain, " AUTH=PLAIN"),
            (self.login, " AUTH=LOGIN"),
            (self.xoauth2, " AUTH=XOAUTH2"),
            (self.oauthbearer, " AUTH=OAUTHBEARER"),
        ] {
            if offered {
                caps.push_str(name);
            }
        }
        if !self.passwords() {
            caps.push_str(" LOGINDISABLED");
        }
        caps
    }
}

/// Bad commands tolerated before the connection is closed.
pub const MAX_BAD_COMMANDS: u32 = 3;

/// How the client authenticated, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// The `LOGIN` command.
    Login,
    /// `AUTHENTICATE PLAIN`.
    Plain,
    /// `AUTHENTICATE LOGIN`.
    SaslLogin,
    /// `AUTHENTICATE XOAUTH2`.
    XOAuth2,
    /// `AUTHENTICATE OAUTHBEARER`.
    OAuthBearer,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Login => "LOGIN-command",
            Mechanism::Plain => "PLAIN",
            Mechanism::SaslLogin => "LOGIN",
            Mechanism::XOAuth2 => "XOAUTH2",
            Mechanism::OAuthBearer => "OAUTHBEARER",
        }
    }

    /// The OAuth mechanism, for the two OAuth logins (the inverse of `From<OAuthMechanism>`).
    pub fn oauth(self) -> Option<OAuthMechanism> {
        match self {
            Mechanism::XOAuth2 => Some(OAuthMechanism::XOAuth2),
            Mechanism::OAuthBearer => Some(OAuthMechanism::OAuthBearer),
            Mechanism::Login | Mechanism::Plain | Mechanism::SaslLogin => None,
        }
    }
}

impl From<OAuthMechanism> for Mechanism {
    fn from(mechanism: OAuthMechanism) -> Self {
        match mechanism {
            OAuthMechanism::OAuthBearer => Mechanism::OAuthBearer,
            OAuthMechanism::XOAuth2 => Mechanism::XOAuth2,
        }
    }
}

/// A login for the session to try at a backend.
#[derive(Debug)]
pub struct LoginRequest {
    pub tag: Tag,
    /// For an OAuth login the password is the bearer token: the defence fingerprints it like a password.
    pub credentials: Credentials,
    pub mechanism: Mechanism,
    /// An OAuth login's message as the client sent it (decoded), for the backend.
    pub oauth_message: Option<Secret<Vec<u8>>>,
}

/// Why the machine wants the connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Logout,
    TooManyBadCommands,
    Framing,
    IdleTimeout,
    /// The time allowed before login ran out, however active the client was.
    TimeLimit,
}

/// What the session must do next.
#[derive(Debug)]
pub enum Action {
    Send(Vec<u8>),
    Login(LoginRequest),
    Close(CloseReason),
}

#[derive(Debug)]
enum State {
    /// Expects a command.
    Command,
    /// Expects the PLAIN response after an empty continuation.
    PlainResponse { tag: Tag },
    /// Expects the username of AUTHENTICATE LOGIN.
    LoginUsername { tag: Tag },
    /// Expects the password of AUTHENTICATE LOGIN.
    LoginPassword { tag: Tag, username: Username },
    /// Expects an OAuth client message after an empty continuation.
    OAuthResponse { tag: Tag, mechanism: OAuthMechanism },
    /// The backend's OAuth error challenge was played back; expects the client's acknowledgement.
    OAuthFailure { tag: Tag },
    /// A login is being tried at a backend; no input is read.
    AwaitingLogin,
    /// Nothing more happens.
    Closed,
}

/// The pre-authentication state machine for one client connection.
#[derive(Debug)]
pub struct PreAuth {
    offer: Offer,
    framer: Framer,
    state: State,
    actions: VecDeque<Action>,
    bad_commands: u32,
    client_id: IdParams,
}

impl Default for PreAuth {
    fn default() -> Self {
        Self::new()
    }
}

impl PreAuth {
    /// A machine offering the default mechanisms (PLAIN and LOGIN).
    pub fn new() -> Self {
        Self::offering(Offer::default())
    }

    pub fn offering(offer: Offer) -> Self {
        Self {
            offer,
            framer: Framer::new(Limits::CLIENT_PREAUTH),
            state: State::Command,
            actions: VecDeque::new(),
            bad_commands: 0,
            client_id: Vec::new(),
        }
    }

    /// The greeting to send first.
    pub fn greeting(&self) -> Vec<u8> {
        format!("* OK [CAPABILITY {}] Server ready.\r\n", self.offer.capabilities()).into_bytes()
    }

    /// Bytes received from the client. Drain [`PreAuth::next_action`] before feeding more.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.framer.push(bytes);
    }

    /// The ID parameters the client sent, for the backend.
    pub fn client_id(&self) -> &IdParams {
        &self.client_id
    }

    pub fn next_action(&mut self) -> Option<Action> {
        loop {
            if let Some(action) = self.actions.pop_front() {
                return Some(action);
            }
            if matches!(self.state, State::AwaitingLogin | State::Closed) {
                return None;
            }
            match self.framer.next_event()? {
                Ok(Event::LiteralAccepted { .. }) => self.send("+ Ready for literal data.\r\n".into()),
                Ok(Event::Frame(frame)) => match std::mem::replace(&mut self.state, State::Command) {
                    State::Command => self.command(&frame),
                    State::PlainResponse { tag } => self.plain_response(tag, frame.first_line()),
                    State::LoginUsername { tag } => self.login_username(tag, frame.first_line()),
                    State::LoginPassword { tag, username } => self.login_password(tag, username, frame.first_line()),
                    State::OAuthResponse { tag, mechanism } => self.oauth_response(tag, mechanism, frame.first_line()),
                    State::OAuthFailure { tag } => self.oauth_acknowledged(&tag, frame.first_line()),
                    // Returned above before reading input; keep the state as it was.
                    state @ (State::AwaitingLogin | State::Closed) => self.state = state,
                },
                Err(error) => self.framing_error(error),
            }
        }
    }

    /// The backend refused the login: tell the client and wait for the next command.
    pub fn login_failed(&mut self, tag: &Tag, rejection: Rejection) {
        self.state = State::Command;
        self.send(format!("{} NO [{}] {}\r\n", tag.as_str(), rejection.code, rejection.text));
    }

    /// The backend refused an OAuth login with an error challenge (base64 JSON, RFC 7628 3.2.2): the client
    /// gets it as a continuation, answers it (`AQ==` or an empty line), then gets the generic `NO`.
    pub fn oauth_failed(&mut self, tag: &Tag, challenge: &str) {
        self.send(format!("+ {challenge}\r\n"));
        self.framer.expect_raw_line();
        self.state = State::OAuthFailure { tag: tag.clone() };
    }

    /// The session timed out waiting for the client.
    pub fn idle_timeout(&mut self) {
        self.close_with("* BYE Disconnected for inactivity.\r\n".into(), CloseReason::IdleTimeout);
    }

    /// The time allowed before login is over.
    pub fn time_limit(&mut self) {
        self.close_with("* BYE Login time limit reached.\r\n".into(), CloseReason::TimeLimit);
    }

    /// After a successful login: the bytes the client sent behind it, to forward to the backend.
    pub fn into_pipelined(mut self) -> Vec<u8> {
        self.framer.take_unprocessed()
    }

    fn send(&mut self, text: String) {
        self.actions.push_back(Action::Send(text.into_bytes()));
    }

    fn close_with(&mut self, text: String, reason: CloseReason) {
        self.send(text);
        self.actions.push_back(Action::Close(reason));
        self.state = State::Closed;
    }

    fn bad(&mut self, tag: Option<&Tag>, text: &str) {
        let tag = tag.map_or("*", Tag::as_str);
        self.send(format!("{tag} BAD {text}\r\n"));
        self.bad_commands += 1;
        if self.bad_commands >= MAX_BAD_COMMANDS {
            self.close_with("* BYE Too many invalid commands.\r\n".into(), CloseReason::TooManyBadCommands);
        }
    }

    fn login(&mut self, tag: Tag, credentials: Credentials, mechanism: Mechanism) {
        self.state = State::AwaitingLogin;
        self.actions.push_back(Action::Login(LoginRequest { tag, credentials, mechanism, oauth_message: None }));
    }

    fn command(&mut self, frame: &super::framing::Frame) {
        let command = match command::parse(frame) {
            Ok(command) => command,
            Err(error) => {
                let text = match &error.kind {
                    ParseErrorKind::Credentials(_) => "Invalid username or password syntax.".to_owned(),
                    other => other.to_string(),
                };
                return self.bad(error.tag.as_ref(), &text);
            }
        };
        let tag = command.tag;
        match command.body {
            CommandBody::Capability => self.send(format!(
                "* CAPABILITY {}\r\n{} OK Capability completed.\r\n",
                self.offer.capabilities(),
                tag.as_str()
            )),
            CommandBody::Noop => self.send(format!("{} OK NOOP completed.\r\n", tag.as_str())),
            CommandBody::Logout => self.close_with(
                format!("* BYE Logging out.\r\n{} OK Logout completed.\r\n", tag.as_str()),
                CloseReason::Logout,
            ),
            CommandBody::Id(params) => {
                self.client_id = params;
                self.send(format!("* ID NIL\r\n{} OK ID completed.\r\n", tag.as_str()));
            }
            CommandBody::StartTls => self.bad(Some(&tag), "TLS is already active."),
            CommandBody::NotAllowed(_) => self.bad(Some(&tag), "Command not permitted before authentication."),
            CommandBody::Login(_) if !self.offer.passwords() => {
                self.send(format!("{} NO [CANNOT] Password logins are disabled.\r\n", tag.as_str()))
            }
            CommandBody::Login(credentials) => self.login(tag, credentials, Mechanism::Login),
            CommandBody::Authenticate { mechanism, initial_response } => {
                self.authenticate(tag, &mechanism, initial_response)
            }
        }
    }

    fn authenticate(&mut self, tag: Tag, mechanism: &str, initial_response: Option<Vec<u8>>) {
        let offer = self.offer;
        let (offered, oauth) = match mechanism {
            "PLAIN" => (offer.plain, None),
            "LOGIN" => (offer.login, None),
            "XOAUTH2" => (offer.xoauth2, Some(OAuthMechanism::XOAuth2)),
            "OAUTHBEARER" => (offer.oauthbearer, Some(OAuthMechanism::OAuthBearer)),
            _ => (false, None),
        };
        if !offered {
            return self.send(format!("{} NO Unsupported authentication mechanism.\r\n", tag.as_str()));
        }
        if let Some(mechanism) = oauth {
            return match initial_response {
                Some(response) => self.oauth_response(tag, mechanism, &response),
                None => {
                    self.send("+ \r\n".into());
                    self.framer.expect_raw_line();
                    self.state = State::OAuthResponse { tag, mechanism };
                }
            };
        }
        match (mechanism, initial_response) {
            ("PLAIN", Some(response)) => self.plain_response(tag, &response),
            ("PLAIN", None) => {
                self.send("+ \r\n".into());
                self.framer.expect_raw_line();
                self.state = State::PlainResponse { tag };
            }
            ("LOGIN", Some(response)) => self.login_username(tag, &response),
            ("LOGIN", None) => {
                self.send(format!("+ {}\r\n", sasl::LOGIN_USERNAME_PROMPT));
                self.framer.expect_raw_line();
                self.state = State::LoginUsername { tag };
            }
            _ => self.send(format!("{} NO Unsupported authentication mechanism.\r\n", tag.as_str())),
        }
    }

    fn plain_response(&mut self, tag: Tag, line: &[u8]) {
        match sasl::decode_response(line).and_then(|m| sasl::parse_plain(m.expose())) {
            Ok(credentials) => self.login(tag, credentials, Mechanism::Plain),
            Err(error) => self.sasl_error(&tag, &error),
        }
    }

    fn login_username(&mut self, tag: Tag, line: &[u8]) {
        let username = sasl::decode_response(line).and_then(|u| Username::parse(u.expose()).map_err(SaslError::from));
        match username {
            Ok(username) => {
                self.send(format!("+ {}\r\n", sasl::LOGIN_PASSWORD_PROMPT));
                self.framer.expect_raw_line();
                self.state = State::LoginPassword { tag, username };
            }
            Err(error) => self.sasl_error(&tag, &error),
        }
    }

    fn login_password(&mut self, tag: Tag, username: Username, line: &[u8]) {
        let password = sasl::decode_response(line)
            .and_then(|p| super::credentials::password(p.expose().clone()).map_err(SaslError::from));
        match password {
            Ok(password) => self.login(tag, Credentials { username, password }, Mechanism::SaslLogin),
            Err(error) => self.sasl_error(&tag, &error),
        }
    }

    fn oauth_response(&mut self, tag: Tag, mechanism: OAuthMechanism, line: &[u8]) {
        let decoded = match sasl::decode_response(line) {
            Ok(decoded) => decoded,
            Err(error) => return self.sasl_error(&tag, &error),
        };
        let parsed = match mechanism {
            OAuthMechanism::OAuthBearer => oauth::parse_oauthbearer(decoded.expose()),
            OAuthMechanism::XOAuth2 => oauth::parse_xoauth2(decoded.expose()),
        };
        match parsed {
            Ok(message) => {
                let mechanism = Mechanism::from(mechanism);
                let credentials = Credentials { username: message.username, password: message.token };
                self.state = State::AwaitingLogin;
                self.actions.push_back(Action::Login(LoginRequest {
                    tag,
                    credentials,
                    mechanism,
                    oauth_message: Some(message.message),
                }));
            }
            Err(_) if decoded.expose().is_empty() => self.sasl_error(&tag, &SaslError::Empty),
            Err(OAuthError::ChannelBinding) => {
                self.send(format!("{} NO [CANNOT] Channel binding is not supported.\r\n", tag.as_str()))
            }
            Err(_) => self.bad(Some(&tag), "Malformed SASL response."),
        }
    }

    fn oauth_acknowledged(&mut self, tag: &Tag, line: &[u8]) {
        match sasl::decode_response(line) {
            Err(SaslError::Cancelled) => self.sasl_error(tag, &SaslError::Cancelled),
            _ => self.login_failed(tag, Rejection::AUTHENTICATION_FAILED),
        }
    }

    fn sasl_error(&mut self, tag: &Tag, error: &SaslError) {
        match error {
            SaslError::Cancelled => self.send(format!("{} BAD Authentication cancelled.\r\n", tag.as_str())),
            SaslError::AuthzidMismatch => self.send(format!(
                "{} NO [AUTHORIZATIONFAILED] Authorization identity must match the user.\r\n",
                tag.as_str()
            )),
            SaslError::Empty => {
                self.send(format!("{} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n", tag.as_str()))
            }
            SaslError::InvalidBase64 => self.bad(Some(tag), "Invalid base64 data."),
            SaslError::MalformedPlain | SaslError::Credentials(_) => self.bad(Some(tag), "Malformed SASL response."),
        }
    }

    fn framing_error(&mut self, error: FramingError) {
        let tag = match &error {
            FramingError::LiteralTooBig { first_line, .. } => {
                let raw = first_line.split(|&b| b == b' ').next().unwrap_or_default();
                Tag::parse(raw)
            }
            _ => None,
        };
        if !error.is_fatal() {
            return self.bad(tag.as_ref(), "[TOOBIG] Literal too big.");
        }
        let text = match (&error, tag) {
            (FramingError::LiteralTooBig { .. }, Some(tag)) => {
                format!("{} BAD [TOOBIG] Literal too big.\r\n* BYE Literal too big.\r\n", tag.as_str())
            }
            (FramingError::LiteralTooBig { .. }, None) => "* BYE [TOOBIG] Literal too big.\r\n".into(),
            (FramingError::LineTooLong { .. }, _) => "* BYE [TOOBIG] Line too long.\r\n".into(),
            (FramingError::MessageTooLong { .. } | FramingError::TooManyLiterals { .. }, _) => {
                "* BYE [TOOBIG] Command too long.\r\n".into()
            }
        };
        self.close_with(text, CloseReason::Framing);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` and renders every action as text: sent bytes verbatim, others in brackets.
    fn run(machine: &mut PreAuth, input: &[u8]) -> String {
        machine.feed(input);
        let mut out = String::new();
        while let Some(action) = machine.next_action() {
            match action {
                Action::Send(bytes) => out.push_str(&String::from_utf8_lossy(&bytes)),
                Action::Login(req) => out.push_str(&format!(
                    "[login {} {} {}:{}]",
                    req.tag.as_str(),
                    req.mechanism.as_str(),
                    req.credentials.username,
                    String::from_utf8_lossy(req.credentials.password.expose())
                )),
                Action::Close(reason) => out.push_str(&format!("[close {reason:?}]")),
            }
        }
        out
    }

    #[test]
    fn greeting_advertises_only_what_is_implemented() {
        assert_eq!(
            PreAuth::new().greeting(),
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL- ID AUTH=PLAIN AUTH=LOGIN] Server ready.\r\n"
        );
    }

    #[test]
    fn local_commands() {
        let mut m = PreAuth::new();
        assert_eq!(
            run(&mut m, b"a CAPABILITY\r\nb NOOP\r\n"),
            format!(
                "* CAPABILITY {}\r\na OK Capability completed.\r\nb OK NOOP completed.\r\n",
                Offer::default().capabilities()
            )
        );
        assert_eq!(run(&mut m, b"c ID (\"name\" \"mutt\")\r\n"), "* ID NIL\r\nc OK ID completed.\r\n");
        assert_eq!(m.client_id(), &vec![("name".to_owned(), Some("mutt".to_owned()))]);
        assert_eq!(
            run(&mut m, b"d LOGOUT\r\ne NOOP\r\n"),
            "* BYE Logging out.\r\nd OK Logout completed.\r\n[close Logout]"
        );
    }

    #[test]
    fn login_then_failure_then_success_with_pipelining() {
        let mut m = PreAuth::new();
        assert_eq!(run(&mut m, b"a LOGIN alice wrong\r\nb NOOP\r\n"), "[login a LOGIN-command alice:wrong]");
        // While the login is tried, further input is held, not acted on.
        assert_eq!(run(&mut m, b"x NOOP\r\n"), "");
        m.login_failed(&Tag::parse(b"a").unwrap(), Rejection::AUTHENTICATION_FAILED);
        assert_eq!(
            run(&mut m, b""),
            "a NO [AUTHENTICATIONFAILED] Authentication failed.\r\nb OK NOOP completed.\r\nx OK NOOP completed.\r\n"
        );
        assert_eq!(run(&mut m, b"c LOGIN {5}\r\n"), "+ Ready for literal data.\r\n");
        assert_eq!(run(&mut m, b"alice right\r\nd SELECT INBOX\r\ne NO"), "[login c LOGIN-command alice:right]");
        assert_eq!(m.into_pipelined(), b"d SELECT INBOX\r\ne NO");
    }

    #[test]
    fn authenticate_plain_with_and_without_initial_response() {
        let mut m = PreAuth::new();
        assert_eq!(run(&mut m, b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n"), "[login a PLAIN alice:secret]");
        let mut m = PreAuth::new();
        assert_eq!(run(&mut m, b"a AUTHENTICATE PLAIN\r\n"), "+ \r\n");
        assert_eq!(run(&mut m, b"AGFsaWNlAHNlY3JldA==\r\n"), "[login a PLAIN alice:secret]");
        let mut m = PreAuth::new();
        assert_eq!(run(&mut m, b"a AUTHENTICATE PLAIN\r\n*\r\n"), "+ \r\na BAD Authentication cancelled.\r\n");
        assert_eq!(
            run(&mut m, b"b AUTHENTICATE PLAIN dXNlcgBhbGljZQBwdw==\r\n"),
            "b NO [AUTHORIZATIONFAILED] Authorization identity must match the user.\r\n"
        );
        assert_eq!(run(&mut m, b"c AUTHENTICATE PLAIN AHU=\r\n"), "c BAD Malformed SASL response.\r\n");
        assert_eq!(run(&mut m, b"d AUTHENTICATE CRAM-MD5\r\n"), "d NO Unsupported authentication mechanism.\r\n");
        // An empty initial response, or an empty answer, is a failed authentication (Dovecot: NO).
        let failed = "e NO [AUTHENTICATIONFAILED] Authentication failed.\r\n";
        assert_eq!(run(&mut m, b"e AUTHENTICATE PLAIN =\r\n"), failed);
        assert_eq!(run(&mut m, b"e AUTHENTICATE PLAIN\r\n=\r\n"), format!("+ \r\n{failed}"));
    }

    #[test]
    fn an_id_of_rfc_size_is_answered_ok() {
        let mut m = PreAuth::new();
        let mut id = b"i ID (".to_vec();
        for i in 0..30 {
            id.extend_from_slice(format!("\"f{i:02}\" \"{}\" ", "v".repeat(1024)).as_bytes());
        }
        id.pop();
        id.extend_from_slice(b")\r\n");
        assert_eq!(run(&mut m, &id), "* ID NIL\r\ni OK ID completed.\r\n");
        assert_eq!(m.client_id().len(), 30);
        assert_eq!(run(&mut m, b"n NOOP\r\n"), "n OK NOOP completed.\r\n");
    }

    #[test]
    fn authenticate_login() {
        let mut m = PreAuth::new();
        assert_eq!(run(&mut m, b"a AUTHENTICATE LOGIN\r\n"), "+ VXNlcm5hbWU6\r\n");
        assert_eq!(run(&mut m, b"YWxpY2U=\r\n"), "+ UGFzc3dvcmQ6\r\n");
        assert_eq!(run(&mut m, b"c2VjcmV0\r\n"), "[login a LOGIN alice:secret]");
        let mut m = PreAuth::new();
        assert_eq!(run(&mut m, b"a AUTHENTICATE LOGIN YWxpY2U=\r\n"), "+ UGFzc3dvcmQ6\r\n");
        assert_eq!(run(&mut m, b"not base64!\r\n"), "a BAD Invalid base64 data.\r\n");
    }

    #[test]
    fn three_bad_commands_close() {
        let mut m = PreAuth::new();
        assert_eq!(
            run(&mut m, b"a STARTTLS\r\nb SELECT INBOX\r\n+ x\r\nd NOOP\r\n"),
            "a BAD TLS is already active.\r\nb BAD Command not permitted before authentication.\r\n\
             * BAD Invalid tag.\r\n* BYE Too many invalid commands.\r\n[close TooManyBadCommands]"
        );
    }

    #[test]
    fn smuggled_crlf_in_username_never_becomes_a_command() {
        let mut m = PreAuth::new();
        let out = run(&mut m, b"a LOGIN {17+}\r\nx\r\nb DELETE INBOX pw\r\n");
        assert_eq!(out, "a BAD Invalid username or password syntax.\r\n");
    }

    #[test]
    fn oversized_literals() {
        let mut m = PreAuth::new();
        assert_eq!(run(&mut m, b"a LOGIN {100000}\r\n"), "a BAD [TOOBIG] Literal too big.\r\n");
        assert_eq!(run(&mut m, b"b NOOP\r\n"), "b OK NOOP completed.\r\n");
        let mut m = PreAuth::new();
        assert_eq!(
            run(&mut m, b"a LOGIN {4097+}\r\nb LOGOUT\r\n"),
            "a BAD [TOOBIG] Literal too big.\r\n* BYE Literal too big.\r\n[close Framing]"
        );
        let mut m = PreAuth::new();
        assert_eq!(run(&mut m, &[b'x'; 9000]), "* BYE [TOOBIG] Line too long.\r\n[close Framing]");
    }

    fn oauth_offer() -> Offer {
        Offer { xoauth2: true, oauthbearer: true, ..Offer::default() }
    }

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn oauth_is_offered_only_when_configured() {
        let m = PreAuth::offering(oauth_offer());
        assert_eq!(
            m.greeting(),
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL- ID AUTH=PLAIN AUTH=LOGIN AUTH=XOAUTH2 AUTH=OAUTHBEARER] \
              Server ready.\r\n"
        );
        let message = b64(b"user=alice@example.org\x01auth=Bearer tok.en\x01\x01");
        let mut m = PreAuth::new();
        assert_eq!(
            run(&mut m, format!("a AUTHENTICATE XOAUTH2 {message}\r\n").as_bytes()),
            "a NO Unsupported authentication mechanism.\r\n"
        );
        // OAuth only: no passwords taken at all.
        let offer = Offer { plain: false, login: false, ..oauth_offer() };
        let mut m = PreAuth::offering(offer);
        assert_eq!(offer.capabilities(), "IMAP4rev1 SASL-IR LITERAL- ID AUTH=XOAUTH2 AUTH=OAUTHBEARER LOGINDISABLED");
        assert_eq!(run(&mut m, b"a LOGIN alice pw\r\n"), "a NO [CANNOT] Password logins are disabled.\r\n");
        assert_eq!(
            run(&mut m, b"b AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n"),
            "b NO Unsupported authentication mechanism.\r\n"
        );
    }

    /// Runs until the login action and returns it.
    fn oauth_login(m: &mut PreAuth, input: &[u8]) -> LoginRequest {
        m.feed(input);
        loop {
            match m.next_action() {
                Some(Action::Login(request)) => return request,
                Some(Action::Send(bytes)) => assert_eq!(bytes, b"+ \r\n"),
                other => panic!("expected a login, got {other:?}"),
            }
        }
    }

    #[test]
    fn oauth_logins_with_and_without_initial_response() {
        let xoauth2 = b"user=alice@example.org\x01auth=Bearer ya29.tok-en\x01\x01";
        let bearer = b"n,a=bob@example.com,\x01host=imap.example.com\x01port=993\x01auth=Bearer eyJ0.eXA~\x01\x01";
        for (mechanism, message, user, token) in [
            (Mechanism::XOAuth2, &xoauth2[..], "alice@example.org", &b"ya29.tok-en"[..]),
            (Mechanism::OAuthBearer, &bearer[..], "bob@example.com", &b"eyJ0.eXA~"[..]),
        ] {
            let name = mechanism.as_str();
            let inputs = [
                format!("a AUTHENTICATE {name} {}\r\n", b64(message)),
                format!("a AUTHENTICATE {name}\r\n{}\r\n", b64(message)),
            ];
            for input in inputs {
                let mut m = PreAuth::offering(oauth_offer());
                let request = oauth_login(&mut m, input.as_bytes());
                assert_eq!(request.mechanism, mechanism);
                assert_eq!(request.credentials.username.as_str(), user);
                assert_eq!(request.credentials.password.expose(), token, "the token is what the defence counts");
                assert_eq!(request.oauth_message.as_ref().map(|m| m.expose().as_slice()), Some(message));
                assert!(!format!("{request:?}").contains("tok-en") && !format!("{request:?}").contains("eyJ0"));
            }
        }
    }

    #[test]
    fn oauth_error_challenge_is_played_back_then_no() {
        let challenge = b64(br#"{"status":"invalid_token"}"#);
        let message = b64(b"n,a=bob@example.com,\x01auth=Bearer expired\x01\x01");
        let tag = Tag::parse(b"a").unwrap();
        for (answer, reply) in [
            ("AQ==", "a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
            ("", "a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
            ("*", "a BAD Authentication cancelled.\r\n"),
        ] {
            let mut m = PreAuth::offering(oauth_offer());
            oauth_login(&mut m, format!("a AUTHENTICATE OAUTHBEARER {message}\r\n").as_bytes());
            m.oauth_failed(&tag, &challenge);
            assert_eq!(run(&mut m, b""), format!("+ {challenge}\r\n"));
            // The acknowledgement is a SASL line, never a command, even when it looks like one.
            assert_eq!(
                run(&mut m, format!("{answer}\r\nb NOOP\r\n").as_bytes()),
                format!("{reply}b OK NOOP completed.\r\n")
            );
        }
        let mut m = PreAuth::offering(oauth_offer());
        oauth_login(&mut m, format!("a AUTHENTICATE OAUTHBEARER {message}\r\n").as_bytes());
        m.oauth_failed(&tag, &challenge);
        assert_eq!(run(&mut m, b""), format!("+ {challenge}\r\n"));
        assert_eq!(run(&mut m, b"c LOGOUT\r\n"), "a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n");
    }

    #[test]
    fn malformed_oauth_messages() {
        let mut m = PreAuth::offering(oauth_offer());
        let cases = [
            (
                format!("a AUTHENTICATE OAUTHBEARER {}\r\n", b64(b"p=tls-unique,a=u@x.org,\x01auth=Bearer t\x01\x01")),
                "a NO [CANNOT] Channel binding is not supported.\r\n",
            ),
            ("b AUTHENTICATE XOAUTH2 =\r\n".to_owned(), "b NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
            (
                format!("c AUTHENTICATE XOAUTH2 {}\r\n", b64(b"user=u@x.org\x01auth=Basic dTpw\x01\x01")),
                "c BAD Malformed SASL response.\r\n",
            ),
            ("d AUTHENTICATE OAUTHBEARER\r\nnot-base64!\r\n".to_owned(), "+ \r\nd BAD Invalid base64 data.\r\n"),
        ];
        for (input, reply) in cases {
            assert_eq!(run(&mut m, input.as_bytes()), reply);
        }
    }

    #[test]
    fn idle_timeout_says_bye() {
        let mut m = PreAuth::new();
        m.idle_timeout();
        assert_eq!(run(&mut m, b"a NOOP\r\n"), "* BYE Disconnected for inactivity.\r\n[close IdleTimeout]");
        let mut m = PreAuth::new();
        m.time_limit();
        assert_eq!(run(&mut m, b"a NOOP\r\n"), "* BYE Login time limit reached.\r\n[close TimeLimit]");
    }
}
