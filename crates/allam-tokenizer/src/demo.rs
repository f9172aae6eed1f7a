//! The demo tokenizer: trained by our own code, at run time, on a small bilingual English/Arabic
//! text shipped in `data/`, so the built-in demo model needs no downloaded files.
//!
//! It has the same shape as ALLaM's (and the fixtures') Llama-2 style tokenizer: `<unk>`, `<s>`,
//! `</s>` at ids 0, 1, 2; the 256 byte tokens `<0x00>`..`<0xFF>` at ids 3..258 (byte fallback
//! covers every character the corpus lacks); BPE pieces after that, `▁` marking a preceding
//! space; Metaspace pre-tokenizer (prepend always, no split), TemplateProcessing `<s> $A`, the
//! decoder chain Replace(▁→space) → ByteFallback → Fuse → Strip(one leading space), and the
//! Llama-2 chat template.
//!
//! Training uses the `tokenizers` crate's `BpeTrainer` on words we pre-split the way
//! SentencePiece does for Llama (a word starts at each space, scripts and punctuation are split
//! apart, every digit stands alone), so no piece spans two words and digits never merge. The
//! trainer's pieces are then renumbered behind the byte tokens.
//!
//! Invariant: output is a pure function of the corpus and `vocab_size`. Files are written from
//! ordered data by our own code (no hash-map iteration, no JSON map whose key order depends on
//! serde_json features), so two runs give byte-identical files.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::{AddedToken, Trainer};

use crate::chat::LLAMA2_CHAT_TEMPLATE;
use crate::{Error, Tokenizer};

/// The vocabulary size of the demo tokenizer the demo model uses.
pub const DEMO_VOCAB_SIZE: usize = 3000;

/// The context length written as `model_max_length`, as ALLaM's.
const DEMO_MODEL_MAX_LENGTH: usize = 4096;

/// The training text. Original sentences about tea, coffee, cooking, travel, weather and
/// greetings, one per line, English then Arabic.
const CORPUS: [&str; 2] = [
    include_str!("../data/demo_corpus_en.txt"),
    include_str!("../data/demo_corpus_ar.txt"),
];

const UNK: &str = "<unk>";
const BOS: &str = "<s>";
const EOS: &str = "</s>";
const SPECIALS: [&str; 3] = [UNK, BOS, EOS];
const METASPACE: char = '▁';
const N_BYTE_TOKENS: usize = 256;
/// SentencePiece's `max_sentencepiece_length` in Llama's tokenizer.
const MAX_PIECE_CHARS: usize = 16;

/// The three files of a trained tokenizer, as written to disk.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DemoTokenizerFiles {
    pub tokenizer_json: String,
    pub tokenizer_config_json: String,
    pub special_tokens_map_json: String,
}

/// Trains the demo tokenizer with a vocabulary of at most `vocab_size` ids (fewer only if the
/// corpus runs out of pairs to merge).
pub fn train_demo_tokenizer(vocab_size: usize) -> Result<Tokenizer, Error> {
    let files = demo_tokenizer_files(vocab_size)?;
    Tokenizer::from_bytes(
        files.tokenizer_json.as_bytes(),
        files.tokenizer_config_json.as_bytes(),
    )
}

/// Trains the demo tokenizer ([`DEMO_VOCAB_SIZE`]) and writes `tokenizer.json`,
/// `tokenizer_config.json` and `special_tokens_map.json` into `out_dir` (created if missing).
/// Returns the tokenizer, loaded back from what was written.
pub fn write_demo_tokenizer(out_dir: &Path) -> Result<Tokenizer, Error> {
    let files = demo_tokenizer_files(DEMO_VOCAB_SIZE)?;
    std::fs::create_dir_all(out_dir).map_err(|source| Error::Write {
        path: out_dir.to_owned(),
        source,
    })?;
    for (name, contents) in [
        ("tokenizer.json", &files.tokenizer_json),
        ("tokenizer_config.json", &files.tokenizer_config_json),
        ("special_tokens_map.json", &files.special_tokens_map_json),
    ] {
        let path = out_dir.join(name);
        std::fs::write(&path, contents).map_err(|source| Error::Write { path, source })?;
    }
    Tokenizer::from_dir(out_dir)
}

