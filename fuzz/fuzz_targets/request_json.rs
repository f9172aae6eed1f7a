//! Arbitrary bytes as an OpenAI request body, through the HTTP front's own parsing
//! (`allam_http::parse_chat_request` / `parse_completion_request` / `parse_score_request`
//! for the model card's `/score`: JSON with the failing
//! field's path, then the wire mapping) and then `allam_request::validate` with the fixture
//! tokenizer, as `Router::generate` does. Every input must end in `Ok` or an `Err`; a panic,
//! hang or out-of-memory is the bug. Each body is tried as all three endpoints: they share
//! most fields but map `prompt`/`messages`, `logprobs` and defaults differently.

#![no_main]

use allam_request::{validate, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let tokenizer = allam_fuzz::tokenizer();
    let limits = Limits::default();
    for parsed in [
        allam_http::parse_chat_request(body),
        allam_http::parse_completion_request(body),
        allam_http::parse_score_request(body),
    ] {
        let Ok(raw) = parsed else { continue };
        if let Ok(valid) = validate(raw, &limits, tokenizer) {
            // `validate`'s documented invariant: the prompt plus the generation budget fits
            // the context.
            let prompt = valid.prompt_token_ids().len();
            let budget = usize::try_from(valid.params().max_new_tokens).expect("u32 fits usize");
            assert!(
                prompt + budget <= usize::try_from(limits.max_context).expect("u32 fits usize"),
                "validated request overflows the context: {prompt} + {budget}"
            );
            assert!(budget >= 1, "validated request generates nothing");
            let params = valid.params();
            // `SamplingParams`' documented ranges.
            let t = f64::from(params.temperature);
            assert!(
                t == 0.0 || (1e-5..=limits.max_temperature).contains(&t),
                "temperature {t} out of range"
            );
            assert!(
                params.top_p > 0.0 && params.top_p <= 1.0,
                "top_p {} out of range",
                params.top_p
            );
        }
    }
});
