//! Streaming responses: each `EngineEvent` becomes zero or more SSE `data:` payloads in
//! OpenAI's chunk shape; the caller appends `data: [DONE]`.
//!
//! Order per request: (chat only) one role chunk per choice, content chunks as deltas arrive,
//! one chunk with `finish_reason` per choice, then (with `stream_options.include_usage`) one
//! chunk with empty `choices` and the usage. With `include_usage`, every other chunk carries
//! `"usage": null`.
//!
//! Invariant: the text streamed for a choice concatenates to the engine's final text when the
//! engine's deltas are a prefix of it; any tail the deltas did not carry is sent with the
//! finish chunk, so a streamed reply never loses text a non-streamed one would have.

use allam_types::{EngineEvent, SequenceEnd, TokenDelta};

use super::collect::{failed_event, finish_reason_str};
use super::logprobs::{chat_logprobs, extend_completion_logprobs, TokenPieces};
use super::wire::{
    ChatChunkChoice, ChatCompletionChunk, ChatDelta, ChatLogprobs, ChunkUsage, CompletionChoice,
    CompletionChunk, CompletionLogprobs, UsageOut, OBJECT_CHAT_COMPLETION_CHUNK,
    OBJECT_TEXT_COMPLETION,
};
use super::{Api, ResponseMeta};
use crate::Error;

#[derive(Debug, Default)]
struct ChoiceProgress {
    streamed_text: String,
    /// Character offset for completions' `text_offset`.
    char_offset: u32,
}

/// Turns one request's events into chunk payloads (serialized JSON strings).
#[derive(Debug)]
pub(crate) struct ChunkWriter {
    api: Api,
    meta: ResponseMeta,
    choices: Vec<ChoiceProgress>,
}

impl ChunkWriter {
    pub(crate) fn new(api: Api, meta: ResponseMeta) -> Self {
        ChunkWriter {
            api,
            meta,
            choices: Vec::new(),
        }
    }

    fn progress(&mut self, index: u32) -> &mut ChoiceProgress {
        let index = index as usize;
        if index >= self.choices.len() {
            self.choices.resize_with(index + 1, ChoiceProgress::default);
        }
        &mut self.choices[index]
    }

    /// `null` on non-final chunks when usage was asked for, else absent.
    fn usage_placeholder(&self) -> ChunkUsage {
        self.meta.options.include_usage.then_some(None)
    }

    /// The payloads for one event; `Failed` becomes an `Err` the caller sends as an error
    /// event before `[DONE]`.
    pub(crate) fn on_event(
        &mut self,
        event: EngineEvent,
        pieces: &dyn TokenPieces,
    ) -> Result<Vec<String>, Error> {
        let payloads = match event {
            EngineEvent::Started { .. } => self.role_chunks(),
            EngineEvent::PromptLogprobs(_) => Vec::new(),
            EngineEvent::Delta(delta) => self.delta_chunk(delta, pieces).into_iter().collect(),
            EngineEvent::SequenceEnd(end) => vec![self.finish_chunk(end)],
            EngineEvent::Finished { usage, .. } => {
                if self.meta.options.include_usage {
                    vec![self.usage_chunk(usage.into())]
                } else {
                    Vec::new()
                }
            }
            EngineEvent::Failed { reason, message } => return Err(failed_event(reason, message)),
        };
        Ok(payloads)
    }

