//! `allam serve`, `allam router`, `allam worker`: composing router, worker group, HTTP front
//! and etcd membership into processes, plus signal handling and staged shutdown.
//!
//! Even in one process the router reaches the worker over loopback gRPC: one code path for
//! the demo and for clusters.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use allam_membership::{
    EtcdConfig, MembershipWatcher, Registration, RegistrationConfig, WorkerGroupInfo,
};
use allam_request::Limits;
use allam_router::{Membership, Router, RouterConfig};
use allam_telemetry::{LogFormat, TracingConfig, TracingGuard};
use allam_worker::group::{TpConfig, TpLaunch};

use crate::cli::{self, FrontArgs, RouterArgs, ServeArgs, TelemetryArgs, WorkerArgs};
use crate::model_source;

/// Exit code when in-flight work did not finish within `--shutdown-timeout`: distinct from
/// success and from ordinary failure (1) so that orchestrators can tell a cut-off drain.
pub const EXIT_DRAIN_TIMEOUT: u8 = 3;

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("allam-rt")
        .build()
        .context("starting the async runtime")
}

pub fn init_tracing(args: &TelemetryArgs, service: &str) -> anyhow::Result<TracingGuard> {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    allam_telemetry::init_tracing(TracingConfig {
        log_format: match args.log_format {
            cli::LogFormat::Text => LogFormat::Text,
            cli::LogFormat::Json => LogFormat::Json,
        },
        filter,
        otlp_endpoint: args.otlp_endpoint.clone(),
        service_name: service.to_owned(),
    })
    .context("setting up logging and tracing")
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn termination_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot listen for SIGTERM; Ctrl-C only");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn api_keys(front: &FrontArgs) -> anyhow::Result<Vec<String>> {
    let mut keys = front.api_key.clone();
    if let Some(path) = &front.api_key_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --api-key-file {}", path.display()))?;
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
    }
    Ok(keys)
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} address {addr}"))
}

