//! The retry schedule: how long to wait before the next attempt. Pure.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The longest `Retry-After` a receiver can impose on us.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackoffStrategy {
    /// `initial * 2^(n-1)`
    #[default]
    Exponential,
    /// `initial * n`
    Linear,
    /// `initial`
    Fixed,
}

/// How often and how patiently one action is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = never retry).
    pub max_attempts: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
    pub strategy: BackoffStrategy,
    /// Spread retries over `[delay/2, delay]` so that failures don't retry in lockstep.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            strategy: BackoffStrategy::Exponential,
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// Whether another attempt is allowed after `attempts` attempts have failed.
    pub fn allows_another(&self, attempts: u32) -> bool {
        attempts < self.max_attempts
    }

    /// The wait after `attempts` failed attempts (`attempts >= 1`) before the next one.
    /// `random` is a number in `[0, 1)` (the caller draws it, so this stays pure and testable);
    /// `retry_after` is what the receiver asked for, honoured up to [`MAX_RETRY_AFTER`] even
    /// beyond `max_delay`.
    pub fn delay(&self, attempts: u32, random: f64, retry_after: Option<Duration>) -> Duration {
        let n = attempts.max(1);
        let base = match self.strategy {
            BackoffStrategy::Exponential => self
                .initial_delay
                .saturating_mul(2u32.saturating_pow((n - 1).min(31))),
            BackoffStrategy::Linear => self.initial_delay.saturating_mul(n),
            BackoffStrategy::Fixed => self.initial_delay,
        }
        .min(self.max_delay);
        let delay = if self.jitter {
            base.mul_f64(0.5 + 0.5 * random.clamp(0.0, 1.0))
        } else {
            base
        };
        match retry_after {
            Some(asked) => delay.max(asked.min(MAX_RETRY_AFTER)),
            None => delay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(strategy: BackoffStrategy) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 10,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            strategy,
            jitter: false,
        }
    }

    fn delays(p: &RetryPolicy) -> Vec<u128> {
        (1..=6).map(|n| p.delay(n, 0.0, None).as_millis()).collect()
    }

    #[test]
    fn the_three_strategies_grow_as_documented_and_are_capped() {
        assert_eq!(
            delays(&policy(BackoffStrategy::Exponential)),
            [100, 200, 400, 800, 1000, 1000]
        );
        assert_eq!(
            delays(&policy(BackoffStrategy::Linear)),
            [100, 200, 300, 400, 500, 600]
        );
        assert_eq!(delays(&policy(BackoffStrategy::Fixed)), [100; 6]);
    }

    #[test]
    fn jitter_stays_within_half_to_full_delay() {
        let mut p = policy(BackoffStrategy::Exponential);
        p.jitter = true;
        assert_eq!(p.delay(3, 0.0, None), Duration::from_millis(200));
        assert_eq!(p.delay(3, 0.999_999, None).as_millis(), 399);
        assert_eq!(p.delay(3, 0.5, None), Duration::from_millis(300));
    }

    #[test]
    fn retry_after_is_honoured_within_bounds() {
        let p = policy(BackoffStrategy::Fixed);
        assert_eq!(
            p.delay(1, 0.0, Some(Duration::from_secs(5))),
            Duration::from_secs(5)
        );
        assert_eq!(
            p.delay(1, 0.0, Some(Duration::from_millis(10))),
            Duration::from_millis(100)
        );
        assert_eq!(
            p.delay(1, 0.0, Some(Duration::from_secs(86_400))),
            MAX_RETRY_AFTER
        );
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let p = policy(BackoffStrategy::Exponential);
        assert_eq!(p.delay(u32::MAX, 0.0, None), Duration::from_millis(1000));
        assert!(p.allows_another(9));
        assert!(!p.allows_another(10));
    }
}
