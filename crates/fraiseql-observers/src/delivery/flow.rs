//! Flow control per endpoint (an action's target: a URL's host and port, an SMTP server, a
//! Redis server, a push provider): at most `max_in_flight` requests at once, at most
//! `rate_limit` requests per second, and a circuit breaker that stops sending to an endpoint
//! that keeps failing. A delivery waits in memory for its endpoint at most [`MAX_WAIT`]: one
//! whose breaker is open (or opens while it waits), whose rate-limit token is more than
//! [`MAX_WAIT`] away, or that gets no in-flight permit within [`MAX_WAIT`] (the endpoint is
//! saturated, e.g. by hung requests) is handed to the durable retry queue (parked per entity, in
//! order; not counted as an attempt). So one slow, hung or rate-limited receiver never holds back
//! the others: the events in flight are never held by deliveries waiting for it.
//!
//! [`Breaker`] and [`TokenBucket`] are pure (the caller passes the clock in); [`Endpoint`] holds
//! them with the in-flight permits.

use crate::actions::Action;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

pub use crate::actions::RateLimit;
use crate::metrics as m;

/// When the breaker opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive retryable failures (timeouts included) that open the breaker; 0 never opens.
    pub failures: u32,
    /// How long it stays open before one probe is let through.
    pub cool_down: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failures: 5,
            cool_down: Duration::from_secs(10),
        }
    }
}

/// The limits of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_in_flight: usize,
    pub rate_limit: Option<RateLimit>,
    pub breaker: BreakerSettings,
}

/// The longest a delivery waits in memory for its endpoint (a rate-limit token, then an
/// in-flight permit) before it is handed to the retry queue instead.
pub const MAX_WAIT: Duration = Duration::from_secs(1);

/// What the breaker lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Closed: send.
    Pass,
    /// Half-open: this is the one probe; its outcome closes or reopens the breaker.
    Probe,
    /// Open (or a probe is out): do not send before this.
    Wait(Instant),
}

/// A circuit breaker. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Breaker {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker::Closed { failures: 0 }
    }
}

impl Breaker {
    /// May a request go at `now`?
    pub fn gate(&mut self, now: Instant, settings: &BreakerSettings) -> Gate {
        match *self {
            Breaker::Closed { .. } => Gate::Pass,
            Breaker::Open { until } if now < until => Gate::Wait(until),
            Breaker::Open { .. } | Breaker::HalfOpen { probing: false } => {
                *self = Breaker::HalfOpen { probing: true };
                Gate::Probe
            }
            Breaker::HalfOpen { probing: true } => {
                Gate::Wait(now + settings.cool_down.min(MAX_WAIT))
            }
        }
    }

    /// Record the outcome of a request let through: `failed` for a retryable failure (the
    /// endpoint did not answer usefully: a timeout, a refused connection, a 5xx, a 429).
    /// Returns whether this opened the breaker.
    pub fn record(&mut self, failed: bool, now: Instant, settings: &BreakerSettings) -> bool {
        let open = |b: &mut Breaker| {
            *b = Breaker::Open {
                until: now + settings.cool_down,
            };
            true
        };
        match (self.clone(), failed) {
            (_, false) => {
                *self = Breaker::Closed { failures: 0 };
                false
            }
            (Breaker::Closed { failures }, true) => {
                let failures = failures + 1;
                if settings.failures > 0 && failures >= settings.failures {
                    open(self)
                } else {
                    *self = Breaker::Closed { failures };
                    false
                }
            }
            (Breaker::HalfOpen { .. }, true) => open(self),
            // An answer from before the breaker opened: it stays open.
            (Breaker::Open { .. }, true) => false,
        }
    }

    pub fn is_open(&self) -> bool {
        !matches!(self, Breaker::Closed { .. })
    }
}

/// A token bucket. Pure.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub fn new(limit: &RateLimit, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: f64::from(limit.burst),
            at: now,
        }
    }

    /// Take a token at `now`. `Ok(wait)`: taken, to be used after `wait` (zero when one was
    /// there); `Err(wait)`: none taken, the next one is `wait` away and longer than `max_wait`.
    pub fn take(
        &mut self,
        limit: &RateLimit,
        now: Instant,
        max_wait: Duration,
    ) -> Result<Duration, Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.per_second).min(f64::from(limit.burst));
        self.at = now;
        let wait = if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / limit.per_second)
        };
        if wait > max_wait {
            return Err(wait);
        }
        // Taken now, possibly ahead of time: later callers wait behind it.
        self.tokens -= 1.0;
        Ok(wait)
    }
}

