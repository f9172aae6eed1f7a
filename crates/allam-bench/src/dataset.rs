//! Turns a [`Workload`] into the list of requests a run sends: random prompts of a set
//! length, the built-in bilingual chat set, or a JSONL file.
//!
//! Random prompts are built without a tokenizer: words drawn uniformly from a fixed list of
//! common Arabic and English words, joined by spaces. `words_for(input_len, tokens_per_word)`
//! picks the word count; the runner measures `tokens_per_word` once against the server's own
//! tokenizer (gRPC `Tokenize` or vLLM-style `POST /tokenize`) and falls back to 1.0 when the
//! target has no tokenize endpoint. Space-separated words tokenize almost independently under
//! a SentencePiece-BPE vocabulary, so the prompt length lands within a few tokens of
//! `input_len`; the report shows the server-counted mean so nobody has to trust the estimate.
//! Every prompt is drawn independently, so random prompts share no prefix beyond chance and
//! the prefix cache does not flatter the numbers.
//!
//! Invariant: the same workload and seed always yield the same requests in the same order.

use std::path::{Path, PathBuf};

use rand::seq::{IndexedRandom, SliceRandom};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use crate::{bilingual, Error, Workload};

/// One chat turn as the wire formats carry it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct ChatTurn {
    pub role: String,
    pub content: String,
}

/// What a request asks the model to continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Input {
    /// A raw prompt: gRPC `GenerateStream`, HTTP `/v1/completions`.
    Prompt(String),
    /// Chat messages: gRPC `ChatStream`, HTTP `/v1/chat/completions`.
    Chat(Vec<ChatTurn>),
}

/// One request of the run, before it is put on a wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestSpec {
    pub input: Input,
    /// `None` leaves the limit to the server's default.
    pub max_tokens: Option<u32>,
    pub ignore_eos: bool,
}

/// Common words, about half Arabic and half English, each usually one or two tokens.
const WORDS: &[&str] = &[
    "the",
    "time",
    "people",
    "year",
    "world",
    "life",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "city",
    "market",
    "school",
    "light",
    "green",
    "small",
    "good",
    "new",
    "old",
    "great",
    "high",
    "long",
    "little",
    "open",
    "في",
    "من",
    "على",
    "إلى",
    "عن",
    "مع",
    "هذا",
    "هذه",
    "كان",
    "كانت",
    "التي",
    "الذي",
    "بين",
    "بعد",
    "قبل",
    "كل",
    "يوم",
    "سنة",
    "عام",
    "وقت",
    "الناس",
    "العالم",
    "الحياة",
    "البيت",
    "المدينة",
    "الماء",
    "الكتاب",
    "المدرسة",
    "العمل",
    "الطريق",
    "الشمس",
    "القمر",
    "البحر",
    "السماء",
    "الأرض",
    "الليل",
    "النهار",
    "الصباح",
    "المساء",
    "كبير",
    "صغير",
    "جديد",
    "قديم",
    "جميل",
    "سريع",
    "طويل",
    "قصير",
    "أول",
    "آخر",
    "كتب",
    "قرأ",
    "ذهب",
    "جاء",
    "قال",
    "رأى",
    "عرف",
    "أراد",
    "علم",
    "لغة",
    "عربية",
    "سوق",
];

/// How many words a random prompt needs to tokenize to about `input_len` tokens.
pub(crate) fn words_for(input_len: usize, tokens_per_word: f64) -> usize {
    let ratio = if tokens_per_word.is_finite() && tokens_per_word > 0.0 {
        tokens_per_word
    } else {
        1.0
    };
    ((input_len as f64 / ratio).round() as usize).max(1)
}

/// A prompt of `n_words` random words from the bilingual list.
pub(crate) fn random_text(rng: &mut ChaCha8Rng, n_words: usize) -> String {
    let mut text = String::new();
    for idx in 0..n_words {
        if idx > 0 {
            text.push(' ');
        }
        text.push_str(
            WORDS
                .choose(rng)
                .expect("the word list is a non-empty constant"),
        );
    }
    text
}

/// Sample text to measure a target's tokens per word, drawn from a stream apart from the
/// prompts' so that calibrating does not change which prompts a seed yields.
pub(crate) fn calibration_text(seed: u64, n_words: usize) -> String {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9E37_79B9_7F4A_7C15);
    random_text(&mut rng, n_words)
}

