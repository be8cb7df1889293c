//! What the post-login observer learns about mailboxes from a command's first line and a response, sans-IO:
//! the mailbox a `SELECT`/`EXAMINE` opens, whether a `FETCH` asks for whole message bodies of the whole
//! mailbox (a client re-downloading everything), response codes named from a fixed list (metric labels),
//! and mailbox size classes. Names are bounded; nothing here allocates more than a mailbox name.

/// Longest mailbox name kept (bytes of its UTF-7 or UTF-8 form, as sent).
pub const MAX_MAILBOX: usize = 128;

/// What a command's arguments say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intent {
    /// `SELECT`/`EXAMINE`: the mailbox, when it was on the command's first line (not a literal).
    Select {
        mailbox: Option<String>,
    },
    /// `FETCH`/`UID FETCH` of whole bodies (`BODY[]`, `BODY.PEEK[]`, `RFC822`, `BINARY[]`, ...);
    /// `full_range`: the sequence set is `1:*` (or `*:1`).
    BodyFetch {
        full_range: bool,
    },
    Other,
}

/// Tagged response codes counted by name; others are `other`, none is `none`.
pub const RESPONSE_CODES: &[&str] = &[
    "OVERQUOTA",
    "LIMIT",
    "INUSE",
    "NOPERM",
    "ALREADYEXISTS",
    "NONEXISTENT",
    "SERVERBUG",
    "UNAVAILABLE",
    "EXPUNGEISSUED",
    "CANNOT",
    "TRYCREATE",
    "CONTACTADMIN",
    "EXPIRED",
    "PRIVACYREQUIRED",
    "CORRUPTION",
    "READ-ONLY",
    "READ-WRITE",
    "UIDNEXT",
    "APPENDUID",
    "COPYUID",
    "CLOSED",
    "NOTSAVED",
    "HASCHILDREN",
    "ALERT",
    "BADCHARSET",
];

/// `EXISTS` classes of `imapgate_select_duration_seconds{size}`.
pub const SIZE_CLASSES: &[&str] = &["lt_1k", "lt_10k", "lt_100k", "ge_100k"];

pub fn size_class(exists: u64) -> &'static str {
    match exists {
        0..1_000 => "lt_1k",
        1_000..10_000 => "lt_10k",
        10_000..100_000 => "lt_100k",
        _ => "ge_100k",
    }
}

/// The label of a response code's name (`OVERQUOTA`, ...), `other` for any other.
pub fn code_label(name: &[u8]) -> &'static str {
    RESPONSE_CODES.iter().find(|c| c.as_bytes().eq_ignore_ascii_case(name)).copied().unwrap_or("other")
}

/// The first argument: an atom, or a quoted string unescaped; `None` for a literal or nothing.
fn first_argument(args: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let args = args.strip_suffix(b"\r").unwrap_or(args);
    match args.first()? {
        b'"' => {
            let mut out = Vec::new();
            let mut i = 1;
            while i < args.len() {
                match args[i] {
                    b'\\' if i + 1 < args.len() => {
                        out.push(args[i + 1]);
                        i += 2;
                    }
                    b'"' => return Some((out, &args[i + 1..])),
                    b => {
                        out.push(b);
                        i += 1;
                    }
                }
            }
            None
        }
        b'{' | b'~' => None,
        _ => {
            let end = args.iter().position(|&b| b == b' ').unwrap_or(args.len());
            Some((args[..end].to_vec(), &args[end..]))
        }
    }
}

/// Whether fetch items ask for a whole message: `BODY[]`, `BODY.PEEK[]`, `BINARY[]`, `BINARY.PEEK[]` (no
/// section; a partial `<0.1024>` is not whole) or `RFC822` (not `.SIZE`/`.HEADER`/`.TEXT`).
fn whole_body(items: &[u8]) -> bool {
    let upper = items.to_ascii_uppercase();
    let words = upper.split(|&b| b == b' ' || b == b'(' || b == b')');
    let mut found = false;
    for word in words {
        found |= matches!(word, b"BODY[]" | b"BODY.PEEK[]" | b"BINARY[]" | b"BINARY.PEEK[]" | b"RFC822");
    }
    found
}

/// What `label` (the observer's command label) with `args` (the rest of its first line, bounded) does.
pub fn intent(label: &str, args: &[u8]) -> Intent {
    match label {
        "SELECT" | "EXAMINE" => {
            let mailbox = first_argument(args)
                .map(|(name, _)| String::from_utf8_lossy(&name[..name.len().min(MAX_MAILBOX)]).into_owned())
                .filter(|name| !name.is_empty() && !name.chars().any(char::is_control));
            Intent::Select { mailbox }
        }
        "FETCH" | "UID FETCH" => {
            let Some((set, items)) = first_argument(args) else { return Intent::Other };
            if !whole_body(items) {
                return Intent::Other;
            }
            Intent::BodyFetch { full_range: set == b"1:*" || set == b"*:1" }
        }
        _ => Intent::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_and_fetches() {
        assert_eq!(intent("SELECT", b"INBOX\r"), Intent::Select { mailbox: Some("INBOX".into()) });
        assert_eq!(
            intent("EXAMINE", b"\"Sent \\\"Items\\\"\" (CONDSTORE)"),
            Intent::Select { mailbox: Some("Sent \"Items\"".into()) }
        );
        assert_eq!(intent("SELECT", b"{5}"), Intent::Select { mailbox: None });
        assert_eq!(intent("FETCH", b"1:* BODY.PEEK[]"), Intent::BodyFetch { full_range: true });
        assert_eq!(intent("UID FETCH", b"1:* (UID RFC822)"), Intent::BodyFetch { full_range: true });
        assert_eq!(intent("FETCH", b"1:5 (FLAGS BODY.PEEK[])"), Intent::BodyFetch { full_range: false });
        assert_eq!(intent("FETCH", b"1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])"), Intent::Other);
        assert_eq!(intent("FETCH", b"1:* (RFC822.SIZE ENVELOPE)"), Intent::Other);
        assert_eq!(intent("FETCH", b"1:* BODY.PEEK[]<0.1024>"), Intent::Other);
        assert_eq!(intent("NOOP", b""), Intent::Other);
    }

    #[test]
    fn codes_and_sizes() {
        assert_eq!(code_label(b"overquota"), "OVERQUOTA");
        assert_eq!(code_label(b"X-MADE-UP"), "other");
        assert_eq!(
            (size_class(999), size_class(1000), size_class(99_999), size_class(100_000)),
            ("lt_1k", "lt_10k", "lt_100k", "ge_100k")
        );
    }
}
