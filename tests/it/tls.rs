//! TLS on the public gRPC port: `allam serve --tls-cert --tls-key` with a throwaway
//! certificate made in the test; a client that trusts it chats, a plaintext client cannot.

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
}
