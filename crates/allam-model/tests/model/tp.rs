//! Tensor parallelism in one process: every rank is a thread with its own CPU backend, joined
//! by a real TCP communicator. (The worker crate repeats the golden checks with ranks in
//! separate processes.) Each rank drives the same scheduler over the same fixtures; ranks
//! receive identical logits, so they stay in lockstep.

use std::borrow::Cow;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use allam_backend_cpu::{CpuBackend, CpuBackendConfig};
use allam_comm::{join, GroupOptions, Rendezvous};
use allam_model::{
    Error, Model, ModelConfig, ProgressMode, SafetensorsSource, TensorMeta, TpShard, WeightSource,
};

use crate::support::{golden_cases, load, max_abs_diff, model_dir, quiet, run, SeqSpec};

/// Logits of TP N vs TP 1 (only the summation order differs).
const TP_TOL: f32 = 1e-4;

/// `n` backends forming one group; rank 0 first.
fn tp_backends(n: usize) -> Vec<CpuBackend> {
    let opts = GroupOptions {
        collective_timeout: Duration::from_secs(60),
        rendezvous_timeout: Duration::from_secs(30),
    };
    let config = CpuBackendConfig {
        threads: Some(1),
        kv_cache_budget_bytes: 1 << 30,
    };
    let rendezvous = Rendezvous::bind("127.0.0.1:0", "model-tp", n, opts).expect("bind");
    let addr = rendezvous.local_addr().expect("addr").to_string();
    let joiners: Vec<_> = (1..n)
        .map(|rank| {
            let addr = addr.clone();
            let config = config.clone();
            std::thread::spawn(move || {
                let group = join(&addr, "model-tp", rank, n, opts).expect("join");
                CpuBackend::with_communicator(&config, group.communicator).expect("backend")
            })
        })
        .collect();
    let leader = rendezvous.accept().expect("accept");
    let mut backends =
        vec![CpuBackend::with_communicator(&config, leader.communicator).expect("backend")];
    backends.extend(joiners.into_iter().map(|j| j.join().expect("rank thread")));
    backends
}

/// Runs `body` on every rank's backend in its own thread; results by rank.
fn on_every_rank<T: Send + 'static>(
    n: usize,
    body: impl Fn(CpuBackend) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let handles: Vec<_> = tp_backends(n)
        .into_iter()
        .map(|backend| {
            let body = body.clone();
            std::thread::spawn(move || body(backend))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank thread"))
        .collect()
}

/// All seven golden cases batched together in 7-token prefill chunks, greedy: each case's
/// last prompt logits and its generated ids.
fn generate_all(model_name: &str, backend: &mut CpuBackend) -> Vec<(Vec<f32>, Vec<u32>)> {
    let model = load(model_name, backend);
    let specs: Vec<SeqSpec> = golden_cases(model_name)
        .iter()
        .map(|case| SeqSpec {
            prompt: case.input_ids.clone(),
            chunk: 7,
            max_new: case.greedy_ids.len(),
            all_prompt_logits: false,
        })
        .collect();
    run(&model, backend, &specs)
        .into_iter()
        .map(|r| (r.prompt_logits, r.generated))
        .collect()
}

#[test]
fn tp_2_and_4_threads_match_tp_1_and_the_goldens() {
    for model_name in ["tiny-allam", "tiny-allam-gqa"] {
        let cases = golden_cases(model_name);
        let mut solo = CpuBackend::new(&CpuBackendConfig {
            threads: Some(2),
            kv_cache_budget_bytes: 1 << 30,
        })
        .expect("backend");
        let tp1 = generate_all(model_name, &mut solo);
        for n in [2, 4] {
            let ranks = on_every_rank(n, move |mut b| generate_all(model_name, &mut b));
            for (rank, results) in ranks.iter().enumerate() {
                for ((case, (logits, ids)), (tp1_logits, _)) in cases.iter().zip(results).zip(&tp1)
                {
                    let tag = format!("{model_name} TP {n} rank {rank} {}", case.id);
                    assert_eq!(ids, &case.greedy_ids, "{tag}: greedy ids");
                    let diff = max_abs_diff(logits, tp1_logits);
                    assert!(
                        diff <= TP_TOL,
                        "{tag}: last logits differ from TP 1 by {diff}"
                    );
                }
            }
            assert!(
                ranks.windows(2).all(|w| w[0] == w[1]),
                "{model_name} TP {n}: every rank sees the same logits"
            );
        }
    }
}

/// A source that counts the bytes handed out (slices included).
struct Counting {
    inner: SafetensorsSource,
    bytes: AtomicU64,
}

impl Counting {
    fn count<'a>(&self, bytes: Cow<'a, [u8]>) -> Cow<'a, [u8]> {
        self.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        bytes
    }
}

