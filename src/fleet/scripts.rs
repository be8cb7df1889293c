//! The fleet's evidence in Redis: key layout, the Lua scripts that update it atomically, and the parsing of
//! their replies. No I/O here.
//!
//! Keys, all under the configured namespace `{ns}`:
//! - `{ns}:p:{net}`: a prefix's (or bucket's) failures `f` at `ft` and successes `s` at `st` (ms); the leak
//!   and the decay are applied on read with Redis's clock, the same arithmetic as `security::standing`.
//! - `{ns}:a:{account}`: the account's consecutive failures `c`, last failure `lf`, `x:{net}` for the
//!   prefixes it failed from and `r:{fingerprint}` for its wrong pairs (fleet-wide fingerprints only, keyed
//!   by a secret that is not in Redis); expires `account_reset` after the last failure.
//! - `{ns}:ak:{account}`: the last success `ok` and `k:{net}` for prefixes it logged in from; expires
//!   `account_forget` after the last success.
//! - `{ns}:ban:{net}`: `until`, `count` and `last` (ms) of a ban; `{ns}:bans`: the bans in force (score
//!   `until`), for instances that (re)join; channel `{ns}:bans`: `"{net} {ms} {count}"` per new ban,
//!   `"{net} lift"` when an administrator lifts one.
//!
//! Account names are hashed into keys (SHA-256, hex), so that a Redis shared by several clusters holds no
//! user names. Scripts return numbers as strings (Redis truncates Lua floats to integers).

use std::time::Duration;

use ipnet::IpNet;

use crate::security::accounts::Fingerprint;
use crate::security::shared::{AccountEvidence, Evidence, KeyEvidence, SharedBan};

/// Read or add a failure: `KEYS` = account, account's successes, then per key its record and its ban;
/// `ARGV` = mode (`view`|`fail`), key count, prefix, half-life ms, account reset ms, record TTL ms, the
/// pair's fleet-wide fingerprint (hex, or empty), then per key its leak per ms.
pub const EVIDENCE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fail = ARGV[1] == 'fail'
local n = tonumber(ARGV[2])
local net = ARGV[3]
local half = tonumber(ARGV[4])
local reset = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
local fp = ARGV[7]
local out = {}
for i = 1, n do
  local pk = KEYS[2 + 2 * i - 1]
  local bk = KEYS[2 + 2 * i]
  local leak = tonumber(ARGV[7 + i])
  local v = redis.call('HMGET', pk, 'f', 'ft', 's', 'st')
  local f = tonumber(v[1]) or 0
  local ft = tonumber(v[2]) or now
  local s = tonumber(v[3]) or 0
  local st = tonumber(v[4]) or now
  f = math.max(0, f - math.max(0, now - ft) * leak)
  s = s * math.pow(0.5, math.max(0, now - st) / half)
  if fail then
    f = f + 1
    redis.call('HSET', pk, 'f', tostring(f), 'ft', tostring(now), 's', tostring(s), 'st', tostring(now))
    redis.call('PEXPIRE', pk, ttl)
  end
  local b = redis.call('HMGET', bk, 'until', 'count')
  local left = (tonumber(b[1]) or 0) - now
  if left < 0 then left = 0 end
  table.insert(out, tostring(f))
  table.insert(out, tostring(s))
  table.insert(out, tostring(left))
  table.insert(out, tostring(tonumber(b[2]) or 0))
end
local a = redis.call('HMGET', KEYS[1], 'c', 'lf')
local c = tonumber(a[1]) or 0
local lf = tonumber(a[2])
if lf and now - lf >= reset then
  c = 0
  lf = nil
  redis.call('DEL', KEYS[1])
end
if fail then
  c = c + 1
  lf = now
  redis.call('HSET', KEYS[1], 'c', tostring(c), 'lf', tostring(now))
  if redis.call('HLEN', KEYS[1]) < 66 then
    redis.call('HSET', KEYS[1], 'x:' .. net, tostring(now))
    if fp ~= '' then redis.call('HSET', KEYS[1], 'r:' .. fp, tostring(now)) end
  end
  redis.call('PEXPIRE', KEYS[1], reset)
