//! The cluster as operators run it: real `allam` processes and a real etcd on loopback.
//! One-process `allam serve`; router + two worker groups discovered through etcd, with a
//! group killed and another drained by SIGTERM under load.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{
    http_client, http_get_status, registered_groups, start_router, tiny_model, wait_until,
    EtcdServer, Serve, Worker,
};

fn card_request(question: &str, do_sample: bool) -> serde_json::Value {
    json!({
        "input_data": {
            "input_string": [{"role": "user", "content": question}],
            "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": do_sample, "max_new_tokens": 200}
        }
    })
}

#[test]
fn serve_answers_the_model_card_samples_in_both_languages() {
    let model = tiny_model();
    let serve = Serve::start(&["--model", &model], &[]);
    let client = http_client::blocking_client();
    for question in ["How do I prepare a cup of tea?", "كيف أجهز كوب شاهي؟"] {
        let response = client
            .post(&format!("{}/score", serve.http))
            .json(&card_request(question, true))
            .send()
            .expect("score request");
        assert_eq!(response.status().as_u16(), 200, "{}", response.body);
        let body = response.json();
        assert!(body["output"].is_string(), "{body}");
        assert_eq!(
            body.as_object().map(|o| o.len()),
            Some(1),
            "only `output`: {body}"
        );
    }
    // Greedy /score is the same text as a greedy chat completion for the same messages.
    let messages = json!([{"role": "user", "content": "How do I prepare a cup of tea?"}]);
    let score = client
        .post(&format!("{}/score", serve.http))
        .json(&json!({"input_data": {"input_string": messages,
            "parameters": {"do_sample": false, "max_new_tokens": 24}}}))
        .send()
        .expect("score")
        .json();
    let chat = client
        .post(&format!("{}/v1/chat/completions", serve.http))
        .json(&json!({"model": "tiny-allam", "messages": messages, "temperature": 0, "max_tokens": 24}))
        .send()
        .expect("chat")
        .json();
    assert_eq!(
        score["output"], chat["choices"][0]["message"]["content"],
        "score {score} vs chat {chat}"
    );
    // The golden greedy text of this prompt, computed by transformers.
    let golden = crate::support::goldens("tiny-allam");
    assert_eq!(
        chat["choices"][0]["message"]["content"],
        golden["cases"][0]["greedy"]["text"]
    );
}

/// Runs `n` chats at once through the router; returns how many succeeded and the errors.
fn concurrent_chats(http: &str, n: usize, max_tokens: u32) -> (usize, Vec<String>) {
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let url = format!("{http}/v1/chat/completions");
            std::thread::spawn(move || {
                let client = http_client::blocking_client();
                let body = json!({
                    "messages": [{"role": "user", "content": format!("Request {i}: how do I brew tea?")}],
                    "max_tokens": max_tokens, "temperature": 0.7, "seed": i,
                });
                match client.post(&url).json(&body).send() {
                    Ok(r) if r.status == 200 => Ok(()),
                    Ok(r) => Err(format!("{}: {}", r.status, r.body)),
                    Err(e) => Err(e.to_string()),
                }
            })
        })
        .collect();
    let mut ok = 0;
    let mut errors = Vec::new();
    for handle in handles {
        match handle.join().expect("client thread") {
            Ok(()) => ok += 1,
            Err(e) => errors.push(e),
        }
    }
    (ok, errors)
}

#[test]
fn etcd_cluster_spreads_load_and_survives_a_killed_and_a_drained_group() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = EtcdServer::start().expect("etcd (Debian etcd-server) must be installed");
    let endpoint = etcd.endpoint();
    let w0 = Worker::start("w0", &endpoint, dir.path(), &[], &[]);
    let mut w1 = Worker::start(
        "w1",
        &endpoint,
        dir.path(),
        &["--shutdown-timeout", "20"],
        &[],
    );
    let (router, http) = start_router(&endpoint, dir.path(), &[], &[]);
    wait_until(
        "both groups registered in etcd",
        Duration::from_secs(90),
        || registered_groups(&endpoint).len() == 2,
    );
    wait_until("router ready", Duration::from_secs(30), || {
        http_get_status(&format!("{http}/ready")) == Some(200)
    });
    // The router learns membership through its watch; give it both groups before loading.
    std::thread::sleep(Duration::from_millis(500));

    let (ok, errors) = concurrent_chats(&http, 40, 8);
    assert_eq!(
        ok,
        40,
        "errors: {errors:?}\nrouter log:\n{}",
        router.log_text()
    );
    let served_w0 = w0.generated_tokens();
    let served_w1 = w1.generated_tokens();
    assert!(
        served_w0 > 0.0 && served_w1 > 0.0,
        "both groups must serve: w0 {served_w0} tokens, w1 {served_w1} tokens"
    );

    // kill -9 one group: it leaves etcd within its TTL (+2 s) and requests keep succeeding.
    w0.proc.signal(libc::SIGKILL);
    let killed_at = Instant::now();
    let (ok, errors) = concurrent_chats(&http, 10, 4);
    assert_eq!(ok, 10, "after kill -9 of w0: {errors:?}");
    wait_until("w0 leaves etcd", Duration::from_secs(2 + 2 + 5), || {
        registered_groups(&endpoint) == vec!["w1".to_owned()]
    });
    assert!(killed_at.elapsed() <= Duration::from_secs(2 + 2 + 5));

    // SIGTERM on the last group while requests run: it leaves etcd first, every running
    // request still completes, then the process exits cleanly.
    let w2 = Worker::start("w2", &endpoint, dir.path(), &[], &[]);
    wait_until("w2 registered", Duration::from_secs(60), || {
        registered_groups(&endpoint).len() == 2
    });
    std::thread::sleep(Duration::from_millis(500));
    let load = {
        let http = http.clone();
        std::thread::spawn(move || concurrent_chats(&http, 12, 48))
    };
    std::thread::sleep(Duration::from_millis(300));
    w1.proc.signal(libc::SIGTERM);
    wait_until("w1 deregisters", Duration::from_secs(5), || {
        !registered_groups(&endpoint).contains(&"w1".to_owned())
    });
    let (ok, errors) = load.join().expect("load thread");
    assert_eq!(ok, 12, "requests lost during SIGTERM drain: {errors:?}");
    let status = w1
        .proc
        .wait_exit(Duration::from_secs(30))
        .expect("w1 exits after draining");
    assert!(
        status.success(),
        "w1 exit {status}:\n{}",
        w1.proc.log_text()
    );
    drop(w2);
}

#[test]
fn chat_client_streams_a_two_turn_conversation() {
    use std::io::Write;
    let model = tiny_model();
    let serve = Serve::start(&["--model", &model], &[]);
    let mut child = std::process::Command::new(crate::support::allam_bin())
        .args([
            "chat",
            "--endpoint",
            &serve.grpc,
            "--temperature",
            "0",
            "--max-new-tokens",
            "24",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run allam chat");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all("How do I prepare a cup of tea?\nAnd with milk?\n".as_bytes())
        .expect("write turns");
    let output = child
        .wait_with_output()
        .expect("chat exits at end of input");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).expect("utf-8");
    let answers: Vec<&str> = stdout.lines().collect();
    assert_eq!(answers.len(), 2, "one line per turn: {stdout:?}");
    let golden = crate::support::goldens("tiny-allam");
    assert_eq!(
        answers[0],
        golden["cases"][0]["greedy"]["text"].as_str().expect("text")
    );
    assert!(!answers[1].is_empty());
}
