//! What a session tells the mailbox signals (`signals`) and the audit log about the problems users have: a
//! device retrying an old password (before login), a quota refusal, a client re-downloading a whole
//! mailbox, a slow `SELECT` (after login, from each finished command), and the client family at login.
//! Names go to the signals and the audit log only; metrics get fixed labels.

use std::net::IpAddr;

use crate::imap::inspect::{Completed, Detail, Status};
use crate::net::Shared;
use crate::signals::{self, client_family};
use crate::telemetry::audit::{AuditEvent, SessionFacts, rfc3339};

/// Who a relayed session is, for its signals.
pub struct Subject<'a> {
    pub shared: &'a Shared,
    pub facts: &'a SessionFacts,
    pub user: &'a str,
    /// The client's `ID` name and version, joined.
    pub client: Option<&'a str>,
}

/// `ID` name and version as one string (`Thunderbird 128.4.1`).
pub fn client_app(name: Option<&str>, version: Option<&str>) -> Option<String> {
    match (name, version) {
        (Some(n), Some(v)) => Some(format!("{n} {v}")),
        (Some(n), None) => Some(n.to_owned()),
        _ => None,
    }
}

/// A login succeeded: its client family is counted.
pub fn logged_in(shared: &Shared, client_name: Option<&str>) {
    shared.metrics.clients.with_label_values(&[client_family(client_name)]).inc();
}

/// The defence refused a wrong password tried again (the repeated pair): a device with an old password.
pub fn stale_password(shared: &Shared, facts: &SessionFacts, user: &str, address: IpAddr, client: Option<&str>) {
    let Some(stale) = shared.signals.stale_password(user, address, client) else { return };
    tracing::info!(
        event = "stale_password",
        user,
        client = client.unwrap_or("-"),
        count = stale.count,
        "a device retries an old password"
    );
    shared.audit(&AuditEvent {
        user: Some(stale.user),
        client_app: stale.client,
        count: Some(stale.count),
        first_seen: Some(rfc3339(stale.first)),
        last_seen: Some(rfc3339(stale.last)),
        ..facts.event("stale_password")
    });
}

/// A finished command of a relayed session.
pub fn completed(subject: &Subject<'_>, completed: &Completed) {
    let Subject { shared, facts, user, client } = *subject;
    if completed.code == Some("OVERQUOTA") {
        if let Some(quota) = shared.signals.over_quota(user, completed.command) {
            tracing::info!(event = "over_quota", user, command = completed.command, count = quota.count, "over quota");
            shared.audit(&AuditEvent {
                user: Some(quota.user),
                client_app: client.map(str::to_owned),
                count: Some(quota.count),
                reason: Some(completed.command.to_owned()),
                first_seen: Some(rfc3339(quota.first)),
                last_seen: Some(rfc3339(quota.last)),
                ..facts.event("over_quota")
            });
        }
    }
    match &completed.detail {
        Detail::Selected { mailbox: Some(mailbox), exists } if completed.status == Status::Ok => {
            shared.signals.selected(user, mailbox, *exists, completed.elapsed);
        }
        Detail::BodyFetch { mailbox: Some(mailbox), exists, full_range: true, bytes }
            if completed.status == Status::Ok =>
        {
            let Some(resync) = shared.signals.full_fetch(user, mailbox, client, *bytes, *exists) else { return };
            shared.metrics.resync_suspected.inc();
            tracing::info!(event = "resync_suspected", user, mailbox = %mailbox, fetches = resync.fetches, bytes = resync.bytes, "a client re-downloads a whole mailbox");
            shared.audit(&AuditEvent {
                user: Some(resync.user),
                mailbox: Some(resync.mailbox),
                client_app: resync.client,
                count: Some(u64::from(resync.fetches)),
                bytes: Some(resync.bytes),
                window_secs: Some(signals::WINDOW.as_secs()),
                first_seen: Some(rfc3339(resync.first)),
                last_seen: Some(rfc3339(resync.last)),
                ..facts.event("resync_suspected")
            });
        }
        _ => {}
    }
}