end
local k = redis.call('HMGET', KEYS[2], 'ok', 'k:' .. net)
table.insert(out, tostring(c))
if lf then table.insert(out, tostring(now - lf)) else table.insert(out, '-1') end
if k[1] then table.insert(out, tostring(now - tonumber(k[1]))) else table.insert(out, '-1') end
if k[2] then table.insert(out, '1') else table.insert(out, '0') end
table.insert(out, tostring(redis.call('HEXISTS', KEYS[1], 'x:' .. net)))
local r = false
if fp ~= '' then r = redis.call('HGET', KEYS[1], 'r:' .. fp) end
if r then table.insert(out, tostring(now - tonumber(r))) else table.insert(out, '-1') end
return out
";

/// A success: `KEYS` = account, account's successes, then the keys' records; `ARGV` = key count, prefix,
/// half-life ms, account forget ms, record TTL ms.
pub const SUCCESS: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[1])
local half = tonumber(ARGV[3])
for i = 1, n do
  local pk = KEYS[2 + i]
  local v = redis.call('HMGET', pk, 's', 'st')
  local s = tonumber(v[1]) or 0
  local st = tonumber(v[2]) or now
  s = s * math.pow(0.5, math.max(0, now - st) / half) + 1
  redis.call('HSET', pk, 's', tostring(s), 'st', tostring(now))
  redis.call('PEXPIRE', pk, tonumber(ARGV[5]))
end
redis.call('DEL', KEYS[1])
if redis.call('HLEN', KEYS[2]) >= 34 then redis.call('DEL', KEYS[2]) end
redis.call('HSET', KEYS[2], 'ok', tostring(now), 'k:' .. ARGV[2], tostring(now))
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]))
return 1
";

/// A ban: `KEYS` = the ban, the set of bans in force; `ARGV` = prefix, base ms, max ms, channel. A ban in
/// force is returned unchanged (two instances banning at once make one ban, not a doubled one).
pub const BAN: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local b = redis.call('HMGET', KEYS[1], 'until', 'count', 'last')
local untilv = tonumber(b[1]) or 0
local count = tonumber(b[2]) or 0
local last = tonumber(b[3]) or 0
if untilv > now then return {tostring(untilv - now), tostring(count)} end
local base = tonumber(ARGV[2])
local max = tonumber(ARGV[3])
if count > 0 and now - last >= max then count = 0 end
count = count + 1
local d = math.floor(math.min(max, base * math.pow(2, count - 1)))
redis.call('HSET', KEYS[1], 'until', tostring(now + d), 'count', tostring(count), 'last', tostring(now))
redis.call('PEXPIRE', KEYS[1], d + max)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], now + d, ARGV[1])
redis.call('PUBLISH', ARGV[4], ARGV[1] .. ' ' .. tostring(d) .. ' ' .. tostring(count))
return {tostring(d), tostring(count)}
";

/// A ban this instance made while the store was away, brought back: `KEYS` = the ban, the set of bans in
/// force; `ARGV` = prefix, ms left, count, max ms, channel. A longer ban in force stays; returns 1 when it
/// was news (and announced).
pub const ADOPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local b = redis.call('HMGET', KEYS[1], 'until', 'count')
local untilv = tonumber(b[1]) or 0
local want = now + tonumber(ARGV[2])
if untilv >= want then return 0 end
local count = math.max(tonumber(b[2]) or 0, tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'until', tostring(want), 'count', tostring(count), 'last', tostring(now))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[4]))
redis.call('ZADD', KEYS[2], want, ARGV[1])
redis.call('PUBLISH', ARGV[5], ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. tostring(count))
return 1
";

/// An administrator lifts a ban: `KEYS` = the ban, the set of bans in force, the prefix's record; `ARGV` =
/// prefix, channel. The ban and its history go, the prefix's failures are forgiven, every instance hears
/// of it. Returns 1 when a ban was in force.
pub const UNBAN: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local untilv = tonumber(redis.call('HGET', KEYS[1], 'until')) or 0
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], 'f', '0', 'ft', tostring(now))
end
redis.call('PUBLISH', ARGV[2], ARGV[1] .. ' lift')
if untilv > now then return 1 end
return 0
";

/// The bans in force: `KEYS` = the set of bans; `ARGV` = the most to return. Pairs of prefix, ms left.
pub const BANS_IN_FORCE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
for i = 1, #r, 2 do
  table.insert(out, r[i])
  table.insert(out, tostring(tonumber(r[i + 1]) - now))
