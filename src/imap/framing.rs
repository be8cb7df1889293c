//! Framing: splits an IMAP byte stream into whole messages (a command or a response), each a sequence of
//! lines and literals, before any grammar is looked at.
//!
//! Every buffer is bounded by [`Limits`]: a line longer than `max_line`, a literal larger than the limit for
//! its kind, or a message larger than `max_message` is an error, never an allocation. The framer is sans-IO:
//! bytes go in with [`Framer::push`], events come out of [`Framer::next_event`]. Callers drain events before
//! pushing more, so the unprocessed input never exceeds one partial line plus one read.

use std::collections::VecDeque;

/// Size bounds for one direction of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest line, CRLF excluded.
    pub max_line: usize,
    /// Largest synchronising literal `{n}` accepted.
    pub max_sync_literal: u64,
    /// Largest non-synchronising literal `{n+}` accepted (RFC 7888 LITERAL- caps this at 4096).
    pub max_nonsync_literal: u64,
    /// Largest whole message (all lines and literals).
    pub max_message: usize,
    /// Most literals in one message.
    pub max_literals: usize,
    /// Longest line, and largest message, of an `ID` command: RFC 2971 allows 30 field/value pairs with
    /// values of 1024 octets, about 32 KiB on one line. Only `ID` gets this much.
    pub max_id: usize,
}

impl Limits {
    /// Bounds for a client's commands before authentication.
    pub const CLIENT_PREAUTH: Limits = Limits {
        max_line: 8192,
        max_sync_literal: 8192,
        max_nonsync_literal: 4096,
        max_message: 32 * 1024,
        max_literals: 8,
        max_id: 40 * 1024,
    };

    /// Bounds for a backend's responses while the proxy logs in (greeting, CAPABILITY, ID, login replies).
    pub const BACKEND_LOGIN: Limits = Limits {
        max_line: 64 * 1024,
        max_sync_literal: 64 * 1024,
        max_nonsync_literal: 64 * 1024,
        max_message: 256 * 1024,
        max_literals: 64,
        max_id: 64 * 1024,
    };
}

/// One piece of a message.
#[derive(Clone, PartialEq, Eq)]
pub enum Fragment {
    /// A line without its CRLF; it ends with the `{n}` announcement when a literal follows.
    Line(Vec<u8>),
    /// The bytes of a literal.
    Literal(Vec<u8>),
}

impl std::fmt::Debug for Fragment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Lines (LOGIN user pass, SASL answers) and literals may carry passwords: show their size only.
        match self {
            Fragment::Line(l) => write!(f, "Line({} bytes)", l.len()),
            Fragment::Literal(l) => write!(f, "Literal({} bytes)", l.len()),
        }
    }
}

/// A whole command or response: lines and literals in order, always ending with a line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Frame {
    pub fragments: Vec<Fragment>,
}

impl Frame {
    /// The first line, where the tag lives.
    pub fn first_line(&self) -> &[u8] {
        match self.fragments.first() {
            Some(Fragment::Line(l)) => l,
            _ => &[],
        }
    }
}

/// What the framer found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A synchronising literal was announced and is within bounds: the peer waits for a `+` continuation.
    LiteralAccepted { length: u64 },
    /// A complete message.
    Frame(Frame),
}

/// Why the input could not be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// No line end within `max_line` bytes. Fatal: the stream cannot be resynchronised.
    #[error("line longer than {max} bytes")]
    LineTooLong { max: usize },
    /// The lines and literals of one message add up to more than `max_message`. Fatal.
    #[error("message longer than {max} bytes")]
    MessageTooLong { max: usize },
    /// More than `max_literals` literals in one message. Fatal.
    #[error("more than {max} literals in one message")]
    TooManyLiterals { max: usize },
    /// A literal over its limit, or with a length that is not a decimal number. For a synchronising literal
    /// this is recoverable (the peer sends nothing until it gets `+`); a non-synchronising literal's bytes
    /// are already on their way and must never be read as commands, so that case is fatal.
    #[error("literal too big or malformed")]
    LiteralTooBig { first_line: Vec<u8>, nonsync: bool },
}

