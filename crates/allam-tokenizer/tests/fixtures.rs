//! The tokenizer against the fixtures' transformers goldens (`tiny-allam/goldens.json`):
//! encode/decode of the 20 tokenizer cases, the 3 streaming cases piece by piece, and every
//! golden case's rendered prompt and input ids.

use std::path::PathBuf;

use allam_tokenizer::{Error, Message, Role, Tokenizer};
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

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&fixtures_dir().join("tiny-allam")).expect("fixture tokenizer loads")
}

fn goldens() -> Value {
    let path = fixtures_dir().join("tiny-allam/goldens.json");
    let bytes = std::fs::read(&path).expect("goldens.json readable");
    serde_json::from_slice(&bytes).expect("goldens.json is JSON")
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("id list")
        .iter()
        .map(|v| u32::try_from(v.as_u64().expect("id")).expect("id fits u32"))
        .collect()
}

fn text(value: &Value) -> &str {
    value.as_str().expect("string")
}

#[test]
fn loads_fixture_settings() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 4000);
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_id(), 2);
    assert_eq!(tok.unk_token_id(), Some(0));
    assert_eq!(tok.model_max_length(), Some(4096));
    assert!(tok.add_bos_token());
    assert!(tok.has_chat_template());
    assert!(tok.is_special(0) && tok.is_special(1) && tok.is_special(2));
    assert!(!tok.is_special(3) && !tok.is_special(3999));
    assert_eq!(tok.id_to_token(3 + 0x0A).as_deref(), Some("<0x0A>"));
}

#[test]
fn all_tokenizer_cases_match_transformers() {
    let tok = tokenizer();
    let goldens = goldens();
    let section = &goldens["tokenizer"];
    assert_eq!(section["encode_add_special_tokens"], Value::Bool(false));
    assert_eq!(section["decode_skip_special_tokens"], Value::Bool(false));
    let cases = section["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 20);
    for case in cases {
        let input = text(&case["text"]);
        let expected = ids(&case["ids"]);
        assert_eq!(
            tok.encode(input, false).expect("encodes"),
            expected,
            "ids of {input:?}"
        );
        assert_eq!(
            tok.encode(input, true).expect("encodes"),
            ids(&case["ids_with_bos"]),
            "ids_with_bos of {input:?}"
        );
        let decoded = tok.decode(&expected, false).expect("decodes");
        assert_eq!(decoded, text(&case["decoded"]), "decode of {input:?}");
        assert_eq!(
            decoded == input,
            case["roundtrip"].as_bool().expect("bool"),
            "roundtrip flag of {input:?}"
        );
        let pieces: Vec<String> = expected
            .iter()
            .map(|&id| tok.id_to_token(id).expect("id in vocab"))
            .collect();
        let golden_pieces: Vec<&str> = case["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .map(text)
            .collect();
        assert_eq!(pieces, golden_pieces, "tokens of {input:?}");
    }
}

#[test]
fn incremental_cases_match_piece_by_piece() {
    let tok = tokenizer();
    let goldens = goldens();
    let cases = goldens["tokenizer"]["incremental"]
        .as_array()
        .expect("incremental cases");
    assert_eq!(cases.len(), 3);
    for case in cases {
        let input = text(&case["text"]);
        let golden_pieces: Vec<&str> = case["pieces"]
            .as_array()
            .expect("pieces")
            .iter()
            .map(text)
            .collect();
        let mut decoder = tok.incremental_decoder();
        let pieces: Vec<String> = ids(&case["ids"])
            .into_iter()
            .map(|id| decoder.push(id).expect("pushes"))
            .collect();
        assert_eq!(pieces, golden_pieces, "pieces of {input:?}");
        assert_eq!(decoder.flush().expect("flushes"), "");
        let prefix_decodes = case["prefix_decodes"].as_array().expect("prefix_decodes");
        assert_eq!(
            pieces.concat(),
            text(prefix_decodes.last().expect("non-empty")),
            "concatenation of {input:?}"
        );
    }
}

fn messages(value: &Value) -> Vec<Message> {
    value
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            let role: Role = text(&m["role"]).parse().expect("known role");
            Message::new(role, text(&m["content"]))
        })
        .collect()
}

