//! Post-login inspection, beside the relay and without buffering: the relay copies bytes unchanged (but
//! for the two names below), and this observer reads both directions to learn each command's name, tag,
//! tagged status and latency, following literals (`{n}`, `{n+}`, `~{n}`) so that message data is never
//! taken for a command or a response (a body holding `\r\na1 OK\r\n` is data).
//!
//! It also neutralises the commands that change the authentication or the transport state, which the proxy
//! must never pass on after login, altering the name in place as its last byte goes by, so that it works
//! however the stream is split (the backend then answers `BAD`, in order, with the tag):
//! - `STARTTLS`: the client's TLS ends at the proxy;
//! - `COMPRESS`: not advertised by the proxy; compressed streams would hide commands from it;
//! - `UNAUTHENTICATE` (RFC 8437), `AUTHENTICATE`, `LOGIN`: a client back in the not-authenticated state
//!   inside the relay could guess passwords past the defence, the tarpit and the audit log, and send an
//!   `ID` with `x-originating-ip` that the backend trusts from the proxy.
//!
//! Bytes behind a command that waits for the backend's continuation (a synchronising literal `{n}`, `IDLE`)
//! are held, not forwarded: until the backend says `+`, nobody knows whether they are literal data or the
//! next command (a refused literal is answered with a tagged `BAD` or `NO` and the backend reads what follows
//! as commands). [`Observer::client`] says how many bytes may go; the relay keeps the rest and offers them
//! again once [`Observer::holding`] is false, so they are read exactly as the backend will read them.
//!
//! Beside names and statuses it keeps what the mailbox signals need (see `mailbox`): the first line's
//! arguments of each command (bounded), the tagged response's code, `* n EXISTS`, the mailbox selected and
//! the literal bytes a whole-body `FETCH` brings.
//!
//! Memory is bounded: tags, names, arguments and codes are truncated, at most [`MAX_IN_FLIGHT`] commands are
//! tracked; beyond that, or on anything it cannot follow, the observer stops observing (the relay goes on)
//! and says so.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::mailbox::{self, Intent};

/// Command names neutralised after login, upper-case (at most 8 of them: a bit each in a `u8`).
const BLOCKED: [&[u8]; 5] = [b"STARTTLS", b"COMPRESS", b"UNAUTHENTICATE", b"AUTHENTICATE", b"LOGIN"];
/// Commands tracked at once; more means the observer gives up on the session.
pub const MAX_IN_FLIGHT: usize = 128;
const MAX_TAG: usize = 64;
const MAX_NAME: usize = 24;
/// The part of a command's first line kept after its name (enough for a mailbox name and fetch items).
const MAX_ARGS: usize = 256;
/// The start of a response's text kept after its status (a response code, or `EXISTS`).
const MAX_REST: usize = 24;

/// Labels for metrics: a fixed list, so label cardinality stays bounded whatever clients send.
const COMMANDS: &[&str] = &[
    "APPEND",
    "AUTHENTICATE",
    "CAPABILITY",
    "CHECK",
    "CLOSE",
    "COMPRESS",
    "COPY",
    "CREATE",
    "DELETE",
    "DELETEACL",
    "ENABLE",
    "ESEARCH",
    "EXAMINE",
    "EXPUNGE",
    "FETCH",
    "GETACL",
    "GETMETADATA",
    "GETQUOTA",
    "GETQUOTAROOT",
    "ID",
    "IDLE",
    "LIST",
    "LISTRIGHTS",
    "LOGIN",
    "LOGOUT",
    "LSUB",
    "MOVE",
    "MYRIGHTS",
    "NAMESPACE",
    "NOOP",
    "NOTIFY",
    "RENAME",
    "REPLACE",
    "SEARCH",
    "SELECT",
    "SETACL",
    "SETMETADATA",
    "SETQUOTA",
    "SORT",
    "STARTTLS",
    "STATUS",
    "STORE",
    "SUBSCRIBE",
    "THREAD",
    "UNAUTHENTICATE",
    "UNSELECT",
    "UNSUBSCRIBE",
    "XLIST",
];
const UID_COMMANDS: &[&str] = &[
    "UID COPY",
    "UID EXPUNGE",
    "UID FETCH",
    "UID MOVE",
    "UID REPLACE",
    "UID SEARCH",
    "UID SORT",
    "UID STORE",
    "UID THREAD",
];

/// The label for a command name (and the UID subcommand), `other` for anything unknown.
pub fn command_label(name: &[u8], sub: &[u8]) -> &'static str {
    let upper = |b: &[u8]| String::from_utf8_lossy(b).to_ascii_uppercase();
    let name = upper(name);
    if name == "UID" {
        let full = format!("UID {}", upper(sub));
        return UID_COMMANDS.iter().find(|c| **c == full).copied().unwrap_or("other");
    }
    COMMANDS.iter().find(|c| **c == name).copied().unwrap_or("other")
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    No,
    Bad,
    /// The session ended before the tagged response.
    None,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::No => "NO",
            Status::Bad => "BAD",
            Status::None => "none",
        }
    }
}

/// A finished command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    pub command: &'static str,
    pub status: Status,
    pub elapsed: Duration,
    /// The tagged response's code, by `mailbox::code_label` (`None` without one).
    pub code: Option<&'static str>,
    pub detail: Detail,
}

