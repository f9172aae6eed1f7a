//! TLS on the public ports: `allam serve --tls-cert --tls-key` with a throwaway certificate
//! made in the test. Over gRPC and HTTPS a client that trusts it gets the golden answer; a
//! plaintext client gets nothing.

use allam_proto::v1::generation_client::GenerationClient;
use allam_proto::v1::{ChatRequest, Message, SamplingParams};

use crate::support::{goldens, tiny_model, Serve};

fn chat() -> ChatRequest {
    ChatRequest {
        messages: vec![Message {
            role: "user".into(),
            content: "How do I prepare a cup of tea?".into(),
        }],
        params: Some(SamplingParams {
            do_sample: Some(false),
            max_new_tokens: Some(24),
            ..SamplingParams::default()
        }),
        model: None,
    }
}

#[test]
fn serve_speaks_tls_on_the_grpc_port() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("self-signed certificate");
    let cert_pem = certified.cert.pem();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, &cert_pem).expect("write cert");
    std::fs::write(&key, certified.key_pair.serialize_pem()).expect("write key");
    let model = tiny_model();
    let serve = Serve::start(
        &["--model", &model],
        &[
            "--tls-cert",
            cert.to_str().expect("utf-8"),
            "--tls-key",
            key.to_str().expect("utf-8"),
        ],
    );
    let addr = serve.grpc.trim_start_matches("http://").to_owned();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .expect("url")
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&cert_pem))
                    .domain_name("localhost"),
            )
            .expect("client TLS config")
            .connect()
            .await
            .expect("TLS handshake");
        let answer = GenerationClient::new(channel)
            .chat(chat())
            .await
            .expect("chat over TLS")
            .into_inner();
        assert_eq!(
            answer.text,
            goldens("tiny-allam")["cases"][0]["greedy"]["text"]
                .as_str()
                .expect("golden text")
        );

        let plaintext = async {
            let mut client = GenerationClient::connect(format!("http://{addr}")).await?;
            client.chat(chat()).await.map_err(Into::into).map(|_| ())
        };
        let result: Result<(), Box<dyn std::error::Error>> = plaintext.await;
        assert!(result.is_err(), "a plaintext client must not be served");
    });

    // HTTPS with curl (a real client), trusting only the throwaway certificate.
    let http = serve.http.trim_start_matches("http://");
    let port = http.rsplit_once(':').map(|(_, p)| p).expect("port");
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": "How do I prepare a cup of tea?"}],
        "temperature": 0, "max_tokens": 24
    });
    let output = std::process::Command::new("curl")
        .args([
            "-sS",
            "--fail-with-body",
            "--cacert",
            cert.to_str().expect("utf-8"),
            "--resolve",
            &format!("localhost:{port}:127.0.0.1"),
            "-H",
            "content-type: application/json",
            "-d",
            &body.to_string(),
            &format!("https://localhost:{port}/v1/chat/completions"),
        ])
        .output()
        .expect("curl");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        goldens("tiny-allam")["cases"][0]["greedy"]["text"]
    );
    let plaintext = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "5", &format!("http://{http}/health")])
        .output()
        .expect("curl");
    assert!(
        !String::from_utf8_lossy(&plaintext.stdout).contains("ok") || !plaintext.status.success(),
        "plaintext HTTP must not be served on a TLS port"
    );
}

/// Writes `name`.pem and `name`.key signed by `ca`, for `san`, with the given key usage.
fn issue(
    dir: &std::path::Path,
    name: &str,
    san: &str,
    usage: rcgen::ExtendedKeyUsagePurpose,
    ca: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec![san.to_owned()]).expect("params");
    params.extended_key_usages = vec![usage];
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, ca, ca_key).expect("sign");
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    (
        cert_path.to_string_lossy().into_owned(),
        key_path.to_string_lossy().into_owned(),
    )
}

/// Router ↔ worker over mutual TLS with a throwaway CA: a router holding a certificate the
/// CA signed is served; one without is not.
#[test]
fn router_and_worker_speak_mutual_tls() {
    use crate::support::{
        http_client, http_get_status, registered_groups, start_router, wait_until, EtcdServer,
        Worker,
    };
    use std::time::Duration;

    let dir = tempfile::tempdir().expect("temp dir");
    let mut ca_params = rcgen::CertificateParams::new(Vec::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).expect("write CA");
    let ca_path = ca_path.to_string_lossy().into_owned();
    let server_auth = rcgen::ExtendedKeyUsagePurpose::ServerAuth;
    let client_auth = rcgen::ExtendedKeyUsagePurpose::ClientAuth;
    let (worker_cert, worker_key) = issue(
        dir.path(),
        "worker",
        "allam-worker",
        server_auth,
        &ca,
        &ca_key,
    );
    let (router_cert, router_key) = issue(
        dir.path(),
        "router",
        "allam-router",
        client_auth,
        &ca,
        &ca_key,
    );

    let etcd = EtcdServer::start().expect("etcd (Debian etcd-server) must be installed");
    let endpoint = etcd.endpoint();
    let worker_tls = [
        "--internal-tls-ca",
        ca_path.as_str(),
        "--internal-tls-cert",
        worker_cert.as_str(),
        "--internal-tls-key",
        worker_key.as_str(),
    ];
    let _worker = Worker::start("g0", &endpoint, dir.path(), &worker_tls, &[]);
    let router_tls = [
        "--internal-tls-ca",
        ca_path.as_str(),
        "--internal-tls-cert",
        router_cert.as_str(),
        "--internal-tls-key",
        router_key.as_str(),
    ];
    let (router, http) = start_router(&endpoint, dir.path(), &router_tls, &[]);
    let (plain_router, plain_http) = start_router(&endpoint, dir.path(), &[], &[]);
    wait_until("the group registered", Duration::from_secs(90), || {
        registered_groups(&endpoint) == vec!["g0".to_owned()]
    });
    wait_until("the mTLS router is ready", Duration::from_secs(60), || {
        http_get_status(&format!("{http}/ready")) == Some(200)
    });
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": "How do I prepare a cup of tea?"}],
        "temperature": 0, "max_tokens": 24
    });
    let client = http_client::blocking_client();
    let answer = client
        .post(&format!("{http}/v1/chat/completions"))
        .json(&body)
        .send()
        .expect("chat");
    assert_eq!(
        answer.status().as_u16(),
        200,
        "{}\n{}",
        answer.body,
        router.log_text()
    );
    assert_eq!(
        answer.json()["choices"][0]["message"]["content"],
        goldens("tiny-allam")["cases"][0]["greedy"]["text"]
    );
    // The plaintext router cannot reach the worker: it never becomes ready, and a request
    // is refused as unavailable rather than served.
    let refused = client
        .post(&format!("{plain_http}/v1/chat/completions"))
        .json(&body)
        .send()
        .expect("chat");
    assert_eq!(
        refused.status().as_u16(),
        503,
        "{}\n{}",
        refused.body,
        plain_router.log_text()
    );
}
