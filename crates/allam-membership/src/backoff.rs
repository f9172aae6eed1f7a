//! Exponential backoff with jitter for every etcd retry loop.
//!
//! Fixed delays make every worker of a cluster reconnect in the same instant after an etcd
//! blip (a thundering herd on a just-restarted etcd); jitter spreads them. "Equal jitter": the
//! delay is uniform in [d/2, d] for the current step d, so it still grows geometrically but no
//! two clients stay in lockstep.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            current: initial,
        }
    }

    /// The next delay (uniform in [step/2, step]), doubling the step up to `max`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = step / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(rand::rng().random_range(0..=jitter_ms))
    }

    pub(crate) fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_inside_bounds() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_millis(1600);
        let mut backoff = Backoff::new(initial, max);
        let mut step = initial;
        for _ in 0..10 {
            let delay = backoff.next_delay();
            assert!(
                delay >= step / 2 && delay <= step,
                "{delay:?} outside [{step:?}/2, {step:?}]"
            );
            step = (step * 2).min(max);
        }
        backoff.reset();
        assert!(backoff.next_delay() <= initial);
    }

    #[test]
    fn delays_are_not_all_equal() {
        let mut delays = std::collections::HashSet::new();
        for _ in 0..20 {
            let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
            delays.insert(backoff.next_delay());
        }
        assert!(delays.len() > 1, "20 draws gave one value: no jitter");
    }
}
