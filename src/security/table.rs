//! A bounded table with least-recently-used eviction that never evicts an entry in use.
//!
//! Each entry is either *pinned* (something outside the table still refers to it: an open connection, a
//! login in flight) or in the recency index. Eviction takes the least recently touched unpinned entry in
//! O(log n); a pinned entry is never dropped, so a guard that releases into the table always finds its
//! entry, and the next login cannot get a fresh one while an old one is in use. When every entry is pinned
//! the table is full and says so. No moment that an attacker can choose resets what the table remembers:
//! only entries that nobody has touched for longer than every other unpinned entry are forgotten.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

#[derive(Debug)]
struct Slot<V> {
    value: V,
    /// Position in the recency index; meaningless while pinned.
    stamp: u64,
    pins: u32,
}

/// A map of at most `capacity` entries.
#[derive(Debug)]
pub struct Table<K, V> {
    slots: HashMap<K, Slot<V>>,
    /// Unpinned entries by last touch, oldest first.
    recency: BTreeMap<u64, K>,
    next: u64,
    capacity: usize,
    evicted: u64,
}

impl<K: Hash + Eq + Clone, V> Table<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self { slots: HashMap::new(), recency: BTreeMap::new(), next: 0, capacity: capacity.max(1), evicted: 0 }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Entries dropped to make room since the table was made.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.slots.get(key).map(|s| &s.value)
    }

    /// The entry without marking it used.
    pub fn peek_mut(&mut self, key: &K) -> Option<&mut V> {
        self.slots.get_mut(key).map(|s| &mut s.value)
    }

    /// The entry, marked most recently used.
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let stamp = self.next;
        let slot = self.slots.get_mut(key)?;
        if slot.pins == 0 {
            self.recency.remove(&slot.stamp);
            self.recency.insert(stamp, key.clone());
            self.next += 1;
        }
        slot.stamp = stamp;
        Some(&mut slot.value)
    }

    /// The entry, created with `make` if missing (evicting the least recently used unpinned entry when the
    /// table is full), marked most recently used. `None` when the table is full of pinned entries.
    pub fn entry(&mut self, key: &K, make: impl FnOnce() -> V) -> Option<&mut V> {
        if !self.slots.contains_key(key) {
            if self.slots.len() >= self.capacity {
                let (_, oldest) = self.recency.pop_first()?;
                self.slots.remove(&oldest);
                self.evicted += 1;
            }
            let stamp = self.next;
            self.next += 1;
            self.recency.insert(stamp, key.clone());
            self.slots.insert(key.clone(), Slot { value: make(), stamp, pins: 0 });
        }
        self.get_mut(key)
    }

    /// Marks the entry in use: it cannot be evicted until as many [`Table::unpin`]s.
    pub fn pin(&mut self, key: &K) {
        if let Some(slot) = self.slots.get_mut(key) {
            if slot.pins == 0 {
                self.recency.remove(&slot.stamp);
            }
            slot.pins += 1;
        }
    }

    /// Releases one pin; the last one returns the entry to the recency index as most recently used.
    pub fn unpin(&mut self, key: &K) {
        let stamp = self.next;
        if let Some(slot) = self.slots.get_mut(key) {
            if slot.pins == 0 {
                return;
            }
            slot.pins -= 1;
            if slot.pins == 0 {
                slot.stamp = stamp;
                self.recency.insert(stamp, key.clone());
                self.next += 1;
            }
        }
    }

    /// Drops unpinned entries, oldest first, while `stale` says the oldest is stale; returns how many.
    /// Entries are ordered by last use, so this stops at the first fresh one: O(dropped × log n).
    pub fn expire_oldest(&mut self, mut stale: impl FnMut(&K, &mut V) -> bool) -> usize {
        let mut dropped = 0;
        while let Some((&stamp, key)) = self.recency.first_key_value() {
            let key = key.clone();
            let Some(slot) = self.slots.get_mut(&key) else {
                self.recency.remove(&stamp);
                continue;
            };
            if !stale(&key, &mut slot.value) {
                break;
            }
            self.recency.remove(&stamp);
            self.slots.remove(&key);
            dropped += 1;
        }
        dropped
    }

    /// Drops every unpinned entry for which `keep` is false (a full scan, for rare housekeeping).
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        let recency = &mut self.recency;
        self.slots.retain(|key, slot| {
            if slot.pins > 0 || keep(key, &mut slot.value) {
                return true;
            }
            recency.remove(&slot.stamp);
            false
        });
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.slots.values().map(|s| &s.value)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.slots.iter().map(|(k, s)| (k, &s.value))
    }

    /// Every entry, mutable (recency unchanged).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&K, &mut V)> {
        self.slots.iter_mut().map(|(k, s)| (k, &mut s.value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used() {
        let mut t = Table::new(3);
        for k in 1..=3 {
            t.entry(&k, || k * 10);
        }
        t.get_mut(&1);
        t.entry(&4, || 40);
        assert!(t.get(&2).is_none(), "2 was the least recently used");
        assert_eq!(t.get(&1), Some(&10));
        assert_eq!(t.len(), 3);
        assert_eq!(t.evicted(), 1);
    }

    #[test]
    fn pinned_entries_survive_and_a_full_pinned_table_refuses() {
        let mut t = Table::new(2);
        t.entry(&1, || 1);
        t.entry(&2, || 2);
        t.pin(&1);
        t.pin(&2);
        assert!(t.entry(&3, || 3).is_none());
        t.unpin(&2);
        assert!(t.entry(&3, || 3).is_some());
        assert!(t.get(&1).is_some(), "pinned entry kept");
        assert!(t.get(&2).is_none());
        // Unpinning makes it the most recent.
        t.unpin(&1);
        t.entry(&4, || 4);
        assert!(t.get(&1).is_some() && t.get(&3).is_none());
    }

    #[test]
    fn expire_oldest_stops_at_the_first_fresh_entry() {
        let mut t = Table::new(10);
        for k in 0..6 {
            t.entry(&k, || k);
        }
        t.pin(&0);
        assert_eq!(t.expire_oldest(|_, v| *v < 3), 2, "0 is pinned; 1 and 2 are stale; 3 is fresh");
        assert_eq!(t.len(), 4);
        t.retain(|_, v| *v % 2 == 0);
        let mut left: Vec<_> = t.iter().map(|(k, _)| *k).collect();
        left.sort_unstable();
        assert_eq!(left, vec![0, 4]);
    }

    #[test]
    fn a_flood_stays_within_capacity() {
        let mut t = Table::new(1000);
        for k in 0..100_000u32 {
            t.entry(&k, || ());
        }
        assert_eq!(t.len(), 1000);
        assert_eq!(t.recency.len(), 1000);
        assert!(t.get(&99_999).is_some());
    }
}
