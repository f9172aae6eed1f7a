//! Streaming detokenization: token ids in, printable text pieces out.
//!
//! A piece is emitted after token k when the decode of the tokens so far does not end in U+FFFD
//! (which is what the byte-fallback decoder produces for an incomplete UTF-8 sequence); the piece
//! is whatever text those tokens added. Otherwise the piece is empty and the text is held back
//! until the character completes. This is the fixtures' rule (README §3.4), so the first token's
//! leading `▁` is stripped exactly as the full decode strips it.
//!
//! Cost: instead of decoding the whole sequence at every step, we decode a short window
//! `ids[prefix_offset..]` and compare it with the decode of `ids[prefix_offset..read_offset]`
//! (the tokens already emitted in the previous step). The window restarts at the last emission
//! point, so it is normally two or three tokens long, and it only grows while text is held back.
//! Special tokens never enter it: `skip_special_tokens=true` removes them before decoding.
//! Both decodes start at the same token, so decoder steps that look at the start of the string
//! (Llama's "strip one leading space") act identically on both and cancel out.
//!
//! Invariant: the concatenation of all pieces plus `flush()` equals
//! `decode(all ids, skip_special_tokens=true)` whenever no later token rewrites text that was
//! already printable. The one way that happens with byte fallback is a run of byte tokens that
//! decoded to valid characters and then continues with a byte that makes the whole run invalid
//! (the decoder then turns every byte of the run into U+FFFD). Text already streamed cannot be
//! recalled; in that case the pieces keep the characters as streamed and continue after them.

use allam_types::TokenId;

use crate::{Error, Tokenizer};

const REPLACEMENT_CHAR: char = '\u{FFFD}';

/// Turns a stream of token ids into UTF-8-safe text pieces. One per generated sequence.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    tokenizer: Tokenizer,
    /// `ids[prefix_offset..]` of the whole sequence.
    window: Vec<TokenId>,
    /// `read_offset - prefix_offset`: how many window tokens were already emitted.
    read_len: usize,
    /// `decode(window[..read_len])`.
    prefix_text: String,
}

impl IncrementalDecoder {
    pub fn new(tokenizer: &Tokenizer) -> Self {
        IncrementalDecoder {
            tokenizer: tokenizer.clone(),
            window: Vec::new(),
            read_len: 0,
            prefix_text: String::new(),
        }
    }

    /// Feeds one token; returns the text that became printable (often empty while a multi-byte
    /// character is incomplete, or for special tokens). An id outside the vocabulary is an error
    /// and leaves the decoder unchanged.
    pub fn push(&mut self, id: TokenId) -> Result<String, Error> {
        self.tokenizer.check_ids(&[id])?;
        // The decoder drops special tokens before anything else runs, so leaving them out of
        // the window changes no text and keeps a run of them from growing the window.
        if self.tokenizer.is_special(id) {
            return Ok(String::new());
        }
        self.window.push(id);
        let text = self.decode_window()?;
        if text.ends_with(REPLACEMENT_CHAR) {
            return Ok(String::new());
        }
        self.emit(&text)
    }

    /// Ends the stream: returns everything still held back (an incomplete character becomes
    /// U+FFFD, as in the full decode).
    pub fn flush(&mut self) -> Result<String, Error> {
        if self.window.len() == self.read_len {
            return Ok(String::new());
        }
        let text = self.decode_window()?;
        self.emit(&text)
    }

    /// Emits `text` (the decode of the whole window) minus what was already emitted, and moves
    /// the window forward when something new was emitted.
    fn emit(&mut self, text: &str) -> Result<String, Error> {
        let piece = match text.strip_prefix(self.prefix_text.as_str()) {
            Some(new) => new.to_owned(),
            // A later byte token rewrote streamed text (see the module doc): keep what was
            // streamed and continue after as many characters as were emitted.
            None => text
                .chars()
                .skip(self.prefix_text.chars().count())
                .collect(),
        };
        if piece.is_empty() {
            return Ok(piece);
        }
        self.window.drain(..self.read_len);
        self.read_len = self.window.len();
        self.prefix_text = self.decode_window()?;
        Ok(piece)
    }

