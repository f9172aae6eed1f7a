//! Every Prometheus metric name, so that router, worker and engine agree and dashboards
//! can rely on them. Rules: `allam_` prefix, `_total` only on counters, units as suffixes.
//! Labels: `group` (worker group), `reason` (a stable `Error::reason()` label), `api`.

// Router / HTTP front.
pub const REQUESTS_TOTAL: &str = "allam_requests_total";
pub const REQUEST_SUCCESSES_TOTAL: &str = "allam_request_successes_total";
pub const REQUEST_FAILURES_TOTAL: &str = "allam_request_failures_total";
pub const REQUEST_DURATION_SECONDS: &str = "allam_request_duration_seconds";
/// Histogram of prompt tokens per successful request, labelled `api` (the HTTP/gRPC front).
/// Token *counters* are the engine's ([`PROMPT_TOKENS_TOTAL`]); a front counting them too would
/// double them when router and worker share a process.
pub const REQUEST_PROMPT_TOKENS: &str = "allam_request_prompt_tokens";
/// Histogram of generated tokens per successful request (all `n` choices), labelled `api`.
pub const REQUEST_GENERATION_TOKENS: &str = "allam_request_generation_tokens";
pub const ROUTER_RETRIES_TOTAL: &str = "allam_router_retries_total";
pub const WORKER_GROUPS: &str = "allam_worker_groups";
// Per worker group, labelled `group`, as the router last saw it (set at each `/metrics` scrape
// of the router from `Router::groups()`; a worker's own engine gauges have no `group` label).
/// 1 when the group answered its last load poll, else 0.
pub const WORKER_GROUP_HEALTHY: &str = "allam_worker_group_healthy";
/// Requests this router has in flight on the group.
pub const WORKER_GROUP_OUTSTANDING_REQUESTS: &str = "allam_worker_group_outstanding_requests";
pub const WORKER_GROUP_RUNNING_REQUESTS: &str = "allam_worker_group_running_requests";
pub const WORKER_GROUP_WAITING_REQUESTS: &str = "allam_worker_group_waiting_requests";
pub const WORKER_GROUP_KV_CACHE_USAGE_RATIO: &str = "allam_worker_group_kv_cache_usage_ratio";

// Engine (worker).
pub const QUEUE_DURATION_SECONDS: &str = "allam_queue_duration_seconds";
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "allam_time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY_SECONDS: &str = "allam_inter_token_latency_seconds";
pub const PROMPT_TOKENS_TOTAL: &str = "allam_prompt_tokens_total";
pub const GENERATED_TOKENS_TOTAL: &str = "allam_generated_tokens_total";
pub const RUNNING_REQUESTS: &str = "allam_running_requests";
pub const WAITING_REQUESTS: &str = "allam_waiting_requests";
pub const BATCH_SIZE: &str = "allam_batch_size";
pub const KV_CACHE_USAGE_RATIO: &str = "allam_kv_cache_usage_ratio";
pub const PREFIX_CACHE_HIT_RATIO: &str = "allam_prefix_cache_hit_ratio";
pub const PREFIX_CACHE_QUERIED_TOKENS_TOTAL: &str = "allam_prefix_cache_queried_tokens_total";
pub const PREFIX_CACHE_HIT_TOKENS_TOTAL: &str = "allam_prefix_cache_hit_tokens_total";
pub const PREEMPTIONS_TOTAL: &str = "allam_preemptions_total";
/// Requests not scheduled because their reader left no room in their event buffer.
pub const PAUSED_REQUESTS: &str = "allam_paused_requests";
/// Streams ended with `client_too_slow` by `hop`: `engine` (paused past the stream write
/// timeout) or `router` (its buffer towards the client stayed full that long).
pub const CLIENT_TOO_SLOW_TOTAL: &str = "allam_client_too_slow_total";
pub const STEP_DURATION_SECONDS: &str = "allam_step_duration_seconds";
/// Sampled logits rows by `path`: `backend` (picked where the logits are, a kernel on a GPU)
/// or `host` (penalties, min-p, masked eos, the `n > 1` fork: the row's logits were copied
/// out). A growing `host` share on a GPU means requests are paying for host sampling.
pub const SAMPLED_ROWS_TOTAL: &str = "allam_sampled_rows_total";