/// What a finished command did to mailboxes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Detail {
    #[default]
    None,
    /// A `SELECT`/`EXAMINE`, with the `EXISTS` it reported.
    Selected { mailbox: Option<String>, exists: Option<u64> },
    /// A whole-body `FETCH` in the selected mailbox: of every message (`1:*`) or not, and its literal bytes.
    BodyFetch { mailbox: Option<String>, exists: Option<u64>, full_range: bool, bytes: u64 },
}

/// A command in flight.
#[derive(Debug)]
struct InFlight {
    tag: Vec<u8>,
    label: &'static str,
    at: Instant,
    intent: Intent,
    /// `EXISTS` seen while it ran (a SELECT's size).
    exists: Option<u64>,
    /// Literal bytes of the responses while it ran (a whole-body FETCH).
    bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Literal {
    None,
    Open(u64),
    Plus(u64),
    Closed { length: u64, sync: bool },
}

impl Literal {
    /// Follows `{digits[+]}` at the end of a line; anything else resets.
    fn step(self, b: u8) -> Literal {
        match (b, self) {
            (b'{', _) => Literal::Open(0),
            (d @ b'0'..=b'9', Literal::Open(n)) => {
                Literal::Open(n.saturating_mul(10).saturating_add(u64::from(d - b'0')))
            }
            (b'+', Literal::Open(n)) => Literal::Plus(n),
            (b'}', Literal::Open(n)) => Literal::Closed { length: n, sync: true },
            (b'}', Literal::Plus(n)) => Literal::Closed { length: n, sync: false },
            (b'\r', closed @ Literal::Closed { .. }) => closed,
            _ => Literal::None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    LineStart,
    Tag,
    /// In the command name; `candidates` bit k set while it still matches BLOCKED[k].
    Name {
        candidates: u8,
    },
    /// After `UID `, in the subcommand.
    Sub,
    Args,
    Data {
        remaining: u64,
    },
}

/// A command waiting for the backend's continuation.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Awaiting {
    tag: Vec<u8>,
    /// Earlier commands in flight with the same tag: their tagged responses come first.
    earlier_same_tag: usize,
    /// The in-flight count was lost (too many commands), so a tagged response is ambiguous.
    blind: bool,
    /// A literal (refusal: what follows is a command) or IDLE (refusal: nothing changes).
    literal: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerState {
    LineStart,
    Tag,
    Status,
    Rest,
    Data { remaining: u64 },
}

/// The observer for one relayed session.
#[derive(Debug)]
pub struct Observer {
    client: ClientState,
    client_literal: Literal,
    /// The first line of the command being read: tag, name and UID subcommand (truncated).
    tag: Vec<u8>,
    name: Vec<u8>,
    sub: Vec<u8>,
    /// The current command was counted (at the end of its first line).
    registered: bool,
    /// A synchronising literal or `IDLE` waits for the backend's `+` (or a tagged refusal); client bytes
    /// behind it are held.
    awaiting_continuation: Option<Awaiting>,
    /// A tagged response could not be told apart from the one a held command waits for (the observer lost
    /// count of in-flight tags): the guard cannot follow the stream any more and the session must end.
    guard_lost: bool,
    logout_sent: bool,
    bye_seen: bool,
    server: ServerState,
    server_literal: Literal,
    server_tag: Vec<u8>,
    server_status: Vec<u8>,
    in_flight: VecDeque<InFlight>,
    /// The first line's arguments of the command being read (bounded).
    args: Vec<u8>,
    /// The start of the response line's text after its status (bounded).
    server_rest: Vec<u8>,
    /// The mailbox selected, and its last `EXISTS`.
    selected: Option<String>,
    exists: Option<u64>,
    completed: Vec<Completed>,
    neutralised: u64,
    commands: u64,
    desynced: bool,
}

impl Default for Observer {
    fn default() -> Self {
        Self::new()
    }
}

impl Observer {
    pub fn new() -> Self {
        Self {
            client: ClientState::LineStart,
            client_literal: Literal::None,
            tag: Vec::new(),
            name: Vec::new(),
            sub: Vec::new(),
            registered: false,
            awaiting_continuation: None,
            guard_lost: false,
            logout_sent: false,
            bye_seen: false,
            server: ServerState::LineStart,
            server_literal: Literal::None,
            server_tag: Vec::new(),
            server_status: Vec::new(),
            in_flight: VecDeque::new(),
            args: Vec::new(),
            server_rest: Vec::new(),
            selected: None,
            exists: None,
            completed: Vec::new(),
            neutralised: 0,
            commands: 0,
            desynced: false,
        }
    }

    /// Commands neutralised (STARTTLS, COMPRESS).
    pub fn neutralised(&self) -> u64 {
        self.neutralised
    }

    /// Commands seen from the client.
    pub fn commands(&self) -> u64 {
        self.commands
    }

    /// Whether the observer gave up on this session.
    pub fn desynced(&self) -> bool {
        self.desynced
    }

    /// Client bytes are held until the backend answers a command that waits for its continuation.
    pub fn holding(&self) -> bool {
        self.awaiting_continuation.is_some()
    }

    /// The guard can no longer tell how the backend reads the client's bytes; the session must end.
    pub fn guard_lost(&self) -> bool {
        self.guard_lost
    }

    /// The client sent `LOGOUT`.
    pub fn logout_sent(&self) -> bool {
        self.logout_sent
    }

    /// The backend sent an untagged `BYE`.
    pub fn bye_seen(&self) -> bool {
        self.bye_seen
    }

    /// The command started last among those in flight.
    pub fn latest(&self) -> Option<&'static str> {
        self.in_flight.back().map(|c| c.label)
    }

    /// The client is in `IDLE`.
    pub fn idling(&self) -> bool {
        self.in_flight.iter().any(|c| c.label == "IDLE")
    }

    /// The backend's stream is between responses: a line of the proxy's own (`* BYE`) would not land
    /// inside a response or a literal.
    pub fn at_response_boundary(&self) -> bool {
        self.server == ServerState::LineStart
    }

    /// Nothing is under way that a `* BYE` and a close would cut: both streams are between lines (no
    /// response, command or literal half sent) and no command but IDLE waits for its answer. Where a
    /// leaving process ends a session, so that a FETCH or an APPEND under way always completes.
    pub fn quiet(&self) -> bool {
        self.server == ServerState::LineStart
            && self.client == ClientState::LineStart
            && self.awaiting_continuation.is_none()
            && self.in_flight.iter().all(|c| c.label == "IDLE")
    }

    /// Commands finished since the last call.
    pub fn drain(&mut self) -> std::vec::Drain<'_, Completed> {
        self.completed.drain(..)
    }