#[test]
fn golden_prompts_render_and_encode_identically() {
    let tok = tokenizer();
    let goldens = goldens();
    let cases = goldens["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 7);
    for case in cases {
        let id = text(&case["id"]);
        let rendered = text(&case["rendered_prompt"]);
        let add_special_tokens = case["add_special_tokens"].as_bool().expect("bool");
        match text(&case["kind"]) {
            "chat" => {
                let ours = tok
                    .apply_chat_template(&messages(&case["messages"]), true)
                    .expect("renders");
                assert_eq!(ours, rendered, "rendered prompt of {id}");
                assert!(
                    !add_special_tokens,
                    "{id}: chat prompts carry their own bos"
                );
            }
            "raw" => {
                assert_eq!(text(&case["prompt"]), rendered, "{id}");
                assert!(
                    add_special_tokens,
                    "{id}: raw prompts get bos from the tokenizer"
                );
            }
            other => panic!("unknown case kind {other}"),
        }
        let input_ids = tok.encode(rendered, add_special_tokens).expect("encodes");
        assert_eq!(input_ids, ids(&case["input_ids"]), "input ids of {id}");
        assert_eq!(
            input_ids.len() as u64,
            case["num_prompt_tokens"].as_u64().expect("count"),
            "{id}"
        );
    }
}

#[test]
fn golden_greedy_texts_decode_and_stream_identically() {
    let tok = tokenizer();
    let goldens = goldens();
    for case in goldens["cases"].as_array().expect("cases") {
        let greedy_ids = ids(&case["greedy"]["ids"]);
        let expected = text(&case["greedy"]["text"]);
        assert_eq!(tok.decode(&greedy_ids, true).expect("decodes"), expected);
        let mut decoder = tok.incremental_decoder();
        let mut streamed = String::new();
        for &id in &greedy_ids {
            streamed.push_str(&decoder.push(id).expect("pushes"));
        }
        streamed.push_str(&decoder.flush().expect("flushes"));
        assert_eq!(streamed, expected, "streamed text of {}", text(&case["id"]));
    }
}

#[test]
fn non_alternating_roles_raise_the_templates_message() {
    let tok = tokenizer();
    let err = tok
        .apply_chat_template(
            &[
                Message::user("hi"),
                Message::assistant("hello"),
                Message::assistant("again"),
            ],
            true,
        )
        .expect_err("two assistant turns in a row");
    match &err {
        Error::Template { message } => assert_eq!(
            message,
            "Conversation roles must alternate user/assistant/user/assistant/..."
        ),
        other => panic!("unexpected error {other:?}"),
    }
    let err = tok
        .apply_chat_template(&[Message::system("s"), Message::assistant("a")], true)
        .expect_err("assistant first after system");
    assert_eq!(err.reason(), "chat_template");
}

#[test]
fn unknown_roles_are_rejected_by_name() {
    let err = "tool".parse::<Role>().expect_err("tool is not a role here");
    assert!(err.to_string().contains("`tool`"), "{err}");
}

#[test]
fn arabic_system_prompt_keeps_its_whitespace_rules() {
    // README §1.5: the system message is folded into the first user turn and `.strip()` applies
    // to the combined string, so the system prompt's leading space survives and the user's
    // trailing whitespace does not.
    let tok = tokenizer();
    let rendered = tok
        .apply_chat_template(
            &[
                Message::system(" أنت مساعد مفيد."),
                Message::user("كيف أجهز كوب شاهي؟ \n"),
            ],
            true,
        )
        .expect("renders");
    assert_eq!(
        rendered,
        "<s>[INST] <<SYS>>\n أنت مساعد مفيد.\n<</SYS>>\n\nكيف أجهز كوب شاهي؟ [/INST]"
    );
    let ids = tok.encode(&rendered, false).expect("encodes");
    assert_eq!(ids[0], 1, "bos comes from the template text");
    assert_eq!(
        ids.iter().filter(|&&id| id == 1).count(),
        1,
        "exactly one bos"
    );
}

#[test]
fn demo_tokenizer_uses_the_fixture_pipeline() {
    let files = allam_tokenizer::demo_tokenizer_files(allam_tokenizer::DEMO_VOCAB_SIZE)
        .expect("demo tokenizer trains");
    let demo: Value = serde_json::from_str(&files.tokenizer_json).expect("demo tokenizer.json");
    let read = |name: &str| -> Value {
        let bytes = std::fs::read(fixtures_dir().join(name)).expect("fixture file");
        serde_json::from_slice(&bytes).expect("fixture JSON")
    };
    let fixture = read("tokenizer.json");
    for key in [
        "version",
        "added_tokens",
        "normalizer",
        "pre_tokenizer",
        "post_processor",
        "decoder",
    ] {
        assert_eq!(demo[key], fixture[key], "tokenizer.json `{key}`");
    }
    for key in [
        "type",
        "dropout",
        "unk_token",
        "fuse_unk",
        "byte_fallback",
        "ignore_merges",
    ] {
        assert_eq!(
            demo["model"][key], fixture["model"][key],
            "tokenizer.json model `{key}`"
        );
    }
    let demo_config: Value =
        serde_json::from_str(&files.tokenizer_config_json).expect("demo tokenizer_config.json");
    assert_eq!(demo_config, read("tokenizer_config.json"));
    assert_eq!(
        demo_config["chat_template"].as_str(),
        Some(allam_tokenizer::LLAMA2_CHAT_TEMPLATE)
    );
    let demo_map: Value =
        serde_json::from_str(&files.special_tokens_map_json).expect("demo special_tokens_map");
    assert_eq!(demo_map, read("special_tokens_map.json"));
}
