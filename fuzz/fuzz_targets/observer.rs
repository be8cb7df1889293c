//! The post-login observer never panics, stays bounded, neutralises the same bytes however the client stream
//! is split, and, against a model of the backend, never lets a blocked command through: the model reads
//! what the observer releases exactly as an IMAP server would, answers every command, and answers each
//! synchronising literal with `+` or a tagged BAD as the fuzzer decides (a refused literal makes the bytes
//! behind it commands). A blocked name at the start of a command the model reads is a guard bypass.
#![no_main]

use std::time::Instant;

use imapgate::imap::inspect::{MAX_IN_FLIGHT, Observer};
use libfuzzer_sys::fuzz_target;

const BLOCKED: &[&[u8]] = &[b"STARTTLS", b"COMPRESS", b"UNAUTHENTICATE", b"AUTHENTICATE", b"LOGIN"];

/// The backend as the relay's client direction meets it.
struct Backend<'a> {
    decisions: &'a [u8],
    decided: usize,
    line: Vec<u8>,
    /// Bytes of literal data still to come.
    literal: u64,
    /// The line being read continues a command after a literal.
    continuation: bool,
    /// In IDLE, waiting for DONE: the command's tag.
    idling: Option<Vec<u8>>,
    tag: Vec<u8>,
    answers: Vec<u8>,
}

impl Backend<'_> {
    fn accept(&mut self) -> bool {
        let bit = self.decisions.get(self.decided / 8).map_or(true, |b| b >> (self.decided % 8) & 1 == 1);
        self.decided += 1;
        bit
    }

    fn feed(&mut self, bytes: &[u8]) {
        let mut i = 0;
        while i < bytes.len() {
            if self.literal > 0 {
                let n = self.literal.min((bytes.len() - i) as u64);
                self.literal -= n;
                i += n as usize;
                continue;
            }
            let b = bytes[i];
            i += 1;
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                self.line_end(&line);
            } else if self.line.len() < 1 << 16 {
                self.line.push(b);
            }
        }
    }

    fn answer(&mut self, tag: &[u8], text: &[u8]) {
        self.answers.extend_from_slice(tag);
        self.answers.extend_from_slice(text);
    }

    fn line_end(&mut self, raw: &[u8]) {
        let mut line = raw;
        while let [rest @ .., b'\r'] = line {
            line = rest;
        }
        if let Some(tag) = self.idling.take() {
            let text: &[u8] = if line.eq_ignore_ascii_case(b"DONE") {
                b" OK Idle completed.\r\n"
            } else {
                b" BAD Expected DONE.\r\n"
            };
            self.answer(&tag, text);
            return;
        }
        if !self.continuation {
            let mut words = line.splitn(3, |&b| b == b' ');
            self.tag = words.next().unwrap_or_default().to_vec();
            let name = words.next().unwrap_or_default();
            if self.tag.is_empty() {
                // As Dovecot: no tag, no command; the line (announcement included) is skipped.
                self.answers.extend_from_slice(b"* BAD Invalid tag.\r\n");
                return;
            }
            for blocked in BLOCKED {
                assert!(
                    !name.eq_ignore_ascii_case(blocked),
                    "{} reached the backend",
                    String::from_utf8_lossy(blocked)
                );
            }
            if name.eq_ignore_ascii_case(b"IDLE") {
                self.idling = Some(self.tag.clone());
                self.answers.extend_from_slice(b"+ idling\r\n");
                return;
            }
        }
        match literal(line) {
            Some((length, false)) => {
                self.literal = length;
                self.continuation = true;
            }
            Some((length, true)) if self.accept() => {
                self.answers.extend_from_slice(b"+ OK\r\n");
                self.literal = length;
                self.continuation = true;
            }
            Some((_, true)) => {
                let tag = self.tag.clone();
                self.answer(&tag, b" BAD Literal refused.\r\n");
                self.continuation = false;
            }
            None => {
                let tag = self.tag.clone();
                self.answer(&tag, b" OK done\r\n");
                self.continuation = false;
            }
        }
    }
}

/// `{n}` (synchronising: true) or `{n+}` at the end of a line.
fn literal(line: &[u8]) -> Option<(u64, bool)> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let digits = &inner[open + 1..];
    let (digits, sync) = match digits.strip_suffix(b"+") {
        Some(d) => (d, false),
        None => (digits, true),
    };
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let length = digits.iter().fold(0u64, |n, d| n.saturating_mul(10).saturating_add(u64::from(d - b'0')));
    Some((length, sync))
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let (client, decisions) = rest.split_at(rest.len() * 3 / 4);
    let now = Instant::now();
    let step = usize::from(split).max(1);

    // Neutralising does not depend on the split (with a backend that accepts every literal).
    let run = |step: usize| {
        let mut bytes = client.to_vec();
        let mut o = Observer::new();
        let mut pos = 0;
        for _ in 0..client.len() * 2 + 2 {
            if pos == bytes.len() {
                break;
            }
            let end = (pos + step).min(bytes.len());
            pos += o.client(&mut bytes[pos..end], now);
            if o.holding() {
                o.server(b"+ go\r\n", now);
            }
        }
        bytes
    };
    assert_eq!(run(step), run(client.len().max(1)), "neutralising depends on how the stream is split");

    // Against the backend model.
    let mut o = Observer::new();
    let mut backend = Backend {
        decisions,
        decided: 0,
        line: Vec::new(),
        literal: 0,
        continuation: false,
        idling: None,
        tag: Vec::new(),
        answers: Vec::new(),
    };
    let mut bytes = client.to_vec();
    let mut pos = 0;
    for _ in 0..client.len() * 4 + 4 {
        let end = (pos + step).min(bytes.len());
        let released = o.client(&mut bytes[pos..end], now);
        backend.feed(&bytes[pos..pos + released]);
        pos += released;
        let answers = std::mem::take(&mut backend.answers);
        if !answers.is_empty() {
            o.server(&answers, now);
        } else if released == 0 {
            break;
        }
        if o.guard_lost() {
            return;
        }
    }
    let done = o.finish(now);
    assert!(done.len() <= MAX_IN_FLIGHT + client.len());
});
