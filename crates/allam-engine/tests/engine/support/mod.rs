//! Shared helpers of the engine tests: fixture paths, building `ValidRequest`s, draining
//! streams, and `FakeKvModel`, a stand-in model that keeps token ids in a paged "KV cache"
//! so that any block-table or slot mistake changes its output.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use allam_backend::{StepBatch, PAD_SLOT};
use allam_engine::{
    Engine, EngineConfig, EngineHandle, EventStream, ExecutorError, ModelInfo, StepExecutor,
    StepOutput, StepSampling,
};
use allam_request::{validate, Limits, PromptInput, RawRequest, RawSamplingParams, ValidRequest};
use allam_tokenizer::Tokenizer;
use allam_types::{EngineEvent, FinishReason, StepLogprobs, TokenId, Usage};

/// `$ALLAM_FIXTURES`, else `<workspace>/../shared/fixtures`; panics loudly if missing.
pub fn fixtures_dir() -> PathBuf {
    let dir = match std::env::var_os("ALLAM_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"),
    };
    assert!(
        dir.join("tokenizer.json").is_file(),
        "test fixtures not found at {} (set ALLAM_FIXTURES)",
        dir.display()
    );
    dir
}

pub fn tokenizer() -> Tokenizer {
    let dir = fixtures_dir().join("tiny-allam");
    Tokenizer::from_dir(&dir).expect("fixture tokenizer loads")
}

/// Greedy, `max_new` tokens, eos ignored unless the test says otherwise.
pub fn greedy(max_new: i64) -> RawSamplingParams {
    RawSamplingParams {
        do_sample: Some(false),
        temperature: Some(0.0),
        max_new_tokens: Some(max_new),
        ignore_eos: Some(true),
        ..RawSamplingParams::default()
    }
}

pub fn valid(tokenizer: &Tokenizer, ids: &[TokenId], params: RawSamplingParams) -> ValidRequest {
    let raw = RawRequest {
        input: PromptInput::TokenIds(ids.to_vec()),
        params,
        model: None,
    };
    validate(raw, &Limits::default(), tokenizer).expect("test request is valid")
}

/// Everything one request produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Generated ids per sequence index.
    pub ids: Vec<Vec<TokenId>>,
    /// Concatenated delta texts per sequence index.
    pub texts: Vec<String>,
    pub ends: Vec<Option<(FinishReason, String, Vec<TokenId>)>>,
    pub logprobs: Vec<Vec<StepLogprobs>>,
    pub prompt_logprobs: Option<Vec<Option<StepLogprobs>>>,
    pub usage: Option<Usage>,
    pub failed: Option<(String, String)>,
}

/// Reads a stream to its terminal event, checking the documented event order.
pub fn collect(stream: &mut EventStream) -> Outcome {
    outcome(std::iter::from_fn(|| stream.blocking_next()))
}

/// A submitted request whose first events were read early (staggered arrival).
pub struct Started {
    pub stream: EventStream,
    pub seen: Vec<EngineEvent>,
}

impl Started {
    /// Reads until the first token (or the end) arrived.
    pub fn until_first_token(mut stream: EventStream) -> Started {
        let mut seen = Vec::new();
        while let Some(event) = stream.blocking_next() {
            let done = !matches!(
                event,
                EngineEvent::Started { .. } | EngineEvent::PromptLogprobs(_)
            );
            seen.push(event);
            if done {
                break;
            }
        }
        Started { stream, seen }
    }

    pub fn finish(mut self) -> Outcome {
        let seen = std::mem::take(&mut self.seen);
        let stream = &mut self.stream;
        outcome(
            seen.into_iter()
                .chain(std::iter::from_fn(|| stream.blocking_next())),
        )
    }
}

/// Folds events into an `Outcome`, checking the documented event order.
pub fn outcome(events: impl Iterator<Item = EngineEvent>) -> Outcome {
    let mut out = Outcome {
        ids: Vec::new(),
        texts: Vec::new(),
        ends: Vec::new(),
        logprobs: Vec::new(),
        prompt_logprobs: None,
        usage: None,
        failed: None,
    };
    let mut started = false;
    let grow = |out: &mut Outcome, index: usize| {
        while out.ids.len() <= index {
            out.ids.push(Vec::new());
            out.texts.push(String::new());
            out.ends.push(None);
            out.logprobs.push(Vec::new());
        }
    };
    for event in events {
        match event {
            EngineEvent::Started { .. } => {
                assert!(!started, "Started twice");
                started = true;
            }
            EngineEvent::PromptLogprobs(lp) => {
                assert!(
                    started && out.ids.is_empty(),
                    "PromptLogprobs before any delta"
                );
                assert!(out.prompt_logprobs.is_none(), "PromptLogprobs twice");
                out.prompt_logprobs = Some(lp);
            }
            EngineEvent::Delta(delta) => {
                assert!(started, "Delta before Started");
                let i = delta.index as usize;
                grow(&mut out, i);
                assert!(out.ends[i].is_none(), "Delta after SequenceEnd");
                out.ids[i].extend(&delta.token_ids);
                out.texts[i].push_str(&delta.text);
                out.logprobs[i].extend(delta.logprobs);
            }
            EngineEvent::SequenceEnd(end) => {
                let i = end.index as usize;
                grow(&mut out, i);
                assert!(out.ends[i].is_none(), "SequenceEnd twice");
                out.ends[i] = Some((end.finish_reason, end.text, end.token_ids));
            }
            EngineEvent::Finished { usage, .. } => {
                assert!(
                    out.ends.iter().all(Option::is_some),
                    "Finished before every end"
                );
                out.usage = Some(usage);
            }
            EngineEvent::Failed { reason, message } => {
                out.failed = Some((reason.to_owned(), message));
            }
        }
    }
    out
}

