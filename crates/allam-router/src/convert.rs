//! Hand-written conversions between the wire (`allam.v1`, `allam.worker.v1`) and the core
//! vocabulary (`allam_request::RawRequest`, `allam_types::EngineEvent`). The core never sees
//! prost types; this file and the worker's service are the only places that know both.

use allam_proto::v1 as pb;
use allam_proto::worker::v1 as wpb;
use allam_request::RawSamplingParams;
use allam_types::{
    EngineEvent, FinishReason, SequenceEnd, StepLogprobs, Timings, TokenDelta, TokenLogprob, Usage,
};

/// Public params → raw params. Field for field: validation, not parsing, judges values.
pub(crate) fn params_from_proto(params: Option<pb::SamplingParams>) -> RawSamplingParams {
    let p = params.unwrap_or_default();
    RawSamplingParams {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k,
        min_p: p.min_p,
        do_sample: p.do_sample,
        max_new_tokens: p.max_new_tokens,
        min_new_tokens: p.min_new_tokens,
        seed: p.seed,
        stop: p.stop,
        stop_token_ids: p.stop_token_ids,
        ignore_eos: p.ignore_eos,
        repetition_penalty: p.repetition_penalty,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        logprobs: p.logprobs,
        prompt_logprobs: p.prompt_logprobs,
        n: p.n,
        priority: p.priority,
    }
}

/// Raw params → the wire, for the worker (which validates them again).
pub(crate) fn params_to_proto(p: &RawSamplingParams) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k,
        do_sample: p.do_sample,
        max_new_tokens: p.max_new_tokens,
        min_new_tokens: p.min_new_tokens,
        seed: p.seed,
        stop: p.stop.clone(),
        stop_token_ids: p.stop_token_ids.clone(),
        repetition_penalty: p.repetition_penalty,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        min_p: p.min_p,
        ignore_eos: p.ignore_eos,
        logprobs: p.logprobs,
        prompt_logprobs: p.prompt_logprobs,
        n: p.n,
        priority: p.priority,
    }
}

pub(crate) fn finish_reason_to_proto(reason: FinishReason) -> pb::FinishReason {
    match reason {
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
        FinishReason::Error => pb::FinishReason::Error,
    }
}

fn finish_reason_from_proto(value: i32) -> Result<FinishReason, String> {
    match pb::FinishReason::try_from(value) {
        Ok(pb::FinishReason::Length) => Ok(FinishReason::Length),
        Ok(pb::FinishReason::Stop) => Ok(FinishReason::Stop),
        Ok(pb::FinishReason::Cancelled) => Ok(FinishReason::Cancelled),
        Ok(pb::FinishReason::Error) => Ok(FinishReason::Error),
        Ok(pb::FinishReason::Unspecified) | Err(_) => {
            Err(format!("sequence_end carries finish_reason {value}"))
        }
    }
}

pub(crate) fn logprobs_to_proto(step: &StepLogprobs) -> pb::Logprobs {
    pb::Logprobs {
        chosen: Some(token_logprob_to_proto(step.chosen)),
        top: step
            .top
            .iter()
            .copied()
            .map(token_logprob_to_proto)
            .collect(),
    }
}

/// Prompt logprobs: the first position has none (nothing predicts it): `chosen` unset.
pub(crate) fn prompt_logprobs_to_proto(positions: &[Option<StepLogprobs>]) -> Vec<pb::Logprobs> {
    positions
        .iter()
        .map(|p| p.as_ref().map(logprobs_to_proto).unwrap_or_default())
        .collect()
}

fn token_logprob_to_proto(t: TokenLogprob) -> pb::TokenLogprob {
    pb::TokenLogprob {
        token_id: t.id,
        logprob: t.logprob,
    }
}

fn token_logprob_from_proto(t: pb::TokenLogprob) -> TokenLogprob {
    TokenLogprob {
        id: t.token_id,
        logprob: t.logprob,
    }
}

fn logprobs_from_proto(l: pb::Logprobs) -> Option<StepLogprobs> {
    l.chosen.map(|chosen| StepLogprobs {
        chosen: token_logprob_from_proto(chosen),
        top: l.top.into_iter().map(token_logprob_from_proto).collect(),
    })
}

pub(crate) fn usage_to_proto(u: Usage) -> pb::Usage {
    pb::Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        cached_tokens: u.cached_tokens,
    }
}

pub(crate) fn timings_to_proto(t: Timings) -> pb::Timings {
    pb::Timings {
        queue_ms: t.queue_ms,
        ttft_ms: t.ttft_ms,
        total_ms: t.total_ms,
    }
}

/// `EngineEvent::Failed` needs a `&'static str`; labels from the wire map onto the engine's
/// known set (`allam_engine::failure_reason`), anything else onto one generic label, so a
/// worker cannot mint unbounded metric label values.
pub(crate) fn static_reason(reason: &str) -> &'static str {
    match reason {
        "unavailable" => "unavailable",
        "shutdown" => "shutdown",
        "engine_error" => "engine_error",
        "engine_stopped" => "engine_stopped",
        "deadline_exceeded" => "deadline_exceeded",
        _ => "worker_failed",
    }
}

