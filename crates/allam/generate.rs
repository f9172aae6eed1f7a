//! `allam generate`: offline generation in one process. Every request goes through the same
//! validation and engine as the servers; `--requests` submits all lines at once, so
//! continuous batching is exercised from the command line.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::{json, Value};

use allam_request::{ChatMessage, Limits, PromptInput, RawRequest, RawSamplingParams};
use allam_types::{EngineEvent, FinishReason, StepLogprobs};
use allam_worker::group::Collectives;

use crate::cli::{DistBackend, GenerateArgs, SamplingArgs};
use crate::model_source;

/// One request as a `--requests` line; the same names as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestLine {
    prompt: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    user: Option<String>,
    system: Option<String>,
    max_new_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<u64>,
    #[serde(default)]
    greedy: bool,
    logprobs: Option<i64>,
    #[serde(default)]
    prompt_logprobs: bool,
}

impl RequestLine {
    fn from_flags(args: &GenerateArgs) -> anyhow::Result<RequestLine> {
        let messages = match &args.messages {
            Some(text) => Some(
                serde_json::from_str::<Vec<ChatMessage>>(text)
                    .context("--messages must be a JSON list of {\"role\", \"content\"}")?,
            ),
            None => None,
        };
        let SamplingArgs {
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            greedy,
            logprobs,
            prompt_logprobs,
        } = args.sampling.clone();
        Ok(RequestLine {
            prompt: args.prompt.clone(),
            messages,
            user: args.user.clone(),
            system: args.system.clone(),
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            greedy,
            logprobs,
            prompt_logprobs,
        })
    }

    fn into_raw(self) -> anyhow::Result<RawRequest> {
        let input = match (self.prompt, self.messages, self.user) {
            (Some(prompt), None, None) => {
                if self.system.is_some() {
                    bail!("`system` needs chat input (`messages` or `user`), not a raw `prompt`");
                }
                PromptInput::Text(prompt)
            }
            (None, messages, user) => {
                let mut all = Vec::new();
                if let Some(system) = self.system {
                    all.push(ChatMessage {
                        role: "system".to_owned(),
                        content: system,
                    });
                }
                all.extend(messages.unwrap_or_default());
                if let Some(user) = user {
                    all.push(ChatMessage {
                        role: "user".to_owned(),
                        content: user,
                    });
                }
                if all.is_empty() {
                    bail!("give a prompt: `--prompt`, `--user` or `--messages` (or `--requests FILE`)");
                }
                PromptInput::Chat(all)
            }
            _ => bail!("give only one of `prompt`, `messages` and `user`"),
        };
        let params = RawSamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            do_sample: self.greedy.then_some(false),
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
            logprobs: self.logprobs,
            prompt_logprobs: self.prompt_logprobs.then_some(0),
            ..RawSamplingParams::default()
        };
        Ok(RawRequest {
            input,
            params,
            model: None,
        })
    }
}

fn logprobs_json(step: &StepLogprobs) -> Value {
    json!({
        "id": step.chosen.id,
        "logprob": step.chosen.logprob,
        "top": step.top.iter().map(|t| json!({"id": t.id, "logprob": t.logprob})).collect::<Vec<_>>(),
    })
}

/// Collects one request's events into the `--json` object.
fn collect(prompt: String, mut stream: allam_engine::EventStream) -> anyhow::Result<Value> {
    let mut prompt_token_ids = Vec::new();
    let mut prompt_logprobs = Value::Null;
    let mut logprobs = Vec::new();
    let mut end = None;
    while let Some(event) = stream.blocking_next() {
        match event {
            EngineEvent::Started {
                prompt_token_ids: ids,
            } => prompt_token_ids = ids,
            EngineEvent::PromptLogprobs(steps) => {
                prompt_logprobs = Value::Array(
                    steps
                        .iter()
                        .map(|s| s.as_ref().map_or(Value::Null, logprobs_json))
                        .collect(),
                );
            }
            EngineEvent::Delta(delta) if delta.index == 0 => {
                logprobs.extend(delta.logprobs.iter().map(logprobs_json));
            }
            EngineEvent::Delta(_) => {}
            EngineEvent::SequenceEnd(seq) if seq.index == 0 => end = Some(seq),
            EngineEvent::SequenceEnd(_) => {}
            EngineEvent::Finished { .. } => break,
            EngineEvent::Failed { reason, message } => {
                bail!("request failed ({reason}): {message}")
            }
        }
    }
    let end = end.context("the engine ended the request without a final sequence")?;
    Ok(json!({
        "prompt": prompt,
        "prompt_token_ids": prompt_token_ids,
        "token_ids": end.token_ids,
        "text": end.text,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        "finish_reason": match end.finish_reason {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            other => other.as_str(),
        },
    }))
}

pub fn run(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    let lines = match &args.requests {
        Some(path) => {
            let file = std::fs::File::open(path)
                .with_context(|| format!("opening --requests {}", path.display()))?;
            let mut lines = Vec::new();
            for (number, line) in std::io::BufReader::new(file).lines().enumerate() {
                let line = line.with_context(|| format!("reading {}", path.display()))?;
                if line.trim().is_empty() {
                    continue;
                }
                let parsed: RequestLine = serde_json::from_str(&line)
                    .with_context(|| format!("{} line {}", path.display(), number + 1))?;
                lines.push(parsed);
            }
            lines
        }
        None => vec![RequestLine::from_flags(&args)?],
    };

    let resolved = model_source::resolve(&args.model)?;
    let group = model_source::group_config(&resolved, &args.model, &args.engine)?;
    let tokenizer = resolved.tokenizer.clone();
    let collectives = match args.dist_backend {
        DistBackend::Auto => Collectives::Auto,
        DistBackend::Nccl if args.model.device == "cpu" => {
            bail!("--dist-backend nccl needs --device cuda (CPU ranks exchange results over TCP)")
        }
        DistBackend::Nccl => Collectives::Nccl,
    };
    let started =
        allam_worker::group::start_group_with(&group, resolved.tokenizer.clone(), collectives)
            .context("starting the engine")?;
    let limits = Limits::for_context(started.model_config.max_position_embeddings as u32);

    // Validate and submit everything first: the engine batches whatever is in flight.
    let mut submitted = Vec::new();
    for (index, line) in lines.into_iter().enumerate() {
        let raw = line
            .into_raw()
            .with_context(|| format!("request {index}"))?;
        let valid = allam_request::validate(raw, &limits, &tokenizer)
            .with_context(|| format!("request {index}"))?;
        let prompt = valid.prompt_text().to_owned();
        let stream = started
            .engine
            .submit(valid)
            .with_context(|| format!("submitting request {index}"))?;
        submitted.push((prompt, stream));
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (prompt, stream) in submitted {
        let result = collect(prompt, stream)?;
        if args.json || args.requests.is_some() {
            writeln!(out, "{}", serde_json::to_string(&result)?)?;
        } else {
            writeln!(out, "{}", result["text"].as_str().unwrap_or_default())?;
        }
    }
    started.engine.shutdown();
    Ok(ExitCode::SUCCESS)
}
