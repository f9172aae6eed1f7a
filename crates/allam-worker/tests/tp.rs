//! Tensor-parallel groups whose followers are real processes: this test binary re-runs itself
//! (`std::env::current_exe`, entry test `tp_rank_process`) as ranks 1..N, chosen by
//! environment variables, exactly as `allam serve --tp N` starts `allam worker` children.
//! Checked: the goldens' greedy ids and TP 1's logits at TP 2 and 4 for both fixture models,
//! each rank's share of the weights, the engine on top of a group, a follower killed
//! mid-generation, and a follower outliving its leader.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use allam_backend::{KvCache, RowSampling, StepBatch};
use allam_backend_cpu::{CpuBackend, CpuBackendConfig};
use allam_comm::{join, GroupOptions, LeaderGroup, Rendezvous};
use allam_engine::{
    run_model_step, EngineConfig, ExecutorError, StepExecutor, StepOutput, StepSampling,
};
use allam_model::{LoadOptions, Model, ProgressMode};
use allam_request::{validate, Limits, PromptInput, RawRequest, RawSamplingParams};
use allam_tokenizer::Tokenizer;
use allam_types::EngineEvent;
use allam_worker::tp::{
    report_follower_failure, run_follower, start_leader_engine, FollowerProcesses, TpLeader,
};
use serde_json::Value;

const RANK_ENV: &str = "ALLAM_TP_TEST_RANK";
const WORLD_ENV: &str = "ALLAM_TP_TEST_WORLD";
const ADDR_ENV: &str = "ALLAM_TP_TEST_ADDR";
const MODEL_ENV: &str = "ALLAM_TP_TEST_MODEL";
const ENTRY: &str = "tp_rank_process";
const GROUP: &str = "tp-test";
/// A follower's exit code when `run_follower` fails (a panic would be 101).
const FOLLOWER_ERROR_EXIT: i32 = 3;

const BLOCK_SIZE: usize = 16;
/// Blocks reserved per sequence: 48 x 16 = 768 tokens covers the 619-token prompt + 24.
const BLOCKS_PER_SEQ: usize = 48;
const NUM_BLOCKS: usize = 7 * BLOCKS_PER_SEQ;
/// Prompt tokens per prefill step (chunks of the long case mix with decodes).
const CHUNK: usize = 64;
/// TP N vs TP 1 logits (only the summation order differs).
const TP_TOL: f32 = 1e-4;
const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(20);

fn fixtures() -> PathBuf {
    let dir = std::env::var_os("ALLAM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
        });
    assert!(
        dir.join("tiny-allam/config.json").is_file(),
        "test fixtures not found at {} (set ALLAM_FIXTURES)",
        dir.display()
    );
    dir
}

fn options() -> GroupOptions {
    GroupOptions {
        collective_timeout: COLLECTIVE_TIMEOUT,
        rendezvous_timeout: Duration::from_secs(120),
    }
}

fn backend_config() -> CpuBackendConfig {
    CpuBackendConfig {
        threads: Some(1),
        kv_cache_budget_bytes: 256 << 20,
    }
}

fn quiet() -> LoadOptions {
    LoadOptions {
        progress: ProgressMode::Never,
        ..LoadOptions::default()
    }
}

/// The child side: one follower rank, as `allam worker` runs it.
fn follower_main() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} unset"));
    let rank: usize = var(RANK_ENV).parse().expect("rank");
    let world: usize = var(WORLD_ENV).parse().expect("world");
    let group = join(&var(ADDR_ENV), GROUP, rank, world, options()).expect("join the group");
    let mut control = group.control;
    let mut backend =
        CpuBackend::with_communicator(&backend_config(), group.communicator).expect("backend");
    let model = match Model::load(&PathBuf::from(var(MODEL_ENV)), &mut backend, &quiet()) {
        Ok(model) => model,
        Err(e) => {
            report_follower_failure(&mut control, &e.to_string());
            eprintln!("rank {rank}: {e}");
            std::process::exit(FOLLOWER_ERROR_EXIT);
        }
    };
    if let Err(e) = run_follower(model, Box::new(backend), control) {
        eprintln!("rank {rank}: {e}");
        std::process::exit(FOLLOWER_ERROR_EXIT);
    }
}

fn follower_command(rank: usize, world: usize, addr: &str, model_dir: &PathBuf) -> Command {
    let exe = std::env::current_exe().expect("test binary path");
    let mut command = Command::new(exe);
    command
        .args(["--exact", ENTRY, "--nocapture", "--test-threads=1"])
        .env(RANK_ENV, rank.to_string())
        .env(WORLD_ENV, world.to_string())
        .env(ADDR_ENV, addr)
        .env(MODEL_ENV, model_dir)
        .stdout(Stdio::null());
    command
}