/// Trains and returns the file contents without writing anything.
pub fn demo_tokenizer_files(vocab_size: usize) -> Result<DemoTokenizerFiles, Error> {
    let trained = train_pieces(vocab_size)?;
    Ok(DemoTokenizerFiles {
        tokenizer_json: tokenizer_json(&trained.pieces, &trained.merges)?,
        tokenizer_config_json: tokenizer_config_json()?,
        special_tokens_map_json: special_tokens_map_json()?,
    })
}

/// Runs the BPE trainer; returns the learned pieces (alphabet first, then one per merge, in
/// trainer-id order, specials excluded) and the merges by rank.
fn train_pieces(vocab_size: usize) -> Result<TrainedPieces, Error> {
    let lines: Vec<&str> = CORPUS.iter().flat_map(|text| text.lines()).collect();
    let floor = SPECIALS.len() + N_BYTE_TOKENS;
    if vocab_size <= floor {
        return Err(Error::Train {
            message: format!(
                "vocab_size must exceed {floor} (3 special + 256 byte tokens), got {vocab_size}"
            ),
        });
    }
    let mut trainer = BpeTrainer::builder()
        .vocab_size(vocab_size - N_BYTE_TOKENS)
        // Pairs seen once still merge: the corpus is small, and whole-word pieces for rare
        // words are what lets the vocabulary reach a useful size.
        .min_frequency(1)
        .show_progress(false)
        // Every printable ASCII character gets a piece even if the corpus lacks it, so English
        // text never falls back to bytes.
        .initial_alphabet(('!'..='~').collect())
        .max_token_length(Some(MAX_PIECE_CHARS))
        .special_tokens(
            SPECIALS
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .build();
    trainer
        .feed(lines.iter(), |line| Ok(training_words(line)))
        .map_err(|e| Error::Train {
            message: e.to_string(),
        })?;
    let mut model = BPE::default();
    trainer.train(&mut model).map_err(|e| Error::Train {
        message: e.to_string(),
    })?;

    // The trainer's results are only reachable through the model's serde form.
    let value = serde_json::to_value(&model).map_err(|e| Error::Train {
        message: format!("cannot read the trained model: {e}"),
    })?;
    let trained: TrainedBpe = serde_json::from_value(value).map_err(|e| Error::Train {
        message: format!("unexpected trained model layout: {e}"),
    })?;
    let mut by_id: Vec<(u32, String)> = trained
        .vocab
        .into_iter()
        .map(|(token, id)| (id, token))
        .collect();
    by_id.sort();
    let pieces: Vec<String> = by_id
        .into_iter()
        .map(|(_, token)| token)
        .filter(|token| !SPECIALS.contains(&token.as_str()))
        .collect();
    Ok(TrainedPieces {
        pieces,
        merges: trained.merges,
    })
}

struct TrainedPieces {
    pieces: Vec<String>,
    merges: Vec<(String, String)>,
}

#[derive(serde::Deserialize)]
struct TrainedBpe {
    vocab: BTreeMap<String, u32>,
    merges: Vec<(String, String)>,
}

/// Splits one corpus line into training words as Llama's SentencePiece settings would
/// (`split_by_whitespace`, `split_by_unicode_script`, `split_digits`), after the Metaspace
/// step: special-token text splits the line into chunks, each chunk gets a leading `▁` and
/// spaces become `▁`.
fn training_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    for chunk in split_on_specials(line) {
        if chunk.is_empty() {
            continue;
        }
        let mut text = String::with_capacity(chunk.len() + 3);
        if !chunk.starts_with(' ') {
            text.push(METASPACE);
        }
        text.extend(chunk.chars().map(|c| if c == ' ' { METASPACE } else { c }));

        let mut word = String::new();
        let mut word_class: Option<CharClass> = None;
        for c in text.chars() {
            let class = CharClass::of(c);
            let starts_new = match class {
                CharClass::Space | CharClass::Digit => true,
                _ => word_class.is_some_and(|current| current != class),
            };
            if starts_new && !word.is_empty() {
                words.push(std::mem::take(&mut word));
                word_class = None;
            }
            word.push(c);
            if class == CharClass::Digit {
                words.push(std::mem::take(&mut word));
            } else if class != CharClass::Space {
                word_class = Some(class);
            }
        }
        if !word.is_empty() {
            words.push(word);
        }
    }
    words
}

