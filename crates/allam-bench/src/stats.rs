//! Summary statistics of latency samples: mean and percentiles.
//!
//! Percentiles use linear interpolation between closest ranks (numpy's default `linear`
//! method, which `vllm bench serve` reports through `np.percentile`), so our p50/p90/p99 can
//! be compared with theirs: for sorted samples `x[0..n]` and `p` in [0, 100], the rank is
//! `r = p / 100 * (n - 1)` and the result `x[floor(r)] + (r - floor(r)) * (x[ceil(r)] -
//! x[floor(r)])`. Nearest-rank would jump between samples and hide tails on small runs.
//!
//! Invariant: no statistic is reported over zero samples; the caller gets `None` instead of a
//! zero that would read as "instant".

use serde::Serialize;

/// Mean and percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencyStats {
    /// How many samples the statistics cover.
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

impl LatencyStats {
    /// Statistics over `samples` (any order); `None` when there are none. Non-finite samples
    /// are dropped: a clock cannot produce them, so they would only come from a division by a
    /// zero token count upstream.
    pub(crate) fn from_samples(samples: &[f64]) -> Option<LatencyStats> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let sum: f64 = sorted.iter().sum();
        Some(LatencyStats {
            count: sorted.len(),
            mean: sum / sorted.len() as f64,
            p50: percentile_sorted(&sorted, 50.0),
            p90: percentile_sorted(&sorted, 90.0),
            p99: percentile_sorted(&sorted, 99.0),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        })
    }
}

/// The `p`-th percentile (0..=100) of ascending, non-empty `sorted`, by linear interpolation.
pub(crate) fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    debug_assert!(!sorted.is_empty(), "callers check for samples first");
    let last = sorted.len() - 1;
    let rank = (p.clamp(0.0, 100.0) / 100.0) * last as f64;
    let lower = rank.floor() as usize;
    let upper = rank.ceil() as usize;
    let fraction = rank - lower as f64;
    sorted[lower.min(last)] + fraction * (sorted[upper.min(last)] - sorted[lower.min(last)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn percentiles_interpolate_between_ranks() {
        // Samples 1..=10: rank for p90 is 0.9 * 9 = 8.1, between x[8] = 9 and x[9] = 10.
        let samples: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        let stats = LatencyStats::from_samples(&samples).expect("ten samples");
        assert_eq!(stats.count, 10);
        assert!(close(stats.mean, 5.5), "{stats:?}");
        assert!(close(stats.p50, 5.5), "{stats:?}");
        assert!(close(stats.p90, 9.1), "{stats:?}");
        assert!(close(stats.p99, 9.91), "{stats:?}");
        assert!(close(stats.min, 1.0) && close(stats.max, 10.0), "{stats:?}");
    }

    #[test]
    fn percentiles_of_edge_cases() {
        let one = LatencyStats::from_samples(&[42.0]).expect("one sample");
        assert!(close(one.p50, 42.0) && close(one.p99, 42.0) && close(one.mean, 42.0));
        let two = [10.0, 20.0];
        assert!(close(percentile_sorted(&two, 0.0), 10.0));
        assert!(close(percentile_sorted(&two, 100.0), 20.0));
        // rank 0.99 * 1 = 0.99 → 10 + 0.99 * 10.
        assert!(close(percentile_sorted(&two, 99.0), 19.9));
        assert!(close(percentile_sorted(&two, 250.0), 20.0));
        assert!(LatencyStats::from_samples(&[]).is_none());
        assert!(LatencyStats::from_samples(&[f64::NAN, f64::INFINITY]).is_none());
    }

    #[test]
    fn percentiles_match_a_brute_force_definition() {
        // Independent check: the p-th percentile is the value v where the piecewise-linear
        // empirical CDF through (x[i], i / (n - 1)) reaches p / 100; walk it segment by segment.
        let samples = [3.0, 9.0, 1.0, 7.0, 7.0, 20.0, 4.0];
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len() as f64;
        for p in [0.0, 12.5, 50.0, 66.0, 90.0, 99.0, 100.0] {
            let target = p / 100.0;
            let mut expected = sorted[sorted.len() - 1];
            for i in 0..sorted.len() - 1 {
                let (c0, c1) = (i as f64 / (n - 1.0), (i + 1) as f64 / (n - 1.0));
                if target >= c0 && target <= c1 {
                    let t = (target - c0) / (c1 - c0);
                    expected = sorted[i] + t * (sorted[i + 1] - sorted[i]);
                    break;
                }
            }
            let got = percentile_sorted(&sorted, p);
            assert!((got - expected).abs() < 1e-9, "p{p}: {got} vs {expected}");
        }
    }
}
