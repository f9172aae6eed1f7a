//! Chat messages and the model's chat template, rendered the way transformers does.
//!
//! transformers compiles `chat_template` with jinja2's `ImmutableSandboxedEnvironment(
//! trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])`, registers
//! `raise_exception(message)` and a `tojson` that is `json.dumps(ensure_ascii=False)`, and
//! renders with `messages`, `add_generation_prompt`, `tools`, `documents` and the special-token
//! strings (`bos_token`, `eos_token`, ...). We do the same with minijinja, plus minijinja-contrib's
//! pycompat callback so that Python string methods such as `.strip()` work.
//!
//! Invariant: the template is compiled once, when the tokenizer loads; a template that does not
//! compile fails the load, not the first request.
//!
//! Unknown roles are unrepresentable here: `Role` is closed, and parsing a role string that is
//! not system/user/assistant is an error naming the role. `allam-request` does that parsing and
//! adds the message index.

use std::fmt;
use std::str::FromStr;

use minijinja::value::{Kwargs, Value};
use minijinja::{AutoEscape, Environment, ErrorKind};
use serde::Serialize;

use crate::Error;

/// The Llama-2 chat template ALLaM ships (as in meta-llama/Llama-2-*-chat-hf): an optional
/// system message folded into the first user turn, strictly alternating user/assistant turns,
/// `add_generation_prompt` ignored.
pub const LLAMA2_CHAT_TEMPLATE: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

/// The name the compiled template is stored under in its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Who wrote a chat turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The word chat templates compare against.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = Error;

    /// Exact, case-sensitive match, as the templates compare case-sensitively.
    fn from_str(role: &str) -> Result<Self, Error> {
        match role {
            "system" => Ok(Role::System),
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            other => Err(Error::UnknownRole {
                role: other.to_owned(),
            }),
        }
    }
}

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Message::new(Role::System, content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Message::new(Role::User, content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Message::new(Role::Assistant, content)
    }
}

/// What the template sees of a message: a dict `{role, content}` (in that order, as Python
/// callers build it, which `tojson` makes visible).
#[derive(Serialize)]
struct MessageView<'a> {
    role: &'static str,
    content: &'a str,
}

/// The special-token strings a template may reference.
#[derive(Debug, Clone, Default)]
pub(crate) struct TemplateTokens {
    pub(crate) bos_token: Option<String>,
    pub(crate) eos_token: Option<String>,
    pub(crate) unk_token: Option<String>,
    pub(crate) pad_token: Option<String>,
}

/// A compiled chat template.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    tokens: TemplateTokens,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

/// Marks an error raised by the template's own `raise_exception`, so rendering can report the
/// template's message verbatim instead of minijinja's decorated text.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

impl ChatTemplate {
    /// Compiles `source`; `file` names where it came from in errors.
    pub(crate) fn compile(
        source: String,
        tokens: TemplateTokens,
        file: &str,
    ) -> Result<Self, Error> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        // Prompts are plain text: never HTML-escape, whatever the template's name.
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| Error::TemplateSyntax {
                file: file.to_owned(),
                message: describe(&e),
            })?;
        Ok(ChatTemplate { env, tokens })
    }

    /// Renders `messages` to the prompt string.
    pub(crate) fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        let views: Vec<MessageView<'_>> = messages
            .iter()
            .map(|m| MessageView {
                role: m.role.as_str(),
                content: &m.content,
            })
            .collect();
        let ctx = minijinja::context! {
            messages => Value::from_serialize(&views),
            add_generation_prompt => add_generation_prompt,
            tools => Value::from(()),
            documents => Value::from(()),
            bos_token => self.tokens.bos_token.as_deref(),
            eos_token => self.tokens.eos_token.as_deref(),
            unk_token => self.tokens.unk_token.as_deref(),
            pad_token => self.tokens.pad_token.as_deref(),
        };
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::Template {
                message: describe(&e),
            })?;
        template.render(ctx).map_err(|e| Error::Template {
            message: raised_message(&e).unwrap_or_else(|| describe(&e)),
        })
    }
}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(RaisedByTemplate(message)),
    )
}

/// The message of a `raise_exception` anywhere in `err`'s source chain.
fn raised_message(err: &minijinja::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<RaisedByTemplate>() {
            return Some(raised.0.clone());
        }
        source = e.source();
    }
    None
}

/// minijinja's error text with the line, without the multi-line debug dump.
fn describe(err: &minijinja::Error) -> String {
    let mut text = match err.detail() {
        Some(detail) => format!("{}: {detail}", err.kind()),
        None => err.kind().to_string(),
    };
    if let Some(line) = err.line() {
        text.push_str(&format!(" (line {line})"));
    }
    text
}

