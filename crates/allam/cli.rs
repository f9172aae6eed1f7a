//! Command-line flags. Names follow vLLM's where one exists (`--max-num-seqs`,
//! `--load-format`, `--kv-cache-memory`); every flag has an `ALLAM_*` env twin.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "allam",
    version,
    about = "Serving cluster for the ALLaM family of Arabic/English LLMs"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Offline generation in one process (no servers).
    Generate(GenerateArgs),
    /// Router + one worker group in one process, no etcd: the quickest way to serve.
    Serve(ServeArgs),
    /// The public router of a cluster: discovers worker groups in etcd.
    Router(RouterArgs),
    /// One worker group (its leader rank), registered in etcd.
    Worker(WorkerArgs),
    /// Starts `serve` on loopback, sends the model card's sample requests, prints the answers.
    Demo(DemoArgs),
    /// Writes a random-weight checkpoint of a preset shape (safetensors + config.json).
    SynthModel(SynthModelArgs),
    /// Writes the built-in demo model (our own bilingual tokenizer + random weights).
    DemoModel(DemoModelArgs),
    /// A terminal chat client that streams answers from any router (gRPC).
    Chat(ChatArgs),
    /// Load generator against a running server (our gRPC API or any OpenAI-compatible HTTP).
    Bench(BenchArgs),
    /// Offline engine benchmark in this process: TTFT, batch-1 decode, throughput.
    BenchEngine(BenchEngineArgs),
    /// Every CUDA op against its CPU twin on random inputs (needs an NVIDIA GPU).
    GpuSelftest(GpuSelftestArgs),
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// The router's public gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051", env = "ALLAM_ENDPOINT")]
    pub endpoint: String,
    /// System prompt, e.g. "You are ALLaM, a bilingual English and Arabic AI assistant."
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: i64,
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, env = "ALLAM_API_KEY")]
    pub api_key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchBackend {
    /// Our public gRPC API (`allam.v1.Generation`).
    Grpc,
    /// Any OpenAI-compatible HTTP server (SSE streaming).
    Openai,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchDataset {
    Random,
    Bilingual,
    Jsonl,
}

/// Flags follow `vllm bench serve` where it has them.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value = "grpc")]
    pub backend: BenchBackend,
    /// gRPC endpoint (`--backend grpc`).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub endpoint: String,
    /// HTTP base URL (`--backend openai`), the server root or its `/v1`.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// Model name sent to OpenAI-compatible servers.
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, env = "ALLAM_API_KEY")]
    pub api_key: Option<String>,
    #[arg(long, value_enum, default_value = "random")]
    pub dataset: BenchDataset,
    #[arg(long)]
    pub dataset_path: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    pub random_input_len: usize,
    #[arg(long, default_value_t = 128)]
    pub random_output_len: usize,
    #[arg(long, default_value_t = 128)]
    pub bilingual_output_len: usize,
    #[arg(long, default_value_t = 100)]
    pub num_prompts: usize,
    /// Poisson arrival rate in requests/s; absent = all at once.
    #[arg(long)]
    pub request_rate: Option<f64>,
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub ignore_eos: bool,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Debug, Args)]
pub struct BenchEngineArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Prompt lengths whose time to first token is measured.
    #[arg(long, default_value = "128,512,2048")]
    pub ttft: String,
    /// Tokens generated for the batch-1 decode measurement.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Concurrent requests for the throughput measurement.
    #[arg(long, default_value = "1,8,32")]
    pub concurrency: String,
    #[arg(long, default_value_t = 512)]
    pub input_len: usize,
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the report here instead of stdout.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct GpuSelftestArgs {
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// Write the checks as a JSON array here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LoadFormat {
    /// Read safetensors weights from the model directory.
    Auto,
    /// Random weights of the configured shape, as vLLM's `--load-format dummy`.
    Dummy,
}

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer files).
    #[arg(long, env = "ALLAM_MODEL", conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// A preset shape with dummy weights (allam-7b, allam-100m, tiny, demo).
    #[arg(long, env = "ALLAM_PRESET")]
    pub preset: Option<String>,
    #[arg(long, value_enum, default_value = "auto", env = "ALLAM_LOAD_FORMAT")]
    pub load_format: LoadFormat,
    /// `cpu` or `cuda[:N]`.
    #[arg(long, default_value = "cpu", env = "ALLAM_DEVICE")]
    pub device: String,
    /// Name clients use in the `model` field; defaults to the model directory's name.
    #[arg(long, env = "ALLAM_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Show a progress bar while loading weights.
    #[arg(long)]
    pub progress: bool,
    /// Tensor-parallel ranks: this process is rank 0 and starts ranks 1..N as child
    /// processes on this machine (N must divide the attention heads). With `--device
    /// cuda:B` rank r uses GPU cuda:B+r and the ranks combine results through NCCL.
    #[arg(long, default_value_t = 1, env = "ALLAM_TP")]
    pub tp: usize,
    /// Replay decode steps from CUDA graphs captured once per batch size (up to
    /// --cuda-graph-max-batch sequences), which removes per-kernel launch cost at small
    /// batches. Needs --device cuda; with --tp every rank captures the same sizes and its
    /// NCCL collectives inside the graphs. Each captured size keeps its activations and
    /// logits outside --kv-cache-memory (about 0.5 GB in all for a 7B model up to batch 256),
    /// so leave that much free. Off by default until scripts/gpu-check.sh has verified it on
    /// a GPU.
    #[arg(long, env = "ALLAM_CUDA_GRAPHS")]
    pub cuda_graphs: bool,
    /// Largest decode batch replayed from a CUDA graph (at most --max-num-seqs); larger
    /// batches run eagerly.
    #[arg(long, default_value_t = 256, env = "ALLAM_CUDA_GRAPH_MAX_BATCH")]
    pub cuda_graph_max_batch: usize,
}