/// The requests of a run. `tokens_per_word` matters only for [`Workload::Random`].
pub(crate) fn build_requests(
    workload: &Workload,
    num_requests: usize,
    ignore_eos: bool,
    tokens_per_word: f64,
) -> Result<Vec<RequestSpec>, Error> {
    match workload {
        Workload::Random {
            input_len,
            output_len,
            seed,
        } => {
            let mut rng = ChaCha8Rng::seed_from_u64(*seed);
            let n_words = words_for(*input_len, tokens_per_word);
            Ok((0..num_requests)
                .map(|_| RequestSpec {
                    input: Input::Prompt(random_text(&mut rng, n_words)),
                    max_tokens: Some(clamp_u32(*output_len)),
                    // Fixed-length outputs are the point of a random workload.
                    ignore_eos: true,
                })
                .collect())
        }
        Workload::Bilingual { output_len, seed } => {
            let mut rng = ChaCha8Rng::seed_from_u64(*seed);
            let mut order: Vec<usize> = Vec::new();
            Ok((0..num_requests)
                .map(|_| {
                    // A fresh permutation per pass: every prompt is used equally often, in
                    // an order that differs between passes.
                    if order.is_empty() {
                        order = (0..bilingual::len()).collect();
                        order.shuffle(&mut rng);
                    }
                    let idx = order.pop().expect("refilled just above");
                    RequestSpec {
                        input: Input::Chat(bilingual::conversation(idx)),
                        max_tokens: Some(clamp_u32(*output_len)),
                        ignore_eos,
                    }
                })
                .collect())
        }
        Workload::Jsonl { path } => {
            let entries = read_jsonl(path)?;
            Ok(entries
                .iter()
                .cycle()
                .take(num_requests)
                .map(|(input, max_tokens)| RequestSpec {
                    input: input.clone(),
                    max_tokens: *max_tokens,
                    ignore_eos,
                })
                .collect())
        }
    }
}

