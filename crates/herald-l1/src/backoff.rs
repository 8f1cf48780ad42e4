//! Exponential backoff with full jitter for reconnect loops.

use std::time::Duration;

use rand::Rng;

/// Doubles from `base` up to `max`; each delay is drawn uniformly from
/// `[delay/2, delay]` so that many instances do not retry in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { base, max, attempt: 0 }
    }

    /// The default for reconnects: 50 ms doubling to 5 s.
    pub fn reconnect() -> Self {
        Self::new(Duration::from_millis(50), Duration::from_secs(5))
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(16));
        self.attempt = self.attempt.saturating_add(1);
        let delay = self.base.saturating_mul(factor).min(self.max);
        let half = delay / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    /// Call after a success, so the next failure starts small again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(5) && first <= Duration::from_millis(10));
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_millis(100));
        }
        assert!(b.next_delay() >= Duration::from_millis(50));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(10));
    }
}
