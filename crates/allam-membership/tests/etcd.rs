//! Registration and watch against a real etcd member (started per test on free loopback ports).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use allam_membership::testing::EtcdServer;
use allam_membership::{
    EtcdConfig, MembershipWatcher, Registration, RegistrationConfig, WorkerGroupInfo,
};
use tokio::sync::watch;

fn info(group: &str) -> WorkerGroupInfo {
    WorkerGroupInfo {
        group: group.into(),
        grpc_addr: format!("http://127.0.0.1:1/{group}"),
        tp: 1,
        model: "tiny-allam".into(),
        started_at_ms: u64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock after 1970")
                .as_millis(),
        )
        .expect("fits u64"),
    }
}

fn etcd_config(etcd: &EtcdServer) -> EtcdConfig {
    let mut config = EtcdConfig::new(vec![etcd.endpoint()]);
    config.connect_timeout = Duration::from_millis(500);
    config.request_timeout = Duration::from_millis(800);
    config
}

fn registration_config(etcd: &EtcdServer, ttl: Duration) -> RegistrationConfig {
    let mut config = RegistrationConfig::new(etcd_config(etcd));
    config.ttl = ttl;
    config.max_backoff = Duration::from_millis(500);
    config
}

fn names(groups: &[WorkerGroupInfo]) -> Vec<String> {
    groups.iter().map(|g| g.group.clone()).collect()
}

