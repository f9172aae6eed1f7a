//! Non-streaming responses: fold a request's `EngineEvent`s into whole choices plus usage,
//! then shape them as a chat completion, a completion, or the `/score` output.
//!
//! Invariants: a choice's text is the engine's `SequenceEnd.text` (stop string excluded);
//! every index in `0..n` has a choice even if the engine sent nothing for it; a `Failed`
//! event or a stream that ends without `Finished` is an error, never a partial 200.

use allam_types::{EngineEvent, FinishReason, StepLogprobs, Usage};

use super::logprobs::{chat_logprobs, extend_completion_logprobs, TokenPieces};
use super::wire::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatLogprobs, Completion, CompletionChoice,
    CompletionLogprobs, OBJECT_CHAT_COMPLETION, OBJECT_TEXT_COMPLETION,
};
use super::ResponseMeta;
use crate::Error;

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct CollectedChoice {
    /// Concatenated delta text, used only if the engine never sent `SequenceEnd`.
    streamed_text: String,
    pub text: Option<String>,
    pub finish_reason: Option<FinishReason>,
    pub logprobs: Vec<StepLogprobs>,
}

impl CollectedChoice {
    pub(crate) fn text(&self) -> &str {
        self.text.as_deref().unwrap_or(&self.streamed_text)
    }
}

/// Accumulates one request's events.
#[derive(Debug)]
pub(crate) struct Collector {
    choices: Vec<CollectedChoice>,
    usage: Option<Usage>,
}

impl Collector {
    pub(crate) fn new(n: u32) -> Self {
        Collector {
            choices: vec![CollectedChoice::default(); n.max(1) as usize],
            usage: None,
        }
    }

    fn choice(&mut self, index: u32) -> &mut CollectedChoice {
        let index = index as usize;
        if index >= self.choices.len() {
            self.choices
                .resize_with(index + 1, CollectedChoice::default);
        }
        &mut self.choices[index]
    }

    pub(crate) fn push(&mut self, event: EngineEvent) -> Result<(), Error> {
        match event {
            EngineEvent::Started { .. } | EngineEvent::PromptLogprobs(_) => {}
            EngineEvent::Delta(delta) => {
                let choice = self.choice(delta.index);
                choice.streamed_text.push_str(&delta.text);
                choice.logprobs.extend(delta.logprobs);
            }
            EngineEvent::SequenceEnd(end) => {
                let choice = self.choice(end.index);
                choice.text = Some(end.text);
                choice.finish_reason = Some(end.finish_reason);
            }
            EngineEvent::Finished { usage, .. } => self.usage = Some(usage),
            EngineEvent::Failed { reason, message } => return Err(failed_event(reason, message)),
        }
        Ok(())
    }

    /// The choices and usage, once `Finished` arrived.
    pub(crate) fn finish(self) -> Result<(Vec<CollectedChoice>, Usage), Error> {
        let usage = self.usage.ok_or_else(|| {
            Error::Unavailable("the generation stream ended before the request finished".into())
        })?;
        Ok((self.choices, usage))
    }
}

/// A `Failed` event: the worker could not complete the request.
pub(crate) fn failed_event(reason: &'static str, message: String) -> Error {
    Error::Unavailable(format!("{message} ({reason})"))
}

/// `finish_reason` as OpenAI spells it; a choice that never ended is reported as `stop`
/// (the engine always ends sequences before `Finished`, so this is a fallback only).
pub(crate) fn finish_reason_str(reason: Option<FinishReason>) -> &'static str {
    reason.map_or("stop", FinishReason::as_str)
}

pub(crate) fn chat_completion(
    meta: &ResponseMeta,
    choices: Vec<CollectedChoice>,
    usage: Usage,
    pieces: &dyn TokenPieces,
) -> ChatCompletion {
    let choices = choices
        .into_iter()
        .zip(0u32..)
        .map(|(choice, index)| ChatChoice {
            index,
            logprobs: meta.options.logprobs.then(|| ChatLogprobs {
                content: chat_logprobs(&choice.logprobs, pieces),
            }),
            finish_reason: Some(finish_reason_str(choice.finish_reason)),
            message: AssistantMessage {
                role: "assistant",
                content: choice.text().to_owned(),
            },
        })
        .collect();
    ChatCompletion {
        id: meta.id.clone(),
        object: OBJECT_CHAT_COMPLETION,
        created: meta.created,
        model: meta.model.clone(),
        choices,
        usage: usage.into(),
    }
}

