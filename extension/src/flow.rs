//! Flow control decided in the scheduler's memory: rate-limit windows per key and the
//! round-robin order across concurrency keys.
//!
//! Pure Rust, no Postgres. The scheduler is the only process that admits tasks, so a fleet-wide
//! limit is a counter here, not a lock in the database: no claim races, no retries.

use std::collections::{HashMap, VecDeque};

use crate::queue::Micros;

/// A limit: at most `max_units` units are consumed in any interval of length `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub max_units: i64,
    pub per: Micros,
}

/// One key's consumption over the last `per`, as a sliding window: units consumed at `t` count
/// until `t + per`. A fixed window refilled at its boundary admits up to twice the limit in an
/// interval that spans the boundary; this never admits more than the limit in any interval.
///
/// Consumption is kept in at most ~1,000 buckets per window: a unit's expiry is rounded up to
/// the next bucket boundary (so it counts slightly longer, never shorter) and units with the
/// same expiry share one entry.
#[derive(Debug, Clone)]
pub struct RateWindow {
    limit: Limit,
    /// (expires at, units), oldest first.
    used: VecDeque<(Micros, i64)>,
    used_total: i64,
}

const BUCKETS_PER_WINDOW: i64 = 1_000;
const MIN_BUCKET: Micros = 1_000;

impl RateWindow {
    pub fn new(limit: Limit) -> Self {
        RateWindow {
            limit,
            used: VecDeque::new(),
            used_total: 0,
        }
    }

    pub fn limit(&self) -> Limit {
        self.limit
    }

    /// A changed limit applies to the next admission; units already consumed stay counted,
    /// for the new `per` if it is longer (their expiry does not move).
    pub fn set_limit(&mut self, limit: Limit) {
        self.limit = limit;
    }

    fn bucket(&self) -> Micros {
        (self.limit.per / BUCKETS_PER_WINDOW).max(MIN_BUCKET)
    }

    fn expire(&mut self, now: Micros) {
        while let Some(&(expires_at, units)) = self.used.front() {
            if expires_at > now {
                break;
            }
            self.used.pop_front();
            self.used_total -= units;
        }
    }

    /// Units that can be consumed at `now`.
    pub fn available(&mut self, now: Micros) -> i64 {
        self.expire(now);
        (self.limit.max_units - self.used_total).max(0)
    }

    /// Consumes `units` at `now` if they fit; returns whether they did.
    pub fn try_consume(&mut self, now: Micros, units: i64) -> bool {
        if units > self.available(now) {
            return false;
        }
        self.consume(now, units);
        true
    }

    /// Consumes without checking (rebuilding the window from the table after a restart).
    pub fn consume(&mut self, at: Micros, units: i64) {
        let bucket = self.bucket();
        let end = at.saturating_add(self.limit.per);
        let expires_at = end
            .div_euclid(bucket)
            .saturating_add(1)
            .saturating_mul(bucket);
        match self.used.back_mut() {
            Some((last, n)) if *last == expires_at => *n += units,
            // Rebuilt consumption may come in any order; keep the deque sorted.
            Some((last, _)) if *last > expires_at => {
                let at = self.used.partition_point(|(e, _)| *e <= expires_at);
                self.used.insert(at, (expires_at, units));
            }
            _ => self.used.push_back((expires_at, units)),
        }
        self.used_total += units;
    }

    /// When `units` will fit, if consumption alone is in the way (`None`: they never fit, or
    /// fit now).
    pub fn fits_at(&mut self, now: Micros, units: i64) -> Option<Micros> {
        if units > self.limit.max_units || units <= self.available(now) {
            return None;
        }
        let mut freed = self.limit.max_units - self.used_total;
        for &(expires_at, n) in &self.used {
            freed += n;
            if freed >= units {
                return Some(expires_at);
            }
        }
        None
    }

    pub fn used(&self) -> i64 {
        self.used_total
    }
}

/// The units a task consumes from one key when it is admitted, and the limit that applies if
/// the key has no declared (static) limit: a dynamic key's limit comes from its definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateUse {
    pub key: String,
    pub units: i64,
    pub dynamic_limit: Option<Limit>,
}

/// Every key's window. Static limits are declared with `sluice.set_rate_limit`; a dynamic key
/// gets its window from the first task that uses it, and later tasks' definitions update it.
#[derive(Debug, Default)]
pub struct RateLimits {
    windows: HashMap<String, RateWindow>,
    declared: HashMap<String, Limit>,
}

/// Why a task cannot be admitted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// Consumption is in the way until then.
    Until(Micros),
    /// The task asks for more units than the key's limit: it can never run.
    OverLimit,
}

impl RateLimits {
    /// Replaces the declared limits; a key no longer declared keeps its window (tasks that
    /// name it by its dynamic limit still use it).
    pub fn set_declared(&mut self, declared: HashMap<String, Limit>) {
        for (key, limit) in &declared {
            match self.windows.get_mut(key) {
                Some(w) => w.set_limit(*limit),
                None => {
                    self.windows.insert(key.clone(), RateWindow::new(*limit));
                }
            }
        }
        self.declared = declared;
    }

    fn limit_for(&self, u: &RateUse) -> Option<Limit> {
        self.declared.get(&u.key).copied().or(u.dynamic_limit)
    }

    fn window(&mut self, u: &RateUse) -> Option<&mut RateWindow> {
        let limit = self.limit_for(u)?;
        // Looked up before inserting: the key is cloned only for a new window.
        if !self.windows.contains_key(&u.key) {
            self.windows.insert(u.key.clone(), RateWindow::new(limit));
        }
        let w = self.windows.get_mut(&u.key)?;
        if w.limit() != limit {
            w.set_limit(limit);
        }
        Some(w)
    }