/// Waits until the snapshot satisfies `pred`, failing with the last snapshot after `timeout`.
async fn wait_membership(
    rx: &mut watch::Receiver<Vec<WorkerGroupInfo>>,
    timeout: Duration,
    what: &str,
    pred: impl FnMut(&Vec<WorkerGroupInfo>) -> bool,
) {
    let waited = tokio::time::timeout(timeout, rx.wait_for(pred))
        .await
        .map(|r| r.map(|_| ()));
    match waited {
        Ok(Ok(())) => {}
        Ok(Err(_)) => panic!("watcher stopped while waiting for: {what}"),
        Err(_) => panic!(
            "timed out after {timeout:?} waiting for: {what}; membership is {:?}",
            names(&rx.borrow())
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_is_seen_and_deregister_leaves_at_once() {
    let etcd = EtcdServer::start().expect("start etcd");
    let watcher = MembershipWatcher::start(etcd_config(&etcd)).expect("watcher");
    watcher
        .wait_synced(Duration::from_secs(10))
        .await
        .expect("watcher syncs with a fresh etcd");
    assert!(watcher.current().is_empty());
    let mut rx = watcher.subscribe();

    let g0 = info("g0");
    // A 60 s TTL: leaving within seconds can only come from the revoke.
    let registration = Registration::start(
        registration_config(&etcd, Duration::from_secs(60)),
        g0.clone(),
    )
    .expect("start registration");
    registration
        .wait_registered(Duration::from_secs(10))
        .await
        .expect("registers");
    wait_membership(&mut rx, Duration::from_secs(5), "g0 joins", |g| {
        g.as_slice() == [g0.clone()]
    })
    .await;

    let g1 = info("g1");
    let second = Registration::start(
        registration_config(&etcd, Duration::from_secs(60)),
        g1.clone(),
    )
    .expect("start registration");
    wait_membership(&mut rx, Duration::from_secs(5), "g0 and g1", |g| {
        names(g) == ["g0", "g1"]
    })
    .await;

    registration.deregister().await.expect("revoke succeeds");
    wait_membership(&mut rx, Duration::from_secs(3), "g0 leaves", |g| {
        names(g) == ["g1"]
    })
    .await;
    assert!(second.is_registered());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_leaves_when_its_lease_expires() {
    let etcd = EtcdServer::start().expect("start etcd");
    let watcher = MembershipWatcher::start(etcd_config(&etcd)).expect("watcher");
    let mut rx = watcher.subscribe();
    let ttl = Duration::from_secs(2);
    let dying = Registration::start(registration_config(&etcd, ttl), info("dying"))
        .expect("start registration");
    let staying = Registration::start(registration_config(&etcd, ttl), info("staying"))
        .expect("start registration");
    wait_membership(&mut rx, Duration::from_secs(10), "both join", |g| {
        names(g) == ["dying", "staying"]
    })
    .await;

    // Like kill -9: keepalives stop, nobody revokes.
    dying.abandon();
    let abandoned_at = tokio::time::Instant::now();
    wait_membership(
        &mut rx,
        ttl + Duration::from_secs(3),
        "dying expires",
        |g| names(g) == ["staying"],
    )
    .await;
    // It must have lived on its lease, not been removed by the abandon itself. etcd checks
    // expiry every 500 ms, so allow that much slack below the TTL.
    assert!(
        abandoned_at.elapsed() >= ttl - Duration::from_millis(600),
        "left after {:?}, before its {ttl:?} lease could expire",
        abandoned_at.elapsed()
    );
    // The other group renewed across more than one TTL.
    assert!(staying.is_registered());
    assert_eq!(staying.state().borrow().n_registrations, 1);
}

#[test]
fn keepalive_survives_a_blocked_runtime() {
    // A current-thread runtime that we block for 2 TTLs: if renewals ran on it, the lease
    // would expire. They run on the registration's own thread.
    let etcd = EtcdServer::start().expect("start etcd");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ttl = Duration::from_secs(2);
    runtime.block_on(async {
        let registration = Registration::start(registration_config(&etcd, ttl), info("busy"))
            .expect("start registration");
        registration
            .wait_registered(Duration::from_secs(10))
            .await
            .expect("registers");
        let lease_id = registration.state().borrow().lease_id;

        // The scenario itself: this runtime's only thread is busy for 2 TTLs.
        std::thread::sleep(ttl * 2);

        let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .expect("connect");
        let got = client
            .get("/allam/v1/workers/busy", None)
            .await
            .expect("get");
        assert_eq!(
            got.kvs().len(),
            1,
            "the key expired while the runtime was blocked"
        );
        let state = registration.state().borrow().clone();
        assert_eq!(state.lease_id, lease_id, "{state:?}");
        assert_eq!(state.n_registrations, 1, "{state:?}");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_keeps_last_membership_and_reregisters() {
    let mut etcd = EtcdServer::start().expect("start etcd");
    let watcher = MembershipWatcher::start(etcd_config(&etcd)).expect("watcher");
    let mut rx = watcher.subscribe();
    let ttl = Duration::from_secs(2);
    let registration = Registration::start(registration_config(&etcd, ttl), info("g0"))
        .expect("start registration");
    wait_membership(&mut rx, Duration::from_secs(10), "g0 joins", |g| {
        names(g) == ["g0"]
    })
    .await;
    let mut state = registration.state();

    etcd.stop();
    // The worker's lease runs out locally while etcd is down...
    tokio::time::timeout(Duration::from_secs(10), state.wait_for(|s| !s.registered))
        .await
        .expect("registration notices that the lease can no longer be renewed")
        .expect("registration thread alive");
    // ...and the router noticed the outage but still routes on the last membership.
    let mut synced = watcher.subscribe();
    assert_eq!(names(&synced.borrow_and_update()), ["g0"]);
    // The watcher finds out on its own schedule (HTTP/2 keepalive, 2 s + 2 s), which can
    // trail the registration's lease expiry on a loaded machine: poll against a deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while watcher.is_synced() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !watcher.is_synced(),
        "watcher must notice that etcd is gone"
    );
    assert_eq!(
        names(&watcher.current()),
        ["g0"],
        "the last membership is kept"
    );

    etcd.restart().expect("restart etcd");
    tokio::time::timeout(
        Duration::from_secs(15),
        state.wait_for(|s| s.registered && s.n_registrations >= 2),
    )
    .await
    .expect("re-registered after etcd came back")
    .expect("registration thread alive");
    watcher
        .wait_synced(Duration::from_secs(15))
        .await
        .expect("watcher resyncs");
    wait_membership(
        &mut rx,
        Duration::from_secs(5),
        "g0 present after restart",
        |g| names(g) == ["g0"],
    )
    .await;
    // The key is attached to the new lease: it must outlive the old one's TTL.
    let new_lease = registration.state().borrow().lease_id;
    assert!(new_lease.is_some());
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("connect");
    let got = client.get("/allam/v1/workers/g0", None).await.expect("get");
    assert_eq!(got.kvs().first().map(|kv| kv.lease()), new_lease);

    registration.deregister().await.expect("revoke");
    wait_membership(&mut rx, Duration::from_secs(3), "g0 leaves", |g| {
        g.is_empty()
    })
    .await;
}