impl WeightSource for Counting {
    fn location(&self) -> &Path {
        self.inner.location()
    }
    fn meta(&self, name: &str) -> Result<TensorMeta, Error> {
        self.inner.meta(name)
    }
    fn read(&self, name: &str) -> Result<Cow<'_, [u8]>, Error> {
        self.inner.read(name).map(|b| self.count(b))
    }
    fn read_rows(&self, name: &str, rows: Range<usize>) -> Result<Cow<'_, [u8]>, Error> {
        self.inner.read_rows(name, rows).map(|b| self.count(b))
    }
    fn read_cols(&self, name: &str, cols: Range<usize>) -> Result<Cow<'_, [u8]>, Error> {
        self.inner.read_cols(name, cols).map(|b| self.count(b))
    }
}

/// (bytes read from the checkpoint, bytes held on the backend) of one rank.
fn load_counting(model_name: &str, backend: &mut CpuBackend) -> (u64, u64, TpShard) {
    let dir = model_dir(model_name);
    let config = ModelConfig::from_file(&dir.join("config.json")).expect("config");
    let source = Counting {
        inner: SafetensorsSource::open(&dir).expect("open"),
        bytes: AtomicU64::new(0),
    };
    let model =
        Model::from_source(config, &source, backend, ProgressMode::Never).expect("load shard");
    (
        source.bytes.load(Ordering::Relaxed),
        model.weight_bytes(),
        model.tp_shard(),
    )
}

#[test]
fn each_rank_reads_and_holds_about_one_nth_of_the_weights() {
    for model_name in ["tiny-allam", "tiny-allam-gqa"] {
        let mut solo = CpuBackend::new(&CpuBackendConfig::default()).expect("backend");
        let (read_1, held_1, shard_1) = load_counting(model_name, &mut solo);
        assert_eq!(shard_1, TpShard::SINGLE);
        let checkpoint_bytes: u64 = {
            let source = SafetensorsSource::open(&model_dir(model_name)).expect("open");
            source
                .tensor_names()
                .iter()
                .map(|n| source.read(n).expect("tensor").len() as u64)
                .sum()
        };
        assert_eq!(read_1, checkpoint_bytes, "TP 1 reads every byte once");
        for n in [2usize, 4] {
            let ranks = on_every_rank(n, move |mut b| load_counting(model_name, &mut b));
            for (rank, (read, held, shard)) in ranks.iter().enumerate() {
                assert_eq!(
                    *shard,
                    TpShard {
                        rank,
                        world_size: n
                    }
                );
                for (what, got, whole) in [("read", read, read_1), ("held", held, held_1)] {
                    let share = *got as f64 / whole as f64;
                    // Norms are replicated, and at TP 4 the GQA model's 2 KV heads are too.
                    assert!(
                        (share - 1.0 / n as f64).abs() < 0.05 / n as f64 + 0.01,
                        "{model_name} TP {n} rank {rank}: {what} {got} of {whole} bytes ({share:.3})"
                    );
                }
            }
        }
    }
}

#[test]
fn a_group_that_does_not_divide_the_heads_fails_before_reading_weights() {
    let results = on_every_rank(3, |mut b| {
        let dir = model_dir("tiny-allam");
        match Model::load(&dir, &mut b, &quiet()) {
            Ok(_) => panic!("8 heads over 3 ranks loaded"),
            Err(e) => e.to_string(),
        }
    });
    for msg in results {
        assert!(
            msg.contains("num_attention_heads") && msg.contains("3 ranks"),
            "{msg}"
        );
    }
}
