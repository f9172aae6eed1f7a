//! `Router`: validate, pick a group, run the request there (retrying once elsewhere before the
//! first token), and hand the caller a [`GenerationStream`].
//!
//! Invariants:
//! - Validation (template rendering, tokenizing) runs on `spawn_blocking`, never on a runtime
//!   worker thread (a long Arabic prompt must not stall other requests' streams).
//! - A request is tried on at most [`MAX_TRIES`] distinct groups, and only while nothing has
//!   reached the client.
//! - The deadline is the earlier of the client's and `request_timeout`; it bounds every wait
//!   here and travels to the worker as `grpc-timeout`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use allam_proto::worker::v1 as wpb;
use allam_request::{PromptInput, RawRequest};
use allam_types::prefix_hash::prefix_block_hashes;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use crate::attempt::{try_group, GenerationStream, TryError};
use crate::config::{GroupStatus, Membership, ModelInfo, RequestContext, RouterConfig};
use crate::convert::params_to_proto;
use crate::groups::{Group, GroupSettings, GroupTable};
use crate::policy::{choose, request_work, Choice};
use crate::{metrics, Error};

/// First try plus one retry on another group.
pub(crate) const MAX_TRIES: usize = 2;

/// The request router. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("model", &self.inner.config.model_name)
            .field("groups", &self.groups())
            .finish()
    }
}

struct Inner {
    config: RouterConfig,
    groups: GroupTable,
    /// Rotates ties between equally loaded groups.
    tie_break: AtomicUsize,
    next_request: AtomicU64,
    /// Distinguishes this router's request ids from other routers' in worker logs.
    instance: u32,
    /// Kept alive as long as the router: dropping it stops the etcd watch.
    membership: Option<allam_membership::MembershipWatcher>,
    _stop: DropGuard,
}