    /// Gives back the spare capacity of the observer's buffers (kept as they are: only capacity beyond
    /// what they hold is freed). The relay calls it when the session goes quiet, so that an idle session
    /// does not keep the buffers its last commands grew.
    pub fn release_idle(&mut self) {
        self.completed.shrink_to_fit();
        self.in_flight.shrink_to_fit();
        for buffer in [
            &mut self.tag,
            &mut self.name,
            &mut self.sub,
            &mut self.server_tag,
            &mut self.server_status,
            &mut self.args,
            &mut self.server_rest,
        ] {
            buffer.shrink_to_fit();
        }
    }

    /// At session end: commands without a tagged response get status `none`.
    pub fn finish(&mut self, now: Instant) -> Vec<Completed> {
        let mut out: Vec<Completed> = self.completed.drain(..).collect();
        out.extend(self.in_flight.drain(..).map(|c| Completed {
            command: c.label,
            status: Status::None,
            elapsed: now.duration_since(c.at),
            code: None,
            detail: Detail::None,
        }));
        out
    }

    fn desync(&mut self) {
        self.desynced = true;
        self.in_flight.clear();
    }

    /// Bytes from the client on their way to the backend; blocked command names are altered in place.
    /// Returns how many of them may be forwarded now: the rest follows a command that waits for the
    /// backend's continuation and must be offered again (unchanged, from its start) once
    /// [`Observer::holding`] is false. The neutralising goes on even after the observer lost sync for
    /// metrics.
    pub fn client(&mut self, bytes: &mut [u8], now: Instant) -> usize {
        let mut i = 0;
        while i < bytes.len() {
            if self.awaiting_continuation.is_some() {
                return i;
            }
            if let ClientState::Data { remaining } = self.client {
                let (taken, left) = skip_literal(remaining, bytes.len() - i);
                i += taken;
                self.client = if left == 0 { ClientState::Args } else { ClientState::Data { remaining: left } };
                continue;
            }
            let b = bytes[i];
            if b == b'\n' {
                self.client_line_end(now);
                i += 1;
                continue;
            }
            self.client_literal = self.client_literal.step(b);
            self.client = match self.client {
                ClientState::LineStart => {
                    self.tag.clear();
                    self.name.clear();
                    self.sub.clear();
                    self.args.clear();
                    self.registered = false;
                    push_bounded(&mut self.tag, b, MAX_TAG);
                    ClientState::Tag
                }
                ClientState::Tag if b == b' ' => ClientState::Name { candidates: (1 << BLOCKED.len()) - 1 },
                ClientState::Tag => {
                    push_bounded(&mut self.tag, b, MAX_TAG);
                    ClientState::Tag
                }
                ClientState::Name { .. } if b == b' ' && self.name.eq_ignore_ascii_case(b"UID") => ClientState::Sub,
                ClientState::Name { .. } if b == b' ' || b == b'\r' => ClientState::Args,
                ClientState::Name { candidates } => {
                    let len = self.name.len();
                    push_bounded(&mut self.name, b, MAX_NAME);
                    let upper = b.to_ascii_uppercase();
                    let mut still = 0u8;
                    for (k, name) in BLOCKED.iter().enumerate() {
                        if candidates & (1 << k) != 0 && name.get(len) == Some(&upper) {
                            still |= 1 << k;
                        }
                    }
                    let complete =
                        BLOCKED.iter().enumerate().any(|(k, name)| still & (1 << k) != 0 && name.len() == len + 1);
                    if complete {
                        bytes[i] = b'_';
                        self.neutralised += 1;
                        still = 0;
                    }
                    ClientState::Name { candidates: still }
                }
                ClientState::Sub if b == b' ' || b == b'\r' => ClientState::Args,
                ClientState::Sub => {
                    push_bounded(&mut self.sub, b, MAX_NAME);
                    ClientState::Sub
                }
                ClientState::Args => {
                    if !self.registered {
                        push_bounded(&mut self.args, b, MAX_ARGS);
                    }
                    ClientState::Args
                }
                data @ ClientState::Data { .. } => data,
            };
            i += 1;
        }
        i
    }

