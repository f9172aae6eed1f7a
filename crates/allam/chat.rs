//! `allam chat`: a small terminal client that streams a conversation from any router over
//! the public gRPC API. Each line you type is a user turn; the answer streams as it is
//! generated; the whole conversation is resent each turn (the router's prefix cache makes
//! that cheap).

use std::io::{BufRead, Write};
use std::process::ExitCode;

use anyhow::Context;
use tonic::metadata::MetadataValue;

use allam_proto::v1::generation_client::GenerationClient;
use allam_proto::v1::{ChatRequest, Message, SamplingParams};

use crate::cli::ChatArgs;

pub fn run(args: ChatArgs) -> anyhow::Result<ExitCode> {
    let rt = crate::serve::runtime()?;
    rt.block_on(chat(args))
}

async fn chat(args: ChatArgs) -> anyhow::Result<ExitCode> {
    let endpoint = if args.endpoint.contains("://") {
        args.endpoint.clone()
    } else {
        format!("http://{}", args.endpoint)
    };
    let mut client = GenerationClient::connect(endpoint.clone())
        .await
        .with_context(|| format!("connecting to {endpoint}"))?;
    let mut history: Vec<Message> = Vec::new();
    if let Some(system) = &args.system {
        history.push(Message {
            role: "system".to_owned(),
            content: system.clone(),
        });
    }
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    if interactive {
        eprintln!("connected to {endpoint}; type a message, an empty line or Ctrl-D ends");
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("you> ");
            std::io::stderr().flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        if line.trim().is_empty() {
            break;
        }
        history.push(Message {
            role: "user".to_owned(),
            content: line,
        });
        let mut request = tonic::Request::new(ChatRequest {
            messages: history.clone(),
            params: Some(SamplingParams {
                temperature: args.temperature,
                top_p: args.top_p,
                max_new_tokens: Some(args.max_new_tokens),
                seed: args.seed,
                ..SamplingParams::default()
            }),
            model: None,
        });
        if let Some(key) = &args.api_key {
            let value: MetadataValue<_> = format!("Bearer {key}")
                .parse()
                .context("the API key is not valid header text")?;
            request.metadata_mut().insert("authorization", value);
        }
        let mut stream = match client.chat_stream(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                // Bad input is the user's to fix: say why and keep the session.
                eprintln!("error: {} ({:?})", status.message(), status.code());
                history.pop();
                continue;
            }
        };
        let mut answer = String::new();
        let stdout = std::io::stdout();
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => {
                    if chunk.index == 0 {
                        let mut out = stdout.lock();
                        write!(out, "{}", chunk.text)?;
                        out.flush()?;
                        answer.push_str(&chunk.text);
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    eprintln!("\nerror: {} ({:?})", status.message(), status.code());
                    break;
                }
            }
        }
        println!();
        history.push(Message {
            role: "assistant".to_owned(),
            content: answer,
        });
    }
    Ok(ExitCode::SUCCESS)
}
