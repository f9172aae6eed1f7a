//! `Tokenizer`: a loaded `tokenizer.json` plus the transformers settings of
//! `tokenizer_config.json`, behind an `Arc` so clones are cheap and every thread can share one.
//!
//! Encoding and decoding are exactly the `tokenizers` library's (the fixtures' goldens were
//! checked against it); this type adds the checks a server needs: ids outside the vocabulary are
//! errors instead of being silently dropped, and a tokenizer without an eos token does not load,
//! because generation could never stop on its own.
//!
//! `add_special_tokens=true` applies `tokenizer.json`'s post-processor as is (for Llama-2 style
//! files: prepend bos). `add_bos_token` from the config is reported, not re-applied.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use allam_types::TokenId;

use crate::chat::{ChatTemplate, Message, TemplateTokens};
use crate::config::TokenizerConfig;
use crate::{Error, IncrementalDecoder};

const TOKENIZER_JSON: &str = "tokenizer.json";
const TOKENIZER_CONFIG_JSON: &str = "tokenizer_config.json";
const SPECIAL_TOKENS_MAP_JSON: &str = "special_tokens_map.json";
/// Where transformers ≥ 4.43 saves the template when it is not inline in the config.
const CHAT_TEMPLATE_JINJA: &str = "chat_template.jinja";

/// A special token's text and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub text: String,
    pub id: TokenId,
}

