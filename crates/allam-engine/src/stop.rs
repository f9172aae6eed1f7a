//! Stop strings over streamed text: matched across token boundaries, never emitted.
//!
//! Invariant between calls: no stop string occurs in `emitted + held`, and `held` is the
//! longest suffix of `emitted + held` that is a proper prefix of some stop string. Hence a stop
//! string can only start inside `held + new`, so each call searches just that (bounded by the
//! longest stop string plus the new text), and text that could still become a stop string is
//! held back instead of streamed. All cuts are at `char` boundaries: Arabic is multi-byte.

/// What one call of [`StopMatcher::push`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pushed {
    /// Text safe to stream now.
    pub(crate) text: String,
    /// A stop string was found; `text` ends right before it and the sequence must stop.
    pub(crate) stopped: bool,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub(crate) fn new(stops: &[String]) -> StopMatcher {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Adds newly decoded text. With `match_stops == false` (before `min_new_tokens`), a
    /// complete stop string does not stop the sequence, but text is still held back.
    pub(crate) fn push(&mut self, new_text: &str, match_stops: bool) -> Pushed {
        if self.stops.is_empty() {
            return Pushed {
                text: new_text.to_owned(),
                stopped: false,
            };
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.push_str(new_text);
        if match_stops {
            let first = self
                .stops
                .iter()
                .filter_map(|stop| buf.find(stop.as_str()))
                .min();
            if let Some(at) = first {
                buf.truncate(at);
                return Pushed {
                    text: buf,
                    stopped: true,
                };
            }
        }
        let keep_from = self.holdback_start(&buf);
        self.held = buf.split_off(keep_from);
        Pushed {
            text: buf,
            stopped: false,
        }
    }

    /// The held-back text, released when the sequence ends for another reason.
    pub(crate) fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Start of the longest suffix of `buf` that is a proper prefix of a stop string.
    fn holdback_start(&self, buf: &str) -> usize {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut start = buf.len().saturating_sub(longest.saturating_sub(1));
        while !buf.is_char_boundary(start) {
            start += 1;
        }
        while start < buf.len() {
            if let Some(suffix) = buf.get(start..) {
                if self
                    .stops
                    .iter()
                    .any(|stop| stop.len() > suffix.len() && stop.starts_with(suffix))
                {
                    return start;
                }
            }
            start += 1;
            while !buf.is_char_boundary(start) {
                start += 1;
            }
        }
        buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streams `pieces` through a matcher; returns (streamed text, stopped at piece index).
    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<usize>) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for (i, piece) in pieces.iter().enumerate() {
            let pushed = m.push(piece, true);
            out.push_str(&pushed.text);
            if pushed.stopped {
                return (out, Some(i));
            }
        }
        out.push_str(&m.flush());
        (out, None)
    }

    #[test]
    fn table() {
        /// (stop strings, streamed pieces, expected text, piece index that stopped)
        type Case<'a> = (&'a [&'a str], &'a [&'a str], &'a str, Option<usize>);
        let cases: &[Case] = &[
            (&[], &["ab", "cd"], "abcd", None),
            (
                &["STOP"],
                &["hello ", "ST", "O", "P", " more"],
                "hello ",
                Some(3),
            ),
            (&["STOP"], &["hello ST", "ART"], "hello START", None),
            (&["\n\n"], &["a\n", "\nb"], "a", Some(1)),
            (&["xyz", "yq"], &["x", "y", "q"], "x", Some(2)),
            (&["end"], &["the end is near"], "the ", Some(0)),
            (&["؟"], &["كيف ", "حالك؟ ", "بخير"], "كيف حالك", Some(1)),
            (&["لا"], &["مرحبا ل", "ا"], "مرحبا ", Some(1)),
            (&["ab"], &["a", "a", "a"], "aaa", None),
        ];
        for (stops, pieces, want_text, want_stop) in cases {
            let (text, stop) = run(stops, pieces);
            assert_eq!(
                (&text[..], stop),
                (*want_text, *want_stop),
                "stops {stops:?} pieces {pieces:?}"
            );
        }
    }

    #[test]
    fn text_that_may_start_a_stop_is_held_back() {
        let mut m = StopMatcher::new(&["</answer>".to_owned()]);
        let pushed = m.push("result </ans", true);
        assert_eq!(pushed.text, "result ");
        let pushed = m.push("wer", true);
        assert_eq!(pushed.text, "", "still a prefix of the stop string");
        let pushed = m.push("!", true);
        assert_eq!(pushed.text, "</answer!");
    }

    #[test]
    fn matching_can_be_deferred() {
        let mut m = StopMatcher::new(&["x".to_owned()]);
        assert_eq!(m.push("axb", false).text, "axb");
        assert!(m.push("cx", true).stopped);
    }
}