#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16, env = "ALLAM_BLOCK_SIZE")]
    pub block_size: usize,
    /// KV-cache budget in bytes (suffixes K, M, G, Ki, Mi, Gi accepted).
    #[arg(long, default_value = "256Mi", env = "ALLAM_KV_CACHE_MEMORY", value_parser = parse_bytes)]
    pub kv_cache_memory: usize,
    #[arg(long, default_value_t = 2048, env = "ALLAM_MAX_NUM_BATCHED_TOKENS")]
    pub max_num_batched_tokens: usize,
    #[arg(long, default_value_t = 256, env = "ALLAM_MAX_NUM_SEQS")]
    pub max_num_seqs: usize,
    /// Requests allowed to wait for a slot; beyond it new ones are refused at once.
    #[arg(long, default_value_t = 1024, env = "ALLAM_MAX_WAITING")]
    pub max_waiting: usize,
    #[arg(long, env = "ALLAM_NO_PREFIX_CACHING")]
    pub no_prefix_caching: bool,
    /// Prefill tokens a step may carry beside running streams' decode rows: bounds the gap
    /// between two tokens of a running stream while long prompts arrive.
    #[arg(
        long,
        default_value_t = 512,
        env = "ALLAM_MAX_PREFILL_TOKENS_WITH_DECODES"
    )]
    pub max_prefill_tokens_with_decodes: usize,
    /// Events buffered per request between the engine and its client; a request whose
    /// client leaves them unread is paused (not generated further).
    #[arg(long, default_value_t = 256, env = "ALLAM_STREAM_BUFFER_EVENTS")]
    pub stream_buffer_events: usize,
    /// How long a stream may stay stalled behind a client that does not read before it
    /// fails with `client_too_slow` and its KV blocks are freed (`30s`, `500ms`, `2m`).
    #[arg(long, default_value = "30s", env = "ALLAM_STREAM_WRITE_TIMEOUT", value_parser = parse_duration)]
    pub stream_write_timeout: std::time::Duration,
}