    fn decode_window(&self) -> Result<String, Error> {
        self.tokenizer.decode(&self.window, true)
    }

    /// Tokens currently kept for decoding (bounded unless text is held back).
    #[cfg(test)]
    pub(crate) fn window_len(&self) -> usize {
        self.window.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use proptest::prelude::*;

    use super::*;
    use crate::train_demo_tokenizer;

    const DEMO_VOCAB: usize = 3000;
    /// First id after `<unk>`, `<s>`, `</s>` and the 256 byte tokens.
    const FIRST_PIECE: u32 = 259;

    fn demo() -> &'static Tokenizer {
        static DEMO: OnceLock<Tokenizer> = OnceLock::new();
        DEMO.get_or_init(|| train_demo_tokenizer(DEMO_VOCAB).expect("demo tokenizer trains"))
    }

    fn byte_ids(c: char) -> Vec<TokenId> {
        let mut buf = [0u8; 4];
        c.encode_utf8(&mut buf)
            .bytes()
            .map(|b| u32::from(b) + 3)
            .collect()
    }

    /// Streams `ids`; returns each push's piece and the flush.
    fn stream(tok: &Tokenizer, ids: &[TokenId]) -> (Vec<String>, String) {
        let mut decoder = tok.incremental_decoder();
        let pieces = ids
            .iter()
            .map(|&id| decoder.push(id).expect("id in vocab"))
            .collect();
        (pieces, decoder.flush().expect("flush"))
    }

    /// The fixtures' rule, computed the slow way: decode every prefix in full.
    fn prefix_decodes(tok: &Tokenizer, ids: &[TokenId]) -> Vec<String> {
        (1..=ids.len())
            .map(|k| tok.decode(&ids[..k], true).expect("decodes"))
            .collect()
    }

    /// Checks the pieces against the slow rule. When `must_be_stable` is false, sequences in
    /// which a later byte rewrites streamed text are only checked for holding back.
    fn check_against_full_decodes(tok: &Tokenizer, ids: &[TokenId], must_be_stable: bool) {
        let (pieces, flushed) = stream(tok, ids);
        let decodes = prefix_decodes(tok, ids);
        let full = tok.decode(ids, true).expect("decodes");
        let stable = decodes
            .iter()
            .all(|d| d.ends_with(REPLACEMENT_CHAR) || full.starts_with(d.as_str()));
        assert!(stable || !must_be_stable, "unexpected rewrite in {ids:?}");
        let mut emitted = String::new();
        for (k, piece) in pieces.iter().enumerate() {
            if decodes[k].ends_with(REPLACEMENT_CHAR) {
                assert_eq!(piece, "", "token {k} of {ids:?} must be held back");
            }
            emitted.push_str(piece);
            if stable && !decodes[k].ends_with(REPLACEMENT_CHAR) {
                assert_eq!(emitted, decodes[k], "text after token {k} of {ids:?}");
            }
        }
        emitted.push_str(&flushed);
        if stable {
            assert_eq!(emitted, full, "stream of {ids:?}");
        }
    }

    /// A token run that cannot break UTF-8: a vocabulary piece, a special token, the byte tokens
    /// of one whole character, or the encoding of a short bilingual text.
    fn unit() -> impl Strategy<Value = Vec<TokenId>> {
        prop_oneof![
            3 => (FIRST_PIECE..DEMO_VOCAB as u32).prop_map(|id| vec![id]),
            1 => (0u32..3).prop_map(|id| vec![id]),
            // U+FFFD itself would make "no replacement char" meaningless.
            4 => any::<char>()
                .prop_filter("not U+FFFD", |&c| c != REPLACEMENT_CHAR)
                .prop_map(byte_ids),
            2 => "[a-zA-Z ☕🌴ءاأبتثجحخدذرزسشصضطظعغفقكلمنهوي\u{064B}-\u{0652}0-9٠-٩\n]{0,12}"
                .prop_map(|text| demo().encode(&text, false).expect("encodes")),
        ]
    }

