//! `tokenizer_config.json` (and the older `special_tokens_map.json`): the transformers-side
//! settings that `tokenizer.json` does not carry: which tokens are bos/eos/unk/pad, whether bos
//! is added, the chat template and `model_max_length`.
//!
//! transformers writes special tokens either as a plain string (`"bos_token": "<s>"`) or as an
//! `AddedToken` object (`{"content": "<s>", "lstrip": false, ...}`); both are accepted.
//! `chat_template` is either one string or a list of `{name, template}`, of which `default` is
//! used. Unknown keys are ignored, as transformers does.

use serde_json::Value;

use crate::Error;

/// A `model_max_length` above this is transformers' "no limit" sentinel (`int(1e30)`).
const MODEL_MAX_LENGTH_SENTINEL: f64 = 1e18;

/// The parsed settings; every field is optional at this level, `Tokenizer` decides what is
/// required.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct TokenizerConfig {
    pub(crate) bos_token: Option<String>,
    pub(crate) eos_token: Option<String>,
    pub(crate) unk_token: Option<String>,
    pub(crate) pad_token: Option<String>,
    pub(crate) add_bos_token: Option<bool>,
    pub(crate) chat_template: Option<String>,
    pub(crate) model_max_length: Option<usize>,
}

impl TokenizerConfig {
    /// Parses `tokenizer_config.json`; `file` names it in errors.
    pub(crate) fn parse(bytes: &[u8], file: &str) -> Result<Self, Error> {
        let root = parse_object(bytes, file)?;
        Ok(TokenizerConfig {
            bos_token: special_token(&root, "bos_token", file)?,
            eos_token: special_token(&root, "eos_token", file)?,
            unk_token: special_token(&root, "unk_token", file)?,
            pad_token: special_token(&root, "pad_token", file)?,
            add_bos_token: optional_bool(&root, "add_bos_token", file)?,
            chat_template: chat_template(&root, file)?,
            model_max_length: model_max_length(&root, file)?,
        })
    }

    /// Fills special tokens that `tokenizer_config.json` left out from `special_tokens_map.json`
    /// (older checkpoints keep them only there).
    pub(crate) fn fill_from_special_tokens_map(
        &mut self,
        bytes: &[u8],
        file: &str,
    ) -> Result<(), Error> {
        let root = parse_object(bytes, file)?;
        let slots: [(&mut Option<String>, &'static str); 4] = [
            (&mut self.bos_token, "bos_token"),
            (&mut self.eos_token, "eos_token"),
            (&mut self.unk_token, "unk_token"),
            (&mut self.pad_token, "pad_token"),
        ];
        for (slot, field) in slots {
            if slot.is_none() {
                *slot = special_token(&root, field, file)?;
            }
        }
        Ok(())
    }
}

fn parse_object(bytes: &[u8], file: &str) -> Result<serde_json::Map<String, Value>, Error> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| Error::InvalidConfig {
        file: file.to_owned(),
        field: "(root)",
        message: format!("not valid JSON: {e}"),
    })?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(Error::InvalidConfig {
            file: file.to_owned(),
            field: "(root)",
            message: format!("expected a JSON object, got {}", json_kind(&other)),
        }),
    }
}

fn special_token(
    root: &serde_json::Map<String, Value>,
    field: &'static str,
    file: &str,
) -> Result<Option<String>, Error> {
    match root.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(obj)) => match obj.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::InvalidConfig {
                file: file.to_owned(),
                field,
                message: "an AddedToken object needs a string `content`".to_owned(),
            }),
        },
        Some(other) => Err(Error::InvalidConfig {
            file: file.to_owned(),
            field,
            message: format!("expected a string or an object, got {}", json_kind(other)),
        }),
    }
}

fn optional_bool(
    root: &serde_json::Map<String, Value>,
    field: &'static str,
    file: &str,
) -> Result<Option<bool>, Error> {
    match root.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(Error::InvalidConfig {
            file: file.to_owned(),
            field,
            message: format!("expected a boolean, got {}", json_kind(other)),
        }),
    }
}

