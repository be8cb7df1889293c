//! Decides which backends may serve a user, in order: rules name a backend or a pool ([`rules`]), a pool
//! places the user on its members by rendezvous hashing ([`pool`]), and each backend's circuit
//! ([`health`]) says whether it may be dialled now. An HTTP lookup service ([`lookup`], nginx's
//! `auth_http`) may name the backend instead of the rules.

pub mod health;
pub mod lookup;
pub mod pool;
pub mod rules;

use crate::config::{Backend, Config, Pool, Target};
use crate::imap::credentials::Username;

/// The backends to try for one login, best first: one, unless the pool fails over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Indices into the configuration's backends.
    pub candidates: Vec<usize>,
    /// The pool's name when a pool chose them.
    pub pool: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Router {
    backends: Vec<Backend>,
    pools: Vec<Pool>,
    rules: rules::Rules,
}

impl Router {
    pub fn new(config: &Config) -> Self {
        Self { backends: config.backends.clone(), pools: config.pools.clone(), rules: rules::Rules::new(&config.route) }
    }

    /// The route for `user`, or `None` when no rule matches and there is no default.
    pub fn route(&self, user: &Username) -> Option<Route> {
        match self.rules.target(user)? {
            Target::Backend(i) => Some(Route { candidates: vec![i], pool: None }),
            Target::Pool(p) => {
                let pool = self.pools.get(p)?;
                let canonical = user.as_str().to_lowercase();
                let candidates =
                    pool::order(pool, &canonical, |b| self.backends.get(b).map_or("", |b| b.name.as_str()));
                Some(Route { candidates, pool: Some(pool.name.clone()) })
            }
        }
    }

    pub fn backend(&self, index: usize) -> Option<&Backend> {
        self.backends.get(index)
    }

    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    /// Human-readable effective routes, for `imapgate check`.
    pub fn describe(&self) -> Vec<String> {
        let name = |t: &Target| match t {
            Target::Backend(i) => self.backends.get(*i).map_or("?".to_owned(), |b| b.name.clone()),
            Target::Pool(p) => self.pools.get(*p).map_or("?".to_owned(), |p| format!("pool {}", p.name)),
        };
        let mut lines: Vec<String> = Vec::new();
        let mut users: Vec<_> = self.rules.users.iter().collect();
        users.sort_by(|a, b| a.0.cmp(b.0));
        for (user, t) in users {
            lines.push(format!("user   {user} -> {}", name(t)));
        }
        let mut domains: Vec<_> = self.rules.domains.iter().collect();
        domains.sort_by(|a, b| a.0.cmp(b.0));
        for (domain, t) in domains {
            lines.push(format!("domain @{domain} -> {}", name(t)));
        }
        match &self.rules.default {
            Some(t) => lines.push(format!("default -> {}", name(t))),
            None => lines.push("default -> (none: unmatched users are refused)".into()),
        }
        for pool in &self.pools {
            let members: Vec<String> = pool
                .members
                .iter()
                .map(|m| {
                    format!("{} (weight {})", self.backends.get(m.backend).map_or("?", |b| b.name.as_str()), m.weight)
                })
                .collect();
            lines.push(format!("pool {} = {} (failover {:?})", pool.name, members.join(", "), pool.failover));
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
        let route = r.route(&Username::parse(user.as_bytes()).unwrap())?;
        r.backend(route.candidates[0]).map(|b| b.name.clone())
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
