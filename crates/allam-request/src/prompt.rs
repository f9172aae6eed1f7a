//! The prompt: chat messages rendered through the chat template, raw text, or token ids,
//! checked and turned into token ids.
//!
//! Where each rule lives: roles are parsed here into `allam_tokenizer::Role` (an unknown role is
//! rejected with its index before the template runs, since the Llama-2 template would silently
//! drop it); alternation and other conversation rules are the template's own (`raise_exception`),
//! reported verbatim. Rendered chat prompts are encoded with `add_special_tokens=false` (the
//! template writes bos), raw text with `true` (bos prepended), as transformers does.
//!
//! Invariant: the character limit is checked before any rendering or tokenizing.

use allam_tokenizer::{Message, Role, Tokenizer};
use allam_types::TokenId;

use crate::params::token_id;
use crate::{ChatMessage, Limits, PromptInput, ValidationError};

/// A role string longer than this is cut in error messages (it is echoed to the client).
const MAX_ECHOED_ROLE_CHARS: usize = 64;

/// The prompt after checking: rendered text, its token ids, and the parameter it came from.
pub(crate) struct CheckedPrompt {
    pub(crate) text: String,
    pub(crate) token_ids: Vec<TokenId>,
    /// `messages` or `prompt`: what errors about the prompt name.
    pub(crate) field: &'static str,
}

pub(crate) fn check_prompt(
    input: PromptInput,
    limits: &Limits,
    tokenizer: &Tokenizer,
) -> Result<CheckedPrompt, ValidationError> {
    let prompt = match input {
        PromptInput::Chat(messages) => chat(&messages, limits, tokenizer)?,
        PromptInput::Text(text) => {
            const FIELD: &str = "prompt";
            if text.is_empty() {
                return Err(ValidationError::EmptyPrompt { field: FIELD });
            }
            check_chars(FIELD, text.chars().count(), limits)?;
            if text.contains('\0') {
                return Err(ValidationError::NulCharacter {
                    field: FIELD,
                    location: FIELD.to_owned(),
                });
            }
            let token_ids = encode(tokenizer, &text, true, FIELD)?;
            CheckedPrompt {
                text,
                token_ids,
                field: FIELD,
            }
        }
        PromptInput::TokenIds(ids) => {
            const FIELD: &str = "prompt";
            let vocab_size = tokenizer.vocab_size();
            let token_ids = ids
                .iter()
                .enumerate()
                .map(|(index, &id)| token_id(FIELD, index, i64::from(id), vocab_size))
                .collect::<Result<Vec<_>, _>>()?;
            // The text is for logs only; a failure to decode it must not fail the request.
            let text = tokenizer.decode(&token_ids, false).unwrap_or_default();
            CheckedPrompt {
                text,
                token_ids,
                field: FIELD,
            }
        }
    };
    if prompt.token_ids.is_empty() {
        return Err(ValidationError::EmptyPrompt {
            field: prompt.field,
        });
    }
    Ok(prompt)
}

fn chat(
    messages: &[ChatMessage],
    limits: &Limits,
    tokenizer: &Tokenizer,
) -> Result<CheckedPrompt, ValidationError> {
    const FIELD: &str = "messages";
    if messages.is_empty() {
        return Err(ValidationError::EmptyPrompt { field: FIELD });
    }
    let total_chars = messages.iter().map(|m| m.content.chars().count()).sum();
    check_chars(FIELD, total_chars, limits)?;
    let mut parsed = Vec::with_capacity(messages.len());
    for (index, message) in messages.iter().enumerate() {
        let role: Role = message
            .role
            .parse()
            .map_err(|_| ValidationError::UnknownRole {
                index,
                role: echo(&message.role),
            })?;
        if message.content.contains('\0') {
            return Err(ValidationError::NulCharacter {
                field: FIELD,
                location: format!("messages[{index}].content"),
            });
        }
        parsed.push(Message::new(role, message.content.clone()));
    }
    let text = tokenizer
        .apply_chat_template(&parsed, true)
        .map_err(|e| match e {
            allam_tokenizer::Error::Template { message } => {
                ValidationError::ChatTemplate { message }
            }
            allam_tokenizer::Error::NoChatTemplate => ValidationError::NoChatTemplate,
            other => ValidationError::Tokenize {
                field: FIELD,
                message: other.to_string(),
            },
        })?;
    let token_ids = encode(tokenizer, &text, false, FIELD)?;
    Ok(CheckedPrompt {
        text,
        token_ids,
        field: FIELD,
    })
}

fn check_chars(field: &'static str, chars: usize, limits: &Limits) -> Result<(), ValidationError> {
    if chars > limits.max_prompt_chars {
        return Err(ValidationError::PromptTooLong {
            field,
            max_chars: limits.max_prompt_chars,
            got_chars: chars,
        });
    }
    Ok(())
}

fn encode(
    tokenizer: &Tokenizer,
    text: &str,
    add_special_tokens: bool,
    field: &'static str,
) -> Result<Vec<TokenId>, ValidationError> {
    tokenizer
        .encode(text, add_special_tokens)
        .map_err(|e| ValidationError::Tokenize {
            field,
            message: e.to_string(),
        })
}

/// `role` cut to a bounded number of characters (on a char boundary) for echoing.
fn echo(role: &str) -> String {
    if role.chars().count() <= MAX_ECHOED_ROLE_CHARS {
        role.to_owned()
    } else {
        let mut cut: String = role.chars().take(MAX_ECHOED_ROLE_CHARS).collect();
        cut.push('…');
        cut
    }
}
