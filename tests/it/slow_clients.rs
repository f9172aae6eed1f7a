//! Clients that stop reading hurt only themselves (issue 15): against one real `allam serve`
//! with the tiny fixture, HTTP clients on raw sockets and gRPC clients that open big streams
//! and never read them, while probes keep being answered and the worker group stays healthy;
//! the stalled streams end with `client_too_slow` after the write timeout and their KV blocks
//! are freed.
//!
//! Before the fix, four such HTTP clients filled the shared router → worker HTTP/2
//! connection, starved `Load`, marked the only group unhealthy and made every request 503.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use allam_proto::v1::generation_client::GenerationClient;
use allam_proto::v1::{GenerateRequest, SamplingParams};
use serde_json::json;

use crate::support::{http_client, metric_sum, tiny_model, wait_until, Serve};

const HTTP_STALLERS: usize = 4;
const GRPC_STALLERS: usize = 3;
const WRITE_TIMEOUT_SECS: u64 = 6;
/// Sequences per stalled request: the issue used 16; fewer keep the tiny CPU model fast
/// enough that the buffers fill within seconds (the same paths stall either way).
const STALL_N: i64 = 4;

/// A loopback connection whose receive buffer is a few KiB (set before connecting, so the
/// advertised TCP window is small too): a phone on a bad link, and a stall within seconds.
fn connect_with_small_receive_buffer(host: &str) -> TcpStream {
    use std::os::fd::FromRawFd;
    let addr: std::net::SocketAddrV4 = host.parse().expect("an IPv4 loopback address");
    // SAFETY: plain socket syscalls on a descriptor we own; every pointer is to a local of the
    // size passed, and the descriptor is handed to TcpStream exactly once.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket");
        let size: libc::c_int = 4096;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*addr.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "connect to {host}");
        TcpStream::from_raw_fd(fd)
    }
}

/// The attack from the issue: a long, wide, logprob-heavy stream, never read.
fn stall_request(http: &str) -> TcpStream {
    let body = json!({
        "prompt": "stall", "max_tokens": 1900, "n": STALL_N, "logprobs": 20,
        "ignore_eos": true, "stream": true,
    })
    .to_string();
    let host = http.trim_start_matches("http://");
    let mut socket = connect_with_small_receive_buffer(host);
    write!(
        socket,
        "POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send the request");
    socket
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn clients_that_stop_reading_hurt_only_themselves() {
    let timeout = format!("{WRITE_TIMEOUT_SECS}s");
    let serve = Serve::start(
        &["--model", &tiny_model()],
        &["--stream-write-timeout", &timeout],
    );
    let metrics = format!("{}/metrics", serve.http);
    let rss_before = rss_kib(serve.proc.pid());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");

    let mut stalled_http: Vec<TcpStream> = (0..HTTP_STALLERS)
        .map(|_| stall_request(&serve.http))
        .collect();
    // gRPC streams opened and never polled after their headers.
    let stalled_grpc = runtime.block_on(async {
        // Small HTTP/2 windows: the client stops the server after a few KiB per stream.
        let channel = tonic::transport::Endpoint::from_shared(serve.grpc.clone())
            .expect("endpoint")
            .initial_stream_window_size(16 * 1024)
            .initial_connection_window_size(64 * 1024)
            .connect()
            .await
            .expect("grpc connect");
        let mut client = GenerationClient::new(channel);
        let mut streams = Vec::new();
        for _ in 0..GRPC_STALLERS {
            let request = GenerateRequest {
                prompt: "stall".to_owned(),
                params: Some(SamplingParams {
                    max_new_tokens: Some(1900),
                    n: Some(STALL_N),
                    logprobs: Some(20),
                    ignore_eos: Some(true),
                    ..SamplingParams::default()
                }),
                ..GenerateRequest::default()
            };
            let stream = client.generate_stream(request).await.expect("stream opens");
            streams.push(stream.into_inner());
        }
        streams
    });

    // Probes through the whole stall, past the write timeout: each answered, promptly.
    let probe = http_client::blocking_client();
    let until = Instant::now() + Duration::from_secs(WRITE_TIMEOUT_SECS + 4);
    let mut probes = 0;
    let mut slowest = Duration::ZERO;
    let mut peak_rss = 0;
    while Instant::now() < until {
        let started = Instant::now();
        let response = probe
            .post(&format!("{}/v1/chat/completions", serve.http))
            .json(&json!({
                "messages": [{"role": "user", "content": "How do I prepare a cup of tea?"}],
                "max_tokens": 4,
            }))
            .send()
            .expect("probe answered");
        let took = started.elapsed();
        assert_eq!(
            response.status,
            200,
            "probe {probes} after {took:?}: {}\n{}",
            response.body,
            serve.proc.log_text()
        );
        slowest = slowest.max(took);
        probes += 1;
        peak_rss = peak_rss.max(rss_kib(serve.proc.pid()));
        assert_eq!(
            crate::support::http_get_status(&format!("{}/ready", serve.http)),
            Some(200),
            "the worker group stays ready"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        slowest < Duration::from_secs(5),
        "slowest probe took {slowest:?}"
    );
    assert!(probes >= 10, "only {probes} probes ran");
    let log = serve.proc.log_text();
    assert!(
        !log.contains("marked unhealthy"),
        "a congested connection read as a dead group:\n{log}"
    );

    // Every stalled stream has ended and given its blocks back.
    wait_until(
        "the stalled streams to end",
        Duration::from_secs(120),
        || {
            metric_sum(&metrics, "allam_client_too_slow_total")
                >= (HTTP_STALLERS + GRPC_STALLERS) as f64
                && metric_sum(&metrics, "allam_running_requests") == 0.0
                && metric_sum(&metrics, "allam_kv_cache_usage_ratio") == 0.0
        },
    );
    let growth_mib = peak_rss.saturating_sub(rss_before) / 1024;
    assert!(
        growth_mib < 256,
        "RSS grew {growth_mib} MiB while {} clients stalled",
        HTTP_STALLERS + GRPC_STALLERS
    );

    // A stalled client that reads again gets what was buffered, then the reason.
    let socket = &mut stalled_http[0];
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    while let Ok(n) = socket.read(&mut buf) {
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if seen.windows(15).any(|w| w == b"client_too_slow") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(200)]
    );
    assert!(
        text.contains("client_too_slow"),
        "the stream ends with the reason; got {} bytes ending {:?}",
        seen.len(),
        &text[text.len().saturating_sub(300)..]
    );
    drop(stalled_grpc);
}
