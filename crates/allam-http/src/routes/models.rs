//! `GET /v1/models` and `GET /v1/models/{model}`: the one served model, in OpenAI's list
//! shape plus vLLM's `max_model_len`.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::state::AppState;

#[derive(Debug, Serialize)]
struct ModelCard {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    root: String,
    max_model_len: u32,
}

#[derive(Debug, Serialize)]
struct ModelList {
    object: &'static str,
    data: Vec<ModelCard>,
}

fn card(state: &AppState) -> ModelCard {
    ModelCard {
        id: state.model_name().to_owned(),
        object: "model",
        created: state.started_unix(),
        owned_by: "allam-serve",
        root: state.model_name().to_owned(),
        max_model_len: state.max_context(),
    }
}

pub(crate) async fn list(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match state.authorize(&headers) {
        Ok(()) => Json(ModelList {
            object: "list",
            data: vec![card(&state)],
        })
        .into_response(),
        Err(err) => err.into_response(),
    }
}

pub(crate) async fn retrieve(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(model): Path<String>,
) -> Response {
    let result = state
        .authorize(&headers)
        .and_then(|()| state.check_model(Some(&model)));
    match result {
        Ok(()) => Json(card(&state)).into_response(),
        Err(err) => err.into_response(),
    }
}