    fn role_chunks(&mut self) -> Vec<String> {
        if self.api != Api::Chat {
            return Vec::new();
        }
        (0..self.meta.options.n)
            .map(|index| {
                self.chat_chunk(ChatChunkChoice {
                    index,
                    delta: ChatDelta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                    },
                    logprobs: None,
                    finish_reason: None,
                })
            })
            .collect()
    }

    fn delta_chunk(&mut self, delta: TokenDelta, pieces: &dyn TokenPieces) -> Option<String> {
        let with_logprobs = self.meta.options.logprobs && !delta.logprobs.is_empty();
        // Tokens that completed no character yet and carry no logprobs: nothing to say.
        if delta.text.is_empty() && !with_logprobs {
            return None;
        }
        let api = self.api;
        let progress = self.progress(delta.index);
        progress.streamed_text.push_str(&delta.text);
        let payload = match api {
            Api::Chat => {
                let logprobs = with_logprobs.then(|| ChatLogprobs {
                    content: chat_logprobs(&delta.logprobs, pieces),
                });
                self.chat_chunk(ChatChunkChoice {
                    index: delta.index,
                    delta: ChatDelta {
                        role: None,
                        content: Some(delta.text),
                    },
                    logprobs,
                    finish_reason: None,
                })
            }
            Api::Completion => {
                let logprobs = with_logprobs.then(|| {
                    let mut logprobs = CompletionLogprobs::default();
                    extend_completion_logprobs(
                        &mut logprobs,
                        &mut progress.char_offset,
                        &delta.logprobs,
                        pieces,
                    );
                    logprobs
                });
                self.completion_chunk(CompletionChoice {
                    index: delta.index,
                    text: delta.text,
                    logprobs,
                    finish_reason: None,
                })
            }
        };
        Some(payload)
    }

    fn finish_chunk(&mut self, end: SequenceEnd) -> String {
        let api = self.api;
        let progress = self.progress(end.index);
        let tail = end
            .text
            .strip_prefix(progress.streamed_text.as_str())
            .unwrap_or_default()
            .to_owned();
        progress.streamed_text.push_str(&tail);
        let finish_reason = Some(finish_reason_str(Some(end.finish_reason)));
        match api {
            Api::Chat => self.chat_chunk(ChatChunkChoice {
                index: end.index,
                delta: ChatDelta {
                    role: None,
                    content: (!tail.is_empty()).then_some(tail),
                },
                logprobs: None,
                finish_reason,
            }),
            Api::Completion => self.completion_chunk(CompletionChoice {
                index: end.index,
                text: tail,
                logprobs: None,
                finish_reason,
            }),
        }
    }

    fn usage_chunk(&self, usage: UsageOut) -> String {
        match self.api {
            Api::Chat => to_json(&ChatCompletionChunk {
                id: self.meta.id.clone(),
                object: OBJECT_CHAT_COMPLETION_CHUNK,
                created: self.meta.created,
                model: self.meta.model.clone(),
                choices: Vec::new(),
                usage: Some(Some(usage)),
            }),
            Api::Completion => to_json(&CompletionChunk {
                id: self.meta.id.clone(),
                object: OBJECT_TEXT_COMPLETION,
                created: self.meta.created,
                model: self.meta.model.clone(),
                choices: Vec::new(),
                usage: Some(Some(usage)),
            }),
        }
    }

    fn chat_chunk(&self, choice: ChatChunkChoice) -> String {
        to_json(&ChatCompletionChunk {
            id: self.meta.id.clone(),
            object: OBJECT_CHAT_COMPLETION_CHUNK,
            created: self.meta.created,
            model: self.meta.model.clone(),
            choices: vec![choice],
            usage: self.usage_placeholder(),
        })
    }

    fn completion_chunk(&self, choice: CompletionChoice) -> String {
        to_json(&CompletionChunk {
            id: self.meta.id.clone(),
            object: OBJECT_TEXT_COMPLETION,
            created: self.meta.created,
            model: self.meta.model.clone(),
            choices: vec![choice],
            usage: self.usage_placeholder(),
        })
    }
}