/// The public fronts of a router: gRPC and HTTP on their own listeners.
pub struct Fronts {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

pub async fn start_fronts(
    router: Router,
    tokenizer: allam_tokenizer::Tokenizer,
    front: &FrontArgs,
    log_prompts: bool,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    shutdown: &CancellationToken,
) -> anyhow::Result<Fronts> {
    // Idempotent; the caller installed it before building the router so that no early
    // gauge is lost.
    let metrics =
        allam_telemetry::install_prometheus().context("installing the metrics recorder")?;
    let grpc_listener = bind(grpc_addr, "gRPC").await?;
    let http_listener = bind(http_addr, "HTTP").await?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    let http_state = allam_http::AppState::new(
        router.clone(),
        metrics,
        allam_http::HttpConfig {
            max_body_bytes: front.max_body_bytes,
            log_prompts,
            metrics_require_auth: front.metrics_require_auth,
        },
    )
    .with_token_pieces(move |id| tokenizer.id_to_token(id));
    let tls = grpc_tls(front)?;
    let grpc_task = tokio::spawn(allam_router_serve(
        router,
        grpc_listener,
        shutdown.clone(),
        tls,
    ));
    let http_shutdown = shutdown.clone();
    let http_tls = grpc_tls(front)?.map(|tls| allam_http::HttpTlsConfig {
        cert_pem: tls.cert_pem,
        key_pem: tls.key_pem,
    });
    let http_task = tokio::spawn(async move {
        match http_tls {
            Some(tls) => allam_http::serve_tls(http_state, http_listener, tls, http_shutdown)
                .await
                .context("HTTPS server"),
            None => allam_http::serve(http_state, http_listener, http_shutdown)
                .await
                .context("HTTP server"),
        }
    });
    tracing::info!(%grpc_addr, %http_addr, "router listening (gRPC, HTTP)");
    Ok(Fronts {
        grpc_addr,
        http_addr,
        tasks: vec![grpc_task, http_task],
    })
}

async fn allam_router_serve(
    router: Router,
    listener: TcpListener,
    shutdown: CancellationToken,
    tls: Option<allam_router::TlsConfig>,
) -> anyhow::Result<()> {
    allam_router::serve_grpc(router, listener, shutdown, tls)
        .await
        .context("gRPC server")
}

/// The three `--internal-tls-*` files, read.
struct InternalTlsPem {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

/// `None` without the `--internal-tls-*` flags.
fn internal_tls(args: &cli::InternalTlsArgs) -> anyhow::Result<Option<InternalTlsPem>> {
    let (Some(ca), Some(cert), Some(key)) = (
        &args.internal_tls_ca,
        &args.internal_tls_cert,
        &args.internal_tls_key,
    ) else {
        return Ok(None);
    };
    let read = |path: &std::path::PathBuf, flag: &str| {
        std::fs::read(path).with_context(|| format!("reading {flag} {}", path.display()))
    };
    Ok(Some(InternalTlsPem {
        ca_pem: read(ca, "--internal-tls-ca")?,
        cert_pem: read(cert, "--internal-tls-cert")?,
        key_pem: read(key, "--internal-tls-key")?,
    }))
}

/// `--tls-cert`/`--tls-key` (and `--tls-client-ca` for mutual TLS on gRPC) for the public
/// ports; the HTTP port uses the same certificate.
fn grpc_tls(front: &FrontArgs) -> anyhow::Result<Option<allam_router::TlsConfig>> {
    let (Some(cert), Some(key)) = (&front.tls_cert, &front.tls_key) else {
        return Ok(None);
    };
    let read = |path: &std::path::PathBuf, flag: &str| {
        std::fs::read(path).with_context(|| format!("reading {flag} {}", path.display()))
    };
    Ok(Some(allam_router::TlsConfig {
        cert_pem: read(cert, "--tls-cert")?,
        key_pem: read(key, "--tls-key")?,
        client_ca_pem: front
            .tls_client_ca
            .as_ref()
            .map(|ca| read(ca, "--tls-client-ca"))
            .transpose()?,
    }))
}

fn router_config(
    name: String,
    tokenizer: allam_tokenizer::Tokenizer,
    max_context: u32,
    front: &FrontArgs,
    stream_write_timeout: Duration,
) -> anyhow::Result<RouterConfig> {
    let mut config = RouterConfig::new(name, tokenizer, Limits::for_context(max_context));
    config.api_keys = api_keys(front)?;
    config.max_outstanding_per_group = front.max_outstanding_per_group;
    config.stream_write_timeout = stream_write_timeout;
    Ok(config)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Waits for `tasks` up to `timeout`; false when the deadline cut them off.
async fn join_within(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    timeout: Duration,
) -> bool {
    let all = futures::future::join_all(tasks);
    match tokio::time::timeout(timeout, all).await {
        Ok(results) => {
            for result in results {
                match result {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => {
                        tracing::error!(error = format!("{err:#}"), "server ended with an error")
                    }
                    Err(err) => tracing::error!(error = %err, "server task panicked"),
                }
            }
            true
        }
        Err(_) => false,
    }
}

/// A router + one worker group in this process, connected over loopback gRPC.
pub struct LocalCluster {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    engine: allam_engine::EngineHandle,
    /// Tensor-parallel ranks this process started; dropping them kills them.
    followers: Option<allam_worker::tp::FollowerProcesses>,
}

impl LocalCluster {
    pub async fn start(
        model: &cli::ModelArgs,
        engine: &cli::EngineArgs,
        front: &FrontArgs,
        log_prompts: bool,
        grpc_addr: SocketAddr,
        http_addr: SocketAddr,
    ) -> anyhow::Result<LocalCluster> {
        allam_telemetry::install_prometheus().context("installing the metrics recorder")?;
        let resolved = model_source::resolve(model)?;
        let group = model_source::group_config(&resolved, model, engine)?;
        let tokenizer = resolved.tokenizer.clone();
        let started = tokio::task::block_in_place(|| {
            allam_worker::group::start_group(&group, tokenizer.clone())
        })
        .context("starting the worker group")?;
        tracing::info!(backend = %started.backend_description, model = %resolved.served_name, "worker group ready");
        let max_context = started.model_config.max_position_embeddings as u32;
        let shutdown = CancellationToken::new();

        let worker_listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)), "worker").await?;
        let worker_addr = worker_listener.local_addr()?;
        let worker_task = tokio::spawn({
            let engine = started.engine.clone();
            let tokenizer = tokenizer.clone();
            let shutdown = shutdown.clone();
            async move {
                allam_worker::serve_worker(
                    engine,
                    tokenizer,
                    Limits::for_context(max_context),
                    worker_listener,
                    shutdown,
                )
                .await
                .context("worker gRPC server")
            }
        });
        let membership = Membership::Static(vec![WorkerGroupInfo {
            group: "local".to_owned(),
            grpc_addr: format!("http://{worker_addr}"),
            tp: 1,
            model: resolved.served_name.clone(),
            started_at_ms: now_ms(),
        }]);
        let config = router_config(
            resolved.served_name.clone(),
            tokenizer.clone(),
            max_context,
            front,
            engine.stream_write_timeout,
        )?;
        let router = Router::new(config, membership)
            .await
            .context("starting the router")?;
        let mut fronts = start_fronts(
            router,
            tokenizer,
            front,
            log_prompts,
            grpc_addr,
            http_addr,
            &shutdown,
        )
        .await?;
        fronts.tasks.push(worker_task);
        Ok(LocalCluster {
            grpc_addr: fronts.grpc_addr,
            http_addr: fronts.http_addr,
            shutdown,
            tasks: fronts.tasks,
            engine: started.engine,
            followers: started.followers,
        })
    }

