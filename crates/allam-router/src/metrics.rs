//! Request counters and durations, recorded once per request whichever way it ends.
//! Names come from `allam_telemetry::metric_names`; labels are `api` and `reason`.

use std::time::Instant;

use allam_telemetry::metric_names;
use allam_types::EngineEvent;

use crate::Error;

pub(crate) fn request_started(api: &'static str) {
    metrics::counter!(metric_names::REQUESTS_TOTAL, "api" => api).increment(1);
}

pub(crate) fn request_failed(api: &'static str, reason: &'static str) {
    metrics::counter!(metric_names::REQUEST_FAILURES_TOTAL, "api" => api, "reason" => reason)
        .increment(1);
}

pub(crate) fn retried(reason: &'static str) {
    metrics::counter!(metric_names::ROUTER_RETRIES_TOTAL, "reason" => reason).increment(1);
}

/// Records how a streamed request ends; a stream dropped before its end counts as cancelled.
pub(crate) struct Outcome {
    api: &'static str,
    started: Instant,
    done: bool,
}

impl Outcome {
    pub(crate) fn new(api: &'static str, started: Instant) -> Outcome {
        Outcome {
            api,
            started,
            done: false,
        }
    }

    pub(crate) fn observe(&mut self, event: &EngineEvent) {
        match event {
            EngineEvent::Finished { .. } => {
                metrics::counter!(metric_names::REQUEST_SUCCESSES_TOTAL, "api" => self.api)
                    .increment(1);
                self.finish();
            }
            EngineEvent::Failed { reason, .. } => {
                request_failed(self.api, reason);
                self.finish();
            }
            _ => {}
        }
    }

    pub(crate) fn fail(&mut self, error: &Error) {
        request_failed(self.api, error.reason());
        self.finish();
    }

    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            metrics::histogram!(metric_names::REQUEST_DURATION_SECONDS, "api" => self.api)
                .record(self.started.elapsed().as_secs_f64());
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.done {
            request_failed(self.api, "cancelled");
            self.finish();
        }
    }
}