/// Why a delivery was not sent now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    BreakerOpen,
    RateLimited,
    /// No in-flight permit within [`MAX_WAIT`]: the endpoint's requests are all still running.
    Saturated,
}

impl Throttle {
    /// For the retry queue's `last_error` and logs.
    pub fn describe(self) -> &'static str {
        match self {
            Throttle::BreakerOpen => "circuit breaker open",
            Throttle::RateLimited => "rate limit reached",
            Throttle::Saturated => "endpoint saturated (max_in_flight requests still running)",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Throttle::BreakerOpen => "breaker_open",
            Throttle::RateLimited => "rate_limited",
            Throttle::Saturated => "saturated",
        }
    }
}

/// Leave to send one request, held while it runs.
pub struct Pass {
    _permit: OwnedSemaphorePermit,
    in_flight: metrics::Gauge,
    /// This request is the breaker's probe.
    pub probe: bool,
}

impl std::fmt::Debug for Pass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pass").field("probe", &self.probe).finish()
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        self.in_flight.decrement(1.0);
    }
}

/// The endpoint's metric handles, resolved once.
struct Gauges {
    in_flight: metrics::Gauge,
    breaker_open: metrics::Gauge,
    throttled: [metrics::Counter; 3],
}

impl std::fmt::Debug for Gauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gauges")
    }
}

/// One endpoint's live state, shared by every action that sends to it.
#[derive(Debug)]
pub struct Endpoint {
    name: String,
    limits: Limits,
    in_flight: Arc<Semaphore>,
    bucket: Mutex<Option<TokenBucket>>,
    breaker: Mutex<Breaker>,
    /// Woken when the breaker opens: deliveries waiting for a permit leave for the retry queue.
    opened: Notify,
    metrics: Gauges,
}

impl Endpoint {
    pub fn new(name: String, limits: Limits) -> Endpoint {
        let throttled = |why: Throttle| metrics::counter!(m::ENDPOINT_THROTTLED, "endpoint" => name.clone(), "reason" => why.as_str());
        let metrics = Gauges {
            in_flight: metrics::gauge!(m::ENDPOINT_IN_FLIGHT, "endpoint" => name.clone()),
            breaker_open: metrics::gauge!(m::ENDPOINT_BREAKER_OPEN, "endpoint" => name.clone()),
            throttled: [
                throttled(Throttle::BreakerOpen),
                throttled(Throttle::RateLimited),
                throttled(Throttle::Saturated),
            ],
        };
        Endpoint {
            metrics,
            bucket: Mutex::new(
                limits
                    .rate_limit
                    .map(|r| TokenBucket::new(&r, Instant::now())),
            ),
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight.max(1))),
            breaker: Mutex::new(Breaker::default()),
            opened: Notify::new(),
            name,
            limits,
        }
    }

    /// Its name in metrics and logs (`host:port`, never a secret).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Leave to send now (after a wait of at most about [`MAX_WAIT`] for a rate-limit token and
    /// as long again for an in-flight permit), or how long to wait instead and why.
    pub async fn admit(&self) -> Result<Pass, (Duration, Throttle)> {
        // Registered before the breaker is read: an opening after this wakes the wait below.
        let opened = self.opened.notified();
        tokio::pin!(opened);
        opened.as_mut().enable();
        let now = Instant::now();
        let gate = self.lock_breaker().gate(now, &self.limits.breaker);
        let probe = match gate {
            Gate::Wait(until) => return self.throttled(until - now, Throttle::BreakerOpen),
            Gate::Probe => true,
            Gate::Pass => false,
        };
        self.wait_turn(probe, opened).await
    }

    async fn wait_turn(
        &self,
        probe: bool,
        opened: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
    ) -> Result<Pass, (Duration, Throttle)> {
        if let Some(limit) = &self.limits.rate_limit {
            let taken = self
                .bucket
                .lock()
                .expect("bucket lock poisoned")
                .as_mut()
                .map(|b| b.take(limit, Instant::now(), MAX_WAIT));
            match taken {
                Some(Err(wait)) => return self.unprobe(probe, wait, Throttle::RateLimited),
                Some(Ok(wait)) if !wait.is_zero() => tokio::time::sleep(wait).await,
                _ => {}
            }
        }
        // Bounded: a delivery never holds its event in flight (and its lane's room) for longer
        // than MAX_WAIT behind requests that may run to their timeout.
        let permit = tokio::select! {
            biased;
            permit = self.in_flight.clone().acquire_owned() => {
                permit.expect("the in-flight semaphore is never closed")
            }
            () = opened => {
                let cool_down = self.limits.breaker.cool_down;
                return self.unprobe(probe, cool_down, Throttle::BreakerOpen);
            }
            () = tokio::time::sleep(MAX_WAIT) => {
                return self.unprobe(probe, MAX_WAIT, Throttle::Saturated);
            }
        };
        self.metrics.in_flight.increment(1.0);
        Ok(Pass {
            _permit: permit,
            in_flight: self.metrics.in_flight.clone(),
            probe,
        })
    }

    /// Record the outcome of a request sent with a [`Pass`]: `failed` when it failed in a way
    /// that says the endpoint is unwell (a retryable failure).
    pub fn record(&self, failed: bool) {
        let (opened, open) = {
            let mut breaker = self.lock_breaker();
            let opened = breaker.record(failed, Instant::now(), &self.limits.breaker);
            (opened, breaker.is_open())
        };
        self.metrics.breaker_open.set(if open { 1.0 } else { 0.0 });
        if opened {
            self.opened.notify_waiters();
            tracing::warn!(endpoint = %self.name, failures = self.limits.breaker.failures,
                cool_down_ms = self.limits.breaker.cool_down.as_millis() as u64,
                "circuit breaker open: deliveries to this endpoint wait in the retry queue");
        }
    }

    /// A probe that was let through but not sent: let the next one probe.
    fn unprobe(
        &self,
        probe: bool,
        wait: Duration,
        why: Throttle,
    ) -> Result<Pass, (Duration, Throttle)> {
        if probe {
            *self.lock_breaker() = Breaker::HalfOpen { probing: false };
        }
        self.throttled(wait, why)
    }

    fn throttled(&self, wait: Duration, why: Throttle) -> Result<Pass, (Duration, Throttle)> {
        self.metrics.throttled[why as usize].increment(1);
        Err((wait, why))
    }

    fn lock_breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().expect("breaker lock poisoned")
    }
}