/// Waits (polling against a deadline, never a fixed sleep) until `cond` holds.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// After every stream ended: nothing runs, nothing waits, every block is free.
pub fn assert_pool_full(handle: &EngineHandle) {
    wait_until("the engine to settle", || {
        let s = handle.stats();
        s.running == 0 && s.waiting == 0 && s.kv_blocks_used == 0
    });
}

/// A model whose "KV cache" stores each token id and position, and whose logits are a hash
/// of the context it reads back through the block table. Wrong block tables, slots,
/// positions or a corrupted shared block change the logits (or fail the step).
pub struct FakeKvModel {
    slots: Vec<Option<(TokenId, u32)>>,
    vocab: usize,
    /// When set, `execute` fails (to test the engine's failure path).
    pub fail: Arc<AtomicBool>,
    pub gate: Arc<Gate>,
}

/// Lets a test hold the engine inside `execute` (to fill the queue deterministically).
#[derive(Default)]
pub struct Gate {
    closed: Mutex<bool>,
    opened: Condvar,
    /// Steps that entered `execute`.
    pub entered: AtomicUsize,
}

impl Gate {
    pub fn close(&self) {
        *self.closed.lock().expect("gate lock") = true;
    }
    pub fn open(&self) {
        *self.closed.lock().expect("gate lock") = false;
        self.opened.notify_all();
    }
    fn pass(&self) {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let mut closed = self.closed.lock().expect("gate lock");
        while *closed {
            closed = self.opened.wait(closed).expect("gate lock");
        }
    }
}

pub const FAKE_VOCAB: usize = 4000;

impl FakeKvModel {
    pub fn new(num_blocks: usize, block_size: usize) -> FakeKvModel {
        FakeKvModel {
            slots: vec![None; num_blocks * block_size],
            vocab: FAKE_VOCAB,
            fail: Default::default(),
            gate: Default::default(),
        }
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The fake model's logits given a whole context (the reference the engine must reproduce).
pub fn fake_logits(context: &[TokenId], vocab: usize) -> Vec<f32> {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &t in context {
        h = splitmix(h ^ u64::from(t));
    }
    (0..vocab as u64)
        .map(|v| {
            let x = splitmix(h ^ v.wrapping_mul(0x1000_0000_01b3));
            // Token 2 (eos) gets a low logit so greedy runs rarely stop early.
            let logit = (x >> 40) as f32 / (1u64 << 24) as f32 * 8.0 - 4.0;
            if v == 2 {
                logit - 10.0
            } else {
                logit
            }
        })
        .collect()
}

impl StepExecutor for FakeKvModel {
    fn execute(
        &mut self,
        batch: &StepBatch,
        sampling: &StepSampling,
    ) -> Result<StepOutput, ExecutorError> {
        self.gate.pass();
        if self.fail.load(Ordering::SeqCst) {
            return Err("injected device fault".into());
        }
        let num_blocks = self.slots.len() / batch.block_size as usize;
        batch.validate(num_blocks)?;
        for (t, &slot) in batch.slot_mapping.iter().enumerate() {
            if slot != PAD_SLOT {
                self.slots[slot as usize] = Some((batch.token_ids[t], batch.positions[t]));
            }
        }
        let bs = batch.block_size as usize;
        let mut logits = Vec::with_capacity(batch.logits_rows.len() * self.vocab);
        for &row in &batch.logits_rows {
            let seq = batch
                .seqs
                .iter()
                .find(|s| row >= s.query_start && row < s.query_start + s.query_len)
                .ok_or("logits row outside every sequence")?;
            if batch.slot_mapping[row as usize] == PAD_SLOT {
                // A padding row (graph warm-up): it has no context to check.
                logits.extend(fake_logits(&[batch.token_ids[row as usize]], self.vocab));
                continue;
            }
            let pos = batch.positions[row as usize] as usize;
            let mut context = Vec::with_capacity(pos + 1);
            for q in 0..=pos {
                let slot = seq.block_table[q / bs] as usize * bs + q % bs;
                match self.slots[slot] {
                    Some((token, p)) if p as usize == q => context.push(token),
                    other => {
                        return Err(format!("slot {slot} for position {q} holds {other:?}").into())
                    }
                }
            }
            logits.extend(fake_logits(&context, self.vocab));
        }
        Ok(StepOutput::from_host_logits(&logits, sampling))
    }
}

/// The greedy continuation the fake model implies (argmax, lowest id on ties).
pub fn fake_greedy(prompt: &[TokenId], max_new: usize) -> Vec<TokenId> {
    let mut context = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..max_new {
        let logits = fake_logits(&context, FAKE_VOCAB);
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        out.push(best as TokenId);
        context.push(best as TokenId);
    }
    out
}

pub fn start_fake(config: EngineConfig, num_blocks: usize) -> (EngineHandle, FakeHooks) {
    let model = FakeKvModel::new(num_blocks, config.block_size);
    let hooks = FakeHooks {
        fail: model.fail.clone(),
        gate: model.gate.clone(),
    };
    let info = ModelInfo {
        vocab_size: FAKE_VOCAB,
        max_context: 4096,
        eos_token_ids: vec![2],
        block_size: config.block_size,
        num_blocks,
    };
    let handle = Engine::start_with_executor(Box::new(model), info, tokenizer(), config)
        .expect("engine starts");
    (handle, hooks)
}

pub struct FakeHooks {
    pub fail: Arc<AtomicBool>,
    pub gate: Arc<Gate>,
}
