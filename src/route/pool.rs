//! Placing users on a pool's members by weighted rendezvous (highest-random-weight) hashing: every member
//! scores each user, `-weight / ln(u)` with `u` a uniform hash of (member name, user) in (0, 1), and the
//! user's order is the members by score. The same configuration gives the same choice on every instance;
//! adding or removing a member moves only the users it gains or loses, and a weight change moves users in
//! proportion. Members with weight 0 take no users.

use crate::config::{Failover, Pool};

/// A stable 64-bit hash (FNV-1a, then a SplitMix64 finaliser to spread the bits): the same on every
/// platform, build and Rust version, which `std`'s hashers do not promise.
fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The member's score for `user`: higher wins.
fn score(member: &str, weight: u32, user: &str) -> f64 {
    // 53 bits into (0, 1): never 0, never 1, so the logarithm is finite and negative.
    let u = ((stable_hash(&[member.as_bytes(), user.as_bytes()]) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(weight) / u.ln()
}

/// The pool's members (backend indices) for `user`, best first, without members of weight 0; with
/// `failover = "none"` only the first. `name` gives a backend's name (what is hashed, so that the order of
/// members in the file does not matter).
pub fn order<'a>(pool: &Pool, user: &str, name: impl Fn(usize) -> &'a str) -> Vec<usize> {
    let mut scored: Vec<(f64, usize)> = pool
        .members
        .iter()
        .filter(|m| m.weight > 0)
        .map(|m| (score(name(m.backend), m.weight, user), m.backend))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let take = match pool.failover {
        Failover::None => 1,
        Failover::Next => scored.len(),
    };
    scored.into_iter().take(take).map(|(_, backend)| backend).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Member;

    const USERS: usize = 100_000;

    fn pool(weights: &[(usize, u32)]) -> Pool {
        Pool {
            name: "p".into(),
            members: weights.iter().map(|&(backend, weight)| Member { backend, weight }).collect(),
            failover: Failover::None,
        }
    }

    const NAMES: [&str; 5] = ["mbox1", "mbox2", "mbox3", "mbox4", "mbox5"];

    fn placement(pool: &Pool) -> Vec<usize> {
        (0..USERS).map(|i| order(pool, &format!("user{i}@example.org"), |b| NAMES[b])[0]).collect()
    }

    fn shares(placed: &[usize]) -> [f64; 5] {
        let mut counts = [0usize; 5];
        for &b in placed {
            counts[b] += 1;
        }
        counts.map(|c| c as f64 / placed.len() as f64)
    }

    fn moved(a: &[usize], b: &[usize]) -> f64 {
        a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
    }

    #[test]
    fn spread_follows_the_weights() {
        let placed = placement(&pool(&[(0, 1), (1, 1), (2, 2)]));
        let got = shares(&placed);
        for (share, want) in got.iter().zip([0.25, 0.25, 0.5]) {
            assert!((share - want).abs() < 0.01, "{got:?}");
        }
    }

    #[test]
    fn adding_removing_and_reweighting_move_only_their_share() {
        let three = placement(&pool(&[(0, 1), (1, 1), (2, 1)]));
        let four = placement(&pool(&[(0, 1), (1, 1), (2, 1), (3, 1)]));
        // A fourth member takes a quarter, all of it moving to the new member.
        let share = moved(&three, &four);
        assert!((share - 0.25).abs() < 0.01, "{share}");
        assert!(three.iter().zip(&four).all(|(a, b)| a == b || *b == 3));
        // Removing a member moves exactly its users.
        let two = placement(&pool(&[(0, 1), (2, 1)]));
        assert_eq!(moved(&three, &two), three.iter().filter(|&&b| b == 1).count() as f64 / USERS as f64);
        assert!(three.iter().zip(&two).all(|(a, b)| a == b || *a == 1));
        // Doubling one member's weight moves about 1/2 - 1/3 of the users, all of them to it.
        let heavier = placement(&pool(&[(0, 1), (1, 1), (2, 2)]));
        let share = moved(&three, &heavier);
        assert!((share - (0.5 - 1.0 / 3.0)).abs() < 0.01, "{share}");
        assert!(three.iter().zip(&heavier).all(|(a, b)| a == b || *b == 2));
        // Weight 0 (drain) takes nobody; its users spread over the others.
        let drained = placement(&pool(&[(0, 1), (1, 0), (2, 1)]));
        assert!(!drained.contains(&1));
    }

    #[test]
    fn order_is_stable_and_independent_of_member_order() {
        let a = pool(&[(0, 1), (1, 1), (2, 1)]);
        let b = pool(&[(2, 1), (0, 1), (1, 1)]);
        let next = |p: &Pool| Pool { failover: Failover::Next, ..p.clone() };
        for i in 0..1000 {
            let user = format!("u{i}");
            assert_eq!(order(&next(&a), &user, |b| NAMES[b]), order(&next(&b), &user, |b| NAMES[b]));
        }
        // Fixed values: a change of hash would move every user of every fleet at upgrade.
        assert_eq!(stable_hash(&[b"mbox1", b"alice@example.org"]), 14_814_557_778_185_456_337);
        assert_ne!(stable_hash(&[b"mbox1a", b"lice@example.org"]), 14_814_557_778_185_456_337);
        assert_eq!(order(&next(&a), "alice@example.org", |b| NAMES[b]).len(), 3);
    }
}
