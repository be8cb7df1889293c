//! Bans per prefix or bucket: each repeat within `ban_max` of the last doubles, up to `ban_max`. The table is
//! bounded; when full, the ban set longest ago is forgotten first.

use std::time::Duration;

use ipnet::IpNet;
use tokio::time::Instant;

use super::snapshot::BanRecord;
use super::table::Table;
use crate::config::DefenceConfig;

#[derive(Debug, Clone, Copy)]
struct Ban {
    until: Instant,
    /// Bans so far, for doubling; forgotten `ban_max` after the last one.
    count: u32,
    last: Instant,
    active: bool,
}

#[derive(Debug)]
pub struct Bans {
    table: Table<IpNet, Ban>,
}

impl Bans {
    pub fn new(capacity: usize) -> Self {
        Self { table: Table::new(capacity) }
    }

    /// The longest ban in force on any of `keys`.
    pub fn remaining(&self, keys: impl IntoIterator<Item = IpNet>, now: Instant) -> Option<Duration> {
        keys.into_iter()
            .filter_map(|k| self.table.get(&k))
            .filter(|b| b.active && b.until > now)
            .map(|b| b.until - now)
            .max()
    }

    /// Bans `key`; returns for how long.
    pub fn ban(&mut self, key: IpNet, now: Instant, config: &DefenceConfig) -> Duration {
        let Some(ban) = self.table.entry(&key, || Ban { until: now, count: 0, last: now, active: false }) else {
            // Unreachable: bans are never pinned, so there is always room.
            return Duration::ZERO;
        };
        if ban.count > 0 && now.saturating_duration_since(ban.last) >= config.ban_max {
            ban.count = 0;
        }
        ban.count += 1;
        let factor = 1u32.checked_shl(ban.count - 1).unwrap_or(u32::MAX);
        let duration = config.ban.saturating_mul(factor).min(config.ban_max);
        ban.until = now + duration;
        ban.last = now;
        ban.active = true;
        duration
    }

    /// A ban decided elsewhere (the fleet): in force for `remaining` with `count` bans so far. A longer ban
    /// in force here stays. Returns whether it changed anything.
    pub fn apply(&mut self, key: IpNet, now: Instant, remaining: Duration, count: u32) -> bool {
        let Some(ban) = self.table.entry(&key, || Ban { until: now, count: 0, last: now, active: false }) else {
            return false;
        };
        let until = now + remaining;
        // The fleet's copy of a ban made here comes back a moment later: not news.
        let news = !ban.active || ban.until + Duration::from_secs(1) < until;
        ban.count = ban.count.max(count);
        if !ban.active || ban.until < until {
            ban.until = until;
            ban.last = now;
            ban.active = true;
        }
        news
    }

    /// Lifts expired bans (returned, for the log) and forgets histories older than `ban_max`.
    pub fn sweep(&mut self, now: Instant, config: &DefenceConfig) -> Vec<IpNet> {
        let mut lifted = Vec::new();
        self.table.retain(|key, ban| {
            if ban.active && ban.until <= now {
                ban.active = false;
                lifted.push(*key);
            }
            ban.active || now.saturating_duration_since(ban.last) < config.ban_max
        });
        lifted
    }

    /// An administrator lifts the ban on `key` and forgives its history (the next ban starts from the
    /// base length). Returns whether a ban was in force.
    pub fn lift(&mut self, key: IpNet, now: Instant) -> bool {
        let Some(ban) = self.table.peek_mut(&key) else { return false };
        let was = ban.active && ban.until > now;
        ban.active = false;
        ban.count = 0;
        ban.until = now;
        was
    }

    pub fn entries(&self) -> usize {
        self.table.len()
    }

    /// The bans in force: (key, time left, ban count).
    pub fn in_force(&self, now: Instant) -> Vec<(IpNet, Duration, u32)> {
        self.table
            .iter()
            .filter(|(_, b)| b.active && b.until > now)
            .map(|(k, b)| (*k, b.until - now, b.count))
            .collect()
    }

    /// Every entry, in force or remembered for doubling, as ages (for a snapshot).
    pub fn export(&self, now: Instant) -> Vec<BanRecord> {
        self.table
            .iter()
            .map(|(key, b)| BanRecord {
                key: *key,
                remaining_ms: if b.active { b.until.saturating_duration_since(now).as_millis() as u64 } else { 0 },
                count: b.count,
                since_last_ms: now.saturating_duration_since(b.last).as_millis() as u64,
            })
            .collect()
    }

    /// An entry from a snapshot; one here already (made since the start) is kept.
    pub fn import(&mut self, record: &BanRecord, now: Instant) {
        if self.table.get(&record.key).is_some() {
            return;
        }
        let last = now.checked_sub(Duration::from_millis(record.since_last_ms)).unwrap_or(now);
        let remaining = Duration::from_millis(record.remaining_ms);
        let ban = Ban { until: now + remaining, count: record.count, last, active: !remaining.is_zero() };
        if let Some(entry) = self.table.entry(&record.key, || ban) {
            *entry = ban;
        }
    }

    pub fn active(&self, now: Instant) -> usize {
        self.table.values().filter(|b| b.active && b.until > now).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn doubling_and_a_bounded_table() {
        let config = DefenceConfig::default();
        let mut bans = Bans::new(3);
        let now = Instant::now();
        let key: IpNet = "192.0.2.1/32".parse().unwrap();
        assert_eq!(bans.ban(key, now, &config), config.ban);
        assert_eq!(bans.ban(key, now, &config), config.ban * 2);
        for i in 2..10 {
            bans.ban(format!("192.0.2.{i}/32").parse().unwrap(), now, &config);
        }
        assert_eq!(bans.entries(), 3, "bounded");
        assert!(bans.remaining([key], now).is_none(), "the oldest ban went first");
    }

    #[tokio::test(start_paused = true)]
    async fn a_fleet_ban_applies_once_and_never_shortens_one_in_force() {
        let config = DefenceConfig::default();
        let mut bans = Bans::new(8);
        let now = Instant::now();
        let key: IpNet = "192.0.2.0/24".parse().unwrap();
        assert!(bans.apply(key, now, Duration::from_secs(60), 2));
        assert_eq!(bans.remaining([key], now), Some(Duration::from_secs(60)));
        // Its own announcement coming back a moment later is not news.
        assert!(!bans.apply(key, now + Duration::from_millis(5), Duration::from_secs(60), 2));
        assert!(!bans.apply(key, now, Duration::from_secs(10), 1));
        let left = bans.remaining([key], now).unwrap();
        assert!(left >= Duration::from_secs(60) && left < Duration::from_secs(61), "{left:?}");
        // The fleet's count carries on the doubling here: the third ban is four times the base.
        assert_eq!(bans.ban(key, now + Duration::from_secs(61), &config), config.ban * 4);
    }
}
