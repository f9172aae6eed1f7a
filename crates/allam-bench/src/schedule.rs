//! When each request is sent: a Poisson arrival process at a set rate, or all at once.
//!
//! Gaps between arrivals are exponential with mean `1 / rate`, drawn by inverting the CDF
//! (`-ln(1 - u) / rate` for `u` uniform in [0, 1)), which needs no distribution crate. The
//! whole schedule is computed before the run from a ChaCha8 generator seeded by the caller, so
//! two runs with the same seed offer the server exactly the same load; computing it up front
//! also keeps random-number work out of the timed loop.
//!
//! Invariant: offsets are non-decreasing and the first request is sent at offset zero, so a
//! run's duration does not include an idle wait before the first request.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Offsets from the start of the run at which requests 0..n are sent.
pub(crate) fn arrival_offsets(n: usize, request_rate: Option<f64>, seed: u64) -> Vec<Duration> {
    let Some(rate) = request_rate.filter(|rate| rate.is_finite() && *rate > 0.0) else {
        return vec![Duration::ZERO; n];
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut offsets = Vec::with_capacity(n);
    let mut now_s = 0.0_f64;
    for idx in 0..n {
        if idx > 0 {
            let uniform: f64 = rng.random();
            now_s += -(1.0 - uniform).ln() / rate;
        }
        // Durations past ~584 years saturate instead of panicking on absurd rates.
        offsets.push(Duration::try_from_secs_f64(now_s).unwrap_or(Duration::MAX));
    }
    offsets
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaps_s(offsets: &[Duration]) -> Vec<f64> {
        offsets
            .windows(2)
            .map(|pair| (pair[1] - pair[0]).as_secs_f64())
            .collect()
    }

    #[test]
    fn poisson_gaps_have_the_requested_mean() {
        // 20k exponential gaps: the sample mean's standard error is mean / sqrt(20k) ≈ 0.7 %,
        // so 4 % is more than five standard errors.
        let rate = 8.0;
        let offsets = arrival_offsets(20_001, Some(rate), 7);
        let gaps = gaps_s(&offsets);
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        assert!((mean - 1.0 / rate).abs() < 0.04 / rate, "mean gap {mean}");
        // Exponential: the standard deviation equals the mean, unlike a fixed-interval sender.
        let variance = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
        let std_dev = variance.sqrt();
        assert!(
            (std_dev - mean).abs() < 0.06 * mean,
            "std {std_dev} mean {mean}"
        );
        assert!(gaps.iter().all(|g| *g >= 0.0));
        assert_eq!(offsets[0], Duration::ZERO);
    }

    #[test]
    fn schedule_is_deterministic_under_a_seed() {
        let first = arrival_offsets(100, Some(3.0), 42);
        assert_eq!(first, arrival_offsets(100, Some(3.0), 42));
        assert_ne!(first, arrival_offsets(100, Some(3.0), 43));
    }

    #[test]
    fn no_rate_sends_everything_at_once() {
        assert_eq!(arrival_offsets(3, None, 1), vec![Duration::ZERO; 3]);
        assert_eq!(
            arrival_offsets(2, Some(f64::INFINITY), 1),
            vec![Duration::ZERO; 2]
        );
        assert!(arrival_offsets(0, Some(1.0), 1).is_empty());
    }
}
