use std::time::Duration;

/// Delays between reconnection attempts: doubling from `initial` up to `max`, so a restarting
/// Postgres is not hammered while a brief blip costs only a tenth of a second.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) const INITIAL: Duration = Duration::from_millis(100);
    pub(crate) const MAX: Duration = Duration::from_secs(5);

    pub(crate) fn new() -> Self {
        Self::with_bounds(Self::INITIAL, Self::MAX)
    }

    pub(crate) fn with_bounds(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            failures: 0,
        }
    }

    /// The delay before the next attempt; each call counts one more failure.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.failures = self.failures.saturating_add(1);
        self.initial.saturating_mul(factor).min(self.max)
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_100ms_and_caps_at_5s() {
        let mut backoff = Backoff::new();
        let delays: Vec<u128> = (0..10).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]
        );
    }

    #[test]
    fn never_overflows() {
        let mut backoff = Backoff::new();
        for _ in 0..200 {
            assert!(backoff.next_delay() <= Backoff::MAX);
        }
        assert_eq!(backoff.next_delay(), Backoff::MAX);
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::new();
        backoff.next_delay();
        backoff.next_delay();
        backoff.reset();
        assert_eq!(backoff.next_delay(), Backoff::INITIAL);
    }
}
