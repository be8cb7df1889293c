//! A process that leaves slowly: once its successor has the listeners (or on SIGQUIT), every logged-in
//! session is given its own random moment in `[1 s, server.drain_spread_secs]` and is kicked then (it
//! says `* BYE` when quiet, see `Session::kick_leaving`), so that the clients of a whole organisation
//! reconnect as a trickle rather than in one burst. Nobody is kicked in the first second, while the
//! successor warms up (its pools, its first health checks). Sessions that log in meanwhile (logins
//! already under way at the hand-over) get a moment in what is left of the window.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::lifecycle::Phase;
use crate::registry::{Filter, Registry};

/// The first second of the window is left alone.
pub const QUIET_START: Duration = Duration::from_secs(1);
/// How often due sessions are looked for.
const TICK: Duration = Duration::from_millis(100);

/// A moment in the window for one session: `uniform` in `[0, 1)`.
pub fn moment(spread: Duration, uniform: f64) -> Duration {
    if spread <= QUIET_START {
        return spread;
    }
    QUIET_START + (spread - QUIET_START).mul_f64(uniform.clamp(0.0, 1.0))
}

/// Kicks the registry's sessions over `spread` from now; returns once every session that was there or
/// came was kicked after the window's end, or when the phase reaches closing.
pub async fn spread_kicks(sessions: Arc<Registry>, spread: Duration, mut phase: watch::Receiver<Phase>) {
    let start = Instant::now();
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut kicked = 0usize;
    loop {
        let now = Instant::now();
        let present = sessions.list(&Filter::default());
        // Forget sessions that ended (the table stays as large as the registry at most).
        let ids: HashSet<&str> = present.iter().map(|s| s.info.id.as_str()).collect();
        due.retain(|id, _| ids.contains(id.as_str()));
        for session in &present {
            let at = *due.entry(session.info.id.clone()).or_insert_with(|| {
                let at = start + moment(spread, rand::random::<f64>());
                at.max(now)
            });
            if at <= now && session.kick_leaving() {
                kicked += 1;
            }
        }
        if now >= start + spread && present.iter().all(|s| s.leaving()) {
            tracing::info!(kicked, "leaving: every session was asked to reconnect");
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            () = crate::lifecycle::phase_reached(&mut phase, |p| *p >= Phase::Closing) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_fill_the_window_after_its_first_second() {
        let spread = Duration::from_secs(300);
        assert_eq!(moment(spread, 0.0), QUIET_START);
        assert_eq!(moment(spread, 0.5), Duration::from_millis(150_500));
        assert!(moment(spread, 0.999_999) < spread);
        assert_eq!(moment(spread, 7.0), spread);
        // A window shorter than the quiet start: everyone at its end.
        assert_eq!(moment(Duration::ZERO, 0.3), Duration::ZERO);
        assert_eq!(moment(Duration::from_millis(500), 0.3), Duration::from_millis(500));
    }
}
