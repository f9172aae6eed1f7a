//! Which worker group gets a request: pure functions over a snapshot of the groups, so the
//! policy is tested without sockets.
//!
//! Cost of sending a request to group `g`, in tokens of work:
//!
//! ```text
//! cost(g) = outstanding_tokens(g)                       work this router already sent there
//!         + prompt_tokens - matched_blocks(g) * block   prefill it would do (cache hits are free)
//!         + kv_usage(g) * KV_PRESSURE_TOKENS            a full KV cache means preemptions soon
//! ```
//!
//! The least cost wins. Prefix affinity is therefore not a separate rule: a group holding the
//! prompt's leading blocks wins by exactly the prefill it saves, and loses as soon as its extra
//! queued work exceeds that saving (Dynamo's KV router weighs overlap against load the same
//! way; SGLang's cache-aware router switches to shortest-queue when imbalanced). Exact ties,
//! common on an idle cluster, rotate through `tie_break` so equal groups share the load.
//!
//! Hard limits come first: unhealthy groups, groups already tried for this request and groups
//! at `max_outstanding` are never chosen. When healthy groups exist but all are full the answer
//! is [`Choice::Overloaded`] (RESOURCE_EXHAUSTED at once, no unbounded queue).

/// A full KV cache counts like this many queued tokens: enough to outweigh a typical prompt's
/// prefill saving (so affinity never piles onto a group about to preempt), small enough that
/// modest usage differences do not override a real cache hit.
pub(crate) const KV_PRESSURE_TOKENS: f64 = 2048.0;

/// Work a request adds while in flight: its uncached prompt plus its expected decode, capped
/// because `max_new_tokens` is an upper bound that most answers never reach.
pub(crate) const EXPECTED_DECODE_CAP: u64 = 512;

/// Health as the router last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Known from membership, not yet polled: routable (optimistic), not counted as ready.
    Unknown,
    Healthy,
    /// A connect or Load call failed; not routable until the next Load or membership success.
    Unhealthy,
}

/// One group as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Candidate {
    pub(crate) health: Health,
    /// Already tried for this request (a retry goes elsewhere).
    pub(crate) tried: bool,
    pub(crate) outstanding_requests: usize,
    pub(crate) outstanding_tokens: u64,
    pub(crate) kv_usage: f64,
    /// Leading prompt blocks found in the group's prefix cache summary.
    pub(crate) matched_blocks: usize,
    /// Tokens per KV block on this group.
    pub(crate) block_size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Choice {
    /// Index into the candidates.
    Group(usize),
    /// Routable groups exist, and every one is at `max_outstanding`.
    Overloaded,
    /// No routable group (none known, all unhealthy, or all already tried).
    NoWorkers,
}

/// Picks the group for a request of `prompt_tokens` tokens.
pub(crate) fn choose(
    candidates: &[Candidate],
    prompt_tokens: usize,
    max_outstanding: usize,
    tie_break: usize,
) -> Choice {
    let routable = |c: &&Candidate| c.health != Health::Unhealthy && !c.tried;
    if !candidates.iter().any(|c| routable(&c)) {
        return Choice::NoWorkers;
    }
    let mut best_cost = f64::INFINITY;
    let mut best: Vec<usize> = Vec::new();
    for (idx, candidate) in candidates.iter().enumerate() {
        if !routable(&candidate) || candidate.outstanding_requests >= max_outstanding {
            continue;
        }
        let cost = cost(candidate, prompt_tokens);
        if cost < best_cost {
            best_cost = cost;
            best.clear();
            best.push(idx);
        } else if cost == best_cost {
            best.push(idx);
        }
    }
    if best.is_empty() {
        return Choice::Overloaded;
    }
    Choice::Group(best[tie_break % best.len()])
}

/// See the module doc.
pub(crate) fn cost(candidate: &Candidate, prompt_tokens: usize) -> f64 {
    let cached = candidate
        .matched_blocks
        .saturating_mul(candidate.block_size);
    let prefill = prompt_tokens.saturating_sub(cached);
    candidate.outstanding_tokens as f64
        + prefill as f64
        + candidate.kv_usage.clamp(0.0, 1.0) * KV_PRESSURE_TOKENS
}

/// Work a request adds to its group's `outstanding_tokens` while it runs.
pub(crate) fn request_work(
    prompt_tokens: usize,
    matched_blocks: usize,
    block_size: usize,
    max_new_tokens: u32,
) -> u64 {
    let prefill = prompt_tokens.saturating_sub(matched_blocks.saturating_mul(block_size));
    prefill as u64 + u64::from(max_new_tokens).min(EXPECTED_DECODE_CAP)
}

