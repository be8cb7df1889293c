//! The pre-authentication conversation the proxy holds itself, as a sans-IO state machine.
//!
//! Bytes from the client go in with [`PreAuth::feed`]; [`PreAuth::next_action`] says what to do: send bytes,
//! try a login at a backend, or close. Only `CAPABILITY`, `NOOP`, `LOGOUT`, `ID`, `LOGIN` and `AUTHENTICATE`
//! are served; nothing the client sends before login is ever forwarded. Depends on `framing`, `command`,
//! `sasl` and `credentials`.

use std::collections::VecDeque;

use super::command::{self, CommandBody, IdParams, ParseErrorKind, Tag};
use super::credentials::{Credentials, Username};
use super::framing::{Event, Framer, FramingError, Limits};
pub use super::reply::Rejection;
use super::sasl::{self, SaslError};

/// What the proxy advertises before login: only what it implements itself.
pub const CAPABILITIES: &str = "IMAP4rev1 SASL-IR LITERAL- ID AUTH=PLAIN AUTH=LOGIN";

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
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Login => "LOGIN-command",
            Mechanism::Plain => "PLAIN",
            Mechanism::SaslLogin => "LOGIN",
        }
    }
}

/// A login for the session to try at a backend.
#[derive(Debug)]
pub struct LoginRequest {
    pub tag: Tag,
    pub credentials: Credentials,
    pub mechanism: Mechanism,
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
    /// A login is being tried at a backend; no input is read.
    AwaitingLogin,
    /// Nothing more happens.
    Closed,
}

/// The pre-authentication state machine for one client connection.
#[derive(Debug)]
pub struct PreAuth {
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
    pub fn new() -> Self {
        Self {
            framer: Framer::new(Limits::CLIENT_PREAUTH),
            state: State::Command,
            actions: VecDeque::new(),
            bad_commands: 0,
            client_id: Vec::new(),
        }
    }

    /// The greeting to send first.
    pub fn greeting(&self) -> Vec<u8> {
        format!("* OK [CAPABILITY {CAPABILITIES}] Server ready.\r\n").into_bytes()
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
        self.actions.push_back(Action::Login(LoginRequest { tag, credentials, mechanism }));
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
            CommandBody::Capability => {
                self.send(format!("* CAPABILITY {CAPABILITIES}\r\n{} OK Capability completed.\r\n", tag.as_str()))
            }
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
            CommandBody::Login(credentials) => self.login(tag, credentials, Mechanism::Login),
            CommandBody::Authenticate { mechanism, initial_response } => {
                self.authenticate(tag, &mechanism, initial_response)
            }
        }
    }

    fn authenticate(&mut self, tag: Tag, mechanism: &str, initial_response: Option<Vec<u8>>) {
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
            format!("* CAPABILITY {CAPABILITIES}\r\na OK Capability completed.\r\nb OK NOOP completed.\r\n")
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
