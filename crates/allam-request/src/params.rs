//! Checks of the sampling and stopping parameters, with defaults applied. Everything here is
//! cheap and runs before the prompt is rendered or tokenized, so a request with a bad parameter
//! costs no tokenizer time.
//!
//! Temperature rules: `do_sample=false` means greedy whatever `temperature` says (the value is
//! still range-checked); `do_sample=true` needs a temperature > 0 and defaults it to 1.0;
//! without `do_sample`, temperature defaults to 1.0 and 0 means greedy. Temperatures below
//! [`GREEDY_TEMPERATURE_EPSILON`] are greedy.

use allam_types::TokenId;

use crate::limits::{
    DEFAULT_MIN_P, DEFAULT_REPETITION_PENALTY, DEFAULT_TEMPERATURE, DEFAULT_TOP_P,
    GREEDY_TEMPERATURE_EPSILON,
};
use crate::{Limits, RawSamplingParams, SamplingParams, ValidationError};

/// Presence and frequency penalties live in [-PENALTY_BOUND, PENALTY_BOUND] (OpenAI's range).
const PENALTY_BOUND: f64 = 2.0;

/// The parameters after checking; `max_new_tokens` is settled once the prompt length is known.
pub(crate) struct CheckedParams {
    /// Complete except `max_new_tokens`, which is 0 here.
    pub(crate) params: SamplingParams,
    /// The client's `max_new_tokens`, already in `1..=limits.max_new_tokens`.
    pub(crate) requested_max_new_tokens: Option<u32>,
}

pub(crate) fn check_params(
    raw: &RawSamplingParams,
    limits: &Limits,
    vocab_size: usize,
) -> Result<CheckedParams, ValidationError> {
    let temperature = temperature(raw, limits)?;
    let top_p = match raw.top_p {
        None => DEFAULT_TOP_P,
        Some(v) => {
            // The range is checked on the f32 the sampler uses: 1e-92 is > 0 as an f64 but
            // rounds to 0 as an f32 (found by the request_json fuzz target).
            let v = finite("top_p", v)?;
            let used = v as f32;
            ensure(used > 0.0 && used <= 1.0, "top_p", "in (0, 1]", v)?;
            used
        }
    };
    let top_k = top_k(raw.top_k, limits, vocab_size)?;
    let min_p = match raw.min_p {
        None => DEFAULT_MIN_P,
        Some(v) => {
            let v = finite("min_p", v)?;
            ensure((0.0..=1.0).contains(&v), "min_p", "in [0, 1]", v)?;
            v as f32
        }
    };
    let repetition_penalty = match raw.repetition_penalty {
        None => DEFAULT_REPETITION_PENALTY,
        Some(v) => {
            // Checked as the f32 the sampler divides by (a tiny f64 rounds to 0).
            let v = finite("repetition_penalty", v)?;
            let used = v as f32;
            ensure(
                used > 0.0 && used.is_finite(),
                "repetition_penalty",
                "> 0",
                v,
            )?;
            used
        }
    };
    let presence_penalty = penalty("presence_penalty", raw.presence_penalty)?;
    let frequency_penalty = penalty("frequency_penalty", raw.frequency_penalty)?;

    let requested_max_new_tokens = match raw.max_new_tokens {
        None => None,
        Some(v) => Some(int_in("max_new_tokens", v, 1, limits.max_new_tokens)?),
    };
    let min_new_tokens = match raw.min_new_tokens {
        None => 0,
        Some(v) => {
            let max = requested_max_new_tokens.unwrap_or(limits.max_new_tokens);
            let min = u32::try_from(v).ok().filter(|&m| m <= max);
            match min {
                Some(min) => min,
                None => {
                    let expected = match requested_max_new_tokens {
                        Some(max) => format!("in [0, {max}] (at most `max_new_tokens`)"),
                        None => format!("in [0, {max}]"),
                    };
                    return Err(ValidationError::OutOfRange {
                        field: "min_new_tokens",
                        expected,
                        got: v.to_string(),
                    });
                }
            }
        }
    };

    let stop = stop_strings(&raw.stop, limits)?;
    let stop_token_ids = stop_token_ids(&raw.stop_token_ids, limits, vocab_size)?;
    let logprobs = match raw.logprobs {
        None => None,
        Some(v) => Some(int_in("logprobs", v, 0, limits.max_logprobs)?),
    };
    let prompt_logprobs = match raw.prompt_logprobs {
        None => None,
        Some(v) => Some(int_in("prompt_logprobs", v, 0, limits.max_logprobs)?),
    };
    let n = match raw.n {
        None => 1,
        Some(v) => int_in("n", v, 1, limits.max_n)?,
    };
    let priority = match raw.priority {
        None => 0,
        Some(v) => i32::try_from(v).map_err(|_| ValidationError::OutOfRange {
            field: "priority",
            expected: format!("in [{}, {}]", i32::MIN, i32::MAX),
            got: v.to_string(),
        })?,
    };

    Ok(CheckedParams {
        params: SamplingParams {
            temperature,
            top_p,
            top_k,
            min_p,
            max_new_tokens: 0,
            min_new_tokens,
            seed: raw.seed,
            stop,
            stop_token_ids,
            ignore_eos: raw.ignore_eos.unwrap_or(false),
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            logprobs,
            prompt_logprobs,
            n,
            priority,
        },
        requested_max_new_tokens,
    })
}