#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Cap on generated tokens.
    #[arg(long)]
    pub max_new_tokens: Option<i64>,
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long)]
    pub top_k: Option<i64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Greedy decoding (same as `do_sample=false`).
    #[arg(long)]
    pub greedy: bool,
    /// Return the chosen token's logprob and the top K per generated token.
    #[arg(long)]
    pub logprobs: Option<i64>,
    /// Return the logprob of every prompt token.
    #[arg(long)]
    pub prompt_logprobs: bool,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Raw prompt (no chat template; bos prepended).
    #[arg(long, conflicts_with_all = ["messages", "requests"])]
    pub prompt: Option<String>,
    /// Chat messages as JSON: `[{"role": "user", "content": "..."}]`.
    #[arg(long, conflicts_with = "requests")]
    pub messages: Option<String>,
    /// A user message (shorthand for `--messages` with one user turn).
    #[arg(long, conflicts_with_all = ["prompt", "messages", "requests"])]
    pub user: Option<String>,
    /// System prompt placed before the messages.
    #[arg(long)]
    pub system: Option<String>,
    /// One request per line (same fields as the flags, as JSON); all submitted at once.
    #[arg(long)]
    pub requests: Option<PathBuf>,
    /// Print one JSON object per request.
    #[arg(long)]
    pub json: bool,
    /// Collectives of the tensor-parallel group (torch.distributed's `backend`): `auto` =
    /// NCCL between GPUs, TCP between CPU ranks; `nccl` also runs `--device cuda --tp 1` as a
    /// one-rank NCCL group, which checks the NCCL path on a machine with one GPU.
    #[arg(long, value_enum, default_value = "auto", env = "ALLAM_DIST_BACKEND")]
    pub dist_backend: DistBackend,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DistBackend {
    Auto,
    Nccl,
}

#[derive(Debug, Clone, Args)]
pub struct FrontArgs {
    #[arg(long, default_value = "0.0.0.0:50051", env = "ALLAM_GRPC_ADDR")]
    pub grpc_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:8000", env = "ALLAM_HTTP_ADDR")]
    pub http_addr: SocketAddr,
    /// API key clients must send (`Authorization: Bearer KEY`); repeatable.
    #[arg(long, env = "ALLAM_API_KEY")]
    pub api_key: Vec<String>,
    /// File with one API key per line.
    #[arg(long, env = "ALLAM_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Require the API key on `/metrics` too (`/health` and `/ready` always stay open for
    /// probes).
    #[arg(long, env = "ALLAM_METRICS_REQUIRE_AUTH")]
    pub metrics_require_auth: bool,
    /// Largest accepted HTTP body.
    #[arg(long, default_value = "4Mi", value_parser = parse_bytes, env = "ALLAM_MAX_BODY_BYTES")]
    pub max_body_bytes: usize,
    /// PEM certificate chain for TLS on the public gRPC and HTTP ports (with `--tls-key`).
    #[arg(long, env = "ALLAM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "ALLAM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA: gRPC clients must present a certificate it signed (mutual TLS on gRPC).
    #[arg(long, env = "ALLAM_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// In-flight requests per worker group before new ones get 429 / RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024, env = "ALLAM_MAX_OUTSTANDING_PER_GROUP")]
    pub max_outstanding_per_group: usize,
}

/// Mutual TLS between routers and workers (PEM files). Both sides take the same three
/// flags: the CA that signed the other side's certificates, and their own certificate + key.
#[derive(Debug, Clone, Args)]
pub struct InternalTlsArgs {
    /// CA that signed the peers' certificates (router: the workers'; worker: the routers').
    #[arg(long, env = "ALLAM_INTERNAL_TLS_CA", requires_all = ["internal_tls_cert", "internal_tls_key"])]
    pub internal_tls_ca: Option<PathBuf>,
    /// This process's certificate for router ↔ worker traffic.
    #[arg(long, env = "ALLAM_INTERNAL_TLS_CERT", requires = "internal_tls_ca")]
    pub internal_tls_cert: Option<PathBuf>,
    /// The key of `--internal-tls-cert`.
    #[arg(long, env = "ALLAM_INTERNAL_TLS_KEY", requires = "internal_tls_ca")]
    pub internal_tls_key: Option<PathBuf>,
    /// Router side: the name the workers' certificates are issued for.
    #[arg(
        long,
        default_value = "allam-worker",
        env = "ALLAM_INTERNAL_TLS_SERVER_NAME"
    )]
    pub internal_tls_server_name: String,
}

#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    #[arg(long, value_enum, default_value = "text", env = "ALLAM_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// OTLP/gRPC collector, e.g. http://127.0.0.1:4317.
    #[arg(long, env = "ALLAM_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Allow prompt text in logs (off by default: prompts are user data).
    #[arg(long, env = "ALLAM_LOG_PROMPTS")]
    pub log_prompts: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub front: FrontArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// Seconds a SIGTERM'd server waits for running requests.
    #[arg(long, default_value_t = 30, env = "ALLAM_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: u64,
}