    /// Stops accepting, lets running requests finish within `timeout`, stops the engine.
    pub async fn stop(self, timeout: Duration) -> bool {
        self.engine.drain();
        self.shutdown.cancel();
        let drained = join_within(self.tasks, timeout).await;
        let engine = self.engine;
        let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
        // The engine's shutdown told the ranks to stop; only now may they go.
        drop(self.followers);
        drained
    }
}

/// A worker's own `/metrics` (the engine's gauges and histograms) and `/health`.
async fn serve_metrics(
    handle: allam_telemetry::PrometheusHandle,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || std::future::ready(handle.render())),
        )
        .route("/health", axum::routing::get(|| std::future::ready("ok")));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("metrics server")
}

fn exit_code(drained: bool) -> ExitCode {
    if drained {
        ExitCode::SUCCESS
    } else {
        tracing::error!("shutdown timeout reached with requests still running");
        ExitCode::from(EXIT_DRAIN_TIMEOUT)
    }
}

pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    rt.block_on(async {
        let _tracing = init_tracing(&args.telemetry, "allam-serve")?;
        let cluster = LocalCluster::start(
            &args.model,
            &args.engine,
            &args.front,
            args.telemetry.log_prompts,
            args.front.grpc_addr,
            args.front.http_addr,
        )
        .await?;
        eprintln!(
            "allam serve: gRPC on {}, HTTP on {} (Ctrl-C to stop)",
            cluster.grpc_addr, cluster.http_addr
        );
        termination_signal().await;
        tracing::info!("shutting down");
        let drained = cluster
            .stop(Duration::from_secs(args.shutdown_timeout))
            .await;
        Ok(exit_code(drained))
    })
}

/// Model context and tokenizer for a router: from `--model DIR` or the demo model.
fn router_model(model: Option<&Path>) -> anyhow::Result<(allam_tokenizer::Tokenizer, u32, String)> {
    let dir = match model {
        Some(dir) => dir.to_path_buf(),
        None => model_source::ensure_demo_model()?,
    };
    let tokenizer = allam_tokenizer::Tokenizer::from_dir(&dir)
        .with_context(|| format!("loading the tokenizer from {}", dir.display()))?;
    let config = allam_model::ModelConfig::from_file(&dir.join("config.json"))?;
    let name = match model {
        Some(dir) => dir
            .file_name()
            .map_or_else(|| "model".to_owned(), |n| n.to_string_lossy().into_owned()),
        None => "allam-demo".to_owned(),
    };
    Ok((tokenizer, config.max_position_embeddings as u32, name))
}