/// A loaded tokenizer. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    hf: tokenizers::Tokenizer,
    vocab_size: usize,
    /// `is_special[id]`: an added token marked `special` (skipped by
    /// `decode(skip_special_tokens=true)`).
    is_special: Vec<bool>,
    bos: Option<SpecialToken>,
    eos: SpecialToken,
    unk: Option<SpecialToken>,
    pad: Option<SpecialToken>,
    add_bos_token: bool,
    model_max_length: Option<usize>,
    chat_template: Option<ChatTemplate>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.debug_struct("Tokenizer")
            .field("vocab_size", &inner.vocab_size)
            .field("bos", &inner.bos)
            .field("eos", &inner.eos)
            .field("add_bos_token", &inner.add_bos_token)
            .field("model_max_length", &inner.model_max_length)
            .field("has_chat_template", &inner.chat_template.is_some())
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and `tokenizer_config.json` from a model directory.
    /// `special_tokens_map.json` fills special tokens the config leaves out, and
    /// `chat_template.jinja` supplies the template when the config has none.
    pub fn from_dir(dir: &Path) -> Result<Tokenizer, Error> {
        let tokenizer_path = dir.join(TOKENIZER_JSON);
        let tokenizer_json = read(&tokenizer_path)?;
        let config_path = dir.join(TOKENIZER_CONFIG_JSON);
        let config_file = config_path.display().to_string();
        let mut config = if config_path.exists() {
            TokenizerConfig::parse(&read(&config_path)?, &config_file)?
        } else {
            TokenizerConfig::default()
        };
        let map_path = dir.join(SPECIAL_TOKENS_MAP_JSON);
        if map_path.exists() {
            config
                .fill_from_special_tokens_map(&read(&map_path)?, &map_path.display().to_string())?;
        }
        let mut template_file = config_file.clone();
        let jinja_path = dir.join(CHAT_TEMPLATE_JINJA);
        if config.chat_template.is_none() && jinja_path.exists() {
            let bytes = read(&jinja_path)?;
            let source = String::from_utf8(bytes).map_err(|e| Error::InvalidConfig {
                file: jinja_path.display().to_string(),
                field: "(file)",
                message: format!("not UTF-8: {e}"),
            })?;
            config.chat_template = Some(source);
            template_file = jinja_path.display().to_string();
        }
        Tokenizer::build(
            &tokenizer_json,
            &tokenizer_path.display().to_string(),
            config,
            &config_file,
            &template_file,
        )
    }

    /// Builds a tokenizer from in-memory `tokenizer.json` and `tokenizer_config.json` bytes.
    pub fn from_bytes(
        tokenizer_json: &[u8],
        tokenizer_config_json: &[u8],
    ) -> Result<Tokenizer, Error> {
        let config = TokenizerConfig::parse(tokenizer_config_json, TOKENIZER_CONFIG_JSON)?;
        Tokenizer::build(
            tokenizer_json,
            TOKENIZER_JSON,
            config,
            TOKENIZER_CONFIG_JSON,
            TOKENIZER_CONFIG_JSON,
        )
    }

    fn build(
        tokenizer_json: &[u8],
        tokenizer_file: &str,
        config: TokenizerConfig,
        config_file: &str,
        template_file: &str,
    ) -> Result<Tokenizer, Error> {
        let hf = tokenizers::Tokenizer::from_bytes(tokenizer_json).map_err(|e| {
            Error::InvalidTokenizerJson {
                file: tokenizer_file.to_owned(),
                message: e.to_string(),
            }
        })?;
        let vocab_size = hf.get_vocab_size(true);
        let mut is_special = vec![false; vocab_size];
        for (id, token) in hf.get_added_tokens_decoder() {
            if token.special {
                if let Some(slot) = usize::try_from(id).ok().and_then(|i| is_special.get_mut(i)) {
                    *slot = true;
                }
            }
        }
        let lookup =
            |field: &'static str, text: &Option<String>| -> Result<Option<SpecialToken>, Error> {
                let Some(text) = text else { return Ok(None) };
                match hf.token_to_id(text) {
                    Some(id) => Ok(Some(SpecialToken {
                        text: text.clone(),
                        id,
                    })),
                    None => Err(Error::MissingSpecialToken {
                        file: config_file.to_owned(),
                        field,
                        message: format!("{text:?} is not in the vocabulary of {tokenizer_file}"),
                    }),
                }
            };
        let bos = lookup("bos_token", &config.bos_token)?;
        let eos =
            lookup("eos_token", &config.eos_token)?.ok_or_else(|| Error::MissingSpecialToken {
                file: config_file.to_owned(),
                field: "eos_token",
                message: "is missing; generation needs an eos token to stop".to_owned(),
            })?;
        let unk = lookup("unk_token", &config.unk_token)?;
        let pad = lookup("pad_token", &config.pad_token)?;
        let chat_template = match config.chat_template {
            Some(source) => Some(ChatTemplate::compile(
                source,
                TemplateTokens {
                    bos_token: config.bos_token.clone(),
                    eos_token: config.eos_token.clone(),
                    unk_token: config.unk_token.clone(),
                    pad_token: config.pad_token.clone(),
                },
                template_file,
            )?),
            None => None,
        };
        Ok(Tokenizer {
            inner: Arc::new(Inner {
                hf,
                vocab_size,
                is_special,
                bos,
                eos,
                unk,
                pad,
                add_bos_token: config.add_bos_token.unwrap_or(false),
                model_max_length: config.model_max_length,
                chat_template,
            }),
        })
    }

    /// Token ids of `text`. With `add_special_tokens`, the post-processor adds its tokens (bos
    /// for Llama-2 style tokenizers). Special-token text such as `<s>` is matched either way,
    /// as in transformers.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<TokenId>, Error> {
        let encoding = self
            .inner
            .hf
            .encode_fast(text, add_special_tokens)
            .map_err(|e| Error::Encode {
                message: e.to_string(),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`. Errors on an id outside the vocabulary instead of dropping it.
    pub fn decode(&self, ids: &[TokenId], skip_special_tokens: bool) -> Result<String, Error> {
        self.check_ids(ids)?;
        self.inner
            .hf
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Decode {
                message: e.to_string(),
            })
    }

    /// A streaming decoder over this tokenizer (skips special tokens).
    pub fn incremental_decoder(&self) -> IncrementalDecoder {
        IncrementalDecoder::new(self)
    }

    /// Renders chat `messages` with the chat template. `add_generation_prompt` is passed to the
    /// template (the Llama-2 template ignores it). Encode the result with
    /// `add_special_tokens=false`: templates write bos themselves.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        match &self.inner.chat_template {
            Some(template) => template.render(messages, add_generation_prompt),
            None => Err(Error::NoChatTemplate),
        }
    }

    /// Whether `tokenizer_config.json` (or `chat_template.jinja`) had a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.inner.chat_template.is_some()
    }

    /// Number of ids, added tokens included; every valid id is below it.
    pub fn vocab_size(&self) -> usize {
        self.inner.vocab_size
    }

    pub fn bos_token_id(&self) -> Option<TokenId> {
        self.inner.bos.as_ref().map(|t| t.id)
    }

    pub fn eos_token_id(&self) -> TokenId {
        self.inner.eos.id
    }

    pub fn unk_token_id(&self) -> Option<TokenId> {
        self.inner.unk.as_ref().map(|t| t.id)
    }

    pub fn pad_token_id(&self) -> Option<TokenId> {
        self.inner.pad.as_ref().map(|t| t.id)
    }

    pub fn bos_token(&self) -> Option<&SpecialToken> {
        self.inner.bos.as_ref()
    }

    pub fn eos_token(&self) -> &SpecialToken {
        &self.inner.eos
    }

    /// `add_bos_token` from the config (false when absent).
    pub fn add_bos_token(&self) -> bool {
        self.inner.add_bos_token
    }

    /// `model_max_length` from the config; `None` when absent or transformers' "unlimited".
    pub fn model_max_length(&self) -> Option<usize> {
        self.inner.model_max_length
    }

    /// The vocabulary piece of `id` (e.g. `▁tea`, `<0x0A>`, `</s>`).
    pub fn id_to_token(&self, id: TokenId) -> Option<String> {
        self.inner.hf.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<TokenId> {
        self.inner.hf.token_to_id(token)
    }

    /// Whether `id` is a special added token (bos, eos, unk, ...).
    pub fn is_special(&self, id: TokenId) -> bool {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.inner.is_special.get(i))
            .copied()
            .unwrap_or(false)
    }

    /// Errors on the first id outside the vocabulary.
    pub fn check_ids(&self, ids: &[TokenId]) -> Result<(), Error> {
        let vocab_size = self.inner.vocab_size;
        match ids
            .iter()
            .find(|&&id| usize::try_from(id).map_or(true, |i| i >= vocab_size))
        {
            Some(&id) => Err(Error::UnknownTokenId { id, vocab_size }),
            None => Ok(()),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal Llama-2 style tokenizer.json: 3 specials, 2 byte tokens, 4 pieces.
    const MINI_TOKENIZER_JSON: &str = r#"{
      "version": "1.0", "truncation": null, "padding": null,
      "added_tokens": [
        {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
      ],
      "normalizer": null,
      "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": false},
      "post_processor": {"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
      "decoder": {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
      "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
        "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
        "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "<0x21>": 4, "▁": 5, "h": 6, "i": 7, "▁h": 8, "▁hi": 9},
        "merges": ["▁ h", "▁h i"]}
    }"#;

    fn mini(config: &str) -> Result<Tokenizer, Error> {
        Tokenizer::from_bytes(MINI_TOKENIZER_JSON.as_bytes(), config.as_bytes())
    }

    #[test]
    fn loads_special_tokens_and_encodes() {
        let tok = mini(r#"{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": true}"#)
            .expect("loads");
        assert_eq!(tok.vocab_size(), 10);
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.eos_token_id(), 2);
        assert_eq!(tok.unk_token_id(), Some(0));
        assert_eq!(tok.pad_token_id(), None);
        assert!(tok.add_bos_token());
        assert!(!tok.has_chat_template());
        assert_eq!(tok.encode("hi", false).expect("encodes"), vec![9]);
        assert_eq!(
            tok.encode("hi!\n", true).expect("encodes"),
            vec![1, 9, 4, 3]
        );
        assert_eq!(tok.decode(&[1, 9, 4, 2], true).expect("decodes"), "hi!");
        assert_eq!(
            tok.decode(&[1, 9, 2], false).expect("decodes"),
            "<s> hi</s>"
        );
        assert!(tok.is_special(1) && tok.is_special(2) && !tok.is_special(9));
        assert!(!tok.is_special(10_000));
        assert_eq!(tok.id_to_token(9).as_deref(), Some("▁hi"));
        assert_eq!(tok.token_to_id("<0x21>"), Some(4));
    }

    #[test]
    fn decode_rejects_ids_outside_the_vocabulary() {
        let tok = mini(r#"{"eos_token": "</s>"}"#).expect("loads");
        let err = tok.decode(&[9, 10], false).expect_err("10 is out of range");
        assert!(
            matches!(
                err,
                Error::UnknownTokenId {
                    id: 10,
                    vocab_size: 10
                }
            ),
            "{err:?}"
        );
        assert!(tok.check_ids(&[0, 9]).is_ok());
    }

    #[test]
    fn eos_is_required_and_must_be_in_vocab() {
        let err = mini(r#"{"bos_token": "<s>"}"#).expect_err("no eos");
        assert!(err.to_string().contains("`eos_token`"), "{err}");
        let err = mini(r#"{"eos_token": "<|end|>"}"#).expect_err("eos not in vocab");
        assert!(err.to_string().contains("<|end|>"), "{err}");
    }

    #[test]
    fn bad_tokenizer_json_names_the_file() {
        let err =
            Tokenizer::from_bytes(b"{}", br#"{"eos_token": "</s>"}"#).expect_err("not a tokenizer");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
        assert_eq!(err.reason(), "invalid_tokenizer_json");
    }

    #[test]
    fn from_dir_reads_special_tokens_map_and_jinja_template() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("tokenizer.json"), MINI_TOKENIZER_JSON).expect("write");
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"add_bos_token": true}"#,
        )
        .expect("write");
        std::fs::write(
            dir.path().join("special_tokens_map.json"),
            r#"{"bos_token": {"content": "<s>"}, "eos_token": {"content": "</s>"}}"#,
        )
        .expect("write");
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "{% for m in messages %}{{ bos_token }}{{ m.content }}{% endfor %}",
        )
        .expect("write");
        let tok = Tokenizer::from_dir(dir.path()).expect("loads");
        assert_eq!(tok.eos_token_id(), 2);
        let rendered = tok
            .apply_chat_template(&[Message::user("hi")], true)
            .expect("renders");
        assert_eq!(rendered, "<s>hi");
    }

    #[test]
    fn from_dir_names_a_missing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Tokenizer::from_dir(dir.path()).expect_err("empty dir");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
        assert_eq!(err.reason(), "tokenizer_io");
    }

    #[test]
    fn no_template_is_an_error() {
        let tok = mini(r#"{"eos_token": "</s>"}"#).expect("loads");
        let err = tok
            .apply_chat_template(&[Message::user("hi")], true)
            .expect_err("no template");
        assert!(matches!(err, Error::NoChatTemplate));
    }

    #[test]
    fn tokenizer_is_send_sync_and_cheap_to_clone() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        let tok = mini(r#"{"eos_token": "</s>"}"#).expect("loads");
        let clone = tok.clone();
        assert!(Arc::ptr_eq(&tok.inner, &clone.inner));
    }
}