pub(crate) fn completion(
    meta: &ResponseMeta,
    choices: Vec<CollectedChoice>,
    usage: Usage,
    pieces: &dyn TokenPieces,
) -> Completion {
    let choices = choices
        .into_iter()
        .zip(0u32..)
        .map(|(choice, index)| CompletionChoice {
            index,
            logprobs: meta.options.logprobs.then(|| {
                let mut logprobs = CompletionLogprobs::default();
                extend_completion_logprobs(&mut logprobs, &mut 0, &choice.logprobs, pieces);
                logprobs
            }),
            finish_reason: Some(finish_reason_str(choice.finish_reason)),
            text: choice.text().to_owned(),
        })
        .collect();
    Completion {
        id: meta.id.clone(),
        object: OBJECT_TEXT_COMPLETION,
        created: meta.created,
        model: meta.model.clone(),
        choices,
        usage: usage.into(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::openai::logprobs::tests::TestPieces;
    use crate::openai::request::{ResponseOptions, WireNames};
    use allam_types::{SequenceEnd, StepLogprobs, Timings, TokenDelta, TokenLogprob};

    pub(crate) fn meta(options: ResponseOptions) -> ResponseMeta {
        ResponseMeta {
            id: "id-1".into(),
            created: 1_700_000_000,
            model: "allam-test".into(),
            options,
        }
    }

    pub(crate) fn options(n: u32, logprobs: bool) -> ResponseOptions {
        ResponseOptions {
            stream: false,
            include_usage: false,
            logprobs,
            n,
            names: WireNames::Completions,
        }
    }

    pub(crate) fn delta(index: u32, ids: &[u32], text: &str) -> EngineEvent {
        EngineEvent::Delta(TokenDelta {
            index,
            token_ids: ids.to_vec(),
            text: text.into(),
            logprobs: ids
                .iter()
                .map(|&id| StepLogprobs {
                    chosen: TokenLogprob { id, logprob: -0.25 },
                    top: vec![TokenLogprob { id, logprob: -0.25 }],
                })
                .collect(),
        })
    }

    pub(crate) fn end(index: u32, text: &str, reason: FinishReason) -> EngineEvent {
        EngineEvent::SequenceEnd(SequenceEnd {
            index,
            finish_reason: reason,
            text: text.into(),
            token_ids: vec![],
        })
    }

    pub(crate) fn finished(prompt: u32, completion: u32) -> EngineEvent {
        EngineEvent::Finished {
            usage: Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                cached_tokens: 0,
            },
            timings: Timings::default(),
        }
    }

    /// Two choices; choice 1 hit a stop string that the deltas had partly streamed.
    pub(crate) fn two_choice_events() -> Vec<EngineEvent> {
        vec![
            EngineEvent::Started {
                prompt_token_ids: vec![1, 10],
            },
            delta(0, &[10], " Hello"),
            delta(1, &[14], "لم"),
            delta(0, &[12, 13], "ا"),
            end(0, " Helloا", FinishReason::Length),
            delta(1, &[11], "\n"),
            end(1, "لم", FinishReason::Stop),
            finished(2, 4),
        ]
    }

    fn collect(events: Vec<EngineEvent>, n: u32) -> Result<(Vec<CollectedChoice>, Usage), Error> {
        let mut collector = Collector::new(n);
        for event in events {
            collector.push(event)?;
        }
        collector.finish()
    }

    #[test]
    fn chat_completion_has_every_choice_with_engine_text_and_usage() {
        let (choices, usage) = collect(two_choice_events(), 2).expect("finished");
        let response = chat_completion(&meta(options(2, true)), choices, usage, &TestPieces);
        let json = serde_json::to_value(&response).expect("serializable");
        assert_eq!(json["object"], "chat.completion");
        assert_eq!(json["choices"][0]["message"]["content"], " Helloا");
        assert_eq!(json["choices"][0]["message"]["role"], "assistant");
        assert_eq!(json["choices"][0]["finish_reason"], "length");
        // The stop string streamed as a delta is not part of the final text.
        assert_eq!(json["choices"][1]["message"]["content"], "لم");
        assert_eq!(json["choices"][1]["finish_reason"], "stop");
        assert_eq!(
            json["choices"][0]["logprobs"]["content"]
                .as_array()
                .map(Vec::len),
            Some(3)
        );
        assert_eq!(json["usage"]["prompt_tokens"], 2);
        assert_eq!(json["usage"]["completion_tokens"], 4);
        assert_eq!(json["usage"]["total_tokens"], 6);
    }

    #[test]
    fn completion_without_logprobs_has_null_logprobs() {
        let (choices, usage) = collect(two_choice_events(), 2).expect("finished");
        let response = completion(&meta(options(2, false)), choices, usage, &TestPieces);
        let json = serde_json::to_value(&response).expect("serializable");
        assert_eq!(json["object"], "text_completion");
        assert_eq!(json["choices"][1]["text"], "لم");
        assert!(json["choices"][0]["logprobs"].is_null());
    }

    #[test]
    fn failures_are_errors_not_partial_responses() {
        let failed = vec![
            delta(0, &[10], " Hello"),
            EngineEvent::Failed {
                reason: "worker_lost",
                message: "rank 1 exited".into(),
            },
        ];
        let err = collect(failed, 1).expect_err("failed");
        assert_eq!(err.reason(), "unavailable");
        let err = collect(vec![delta(0, &[10], " Hello")], 1).expect_err("no Finished");
        assert_eq!(err.reason(), "unavailable");
    }

    #[test]
    fn silent_choices_are_still_present() {
        let (choices, _) = collect(vec![finished(3, 0)], 3).expect("finished");
        assert_eq!(choices.len(), 3);
        assert!(choices.iter().all(|c| c.text().is_empty()));
    }
}
