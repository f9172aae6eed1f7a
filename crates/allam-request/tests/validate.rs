//! `validate` through the crate's boundary, one table row per rule, with the fixtures'
//! tokenizer (vocabulary 4000, Llama-2 chat template) and its transformers goldens.

use std::path::PathBuf;
use std::sync::OnceLock;

use allam_request::{
    validate, ChatMessage, Limits, PromptInput, RawRequest, RawSamplingParams, ValidRequest,
    ValidationError,
};
use allam_tokenizer::Tokenizer;
use serde_json::Value;

/// `ALLAM_FIXTURES`, else `<workspace root>/../shared/fixtures`; panics loudly when missing.
fn fixtures_dir() -> PathBuf {
    let dir = match std::env::var_os("ALLAM_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"),
    };
    assert!(
        dir.join("tiny-allam/goldens.json").is_file(),
        "fixtures not found at {} (set ALLAM_FIXTURES)",
        dir.display()
    );
    dir
}

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        Tokenizer::from_dir(&fixtures_dir().join("tiny-allam")).expect("fixture tokenizer loads")
    })
}

/// The fixture tokenizer with the chat template removed from its config.
fn tokenizer_without_template() -> Tokenizer {
    let dir = fixtures_dir().join("tiny-allam");
    let json = std::fs::read(dir.join("tokenizer.json")).expect("tokenizer.json");
    let mut config: Value = serde_json::from_slice(
        &std::fs::read(dir.join("tokenizer_config.json")).expect("tokenizer_config.json"),
    )
    .expect("config JSON");
    config
        .as_object_mut()
        .expect("config object")
        .remove("chat_template");
    let config = serde_json::to_vec(&config).expect("serializes");
    Tokenizer::from_bytes(&json, &config).expect("loads without template")
}

fn golden_case(id: &str) -> Value {
    static GOLDENS: OnceLock<Value> = OnceLock::new();
    let goldens = GOLDENS.get_or_init(|| {
        let bytes =
            std::fs::read(fixtures_dir().join("tiny-allam/goldens.json")).expect("goldens.json");
        serde_json::from_slice(&bytes).expect("goldens JSON")
    });
    goldens["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no golden case {id}"))
}

fn golden_ids(case: &Value) -> Vec<u32> {
    case["input_ids"]
        .as_array()
        .expect("input_ids")
        .iter()
        .map(|v| u32::try_from(v.as_u64().expect("id")).expect("fits"))
        .collect()
}

fn golden_messages(case: &Value) -> Vec<ChatMessage> {
    serde_json::from_value(case["messages"].clone()).expect("messages")
}

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.to_owned(),
        content: content.to_owned(),
    }
}

/// "How do I prepare a cup of tea?" as a chat: 19 prompt tokens (golden `chat_en_tea`).
fn tea() -> PromptInput {
    PromptInput::Chat(vec![msg("user", "How do I prepare a cup of tea?")])
}
const TEA_TOKENS: u32 = 19;

fn request(input: PromptInput, edit: impl FnOnce(&mut RawSamplingParams)) -> RawRequest {
    let mut params = RawSamplingParams::default();
    edit(&mut params);
    RawRequest {
        input,
        params,
        model: None,
    }
}

fn params(edit: impl FnOnce(&mut RawSamplingParams)) -> RawRequest {
    request(tea(), edit)
}

