//! Tensor parallelism from the command line: `allam generate --tp N` and `allam serve --tp N`
//! start N real rank processes on the CPU and still reproduce the transformers goldens.

use std::process::Command;

use serde_json::json;

use crate::support::{allam_bin, fixtures_dir, goldens, http_client, Serve};

#[test]
fn generate_with_tp_reproduces_the_goldens() {
    // tiny-allam-gqa has 2 KV heads: TP 4 replicates them.
    for (model, tp) in [("tiny-allam", "2"), ("tiny-allam-gqa", "4")] {
        let golden = goldens(model);
        let dir = tempfile::tempdir().expect("temp dir");
        let requests = dir.path().join("requests.jsonl");
        let lines: Vec<String> = golden["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .map(|case| {
                if case["kind"] == "chat" {
                    json!({"messages": case["messages"], "greedy": true, "max_new_tokens": 24})
                } else {
                    json!({"prompt": case["prompt"], "greedy": true, "max_new_tokens": 24})
                }
                .to_string()
            })
            .collect();
        std::fs::write(&requests, lines.join("\n")).expect("write requests");
        let model_dir = fixtures_dir().join(model);
        let output = Command::new(allam_bin())
            .args([
                "generate",
                "--tp",
                tp,
                "--model",
                model_dir.to_str().expect("utf-8"),
                "--requests",
                requests.to_str().expect("utf-8"),
            ])
            .output()
            .expect("run allam generate --tp");
        assert!(
            output.status.success(),
            "{model} --tp {tp}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8(output.stdout).expect("utf-8");
        for (line, case) in stdout
            .lines()
            .zip(golden["cases"].as_array().expect("cases"))
        {
            let result: serde_json::Value = serde_json::from_str(line).expect("json line");
            assert_eq!(
                result["token_ids"], case["greedy"]["ids"],
                "{model} --tp {tp} case {}",
                case["id"]
            );
        }
        assert_eq!(stdout.lines().count(), 7);
    }
}

#[test]
fn serve_with_tp_answers_greedy_chat_like_transformers() {
    let model = fixtures_dir().join("tiny-allam");
    let serve = Serve::start(
        &["--model", model.to_str().expect("utf-8"), "--tp", "2"],
        &[],
    );
    let response = http_client::blocking_client()
        .post(&format!("{}/v1/chat/completions", serve.http))
        .json(&json!({
            "messages": [{"role": "user", "content": "How do I prepare a cup of tea?"}],
            "temperature": 0, "max_tokens": 24
        }))
        .send()
        .expect("chat");
    assert_eq!(response.status().as_u16(), 200, "{}", response.body);
    assert_eq!(
        response.json()["choices"][0]["message"]["content"],
        goldens("tiny-allam")["cases"][0]["greedy"]["text"]
    );
}

/// `allam worker --world-size 2 --rank R` started separately, meeting through etcd (no
/// `--peers`): rank 0 registers the group, the router serves the goldens through it.
#[test]
fn ranks_started_separately_meet_through_etcd() {
    use crate::support::{
        http_get_status, registered_groups, start_router, wait_until, EtcdServer, Worker,
    };
    use std::time::Duration;

    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = EtcdServer::start().expect("etcd (Debian etcd-server) must be installed");
    let endpoint = etcd.endpoint();
    let tp = ["--world-size", "2"];
    let rank0 = Worker::start(
        "g0",
        &endpoint,
        dir.path(),
        &[&tp[..], &["--rank", "0"]].concat(),
        &[],
    );
    let mut rank1 = Worker::start(
        "g0",
        &endpoint,
        dir.path(),
        &[&tp[..], &["--rank", "1"]].concat(),
        &[],
    );
    let (router, http) = start_router(&endpoint, dir.path(), &[], &[]);
    wait_until("the TP group registered", Duration::from_secs(120), || {
        registered_groups(&endpoint) == vec!["g0".to_owned()]
    });
    wait_until("router ready", Duration::from_secs(60), || {
        http_get_status(&format!("{http}/ready")) == Some(200)
    });
    let response = http_client::blocking_client()
        .post(&format!("{http}/v1/chat/completions"))
        .json(&json!({
            "messages": [{"role": "user", "content": "How do I prepare a cup of tea?"}],
            "temperature": 0, "max_tokens": 24
        }))
        .send()
        .expect("chat");
    assert_eq!(
        response.status().as_u16(),
        200,
        "{}\nrank0:\n{}\nrank1:\n{}\nrouter:\n{}",
        response.body,
        rank0.proc.log_text(),
        rank1.proc.log_text(),
        router.log_text()
    );
    assert_eq!(
        response.json()["choices"][0]["message"]["content"],
        goldens("tiny-allam")["cases"][0]["greedy"]["text"]
    );
    assert!(
        rank1.proc.wait_exit(Duration::from_millis(10)).is_none(),
        "rank 1 still runs"
    );
}
