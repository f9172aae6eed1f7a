//! Keeps prompt and completion text out of logs unless the operator asked for it.
//!
//! Rule for every crate: a log field or span attribute that could hold user text (prompt,
//! messages, generated text, stop strings) is written through [`PromptText`], never directly.
//! The switch is the binary's `--log-prompts` flag, passed down as a plain `bool` in each
//! crate's config; there is no global, so a test can check both behaviours side by side.

use std::fmt;

/// User text on its way into a log line: shown only when `log_prompts` is set, otherwise
/// replaced by its length in characters (enough to debug truncation, nothing to leak).
#[derive(Debug, Clone, Copy)]
pub struct PromptText<'a> {
    text: &'a str,
    log_prompts: bool,
}

impl<'a> PromptText<'a> {
    pub fn new(text: &'a str, log_prompts: bool) -> Self {
        PromptText { text, log_prompts }
    }
}

impl fmt::Display for PromptText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.log_prompts {
            f.write_str(self.text)
        } else {
            write!(f, "<redacted {} chars>", self.text.chars().count())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_unless_enabled_and_counts_chars_not_bytes() {
        let arabic = "كيف أجهز كوب شاهي؟";
        assert_eq!(PromptText::new(arabic, true).to_string(), arabic);
        let redacted = PromptText::new(arabic, false).to_string();
        assert!(!redacted.contains("كيف"));
        assert_eq!(
            redacted,
            format!("<redacted {} chars>", arabic.chars().count())
        );
        assert_ne!(arabic.chars().count(), arabic.len());
    }
}
