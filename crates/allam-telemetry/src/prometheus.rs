//! The process-wide Prometheus recorder behind every `metrics::counter!`/`histogram!` call.
//!
//! No HTTP listener of its own: the returned [`PrometheusHandle`] is rendered by whoever
//! serves `/metrics` (axum in allam-http). Histograms get explicit buckets, so they render as
//! Prometheus histograms (aggregatable across replicas), not summaries.
//!
//! Invariant: installed at most once per process; later and concurrent calls return the same
//! handle, so a binary and its in-process tests (which run in parallel) can all call
//! [`install_prometheus`].

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::{metric_names, Error};

/// Seconds, from a fast decode step (1 ms) to a long generation (several minutes).
pub const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0,
];

/// Counts (batch size, tokens per request), powers of two up to beyond the 4096 context.
pub const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

/// How often idle histogram storage is compacted. Rendering does not depend on it.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The first install's outcome; `OnceLock` makes concurrent first callers wait for it
/// instead of racing `set_global_recorder`.
static INSTALLED: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the global recorder once and returns its handle (see module doc).
pub fn install_prometheus() -> Result<PrometheusHandle, Error> {
    INSTALLED
        .get_or_init(install_once)
        .clone()
        .map_err(Error::Prometheus)
}

fn install_once() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets(COUNT_BUCKETS)
        .and_then(|builder| {
            builder
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS_SECONDS)
        })
        .and_then(PrometheusBuilder::install_recorder)
        .map_err(|err| err.to_string())?;
    describe_metrics();
    spawn_upkeep(handle.clone());
    Ok(handle)
}

fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("allam-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            handle.run_upkeep();
        });
    if let Err(err) = spawned {
        // Without upkeep memory grows slowly with label churn; metrics still work.
        tracing::warn!(error = %err, "cannot spawn the metrics upkeep thread");
    }
}

/// `# HELP` lines for the names the front and engine record.
fn describe_metrics() {
    use metric_names as m;
    metrics::describe_counter!(m::REQUESTS_TOTAL, "Requests received, by `api`.");
    metrics::describe_counter!(
        m::REQUEST_SUCCESSES_TOTAL,
        "Requests that finished normally, by `api` and `finish_reason`."
    );
    metrics::describe_counter!(
        m::REQUEST_FAILURES_TOTAL,
        "Requests that failed, by `api` and stable `reason`."
    );
    metrics::describe_histogram!(
        m::REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Receive to last byte, by `api`."
    );
    metrics::describe_counter!(
        m::PROMPT_TOKENS_TOTAL,
        "Prompt tokens of finished requests."
    );
    metrics::describe_counter!(
        m::GENERATED_TOKENS_TOTAL,
        "Generated tokens of finished requests."
    );
    metrics::describe_counter!(
        m::SAMPLED_ROWS_TOTAL,
        "Sampled logits rows, by `path` (backend: picked on the device; host: copied out)."
    );
    metrics::describe_histogram!(
        m::QUEUE_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Admission to first scheduled step."
    );
    metrics::describe_histogram!(
        m::TIME_TO_FIRST_TOKEN_SECONDS,
        metrics::Unit::Seconds,
        "Admission to first generated token."
    );
    metrics::describe_histogram!(
        m::INTER_TOKEN_LATENCY_SECONDS,
        metrics::Unit::Seconds,
        "Time between consecutive generated tokens."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_is_idempotent_and_renders_histogram_buckets() {
        // Parallel first calls must all get the handle (one installs, the others wait).
        let racers: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(install_prometheus))
            .collect();
        for racer in racers {
            racer
                .join()
                .expect("no panic")
                .expect("every racer gets the handle");
        }
        let first = install_prometheus().expect("first install");
        let second = install_prometheus().expect("second install returns the same handle");
        metrics::histogram!("allam_test_latency_seconds").record(0.003);
        metrics::histogram!("allam_test_batch_size").record(3.0);
        metrics::counter!("allam_test_events_total").increment(2);
        let text = second.render();
        assert_eq!(text, first.render());
        // 0.003 s lands in the 0.005 latency bucket and not the 0.0025 one.
        assert!(
            text.contains("allam_test_latency_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("allam_test_latency_seconds_bucket{le=\"0.0025\"} 0"),
            "{text}"
        );
        // 3 lands in the count bucket 4 and not 2.
        assert!(
            text.contains("allam_test_batch_size_bucket{le=\"4\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("allam_test_batch_size_bucket{le=\"2\"} 0"),
            "{text}"
        );
        assert!(text.contains("allam_test_events_total 2"), "{text}");
    }

    #[test]
    fn bucket_lists_are_strictly_increasing() {
        for buckets in [LATENCY_BUCKETS_SECONDS, COUNT_BUCKETS] {
            assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{buckets:?}");
        }
    }
}
