//! The proxy's life cycle as every long-running task sees it: serving, draining, closing, aborted. The
//! application drives it (a `watch` channel); sessions, the admin server and housekeeping loops follow it.

/// The proxy's life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Serving.
    Running,
    /// Leaving slowly (an upgrade handed the listeners over, or SIGQUIT): no new connections, `/readyz`
    /// answers 503; logins under way finish, and relayed sessions are asked to reconnect one by one over
    /// the drain spread (`net::leave`).
    Leaving,
    /// Shutting down gracefully: no new connections, `/readyz` answers 503; sessions before login say BYE
    /// and close, relayed sessions carry on for the grace period.
    Draining,
    /// Grace period over: every session closes now (BYE at a response boundary, writes with a short
    /// deadline).
    Closing,
    /// What is left after closing is dropped; the admin server stops.
    Aborted,
}

/// Resolves once the phase satisfies `reached` (or the sender is gone). Returns no guard, so it can sit in
/// a `select!` of a `Send` future.
pub async fn phase_reached(phase: &mut tokio::sync::watch::Receiver<Phase>, reached: impl FnMut(&Phase) -> bool) {
    let _ = phase.wait_for(reached).await;
}

/// Resolves once the proxy is shutting down (draining or later; not while it leaves slowly).
pub async fn stopping(phase: &mut tokio::sync::watch::Receiver<Phase>) {
    phase_reached(phase, |p| *p >= Phase::Draining).await;
}
