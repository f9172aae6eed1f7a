//! Tokenizer encode of arbitrary text, then streaming detokenization of arbitrary ids.
//!
//! The text (arbitrary bytes, made UTF-8 lossily, as a front would after rejecting nothing)
//! is encoded; its ids, followed by arbitrary in-vocabulary ids (special and byte-fallback
//! tokens included), are fed one by one through `IncrementalDecoder`, then `flush()`.
//!
//! Must never panic or error (every id is in the vocabulary). Asserted: the invariant
//! `allam_tokenizer::incremental` documents: the pieces plus `flush()` concatenate to
//! `decode(all ids, skip_special_tokens=true)` whenever no later token rewrote text that was
//! already printable. "Rewrote" is detected independently of the decoder, from full decodes
//! only: a prefix decode that did not end in U+FFFD (so was printable) is not a prefix of a
//! later prefix decode. Pieces are `String`s, so UTF-8 validity holds by construction.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

/// Bounds the quadratic reference check (one full decode per prefix).
const MAX_IDS: usize = 256;

#[derive(Debug, Arbitrary)]
struct Input {
    text: Vec<u8>,
    add_special_tokens: bool,
    ids: Vec<u16>,
}

fuzz_target!(|input: Input| {
    let tokenizer = allam_fuzz::tokenizer();
    let text = String::from_utf8_lossy(&input.text);
    let Ok(mut ids) = tokenizer.encode(&text, input.add_special_tokens) else {
        return;
    };
    let vocab = u32::try_from(tokenizer.vocab_size()).expect("vocabulary fits u32");
    ids.extend(input.ids.iter().map(|&id| u32::from(id) % vocab));
    ids.truncate(MAX_IDS);

    let mut decoder = tokenizer.incremental_decoder();
    let mut streamed = String::new();
    let mut last_printable: Option<String> = None;
    let mut rewritten = false;
    for (k, &id) in ids.iter().enumerate() {
        let piece = decoder
            .push(id)
            .unwrap_or_else(|err| panic!("push of in-vocabulary id {id} failed: {err}"));
        streamed.push_str(&piece);

        let full = tokenizer
            .decode(&ids[..=k], true)
            .expect("decode of in-vocabulary ids");
        if last_printable
            .as_deref()
            .is_some_and(|printable| !full.starts_with(printable))
        {
            rewritten = true;
        }
        if !full.ends_with('\u{FFFD}') {
            last_printable = Some(full);
        }
    }
    let rest = decoder.flush().expect("flush after in-vocabulary ids");
    streamed.push_str(&rest);

    if !rewritten {
        let full = tokenizer.decode(&ids, true).expect("decode of in-vocabulary ids");
        assert_eq!(
            streamed, full,
            "pieces + flush differ from the full decode of {ids:?}"
        );
    }
});