end
return out
";

/// Key names under one namespace.
#[derive(Debug, Clone)]
pub struct Layout {
    ns: String,
}

impl Layout {
    pub fn new(ns: &str) -> Self {
        Self { ns: ns.to_owned() }
    }

    pub fn record(&self, key: &IpNet) -> String {
        format!("{}:p:{key}", self.ns)
    }

    pub fn ban(&self, key: &IpNet) -> String {
        format!("{}:ban:{key}", self.ns)
    }

    pub fn bans(&self) -> String {
        format!("{}:bans", self.ns)
    }

    pub fn channel(&self) -> String {
        format!("{}:bans", self.ns)
    }

    /// The account's failure record and its success record.
    pub fn account(&self, account: &str) -> (String, String) {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, account.as_bytes());
        let hex: String = digest.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect();
        (format!("{}:a:{hex}", self.ns), format!("{}:ak:{hex}", self.ns))
    }
}

/// A reply that does not have the shape the script gives it: a different script under the same
/// namespace, or a bug.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected reply from the state store's script: {0}")]
pub struct BadReply(pub &'static str);

fn number(field: Option<&String>, what: &'static str) -> Result<f64, BadReply> {
    field.and_then(|f| f.parse::<f64>().ok()).filter(|v| v.is_finite()).ok_or(BadReply(what))
}

fn millis(value: f64) -> Option<Duration> {
    (value >= 0.0).then(|| Duration::from_millis(value.min(1e13) as u64))
}

/// A fingerprint as the scripts hold it.
pub fn fingerprint_hex(fingerprint: &Fingerprint) -> String {
    fingerprint.iter().map(|b| format!("{b:02x}")).collect()
}

/// `EVIDENCE`'s reply for `keys` (in the order they were sent), asked about `fingerprint`.
pub fn parse_evidence(
    keys: &[IpNet],
    fingerprint: Option<Fingerprint>,
    reply: &[String],
) -> Result<Evidence, BadReply> {
    if reply.len() != keys.len() * 4 + 6 {
        return Err(BadReply("evidence length"));
    }
    let mut out = Vec::with_capacity(keys.len());
    for (i, key) in keys.iter().enumerate() {
        let at = |j: usize| reply.get(i * 4 + j);
        let left = number(at(2), "ban left")?;
        let count = number(at(3), "ban count")?;
        out.push(KeyEvidence {
            key: *key,
            failures: number(at(0), "failures")?.max(0.0),
            successes: number(at(1), "successes")?.max(0.0),
            ban: (left > 0.0).then(|| (Duration::from_millis(left as u64), count.clamp(1.0, 64.0) as u32)),
        });
    }
    let base = keys.len() * 4;
    let at = |j: usize| reply.get(base + j);
    let account = AccountEvidence {
        consecutive: number(at(0), "consecutive")?.clamp(0.0, f64::from(u32::MAX)) as u32,
        since_failure: millis(number(at(1), "since failure")?),
        since_success: millis(number(at(2), "since success")?),
        known: number(at(3), "known")? > 0.0,
        failed_here: number(at(4), "failed here")? > 0.0,
        repeated: fingerprint.zip(millis(number(at(5), "repeated")?)),
    };
    Ok(Evidence { keys: out, account })
}

/// `BAN`'s reply.
pub fn parse_ban(key: IpNet, reply: &[String]) -> Result<SharedBan, BadReply> {
    let [ms, count] = reply else { return Err(BadReply("ban length")) };
    let remaining = millis(number(Some(ms), "ban ms")?).ok_or(BadReply("ban ms"))?;
    Ok(SharedBan { key, remaining, count: number(Some(count), "ban count")?.clamp(1.0, 64.0) as u32 })
}

/// What an instance announced on the ban channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announcement {
    Ban(SharedBan),
    /// An administrator lifted the ban on this prefix.
    Lift(IpNet),
}

/// A message on the ban channel: `"{net} {ms} {count}"` or `"{net} lift"`.
pub fn parse_announcement(message: &str) -> Option<Announcement> {
    let mut parts = message.split(' ');
    let key = parts.next()?.parse::<IpNet>().ok()?;
    let second = parts.next()?;
    if second == "lift" {
        return parts.next().is_none().then_some(Announcement::Lift(key));
    }
    let ms = second.parse::<u64>().ok()?;
    let count = parts.next()?.parse::<u32>().ok()?;
    if parts.next().is_some() || ms == 0 {
        return None;
    }
    Some(Announcement::Ban(SharedBan { key, remaining: Duration::from_millis(ms), count: count.clamp(1, 64) }))
}