/// The text between occurrences of the special tokens.
fn split_on_specials(line: &str) -> Vec<&str> {
    let mut chunks = Vec::new();
    let mut rest = line;
    loop {
        let next = SPECIALS
            .iter()
            .filter_map(|special| rest.find(special).map(|at| (at, *special)))
            .min();
        match next {
            Some((at, special)) => {
                let (before, after) = rest.split_at(at);
                chunks.push(before);
                rest = after.strip_prefix(special).unwrap_or(after);
            }
            None => {
                chunks.push(rest);
                return chunks;
            }
        }
    }
}

/// The coarse script classes SentencePiece splits between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CharClass {
    Space,
    Digit,
    Arabic,
    /// Latin and any other letters.
    Letter,
    Punctuation,
}

impl CharClass {
    fn of(c: char) -> CharClass {
        match c {
            METASPACE => CharClass::Space,
            _ if c.is_numeric() => CharClass::Digit,
            // Arabic comma, semicolon and question mark sit in the Arabic block.
            '\u{060C}' | '\u{061B}' | '\u{061F}' => CharClass::Punctuation,
            '\u{0600}'..='\u{06FF}'
            | '\u{0750}'..='\u{077F}'
            | '\u{08A0}'..='\u{08FF}'
            | '\u{FB50}'..='\u{FDFF}'
            | '\u{FE70}'..='\u{FEFF}' => CharClass::Arabic,
            _ if c.is_alphabetic() => CharClass::Letter,
            _ => CharClass::Punctuation,
        }
    }
}