impl FramingError {
    /// Whether the stream is beyond repair after this error.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, FramingError::LiteralTooBig { nonsync: false, .. })
    }
}

/// A literal announcement at the end of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Announcement {
    None,
    Literal { length: u64, nonsync: bool },
    Malformed { nonsync: bool },
}

/// Reads the `{n}`, `{n+}` or `~{n}` at the end of a line, if any.
fn announcement(line: &[u8]) -> Announcement {
    let Some(body) = line.strip_suffix(b"}") else {
        return Announcement::None;
    };
    let Some(open) = body.iter().rposition(|&b| b == b'{') else {
        return Announcement::None;
    };
    let inner = &body[open + 1..];
    let (digits, nonsync) = match inner.strip_suffix(b"+") {
        Some(d) => (d, true),
        None => (inner, false),
    };
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Announcement::Malformed { nonsync };
    }
    match std::str::from_utf8(digits).ok().and_then(|d| d.parse::<u64>().ok()) {
        Some(length) => Announcement::Literal { length, nonsync },
        None => Announcement::Malformed { nonsync },
    }
}

enum State {
    Line,
    Literal { remaining: usize, data: Vec<u8> },
    Failed,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            State::Line => f.write_str("Line"),
            State::Literal { remaining, data } => write!(f, "Literal({} read, {remaining} to go)", data.len()),
            State::Failed => f.write_str("Failed"),
        }
    }
}

/// How much of a line is looked at to tell an `ID` command: a tag of up to 64 characters and ` ID `.
const MAX_TAG_PEEK: usize = 64 + 4;

/// `tag SP "ID" (SP / "(")`, case-insensitive, at the start of `line`.
fn is_id_command(line: &[u8]) -> bool {
    let Some(space) = line.iter().position(|&b| b == b' ') else { return false };
    let rest = &line[space + 1..];
    space > 0 && rest.len() >= 3 && rest[..2].eq_ignore_ascii_case(b"ID") && matches!(rest[2], b' ' | b'(')
}

/// Splits a byte stream into [`Frame`]s under [`Limits`].
pub struct Framer {
    limits: Limits,
    input: VecDeque<u8>,
    state: State,
    current: Vec<Fragment>,
    current_size: usize,
    literals: usize,
    raw_line_next: bool,
}

impl std::fmt::Debug for Framer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The buffer holds raw client bytes (passwords among them): sizes only.
        f.debug_struct("Framer")
            .field("limits", &self.limits)
            .field("input", &format_args!("{} bytes", self.input.len()))
            .field("state", &self.state)
            .field("current", &self.current)
            .field("raw_line_next", &self.raw_line_next)
            .finish()
    }
}