pub fn router(args: RouterArgs) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    rt.block_on(async {
        let _tracing = init_tracing(&args.telemetry, "allam-router")?;
        allam_telemetry::install_prometheus().context("installing the metrics recorder")?;
        let (tokenizer, max_context, default_name) = router_model(args.model.as_deref())?;
        let name = args.served_model_name.clone().unwrap_or(default_name);
        let watcher = MembershipWatcher::start(EtcdConfig::new(args.etcd.clone()))
            .context("watching etcd for worker groups")?;
        let mut config = router_config(
            name,
            tokenizer.clone(),
            max_context,
            &args.front,
            args.stream_write_timeout,
        )?;
        config.worker_tls =
            internal_tls(&args.internal_tls)?.map(|pem| allam_router::WorkerClientTls {
                ca_pem: pem.ca_pem,
                cert_pem: pem.cert_pem,
                key_pem: pem.key_pem,
                server_name: args.internal_tls.internal_tls_server_name.clone(),
            });
        let router = Router::new(config, Membership::Etcd(watcher))
            .await
            .context("starting the router")?;
        let shutdown = CancellationToken::new();
        let fronts = start_fronts(
            router,
            tokenizer,
            &args.front,
            args.telemetry.log_prompts,
            args.front.grpc_addr,
            args.front.http_addr,
            &shutdown,
        )
        .await?;
        eprintln!(
            "allam router: gRPC on {}, HTTP on {}",
            fronts.grpc_addr, fronts.http_addr
        );
        termination_signal().await;
        shutdown.cancel();
        let drained = join_within(fronts.tasks, Duration::from_secs(args.shutdown_timeout)).await;
        Ok(exit_code(drained))
    })
}

/// A rank >= 1 of a hand-assembled (`--world-size`) or spawned (`--tp`) group: no servers,
/// no etcd; it runs the steps rank 0 sends until rank 0 shuts the group down.
fn follower_rank(args: &WorkerArgs, world_size: usize) -> anyhow::Result<ExitCode> {
    let peers = match &args.peers {
        Some(peers) => peers.clone(),
        None if !args.etcd.is_empty() => {
            // Rank 0 publishes its rendezvous address in etcd once it listens.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting a runtime for the etcd rendezvous")?;
            rt.block_on(allam_membership::wait_for_rendezvous(
                &EtcdConfig::new(args.etcd.clone()),
                &args.group,
                allam_worker::group::GroupOptions::default().rendezvous_timeout,
            ))
            .with_context(|| format!("finding rank 0 of group `{}` in etcd", args.group))?
        }
        None => anyhow::bail!("--rank >= 1 needs --peers (rank 0's rendezvous address) or --etcd"),
    };
    let peers = peers.as_str();
    let resolved = model_source::resolve(&args.model)?;
    let mut group = model_source::group_config(&resolved, &args.model, &args.engine)?;
    group.tp = TpConfig {
        world_size,
        group: args.group.clone(),
        launch: TpLaunch::External {
            bind_addr: peers.to_owned(),
        },
        options: allam_worker::group::GroupOptions::default(),
    };
    allam_worker::group::run_follower_rank(&group, peers, args.rank)
        .with_context(|| format!("rank {} of group `{}`", args.rank, args.group))?;
    Ok(ExitCode::SUCCESS)
}