fn clamp_u32(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonlEntry {
    prompt: Option<String>,
    messages: Option<Vec<ChatTurn>>,
    max_tokens: Option<u32>,
}

/// Entries of a JSONL dataset in file order; blank lines are skipped.
fn read_jsonl(path: &Path) -> Result<Vec<(Input, Option<u32>)>, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::DatasetRead {
        path: path.to_owned(),
        source,
    })?;
    let line_error = |line: usize, reason: String| Error::DatasetLine {
        path: PathBuf::from(path),
        line,
        reason,
    };
    let mut entries = Vec::new();
    for (idx, line) in text.lines().enumerate() {
        let line_no = idx + 1;
        if line.trim().is_empty() {
            continue;
        }
        let entry: JsonlEntry =
            serde_json::from_str(line).map_err(|err| line_error(line_no, err.to_string()))?;
        if entry.max_tokens == Some(0) {
            return Err(line_error(
                line_no,
                "`max_tokens` must be at least 1".into(),
            ));
        }
        let input = match (entry.prompt, entry.messages) {
            (Some(prompt), None) => Input::Prompt(prompt),
            (None, Some(messages)) if !messages.is_empty() => Input::Chat(messages),
            (None, Some(_)) => {
                return Err(line_error(line_no, "`messages` is empty".into()));
            }
            (Some(_), Some(_)) => {
                return Err(line_error(
                    line_no,
                    "give either `prompt` or `messages`, not both".into(),
                ));
            }
            (None, None) => {
                return Err(line_error(
                    line_no,
                    "expected a `prompt` string or a `messages` array".into(),
                ));
            }
        };
        entries.push((input, entry.max_tokens));
    }
    if entries.is_empty() {
        return Err(Error::DatasetEmpty {
            path: path.to_owned(),
        });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn random(input_len: usize, seed: u64, tokens_per_word: f64) -> Vec<RequestSpec> {
        let workload = Workload::Random {
            input_len,
            output_len: 16,
            seed,
        };
        build_requests(&workload, 5, false, tokens_per_word).expect("random workloads build")
    }

    fn prompt(spec: &RequestSpec) -> &str {
        match &spec.input {
            Input::Prompt(text) => text,
            Input::Chat(_) => panic!("random workloads are raw prompts"),
        }
    }

    #[test]
    fn random_prompts_have_the_calibrated_word_count() {
        let specs = random(100, 1, 1.0);
        for spec in &specs {
            assert_eq!(prompt(spec).split(' ').count(), 100);
            assert_eq!(spec.max_tokens, Some(16));
            assert!(spec.ignore_eos, "random outputs must have exact lengths");
        }
        // A tokenizer that spends two tokens per word needs half the words.
        assert_eq!(prompt(&random(100, 1, 2.0)[0]).split(' ').count(), 50);
        assert_eq!(words_for(10, f64::NAN), 10);
        assert_eq!(words_for(0, 1.0), 1);
        // Prompts differ from each other (no shared prefix to cache) and repeat under a seed.
        assert_ne!(specs[0], specs[1]);
        assert_eq!(specs, random(100, 1, 1.0));
        assert_ne!(specs, random(100, 2, 1.0));
        let all_text: String = specs.iter().map(prompt).collect();
        assert!(all_text
            .chars()
            .any(|c| ('\u{0600}'..='\u{06FF}').contains(&c)));
        assert!(all_text.chars().any(|c| c.is_ascii_alphabetic()));
    }

    #[test]
    fn bilingual_uses_every_prompt_once_per_pass() {
        let n_prompts = bilingual::len();
        let workload = Workload::Bilingual {
            output_len: 32,
            seed: 9,
        };
        let specs = build_requests(&workload, 2 * n_prompts, true, 1.0).expect("builds");
        for pass in specs.chunks(n_prompts) {
            let mut seen: Vec<&Input> = pass.iter().map(|spec| &spec.input).collect();
            seen.sort_by_key(|input| format!("{input:?}"));
            seen.dedup();
            assert_eq!(seen.len(), n_prompts, "a pass repeats a prompt");
        }
        assert!(specs
            .iter()
            .all(|s| s.ignore_eos && s.max_tokens == Some(32)));
        assert_ne!(
            specs[..n_prompts],
            specs[n_prompts..],
            "passes should be reshuffled"
        );
    }

    fn jsonl(contents: &str) -> (tempfile::NamedTempFile, Workload) {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(contents.as_bytes())
            .expect("write temp file");
        let workload = Workload::Jsonl {
            path: file.path().to_owned(),
        };
        (file, workload)
    }

    #[test]
    fn jsonl_entries_cycle_in_file_order() {
        let (_file, workload) = jsonl(concat!(
            "{\"prompt\": \"مرحبا\", \"max_tokens\": 8}\n",
            "\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
        ));
        let specs = build_requests(&workload, 3, false, 1.0).expect("valid file");
        assert_eq!(specs[0].input, Input::Prompt("مرحبا".into()));
        assert_eq!(specs[0].max_tokens, Some(8));
        assert_eq!(
            specs[1].input,
            Input::Chat(vec![ChatTurn {
                role: "user".into(),
                content: "hi".into()
            }])
        );
        assert_eq!(specs[1].max_tokens, None);
        assert_eq!(specs[2], specs[0]);
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let cases = [
            ("{\"prompt\": \"a\"}\n{\"prompt\": 3}\n", "line 2"),
            ("{\"prompt\": \"a\", \"messages\": []}\n", "not both"),
            ("{\"messages\": []}\n", "`messages` is empty"),
            ("{}\n", "expected a `prompt`"),
            ("{\"prompt\": \"a\", \"max_tokens\": 0}\n", "`max_tokens`"),
            ("{\"prompt\": \"a\", \"max_tokens\": -1}\n", "line 1"),
            ("{\"prompt\": \"a\", \"temperature\": 1}\n", "unknown field"),
            ("not json\n", "line 1"),
            ("\n  \n", "holds no prompts"),
        ];
        for (contents, expected) in cases {
            let (_file, workload) = jsonl(contents);
            let err = build_requests(&workload, 1, false, 1.0).expect_err(contents);
            assert!(err.to_string().contains(expected), "{contents:?}: {err}");
        }
        let missing = Workload::Jsonl {
            path: PathBuf::from("/nonexistent/allam-bench.jsonl"),
        };
        let err = build_requests(&missing, 1, false, 1.0).expect_err("missing file");
        assert!(
            err.to_string().contains("/nonexistent/allam-bench.jsonl"),
            "{err}"
        );
    }
}