    proptest! {
        #[test]
        fn whole_characters_stream_exactly(units in prop::collection::vec(unit(), 0..24)) {
            let ids: Vec<TokenId> = units.concat();
            let (pieces, _) = stream(demo(), &ids);
            for piece in &pieces {
                prop_assert!(!piece.contains(REPLACEMENT_CHAR), "broken char in {pieces:?}");
            }
            check_against_full_decodes(demo(), &ids, true);
        }

        #[test]
        fn arbitrary_ids_follow_the_hold_back_rule(
            ids in prop::collection::vec(
                prop_oneof![3 => 3u32..259, 2 => FIRST_PIECE..DEMO_VOCAB as u32, 1 => 0u32..3],
                0..40,
            )
        ) {
            check_against_full_decodes(demo(), &ids, false);
        }
    }

    #[test]
    fn first_leading_space_is_stripped_and_later_ones_kept() {
        let tok = demo();
        let ids = tok.encode("Tea and coffee", false).expect("encodes");
        let (pieces, flushed) = stream(tok, &ids);
        assert_eq!(pieces.concat() + &flushed, "Tea and coffee");
        assert!(pieces[0].starts_with('T'), "{pieces:?}");
        // A space-only token after the first emission is text.
        let space = tok.token_to_id("▁").expect("▁ is a piece");
        let (pieces, _) = stream(tok, &[ids[0], space, space]);
        assert_eq!(pieces[1..], [" ".to_owned(), " ".to_owned()]);
    }

    #[test]
    fn specials_between_bytes_do_not_break_a_character() {
        let tok = demo();
        let mut ids = byte_ids('☕');
        ids.insert(1, 2);
        ids.insert(3, 1);
        let (pieces, flushed) = stream(tok, &ids);
        assert_eq!(pieces.concat(), "☕");
        assert_eq!(flushed, "");
    }

    #[test]
    fn incomplete_character_is_flushed_as_replacement() {
        let tok = demo();
        let ids = &byte_ids('🌴')[..3];
        let (pieces, flushed) = stream(tok, ids);
        assert!(pieces.iter().all(String::is_empty), "{pieces:?}");
        assert_eq!(flushed, tok.decode(ids, true).expect("decodes"));
        assert_eq!(flushed, "\u{FFFD}".repeat(3));
    }

    #[test]
    fn out_of_vocabulary_id_is_an_error_and_changes_nothing() {
        let tok = demo();
        let mut decoder = tok.incremental_decoder();
        let first = decoder.push(FIRST_PIECE).expect("in vocab");
        let err = decoder
            .push(DEMO_VOCAB as u32)
            .expect_err("one past the vocabulary");
        assert_eq!(err.reason(), "unknown_token_id");
        let mut streamed = first + &decoder.push(FIRST_PIECE + 1).expect("in vocab");
        streamed.push_str(&decoder.flush().expect("flush"));
        assert_eq!(
            streamed,
            tok.decode(&[FIRST_PIECE, FIRST_PIECE + 1], true)
                .expect("decodes")
        );
    }

    #[test]
    fn window_stays_short_over_long_generations() {
        let tok = demo();
        let mut decoder = tok.incremental_decoder();
        let mut max_window = 0;
        let mut id = FIRST_PIECE;
        for step in 0..5000u32 {
            // Pieces, byte-encoded characters and special tokens, interleaved.
            let ids = match step % 7 {
                3 => byte_ids('ش'),
                5 => vec![2, 1],
                _ => vec![id],
            };
            for id in ids {
                decoder.push(id).expect("in vocab");
                max_window = max_window.max(decoder.window_len());
            }
            id = FIRST_PIECE + (id + 37 - FIRST_PIECE) % (DEMO_VOCAB as u32 - FIRST_PIECE);
        }
        assert!(max_window <= 4, "window grew to {max_window}");
    }
}
