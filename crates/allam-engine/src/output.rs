//! Per-sequence output state: the sequence's RNG, its streaming detokenizer and its stop-string
//! matcher, and the decision, token by token, of whether the sequence goes on.
//!
//! Stopping rules (checked after each generated token, `generated` counting it):
//! - eos (unless `ignore_eos`) or a `stop_token_ids` entry, once more than `min_new_tokens`
//!   tokens were generated: `Stop`. The token's id is reported, its text is not.
//! - a stop string, once at least `min_new_tokens` tokens were generated: `Stop`; the text ends
//!   right before the stop string (it may end inside the token that completed it).
//! - `generated == max_new_tokens`: `Length`.
//!
//! Invariant: the concatenation of all returned deltas equals `text()`.

use allam_request::SamplingParams;
use allam_tokenizer::{IncrementalDecoder, Tokenizer};
use allam_types::{FinishReason, TokenId};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::stop::StopMatcher;

pub(crate) struct SeqOutput {
    pub(crate) index: u32,
    pub(crate) rng: ChaCha8Rng,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    text: String,
}

impl SeqOutput {
    /// `seed` is the request's (given or drawn once per request); sequence `index` gets its own
    /// ChaCha stream of it, so `n` sequences differ and each is reproducible on its own.
    pub(crate) fn new(
        index: u32,
        seed: u64,
        tokenizer: &Tokenizer,
        params: &SamplingParams,
    ) -> SeqOutput {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(u64::from(index));
        SeqOutput {
            index,
            rng,
            decoder: tokenizer.incremental_decoder(),
            stop: StopMatcher::new(&params.stop),
            text: String::new(),
        }
    }

    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// Takes the token just appended (`generated` tokens so far, this one included). Returns
    /// the text that became streamable and, if the sequence ends here, why.
    pub(crate) fn on_token(
        &mut self,
        token: TokenId,
        params: &SamplingParams,
        eos: &[TokenId],
        generated: usize,
        context_full: bool,
    ) -> (String, Option<FinishReason>) {
        let min_new = params.min_new_tokens as usize;
        let is_stop_token =
            (eos.contains(&token) && !params.ignore_eos) || params.stop_token_ids.contains(&token);
        if is_stop_token && generated > min_new {
            let (tail, _) = self.finish_tail(true);
            return (tail, Some(FinishReason::Stop));
        }
        // An id the tokenizer does not know (a model vocabulary padded past the tokenizer's)
        // has no text; the id is still reported.
        let piece = self.decoder.push(token).unwrap_or_default();
        let match_stops = generated >= min_new;
        let pushed = self.stop.push(&piece, match_stops);
        let mut delta = pushed.text;
        if pushed.stopped {
            self.text.push_str(&delta);
            return (delta, Some(FinishReason::Stop));
        }
        self.text.push_str(&delta);
        if generated >= params.max_new_tokens as usize || context_full {
            let (tail, stopped) = self.finish_tail(match_stops);
            delta.push_str(&tail);
            let reason = if stopped {
                FinishReason::Stop
            } else {
                FinishReason::Length
            };
            return (delta, Some(reason));
        }
        (delta, None)
    }

    /// Releases what the decoder and the stop matcher still hold; `true` when that text
    /// completed a stop string (then the text ends before it).
    fn finish_tail(&mut self, match_stops: bool) -> (String, bool) {
        let piece = self.decoder.flush().unwrap_or_default();
        let pushed = self.stop.push(&piece, match_stops);
        let mut tail = pushed.text;
        if !pushed.stopped {
            tail.push_str(&self.stop.flush());
        }
        self.text.push_str(&tail);
        (tail, pushed.stopped)
    }
}
