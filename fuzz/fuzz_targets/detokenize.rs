//! Tokenizer encode of arbitrary text, then streaming detokenization of arbitrary ids.
//!
//! Input layout (so that hand-written seeds are plain text): the bytes up to the first NUL are
//! the text, made UTF-8 lossily and encoded (with special tokens when its byte length is even,
//! so both leading-`▁` cases occur); after the NUL, each pair of bytes is a little-endian `u16`
//! taken modulo the vocabulary (special and byte-fallback tokens included). The encoded ids,
//! then those, are fed one by one through `IncrementalDecoder`, then `flush()`.
//!
//! Must never panic or error (every id is in the vocabulary). Asserted: the invariant
//! `allam_tokenizer::incremental` documents: the pieces plus `flush()` concatenate to
//! `decode(all ids, skip_special_tokens=true)` whenever no later token rewrote text that was
//! already printable. "Rewrote" is detected independently of the decoder, from full decodes
//! only: a prefix decode that did not end in U+FFFD (so was printable) is not a prefix of a
//! later prefix decode. Pieces are `String`s, so UTF-8 validity holds by construction.

#![no_main]

use libfuzzer_sys::fuzz_target;

/// Bounds the quadratic reference check (one full decode per prefix).
const MAX_IDS: usize = 256;

fuzz_target!(|data: &[u8]| {
    let tokenizer = allam_fuzz::tokenizer();
    let (text, extra) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (&data[..nul], &data[nul + 1..]),
        None => (data, &[][..]),
    };
    let add_special_tokens = text.len() % 2 == 0;
    let Ok(mut ids) = tokenizer.encode(&String::from_utf8_lossy(text), add_special_tokens) else {
        return;
    };
    let vocab = u32::try_from(tokenizer.vocab_size()).expect("vocabulary fits u32");
    ids.extend(
        extra
            .chunks_exact(2)
            .map(|pair| u32::from(u16::from_le_bytes([pair[0], pair[1]])) % vocab),
    );
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
        let full = tokenizer
            .decode(&ids, true)
            .expect("decode of in-vocabulary ids");
        assert_eq!(
            streamed, full,
            "pieces + flush differ from the full decode of {ids:?}"
        );
    }
});