    /// A command now waits for the backend's continuation: hold what follows.
    fn await_continuation(&mut self, literal: bool) {
        let same_tag = self.in_flight.iter().filter(|c| c.tag == self.tag).count();
        self.awaiting_continuation = Some(Awaiting {
            tag: self.tag.clone(),
            // The waiting command itself is in flight once its name was read.
            earlier_same_tag: same_tag.saturating_sub(usize::from(self.registered)),
            blind: self.desynced,
            literal,
        });
    }

    fn client_line_end(&mut self, now: Instant) {
        // A command is counted when its first line ends (lines like IDLE's DONE or SASL answers have no
        // name and are not commands); its latency runs from there to the tagged response.
        let mut idle = false;
        if !self.registered && !self.name.is_empty() && !matches!(self.client, ClientState::LineStart) {
            self.registered = true;
            self.commands += 1;
            let label = command_label(&self.name, &self.sub);
            self.logout_sent |= label == "LOGOUT";
            idle = label == "IDLE";
            if !self.desynced {
                if self.in_flight.len() >= MAX_IN_FLIGHT {
                    self.desync();
                } else {
                    let intent = mailbox::intent(label, &self.args);
                    self.in_flight.push_back(InFlight {
                        tag: self.tag.clone(),
                        label,
                        at: now,
                        intent,
                        exists: None,
                        bytes: 0,
                    });
                }
            }
        }
        if let Literal::Closed { length, sync } = self.client_literal {
            self.client_literal = Literal::None;
            if sync {
                self.await_continuation(true);
            }
            self.client = if length > 0 { ClientState::Data { remaining: length } } else { ClientState::Args };
            return;
        }
        self.client_literal = Literal::None;
        self.client = ClientState::LineStart;
        if idle {
            // What follows IDLE is `DONE` once the backend said `+`; if it refuses, a command.
            self.await_continuation(false);
        }
    }

    /// Bytes from the backend on their way to the client.
    pub fn server(&mut self, bytes: &[u8], now: Instant) {
        let mut i = 0;
        while i < bytes.len() {
            if let ServerState::Data { remaining } = self.server {
                let (taken, left) = skip_literal(remaining, bytes.len() - i);
                i += taken;
                self.server = if left == 0 { ServerState::Rest } else { ServerState::Data { remaining: left } };
                continue;
            }
            let b = bytes[i];
            i += 1;
            if b == b'\n' {
                self.server_line_end(now);
                continue;
            }
            self.server_literal = self.server_literal.step(b);
            self.server = match self.server {
                ServerState::LineStart => {
                    self.server_tag.clear();
                    self.server_status.clear();
                    self.server_rest.clear();
                    push_bounded(&mut self.server_tag, b, MAX_TAG);
                    ServerState::Tag
                }
                ServerState::Tag if b == b' ' => ServerState::Status,
                ServerState::Tag => {
                    push_bounded(&mut self.server_tag, b, MAX_TAG);
                    ServerState::Tag
                }
                ServerState::Status if b == b' ' || b == b'\r' => ServerState::Rest,
                ServerState::Status => {
                    push_bounded(&mut self.server_status, b, 8);
                    ServerState::Status
                }
                ServerState::Rest => {
                    push_bounded(&mut self.server_rest, b, MAX_REST);
                    ServerState::Rest
                }
                data @ ServerState::Data { .. } => data,
            };
        }
    }

    /// The response code at the start of the text (`[OVERQUOTA] ...`), by label.
    fn response_code(&self) -> Option<&'static str> {
        let rest = self.server_rest.strip_prefix(b"[")?;
        let end = rest.iter().position(|&b| b == b']' || b == b' ').unwrap_or(rest.len());
        (end > 0).then(|| mailbox::code_label(&rest[..end]))
    }

