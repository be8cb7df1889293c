//! Decides which backend serves a user: an exact user rule first, then a domain rule, then the default.

use std::collections::HashMap;

use crate::config::{Backend, Config, RuleMatch};
use crate::imap::credentials::Username;

#[derive(Debug, Clone)]
pub struct Router {
    backends: Vec<Backend>,
    users: HashMap<String, usize>,
    domains: HashMap<String, usize>,
    default: Option<usize>,
}

impl Router {
    pub fn new(config: &Config) -> Self {
        let mut users = HashMap::new();
        let mut domains = HashMap::new();
        for rule in &config.route.rules {
            // The first rule for a key wins, as an administrator reading the file top-down expects.
            match &rule.matches {
                RuleMatch::User(u) => users.entry(u.clone()).or_insert(rule.backend),
                RuleMatch::Domain(d) => domains.entry(d.clone()).or_insert(rule.backend),
            };
        }
        Self { backends: config.backends.clone(), users, domains, default: config.route.default }
    }

    /// The backend for `user`, or `None` when no rule matches and there is no default.
    pub fn route(&self, user: &Username) -> Option<&Backend> {
        let index = self
            .users
            .get(&user.as_str().to_lowercase())
            .or_else(|| user.domain().and_then(|d| self.domains.get(&d)))
            .copied()
            .or(self.default)?;
        self.backends.get(index)
    }

    /// Human-readable effective routes, for `imapgate check`.
    pub fn describe(&self) -> Vec<String> {
        let name = |i: &usize| self.backends.get(*i).map_or("?", |b| b.name.as_str());
        let mut lines: Vec<String> = Vec::new();
        let mut users: Vec<_> = self.users.iter().collect();
        users.sort();
        for (user, i) in users {
            lines.push(format!("user   {user} -> {}", name(i)));
        }
        let mut domains: Vec<_> = self.domains.iter().collect();
        domains.sort();
        for (domain, i) in domains {
            lines.push(format!("domain @{domain} -> {}", name(i)));
        }
        match &self.default {
            Some(i) => lines.push(format!("default -> {}", name(i))),
            None => lines.push("default -> (none: unmatched users are refused)".into()),
        }
        for b in &self.backends {
            lines.push(format!("backend {} = {}:{} (tls name {})", b.name, b.host, b.port, b.tls_name));
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(rules: &str, default: Option<&str>) -> Router {
        let default = default.map(|d| format!("default = \"{d}\"")).unwrap_or_default();
        let text = format!(
            r#"
            [server]
            listen = ["127.0.0.1:1"]
            [tls]
            cert = "c"
            key = "k"
            [[backend]]
            name = "a"
            address = "10.0.0.1:143"
            [[backend]]
            name = "b"
            address = "10.0.0.2:143"
            [route]
            {default}
            {rules}
            "#
        );
        Router::new(&Config::from_toml(&text, None).unwrap())
    }

    fn to(r: &Router, user: &str) -> Option<String> {
        r.route(&Username::parse(user.as_bytes()).unwrap()).map(|b| b.name.clone())
    }

    #[test]
    fn user_beats_domain_beats_default() {
        let r = router(
            "[[route.rule]]\ndomain = \"Example.org\"\nbackend = \"b\"\n[[route.rule]]\nuser = \"CEO@example.org\"\nbackend = \"a\"",
            Some("a"),
        );
        assert_eq!(to(&r, "ceo@EXAMPLE.org").as_deref(), Some("a"));
        assert_eq!(to(&r, "bob@example.ORG").as_deref(), Some("b"));
        assert_eq!(to(&r, "bob@example.com").as_deref(), Some("a"));
        assert_eq!(to(&r, "bob").as_deref(), Some("a"));
    }

    #[test]
    fn no_default_refuses_unmatched() {
        let r = router("[[route.rule]]\ndomain = \"example.org\"\nbackend = \"b\"", None);
        assert_eq!(to(&r, "x@example.org").as_deref(), Some("b"));
        assert_eq!(to(&r, "x@example.net"), None);
        assert!(r.describe().iter().any(|l| l.contains("unmatched users are refused")));
    }
}
