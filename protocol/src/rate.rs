//! Rate limits on what a guest can make the host do (log lines, events).

/// A token bucket: `allow` says whether one more event (a log line, an OOM report the
/// guest sent) may pass now, and how many were suppressed since the last one that did.
/// Holds a burst of `per_sec`, refilled at `per_sec` a second.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: u32,
    tokens: f64,
    last: std::time::Instant,
    suppressed: u64,
}

impl RateLimiter {
    pub fn new(per_sec: u32) -> RateLimiter {
        RateLimiter {
            per_sec,
            tokens: f64::from(per_sec),
            last: std::time::Instant::now(),
            suppressed: 0,
        }
    }

    /// At `now`: `Some(suppressed before this one)` if the line may be logged, else `None`.
    pub fn allow(&mut self, now: std::time::Instant) -> Option<u64> {
        let rate = f64::from(self.per_sec);
        self.tokens = (self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * rate).min(rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}
