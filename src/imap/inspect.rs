//! Post-login inspection of the client's command stream, without buffering and without changing its
//! length: it finds where each command starts (following literals so that message data is never taken for
//! a command) and neutralises the two commands the proxy must not pass on after login:
//!
//! - `STARTTLS`: the client's TLS ends at the proxy; it is never forwarded (the backend sees an unknown
//!   command and answers `BAD`, in order, with the client's tag).
//! - `COMPRESS`: not advertised by the proxy; compressed streams would hide commands from it.
//!
//! The name is altered in place as its last byte goes by (`STARTTLS` becomes `STARTTL_`), so it works
//! however the stream is split into reads. Sans-IO: bytes in, bytes (altered in place) out.

/// Command names neutralised after login, upper-case, all 8 bytes long.
const BLOCKED: [&[u8; 8]; 2] = [b"STARTTLS", b"COMPRESS"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a command line.
    LineStart,
    /// In the tag.
    Tag,
    /// In the command name; `len` bytes so far, `candidates` bit i set while it still matches BLOCKED[i].
    Name { len: usize, candidates: u8 },
    /// In the arguments; tracks a trailing `{n}` / `{n+}` / `~{n}` announcement.
    Args { literal: Literal },
    /// Inside literal data.
    Data { remaining: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Literal {
    None,
    /// After `{`, with the digits so far.
    Open(u64),
    /// After `+` inside the braces.
    Plus(u64),
    /// After `}`: a literal of this length follows if the line ends here.
    Closed(u64),
}

/// Tracks the client's command stream after login.
#[derive(Debug, Clone)]
pub struct CommandGuard {
    state: State,
    neutralised: u64,
}

impl Default for CommandGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl CommandGuard {
    pub fn new() -> Self {
        Self {
            state: State::LineStart,
            neutralised: 0,
        }
    }

    /// How many commands were neutralised so far.
    pub fn neutralised(&self) -> u64 {
        self.neutralised
    }

    /// Scans bytes on their way to the backend, altering blocked command names in place.
    pub fn scan(&mut self, bytes: &mut [u8]) {
        let mut i = 0;
        while i < bytes.len() {
            if let State::Data { remaining } = self.state {
                let take = remaining.min((bytes.len() - i) as u64);
                i += take as usize;
                let left = remaining - take;
                self.state = if left == 0 {
                    State::Args { literal: Literal::None }
                } else {
                    State::Data { remaining: left }
                };
                continue;
            }
            let b = bytes[i];
            self.state = match self.state {
                State::LineStart | State::Tag if b == b'\n' => State::LineStart,
                State::LineStart => State::Tag,
                State::Tag if b == b' ' => State::Name {
                    len: 0,
                    candidates: (1 << BLOCKED.len()) - 1,
                },
                State::Tag => State::Tag,
                State::Name { len, candidates } => match b {
                    b'\n' => State::LineStart,
                    b' ' | b'\r' => State::Args { literal: Literal::None },
                    _ => {
                        let upper = b.to_ascii_uppercase();
                        let mut still = 0u8;
                        for (k, name) in BLOCKED.iter().enumerate() {
                            if candidates & (1 << k) != 0 && name.get(len) == Some(&upper) {
                                still |= 1 << k;
                            }
                        }
                        if still != 0 && len + 1 == 8 {
                            bytes[i] = b'_';
                            self.neutralised += 1;
                            still = 0;
                        }
                        State::Name {
                            len: len + 1,
                            candidates: still,
                        }
                    }
                },
                State::Args { literal } => match (b, literal) {
                    (b'\n', Literal::Closed(n)) if n > 0 => State::Data { remaining: n },
                    (b'\n', _) => State::LineStart,
                    (b'\r', Literal::Closed(n)) => State::Args {
                        literal: Literal::Closed(n),
                    },
                    (b'{', _) => State::Args {
                        literal: Literal::Open(0),
                    },
                    (d @ b'0'..=b'9', Literal::Open(n)) => State::Args {
                        literal: Literal::Open(n.saturating_mul(10).saturating_add(u64::from(d - b'0'))),
                    },
                    (b'+', Literal::Open(n)) => State::Args {
                        literal: Literal::Plus(n),
                    },
                    (b'}', Literal::Open(n) | Literal::Plus(n)) => State::Args {
                        literal: Literal::Closed(n),
                    },
                    _ => State::Args { literal: Literal::None },
                },
                // Consumed in bulk above.
                data @ State::Data { .. } => data,
            };
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(input: &[u8]) -> (String, u64) {
        let mut g = CommandGuard::new();
        let mut bytes = input.to_vec();
        g.scan(&mut bytes);
        (String::from_utf8_lossy(&bytes).into_owned(), g.neutralised())
    }

    #[test]
    fn starttls_and_compress_are_neutralised() {
        assert_eq!(guard(b"a STARTTLS\r\n"), ("a STARTTL_\r\n".into(), 1));
        assert_eq!(
            guard(b"a1 starttls\r\nb COMPRESS DEFLATE\r\n"),
            ("a1 starttl_\r\nb COMPRES_ DEFLATE\r\n".into(), 2)
        );
        assert_eq!(
            guard(b"a NOOP\r\nb SELECT STARTTLS\r\n"),
            ("a NOOP\r\nb SELECT STARTTLS\r\n".into(), 0)
        );
        assert_eq!(guard(b"a UID FETCH 1 (BODY[])\r\n").1, 0);
    }

    #[test]
    fn literal_data_is_not_taken_for_commands() {
        let input = b"a APPEND INBOX {21}\r\nx\r\nb STARTTLS\r\nyyyy\r\nc NOOP\r\n";
        assert_eq!(guard(input), (String::from_utf8_lossy(input).into_owned(), 0));
        let input = b"a APPEND INBOX {5+}\r\nhello {3}\r\nabc\r\nd STARTTLS\r\n";
        assert_eq!(
            guard(input).0,
            "a APPEND INBOX {5+}\r\nhello {3}\r\nabc\r\nd STARTTL_\r\n"
        );
        assert_eq!(guard(b"a APPEND INBOX ~{4}\r\n\0\0\0\0\r\nb COMPRESS\r\n").1, 1);
    }

    #[test]
    fn any_split_gives_the_same_result() {
        let input = b"a1 NOOP\r\na2 APPEND INBOX {12+}\r\nb STARTTLS\r\n\r\nc3 StartTLS\r\nd4 COMPRESS DEFLATE\r\n";
        let (whole, count) = guard(input);
        assert_eq!(count, 2);
        for split in 1..input.len() {
            let mut g = CommandGuard::new();
            let mut bytes = input.to_vec();
            let (a, b) = bytes.split_at_mut(split);
            g.scan(a);
            g.scan(b);
            assert_eq!(String::from_utf8_lossy(&bytes), whole, "split at {split}");
            assert_eq!(g.neutralised(), 2);
        }
    }
}