/// `tojson` as transformers defines it: Python `json.dumps` with `ensure_ascii=False`,
/// `indent=None`, `separators=None`, `sort_keys=False` by default, so `{"a": 1, "b": [1, 2]}`
/// (spaces after `,` and `:` unless indented), and no HTML escaping (minijinja's built-in
/// escapes `<`, which would change prompts).
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v)?),
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let item: String = v.get_item(&Value::from(0))?.to_string();
            let key: String = v.get_item(&Value::from(1))?.to_string();
            (item, key)
        }
        // Python's defaults: `(', ', ': ')`, or `(',', ': ')` when indenting.
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let formatter = PyJsonFormatter {
        item_sep,
        key_sep,
        indent: indent.map(|n| " ".repeat(n)),
        depth: 0,
        has_value: false,
    };
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    let serialized = if sort_keys.unwrap_or(false) {
        SortedKeys(value).serialize(&mut serializer)
    } else {
        value.serialize(&mut serializer)
    };
    serialized.map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "cannot serialize to JSON")
            .with_source(e)
    })?;
    let json = String::from_utf8(out).map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "JSON is not UTF-8").with_source(e)
    })?;
    let json = if ensure_ascii.unwrap_or(false) {
        escape_non_ascii(&json)
    } else {
        json
    };
    Ok(Value::from_safe_string(json))
}

/// `\uXXXX` (UTF-16, surrogate pairs above the BMP) for every non-ASCII char, as Python's
/// `ensure_ascii=True`. Non-ASCII chars only occur inside JSON strings, so this is safe on the
/// whole document.
fn escape_non_ascii(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// Serializes maps with their keys sorted (Python's `sort_keys=True`).
struct SortedKeys<'a>(&'a Value);

impl Serialize for SortedKeys<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use minijinja::value::ValueKind;
        use serde::ser::{SerializeMap, SerializeSeq};
        match self.0.kind() {
            ValueKind::Map => {
                let mut entries: Vec<(String, Value)> = Vec::new();
                if let Ok(keys) = self.0.try_iter() {
                    for key in keys {
                        let item = self.0.get_item(&key).unwrap_or_default();
                        entries.push((key.to_string(), item));
                    }
                }
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (key, item) in &entries {
                    map.serialize_entry(key, &SortedKeys(item))?;
                }
                map.end()
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = match self.0.try_iter() {
                    Ok(iter) => iter.collect(),
                    Err(_) => Vec::new(),
                };
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in &items {
                    seq.serialize_element(&SortedKeys(item))?;
                }
                seq.end()
            }
            _ => self.0.serialize(serializer),
        }
    }
}

/// A serde_json formatter that reproduces Python `json.dumps` layout for given separators and
/// indent (`PrettyFormatter` hard-codes `,` and `: `; `CompactFormatter` has no spaces).
struct PyJsonFormatter {
    item_sep: String,
    key_sep: String,
    indent: Option<String>,
    depth: usize,
    has_value: bool,
}

impl PyJsonFormatter {
    fn newline_indent<W: ?Sized + std::io::Write>(&self, writer: &mut W) -> std::io::Result<()> {
        if let Some(indent) = &self.indent {
            writer.write_all(b"\n")?;
            for _ in 0..self.depth {
                writer.write_all(indent.as_bytes())?;
            }
        }
        Ok(())
    }

    fn begin_container<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        open: &[u8],
    ) -> std::io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        writer.write_all(open)
    }

    fn end_container<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        close: &[u8],
    ) -> std::io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            self.newline_indent(writer)?;
        }
        writer.write_all(close)
    }

    fn begin_item<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if !first {
            writer.write_all(self.item_sep.as_bytes())?;
        }
        self.newline_indent(writer)
    }
}

