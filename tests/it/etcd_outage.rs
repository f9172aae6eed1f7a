//! etcd down under load: a router and two worker groups (real processes) keep serving for
//! 30 s on the membership they last saw while etcd is stopped, and once etcd is back the
//! groups register again under new leases and keep serving.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{
    etcdctl, http_client, http_get_status, registered_groups, start_router, wait_until, EtcdServer,
    Worker,
};

/// How long etcd stays down while clients keep sending.
const OUTAGE: Duration = Duration::from_secs(30);
/// Client threads sending chats back to back (two, so both groups have work at once).
const CLIENTS: usize = 2;

/// The lease a group's key is attached to (`None`: no key, or etcd unreachable).
fn group_lease(etcd: &str, group: &str) -> Option<i64> {
    let key = format!("/allam/v1/workers/{group}");
    etcdctl(etcd, &["get", &key, "-w", "fields"])
        .lines()
        .find_map(|l| l.strip_prefix("\"Lease\" : ")?.trim().parse().ok())
        .filter(|&lease| lease != 0)
}

fn chat(client: &http_client::Blocking, http: &str, i: usize) -> Result<(), String> {
    let body = json!({
        "messages": [{"role": "user", "content": format!("Request {i}: how do I brew tea?")}],
        "max_tokens": 8, "temperature": 0.7, "seed": i,
    });
    match client
        .post(&format!("{http}/v1/chat/completions"))
        .json(&body)
        .send()
    {
        Ok(r) if r.status == 200 => Ok(()),
        Ok(r) => Err(format!("request {i}: {}: {}", r.status, r.body)),
        Err(e) => Err(format!("request {i}: {e}")),
    }
}

/// `CLIENTS` chats at once; the errors of those that failed.
fn chat_round(http: &str, round: usize) -> Vec<String> {
    let handles: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let http = http.to_owned();
            std::thread::spawn(move || {
                chat(&http_client::blocking_client(), &http, round * CLIENTS + c)
            })
        })
        .collect();
    handles
        .into_iter()
        .filter_map(|h| h.join().expect("client thread").err())
        .collect()
}

/// Sends rounds of concurrent chats until both workers generated more tokens than in
/// `before`: proof that the router routes to both groups. Every chat must succeed.
fn until_both_serve(http: &str, workers: &[&Worker; 2], timeout: Duration, what: &str) {
    let before = workers.map(Worker::generated_tokens);
    let deadline = Instant::now() + timeout;
    let mut round = 1000;
    loop {
        let errors = chat_round(http, round);
        assert!(errors.is_empty(), "{what}: chats failed: {errors:?}");
        round += 1;
        let now = workers.map(Worker::generated_tokens);
        if now[0] > before[0] && now[1] > before[1] {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not both groups served within {timeout:?} (tokens before {before:?}, now {now:?})"
        );
    }
}

#[test]
fn router_keeps_serving_through_an_etcd_outage_and_groups_reregister() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut etcd = EtcdServer::start().expect("etcd (Debian etcd-server) must be installed");
    let endpoint = etcd.endpoint();
    let mut w0 = Worker::start("w0", &endpoint, dir.path(), &[], &[]);
    let mut w1 = Worker::start("w1", &endpoint, dir.path(), &[], &[]);
    let (router, http) = start_router(&endpoint, dir.path(), &[], &[]);
    wait_until(
        "both groups registered in etcd",
        Duration::from_secs(90),
        || registered_groups(&endpoint).len() == 2,
    );
    wait_until("router ready", Duration::from_secs(60), || {
        http_get_status(&format!("{http}/ready")) == Some(200)
    });
    until_both_serve(
        &http,
        &[&w0, &w1],
        Duration::from_secs(60),
        "before the outage",
    );
    let leases_before = ["w0", "w1"].map(|g| group_lease(&endpoint, g));
    assert!(
        leases_before.iter().all(Option::is_some),
        "leases before: {leases_before:?}"
    );

    // etcd down (SIGKILL) for OUTAGE while CLIENTS threads send chats back to back.
    let tokens_before = [&w0, &w1].map(Worker::generated_tokens);
    etcd.stop();
    let stop_at = Instant::now() + OUTAGE;
    let failed = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let http = http.clone();
            let failed = Arc::clone(&failed);
            std::thread::spawn(move || {
                let client = http_client::blocking_client();
                let (mut sent, mut errors) = (0usize, Vec::new());
                // Bounded: ends at `stop_at`, or early once any client saw a failure.
                while Instant::now() < stop_at && !failed.load(Ordering::Relaxed) {
                    if let Err(e) = chat(&client, &http, c * 1_000_000 + sent) {
                        failed.store(true, Ordering::Relaxed);
                        errors.push(e);
                    }
                    sent += 1;
                }
                (sent, errors)
            })
        })
        .collect();
    let mut sent = 0;
    let mut errors = Vec::new();
    for client in clients {
        let (n, e) = client.join().expect("client thread");
        sent += n;
        errors.extend(e);
    }
    assert!(
        errors.is_empty(),
        "chats failed while etcd was down ({sent} sent): {errors:?}\nrouter log:\n{}",
        router.log_text()
    );
    assert!(
        sent >= CLIENTS * 5,
        "only {sent} chats in {OUTAGE:?}: the load did not run"
    );
    let tokens_after = [&w0, &w1].map(Worker::generated_tokens);
    assert!(
        tokens_after[0] > tokens_before[0] && tokens_after[1] > tokens_before[1],
        "the router must keep both groups while etcd is down: tokens before {tokens_before:?}, \
         after {tokens_after:?}"
    );

    // etcd back on the same data dir: both groups write their keys again under new leases
    // (the old ones lapsed while etcd was unreachable).
    etcd.restart().expect("etcd restarts on its data dir");
    wait_until(
        "both groups registered again under new leases",
        Duration::from_secs(60),
        || {
            let leases = ["w0", "w1"].map(|g| group_lease(&endpoint, g));
            leases.iter().all(Option::is_some)
                && leases[0] != leases_before[0]
                && leases[1] != leases_before[1]
        },
    );
    let mut groups = registered_groups(&endpoint);
    groups.sort();
    assert_eq!(groups, ["w0", "w1"]);
    until_both_serve(
        &http,
        &[&w0, &w1],
        Duration::from_secs(60),
        "after etcd restarted",
    );
    for round in 0..5 {
        let errors = chat_round(&http, round);
        assert!(errors.is_empty(), "after etcd restarted: {errors:?}");
    }
    // The groups stayed up all along (no restart hid a crash).
    for worker in [&mut w0, &mut w1] {
        let child = worker.proc.child.as_mut().expect("worker process");
        assert!(
            matches!(child.try_wait(), Ok(None)),
            "{} exited:\n{}",
            worker.proc.name,
            worker.proc.log_text()
        );
    }
    drop(router);
}