/// Rank 0's group with ranks 1..world running as processes.
fn start_group(
    model_name: &str,
    world: usize,
    stderr: impl Fn() -> Stdio,
) -> (LeaderGroup, FollowerProcesses) {
    start_group_with(model_name, world, stderr)
}

/// [`start_group`] with the followers loading `follower_model`.
fn start_group_with(
    follower_model: &str,
    world: usize,
    stderr: impl Fn() -> Stdio,
) -> (LeaderGroup, FollowerProcesses) {
    let dir = fixtures().join(follower_model);
    let rendezvous = Rendezvous::bind("127.0.0.1:0", GROUP, world, options()).expect("bind");
    let addr = rendezvous.local_addr().expect("addr").to_string();
    let followers = FollowerProcesses::spawn(world, |rank| {
        let mut command = follower_command(rank, world, &addr, &dir);
        command.stderr(stderr());
        command
    })
    .expect("spawn followers");
    let group = rendezvous.accept().expect("the group assembles");
    (group, followers)
}

fn load_leader(model_name: &str, group: &LeaderGroup) -> (Model, CpuBackend) {
    let mut backend = CpuBackend::with_communicator(&backend_config(), group.communicator.clone())
        .expect("backend");
    let model = Model::load(&fixtures().join(model_name), &mut backend, &quiet()).expect("load");
    (model, backend)
}

/// A plain one-process executor: the TP 1 reference.
struct Solo {
    model: Model,
    backend: CpuBackend,
    kv: KvCache,
}

impl Solo {
    fn new(model_name: &str) -> Solo {
        let mut backend = CpuBackend::new(&CpuBackendConfig {
            threads: Some(2),
            ..backend_config()
        })
        .expect("backend");
        let model =
            Model::load(&fixtures().join(model_name), &mut backend, &quiet()).expect("load");
        let kv = model
            .alloc_kv_cache(&mut backend, NUM_BLOCKS, BLOCK_SIZE)
            .expect("kv");
        Solo { model, backend, kv }
    }
}

impl StepExecutor for Solo {
    fn execute(
        &mut self,
        batch: &StepBatch,
        sampling: &StepSampling,
    ) -> Result<StepOutput, ExecutorError> {
        Ok(run_model_step(
            &self.model,
            &mut self.backend,
            &mut self.kv,
            batch,
            sampling,
        )?)
    }
}

struct Case {
    id: String,
    input_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
}