fn temperature(raw: &RawSamplingParams, limits: &Limits) -> Result<f32, ValidationError> {
    let given = match raw.temperature {
        None => None,
        Some(v) => {
            let v = finite("temperature", v)?;
            let expected = format!("in [0, {}]", limits.max_temperature);
            ensure(
                v >= 0.0 && v <= limits.max_temperature,
                "temperature",
                &expected,
                v,
            )?;
            Some(v)
        }
    };
    let temperature = match (raw.do_sample, given) {
        (Some(false), _) => 0.0,
        (Some(true), Some(v)) if v == 0.0 => {
            return Err(ValidationError::OutOfRange {
                field: "temperature",
                expected: "> 0 when `do_sample` is true".to_owned(),
                got: v.to_string(),
            })
        }
        (_, Some(v)) => v,
        (_, None) => f64::from(DEFAULT_TEMPERATURE),
    };
    Ok(if temperature < GREEDY_TEMPERATURE_EPSILON {
        0.0
    } else {
        temperature as f32
    })
}

/// `None`, 0 and -1 (vLLM's spelling) mean off; values at or above the vocabulary size keep
/// every token, which is also off.
fn top_k(raw: Option<i64>, limits: &Limits, vocab_size: usize) -> Result<u32, ValidationError> {
    let Some(k) = raw else { return Ok(0) };
    if k == -1 || k == 0 {
        return Ok(0);
    }
    let in_vocab = usize::try_from(k).ok().map(|k| k >= vocab_size);
    if in_vocab == Some(true) {
        return Ok(0);
    }
    match u32::try_from(k).ok().filter(|&k| k <= limits.max_top_k) {
        Some(k) => Ok(k),
        None => Err(ValidationError::OutOfRange {
            field: "top_k",
            expected: format!("-1 or 0 (off), or in [1, {}]", limits.max_top_k),
            got: k.to_string(),
        }),
    }
}

fn penalty(field: &'static str, raw: Option<f64>) -> Result<f32, ValidationError> {
    let Some(v) = raw else { return Ok(0.0) };
    let v = finite(field, v)?;
    ensure(
        (-PENALTY_BOUND..=PENALTY_BOUND).contains(&v),
        field,
        "in [-2, 2]",
        v,
    )?;
    Ok(v as f32)
}

fn stop_strings(stop: &[String], limits: &Limits) -> Result<Vec<String>, ValidationError> {
    if stop.len() > limits.max_stop_strings {
        return Err(ValidationError::TooMany {
            field: "stop",
            max: limits.max_stop_strings,
            got: stop.len(),
        });
    }
    for (index, s) in stop.iter().enumerate() {
        if s.is_empty() {
            return Err(ValidationError::EmptyStopString { index });
        }
        let chars = s.chars().count();
        if chars > limits.max_stop_chars {
            return Err(ValidationError::StopStringTooLong {
                index,
                max_chars: limits.max_stop_chars,
                got_chars: chars,
            });
        }
    }
    Ok(stop.to_vec())
}

fn stop_token_ids(
    ids: &[i64],
    limits: &Limits,
    vocab_size: usize,
) -> Result<Vec<TokenId>, ValidationError> {
    if ids.len() > limits.max_stop_token_ids {
        return Err(ValidationError::TooMany {
            field: "stop_token_ids",
            max: limits.max_stop_token_ids,
            got: ids.len(),
        });
    }
    ids.iter()
        .enumerate()
        .map(|(index, &id)| token_id("stop_token_ids", index, id, vocab_size))
        .collect()
}

/// `id` as a token id below `vocab_size`, or an error naming `field[index]`.
pub(crate) fn token_id(
    field: &'static str,
    index: usize,
    id: i64,
    vocab_size: usize,
) -> Result<TokenId, ValidationError> {
    TokenId::try_from(id)
        .ok()
        .filter(|&t| usize::try_from(t).is_ok_and(|t| t < vocab_size))
        .ok_or(ValidationError::TokenIdOutOfVocab {
            field,
            index,
            id,
            vocab_size,
        })
}

fn int_in(field: &'static str, v: i64, min: u32, max: u32) -> Result<u32, ValidationError> {
    u32::try_from(v)
        .ok()
        .filter(|v| (min..=max).contains(v))
        .ok_or_else(|| ValidationError::OutOfRange {
            field,
            expected: format!("in [{min}, {max}]"),
            got: v.to_string(),
        })
}

fn finite(field: &'static str, v: f64) -> Result<f64, ValidationError> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(ValidationError::OutOfRange {
            field,
            expected: "a finite number".to_owned(),
            got: v.to_string(),
        })
    }
}

fn ensure(ok: bool, field: &'static str, expected: &str, v: f64) -> Result<(), ValidationError> {
    if ok {
        Ok(())
    } else {
        Err(ValidationError::OutOfRange {
            field,
            expected: expected.to_owned(),
            got: number_text(v),
        })
    }
}

/// `1.5`, `0`, `-3` as usual, but `1e-92` rather than ninety zeros: the value goes into a
/// message a person reads.
fn number_text(v: f64) -> String {
    let magnitude = v.abs();
    if magnitude != 0.0 && !(1e-6..1e15).contains(&magnitude) {
        format!("{v:e}")
    } else {
        v.to_string()
    }
}
