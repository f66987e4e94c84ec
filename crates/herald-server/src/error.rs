//! The error answer of every HTTP endpoint and transport handshake: [`ApiError`], a status and
//! `{"error": {"code": C, "message": "..."}}`.

use axum::response::{IntoResponse, Response};
use herald_core::PublishError;
use herald_protocol::ErrorCode;
use http::{header, StatusCode};

/// An HTTP error answer: status `code` and a JSON body naming the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status, also the `code` in the body.
    pub code: u16,
    /// What went wrong.
    pub message: String,
}

impl ApiError {
    /// An error with status `code`.
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into() }
    }

    /// A 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, message)
    }

    fn from_code(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError::new(code.as_u16(), message)
    }

    /// The JSON body: `{"error": {"code": C, "message": "..."}}`.
    pub(crate) fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code).unwrap_or(StatusCode::BAD_REQUEST);
        let mut response = (status, axum::Json(self.body())).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<PublishError> for ApiError {
    fn from(e: PublishError) -> Self {
        ApiError::from_code(e.code(), e.to_string())
    }
}