fn cases(model_name: &str) -> Vec<Case> {
    let path = fixtures().join(model_name).join("goldens.json");
    let text = std::fs::read_to_string(&path).expect("goldens.json");
    let root: Value = serde_json::from_str(&text).expect("goldens JSON");
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    };
    root["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            id: c["id"].as_str().expect("id").to_owned(),
            input_ids: ids(&c["input_ids"]),
            greedy_ids: ids(&c["greedy"]["ids"]),
        })
        .collect()
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// All cases batched: `CHUNK`-token prefill chunks, then greedy decodes, through `exec`.
/// Returns each case's last-prompt-position logits and its generated ids.
fn generate(
    exec: &mut dyn StepExecutor,
    vocab: usize,
    cases: &[Case],
) -> Vec<(Vec<f32>, Vec<u32>)> {
    let mut tokens: Vec<Vec<u32>> = cases.iter().map(|c| c.input_ids.clone()).collect();
    let mut computed = vec![0usize; cases.len()];
    let mut out: Vec<(Vec<f32>, Vec<u32>)> = vec![(Vec::new(), Vec::new()); cases.len()];
    loop {
        let mut batch = StepBatch {
            block_size: BLOCK_SIZE as u32,
            ..StepBatch::default()
        };
        let mut sampling = Vec::new();
        for (i, case) in cases.iter().enumerate() {
            if out[i].1.len() >= case.greedy_ids.len() {
                continue;
            }
            let prompt_len = case.input_ids.len();
            let end = if computed[i] < prompt_len {
                (computed[i] + CHUNK).min(prompt_len)
            } else {
                computed[i] + 1
            };
            let table: Vec<u32> = (0..end.div_ceil(BLOCK_SIZE))
                .map(|b| (i * BLOCKS_PER_SEQ + b) as u32)
                .collect();
            let rows = batch.push_seq(&tokens[i][computed[i]..end], end as u32, table);
            if end >= prompt_len {
                batch.logits_rows.push(rows.end - 1);
                sampling.push(i);
            }
            computed[i] = end;
        }
        if batch.seqs.is_empty() {
            return out;
        }
        // A sequence's first row comes back as logits (compared with the goldens); later
        // rows are sampled greedily by the backend, so both step shapes are exercised.
        let plan = StepSampling {
            rows: sampling
                .iter()
                .map(|&i| (!out[i].1.is_empty()).then(RowSampling::greedy))
                .collect(),
            logprobs: None,
        };
        let output = exec.execute(&batch, &plan).expect("step");
        assert_eq!(output.sampled.len(), sampling.len());
        let mut host_rows = output.logits.chunks_exact(vocab);
        for (r, &i) in sampling.iter().enumerate() {
            let next = match &output.sampled[r] {
                Some(pick) => pick.token,
                None => {
                    let row = host_rows.next().expect("a row asked for logits");
                    out[i].0 = row.to_vec();
                    argmax(row)
                }
            };
            out[i].1.push(next);
            tokens[i].push(next);
        }
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Rank 0 of a world-size-1 group (no followers) computes exactly what the plain model
/// does. Re-run with `ALLAM_TP_TEST_RANK` set, this is the entry point of follower ranks.
#[test]
fn tp_rank_process() {
    if std::env::var_os(RANK_ENV).is_some() {
        follower_main();
        return;
    }
    let model_name = "tiny-allam-gqa";
    let rendezvous = Rendezvous::bind("127.0.0.1:0", GROUP, 1, options()).expect("bind");
    let group = rendezvous.accept().expect("a group of one");
    let (model, backend) = load_leader(model_name, &group);
    let mut leader = TpLeader::new(
        model,
        Box::new(backend),
        group.control,
        NUM_BLOCKS,
        BLOCK_SIZE,
        Duration::from_secs(10),
    )
    .expect("leader");
    let cases = &cases(model_name)[..2];
    let vocab = leader.model().config().vocab_size;
    let tp = generate(&mut leader, vocab, cases);
    let solo = generate(&mut Solo::new(model_name), vocab, cases);
    assert!(tp == solo, "world size 1 must be bit-identical to no group");
    assert!(leader.health().is_healthy());
}

#[test]
fn tp_2_and_4_processes_give_the_golden_ids_tp_1_logits_and_1_nth_of_the_weights() {
    for model_name in ["tiny-allam", "tiny-allam-gqa"] {
        let cases = cases(model_name);
        let mut solo = Solo::new(model_name);
        let vocab = solo.model.config().vocab_size;
        let solo_weight_bytes = solo.model.weight_bytes();
        let reference = generate(&mut solo, vocab, &cases);
        for world in [2usize, 4] {
            let (group, mut followers) = start_group(model_name, world, Stdio::inherit);
            let (model, backend) = load_leader(model_name, &group);
            let mut leader = TpLeader::new(
                model,
                Box::new(backend),
                group.control,
                NUM_BLOCKS,
                BLOCK_SIZE,
                Duration::from_secs(120),
            )
            .expect("every rank starts");
            let results = generate(&mut leader, vocab, &cases);
            for ((case, (logits, ids)), (ref_logits, _)) in
                cases.iter().zip(&results).zip(&reference)
            {
                let tag = format!("{model_name} TP {world} {}", case.id);
                assert_eq!(ids, &case.greedy_ids, "{tag}: greedy ids");
                let diff = max_abs_diff(logits, ref_logits);
                assert!(
                    diff <= TP_TOL,
                    "{tag}: last logits differ from TP 1 by {diff}"
                );
            }
            let shares = leader.rank_weight_bytes().to_vec();
            assert_eq!(shares.len(), world);
            for (rank, bytes) in shares.iter().enumerate() {
                let share = *bytes as f64 / solo_weight_bytes as f64;
                // Norms are replicated, and at TP 4 the GQA model's 2 KV heads are too.
                assert!(
                    (share - 1.0 / world as f64).abs() < 0.05 / world as f64 + 0.01,
                    "{model_name} TP {world} rank {rank}: holds {share:.3} of the weights"
                );
            }
            drop(leader); // sends Shutdown
            for (rank, status) in followers.wait(Duration::from_secs(30)) {
                let status = status.unwrap_or_else(|| panic!("rank {rank} did not exit"));
                assert!(
                    status.success(),
                    "{model_name} TP {world} rank {rank}: {status}"
                );
            }
        }
    }
}

fn greedy_request(
    tokenizer: &Tokenizer,
    prompt: &[u32],
    max_new_tokens: i64,
) -> allam_request::ValidRequest {
    let raw = RawRequest {
        input: PromptInput::TokenIds(prompt.to_vec()),
        params: RawSamplingParams {
            do_sample: Some(false),
            max_new_tokens: Some(max_new_tokens),
            ignore_eos: Some(true),
            ..RawSamplingParams::default()
        },
        model: None,
    };
    validate(raw, &Limits::for_context(4096), tokenizer).expect("valid request")
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        num_blocks: Some(300),
        max_waiting: 8,
        ..EngineConfig::default()
    }
}

#[test]
fn an_engine_over_a_tp_group_generates_the_golden_ids_and_shuts_the_followers_down() {
    let model_name = "tiny-allam";
    let dir = fixtures().join(model_name);
    let tokenizer = Tokenizer::from_dir(&dir).expect("tokenizer");
    let (group, mut followers) = start_group(model_name, 2, Stdio::inherit);
    let (model, backend) = load_leader(model_name, &group);
    let tp = start_leader_engine(
        model,
        Box::new(backend),
        group.control,
        tokenizer.clone(),
        engine_config(),
        Duration::from_secs(120),
    )
    .expect("engine starts");
    let cases = cases(model_name);
    let picked = [&cases[0], &cases[5]];
    let streams: Vec<_> = picked
        .iter()
        .map(|case| {
            let request = greedy_request(&tokenizer, &case.input_ids, case.greedy_ids.len() as i64);
            (case, tp.engine.submit(request).expect("submit"))
        })
        .collect();
    for (case, mut stream) in streams {
        let mut ids = Vec::new();
        while let Some(event) = stream.blocking_next() {
            match event {
                EngineEvent::Delta(delta) => ids.extend(delta.token_ids),
                EngineEvent::Failed { message, .. } => panic!("{}: {message}", case.id),
                _ => {}
            }
        }
        assert_eq!(ids, case.greedy_ids, "{}", case.id);
    }
    assert!(tp.health.is_healthy());
    tp.engine.shutdown();
    for (rank, status) in followers.wait(Duration::from_secs(30)) {
        let status = status.unwrap_or_else(|| panic!("rank {rank} did not exit"));
        assert!(
            status.success(),
            "rank {rank} exits cleanly on shutdown: {status}"
        );
    }
}

#[test]
fn killing_a_follower_mid_generation_fails_the_request_within_the_timeout() {
    let model_name = "tiny-allam-gqa";
    let dir = fixtures().join(model_name);
    let tokenizer = Tokenizer::from_dir(&dir).expect("tokenizer");
    let (group, mut followers) = start_group(model_name, 4, Stdio::inherit);
    let (model, backend) = load_leader(model_name, &group);
    let tp = start_leader_engine(
        model,
        Box::new(backend),
        group.control,
        tokenizer.clone(),
        engine_config(),
        Duration::from_secs(120),
    )
    .expect("engine starts");
    let prompt = &cases(model_name)[0].input_ids;
    let mut stream = tp
        .engine
        .submit(greedy_request(&tokenizer, prompt, 2000))
        .expect("submit");
    let mut generated = 0;
    let killed_at = loop {
        match stream.blocking_next().expect("stream open") {
            EngineEvent::Delta(delta) => {
                generated += delta.token_ids.len();
                if generated >= 3 {
                    followers.kill(2).expect("kill rank 2");
                    break Instant::now();
                }
            }
            EngineEvent::Failed { message, .. } => panic!("failed before the kill: {message}"),
            _ => {}
        }
    };
    let (reason, message) = loop {
        match stream.blocking_next() {
            Some(EngineEvent::Failed { reason, message }) => break (reason, message),
            Some(EngineEvent::Finished { .. }) | None => panic!("the request outlived rank 2"),
            Some(_) => {}
        }
    };
    let waited = killed_at.elapsed();
    assert!(
        waited <= COLLECTIVE_TIMEOUT + Duration::from_secs(5),
        "failure took {waited:?}"
    );
    assert_eq!(reason, allam_engine::failure_reason::ENGINE_ERROR);
    assert!(message.contains("rank 2"), "{message}");
    let failure = tp.health.failure().expect("the group is marked unhealthy");
    assert!(failure.contains("rank 2"), "{failure}");
    // Later requests fail at once, without waiting on the broken group.
    let started = Instant::now();
    let mut next = tp
        .engine
        .submit(greedy_request(&tokenizer, prompt, 4))
        .expect("submit");
    let failed = std::iter::from_fn(|| next.blocking_next())
        .any(|e| matches!(e, EngineEvent::Failed { .. }));
    assert!(failed, "a request on a broken group fails");
    assert!(
        started.elapsed() < COLLECTIVE_TIMEOUT,
        "{:?}",
        started.elapsed()
    );
    // The other followers see rank 0 close the group and exit with an error at once, not
    // at their own collective timeouts, even though the engine (and rank 0) keep running.
    let statuses = followers.wait(Duration::from_secs(10));
    for (rank, status) in statuses.iter().filter(|(r, _)| *r != 2) {
        let status = status.unwrap_or_else(|| panic!("rank {rank} still runs"));
        assert_eq!(
            status.code(),
            Some(FOLLOWER_ERROR_EXIT),
            "rank {rank}: {status}"
        );
    }
    tp.engine.shutdown();
}

#[test]
fn a_follower_whose_leader_dies_exits_with_an_error_naming_rank_0() {
    let dir = fixtures().join("tiny-allam");
    let rendezvous = Rendezvous::bind("127.0.0.1:0", GROUP, 2, options()).expect("bind");
    let addr = rendezvous.local_addr().expect("addr").to_string();
    let mut child = follower_command(1, 2, &addr, &dir)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rank 1");
    let group = rendezvous.accept().expect("the group assembles");
    drop(group); // rank 0 "crashes" before sending Init
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("rank 1 outlived its leader by a minute");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("piped stderr"), &mut stderr)
        .expect("read stderr");
    assert_eq!(
        status.code(),
        Some(FOLLOWER_ERROR_EXIT),
        "{status}: {stderr}"
    );
    assert!(stderr.contains("rank 0"), "{stderr}");
}