impl Framer {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            input: VecDeque::new(),
            state: State::Line,
            current: Vec::new(),
            current_size: 0,
            literals: 0,
            raw_line_next: false,
        }
    }

    /// Adds received bytes. Call [`Framer::next_event`] until it returns `None` before pushing more.
    pub fn push(&mut self, bytes: &[u8]) {
        if !matches!(self.state, State::Failed) {
            self.input.extend(bytes);
        }
    }

    /// The next message is a bare line (e.g. a SASL response): no literal announcement is honoured in it.
    pub fn expect_raw_line(&mut self) {
        self.raw_line_next = true;
    }

    /// Input received but not yet framed, e.g. commands pipelined behind a LOGIN.
    pub fn take_unprocessed(&mut self) -> Vec<u8> {
        self.input.drain(..).collect()
    }

    /// Bytes held for the message being framed (partial line or literal), for bound checks in tests.
    pub fn buffered(&self) -> usize {
        let literal = match &self.state {
            State::Literal { data, .. } => data.len(),
            _ => 0,
        };
        self.input.len() + self.current_size + literal
    }

    pub fn next_event(&mut self) -> Option<Result<Event, FramingError>> {
        loop {
            match &mut self.state {
                State::Failed => return None,
                State::Literal { remaining, data } => {
                    let n = (*remaining).min(self.input.len());
                    data.extend(self.input.drain(..n));
                    *remaining -= n;
                    if *remaining > 0 {
                        return None;
                    }
                    let data = std::mem::take(data);
                    self.current_size += data.len();
                    self.current.push(Fragment::Literal(data));
                    self.state = State::Line;
                }
                State::Line => {
                    let (max_line, max_message) = self.bounds();
                    let scan = self.input.len().min(max_line + 2);
                    let Some(lf) = self.input.range(..scan).position(|&b| b == b'\n') else {
                        if self.input.len() > max_line + 1 {
                            return Some(Err(self.fail(FramingError::LineTooLong { max: max_line })));
                        }
                        return None;
                    };
                    let mut line: Vec<u8> = self.input.drain(..=lf).collect();
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    if line.len() > max_line {
                        return Some(Err(self.fail(FramingError::LineTooLong { max: max_line })));
                    }
                    self.current_size += line.len();
                    if self.current_size > max_message {
                        return Some(Err(self.fail(FramingError::MessageTooLong { max: max_message })));
                    }
                    if std::mem::take(&mut self.raw_line_next) {
                        self.current.push(Fragment::Line(line));
                        return Some(Ok(Event::Frame(self.finish())));
                    }
                    match announcement(&line) {
                        Announcement::None | Announcement::Malformed { nonsync: false } => {
                            // A malformed synchronising announcement is left to the parser, which rejects
                            // it; the peer sends nothing more without a continuation.
                            self.current.push(Fragment::Line(line));
                            return Some(Ok(Event::Frame(self.finish())));
                        }
                        Announcement::Malformed { nonsync: true } => {
                            return Some(Err(self.too_big(line, true)));
                        }
                        Announcement::Literal { length, nonsync } => {
                            let max =
                                if nonsync { self.limits.max_nonsync_literal } else { self.limits.max_sync_literal };
                            let fits_message = (self.current_size as u64).saturating_add(length) <= max_message as u64;
                            if length > max || !fits_message {
                                return Some(Err(self.too_big(line, nonsync)));
                            }
                            self.literals += 1;
                            if self.literals > self.limits.max_literals {
                                return Some(Err(
                                    self.fail(FramingError::TooManyLiterals { max: self.limits.max_literals })
                                ));
                            }
                            // Bounded by the checks above.
                            let length_usize = length as usize;
                            self.current.push(Fragment::Line(line));
                            self.state =
                                State::Literal { remaining: length_usize, data: Vec::with_capacity(length_usize) };
                            if !nonsync {
                                return Some(Ok(Event::LiteralAccepted { length }));
                            }
                        }
                    }
                }
            }
        }
    }

    /// Line and message bounds for the message being framed: wider for an `ID` command.
    fn bounds(&self) -> (usize, usize) {
        let first: Vec<u8> = match self.current.first() {
            Some(Fragment::Line(line)) => line.iter().take(MAX_TAG_PEEK).copied().collect(),
            _ => self.input.iter().take(MAX_TAG_PEEK).copied().collect(),
        };
        if !self.raw_line_next && is_id_command(&first) {
            (self.limits.max_id.max(self.limits.max_line), self.limits.max_id.max(self.limits.max_message))
        } else {
            (self.limits.max_line, self.limits.max_message)
        }
    }

    fn finish(&mut self) -> Frame {
        self.current_size = 0;
        self.literals = 0;
        Frame { fragments: std::mem::take(&mut self.current) }
    }

    fn fail(&mut self, error: FramingError) -> FramingError {
        self.state = State::Failed;
        self.input.clear();
        self.current.clear();
        error
    }

    fn too_big(&mut self, line: Vec<u8>, nonsync: bool) -> FramingError {
        let first_line = match self.current.first() {
            Some(Fragment::Line(first)) => first.clone(),
            _ => line,
        };
        let error = FramingError::LiteralTooBig { first_line, nonsync };
        if nonsync {
            self.fail(error)
        } else {
            self.finish();
            error
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(limits: Limits, input: &[u8]) -> Vec<Result<Event, FramingError>> {
        let mut framer = Framer::new(limits);
        framer.push(input);
        std::iter::from_fn(|| framer.next_event()).collect()
    }

    fn line(s: &str) -> Fragment {
        Fragment::Line(s.as_bytes().to_vec())
    }

    #[test]
    fn splits_lines_and_literals() {
        let out = frames(Limits::CLIENT_PREAUTH, b"a NOOP\r\nb LOGIN {5}\r\nalice {3+}\r\npwd\r\n");
        assert_eq!(
            out,
            vec![
                Ok(Event::Frame(Frame { fragments: vec![line("a NOOP")] })),
                Ok(Event::LiteralAccepted { length: 5 }),
                Ok(Event::Frame(Frame {
                    fragments: vec![
                        line("b LOGIN {5}"),
                        Fragment::Literal(b"alice".to_vec()),
                        line(" {3+}"),
                        Fragment::Literal(b"pwd".to_vec()),
                        line(""),
                    ]
                })),
            ]
        );
    }

    #[test]
    fn literal_content_is_not_framed() {
        // A literal carrying CRLF and something that looks like a command stays one literal.
        let out = frames(Limits::CLIENT_PREAUTH, b"a LOGIN {12+}\r\nx\r\nb LOGOUT y\r\n");
        assert_eq!(
            out,
            vec![Ok(Event::Frame(Frame {
                fragments: vec![line("a LOGIN {12+}"), Fragment::Literal(b"x\r\nb LOGOUT ".to_vec()), line("y"),]
            }))]
        );
    }

    #[test]
    fn an_id_of_rfc_size_fits_and_nothing_else_gets_as_much() {
        let mut id = b"a1 ID (".to_vec();
        for i in 0..30 {
            id.extend_from_slice(format!("\"field-{i:02}\" \"{}\" ", "v".repeat(1024)).as_bytes());
        }
        id.pop();
        id.extend_from_slice(b")\r\n");
        assert!(id.len() > 31_000, "{}", id.len());
        let out = frames(Limits::CLIENT_PREAUTH, &id);
        assert!(matches!(out.as_slice(), [Ok(Event::Frame(_))]), "{out:?}");
        let out = frames(Limits::CLIENT_PREAUTH, &[b"A1 id".as_slice(), &id[5..]].concat());
        assert!(matches!(out.as_slice(), [Ok(Event::Frame(_))]), "case-insensitive: {out:?}");
        let mut noop = b"a1 NOOP ".to_vec();
        noop.extend_from_slice(&id[7..]);
        let out = frames(Limits::CLIENT_PREAUTH, &noop);
        assert_eq!(out, vec![Err(FramingError::LineTooLong { max: 8192 })]);
        let mut huge = id[..id.len() - 3].to_vec();
        huge.extend_from_slice(&[b'v'; 10_000]);
        let out = frames(Limits::CLIENT_PREAUTH, &huge);
        assert_eq!(out, vec![Err(FramingError::LineTooLong { max: 40 * 1024 })], "still bounded");
    }

    #[test]
    fn debug_output_never_shows_client_bytes() {
        let mut framer = Framer::new(Limits::CLIENT_PREAUTH);
        framer.push(b"a LOGIN alice {6}\r\nsecret\r\nb LOGIN bob hunter2");
        let frame = framer.next_event();
        let shown = format!("{framer:?} {frame:?}");
        for secret in ["secret", "hunter2", "alice", "bob"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        let command = crate::imap::command::CommandBody::Authenticate {
            mechanism: "PLAIN".into(),
            initial_response: Some(b"AGFsaWNlAHNlY3JldA==".to_vec()),
        };
        assert!(!format!("{command:?}").contains("AGFsaWNl"), "{command:?}");
    }

    #[test]
    fn bare_lf_ends_a_line() {
        let out = frames(Limits::CLIENT_PREAUTH, b"a NOOP\nb NOOP\r\n");
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn long_line_without_crlf_is_fatal() {
        let mut framer = Framer::new(Limits::CLIENT_PREAUTH);
        for _ in 0..3 {
            framer.push(&[b'a'; 3000]);
            if let Some(result) = framer.next_event() {
                assert_eq!(result, Err(FramingError::LineTooLong { max: 8192 }));
                assert!(framer.buffered() == 0);
                framer.push(b"b NOOP\r\n");
                assert_eq!(framer.next_event(), None, "nothing after a fatal error");
                return;
            }
            assert!(framer.buffered() <= 8194);
        }
        panic!("9000 bytes without CRLF were accepted");
    }

    #[test]
    fn oversized_sync_literal_is_recoverable() {
        let out = frames(Limits::CLIENT_PREAUTH, b"a LOGIN {99999}\r\nb NOOP\r\n");
        assert_eq!(
            out[0],
            Err(FramingError::LiteralTooBig { first_line: b"a LOGIN {99999}".to_vec(), nonsync: false })
        );
        assert!(!out[0].as_ref().unwrap_err().is_fatal());
        assert_eq!(out[1], Ok(Event::Frame(Frame { fragments: vec![line("b NOOP")] })));
    }

    #[test]
    fn oversized_or_malformed_nonsync_literal_is_fatal() {
        for input in [
            &b"a LOGIN {4097+}\r\nxxxx\r\n"[..],
            b"a LOGIN {99999999999999999999999+}\r\n",
            b"a LOGIN {-1+}\r\n",
            b"a LOGIN {+}\r\n",
        ] {
            let out = frames(Limits::CLIENT_PREAUTH, input);
            assert_eq!(out.len(), 1, "{input:?}");
            let err = out[0].clone().unwrap_err();
            assert!(err.is_fatal() && matches!(err, FramingError::LiteralTooBig { nonsync: true, .. }));
        }
    }

    #[test]
    fn malformed_sync_lengths_are_left_to_the_parser() {
        for input in [&b"a LOGIN {-1}\r\n"[..], b"a LOGIN {18446744073709551616}\r\n", b"a LOGIN {x}\r\n"] {
            let out = frames(Limits::CLIENT_PREAUTH, input);
            assert!(
                matches!(&out[..], [Ok(Event::Frame(_))] | [Err(FramingError::LiteralTooBig { nonsync: false, .. })]),
                "{input:?}: {out:?}"
            );
        }
        // u64 overflow of a sync literal: not a number, so no continuation is offered.
        let out = frames(Limits::CLIENT_PREAUTH, b"a LOGIN {999999999999999999999}\r\n");
        assert!(matches!(&out[..], [Ok(Event::Frame(_))]));
    }

    #[test]
    fn too_many_literals_is_fatal() {
        let mut input = b"a ID (".to_vec();
        for _ in 0..9 {
            input.extend_from_slice(b"{1+}\r\nx ");
        }
        input.extend_from_slice(b")\r\n");
        let out = frames(Limits::CLIENT_PREAUTH, &input);
        assert_eq!(out.last(), Some(&Err(FramingError::TooManyLiterals { max: 8 })));
    }

    #[test]
    fn raw_line_ignores_announcements() {
        let mut framer = Framer::new(Limits::CLIENT_PREAUTH);
        framer.expect_raw_line();
        framer.push(b"abc{5}\r\n");
        assert_eq!(framer.next_event(), Some(Ok(Event::Frame(Frame { fragments: vec![line("abc{5}")] }))));
    }

    #[test]
    fn unprocessed_input_is_kept_for_the_relay() {
        let mut framer = Framer::new(Limits::CLIENT_PREAUTH);
        framer.push(b"a LOGIN u p\r\nb SELECT INBOX\r\nc NOOP");
        assert!(matches!(framer.next_event(), Some(Ok(Event::Frame(_)))));
        assert_eq!(framer.take_unprocessed(), b"b SELECT INBOX\r\nc NOOP");
    }

    /// Framing gives the same events however the input is split (a deterministic sweep of split points).
    #[test]
    fn chunking_does_not_change_frames() {
        let input: &[u8] = b"a1 LOGIN {5}\r\nalice \"p\\\"w\"\r\na2 ID (\"k\" {3+}\r\nv\r\n)\r\nx {70000}\r\na3 NOOP\n";
        let whole = frames(Limits::CLIENT_PREAUTH, input);
        for step in 1..input.len() {
            let mut framer = Framer::new(Limits::CLIENT_PREAUTH);
            let mut got = Vec::new();
            for chunk in input.chunks(step) {
                framer.push(chunk);
                got.extend(std::iter::from_fn(|| framer.next_event()));
            }
            assert_eq!(got, whole, "chunk size {step}");
        }
    }
}
