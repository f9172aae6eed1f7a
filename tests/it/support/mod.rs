//! Test harness: locates the repo and fixtures, spawns the real `allam` binary on free
//! loopback ports, polls readiness against a deadline, and kills what it started on drop.

#![allow(dead_code)]

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use allam_membership::testing::EtcdServer;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `ALLAM_FIXTURES` or `../shared/fixtures` beside the repo; panics with a clear message
/// when missing, because a silently skipped golden test proves nothing.
pub fn fixtures_dir() -> PathBuf {
    let dir = std::env::var_os("ALLAM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/fixtures"));
    assert!(
        dir.join("tiny-allam/goldens.json").exists(),
        "fixtures not found at {} (set ALLAM_FIXTURES)",
        dir.display()
    );
    dir
}

pub fn goldens(model: &str) -> serde_json::Value {
    let path = fixtures_dir().join(model).join("goldens.json");
    let text = std::fs::read_to_string(&path).expect("readable goldens.json");
    serde_json::from_str(&text).expect("valid goldens.json")
}

pub fn allam_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_allam"))
}

/// A port nobody listens on right now (the OS picks it; the tiny race until the child binds
/// it is acceptable on loopback in tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A child process killed (SIGKILL) on drop, with its output in a log file for failures.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, args: &[&str], envs: &[(&str, &str)], dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let err = file.try_clone().expect("log file clone");
        let mut cmd = Command::new(allam_bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .env("RUST_LOG", "info");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn allam");
        Proc {
            name: name.to_owned(),
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on a pid we spawned and have not reaped; no memory is touched.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// Waits for exit up to `timeout`; returns the exit status code if it exited.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` until it returns true or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

pub fn http_get_status(url: &str) -> Option<u16> {
    let client = http_client::blocking_client();
    client.get(url).send().ok().map(|r| r.status().as_u16())
}

/// Tiny blocking HTTP helpers on top of an async client and a current-thread runtime, so
/// tests stay plain `#[test]` functions.
pub mod http_client {
    pub struct Blocking {
        rt: tokio::runtime::Runtime,
        client: ::reqwest::Client,
    }
    pub struct Response {
        pub status: u16,
        pub body: String,
    }
    impl Response {
        pub fn status(&self) -> StatusCode {
            StatusCode(self.status)
        }
        pub fn json(&self) -> serde_json::Value {
            serde_json::from_str(&self.body)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
        }
    }
    pub struct StatusCode(u16);
    impl StatusCode {
        pub fn as_u16(&self) -> u16 {
            self.0
        }
    }
    pub struct RequestBuilder<'a> {
        blocking: &'a Blocking,
        builder: ::reqwest::RequestBuilder,
    }
    impl RequestBuilder<'_> {
        pub fn json(mut self, body: &serde_json::Value) -> Self {
            self.builder = self.builder.json(body);
            self
        }
        pub fn header(mut self, k: &str, v: &str) -> Self {
            self.builder = self.builder.header(k, v);
            self
        }
        pub fn body(mut self, body: impl Into<::reqwest::Body>) -> Self {
            self.builder = self.builder.body(body);
            self
        }
        pub fn send(self) -> Result<Response, ::reqwest::Error> {
            self.blocking.rt.block_on(async {
                let response = self.builder.send().await?;
                let status = response.status().as_u16();
                let body = response.text().await?;
                Ok(Response { status, body })
            })
        }
    }
    impl Blocking {
        pub fn get(&self, url: &str) -> RequestBuilder<'_> {
            RequestBuilder {
                blocking: self,
                builder: self.client.get(url),
            }
        }
        pub fn post(&self, url: &str) -> RequestBuilder<'_> {
            RequestBuilder {
                blocking: self,
                builder: self.client.post(url),
            }
        }
    }
    pub fn blocking_client() -> Blocking {
        Blocking {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            client: ::reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(120))
                .build()
                .expect("client"),
        }
    }
}

/// `allam serve` on free loopback ports with the given model args; ready when `/ready` is 200.
pub struct Serve {
    pub proc: Proc,
    pub http: String,
    pub grpc: String,
    pub dir: tempfile::TempDir,
}