#[test]
fn a_follower_with_another_model_fails_the_leaders_start_naming_its_rank() {
    let (group, mut followers) = start_group_with("tiny-allam-gqa", 2, Stdio::null);
    let (model, backend) = load_leader("tiny-allam", &group);
    let err = TpLeader::new(
        model,
        Box::new(backend),
        group.control,
        NUM_BLOCKS,
        BLOCK_SIZE,
        Duration::from_secs(120),
    )
    .err()
    .expect("the models differ");
    let msg = err.to_string();
    assert!(
        msg.contains("rank 1") && msg.contains("heads 8/8") && msg.contains("heads 8/2"),
        "{msg}"
    );
    let status = followers.wait(Duration::from_secs(30))[0].1;
    assert_eq!(status.and_then(|s| s.code()), Some(FOLLOWER_ERROR_EXIT));
}

#[test]
fn a_bad_batch_fails_alone_and_the_group_goes_on() {
    let model_name = "tiny-allam";
    let (group, mut followers) = start_group(model_name, 2, Stdio::inherit);
    let (model, backend) = load_leader(model_name, &group);
    let mut leader = TpLeader::new(
        model,
        Box::new(backend),
        group.control,
        NUM_BLOCKS,
        BLOCK_SIZE,
        Duration::from_secs(120),
    )
    .expect("every rank starts");
    let mut batch = StepBatch {
        block_size: BLOCK_SIZE as u32,
        ..StepBatch::default()
    };
    batch.push_seq(&[1, 4000], 2, vec![0]);
    batch.logits_rows.push(1);
    let logits_row = StepSampling {
        rows: vec![None],
        logprobs: None,
    };
    let err = leader
        .execute(&batch, &logits_row)
        .expect_err("id 4000 of 4000");
    assert!(err.to_string().contains("token id 4000"), "{err}");
    let mut far_block = batch.clone();
    far_block.token_ids[1] = 5;
    far_block.seqs[0].block_table = vec![NUM_BLOCKS as u32];
    far_block.slot_mapping = vec![
        (NUM_BLOCKS * BLOCK_SIZE) as u32,
        (NUM_BLOCKS * BLOCK_SIZE + 1) as u32,
    ];
    assert!(
        leader.execute(&far_block, &logits_row).is_err(),
        "block outside the cache"
    );
    assert!(leader.health().is_healthy(), "rejected before broadcast");
    let case = &cases(model_name)[0];
    let ids = generate(&mut leader, 4000, std::slice::from_ref(case));
    assert_eq!(ids[0].1, case.greedy_ids);
    drop(leader);
    let status = followers.wait(Duration::from_secs(30))[0].1;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}