#[derive(Debug, Args)]
pub struct RouterArgs {
    /// etcd endpoints, comma separated.
    #[arg(long, env = "ALLAM_ETCD", value_delimiter = ',', required = true)]
    pub etcd: Vec<String>,
    /// Model directory to read the tokenizer and config from (the demo model when absent).
    #[arg(long, env = "ALLAM_MODEL")]
    pub model: Option<PathBuf>,
    #[arg(long, env = "ALLAM_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    #[command(flatten)]
    pub front: FrontArgs,
    #[command(flatten)]
    pub internal_tls: InternalTlsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[arg(long, default_value_t = 30, env = "ALLAM_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: u64,
    /// How long a stream may stay stalled behind a client that does not read before the
    /// router ends it with `client_too_slow` and cancels it on its worker.
    #[arg(long, default_value = "30s", env = "ALLAM_STREAM_WRITE_TIMEOUT", value_parser = parse_duration)]
    pub stream_write_timeout: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// etcd endpoints (rank 0 registers the group there); comma separated.
    #[arg(long, env = "ALLAM_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Worker group name (the etcd key is /allam/v1/workers/<group>).
    #[arg(long, env = "ALLAM_GROUP")]
    pub group: String,
    /// Internal gRPC listen address.
    #[arg(long, default_value = "0.0.0.0:50061", env = "ALLAM_LISTEN")]
    pub listen: SocketAddr,
    /// Address the router should dial (defaults to the listen address).
    #[arg(long, env = "ALLAM_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// etcd lease TTL in seconds.
    #[arg(long, default_value_t = 10, env = "ALLAM_LEASE_TTL")]
    pub lease_ttl: u64,
    #[arg(long, default_value_t = 30, env = "ALLAM_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: u64,
    /// Ranks of a group assembled by hand (`--rank`, `--peers`) rather than spawned by
    /// rank 0 with `--tp`.
    #[arg(long, env = "ALLAM_WORLD_SIZE")]
    pub world_size: Option<usize>,
    /// This process's rank in a `--world-size` group; ranks >= 1 join rank 0 at `--peers`.
    #[arg(long, default_value_t = 0, env = "ALLAM_RANK")]
    pub rank: usize,
    /// Rank 0's rendezvous address (rank 0 listens there; the others connect). Without it
    /// the ranks meet through etcd: rank 0 publishes `/allam/v1/rendezvous/<group>`.
    #[arg(long, env = "ALLAM_PEERS")]
    pub peers: Option<String>,
    /// Serve Prometheus `/metrics` (and `/health`) on this address.
    #[arg(long, env = "ALLAM_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub internal_tls: InternalTlsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Keep serving on the default ports after answering the sample requests.
    #[arg(long)]
    pub keep_serving: bool,
}

#[derive(Debug, Args)]
pub struct SynthModelArgs {
    #[arg(long)]
    pub preset: String,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct DemoModelArgs {
    #[arg(long)]
    pub out: PathBuf,
}

/// Parses `30s`, `500ms`, `2m` or plain seconds (`30`, `0.5`).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (examples: 30s, 500ms, 2m)"))?;
    let seconds = match unit.trim() {
        "" | "s" => number,
        "ms" => number / 1e3,
        "m" => number * 60.0,
        other => return Err(format!("unknown duration unit `{other}` in `{text}`")),
    };
    std::time::Duration::try_from_secs_f64(seconds).map_err(|e| format!("`{text}`: {e}"))
}

/// Parses `512Mi`, `2G`, `1048576`.
pub fn parse_bytes(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a byte size (examples: 512Mi, 2G, 1048576)"))?;
    let scale: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "KB" => 1e3,
        "M" | "MB" => 1e6,
        "G" | "GB" => 1e9,
        "Ki" | "KiB" => 1024.0,
        "Mi" | "MiB" => 1024.0 * 1024.0,
        "Gi" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown byte unit `{other}` in `{text}`")),
    };
    Ok((number * scale) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        use std::time::Duration;
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("3 fortnights").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn byte_sizes_parse_with_units() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("256Mi"), Ok(256 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2_000_000_000));
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("Mi").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
