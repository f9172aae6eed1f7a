//! `scripts/local-cluster.sh`, the plain-process cluster recipe from deploy/README.md:
//! etcd + router + 2 workers come up and answer the model card's sample request through
//! the router, then stop cleanly.

use std::process::Command;

use serde_json::json;

use crate::support::{allam_bin, http_client, repo_root};

struct Cluster {
    dir: std::path::PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/local-cluster.sh"))
            .args([
                "stop",
                "--dir",
                self.dir.to_str().unwrap_or_default(),
                "--stop-timeout",
                "10",
            ])
            .status();
    }
}

#[test]
fn local_cluster_script_answers_the_card_sample_request() {
    let temp = tempfile::tempdir().expect("temp dir");
    let dir = temp.path().join("cluster");
    let output = Command::new(repo_root().join("scripts/local-cluster.sh"))
        .args([
            "start",
            "--bin",
            allam_bin().to_str().expect("utf-8"),
            "--dir",
            dir.to_str().expect("utf-8"),
            "--timeout",
            "180",
        ])
        .output()
        .expect("run local-cluster.sh");
    let cluster = Cluster { dir: dir.clone() };
    assert!(
        output.status.success(),
        "local-cluster.sh start failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("ALLAM_CLUSTER "))
        .unwrap_or_else(|| panic!("no ALLAM_CLUSTER line in {stdout}"));
    let http = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("http="))
        .expect("http= field");
    let client = http_client::blocking_client();
    for question in ["How do I prepare a cup of tea?", "كيف أجهز كوب شاهي؟"] {
        let response = client
            .post(&format!("http://{http}/score"))
            .json(&json!({
                "input_data": {
                    "input_string": [{"role": "user", "content": question}],
                    "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": true, "max_new_tokens": 200}
                }
            }))
            .send()
            .expect("score request");
        assert_eq!(response.status().as_u16(), 200, "{}", response.body);
        assert!(response.json()["output"].is_string());
    }
    drop(cluster);
    assert!(
        !dir.join("pids").exists(),
        "stop should clean up the state directory"
    );
}
