//! Engine logprobs → OpenAI's two logprobs shapes (chat's `content` list, completions'
//! parallel arrays), including how one token id is shown as text.
//!
//! Token text comes from the vocabulary piece: `▁` becomes a space; a byte-fallback piece
//! `<0xNN>` is shown as its character when ASCII, else as `bytes:\xNN` with the raw byte in
//! `bytes` (the form OpenAI uses for tokens that are not whole characters, common in Arabic
//! here). An id with no known piece is shown as `token_id:N`.
//!
//! JSON has no `-inf`: a non-finite logprob (a token masked out by top-k/top-p) is reported
//! as [`LOGPROB_FLOOR`], as vLLM does, so every SDK can parse it as a float.

use allam_types::{StepLogprobs, TokenId};

use super::wire::{ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs};

/// Stand-in for `-inf` and NaN logprobs.
pub(crate) const LOGPROB_FLOOR: f32 = -9999.0;

/// The vocabulary lookup logprobs need: id → piece (`▁Hello`, `<0xE2>`, `</s>`).
pub(crate) trait TokenPieces: Send + Sync {
    fn piece(&self, id: TokenId) -> Option<String>;
}

/// A token as shown to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TokenText {
    pub text: String,
    pub bytes: Vec<u8>,
    /// Characters this token starts in the decoded text (0 for a UTF-8 continuation byte).
    pub chars: u32,
}

pub(crate) fn token_text(pieces: &dyn TokenPieces, id: TokenId) -> TokenText {
    let Some(piece) = pieces.piece(id) else {
        let text = format!("token_id:{id}");
        return TokenText {
            bytes: text.clone().into_bytes(),
            chars: 0,
            text,
        };
    };
    if let Some(byte) = byte_fallback(&piece) {
        let is_continuation = byte & 0b1100_0000 == 0b1000_0000;
        let text = if byte.is_ascii() {
            char::from(byte).to_string()
        } else {
            format!("bytes:\\x{byte:02x}")
        };
        return TokenText {
            text,
            bytes: vec![byte],
            chars: u32::from(!is_continuation),
        };
    }
    let text = piece.replace('\u{2581}', " ");
    TokenText {
        bytes: text.clone().into_bytes(),
        chars: u32::try_from(text.chars().count()).unwrap_or(u32::MAX),
        text,
    }
}

