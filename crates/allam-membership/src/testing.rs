//! A real single-member etcd for tests, on free loopback ports in a temp dir.
//!
//! Behind the `testing` feature so production builds carry no process-spawning code. Other
//! crates' tests enable it with
//! `allam-membership = { workspace = true, features = ["testing"] }` in `[dev-dependencies]`.
//!
//! The binary is `$ALLAM_ETCD_BIN`, else `etcd` on PATH (Debian `etcd-server`, 3.4). A missing
//! binary is an error, never a skipped test. `stop` kills with SIGKILL (what a crash looks
//! like); `restart` brings the same member back on the same data dir and ports, so leases and
//! keys survive as they would in production.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped) etcd member owned by a test; killed on drop.
#[derive(Debug)]
pub struct EtcdServer {
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd and waits (up to 20 s) until `/health` answers. Blocking.
    pub fn start() -> std::io::Result<EtcdServer> {
        let dir = tempfile::Builder::new().prefix("allam-etcd-").tempdir()?;
        let client_port = free_port()?;
        let mut peer_port = free_port()?;
        while peer_port == client_port {
            peer_port = free_port()?;
        }
        let mut server = EtcdServer {
            dir,
            client_port,
            peer_port,
            child: None,
        };
        server.spawn()?;
        Ok(server)
    }

    /// `http://127.0.0.1:<port>`, for `EtcdConfig::endpoints`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The member's log (stdout + stderr of every start), for failure messages.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILLs the member and reaps it. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors mean it already exited; either way it is gone after wait().
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the member again on the same data dir and ports (after [`Self::stop`]).
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        self.spawn()
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let bin = std::env::var_os("ALLAM_ETCD_BIN").unwrap_or_else(|| "etcd".into());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let client_url = self.endpoint();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(&bin)
            .arg("--name")
            .arg("allam-test")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("allam-test={peer_url}"))
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot run etcd ({bin:?}): {e}; install Debian's etcd-server or set ALLAM_ETCD_BIN"
                    ),
                )
            })?;
        self.child = Some(child);
        self.wait_healthy(Duration::from_secs(20))
    }

    fn wait_healthy(&mut self, timeout: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if health_ok(self.client_port) {
                return Ok(());
            }
            if !self.is_running() {
                return Err(std::io::Error::other(format!(
                    "etcd exited during startup; log:\n{}",
                    tail(&self.log_path())
                )));
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(std::io::Error::other(format!(
                    "etcd not healthy after {timeout:?}; log:\n{}",
                    tail(&self.log_path())
                )));
            }
            // Polling a readiness probe against a deadline (not sleeping as synchronization).
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port the OS just handed out on loopback (free now; tests accept the small race).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// etcd serves `GET /health` on its client port; `{"health":"true"}` means it has a leader.
fn health_ok(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let request =
        format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.contains("\"health\":\"true\"")
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