/// The endpoint of every action (`[observer][action]`, from each observer's actions). Actions
/// that send to the same endpoint share it, under the strictest of their limits; `defaults` fill
/// in what an action does not set.
pub fn endpoints<'a>(
    observers: impl Iterator<Item = &'a [Action]> + Clone,
    defaults: Limits,
) -> Vec<Vec<Arc<Endpoint>>> {
    let mut limits: HashMap<String, Limits> = HashMap::new();
    for action in observers.clone().flatten() {
        let own = action.limits();
        let max = own.max_in_flight.unwrap_or(defaults.max_in_flight);
        let rate = own.rate_limit.or(defaults.rate_limit);
        limits
            .entry(action.endpoint())
            .and_modify(|l| {
                l.max_in_flight = l.max_in_flight.min(max);
                l.rate_limit = match (l.rate_limit, rate) {
                    (Some(a), Some(b)) => Some(if b.per_second < a.per_second { b } else { a }),
                    (a, b) => a.or(b),
                };
            })
            .or_insert(Limits {
                max_in_flight: max,
                rate_limit: rate,
                breaker: defaults.breaker,
            });
    }
    let shared: HashMap<String, Arc<Endpoint>> = limits
        .into_iter()
        .map(|(name, l)| (name.clone(), Arc::new(Endpoint::new(name, l))))
        .collect();
    observers
        .map(|actions| {
            actions
                .iter()
                .map(|a| shared[&a.endpoint()].clone())
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(failures: u32) -> BreakerSettings {
        BreakerSettings {
            failures,
            cool_down: Duration::from_secs(10),
        }
    }

    #[test]
    fn the_breaker_opens_after_consecutive_failures_only() {
        let (s, t0) = (settings(3), Instant::now());
        let mut b = Breaker::default();
        assert!(!b.record(true, t0, &s));
        assert!(!b.record(true, t0, &s));
        assert!(!b.record(false, t0, &s), "a success resets the count");
        assert!(!b.record(true, t0, &s));
        assert!(!b.record(true, t0, &s));
        assert_eq!(b.gate(t0, &s), Gate::Pass);
        assert!(b.record(true, t0, &s), "the third in a row opens it");
        assert_eq!(b.gate(t0, &s), Gate::Wait(t0 + s.cool_down));
    }

    #[test]
    fn after_the_cool_down_one_probe_decides() {
        let (s, t0) = (settings(1), Instant::now());
        let mut b = Breaker::default();
        b.record(true, t0, &s);
        let later = t0 + s.cool_down;
        assert_eq!(b.gate(later, &s), Gate::Probe);
        assert!(
            matches!(b.gate(later, &s), Gate::Wait(_)),
            "one probe at a time"
        );
        // The probe fails: open again for a full cool-down.
        assert!(b.record(true, later, &s));
        assert_eq!(b.gate(later, &s), Gate::Wait(later + s.cool_down));
        // The next probe succeeds: closed.
        let again = later + s.cool_down;
        assert_eq!(b.gate(again, &s), Gate::Probe);
        b.record(false, again, &s);
        assert_eq!(b.gate(again, &s), Gate::Pass);
    }

    #[test]
    fn zero_failures_never_opens() {
        let (s, t0) = (settings(0), Instant::now());
        let mut b = Breaker::default();
        for _ in 0..100 {
            assert!(!b.record(true, t0, &s));
        }
        assert_eq!(b.gate(t0, &s), Gate::Pass);
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let limit = RateLimit {
            per_second: 10.0,
            burst: 3,
        };
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(&limit, t0);
        for _ in 0..3 {
            assert_eq!(bucket.take(&limit, t0, MAX_WAIT), Ok(Duration::ZERO));
        }
        // The fourth waits a tenth of a second, the fifth two tenths.
        let wait = bucket.take(&limit, t0, MAX_WAIT).unwrap();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        let wait = bucket.take(&limit, t0, MAX_WAIT).unwrap();
        assert!((wait.as_secs_f64() - 0.2).abs() < 1e-9, "{wait:?}");
        // Past the longest wait: refused, nothing taken.
        let refused = bucket
            .take(&limit, t0, Duration::from_millis(250))
            .unwrap_err();
        assert!((refused.as_secs_f64() - 0.3).abs() < 1e-9, "{refused:?}");
        // A second later the bucket is full again (never above the burst).
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..3 {
            assert_eq!(bucket.take(&limit, t1, MAX_WAIT), Ok(Duration::ZERO));
        }
    }

    #[tokio::test]
    async fn an_endpoint_refuses_while_its_breaker_is_open() {
        let limits = Limits {
            max_in_flight: 2,
            rate_limit: None,
            breaker: settings(2),
        };
        let endpoint = Endpoint::new("example.com:443".into(), limits);
        let pass = endpoint.admit().await.unwrap();
        assert!(!pass.probe);
        drop(pass);
        endpoint.record(true);
        endpoint.record(true);
        let (wait, why) = endpoint.admit().await.unwrap_err();
        assert_eq!(why, Throttle::BreakerOpen);
        assert!(wait <= Duration::from_secs(10) && wait > Duration::from_secs(9));
    }

    #[tokio::test]
    async fn in_flight_is_bounded() {
        let limits = Limits {
            max_in_flight: 1,
            rate_limit: None,
            breaker: settings(5),
        };
        let endpoint = Arc::new(Endpoint::new("e:80".into(), limits));
        let first = endpoint.admit().await.unwrap();
        let waiter = {
            let endpoint = endpoint.clone();
            tokio::spawn(async move { endpoint.admit().await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "the second waits for the first");
        drop(first);
        waiter.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_delivery_waits_for_a_permit_at_most_max_wait() {
        let limits = Limits {
            max_in_flight: 1,
            rate_limit: None,
            breaker: settings(5),
        };
        let endpoint = Endpoint::new("e:80".into(), limits);
        let _hung = endpoint.admit().await.unwrap();
        let (wait, why) = endpoint.admit().await.unwrap_err();
        assert_eq!((wait, why), (MAX_WAIT, Throttle::Saturated));
    }

    #[tokio::test]
    async fn the_breaker_opening_sends_the_waiting_deliveries_away() {
        let limits = Limits {
            max_in_flight: 1,
            rate_limit: None,
            breaker: settings(1),
        };
        let endpoint = Arc::new(Endpoint::new("e:80".into(), limits));
        let first = endpoint.admit().await.unwrap();
        let waiter = {
            let endpoint = endpoint.clone();
            tokio::spawn(async move { endpoint.admit().await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The request holding the only permit fails: the breaker opens, the permit is still held.
        endpoint.record(true);
        let (_, why) = waiter.await.unwrap().unwrap_err();
        assert_eq!(why, Throttle::BreakerOpen);
        drop(first);
    }
}
