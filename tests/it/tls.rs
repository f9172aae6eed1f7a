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