/// A worker event → an engine event. `Err` names what was malformed.
pub(crate) fn event_from_worker(event: wpb::WorkerEvent) -> Result<EngineEvent, String> {
    use wpb::worker_event::Event;
    let Some(event) = event.event else {
        return Err("worker event without a payload".into());
    };
    Ok(match event {
        Event::Started(s) => EngineEvent::Started {
            prompt_token_ids: s.prompt_token_ids,
        },
        Event::PromptLogprobs(p) => {
            EngineEvent::PromptLogprobs(p.positions.into_iter().map(logprobs_from_proto).collect())
        }
        Event::Delta(d) => EngineEvent::Delta(TokenDelta {
            index: d.index,
            token_ids: d.token_ids,
            text: d.text,
            logprobs: d
                .logprobs
                .into_iter()
                .filter_map(logprobs_from_proto)
                .collect(),
        }),
        Event::SequenceEnd(e) => EngineEvent::SequenceEnd(SequenceEnd {
            index: e.index,
            finish_reason: finish_reason_from_proto(e.finish_reason)?,
            text: e.text,
            token_ids: e.token_ids,
        }),
        Event::Finished(f) => {
            let usage = f.usage.unwrap_or_default();
            let timings = f.timings.unwrap_or_default();
            EngineEvent::Finished {
                usage: Usage {
                    prompt_tokens: usage.prompt_tokens,
                    completion_tokens: usage.completion_tokens,
                    cached_tokens: usage.cached_tokens,
                },
                timings: Timings {
                    queue_ms: timings.queue_ms,
                    ttft_ms: timings.ttft_ms,
                    total_ms: timings.total_ms,
                },
            }
        }
        Event::Failed(f) => EngineEvent::Failed {
            reason: static_reason(&f.reason),
            message: f.message,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_round_trip_through_both_protos() {
        let raw = RawSamplingParams {
            temperature: Some(0.7),
            top_p: Some(0.9),
            top_k: Some(-1),
            min_p: Some(0.05),
            do_sample: Some(true),
            max_new_tokens: Some(-3),
            min_new_tokens: Some(2),
            seed: Some(42),
            stop: vec!["\n\n".into(), "انتهى".into()],
            stop_token_ids: vec![2, -7],
            ignore_eos: Some(false),
            repetition_penalty: Some(1.1),
            presence_penalty: Some(0.5),
            frequency_penalty: Some(-0.5),
            logprobs: Some(3),
            prompt_logprobs: Some(0),
            n: Some(2),
            priority: Some(-1),
        };
        assert_eq!(params_from_proto(Some(params_to_proto(&raw))), raw);
        assert_eq!(params_from_proto(None), RawSamplingParams::default());
    }

    #[test]
    fn worker_events_convert_and_malformed_ones_are_named() {
        use wpb::worker_event::Event;
        let end = wpb::WorkerEvent {
            event: Some(Event::SequenceEnd(wpb::SequenceEnd {
                index: 1,
                finish_reason: pb::FinishReason::Length as i32,
                text: "مرحبا".into(),
                token_ids: vec![5, 6],
            })),
        };
        assert_eq!(
            event_from_worker(end).expect("valid"),
            EngineEvent::SequenceEnd(SequenceEnd {
                index: 1,
                finish_reason: FinishReason::Length,
                text: "مرحبا".into(),
                token_ids: vec![5, 6],
            })
        );
        let bad = wpb::WorkerEvent {
            event: Some(Event::SequenceEnd(wpb::SequenceEnd {
                finish_reason: 0,
                ..Default::default()
            })),
        };
        assert!(event_from_worker(bad)
            .expect_err("unspecified")
            .contains("finish_reason"));
        assert!(event_from_worker(wpb::WorkerEvent { event: None }).is_err());
        let failed = wpb::WorkerEvent {
            event: Some(Event::Failed(wpb::Failed {
                reason: "made_up_label".into(),
                message: "m".into(),
                retryable: false,
            })),
        };
        assert_eq!(
            event_from_worker(failed).expect("valid"),
            EngineEvent::Failed {
                reason: "worker_failed",
                message: "m".into()
            }
        );
    }

    #[test]
    fn prompt_logprobs_keep_the_empty_first_position() {
        let step = StepLogprobs {
            chosen: TokenLogprob {
                id: 7,
                logprob: -0.5,
            },
            top: vec![TokenLogprob {
                id: 8,
                logprob: -0.25,
            }],
        };
        let wire = prompt_logprobs_to_proto(&[None, Some(step.clone())]);
        assert_eq!(wire.len(), 2);
        assert!(wire[0].chosen.is_none());
        let back: Vec<Option<StepLogprobs>> = wire.into_iter().map(logprobs_from_proto).collect();
        assert_eq!(back, vec![None, Some(step)]);
    }
}