impl serde_json::ser::Formatter for PyJsonFormatter {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.begin_container(writer, b"[")
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.end_container(writer, b"]")
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.begin_item(writer, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        _writer: &mut W,
    ) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.begin_container(writer, b"{")
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.end_container(writer, b"}")
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.begin_item(writer, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(self.key_sep.as_bytes())
    }
    fn end_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        _writer: &mut W,
    ) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama2() -> ChatTemplate {
        ChatTemplate::compile(
            LLAMA2_CHAT_TEMPLATE.to_owned(),
            TemplateTokens {
                bos_token: Some("<s>".into()),
                eos_token: Some("</s>".into()),
                ..TemplateTokens::default()
            },
            "test",
        )
        .expect("template compiles")
    }

    fn render_source(source: &str, messages: &[Message]) -> Result<String, Error> {
        ChatTemplate::compile(source.to_owned(), TemplateTokens::default(), "test")?
            .render(messages, true)
    }

    #[test]
    fn roles_parse_exactly() {
        assert_eq!("user".parse::<Role>().ok(), Some(Role::User));
        assert_eq!("system".parse::<Role>().ok(), Some(Role::System));
        assert_eq!("assistant".parse::<Role>().ok(), Some(Role::Assistant));
        for bad in ["User", "tool", "", " user"] {
            let err = bad.parse::<Role>().expect_err("not a role");
            assert!(err.to_string().contains(&format!("`{bad}`")), "{err}");
            assert_eq!(err.reason(), "unknown_role");
        }
    }

    #[test]
    fn llama2_folds_system_into_first_user_turn() {
        let rendered = llama2()
            .render(
                &[Message::system(" Be brief."), Message::user("Hi  ")],
                true,
            )
            .expect("renders");
        assert_eq!(
            rendered,
            "<s>[INST] <<SYS>>\n Be brief.\n<</SYS>>\n\nHi [/INST]"
        );
    }

    #[test]
    fn llama2_raises_on_non_alternating_roles() {
        let err = llama2()
            .render(&[Message::user("a"), Message::user("b")], true)
            .expect_err("two user turns in a row");
        match err {
            Error::Template { message } => assert_eq!(
                message,
                "Conversation roles must alternate user/assistant/user/assistant/..."
            ),
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn syntax_errors_fail_compilation() {
        let err = ChatTemplate::compile("{% if %}".into(), TemplateTokens::default(), "cfg.json")
            .expect_err("bad syntax");
        assert!(matches!(err, Error::TemplateSyntax { .. }), "{err:?}");
        assert!(err.to_string().contains("cfg.json"), "{err}");
    }

    #[test]
    fn other_render_errors_are_described() {
        let err = render_source(
            "{{ messages[0].content.nosuchmethod() }}",
            &[Message::user("x")],
        )
        .expect_err("unknown method");
        assert!(matches!(err, Error::Template { .. }), "{err:?}");
        assert!(err.to_string().contains("nosuchmethod"), "{err}");
    }

    #[test]
    fn trim_and_lstrip_blocks_match_transformers() {
        // With jinja2's trim_blocks + lstrip_blocks (transformers' settings), the newline after
        // a block tag and the indentation before it vanish.
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}";
        let rendered =
            render_source(source, &[Message::user("a"), Message::user("b")]).expect("renders");
        assert_eq!(rendered, "U:a\nU:b\n");
    }

    #[test]
    fn loop_controls_and_python_methods_work() {
        let source = "{% for m in messages %}{% if loop.index0 == 1 %}{% break %}{% endif %}{{ m.content.upper().split(' ')|join('-') }}{% endfor %}";
        let rendered =
            render_source(source, &[Message::user("a b"), Message::user("c")]).expect("renders");
        assert_eq!(rendered, "A-B");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let messages = [Message::user("<b>مرحبا</b> \"q\"\n")];
        // Expected strings are what Python's json.dumps prints for the same dict.
        let compact = render_source("{{ messages[0]|tojson }}", &messages).expect("renders");
        assert_eq!(
            compact,
            "{\"role\": \"user\", \"content\": \"<b>مرحبا</b> \\\"q\\\"\\n\"}"
        );
        let ascii =
            render_source("{{ messages|tojson(ensure_ascii=true) }}", &messages).expect("renders");
        assert_eq!(
            ascii,
            "[{\"role\": \"user\", \"content\": \"<b>\\u0645\\u0631\\u062d\\u0628\\u0627</b> \\\"q\\\"\\n\"}]"
        );
        let indented = render_source(
            "{{ messages|tojson(indent=2, sort_keys=true) }}",
            &[Message::user("x")],
        )
        .expect("renders");
        assert_eq!(
            indented,
            "[\n  {\n    \"content\": \"x\",\n    \"role\": \"user\"\n  }\n]"
        );
        let empty = render_source("{{ [[], {}]|tojson }}", &[]).expect("renders");
        assert_eq!(empty, "[[], {}]");
        let emoji = render_source("{{ '🌴'|tojson(ensure_ascii=true) }}", &[]).expect("renders");
        assert_eq!(emoji, "\"\\ud83c\\udf34\"");
    }

    #[test]
    fn template_sees_generation_flag_and_special_tokens() {
        // jinja2 prints Python booleans capitalised; so does minijinja.
        let template = ChatTemplate::compile(
            "{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ tools is none }}"
                .into(),
            TemplateTokens {
                bos_token: Some("<s>".into()),
                eos_token: Some("</s>".into()),
                ..TemplateTokens::default()
            },
            "test",
        )
        .expect("compiles");
        assert_eq!(
            template.render(&[], false).expect("renders"),
            "<s>|</s>|False|True"
        );
    }
}
