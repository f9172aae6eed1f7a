//! Arbitrary chat conversations through the chat template (minijinja running ALLaM's
//! Llama-2 template, which slices, `.strip()`s and raises on non-alternating roles), then the
//! encoder; and the same conversation with its raw role strings through
//! `allam_request::validate`, which parses roles and renders the same template.
//!
//! Must never panic. Checked: a rendered conversation encodes to in-vocabulary ids, and when
//! `validate` accepts a conversation its prompt is exactly the template's rendering (with
//! `add_generation_prompt`) and that rendering's encoding without added special tokens.

#![no_main]

use allam_request::{validate, ChatMessage, Limits, PromptInput, RawRequest};
use allam_tokenizer::{Message, Role};
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Turn {
    /// `% 4`: system, user, assistant, or `other_role` (unknown to the template).
    role: u8,
    other_role: String,
    content: String,
}

#[derive(Debug, Arbitrary)]
struct Conversation {
    turns: Vec<Turn>,
    add_generation_prompt: bool,
}

fn known_role(turn: &Turn) -> Option<Role> {
    match turn.role % 4 {
        0 => Some(Role::System),
        1 => Some(Role::User),
        2 => Some(Role::Assistant),
        _ => None,
    }
}

fuzz_target!(|conversation: Conversation| {
    let tokenizer = allam_fuzz::tokenizer();

    // The tokenizer's API cannot express an unknown role: render the known-role turns.
    let messages: Vec<Message> = conversation
        .turns
        .iter()
        .filter_map(|turn| known_role(turn).map(|role| Message::new(role, turn.content.clone())))
        .collect();
    if let Ok(text) = tokenizer.apply_chat_template(&messages, conversation.add_generation_prompt) {
        if let Ok(ids) = tokenizer.encode(&text, false) {
            tokenizer
                .check_ids(&ids)
                .expect("the encoder produced an id outside its own vocabulary");
            // Decoding what we encoded must work too (it is what logs and echo do).
            let _ = tokenizer.decode(&ids, false);
        }
    }

    // The request path, unknown roles included.
    let raw_messages: Vec<ChatMessage> = conversation
        .turns
        .iter()
        .map(|turn| ChatMessage {
            role: known_role(turn).map_or_else(|| turn.other_role.clone(), |r| r.as_str().into()),
            content: turn.content.clone(),
        })
        .collect();
    let raw = RawRequest {
        input: PromptInput::Chat(raw_messages),
        params: Default::default(),
        model: None,
    };
    if let Ok(valid) = validate(raw, &Limits::default(), tokenizer) {
        let parsed: Vec<Message> = conversation
            .turns
            .iter()
            .map(|turn| {
                let role = known_role(turn)
                    .or_else(|| turn.other_role.parse().ok())
                    .expect("validate accepted only known roles");
                Message::new(role, turn.content.clone())
            })
            .collect();
        let text = tokenizer
            .apply_chat_template(&parsed, true)
            .expect("validate rendered this conversation");
        assert_eq!(
            valid.prompt_text(),
            text,
            "validated prompt is not the rendering"
        );
        let ids = tokenizer
            .encode(&text, false)
            .expect("validate encoded this text");
        assert_eq!(valid.prompt_token_ids(), ids.as_slice());
    }
});
