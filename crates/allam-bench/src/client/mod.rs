//! The two transports a benchmark can drive, behind one `send` that streams a request and
//! returns its measurements. Each transport maps its own failures onto
//! [`FailureKind`](crate::measure::FailureKind) at the point they happen.

mod grpc;
mod http;
mod sse;

use crate::dataset::RequestSpec;
use crate::measure::{Failure, Success};
use crate::{Error, Target};

pub(crate) enum Client {
    Grpc(grpc::GrpcClient),
    Http(http::HttpClient),
}

impl Client {
    /// Opens the client; `max_in_flight` sizes the gRPC connection pool.
    pub(crate) async fn connect(target: &Target, max_in_flight: usize) -> Result<Client, Error> {
        match target {
            Target::Grpc { endpoint, api_key } => Ok(Client::Grpc(
                grpc::GrpcClient::connect(endpoint, api_key.as_deref(), max_in_flight).await?,
            )),
            Target::OpenAiHttp {
                base_url,
                model,
                api_key,
            } => Ok(Client::Http(http::HttpClient::new(
                base_url,
                model.as_deref(),
                api_key.as_deref(),
            )?)),
        }
    }

    /// Sends `spec` with sampling seed `seed` and reads the whole stream.
    pub(crate) async fn send(&self, spec: &RequestSpec, seed: u64) -> Result<Success, Failure> {
        match self {
            Client::Grpc(client) => client.send(spec, seed).await,
            Client::Http(client) => client.send(spec, seed).await,
        }
    }

    /// How many tokens the server's tokenizer makes of `text`, bos included.
    pub(crate) async fn count_tokens(&self, text: &str) -> Result<usize, Failure> {
        match self {
            Client::Grpc(client) => client.count_tokens(text).await,
            Client::Http(client) => client.count_tokens(text).await,
        }
    }
}