    /// Whether all of a task's uses fit at `now`; a key without any limit never blocks.
    pub fn check(&mut self, uses: &[RateUse], now: Micros) -> Result<(), Blocked> {
        let mut until = None;
        for u in uses {
            let Some(w) = self.window(u) else { continue };
            if u.units > w.limit().max_units {
                return Err(Blocked::OverLimit);
            }
            if u.units > w.available(now) {
                let at = w.fits_at(now, u.units).unwrap_or(now);
                until = Some(until.map_or(at, |t: Micros| t.max(at)));
            }
        }
        match until {
            Some(t) => Err(Blocked::Until(t)),
            None => Ok(()),
        }
    }

    /// Admits a task: consumes all of its uses, or none of them.
    pub fn try_admit(&mut self, uses: &[RateUse], now: Micros) -> Result<(), Blocked> {
        self.check(uses, now)?;
        for u in uses {
            if let Some(w) = self.window(u) {
                w.consume(now, u.units);
            }
        }
        Ok(())
    }

    /// Counts a start that happened before this scheduler (rebuilt from the table).
    pub fn replay(&mut self, uses: &[RateUse], at: Micros) {
        for u in uses {
            if let Some(w) = self.window(u) {
                w.consume(at, u.units);
            }
        }
    }

    /// Drops windows of dynamic keys with nothing consumed (keys seen once do not pile up).
    pub fn forget_idle(&mut self, now: Micros) {
        let declared = &self.declared;
        self.windows.retain(|k, w| {
            w.expire(now);
            declared.contains_key(k) || w.used() > 0
        });
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    const S: Micros = 1_000_000;

    fn limit(max_units: i64, per: Micros) -> Limit {
        Limit { max_units, per }
    }

    fn uses(key: &str, units: i64) -> Vec<RateUse> {
        vec![RateUse {
            key: key.into(),
            units,
            dynamic_limit: None,
        }]
    }

    #[test]
    fn a_window_never_admits_more_than_the_limit_in_any_interval() {
        let mut w = RateWindow::new(limit(10, S));
        let mut starts = Vec::new();
        // Try to start one unit every 10 ms for 5 s.
        for t in (0..5 * S).step_by(10_000) {
            if w.try_consume(t, 1) {
                starts.push(t);
            }
        }
        for (i, &t) in starts.iter().enumerate() {
            let in_window = starts[i..].iter().take_while(|&&u| u < t + S).count();
            assert!(in_window <= 10, "{in_window} starts in the second from {t}");
        }
        // And it does not waste the limit: about 10 per second (bucket rounding costs < 1%).
        assert!(starts.len() >= 49, "only {} starts in 5 s", starts.len());
    }

    #[test]
    fn fits_at_is_when_enough_expires() {
        let mut w = RateWindow::new(limit(3, S));
        assert!(w.try_consume(0, 2));
        assert!(w.try_consume(S / 2, 1));
        assert_eq!(w.available(S / 2), 0);
        let at = w.fits_at(S / 2, 2).unwrap();
        assert!((S..S + S / 500).contains(&at), "{at}");
        assert_eq!(w.fits_at(S / 2, 4), None);
        assert_eq!(w.available(at), 2);
    }

    #[test]
    fn a_lowered_limit_applies_to_the_next_admission() {
        let mut rl = RateLimits::default();
        rl.set_declared(HashMap::from([("k".to_string(), limit(5, S))]));
        assert!(rl.try_admit(&uses("k", 3), 0).is_ok());
        rl.set_declared(HashMap::from([("k".to_string(), limit(3, S))]));
        assert!(matches!(
            rl.try_admit(&uses("k", 1), 1),
            Err(Blocked::Until(_))
        ));
        assert_eq!(rl.try_admit(&uses("k", 4), 1), Err(Blocked::OverLimit));
    }

    #[test]
    fn all_or_nothing_across_keys() {
        let mut rl = RateLimits::default();
        rl.set_declared(HashMap::from([
            ("a".to_string(), limit(5, S)),
            ("b".to_string(), limit(1, S)),
        ]));
        let both = [uses("a", 1), uses("b", 1)].concat();
        assert!(rl.try_admit(&both, 0).is_ok());
        assert!(rl.try_admit(&both, 1).is_err());
        // a was not consumed by the failed admission
        assert!(rl.try_admit(&uses("a", 4), 2).is_ok());
    }

    #[test]
    fn dynamic_keys_take_their_definitions_limit_and_unknown_keys_do_not_block() {
        let mut rl = RateLimits::default();
        let user = |k: &str| RateUse {
            key: k.into(),
            units: 1,
            dynamic_limit: Some(limit(1, S)),
        };
        assert!(rl.try_admit(&[user("u1")], 0).is_ok());
        assert!(rl.try_admit(&[user("u2")], 0).is_ok());
        assert!(rl.try_admit(&[user("u1")], 1).is_err());
        assert!(rl.try_admit(&uses("undeclared", 100), 1).is_ok());
        rl.forget_idle(3 * S);
        assert!(rl.windows.is_empty(), "idle dynamic windows are dropped");
    }

    #[test]
    fn replayed_starts_count_after_a_restart() {
        let mut rl = RateLimits::default();
        rl.set_declared(HashMap::from([("k".to_string(), limit(2, 10 * S))]));
        rl.replay(&uses("k", 1), 5 * S);
        rl.replay(&uses("k", 1), S);
        assert!(rl.try_admit(&uses("k", 1), 6 * S).is_err());
        // the older start expires at 11 s
        assert!(rl.try_admit(&uses("k", 1), 11 * S + 20_000).is_ok());
    }
}
