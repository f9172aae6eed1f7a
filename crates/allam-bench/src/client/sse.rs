//! An incremental Server-Sent Events parser for OpenAI-style streams: bytes in, the `data` of
//! each complete event out.
//!
//! Follows the WHATWG event-stream rules this use needs: lines end with LF or CRLF, an empty
//! line dispatches the event, several `data:` lines join with `\n`, one space after the colon
//! is dropped, lines starting with `:` are comments (keep-alives), other fields (`event`,
//! `id`, `retry`) are ignored. Bytes are buffered until a line is complete, so a multi-byte
//! character split across network reads is decoded whole.
//!
//! Invariant: the buffer never holds a complete line after `push` returns.

/// Why a stream is not valid SSE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SseError {
    /// A line is not UTF-8.
    InvalidUtf8,
}

#[derive(Debug, Default)]
pub(crate) struct SseParser {
    pending: Vec<u8>,
    data: Option<String>,
}

impl SseParser {
    /// Feeds the next bytes of the body; returns the data of every event they complete.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, SseError> {
        self.pending.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut consumed = 0;
        while let Some(newline) = self.pending[consumed..].iter().position(|b| *b == b'\n') {
            let mut line = &self.pending[consumed..consumed + newline];
            consumed += newline + 1;
            if let [rest @ .., b'\r'] = line {
                line = rest;
            }
            let line = std::str::from_utf8(line).map_err(|_| SseError::InvalidUtf8)?;
            if line.is_empty() {
                if let Some(data) = self.data.take() {
                    events.push(data);
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line, ""),
            };
            if field == "data" {
                match &mut self.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => self.data = Some(value.to_owned()),
                }
            }
        }
        self.pending.drain(..consumed);
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(body: &[u8], piece_len: usize) -> Vec<String> {
        let mut parser = SseParser::default();
        body.chunks(piece_len)
            .flat_map(|piece| parser.push(piece).expect("valid stream"))
            .collect()
    }

    #[test]
    fn events_survive_any_split_of_the_body() {
        let body = "data: {\"a\":\"مرحبا\"}\n\n: keep-alive\n\r\nevent: x\r\ndata: one\r\ndata:two\r\n\r\ndata: [DONE]\n\n";
        let expected = vec![
            "{\"a\":\"مرحبا\"}".to_owned(),
            "one\ntwo".to_owned(),
            "[DONE]".to_owned(),
        ];
        for piece_len in 1..=body.len() {
            assert_eq!(
                parse_in_pieces(body.as_bytes(), piece_len),
                expected,
                "{piece_len}"
            );
        }
    }

    #[test]
    fn incomplete_event_is_not_dispatched_and_bad_utf8_is_an_error() {
        assert!(parse_in_pieces(b"data: partial\n", 4).is_empty());
        let mut parser = SseParser::default();
        assert_eq!(parser.push(b"data: \xff\n\n"), Err(SseError::InvalidUtf8));
    }
}