/// `tokenizer.json` in the layout of the fixtures' file (transformers' Llama-2 conversion),
/// merges as `"a b"` strings, which every `tokenizers` version reads.
fn tokenizer_json(pieces: &[String], merges: &[(String, String)]) -> Result<String, Error> {
    let q = |s: &str| serde_json::to_string(s).expect("serializing a str to JSON cannot fail");
    let mut out = String::new();
    out.push_str("{\n  \"version\": \"1.0\",\n  \"truncation\": null,\n  \"padding\": null,\n");
    out.push_str("  \"added_tokens\": [\n");
    for (id, special) in SPECIALS.iter().enumerate() {
        let sep = if id + 1 < SPECIALS.len() { "," } else { "" };
        let _ = writeln!(
            out,
            "    {{\n      \"id\": {id},\n      \"content\": {},\n      \"single_word\": false,\n      \"lstrip\": false,\n      \"rstrip\": false,\n      \"normalized\": false,\n      \"special\": true\n    }}{sep}",
            q(special)
        );
    }
    out.push_str("  ],\n  \"normalizer\": null,\n");
    out.push_str(
        "  \"pre_tokenizer\": {\n    \"type\": \"Metaspace\",\n    \"replacement\": \"▁\",\n    \"prepend_scheme\": \"always\",\n    \"split\": false\n  },\n",
    );
    out.push_str(concat!(
        "  \"post_processor\": {\n    \"type\": \"TemplateProcessing\",\n",
        "    \"single\": [\n      {\"SpecialToken\": {\"id\": \"<s>\", \"type_id\": 0}},\n      {\"Sequence\": {\"id\": \"A\", \"type_id\": 0}}\n    ],\n",
        "    \"pair\": [\n      {\"SpecialToken\": {\"id\": \"<s>\", \"type_id\": 0}},\n      {\"Sequence\": {\"id\": \"A\", \"type_id\": 0}},\n",
        "      {\"SpecialToken\": {\"id\": \"<s>\", \"type_id\": 1}},\n      {\"Sequence\": {\"id\": \"B\", \"type_id\": 1}}\n    ],\n",
        "    \"special_tokens\": {\n      \"<s>\": {\"id\": \"<s>\", \"ids\": [1], \"tokens\": [\"<s>\"]}\n    }\n  },\n",
    ));
    out.push_str(concat!(
        "  \"decoder\": {\n    \"type\": \"Sequence\",\n    \"decoders\": [\n",
        "      {\"type\": \"Replace\", \"pattern\": {\"String\": \"▁\"}, \"content\": \" \"},\n",
        "      {\"type\": \"ByteFallback\"},\n      {\"type\": \"Fuse\"},\n",
        "      {\"type\": \"Strip\", \"content\": \" \", \"start\": 1, \"stop\": 0}\n    ]\n  },\n",
    ));
    out.push_str(concat!(
        "  \"model\": {\n    \"type\": \"BPE\",\n    \"dropout\": null,\n    \"unk_token\": null,\n",
        "    \"continuing_subword_prefix\": null,\n    \"end_of_word_suffix\": null,\n",
        "    \"fuse_unk\": true,\n    \"byte_fallback\": true,\n    \"ignore_merges\": false,\n",
        "    \"vocab\": {\n",
    ));
    let byte_tokens = (0..=u8::MAX).map(|b| format!("<0x{b:02X}>"));
    let vocab: Vec<String> = SPECIALS
        .iter()
        .map(|s| (*s).to_owned())
        .chain(byte_tokens)
        .chain(pieces.iter().cloned())
        .collect();
    for (id, token) in vocab.iter().enumerate() {
        let sep = if id + 1 < vocab.len() { "," } else { "" };
        let _ = writeln!(out, "      {}: {id}{sep}", q(token));
    }
    out.push_str("    },\n    \"merges\": [\n");
    for (rank, (left, right)) in merges.iter().enumerate() {
        if left.contains(' ') || right.contains(' ') {
            return Err(Error::Train {
                message: format!("merge {left:?} + {right:?} contains a space"),
            });
        }
        let sep = if rank + 1 < merges.len() { "," } else { "" };
        let _ = writeln!(out, "      {}{sep}", q(&format!("{left} {right}")));
    }
    out.push_str("    ]\n  }\n}\n");
    Ok(out)
}

#[derive(Serialize)]
struct AddedTokenConfig {
    content: &'static str,
    lstrip: bool,
    normalized: bool,
    rstrip: bool,
    single_word: bool,
    special: bool,
}

/// `tokenizer_config.json` with the fixtures' keys, in their (sorted) order.
#[derive(Serialize)]
struct TokenizerConfigJson {
    add_bos_token: bool,
    add_eos_token: bool,
    added_tokens_decoder: BTreeMap<String, AddedTokenConfig>,
    bos_token: &'static str,
    chat_template: &'static str,
    clean_up_tokenization_spaces: bool,
    eos_token: &'static str,
    legacy: bool,
    model_max_length: usize,
    pad_token: Option<&'static str>,
    sp_model_kwargs: BTreeMap<String, String>,
    spaces_between_special_tokens: bool,
    tokenizer_class: &'static str,
    unk_token: &'static str,
    use_default_system_prompt: bool,
}

