//! The identity provider of the tests: `token_service.py`, an OAuth 2.0 token introspection endpoint
//! (RFC 7662) run with Debian's python3 on a loopback port chosen at run time, knowing the tokens a test
//! writes. Dovecot's `oauth2` passdb asks it about every token.

use std::path::{Path, PathBuf};
use std::process::Child;

pub struct TokenService {
    pub port: u16,
    tokens: PathBuf,
    log: PathBuf,
    child: Child,
}

impl TokenService {
    /// Starts the service with no valid token.
    pub fn start(dir: &Path) -> TokenService {
        let port = super::free_port();
        let (tokens, log) = (dir.join(format!("tokens-{port}.json")), dir.join(format!("introspections-{port}.log")));
        std::fs::write(&tokens, "{}").unwrap();
        std::fs::write(&log, "").unwrap();
        let child = super::python_service("token_service.py", port, &[("--tokens", &tokens), ("--log", &log)]);
        TokenService { port, tokens, log, child }
    }

    pub fn introspection_url(&self) -> String {
        format!("http://127.0.0.1:{}/introspect", self.port)
    }

    /// Issues `token` for `user`: it is active from now on. Tests issue and never revoke, each its own
    /// tokens, so parallel tests only add entries.
    pub fn issue(&self, token: &str, user: &str) {
        let _guard = ISSUE.lock().unwrap_or_else(|e| e.into_inner());
        let text = std::fs::read_to_string(&self.tokens).unwrap_or_default();
        let mut tokens: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap_or_default();
        tokens.insert(token.to_owned(), serde_json::Value::String(user.to_owned()));
        let tmp = self.tokens.with_extension("tmp");
        std::fs::write(&tmp, serde_json::Value::Object(tokens).to_string()).unwrap();
        std::fs::rename(&tmp, &self.tokens).unwrap();
    }

    /// Introspection requests about `token` answered so far.
    pub fn introspections(&self, token: &str) -> usize {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let needle = format!("\"token_sha256\": \"{hex}\"");
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().filter(|l| l.contains(&needle)).count()
    }
}

static ISSUE: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Drop for TokenService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