pub fn worker(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let world_size = args.world_size.unwrap_or(1);
    if args.rank >= world_size.max(1) && args.world_size.is_some() {
        anyhow::bail!(
            "--rank {} must be below --world-size {world_size}",
            args.rank
        );
    }
    if args.rank > 0 {
        if args.world_size.is_none() {
            anyhow::bail!("--rank needs --world-size");
        }
        return follower_rank(&args, world_size);
    }
    if args.etcd.is_empty() {
        anyhow::bail!("rank 0 of a worker group registers in etcd: give --etcd URL[,URL]");
    }
    if world_size > 1 && args.model.tp > 1 {
        anyhow::bail!("give either --tp (rank 0 starts the other ranks) or --world-size with --rank/--peers, not both");
    }
    let rt = runtime()?;
    rt.block_on(async {
        let _tracing = init_tracing(&args.telemetry, "allam-worker")?;
        // Before the engine starts, so its first gauges are recorded.
        let metrics = match args.metrics_addr {
            Some(_) => Some(allam_telemetry::install_prometheus().context("installing the metrics recorder")?),
            None => None,
        };
        let resolved = model_source::resolve(&args.model)?;
        let mut group = model_source::group_config(&resolved, &args.model, &args.engine)?;
        let mut rendezvous_key = None;
        if world_size > 1 {
            let peers = match args.peers.clone() {
                Some(peers) => peers,
                None => {
                    // No --peers: listen on a free port of the worker's address and publish
                    // it in etcd, where the other ranks look for it.
                    let probe = std::net::TcpListener::bind(SocketAddr::new(args.listen.ip(), 0))
                        .context("choosing a rendezvous port")?;
                    let port = probe.local_addr()?.port();
                    drop(probe);
                    let host = match &args.advertise_addr {
                        Some(addr) => addr
                            .trim_start_matches("http://")
                            .rsplit_once(':')
                            .map_or(addr.as_str(), |(host, _)| host)
                            .to_owned(),
                        None if args.listen.ip().is_unspecified() => "127.0.0.1".to_owned(),
                        None => args.listen.ip().to_string(),
                    };
                    let bind = SocketAddr::new(args.listen.ip(), port).to_string();
                    let published = format!("{host}:{port}");
                    rendezvous_key = Some(
                        allam_membership::RendezvousKey::publish(
                            &EtcdConfig::new(args.etcd.clone()),
                            &args.group,
                            &published,
                            allam_worker::group::GroupOptions::default().rendezvous_timeout,
                        )
                        .await
                        .context("publishing the rendezvous address in etcd")?,
                    );
                    bind
                }
            };
            group.tp = TpConfig {
                world_size,
                group: args.group.clone(),
                launch: TpLaunch::External { bind_addr: peers },
                options: allam_worker::group::GroupOptions::default(),
            };
        }
        let tp_size = group.tp.world_size;
        let tokenizer = resolved.tokenizer.clone();
        let started = tokio::task::block_in_place(|| {
            allam_worker::group::start_group(&group, tokenizer.clone())
        })
        .context("starting the worker group")?;
        if let Some(key) = rendezvous_key {
            if let Err(err) = key.remove().await {
                tracing::warn!(error = %err, "could not remove the rendezvous key; its lease will expire");
            }
        }
        let max_context = started.model_config.max_position_embeddings as u32;
        let listener = bind(args.listen, "worker").await?;
        let local = listener.local_addr()?;
        let advertise = args.advertise_addr.clone().unwrap_or_else(|| local.to_string());
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let worker_tls = internal_tls(&args.internal_tls)?;
        let served_name = resolved.served_name.clone();
        tasks.push(tokio::spawn({
            let engine = started.engine.clone();
            let shutdown = shutdown.clone();
            async move {
                let mut service =
                    allam_worker::WorkerService::new(engine, tokenizer, Limits::for_context(max_context))
                        .with_model_name(served_name)
                        .with_tp(tp_size as u32);
                if let Some(pem) = worker_tls {
                    service = service.with_tls(allam_worker::WorkerServerTls {
                        cert_pem: pem.cert_pem,
                        key_pem: pem.key_pem,
                        client_ca_pem: pem.ca_pem,
                    });
                }
                service
                    .serve(listener, shutdown)
                    .await
                    .context("worker gRPC server")
            }
        }));
        if let (Some(addr), Some(handle)) = (args.metrics_addr, metrics) {
            let listener = bind(addr, "metrics").await?;
            let shutdown = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                serve_metrics(handle, listener, shutdown).await
            }));
        }
        let info = WorkerGroupInfo {
            group: args.group.clone(),
            grpc_addr: if advertise.contains("://") { advertise.clone() } else { format!("http://{advertise}") },
            tp: tp_size as u32,
            model: resolved.served_name.clone(),
            started_at_ms: now_ms(),
        };
        let mut registration_config = RegistrationConfig::new(EtcdConfig::new(args.etcd.clone()));
        registration_config.ttl = Duration::from_secs(args.lease_ttl);
        let registration = Registration::start(registration_config, info).context("registering in etcd")?;
        eprintln!("allam worker `{}`: serving on {local}, advertised as {advertise}", args.group);

        termination_signal().await;
        // Staged shutdown under one deadline: leave routing first, so no new request arrives,
        // then stop accepting and let running requests finish.
        let deadline = Duration::from_secs(args.shutdown_timeout);
        let started_at = std::time::Instant::now();
        if let Err(err) = tokio::time::timeout(deadline, registration.deregister()).await.unwrap_or(Ok(())) {
            tracing::warn!(error = %err, "could not revoke the etcd lease; it will expire by itself");
        }
        started.engine.drain();
        shutdown.cancel();
        let drained = join_within(tasks, deadline.saturating_sub(started_at.elapsed())).await;
        let engine = started.engine.clone();
        let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
        drop(started);
        Ok(exit_code(drained))
    })
}
