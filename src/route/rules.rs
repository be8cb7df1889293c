//! Which target (a backend or a pool) a user's rules name: an exact user rule first, then a domain rule,
//! then the default. The first rule for a key wins, as an administrator reading the file top-down expects.

use std::collections::HashMap;

use crate::config::{RouteConfig, RuleMatch, Target};
use crate::imap::credentials::Username;

#[derive(Debug, Clone)]
pub struct Rules {
    pub users: HashMap<String, Target>,
    pub domains: HashMap<String, Target>,
    pub default: Option<Target>,
}

impl Rules {
    pub fn new(config: &RouteConfig) -> Self {
        let mut users = HashMap::new();
        let mut domains = HashMap::new();
        for rule in &config.rules {
            match &rule.matches {
                RuleMatch::User(u) => users.entry(u.clone()).or_insert(rule.target),
                RuleMatch::Domain(d) => domains.entry(d.clone()).or_insert(rule.target),
            };
        }
        Self { users, domains, default: config.default }
    }

    /// The target for `user`, or `None` when no rule matches and there is no default.
    pub fn target(&self, user: &Username) -> Option<Target> {
        self.users
            .get(&user.as_str().to_lowercase())
            .or_else(|| user.domain().and_then(|d| self.domains.get(&d)))
            .copied()
            .or(self.default)
    }
}