/// How many leading prompt block hashes the group holds. Hashes are chained, so the first
/// miss ends the shared prefix.
pub(crate) fn matched_blocks(
    prompt_hashes: &[u64],
    cached: &std::collections::HashSet<u64>,
) -> usize {
    prompt_hashes
        .iter()
        .take_while(|hash| cached.contains(hash))
        .count()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn idle() -> Candidate {
        Candidate {
            health: Health::Healthy,
            tried: false,
            outstanding_requests: 0,
            outstanding_tokens: 0,
            kv_usage: 0.0,
            matched_blocks: 0,
            block_size: 16,
        }
    }

    #[test]
    fn least_outstanding_work_wins() {
        let busy = Candidate {
            outstanding_requests: 3,
            outstanding_tokens: 900,
            ..idle()
        };
        let light = Candidate {
            outstanding_requests: 5,
            outstanding_tokens: 300,
            ..idle()
        };
        // Work, not request count, decides.
        assert_eq!(choose(&[busy, light], 100, 64, 0), Choice::Group(1));
    }

    #[test]
    fn ties_rotate_so_idle_groups_share_load() {
        let groups = [idle(), idle(), idle()];
        let picks: Vec<Choice> = (0..3).map(|t| choose(&groups, 50, 8, t)).collect();
        assert_eq!(
            picks,
            [Choice::Group(0), Choice::Group(1), Choice::Group(2)]
        );
    }

    #[test]
    fn prefix_affinity_wins_when_load_is_similar() {
        // 320-token prompt; group 1 holds its first 16 blocks (256 tokens).
        let plain = Candidate {
            outstanding_tokens: 100,
            ..idle()
        };
        let cached = Candidate {
            outstanding_tokens: 200,
            matched_blocks: 16,
            ..idle()
        };
        assert_eq!(
            choose(&[plain.clone(), cached.clone()], 320, 64, 0),
            Choice::Group(1)
        );
        // The same cache hit loses once the cached group's extra work exceeds the saving.
        let overloaded_cached = Candidate {
            outstanding_tokens: 100 + 256 + 1,
            ..cached
        };
        assert_eq!(
            choose(&[plain, overloaded_cached], 320, 64, 0),
            Choice::Group(0)
        );
    }

    #[test]
    fn kv_pressure_counts_as_work() {
        let full = Candidate {
            kv_usage: 0.95,
            ..idle()
        };
        let empty = Candidate {
            outstanding_tokens: 1000,
            ..idle()
        };
        // 0.95 * 2048 = 1945.6 > 1000.
        assert_eq!(choose(&[full, empty], 10, 64, 0), Choice::Group(1));
    }

    #[test]
    fn unhealthy_and_tried_groups_are_skipped() {
        let sick = Candidate {
            health: Health::Unhealthy,
            ..idle()
        };
        let tried = Candidate {
            tried: true,
            ..idle()
        };
        let unknown = Candidate {
            health: Health::Unknown,
            outstanding_tokens: 10_000,
            ..idle()
        };
        assert_eq!(
            choose(&[sick.clone(), tried.clone(), unknown], 10, 64, 0),
            Choice::Group(2)
        );
        assert_eq!(choose(&[sick, tried], 10, 64, 0), Choice::NoWorkers);
        assert_eq!(choose(&[], 10, 64, 0), Choice::NoWorkers);
    }

    #[test]
    fn full_groups_mean_overloaded_not_no_workers() {
        let full = Candidate {
            outstanding_requests: 4,
            ..idle()
        };
        assert_eq!(
            choose(&[full.clone(), full.clone()], 10, 4, 0),
            Choice::Overloaded
        );
        // One slot left anywhere is enough.
        let almost = Candidate {
            outstanding_requests: 3,
            outstanding_tokens: 1 << 40,
            ..idle()
        };
        assert_eq!(choose(&[full, almost], 10, 4, 0), Choice::Group(1));
    }

    #[test]
    fn matching_stops_at_the_first_missing_block() {
        let prompt = [11, 12, 13, 14];
        let cached: HashSet<u64> = [11, 12, 14].into_iter().collect();
        assert_eq!(matched_blocks(&prompt, &cached), 2);
        assert_eq!(matched_blocks(&prompt, &HashSet::new()), 0);
        assert_eq!(matched_blocks(&[], &cached), 0);
    }

    #[test]
    fn request_work_discounts_cache_and_caps_decode() {
        assert_eq!(request_work(100, 2, 16, 10), 68 + 10);
        assert_eq!(request_work(100, 0, 16, 100_000), 100 + EXPECTED_DECODE_CAP);
        // A cache summary longer than the prompt cannot make work negative.
        assert_eq!(request_work(10, 5, 16, 0), 0);
    }
}