/// `<0xNN>` → NN.
fn byte_fallback(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

pub(crate) fn finite(logprob: f32) -> f32 {
    if logprob.is_finite() {
        logprob
    } else {
        LOGPROB_FLOOR
    }
}

pub(crate) fn chat_logprobs(
    steps: &[StepLogprobs],
    pieces: &dyn TokenPieces,
) -> Vec<ChatTokenLogprob> {
    steps
        .iter()
        .map(|step| {
            let chosen = token_text(pieces, step.chosen.id);
            ChatTokenLogprob {
                token: chosen.text,
                logprob: finite(step.chosen.logprob),
                bytes: chosen.bytes,
                top_logprobs: step
                    .top
                    .iter()
                    .map(|alt| {
                        let alt_text = token_text(pieces, alt.id);
                        ChatTopLogprob {
                            token: alt_text.text,
                            logprob: finite(alt.logprob),
                            bytes: alt_text.bytes,
                        }
                    })
                    .collect(),
            }
        })
        .collect()
}

/// Appends `steps` to `out`; `offset` is the running character offset of the choice's text.
pub(crate) fn extend_completion_logprobs(
    out: &mut CompletionLogprobs,
    offset: &mut u32,
    steps: &[StepLogprobs],
    pieces: &dyn TokenPieces,
) {
    for step in steps {
        let chosen = token_text(pieces, step.chosen.id);
        out.text_offset.push(*offset);
        *offset = offset.saturating_add(chosen.chars);
        out.tokens.push(chosen.text);
        out.token_logprobs.push(finite(step.chosen.logprob));
        let top = step
            .top
            .iter()
            .map(|alt| {
                let logprob = serde_json::Number::from_f64(f64::from(finite(alt.logprob)))
                    .map_or(serde_json::Value::Null, serde_json::Value::Number);
                (token_text(pieces, alt.id).text, logprob)
            })
            .collect();
        out.top_logprobs.push(top);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use allam_types::TokenLogprob;

    /// A five-piece vocabulary for tests.
    pub(crate) struct TestPieces;

    impl TokenPieces for TestPieces {
        fn piece(&self, id: TokenId) -> Option<String> {
            match id {
                1 => Some("<s>".into()),
                10 => Some("\u{2581}Hello".into()),
                11 => Some("<0x0A>".into()),
                12 => Some("<0xD8>".into()),
                13 => Some("<0xA7>".into()),
                14 => Some("لم".into()),
                _ => None,
            }
        }
    }

    fn step(id: TokenId, logprob: f32, top: &[(TokenId, f32)]) -> StepLogprobs {
        StepLogprobs {
            chosen: TokenLogprob { id, logprob },
            top: top
                .iter()
                .map(|&(id, logprob)| TokenLogprob { id, logprob })
                .collect(),
        }
    }

    #[test]
    fn token_text_covers_pieces_bytes_and_unknown_ids() {
        let text = |id| token_text(&TestPieces, id);
        assert_eq!(
            text(10),
            TokenText {
                text: " Hello".into(),
                bytes: b" Hello".to_vec(),
                chars: 6
            }
        );
        assert_eq!(
            text(11),
            TokenText {
                text: "\n".into(),
                bytes: vec![0x0A],
                chars: 1
            }
        );
        assert_eq!(
            text(12),
            TokenText {
                text: "bytes:\\xd8".into(),
                bytes: vec![0xD8],
                chars: 1
            }
        );
        assert_eq!(text(13).chars, 0, "a continuation byte starts no character");
        assert_eq!(text(14).chars, 2);
        assert_eq!(text(99).text, "token_id:99");
        // `ا` is D8 A7 in UTF-8: the two byte tokens concatenate to the character.
        let joined = [text(12).bytes, text(13).bytes].concat();
        assert_eq!(String::from_utf8(joined).expect("utf-8"), "ا");
    }

    #[test]
    fn chat_logprobs_map_chosen_and_top_and_clamp_infinity() {
        let out = chat_logprobs(
            &[step(10, -0.5, &[(10, -0.5), (14, f32::NEG_INFINITY)])],
            &TestPieces,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].token, " Hello");
        assert_eq!(out[0].logprob, -0.5);
        assert_eq!(out[0].top_logprobs.len(), 2);
        assert_eq!(out[0].top_logprobs[1].token, "لم");
        assert_eq!(out[0].top_logprobs[1].logprob, LOGPROB_FLOOR);
        let json = serde_json::to_string(&out).expect("serializable");
        assert!(!json.contains("null"), "{json}");
    }

    #[test]
    fn completion_logprobs_offsets_count_characters_across_calls() {
        let mut out = CompletionLogprobs::default();
        let mut offset = 0;
        extend_completion_logprobs(
            &mut out,
            &mut offset,
            &[step(10, -1.0, &[(10, -1.0)])],
            &TestPieces,
        );
        extend_completion_logprobs(
            &mut out,
            &mut offset,
            &[
                step(12, -2.0, &[]),
                step(13, -0.1, &[]),
                step(14, -0.2, &[]),
            ],
            &TestPieces,
        );
        assert_eq!(
            out.tokens,
            vec![" Hello", "bytes:\\xd8", "bytes:\\xa7", "لم"]
        );
        assert_eq!(out.text_offset, vec![0, 6, 7, 7]);
        assert_eq!(offset, 9, "\" Hello\" + \"ا\" + \"لم\" is 9 characters");
        assert_eq!(out.token_logprobs, vec![-1.0, -2.0, -0.1, -0.2]);
        assert_eq!(
            out.top_logprobs[0].get(" Hello"),
            Some(&serde_json::json!(-1.0))
        );
        assert!(out.top_logprobs[1].is_empty());
    }
}