    fn server_line_end(&mut self, now: Instant) {
        if let Literal::Closed { length, .. } = self.server_literal {
            self.server_literal = Literal::None;
            if let Some(fetch) = self.in_flight.iter_mut().find(|c| matches!(c.intent, Intent::BodyFetch { .. })) {
                fetch.bytes = fetch.bytes.saturating_add(length);
            }
            self.server = if length > 0 { ServerState::Data { remaining: length } } else { ServerState::Rest };
            return;
        }
        self.server_literal = Literal::None;
        self.server = ServerState::LineStart;
        if self.server_tag == b"+" {
            // The continuation the client waited for: its literal (or DONE) follows.
            self.awaiting_continuation = None;
            return;
        }
        if self.server_tag == b"*" {
            self.bye_seen |= self.server_status.eq_ignore_ascii_case(b"BYE");
            let word = self.server_rest.split(|&b| b == b' ' || b == b'\r').next().unwrap_or_default();
            if word.eq_ignore_ascii_case(b"EXISTS") {
                if let Some(n) = std::str::from_utf8(&self.server_status).ok().and_then(|n| n.parse::<u64>().ok()) {
                    self.exists = Some(n);
                    for select in self.in_flight.iter_mut().filter(|c| matches!(c.intent, Intent::Select { .. })) {
                        select.exists = Some(n);
                    }
                }
            }
            return;
        }
        if self.server_tag.is_empty() {
            return;
        }
        let status = if self.server_status.eq_ignore_ascii_case(b"OK") {
            Status::Ok
        } else if self.server_status.eq_ignore_ascii_case(b"NO") {
            Status::No
        } else if self.server_status.eq_ignore_ascii_case(b"BAD") {
            Status::Bad
        } else {
            return;
        };
        if let Some(awaiting) = &mut self.awaiting_continuation {
            if awaiting.tag == self.server_tag {
                if awaiting.blind {
                    // Which command this answers is unknown: the backend may read the held bytes either way.
                    self.guard_lost = true;
                } else if awaiting.earlier_same_tag > 0 {
                    awaiting.earlier_same_tag -= 1;
                } else {
                    // Refused: the backend reads what follows as commands, and so does the observer.
                    if awaiting.literal {
                        self.client = ClientState::LineStart;
                        self.client_literal = Literal::None;
                    }
                    self.awaiting_continuation = None;
                }
            }
        }
        if let Some(pos) = self.in_flight.iter().position(|c| c.tag == self.server_tag) {
            if let Some(done) = self.in_flight.remove(pos) {
                let detail = self.detail(done.intent, done.exists, done.bytes, status);
                self.completed.push(Completed {
                    command: done.label,
                    status,
                    elapsed: now.duration_since(done.at),
                    code: self.response_code(),
                    detail,
                });
            }
        }
    }
}

impl Observer {
    /// A finished command's effect on mailboxes; a SELECT's outcome changes the selected mailbox.
    fn detail(&mut self, intent: Intent, exists: Option<u64>, bytes: u64, status: Status) -> Detail {
        match intent {
            Intent::Select { mailbox } => {
                // A failed SELECT leaves no mailbox selected (RFC 9051 6.3.2).
                self.selected = if status == Status::Ok { mailbox.clone() } else { None };
                self.exists = if status == Status::Ok { exists } else { None };
                Detail::Selected { mailbox, exists }
            }
            Intent::BodyFetch { full_range } => {
                Detail::BodyFetch { mailbox: self.selected.clone(), exists: self.exists, full_range, bytes }
            }
            Intent::Other => Detail::None,
        }
    }
}

/// Literal data is passed over in bulk: of `available` bytes, how many belong to a literal with
/// `remaining` bytes to go, and how many it still has after them.
fn skip_literal(remaining: u64, available: usize) -> (usize, u64) {
    let taken = remaining.min(available as u64);
    (taken as usize, remaining - taken)
}