fn tokenizer_config_json() -> Result<String, Error> {
    let added_tokens_decoder = SPECIALS
        .iter()
        .enumerate()
        .map(|(id, content)| {
            (
                id.to_string(),
                AddedTokenConfig {
                    content,
                    lstrip: false,
                    normalized: false,
                    rstrip: false,
                    single_word: false,
                    special: true,
                },
            )
        })
        .collect();
    let config = TokenizerConfigJson {
        add_bos_token: true,
        add_eos_token: false,
        added_tokens_decoder,
        bos_token: BOS,
        chat_template: LLAMA2_CHAT_TEMPLATE,
        clean_up_tokenization_spaces: false,
        eos_token: EOS,
        legacy: true,
        model_max_length: DEMO_MODEL_MAX_LENGTH,
        pad_token: None,
        sp_model_kwargs: BTreeMap::new(),
        spaces_between_special_tokens: false,
        tokenizer_class: "LlamaTokenizerFast",
        unk_token: UNK,
        use_default_system_prompt: false,
    };
    to_pretty_json(&config)
}

#[derive(Serialize)]
struct SpecialTokenJson {
    content: &'static str,
    lstrip: bool,
    normalized: bool,
    rstrip: bool,
    single_word: bool,
}

#[derive(Serialize)]
struct SpecialTokensMapJson {
    bos_token: SpecialTokenJson,
    eos_token: SpecialTokenJson,
    unk_token: SpecialTokenJson,
}

fn special_tokens_map_json() -> Result<String, Error> {
    let token = |content| SpecialTokenJson {
        content,
        lstrip: false,
        normalized: false,
        rstrip: false,
        single_word: false,
    };
    to_pretty_json(&SpecialTokensMapJson {
        bos_token: token(BOS),
        eos_token: token(EOS),
        unk_token: token(UNK),
    })
}