enum Expect {
    /// Field, reason and the exact message.
    Reject(&'static str, &'static str, &'static str),
    Accept(fn(&ValidRequest)),
}

struct Case {
    name: &'static str,
    raw: RawRequest,
    limits: Limits,
    expect: Expect,
}

fn case(name: &'static str, raw: RawRequest, expect: Expect) -> Case {
    Case {
        name,
        raw,
        limits: Limits::default(),
        expect,
    }
}

fn with_limits(mut case: Case, limits: Limits) -> Case {
    case.limits = limits;
    case
}

fn run(cases: Vec<Case>, tokenizer: &Tokenizer) {
    for Case {
        name,
        raw,
        limits,
        expect,
    } in cases
    {
        let result = validate(raw, &limits, tokenizer);
        match (expect, result) {
            (Expect::Reject(field, reason, message), Err(err)) => {
                assert_eq!(err.to_string(), message, "{name}: message");
                assert_eq!(err.field(), Some(field), "{name}: field");
                assert_eq!(err.reason(), reason, "{name}: reason");
            }
            (Expect::Reject(_, _, message), Ok(valid)) => {
                panic!("{name}: accepted {valid:?}, expected rejection {message:?}")
            }
            (Expect::Accept(check), Ok(valid)) => check(&valid),
            (Expect::Accept(_), Err(err)) => panic!("{name}: rejected: {err}"),
        }
    }
}

fn rejects() -> Vec<Case> {
    use Expect::Reject;
    let long_stop: String = "ب".repeat(257);
    vec![
        case("negative temperature", params(|p| p.temperature = Some(-0.5)),
            Reject("temperature", "out_of_range", "`temperature` must be in [0, 100], got -0.5")),
        case("huge temperature", params(|p| p.temperature = Some(101.0)),
            Reject("temperature", "out_of_range", "`temperature` must be in [0, 100], got 101")),
        case("NaN temperature", params(|p| p.temperature = Some(f64::NAN)),
            Reject("temperature", "out_of_range", "`temperature` must be a finite number, got NaN")),
        case("do_sample with zero temperature", params(|p| {
                p.do_sample = Some(true);
                p.temperature = Some(0.0);
            }),
            Reject("temperature", "out_of_range", "`temperature` must be > 0 when `do_sample` is true, got 0")),
        case("do_sample=false still range-checks temperature", params(|p| {
                p.do_sample = Some(false);
                p.temperature = Some(-1.0);
            }),
            Reject("temperature", "out_of_range", "`temperature` must be in [0, 100], got -1")),
        case("top_p above 1", params(|p| p.top_p = Some(1.5)),
            Reject("top_p", "out_of_range", "`top_p` must be in (0, 1], got 1.5")),
        case("top_p zero", params(|p| p.top_p = Some(0.0)),
            Reject("top_p", "out_of_range", "`top_p` must be in (0, 1], got 0")),
        // Regression: found by the request_json fuzz target; > 0 as f64, 0 as the f32 used.
        case("top_p rounds to zero", params(|p| p.top_p = Some(1e-92)),
            Reject("top_p", "out_of_range", "`top_p` must be in (0, 1], got 1e-92")),
        case("repetition_penalty rounds to zero", params(|p| p.repetition_penalty = Some(1e-92)),
            Reject("repetition_penalty", "out_of_range", "`repetition_penalty` must be > 0, got 1e-92")),
        case("top_p infinite", params(|p| p.top_p = Some(f64::INFINITY)),
            Reject("top_p", "out_of_range", "`top_p` must be a finite number, got inf")),
        case("top_k below -1", params(|p| p.top_k = Some(-2)),
            Reject("top_k", "out_of_range", "`top_k` must be -1 or 0 (off), or in [1, 1000], got -2")),
        case("top_k above the cap", params(|p| p.top_k = Some(1001)),
            Reject("top_k", "out_of_range", "`top_k` must be -1 or 0 (off), or in [1, 1000], got 1001")),
        case("min_p above 1", params(|p| p.min_p = Some(1.1)),
            Reject("min_p", "out_of_range", "`min_p` must be in [0, 1], got 1.1")),
        case("min_p negative", params(|p| p.min_p = Some(-0.1)),
            Reject("min_p", "out_of_range", "`min_p` must be in [0, 1], got -0.1")),
        case("zero repetition penalty", params(|p| p.repetition_penalty = Some(0.0)),
            Reject("repetition_penalty", "out_of_range", "`repetition_penalty` must be > 0, got 0")),
        case("presence penalty above 2", params(|p| p.presence_penalty = Some(2.5)),
            Reject("presence_penalty", "out_of_range", "`presence_penalty` must be in [-2, 2], got 2.5")),
        case("frequency penalty below -2", params(|p| p.frequency_penalty = Some(-3.0)),
            Reject("frequency_penalty", "out_of_range", "`frequency_penalty` must be in [-2, 2], got -3")),
        case("zero max_new_tokens", params(|p| p.max_new_tokens = Some(0)),
            Reject("max_new_tokens", "out_of_range", "`max_new_tokens` must be in [1, 4096], got 0")),
        case("negative max_new_tokens", params(|p| p.max_new_tokens = Some(-5)),
            Reject("max_new_tokens", "out_of_range", "`max_new_tokens` must be in [1, 4096], got -5")),
        case("max_new_tokens above the cap", params(|p| p.max_new_tokens = Some(5000)),
            Reject("max_new_tokens", "out_of_range", "`max_new_tokens` must be in [1, 4096], got 5000")),
        case("min_new_tokens above max_new_tokens", params(|p| {
                p.max_new_tokens = Some(10);
                p.min_new_tokens = Some(20);
            }),
            Reject("min_new_tokens", "out_of_range", "`min_new_tokens` must be in [0, 10] (at most `max_new_tokens`), got 20")),
        case("negative min_new_tokens", params(|p| p.min_new_tokens = Some(-1)),
            Reject("min_new_tokens", "out_of_range", "`min_new_tokens` must be in [0, 4096], got -1")),
        case("too many stop strings", params(|p| p.stop = (0..17).map(|i| format!("s{i}")).collect()),
            Reject("stop", "too_many", "`stop` must have at most 16 entries, got 17")),
        case("empty stop string", params(|p| p.stop = vec!["ok".into(), String::new()]),
            Reject("stop", "empty_stop_string", "`stop[1]` must not be empty")),
        case("stop string too long (counted in characters)", params(|p| p.stop = vec![long_stop]),
            Reject("stop", "stop_string_too_long", "`stop[0]` must be at most 256 characters long, got 257")),
        case("stop token id out of vocabulary", params(|p| p.stop_token_ids = vec![2, 4000]),
            Reject("stop_token_ids", "token_id_out_of_vocab", "`stop_token_ids[1]` must be a token id in [0, 4000), got 4000")),
        case("negative stop token id", params(|p| p.stop_token_ids = vec![-1]),
            Reject("stop_token_ids", "token_id_out_of_vocab", "`stop_token_ids[0]` must be a token id in [0, 4000), got -1")),
        case("too many stop token ids", params(|p| p.stop_token_ids = vec![2; 65]),
            Reject("stop_token_ids", "too_many", "`stop_token_ids` must have at most 64 entries, got 65")),
        case("logprobs above the cap", params(|p| p.logprobs = Some(21)),
            Reject("logprobs", "out_of_range", "`logprobs` must be in [0, 20], got 21")),
        case("negative prompt_logprobs", params(|p| p.prompt_logprobs = Some(-1)),
            Reject("prompt_logprobs", "out_of_range", "`prompt_logprobs` must be in [0, 20], got -1")),
        case("zero n", params(|p| p.n = Some(0)),
            Reject("n", "out_of_range", "`n` must be in [1, 16], got 0")),
        case("n above the cap", params(|p| p.n = Some(17)),
            Reject("n", "out_of_range", "`n` must be in [1, 16], got 17")),
        case("priority beyond i32", params(|p| p.priority = Some(1 << 31)),
            Reject("priority", "out_of_range", "`priority` must be in [-2147483648, 2147483647], got 2147483648")),
        case("no messages", request(PromptInput::Chat(vec![]), |_| {}),
            Reject("messages", "empty_prompt", "`messages` must not be empty")),
        case("unknown role", request(PromptInput::Chat(vec![msg("user", "hi"), msg("tool", "{}")]), |_| {}),
            Reject("messages", "unknown_role", "`messages[1].role` must be one of `system`, `user`, `assistant`, got `tool`")),
        case("roles are case-sensitive", request(PromptInput::Chat(vec![msg("User", "hi")]), |_| {}),
            Reject("messages", "unknown_role", "`messages[0].role` must be one of `system`, `user`, `assistant`, got `User`")),
        case("NUL in message content", request(PromptInput::Chat(vec![msg("user", "a\0b")]), |_| {}),
            Reject("messages", "nul_character", "`messages[0].content` must not contain NUL characters (U+0000)")),
        case("roles must alternate (the template's own message)",
            request(PromptInput::Chat(vec![msg("user", "a"), msg("user", "b")]), |_| {}),
            Reject("messages", "chat_template", "`messages` cannot be rendered with the model's chat template: Conversation roles must alternate user/assistant/user/assistant/...")),
        case("assistant cannot open the conversation",
            request(PromptInput::Chat(vec![msg("system", "s"), msg("assistant", "a")]), |_| {}),
            Reject("messages", "chat_template", "`messages` cannot be rendered with the model's chat template: Conversation roles must alternate user/assistant/user/assistant/...")),
        case("empty text prompt", request(PromptInput::Text(String::new()), |_| {}),
            Reject("prompt", "empty_prompt", "`prompt` must not be empty")),
        case("NUL in text prompt", request(PromptInput::Text("x\0".into()), |_| {}),
            Reject("prompt", "nul_character", "`prompt` must not contain NUL characters (U+0000)")),
        case("empty token-id prompt", request(PromptInput::TokenIds(vec![]), |_| {}),
            Reject("prompt", "empty_prompt", "`prompt` must not be empty")),
        case("token-id prompt out of vocabulary", request(PromptInput::TokenIds(vec![1, 4000]), |_| {}),
            Reject("prompt", "token_id_out_of_vocab", "`prompt[1]` must be a token id in [0, 4000), got 4000")),
        with_limits(
            case("text prompt over the character limit", request(PromptInput::Text("كوب شاي".into()), |_| {}),
                Reject("prompt", "prompt_too_long", "`prompt` must be at most 6 characters long, got 7")),
            Limits { max_prompt_chars: 6, ..Limits::default() }),
        with_limits(
            case("messages over the character limit (summed)",
                request(PromptInput::Chat(vec![msg("system", "abc"), msg("user", "defg")]), |_| {}),
                Reject("messages", "prompt_too_long", "`messages` must be at most 6 characters long, got 7")),
            Limits { max_prompt_chars: 6, ..Limits::default() }),
        with_limits(
            case("prompt + max_new_tokens over the context", params(|p| p.max_new_tokens = Some(50)),
                Reject("max_new_tokens", "context_length_exceeded", "`max_new_tokens` (50) plus the prompt's 19 tokens must be at most the context of 64 tokens; at most 45 new tokens fit")),
            Limits::for_context(64)),
        with_limits(
            case("prompt alone fills the context", params(|_| {}),
                Reject("messages", "context_length_exceeded", "`messages` is 19 tokens long, but the context of 19 tokens allows at most 18 prompt tokens (at least 1 must remain for generation)")),
            Limits::for_context(TEA_TOKENS)),
        with_limits(
            case("token-id prompt fills the context", request(PromptInput::TokenIds(vec![1; 8]), |_| {}),
                Reject("prompt", "context_length_exceeded", "`prompt` is 8 tokens long, but the context of 8 tokens allows at most 7 prompt tokens (at least 1 must remain for generation)")),
            Limits::for_context(8)),
        with_limits(
            case("min_new_tokens beyond the room left", params(|p| p.min_new_tokens = Some(50)),
                Reject("min_new_tokens", "context_length_exceeded", "`min_new_tokens` (50) does not fit: the prompt's 19 tokens leave 45 of the context's 64 tokens")),
            Limits::for_context(64)),
    ]
}

fn accepts() -> Vec<Case> {
    use Expect::Accept;
    vec![
        case(
            "defaults: sampling at temperature 1, 256 new tokens",
            params(|_| {}),
            Accept(|v| {
                let p = v.params();
                assert_eq!(
                    v.prompt_token_ids(),
                    golden_ids(&golden_case("chat_en_tea"))
                );
                assert_eq!(
                    v.prompt_text(),
                    "<s>[INST] How do I prepare a cup of tea? [/INST]"
                );
                assert_eq!(
                    (p.temperature, p.top_p, p.top_k, p.min_p),
                    (1.0, 1.0, 0, 0.0)
                );
                assert_eq!(
                    (p.max_new_tokens, p.min_new_tokens, p.n, p.priority),
                    (256, 0, 1, 0)
                );
                assert_eq!(
                    (
                        p.repetition_penalty,
                        p.presence_penalty,
                        p.frequency_penalty
                    ),
                    (1.0, 0.0, 0.0)
                );
                assert_eq!((p.logprobs, p.prompt_logprobs, p.seed), (None, None, None));
                assert!(p.stop.is_empty() && p.stop_token_ids.is_empty() && !p.ignore_eos);
                assert!(!p.is_greedy());
                assert_eq!(v.model(), None);
            }),
        ),
        case(
            "do_sample=false is greedy whatever the temperature",
            params(|p| {
                p.do_sample = Some(false);
                p.temperature = Some(0.7);
            }),
            Accept(|v| assert!(v.params().is_greedy())),
        ),
        case(
            "do_sample=true defaults the temperature to 1",
            params(|p| p.do_sample = Some(true)),
            Accept(|v| assert_eq!(v.params().temperature, 1.0)),
        ),
        case(
            "temperature 0 without do_sample is greedy",
            params(|p| p.temperature = Some(0.0)),
            Accept(|v| assert!(v.params().is_greedy())),
        ),
        case(
            "near-zero temperature is greedy",
            params(|p| p.temperature = Some(1e-6)),
            Accept(|v| assert!(v.params().is_greedy())),
        ),
        case(
            "the model card's sampling parameters",
            params(|p| {
                p.temperature = Some(0.6);
                p.top_p = Some(0.9);
                p.do_sample = Some(true);
                p.max_new_tokens = Some(200);
            }),
            Accept(|v| {
                let p = v.params();
                assert_eq!((p.temperature, p.top_p, p.max_new_tokens), (0.6, 0.9, 200));
            }),
        ),
        case(
            "top_k -1 is off",
            params(|p| p.top_k = Some(-1)),
            Accept(|v| assert_eq!(v.params().top_k, 0)),
        ),
        case(
            "top_k at or above the vocabulary is off",
            params(|p| p.top_k = Some(4000)),
            Accept(|v| assert_eq!(v.params().top_k, 0)),
        ),
        case(
            "top_k 50 is kept",
            params(|p| p.top_k = Some(50)),
            Accept(|v| assert_eq!(v.params().top_k, 50)),
        ),
        case(
            "boundary values are accepted",
            params(|p| {
                p.temperature = Some(100.0);
                p.top_p = Some(1.0);
                p.min_p = Some(1.0);
                p.presence_penalty = Some(-2.0);
                p.frequency_penalty = Some(2.0);
                p.logprobs = Some(0);
                p.prompt_logprobs = Some(20);
                p.n = Some(16);
                p.priority = Some(i64::from(i32::MIN));
                p.max_new_tokens = Some(1);
                p.min_new_tokens = Some(1);
            }),
            Accept(|v| {
                let p = v.params();
                assert_eq!(
                    (p.logprobs, p.prompt_logprobs, p.n),
                    (Some(0), Some(20), 16)
                );
                assert_eq!(
                    (p.priority, p.max_new_tokens, p.min_new_tokens),
                    (i32::MIN, 1, 1)
                );
            }),
        ),
        case(
            "stop parameters are kept",
            params(|p| {
                p.stop = vec!["</s>".into(), "انتهى".into()];
                p.stop_token_ids = vec![2, 3999];
                p.ignore_eos = Some(true);
                p.seed = Some(7);
                p.repetition_penalty = Some(1.3);
            }),
            Accept(|v| {
                let p = v.params();
                assert_eq!(p.stop, ["</s>", "انتهى"]);
                assert_eq!(p.stop_token_ids, [2, 3999]);
                assert!(p.ignore_eos);
                assert_eq!((p.seed, p.repetition_penalty), (Some(7), 1.3));
            }),
        ),
        case(
            "raw text gets bos, like transformers",
            request(
                PromptInput::Text(
                    golden_case("raw_mixed")["prompt"]
                        .as_str()
                        .expect("prompt")
                        .to_owned(),
                ),
                |_| {},
            ),
            Accept(|v| assert_eq!(v.prompt_token_ids(), golden_ids(&golden_case("raw_mixed")))),
        ),
        case(
            "Arabic system prompt renders like transformers",
            request(
                PromptInput::Chat(golden_messages(&golden_case("chat_ar_system"))),
                |_| {},
            ),
            Accept(|v| {
                let golden = golden_case("chat_ar_system");
                assert_eq!(
                    v.prompt_text(),
                    golden["rendered_prompt"].as_str().expect("text")
                );
                assert_eq!(v.prompt_token_ids(), golden_ids(&golden));
            }),
        ),
        case(
            "multi-turn chat renders like transformers",
            request(
                PromptInput::Chat(golden_messages(&golden_case("chat_multiturn"))),
                |_| {},
            ),
            Accept(|v| {
                assert_eq!(
                    v.prompt_token_ids(),
                    golden_ids(&golden_case("chat_multiturn"))
                )
            }),
        ),
        // The ids of "Hello, world!" from the goldens' tokenizer cases, bos first.
        case(
            "token-id prompt is kept as given",
            request(
                PromptInput::TokenIds(vec![1, 435, 566, 3880, 3929, 3340, 3984]),
                |_| {},
            ),
            Accept(|v| {
                assert_eq!(v.prompt_token_ids(), [1, 435, 566, 3880, 3929, 3340, 3984]);
                assert_eq!(v.prompt_text(), "<s> Hello, world!");
            }),
        ),
        with_limits(
            case(
                "default max_new_tokens shrinks to the room left",
                params(|_| {}),
                Accept(|v| assert_eq!(v.params().max_new_tokens, 64 - TEA_TOKENS)),
            ),
            Limits::for_context(64),
        ),
        with_limits(
            case(
                "prompt + max_new_tokens may fill the context exactly",
                params(|p| p.max_new_tokens = Some(45)),
                Accept(|v| assert_eq!(v.params().max_new_tokens, 45)),
            ),
            Limits::for_context(64),
        ),
        case(
            "min_new_tokens raises the default max_new_tokens",
            params(|p| p.min_new_tokens = Some(300)),
            Accept(|v| {
                assert_eq!(
                    (v.params().min_new_tokens, v.params().max_new_tokens),
                    (300, 300)
                )
            }),
        ),
        with_limits(
            case(
                "character limit counts characters, not bytes",
                request(PromptInput::Text("كوب شاي".into()), |_| {}),
                Accept(|v| assert_eq!(v.prompt_token_ids()[0], 1)),
            ),
            Limits {
                max_prompt_chars: 7,
                ..Limits::default()
            },
        ),
    ]
}

#[test]
fn every_rule_rejects_with_its_message() {
    let cases = rejects();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    run(cases, tokenizer());
}

#[test]
fn valid_requests_get_defaults_and_golden_ids() {
    run(accepts(), tokenizer());
}

#[test]
fn model_name_passes_through() {
    let mut raw = params(|_| {});
    raw.model = Some("ALLaM-2-7b-instruct".into());
    let valid = validate(raw, &Limits::default(), tokenizer()).expect("valid");
    assert_eq!(valid.model(), Some("ALLaM-2-7b-instruct"));
}

#[test]
fn chat_without_a_template_is_rejected() {
    let plain = tokenizer_without_template();
    run(
        vec![
            case("chat needs a template", params(|_| {}), Expect::Reject(
                "messages",
                "no_chat_template",
                "`messages` cannot be used: the model has no chat template; send a `prompt` instead",
            )),
            case("text prompts still work", request(PromptInput::Text("Hello".into()), |_| {}),
                Expect::Accept(|v| assert_eq!(v.prompt_token_ids()[0], 1))),
        ],
        &plain,
    );
}

#[test]
fn long_roles_are_cut_in_messages() {
    let role = "r".repeat(1000);
    let err = validate(
        request(PromptInput::Chat(vec![msg(&role, "hi")]), |_| {}),
        &Limits::default(),
        tokenizer(),
    )
    .expect_err("unknown role");
    assert!(err.to_string().len() < 200, "{err}");
    assert!(
        matches!(err, ValidationError::UnknownRole { index: 0, .. }),
        "{err:?}"
    );
}

#[test]
fn checks_parameters_before_the_prompt() {
    // Both are wrong; the cheap parameter check reports first, before any tokenizer work.
    let err = validate(
        request(PromptInput::Chat(vec![]), |p| p.top_p = Some(2.0)),
        &Limits::default(),
        tokenizer(),
    )
    .expect_err("invalid");
    assert_eq!(err.field(), Some("top_p"));
}
