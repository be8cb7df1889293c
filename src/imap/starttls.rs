//! The plaintext conversation on a STARTTLS listener (port 143), as a sans-IO state machine: until the
//! client asks for TLS, only `CAPABILITY`, `NOOP`, `LOGOUT` and `STARTTLS` are served. The capabilities
//! say `STARTTLS LOGINDISABLED` and offer no `AUTH=`; `LOGIN` and `AUTHENTICATE` are answered
//! `NO [PRIVACYREQUIRED]` and never become a login (nor a failure the defence counts); `ID` is answered
//! but not kept (anything sent in clear may have been written by someone on the path).
//!
//! After `STARTTLS` the machine is dropped with whatever the client sent behind the command: bytes
//! pipelined after `STARTTLS` are never read as commands (the injection class of CVE-2011-0411). The
//! session over TLS then starts afresh, without a second greeting.

use std::collections::VecDeque;

use super::command::{self, CommandBody, Tag};
use super::framing::{Event, Framer, Limits};
use super::preauth::{CloseReason, MAX_BAD_COMMANDS};

/// Capabilities in clear: TLS first, no way to log in.
pub const CAPABILITIES: &str = "IMAP4rev1 STARTTLS LOGINDISABLED";

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Send(Vec<u8>),
    /// The `OK` has been sent (the preceding `Send`): hand the connection to the TLS handshake.
    StartTls,
    Close(CloseReason),
}

#[derive(Debug)]
pub struct BeforeTls {
    framer: Framer,
    actions: VecDeque<Action>,
    bad_commands: u32,
    done: bool,
}

impl Default for BeforeTls {
    fn default() -> Self {
        Self::new()
    }
}

impl BeforeTls {
    pub fn new() -> Self {
        Self { framer: Framer::new(Limits::CLIENT_PREAUTH), actions: VecDeque::new(), bad_commands: 0, done: false }
    }

    pub fn greeting(&self) -> Vec<u8> {
        format!("* OK [CAPABILITY {CAPABILITIES}] Server ready.\r\n").into_bytes()
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if !self.done {
            self.framer.push(bytes);
        }
    }

    pub fn next_action(&mut self) -> Option<Action> {
        loop {
            if let Some(action) = self.actions.pop_front() {
                return Some(action);
            }
            if self.done {
                return None;
            }
            match self.framer.next_event()? {
                Ok(Event::LiteralAccepted { .. }) => self.send("+ Ready for literal data.\r\n".into()),
                Ok(Event::Frame(frame)) => self.command(&frame),
                Err(error) if error.is_fatal() => {
                    self.close("* BYE Invalid input.\r\n".into(), CloseReason::Framing);
                }
                Err(_) => self.bad(None, "[TOOBIG] Literal too big."),
            }
        }
    }

    pub fn idle_timeout(&mut self) {
        self.close("* BYE Disconnected for inactivity.\r\n".into(), CloseReason::IdleTimeout);
    }

    pub fn time_limit(&mut self) {
        self.close("* BYE Login time limit reached.\r\n".into(), CloseReason::TimeLimit);
    }

    fn send(&mut self, text: String) {
        self.actions.push_back(Action::Send(text.into_bytes()));
    }

    fn close(&mut self, text: String, reason: CloseReason) {
        self.send(text);
        self.actions.push_back(Action::Close(reason));
        self.done = true;
    }

    fn bad(&mut self, tag: Option<&Tag>, text: &str) {
        self.send(format!("{} BAD {text}\r\n", tag.map_or("*", Tag::as_str)));
        self.bad_commands += 1;
        if self.bad_commands >= MAX_BAD_COMMANDS {
            self.close("* BYE Too many invalid commands.\r\n".into(), CloseReason::TooManyBadCommands);
        }
    }