fn push_bounded(buf: &mut Vec<u8>, b: u8, max: usize) {
    if buf.len() < max {
        buf.push(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds the client's bytes as the relay does: whenever the observer holds, the backend answers one line
    /// of `server` (or, once that is used up, accepts with `+`). Returns the bytes as forwarded.
    fn converse(o: &mut Observer, client: &[u8], server: &[u8]) -> Vec<u8> {
        let t = Instant::now();
        let mut bytes = client.to_vec();
        let mut lines = server.split_inclusive(|b| *b == b'\n');
        let mut pos = 0;
        for _ in 0..10_000 {
            pos += o.client(&mut bytes[pos..], t);
            if pos == bytes.len() {
                break;
            }
            assert!(o.holding(), "stopped at {pos} without holding");
            o.server(lines.next().unwrap_or(b"+ go\r\n"), t);
        }
        for line in lines {
            o.server(line, t);
        }
        bytes
    }

    fn guard(input: &[u8]) -> (String, u64) {
        let mut o = Observer::new();
        let bytes = converse(&mut o, input, b"");
        (String::from_utf8_lossy(&bytes).into_owned(), o.neutralised())
    }

    #[test]
    fn releasing_idle_capacity_changes_nothing_the_observer_reports() {
        let run = |release: bool| {
            let t = Instant::now();
            let mut o = Observer::new();
            let mut report = Vec::new();
            let exchanges: [(&[u8], &[u8]); 3] = [
                (b"a1 SELECT INBOX\r\n", b"* 12 EXISTS\r\na1 OK [READ-WRITE] done\r\n"),
                (b"a2 UID FETCH 1:* (FLAGS)\r\n", b"* 1 FETCH (UID 4 FLAGS ())\r\na2 OK done\r\n"),
                (b"a3 IDLE\r\n", b"+ idling\r\n"),
            ];
            for (command, reply) in exchanges {
                let mut command = command.to_vec();
                assert_eq!(o.client(&mut command, t), command.len());
                o.server(reply, t);
                report.extend(o.drain().map(|c| (c.command, c.status, c.detail)));
                if release {
                    o.release_idle();
                    assert!(o.completed.capacity() == 0 && o.args.capacity() <= o.args.len());
                }
            }
            (report, o.commands(), o.idling(), o.latest())
        };
        assert_eq!(run(true), run(false));
    }

    #[test]
    fn starttls_and_compress_are_neutralised() {
        assert_eq!(guard(b"a STARTTLS\r\n"), ("a STARTTL_\r\n".into(), 1));
        assert_eq!(
            guard(b"a1 starttls\r\nb COMPRESS DEFLATE\r\n"),
            ("a1 starttl_\r\nb COMPRES_ DEFLATE\r\n".into(), 2)
        );
        assert_eq!(guard(b"a NOOP\r\nb SELECT STARTTLS\r\n"), ("a NOOP\r\nb SELECT STARTTLS\r\n".into(), 0));
        assert_eq!(guard(b"a UID FETCH 1 (BODY[])\r\n").1, 0);
    }

    #[test]
    fn commands_that_change_the_authentication_state_are_neutralised() {
        assert_eq!(guard(b"a UNAUTHENTICATE\r\n"), ("a UNAUTHENTICAT_\r\n".into(), 1));
        assert_eq!(guard(b"b authenticate PLAIN\r\n"), ("b authenticat_ PLAIN\r\n".into(), 1));
        assert_eq!(guard(b"c LOGIN victim guess\r\n"), ("c LOGI_ victim guess\r\n".into(), 1));
        assert_eq!(guard(b"d UID AUTHENTICATE\r\n").1, 0, "only the command name counts");
        let harmless = b"e LOGOUT\r\nf LIST \"\" LOGIN\r\ng SELECT AUTHENTICATE\r\n";
        assert_eq!(guard(harmless), (String::from_utf8_lossy(harmless).into_owned(), 0));
    }

    #[test]
    fn literal_data_is_not_taken_for_commands() {
        let input = b"a APPEND INBOX {21}\r\nx\r\nb STARTTLS\r\nyyyy\r\nc NOOP\r\n";
        assert_eq!(guard(input), (String::from_utf8_lossy(input).into_owned(), 0));
        let input = b"a APPEND INBOX {5+}\r\nhello {3}\r\nabc\r\nd STARTTLS\r\n";
        assert_eq!(guard(input).0, "a APPEND INBOX {5+}\r\nhello {3}\r\nabc\r\nd STARTTL_\r\n");
        assert_eq!(guard(b"a APPEND INBOX ~{4}\r\n\0\0\0\0\r\nb COMPRESS\r\n").1, 1);
    }

    #[test]
    fn any_split_gives_the_same_result() {
        let input = b"a1 NOOP\r\na2 APPEND INBOX {12+}\r\nb STARTTLS\r\n\r\nc3 StartTLS\r\nd4 COMPRESS DEFLATE\r\n";
        let (whole, count) = guard(input);
        assert_eq!(count, 2);
        for split in 1..input.len() {
            let mut o = Observer::new();
            let mut bytes = input.to_vec();
            let (a, b) = bytes.split_at_mut(split);
            o.client(a, Instant::now());
            o.client(b, Instant::now());
            assert_eq!(String::from_utf8_lossy(&bytes), whole, "split at {split}");
            assert_eq!(o.neutralised(), 2);
        }
    }

    fn run(client: &[u8], server: &[u8]) -> Vec<(&'static str, Status)> {
        let mut o = Observer::new();
        converse(&mut o, client, server);
        o.finish(Instant::now()).into_iter().map(|c| (c.command, c.status)).collect()
    }

    #[test]
    fn commands_and_statuses() {
        let got = run(
            b"a1 SELECT INBOX\r\na2 UID FETCH 1:* (FLAGS)\r\na3 uid store 1 +FLAGS (\\Seen)\r\na4 XYZZY\r\na5 NOOP\r\n",
            b"* 3 EXISTS\r\na1 OK [READ-WRITE] done\r\n* 1 FETCH (FLAGS ())\r\na2 OK done\r\na3 NO nope\r\na4 BAD what\r\n",
        );
        assert_eq!(
            got,
            vec![
                ("SELECT", Status::Ok),
                ("UID FETCH", Status::Ok),
                ("UID STORE", Status::No),
                ("other", Status::Bad),
                ("NOOP", Status::None)
            ]
        );
    }

    #[test]
    fn a_literal_holding_a_tagged_response_is_data() {
        let body = b"Subject: x\r\n\r\na1 OK faked\r\n";
        let mut server = format!("* 1 FETCH (BODY[] {{{}}}\r\n", body.len()).into_bytes();
        server.extend_from_slice(body);
        server.extend_from_slice(b")\r\na1 OK real\r\n");
        let mut o = Observer::new();
        let t0 = Instant::now();
        o.client(&mut b"a1 FETCH 1 BODY[]\r\n".to_vec(), t0);
        // Feed the response one byte at a time: the literal must be skipped across reads.
        for b in &server[..server.len() - 12] {
            o.server(std::slice::from_ref(b), t0);
        }
        assert_eq!(o.drain().count(), 0, "the faked OK inside the literal completed the command");
        o.server(&server[server.len() - 12..], t0 + Duration::from_millis(5));
        let done: Vec<_> = o.drain().collect();
        assert_eq!(
            done,
            vec![Completed {
                command: "FETCH",
                status: Status::Ok,
                elapsed: Duration::from_millis(5),
                code: None,
                detail: Detail::BodyFetch { mailbox: None, exists: None, full_range: false, bytes: 27 },
            }]
        );
    }

    #[test]
    fn idle_is_one_command_and_done_is_not_a_command() {
        let got =
            run(b"i1 IDLE\r\nDONE\r\ni2 NOOP\r\n", b"+ idling\r\n* 4 EXISTS\r\ni1 OK Idle completed\r\ni2 OK\r\n");
        assert_eq!(got, vec![("IDLE", Status::Ok), ("NOOP", Status::Ok)]);
    }

    #[test]
    fn refused_synchronising_literal_does_not_desync() {
        let mut o = Observer::new();
        let t = Instant::now();
        o.client(&mut b"a1 APPEND INBOX {99999999}\r\n".to_vec(), t);
        o.server(b"a1 NO [TOOBIG] too big\r\n", t);
        // The client never sends the literal and goes on with its next command.
        o.client(&mut b"a2 STARTTLS\r\na3 NOOP\r\n".to_vec(), t);
        o.server(b"a2 BAD unknown\r\na3 OK\r\n", t);
        let got: Vec<_> = o.finish(t).into_iter().map(|c| (c.command, c.status)).collect();
        assert_eq!(got, vec![("APPEND", Status::No), ("STARTTLS", Status::Bad), ("NOOP", Status::Ok)]);
        assert_eq!(o.neutralised(), 1);
    }

    #[test]
    fn bytes_behind_a_refused_literal_are_read_as_commands() {
        // The backend refuses the literal with BAD and reads the next line as a command: so does the guard.
        let mut o = Observer::new();
        let sent = converse(&mut o, b"a1 XYZZY {21}\r\nb1 COMPRESS DEFLATE\r\n", b"a1 BAD Unknown command\r\n");
        assert_eq!(sent, b"a1 XYZZY {21}\r\nb1 COMPRES_ DEFLATE\r\n");
        // Accepted with `+`, the same bytes are literal data and pass unchanged.
        let mut o = Observer::new();
        let sent = converse(&mut o, b"a1 APPEND INBOX {21}\r\nb1 COMPRESS DEFLATE\r\n", b"+ OK\r\n");
        assert_eq!(sent, b"a1 APPEND INBOX {21}\r\nb1 COMPRESS DEFLATE\r\n");
        assert_eq!(o.neutralised(), 0);
        // Nothing behind the literal is released before the backend has answered.
        let mut o = Observer::new();
        let mut bytes = b"a1 XYZZY {9}\r\nb STARTTLS\r\n".to_vec();
        assert_eq!(o.client(&mut bytes, Instant::now()), 14);
        assert!(o.holding());
        o.server(b"* OK still busy\r\n", Instant::now());
        assert!(o.holding(), "an untagged line is no answer");
        assert_eq!(o.client(&mut bytes[14..], Instant::now()), 0);
    }

    #[test]
    fn an_earlier_command_with_the_same_tag_does_not_release_the_literal() {
        let mut o = Observer::new();
        let sent = converse(
            &mut o,
            b"a1 NOOP\r\na1 XYZZY {21}\r\nb1 COMPRESS DEFLATE\r\n",
            b"a1 OK NOOP completed\r\na1 BAD Unknown command\r\n",
        );
        assert_eq!(sent, b"a1 NOOP\r\na1 XYZZY {21}\r\nb1 COMPRES_ DEFLATE\r\n");
        // When the count of tags in flight was lost, an ambiguous answer ends the session.
        let mut o = Observer::new();
        let mut flood = Vec::new();
        for _ in 0..=MAX_IN_FLIGHT {
            flood.extend_from_slice(b"a1 NOOP\r\n");
        }
        flood.extend_from_slice(b"a1 XYZZY {21}\r\nb1 COMPRESS DEFLATE\r\n");
        let released = o.client(&mut flood, Instant::now());
        assert!(o.holding() && o.desynced());
        assert_eq!(released, flood.len() - 21);
        o.server(b"a1 OK NOOP completed\r\n", Instant::now());
        assert!(o.guard_lost());
    }

    #[test]
    fn bytes_behind_idle_wait_for_its_continuation() {
        // In IDLE the backend reads `DONE`; a line that is not DONE ends IDLE with a tagged BAD for the IDLE,
        // not for that line, so its literal is never accepted and what follows stays held.
        let mut o = Observer::new();
        let mut bytes = b"a IDLE\r\nb X {21}\r\nc COMPRESS DEFLATE\r\n".to_vec();
        let t = Instant::now();
        let first = o.client(&mut bytes, t);
        assert_eq!(first, 8, "held behind IDLE");
        o.server(b"+ idling\r\n", t);
        let second = o.client(&mut bytes[first..], t);
        assert_eq!(second, 10, "held behind b's literal");
        o.server(b"a BAD Expected DONE.\r\n", t);
        assert!(o.holding());
        assert_eq!(o.client(&mut bytes[first + second..], t), 0);
        // A refused IDLE releases what follows as commands.
        let mut o = Observer::new();
        let sent = converse(&mut o, b"a IDLE\r\nb COMPRESS DEFLATE\r\n", b"a NO [INUSE] no idle\r\n");
        assert_eq!(sent, b"a IDLE\r\nb COMPRES_ DEFLATE\r\n");
    }

    #[test]
    fn quiet_only_between_commands_or_in_idle() {
        let t = Instant::now();
        let mut o = Observer::new();
        assert!(o.quiet(), "a new session");
        // A FETCH under way: its response has not ended.
        o.client(&mut b"a FETCH 1 BODY[]\r\n".to_vec(), t);
        assert!(!o.quiet(), "a FETCH in flight");
        o.server(b"* 1 FETCH (BODY[] {5}\r\nab", t);
        assert!(!o.quiet(), "inside its literal");
        o.server(b"cde)\r\na OK done\r\n", t);
        assert!(o.quiet(), "the FETCH completed");
        // An APPEND: its literal is on its way from the client.
        o.client(&mut b"b APPEND INBOX {10}\r\n".to_vec(), t);
        o.server(b"+ go\r\n", t);
        o.client(&mut b"01234".to_vec(), t);
        assert!(!o.quiet(), "inside the APPEND's literal");
        o.client(&mut b"56789\r\n".to_vec(), t);
        assert!(!o.quiet(), "the APPEND waits for its answer");
        o.server(b"b OK [APPENDUID 1 2] done\r\n", t);
        assert!(o.quiet());
        // IDLE is quiet (the BYE ends it), a half-sent command line is not.
        converse(&mut o, b"c IDLE\r\n", b"+ idling\r\n");
        assert!(o.quiet(), "in IDLE");
        let mut o = Observer::new();
        o.client(&mut b"d NOO".to_vec(), t);
        assert!(!o.quiet(), "half a command line");
    }

    #[test]
    fn boundaries_logout_and_bye_are_known() {
        let mut o = Observer::new();
        assert!(o.at_response_boundary());
        o.server(b"* 1 FETCH (BODY[] {10}\r\nabc", Instant::now());
        assert!(!o.at_response_boundary(), "inside a literal");
        o.server(b"defghij)\r\n", Instant::now());
        assert!(o.at_response_boundary());
        o.server(b"* OK partial", Instant::now());
        assert!(!o.at_response_boundary(), "inside a line");
        o.server(b"\r\n", Instant::now());
        assert!(!o.bye_seen() && !o.logout_sent());
        converse(&mut o, b"z LOGOUT\r\n", b"* BYE Logging out\r\nz OK Logout completed.\r\n");
        assert!(o.bye_seen() && o.logout_sent());
    }

    #[test]
    fn memory_is_bounded() {
        let mut o = Observer::new();
        let mut flood = Vec::new();
        for i in 0..(MAX_IN_FLIGHT + 10) {
            flood.extend_from_slice(format!("t{i} NOOP\r\n").as_bytes());
        }
        o.client(&mut flood, Instant::now());
        assert!(o.desynced());
        assert_eq!(o.finish(Instant::now()).len(), 0);
        // A huge tag is truncated, not stored.
        let mut o = Observer::new();
        let mut long = vec![b'x'; 100_000];
        long.extend_from_slice(b" NOOP\r\n");
        o.client(&mut long, Instant::now());
        assert!(o.in_flight[0].tag.len() <= MAX_TAG);
    }

    #[test]
    fn mailboxes_codes_and_whole_body_fetches() {
        let now = Instant::now();
        let mut o = Observer::new();
        let feed = |o: &mut Observer, client: &[u8], server: &[u8]| {
            let mut c = client.to_vec();
            assert_eq!(o.client(&mut c, now), c.len());
            o.server(server, now);
            o.drain().collect::<Vec<_>>()
        };
        let done = feed(
            &mut o,
            b"s SELECT \"Sent Items\"\r\n",
            b"* 1200 EXISTS\r\n* OK [UIDVALIDITY 1] x\r\ns OK [READ-WRITE] done\r\n",
        );
        assert_eq!(done[0].code, Some("READ-WRITE"));
        assert_eq!(done[0].detail, Detail::Selected { mailbox: Some("Sent Items".into()), exists: Some(1200) });
        let done = feed(
            &mut o,
            b"f UID FETCH 1:* (UID BODY.PEEK[])\r\n",
            b"* 1 FETCH (UID 7 BODY[] {5}\r\nhello)\r\n* 2 FETCH (UID 8 BODY[] {3}\r\nabc)\r\nf OK done\r\n",
        );
        assert_eq!(
            done[0].detail,
            Detail::BodyFetch { mailbox: Some("Sent Items".into()), exists: Some(1200), full_range: true, bytes: 8 }
        );
        assert_eq!(done[0].code, None);
        let done = feed(
            &mut o,
            b"a APPEND INBOX {3+}\r\nabc\r\n",
            b"a NO [OVERQUOTA] Quota exceeded (mailbox for user is full)\r\n",
        );
        assert_eq!((done[0].command, done[0].status, done[0].code), ("APPEND", Status::No, Some("OVERQUOTA")));
        let done = feed(&mut o, b"x SELECT Nope\r\n", b"x NO [NONEXISTENT] Mailbox doesn't exist\r\n");
        assert_eq!(done[0].code, Some("NONEXISTENT"));
        let done = feed(&mut o, b"g FETCH 1:* BODY.PEEK[]\r\n", b"g BAD No mailbox selected\r\n");
        assert_eq!(
            done[0].detail,
            Detail::BodyFetch { mailbox: None, exists: None, full_range: true, bytes: 0 },
            "deselected"
        );
        // Arguments are bounded whatever the client sends.
        let mut long = b"l SELECT ".to_vec();
        long.extend(std::iter::repeat_n(b'x', 10_000));
        long.extend_from_slice(b"\r\n");
        let mut c = long.clone();
        o.client(&mut c, now);
        assert!(o.args.len() <= MAX_ARGS);
    }
}