fn to_pretty_json<T: Serialize>(value: &T) -> Result<String, Error> {
    let mut json = serde_json::to_string_pretty(value).map_err(|e| Error::Train {
        message: format!("cannot write JSON: {e}"),
    })?;
    json.push('\n');
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_words_split_like_sentencepiece() {
        assert_eq!(
            training_words("Tea, 2024 كوب شاهي؟ </s>ok"),
            vec![
                "▁Tea",
                ",",
                "▁",
                "2",
                "0",
                "2",
                "4",
                "▁كوب",
                "▁شاهي",
                "؟",
                "▁",
                "▁ok"
            ]
        );
        assert_eq!(training_words("a  b"), vec!["▁a", "▁", "▁b"]);
        assert_eq!(training_words("<s>"), Vec::<String>::new());
    }

    #[test]
    fn training_is_deterministic() {
        let first = demo_tokenizer_files(DEMO_VOCAB_SIZE).expect("trains");
        let second = demo_tokenizer_files(DEMO_VOCAB_SIZE).expect("trains");
        assert_eq!(first, second);
    }

    /// Set in the child processes of the test below.
    const CHILD_ENV: &str = "ALLAM_DEMO_TOKENIZER_DIGEST_CHILD";

    /// The trainer keeps its state in hash maps seeded per process, so equality within one
    /// process proves little: the router and the worker each train the demo tokenizer in their
    /// own process, and they must agree. The test reruns itself twice as a child process and
    /// compares digests.
    #[test]
    fn training_is_deterministic_across_processes() {
        use std::hash::{Hash, Hasher};
        let digest = || {
            let files = demo_tokenizer_files(DEMO_VOCAB_SIZE).expect("trains");
            // SipHash with fixed keys: the same in every process of this binary.
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            files.hash(&mut hasher);
            format!("digest={:016x}", hasher.finish())
        };
        if std::env::var_os(CHILD_ENV).is_some() {
            println!("{}", digest());
            return;
        }
        let exe = std::env::current_exe().expect("test binary path");
        let ours = digest();
        for _ in 0..2 {
            let output = std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "demo::tests::training_is_deterministic_across_processes",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, "1")
                .output()
                .expect("child test process runs");
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(output.status.success(), "child failed: {stdout}");
            assert!(stdout.contains(&ours), "child printed no {ours}: {stdout}");
        }
    }

    #[test]
    fn demo_tokenizer_has_the_llama2_layout() {
        let tok = train_demo_tokenizer(DEMO_VOCAB_SIZE).expect("trains");
        assert_eq!(tok.vocab_size(), DEMO_VOCAB_SIZE);
        for (id, special) in SPECIALS.iter().enumerate() {
            assert_eq!(tok.token_to_id(special), Some(id as u32));
            assert!(tok.is_special(id as u32));
        }
        for byte in 0..=u8::MAX {
            let id = u32::from(byte) + 3;
            assert_eq!(tok.id_to_token(id), Some(format!("<0x{byte:02X}>")));
            assert!(!tok.is_special(id));
        }
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.eos_token_id(), 2);
        assert_eq!(tok.model_max_length(), Some(DEMO_MODEL_MAX_LENGTH));
        assert!(tok.add_bos_token());
        // Every printable ASCII character has a piece of its own.
        for c in '!'..='~' {
            assert!(tok.token_to_id(&c.to_string()).is_some(), "{c:?}");
        }
    }

    #[test]
    fn demo_tokenizer_round_trips_english_and_arabic() {
        let tok = train_demo_tokenizer(DEMO_VOCAB_SIZE).expect("trains");
        for text in [
            "How do I prepare a cup of tea?",
            "كيف أجهز كوب شاهي؟",
            "Tea ☕ and قهوة عربية at 10:30, 6 cups; 漢字 🇸🇦",
            "line one\nline two\r\n\tتمر  و  حليب",
            "الشَّايُ مَشْرُوبٌ لَذِيذٌ",
        ] {
            let ids = tok.encode(text, true).expect("encodes");
            assert_eq!(ids[0], 1, "bos first");
            assert!(
                !ids[1..].contains(&0),
                "byte fallback leaves no <unk> in {text:?}"
            );
            assert_eq!(tok.decode(&ids, true).expect("decodes"), text);
        }
        // The corpus' own sentences compress well.
        let ids = tok
            .encode("How do I prepare a cup of tea?", false)
            .expect("encodes");
        assert!(ids.len() <= 10, "{ids:?}");
        let ids = tok.encode("كيف أجهز كوب شاهي؟", false).expect("encodes");
        assert!(ids.len() <= 6, "{ids:?}");
    }

    #[test]
    fn demo_chat_template_renders_the_model_card_question() {
        let tok = train_demo_tokenizer(DEMO_VOCAB_SIZE).expect("trains");
        let prompt = tok
            .apply_chat_template(
                &[crate::Message::user("How do I prepare a cup of tea?")],
                true,
            )
            .expect("renders");
        assert_eq!(prompt, "<s>[INST] How do I prepare a cup of tea? [/INST]");
        let ids = tok.encode(&prompt, false).expect("encodes");
        assert_eq!(ids[0], 1);
        assert_eq!(
            tok.decode(&ids, true).expect("decodes"),
            "[INST] How do I prepare a cup of tea? [/INST]"
        );
    }

    #[test]
    fn write_demo_tokenizer_writes_loadable_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("demo");
        let written = write_demo_tokenizer(&out).expect("writes");
        let files = demo_tokenizer_files(DEMO_VOCAB_SIZE).expect("trains");
        for (name, contents) in [
            ("tokenizer.json", &files.tokenizer_json),
            ("tokenizer_config.json", &files.tokenizer_config_json),
            ("special_tokens_map.json", &files.special_tokens_map_json),
        ] {
            let on_disk = std::fs::read_to_string(out.join(name)).expect("file written");
            assert_eq!(&on_disk, contents, "{name}");
            let _: serde_json::Value = serde_json::from_str(&on_disk).expect("valid JSON");
        }
        assert_eq!(written.vocab_size(), DEMO_VOCAB_SIZE);
    }

    #[test]
    fn too_small_vocab_is_an_error() {
        let err = train_demo_tokenizer(259).expect_err("no room for pieces");
        assert!(err.to_string().contains("vocab_size"), "{err}");
    }
}