/// The SSE payload of an error that happens after the stream opened.
pub(crate) fn error_payload(err: &Error) -> String {
    to_json(&err.body())
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Our wire structs hold only strings, numbers and finite floats (see logprobs::finite):
    // serialization cannot fail.
    serde_json::to_string(value).expect("wire structs always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::collect::tests::{delta, end, finished, meta, options, two_choice_events};
    use crate::openai::logprobs::tests::TestPieces;
    use crate::openai::request::ResponseOptions;
    use allam_types::FinishReason;
    use serde_json::Value;

    fn run(api: Api, options: ResponseOptions, events: Vec<EngineEvent>) -> Vec<Value> {
        let mut writer = ChunkWriter::new(api, meta(options));
        events
            .into_iter()
            .flat_map(|event| writer.on_event(event, &TestPieces).expect("no failure"))
            .map(|payload| serde_json::from_str(&payload).expect("valid JSON"))
            .collect()
    }

    fn streamed(options: ResponseOptions, n: u32) -> ResponseOptions {
        ResponseOptions {
            stream: true,
            n,
            ..options
        }
    }

    /// Concatenated `delta.content` / `text` per choice index.
    fn texts(chunks: &[Value], field: &str) -> Vec<String> {
        let mut out = vec![String::new(); 2];
        for chunk in chunks {
            for choice in chunk["choices"].as_array().into_iter().flatten() {
                let index = choice["index"].as_u64().expect("index") as usize;
                let text = match field {
                    "delta" => choice["delta"]["content"].as_str(),
                    _ => choice["text"].as_str(),
                };
                out[index].push_str(text.unwrap_or_default());
            }
        }
        out
    }

    #[test]
    fn chat_stream_has_role_content_finish_and_usage_chunks() {
        let options = ResponseOptions {
            include_usage: true,
            ..options(2, false)
        };
        let chunks = run(Api::Chat, options, two_choice_events());
        assert!(chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"));
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(chunks[1]["choices"][0]["index"], 1);
        assert_eq!(chunks[1]["choices"][0]["delta"]["role"], "assistant");
        let finishes: Vec<(u64, &str)> = chunks
            .iter()
            .filter_map(|c| {
                let choice = &c["choices"][0];
                Some((choice["index"].as_u64()?, choice["finish_reason"].as_str()?))
            })
            .collect();
        assert_eq!(finishes, vec![(0, "length"), (1, "stop")]);
        let last = chunks.last().expect("usage chunk");
        assert_eq!(last["choices"].as_array().map(Vec::len), Some(0));
        assert_eq!(last["usage"]["completion_tokens"], 4);
        assert!(chunks[..chunks.len() - 1].iter().all(
            |c| c["usage"].is_null() && c.as_object().is_some_and(|o| o.contains_key("usage"))
        ));
        // Choice 1 streamed "\n" before the engine cut it as a stop string: the stream
        // cannot take it back, and sends no tail.
        assert_eq!(
            texts(&chunks, "delta"),
            vec![" Helloا".to_owned(), "لم\n".to_owned()]
        );
    }

    #[test]
    fn completion_stream_without_usage_omits_the_field_and_fills_a_missing_tail() {
        let events = vec![
            EngineEvent::Started {
                prompt_token_ids: vec![1],
            },
            delta(0, &[10], " Hello"),
            // Incomplete character: no text, no logprobs asked, so no chunk.
            delta(0, &[12], ""),
            end(0, " Helloا", FinishReason::Stop),
            finished(1, 2),
        ];
        let options = options(1, false);
        let chunks = run(Api::Completion, options, events);
        assert_eq!(chunks.len(), 2, "{chunks:?}");
        assert!(chunks.iter().all(|c| c.get("usage").is_none()));
        assert_eq!(chunks[1]["choices"][0]["text"], "ا");
        assert_eq!(chunks[1]["choices"][0]["finish_reason"], "stop");
        assert_eq!(texts(&chunks, "text")[0], " Helloا");
    }

    #[test]
    fn logprobs_ride_on_content_chunks() {
        let options = streamed(options(1, true), 1);
        let chunks = run(
            Api::Completion,
            options,
            vec![delta(0, &[10], " Hello"), delta(0, &[14], "لم")],
        );
        assert_eq!(chunks[1]["choices"][0]["logprobs"]["text_offset"][0], 6);
        let chunks = run(Api::Chat, options, vec![delta(0, &[12], "")]);
        assert_eq!(
            chunks.len(),
            1,
            "a byte token with logprobs still gets a chunk"
        );
        assert_eq!(
            chunks[0]["choices"][0]["logprobs"]["content"][0]["bytes"][0],
            0xD8
        );
    }

    #[test]
    fn failed_event_is_an_error_with_openai_body() {
        let mut writer = ChunkWriter::new(Api::Chat, meta(streamed(options(1, false), 1)));
        let err = writer
            .on_event(
                EngineEvent::Failed {
                    reason: "worker_lost",
                    message: "gone".into(),
                },
                &TestPieces,
            )
            .expect_err("failed");
        let body: Value = serde_json::from_str(&error_payload(&err)).expect("json");
        assert_eq!(body["error"]["code"], "unavailable");
    }
}