/// `BANS_IN_FORCE`'s reply: entries that do not parse are skipped.
pub fn parse_bans(reply: &[String]) -> Vec<SharedBan> {
    reply
        .chunks_exact(2)
        .filter_map(|pair| {
            let key = pair[0].parse::<IpNet>().ok()?;
            let ms = pair[1].parse::<f64>().ok().filter(|v| *v > 0.0)?;
            Some(SharedBan { key, remaining: Duration::from_millis(ms as u64), count: 1 })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn evidence_reply_parses_per_key_and_account() {
        let keys = [net("2001:db8:1:2::/64"), net("2001:db8:1::/48")];
        let reply = strings(&["2.5", "0", "0", "0", "7.25", "1.5", "4000", "2", "3", "120", "-1", "1", "1", "900"]);
        let e = parse_evidence(&keys, Some([7; 16]), &reply).unwrap();
        assert_eq!(e.account.repeated, Some(([7; 16], Duration::from_millis(900))));
        assert_eq!(parse_evidence(&keys, None, &reply).unwrap().account.repeated, None);
        assert_eq!(e.keys[0].failures, 2.5);
        assert_eq!(e.keys[0].ban, None);
        assert_eq!(e.keys[1].ban, Some((Duration::from_millis(4000), 2)));
        assert_eq!(e.keys[1].successes, 1.5);
        assert_eq!(e.account.consecutive, 3);
        assert_eq!(e.account.since_failure, Some(Duration::from_millis(120)));
        assert_eq!(e.account.since_success, None);
        assert!(e.account.known && e.account.failed_here);
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        let keys = [net("192.0.2.0/24")];
        assert!(parse_evidence(&keys, None, &strings(&["1", "2"])).is_err());
        let reply = strings(&["x", "0", "0", "0", "0", "-1", "-1", "0", "0", "-1"]);
        assert_eq!(parse_evidence(&keys, None, &reply), Err(BadReply("failures")));
        let reply = strings(&["inf", "0", "0", "0", "0", "-1", "-1", "0", "0", "-1"]);
        assert!(parse_evidence(&keys, None, &reply).is_err());
        assert!(parse_ban(keys[0], &strings(&["1"])).is_err());
        assert!(parse_ban(keys[0], &strings(&["-5", "1"])).is_err());
    }

    #[test]
    fn announcements_and_ban_lists() {
        let Some(Announcement::Ban(ban)) = parse_announcement("192.0.2.0/24 60000 3") else { panic!() };
        assert_eq!((ban.key, ban.remaining, ban.count), (net("192.0.2.0/24"), Duration::from_secs(60), 3));
        assert_eq!(parse_announcement("2001:db8::/64 lift"), Some(Announcement::Lift(net("2001:db8::/64"))));
        assert_eq!(parse_announcement("2001:db8::/64 lift 1"), None);
        assert_eq!(parse_announcement("192.0.2.0/24 60000"), None);
        assert_eq!(parse_announcement("192.0.2.0/24 0 1"), None);
        assert_eq!(parse_announcement("nonsense 1 1"), None);
        assert_eq!(parse_announcement("192.0.2.0/24 1 1 extra"), None);
        let bans = parse_bans(&strings(&["192.0.2.0/24", "1500", "junk", "10", "2001:db8::/64", "-3"]));
        assert_eq!(bans.len(), 1);
        assert_eq!(bans[0].remaining, Duration::from_millis(1500));
    }

    #[test]
    fn account_keys_hold_no_user_name() {
        let layout = Layout::new("fleet-a");
        let (a, ak) = layout.account("bob@example.com");
        assert!(a.starts_with("fleet-a:a:") && ak.starts_with("fleet-a:ak:"));
        assert!(!a.contains("bob") && a.len() == "fleet-a:a:".len() + 32);
        assert_eq!(layout.account("bob@example.com"), (a, ak));
        assert_eq!(layout.record(&net("192.0.2.0/24")), "fleet-a:p:192.0.2.0/24");
    }
}