    fn command(&mut self, frame: &super::framing::Frame) {
        let command = match command::parse(frame) {
            Ok(command) => command,
            Err(error) => return self.bad(error.tag.as_ref(), "Invalid command."),
        };
        let tag = command.tag.as_str().to_owned();
        match command.body {
            CommandBody::Capability => {
                self.send(format!("* CAPABILITY {CAPABILITIES}\r\n{tag} OK Capability completed.\r\n"))
            }
            CommandBody::Noop => self.send(format!("{tag} OK NOOP completed.\r\n")),
            CommandBody::Logout => {
                self.close(format!("* BYE Logging out.\r\n{tag} OK Logout completed.\r\n"), CloseReason::Logout)
            }
            CommandBody::Id(_) => self.send(format!("* ID NIL\r\n{tag} OK ID completed.\r\n")),
            CommandBody::StartTls => {
                self.send(format!("{tag} OK Begin TLS negotiation now.\r\n"));
                self.actions.push_back(Action::StartTls);
                self.done = true;
            }
            // The credentials are dropped (and wiped) here: never a login, never a counted failure.
            CommandBody::Login(_) | CommandBody::Authenticate { .. } => {
                self.send(format!("{tag} NO [PRIVACYREQUIRED] Use STARTTLS first: logins need TLS.\r\n"))
            }
            CommandBody::NotAllowed(_) => self.bad(Some(&command.tag), "Command not permitted before STARTTLS."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(machine: &mut BeforeTls, input: &[u8]) -> (String, Vec<Action>) {
        machine.feed(input);
        let mut text = String::new();
        let mut others = Vec::new();
        while let Some(action) = machine.next_action() {
            match action {
                Action::Send(bytes) => text.push_str(&String::from_utf8(bytes).unwrap()),
                other => others.push(other),
            }
        }
        (text, others)
    }

    #[test]
    fn greeting_and_capabilities_offer_tls_and_no_login() {
        let mut m = BeforeTls::new();
        let greeting = String::from_utf8(m.greeting()).unwrap();
        assert!(greeting.contains("STARTTLS LOGINDISABLED") && !greeting.contains("AUTH="), "{greeting}");
        let (text, _) = run(&mut m, b"a CAPABILITY\r\nb NOOP\r\n");
        assert_eq!(
            text,
            "* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\na OK Capability completed.\r\nb OK NOOP completed.\r\n"
        );
    }

    #[test]
    fn logins_in_clear_are_refused_without_becoming_logins() {
        let mut m = BeforeTls::new();
        let (text, actions) =
            run(&mut m, b"a LOGIN bob secret\r\nb AUTHENTICATE PLAIN AGJvYgBzZWNyZXQ=\r\nc AUTHENTICATE PLAIN\r\n");
        assert_eq!(text.matches("NO [PRIVACYREQUIRED]").count(), 3, "{text}");
        assert!(!text.contains("+ "), "no continuation for a mechanism in clear: {text}");
        assert!(actions.is_empty());
        // Not bad commands: the connection stays open.
        let (text, _) = run(&mut m, b"d NOOP\r\n");
        assert_eq!(text, "d OK NOOP completed.\r\n");
    }

    #[test]
    fn bytes_pipelined_after_starttls_are_never_read() {
        let mut m = BeforeTls::new();
        let (text, actions) = run(&mut m, b"a STARTTLS\r\nb CAPABILITY\r\nc LOGIN x y\r\n");
        assert_eq!(text, "a OK Begin TLS negotiation now.\r\n");
        assert_eq!(actions, vec![Action::StartTls]);
        let (text, actions) = run(&mut m, b"d NOOP\r\n");
        assert!(text.is_empty() && actions.is_empty());
    }

    #[test]
    fn bad_commands_close_and_logout_says_bye() {
        let mut m = BeforeTls::new();
        let (text, actions) = run(&mut m, b"a SELECT INBOX\r\nb FETCH 1 ALL\r\n\r\n");
        assert!(text.ends_with("* BYE Too many invalid commands.\r\n"), "{text}");
        assert_eq!(actions, vec![Action::Close(CloseReason::TooManyBadCommands)]);
        let mut m = BeforeTls::new();
        let (text, actions) = run(&mut m, b"z LOGOUT\r\n");
        assert!(text.starts_with("* BYE"));
        assert_eq!(actions, vec![Action::Close(CloseReason::Logout)]);
    }
}