impl Router {
    /// Builds the router and starts following `membership`. Must run inside a tokio runtime.
    pub async fn new(config: RouterConfig, membership: Membership) -> Result<Router, Error> {
        if config.max_outstanding_per_group == 0 {
            return Err(Error::Internal(
                "router config: `max_outstanding_per_group` must be at least 1".into(),
            ));
        }
        let groups = GroupTable::new(GroupSettings {
            model_name: config.model_name.clone(),
            poll_interval: config.load_poll_interval,
            connect_timeout: config.worker_connect_timeout,
            max_cached_hashes: config.max_cached_hashes,
            worker_tls: config.worker_tls.clone(),
        });
        let stop = CancellationToken::new();
        let watcher = match membership {
            Membership::Static(members) => {
                groups.reconcile(&members);
                None
            }
            Membership::Etcd(watcher) => {
                groups.reconcile(&watcher.current());
                Some(watcher)
            }
        };
        let inner = Arc::new(Inner {
            config,
            groups,
            tie_break: AtomicUsize::new(0),
            next_request: AtomicU64::new(0),
            instance: rand::random(),
            membership: watcher,
            _stop: stop.clone().drop_guard(),
        });
        if let Some(watcher) = &inner.membership {
            let mut snapshots = watcher.subscribe();
            // The task holds only a Weak: dropping the last Router stops it (and `stop` too).
            let weak = Arc::downgrade(&inner);
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        changed = snapshots.changed() => {
                            if changed.is_err() {
                                return;
                            }
                        }
                    }
                    let Some(inner) = weak.upgrade() else { return };
                    let members = snapshots.borrow_and_update().clone();
                    inner.groups.reconcile(&members);
                }
            });
        }
        Ok(Router { inner })
    }

    /// Validates, routes and starts the request. Returns once the request has committed on a
    /// group (its first token, or its end), so every failure before that is an `Err` here and
    /// the caller can still answer with a proper status. Later failures arrive as one `Err`
    /// item in the stream. Dropping the stream cancels the request on the worker.
    pub async fn generate(
        &self,
        raw: RawRequest,
        ctx: RequestContext,
    ) -> Result<GenerationStream, Error> {
        let started = Instant::now();
        metrics::request_started(ctx.api);
        let span = tracing::info_span!("router.generate", api = ctx.api);
        allam_telemetry::set_span_parent(
            &span,
            allam_telemetry::extract_context_from_pairs(&ctx.trace_headers),
        );
        // With an OpenTelemetry layer installed the worker's parent is this span; without
        // one, the client's own headers are passed through unchanged.
        let forwarded = span.in_scope(allam_telemetry::current_trace_headers);
        let trace_headers = if forwarded.is_empty() {
            ctx.trace_headers.clone()
        } else {
            forwarded
        };
        let result = self
            .generate_inner(raw, &ctx, &trace_headers, started)
            .instrument(span)
            .await;
        if let Err(e) = &result {
            metrics::request_failed(ctx.api, e.reason());
        }
        result
    }

    async fn generate_inner(
        &self,
        raw: RawRequest,
        ctx: &RequestContext,
        trace_headers: &[(String, String)],
        started: Instant,
    ) -> Result<GenerationStream, Error> {
        let config = &self.inner.config;
        self.check_model(raw.model.as_deref())?;
        let deadline = match (ctx.deadline, config.request_timeout) {
            (Some(d), Some(t)) => Some(d.min(started + t)),
            (Some(d), None) => Some(d),
            (None, Some(t)) => Some(started + t),
            (None, None) => None,
        };
        let params = params_to_proto(&raw.params);
        let valid = self.validate(raw).await?;
        let prompt = valid.prompt_token_ids().to_vec();
        let max_new_tokens = valid.params().max_new_tokens;
        let request_id = format!(
            "{:08x}-{}",
            self.inner.instance,
            self.inner.next_request.fetch_add(1, Ordering::Relaxed)
        );
        let mut hashes_by_block_size: Vec<(usize, Vec<u64>)> = Vec::new();
        let mut tried: HashSet<String> = HashSet::new();
        let mut last_error: Option<Error> = None;
        for _ in 0..MAX_TRIES {
            let groups = self.inner.groups.snapshot();
            let candidates: Vec<_> = groups
                .iter()
                .map(|g| {
                    let hashes = hashes_for(&mut hashes_by_block_size, &prompt, g.block_size());
                    g.candidate(hashes, tried.contains(g.name()))
                })
                .collect();
            let tie_break = self.inner.tie_break.fetch_add(1, Ordering::Relaxed);
            let idx = match choose(
                &candidates,
                prompt.len(),
                config.max_outstanding_per_group,
                tie_break,
            ) {
                Choice::Group(idx) => idx,
                Choice::Overloaded => return Err(last_error.unwrap_or(Error::Overloaded)),
                Choice::NoWorkers => return Err(last_error.unwrap_or(Error::NoWorkers)),
            };
            let group: &Arc<Group> = &groups[idx];
            let candidate = &candidates[idx];
            tried.insert(group.name().to_string());
            let hashes = hashes_for(&mut hashes_by_block_size, &prompt, candidate.block_size);
            let work = request_work(
                prompt.len(),
                candidate.matched_blocks,
                candidate.block_size,
                max_new_tokens,
            );
            let inflight = group.begin(work, hashes);
            let request = wpb::WorkerGenerateRequest {
                prompt_token_ids: prompt.clone(),
                params: Some(params.clone()),
                request_id: request_id.clone(),
            };
            tracing::debug!(request_id, group = %group.name(), "routing request");
            match try_group(&inflight, request, trace_headers, deadline).await {
                Ok(committed) => {
                    return Ok(GenerationStream::new(
                        committed,
                        inflight,
                        deadline,
                        self.inner.config.stream_write_timeout,
                        metrics::Outcome::new(ctx.api, started),
                    ))
                }
                Err(TryError::Fatal(e)) => return Err(e),
                Err(TryError::Retry(e)) => {
                    tracing::warn!(request_id, group = %group.name(), error = %e, "try failed before the first token");
                    metrics::retried(e.reason());
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or(Error::NoWorkers))
    }

    /// The model named by a request must be ours (absent or empty = ours).
    fn check_model(&self, model: Option<&str>) -> Result<(), Error> {
        match model {
            None | Some("") => Ok(()),
            Some(name) if name == self.inner.config.model_name => Ok(()),
            Some(name) => Err(Error::Validation(
                allam_request::ValidationError::OutOfRange {
                    field: "model",
                    expected: format!(
                        "`{}` (the served model) or absent",
                        self.inner.config.model_name
                    ),
                    got: format!("`{name}`"),
                },
            )),
        }
    }

    async fn validate(&self, raw: RawRequest) -> Result<allam_request::ValidRequest, Error> {
        let config = &self.inner.config;
        let limits = config.limits.clone();
        let tokenizer = config.tokenizer.clone();
        let valid =
            tokio::task::spawn_blocking(move || allam_request::validate(raw, &limits, &tokenizer))
                .await
                .map_err(|e| Error::Internal(format!("validation task failed: {e}")))??;
        Ok(valid)
    }

    /// The token ids `input` becomes (chat template applied for chat input), as the workers
    /// would see them. Tokenizer work runs on `spawn_blocking`.
    pub async fn tokenize(&self, input: PromptInput) -> Result<Vec<u32>, Error> {
        // Through `validate` itself, so Tokenize can never disagree with what Generate feeds
        // the model (template, bos, character and context limits).
        let raw = RawRequest {
            input,
            params: allam_request::RawSamplingParams::default(),
            model: None,
        };
        Ok(self.validate(raw).await?.prompt_token_ids().to_vec())
    }

    pub fn model_info(&self) -> ModelInfo {
        let config = &self.inner.config;
        ModelInfo {
            name: config.model_name.clone(),
            max_context: config.limits.max_context,
            vocab_size: u32::try_from(config.tokenizer.vocab_size()).unwrap_or(u32::MAX),
        }
    }

    /// At least one worker group answered its last `Load`.
    pub fn ready(&self) -> bool {
        self.inner.groups.is_ready()
    }

    /// Readiness changes, for health services.
    pub fn ready_watch(&self) -> watch::Receiver<bool> {
        self.inner.groups.ready()
    }

    pub fn groups(&self) -> Vec<GroupStatus> {
        self.inner
            .groups
            .snapshot()
            .iter()
            .map(|g| g.status())
            .collect()
    }

    /// `Ok` when no keys are configured or `key` is one of them (compared in constant time).
    pub fn check_api_key(&self, key: Option<&str>) -> Result<(), Error> {
        let keys = &self.inner.config.api_keys;
        if keys.is_empty() {
            return Ok(());
        }
        let Some(key) = key else {
            return Err(Error::Unauthenticated);
        };
        // Check every key without short-circuiting, so timing says nothing about which
        // prefix matched.
        let mut ok = false;
        for candidate in keys {
            ok |= constant_time_eq(candidate.as_bytes(), key.as_bytes());
        }
        if ok {
            Ok(())
        } else {
            Err(Error::Unauthenticated)
        }
    }

    pub fn model_name(&self) -> &str {
        &self.inner.config.model_name
    }
}

/// Prompt block hashes for a block size, computed once per size per request.
fn hashes_for<'a>(
    cache: &'a mut Vec<(usize, Vec<u64>)>,
    prompt: &[u32],
    block_size: usize,
) -> &'a [u64] {
    let idx = match cache.iter().position(|(size, _)| *size == block_size) {
        Some(idx) => idx,
        None => {
            cache.push((block_size, prefix_block_hashes(prompt, block_size)));
            cache.len() - 1
        }
    };
    &cache[idx].1
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_keys() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn block_hashes_are_cached_per_block_size() {
        let prompt: Vec<u32> = (0..40).collect();
        let mut cache = Vec::new();
        assert_eq!(
            hashes_for(&mut cache, &prompt, 16),
            prefix_block_hashes(&prompt, 16).as_slice()
        );
        assert_eq!(hashes_for(&mut cache, &prompt, 8).len(), 5);
        assert_eq!(hashes_for(&mut cache, &prompt, 16).len(), 2);
        assert_eq!(cache.len(), 2);
    }
}