impl Serve {
    pub fn start(model_args: &[&str], extra: &[&str]) -> Serve {
        let dir = tempfile::tempdir().expect("temp dir");
        let http_port = free_port();
        let grpc_port = free_port();
        let http = format!("127.0.0.1:{http_port}");
        let grpc = format!("127.0.0.1:{grpc_port}");
        let cache = dir.path().join("cache");
        let mut args = vec!["serve", "--http-addr", &http, "--grpc-addr", &grpc];
        args.extend_from_slice(model_args);
        args.extend_from_slice(extra);
        let mut proc = Proc::spawn(
            "serve",
            &args,
            &[("ALLAM_CACHE", cache.to_str().expect("utf-8 temp path"))],
            dir.path(),
        );
        let tls = extra.contains(&"--tls-cert");
        let url = format!("{}://{http}/ready", if tls { "https" } else { "http" });
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ready = if tls {
                // Our test HTTP client has no TLS; curl checks readiness of an HTTPS front.
                Command::new("curl")
                    .args(["-sfk", "-o", "/dev/null", &url])
                    .status()
                    .is_ok_and(|s| s.success())
            } else {
                http_get_status(&url) == Some(200)
            };
            if ready {
                break;
            }
            if let Some(status) = proc.wait_exit(Duration::from_millis(200)) {
                panic!("allam serve exited early ({status}):\n{}", proc.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "allam serve not ready:\n{}",
                proc.log_text()
            );
        }
        Serve {
            proc,
            http: format!("http://{http}"),
            grpc: format!("http://{grpc}"),
            dir,
        }
    }
}

/// The tiny-allam fixture model directory as a string argument.
pub fn tiny_model() -> String {
    fixtures_dir()
        .join("tiny-allam")
        .to_string_lossy()
        .into_owned()
}

/// `etcdctl` (Debian etcd-client, v3 API) against `etcd`; its stdout.
pub fn etcdctl(etcd: &str, args: &[&str]) -> String {
    let output = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", etcd, "--command-timeout", "2s"])
        .args(args)
        .output()
        .expect("etcdctl (Debian etcd-client) must be installed");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Worker groups whose key exists under `/allam/v1/workers/`.
pub fn registered_groups(etcd: &str) -> Vec<String> {
    etcdctl(
        etcd,
        &["get", "--prefix", "--keys-only", "/allam/v1/workers/"],
    )
    .lines()
    .filter(|l| !l.is_empty())
    .map(|l| l.trim_start_matches("/allam/v1/workers/").to_owned())
    .collect()
}

/// Sum of a Prometheus series over all label sets (0 when the endpoint is unreachable).
pub fn metric_sum(metrics_url: &str, name: &str) -> f64 {
    let client = http_client::blocking_client();
    let Ok(response) = client.get(metrics_url).send() else {
        return 0.0;
    };
    response
        .body
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An `allam worker` of an etcd cluster on the tiny fixture, with its own metrics port.
pub struct Worker {
    pub proc: Proc,
    pub metrics: String,
}

impl Worker {
    /// `--lease-ttl 2` so that a killed group leaves quickly; `extra` appends flags.
    pub fn start(
        group: &str,
        etcd: &str,
        dir: &Path,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Worker {
        let listen = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        let model = tiny_model();
        let mut args = vec![
            "worker",
            "--etcd",
            etcd,
            "--group",
            group,
            "--listen",
            &listen,
            "--model",
            &model,
            "--lease-ttl",
            "2",
            "--metrics-addr",
            &metrics,
        ];
        args.extend_from_slice(extra);
        let proc = Proc::spawn(group, &args, envs, dir);
        Worker {
            proc,
            metrics: format!("http://{metrics}/metrics"),
        }
    }

    /// Tokens this worker generated so far.
    pub fn generated_tokens(&self) -> f64 {
        metric_sum(&self.metrics, "allam_generated_tokens_total")
    }
}

/// An `allam router` over etcd on free ports; returns it and its HTTP base URL.
pub fn start_router(
    etcd: &str,
    dir: &Path,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> (Proc, String) {
    let http = format!("127.0.0.1:{}", free_port());
    let grpc = format!("127.0.0.1:{}", free_port());
    let model = tiny_model();
    let mut args = vec![
        "router",
        "--etcd",
        etcd,
        "--http-addr",
        &http,
        "--grpc-addr",
        &grpc,
        "--model",
        &model,
    ];
    args.extend_from_slice(extra);
    let proc = Proc::spawn("router", &args, envs, dir);
    (proc, format!("http://{http}"))
}