fn chat_template(
    root: &serde_json::Map<String, Value>,
    file: &str,
) -> Result<Option<String>, Error> {
    const FIELD: &str = "chat_template";
    match root.get(FIELD) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(named)) => {
            for entry in named {
                let name = entry.get("name").and_then(Value::as_str);
                let template = entry.get("template").and_then(Value::as_str);
                match (name, template) {
                    (Some("default"), Some(template)) => return Ok(Some(template.to_owned())),
                    (Some(_), Some(_)) => {}
                    _ => {
                        return Err(Error::InvalidConfig {
                            file: file.to_owned(),
                            field: FIELD,
                            message: "each entry of a template list needs string `name` and \
                                      `template`"
                                .to_owned(),
                        })
                    }
                }
            }
            Err(Error::InvalidConfig {
                file: file.to_owned(),
                field: FIELD,
                message: "a template list has no entry named `default`".to_owned(),
            })
        }
        Some(other) => Err(Error::InvalidConfig {
            file: file.to_owned(),
            field: FIELD,
            message: format!("expected a string or a list, got {}", json_kind(other)),
        }),
    }
}

fn model_max_length(
    root: &serde_json::Map<String, Value>,
    file: &str,
) -> Result<Option<usize>, Error> {
    const FIELD: &str = "model_max_length";
    match root.get(FIELD) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(v) = n.as_u64() {
                return Ok(usize::try_from(v).ok().filter(|&v| v > 0));
            }
            match n.as_f64() {
                Some(f) if f >= MODEL_MAX_LENGTH_SENTINEL => Ok(None),
                _ => Err(Error::InvalidConfig {
                    file: file.to_owned(),
                    field: FIELD,
                    message: format!("expected a positive integer, got {n}"),
                }),
            }
        }
        Some(other) => Err(Error::InvalidConfig {
            file: file.to_owned(),
            field: FIELD,
            message: format!("expected a number, got {}", json_kind(other)),
        }),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<TokenizerConfig, Error> {
        TokenizerConfig::parse(json.as_bytes(), "tokenizer_config.json")
    }

    #[test]
    fn accepts_strings_and_added_token_objects() {
        let config = parse(
            r#"{"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
                "pad_token": null, "add_bos_token": true, "model_max_length": 4096}"#,
        )
        .expect("valid config");
        assert_eq!(config.bos_token.as_deref(), Some("<s>"));
        assert_eq!(config.eos_token.as_deref(), Some("</s>"));
        assert_eq!(config.unk_token, None);
        assert_eq!(config.pad_token, None);
        assert_eq!(config.add_bos_token, Some(true));
        assert_eq!(config.model_max_length, Some(4096));
    }

    #[test]
    fn huge_model_max_length_means_unlimited() {
        let config = parse(r#"{"model_max_length": 1000000000000000019884624838656}"#)
            .expect("valid config");
        assert_eq!(config.model_max_length, None);
    }

    #[test]
    fn named_template_list_uses_default() {
        let config = parse(
            r#"{"chat_template": [{"name": "tool_use", "template": "T"},
                                  {"name": "default", "template": "D"}]}"#,
        )
        .expect("valid config");
        assert_eq!(config.chat_template.as_deref(), Some("D"));
        let err = parse(r#"{"chat_template": [{"name": "tool_use", "template": "T"}]}"#)
            .expect_err("no default");
        assert!(err.to_string().contains("default"), "{err}");
    }

    #[test]
    fn wrong_types_name_the_field() {
        let err = parse(r#"{"eos_token": 2}"#).expect_err("number is not a token");
        assert!(err.to_string().contains("`eos_token`"), "{err}");
        let err = parse(r#"{"add_bos_token": "yes"}"#).expect_err("string is not a bool");
        assert!(err.to_string().contains("`add_bos_token`"), "{err}");
        let err = parse("[1]").expect_err("not an object");
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
    }

    #[test]
    fn special_tokens_map_fills_only_missing_tokens() {
        let mut config = parse(r#"{"eos_token": "<eos>"}"#).expect("valid config");
        config
            .fill_from_special_tokens_map(
                br#"{"bos_token": {"content": "<s>"}, "eos_token": "</s>"}"#,
                "special_tokens_map.json",
            )
            .expect("valid map");
        assert_eq!(config.bos_token.as_deref(), Some("<s>"));
        assert_eq!(config.eos_token.as_deref(), Some("<eos>"));
    }
}
