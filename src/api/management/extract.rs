//! How a management handler gets an authorized request and answers a refusal.
//!
//! [`Authorized`] and [`AuthorizedBody`] are extractors: actix checks the credentials (and
//! reads the parameters) before the handler runs, so a handler that takes one cannot skip
//! the check or do work first. [`Refusal`] is the handler's error, rendered through actix's
//! `ResponseError` as the API's envelope ([`ApiError::response`]) with the request's id.

use std::fmt;

use actix_web::dev::Payload;
use actix_web::http::StatusCode;
use actix_web::{web, FromRequest, HttpRequest, HttpResponse, ResponseError};
use futures_util::future::{ready, LocalBoxFuture, Ready};

use super::error::ApiError;
use super::params::Params;
use super::{authorized_body, authorized_query, request_id, ManagementState};

/// A refused management request: the error and the id of the request it answers.
#[derive(Debug)]
pub struct Refusal {
    error: ApiError,
    request_id: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl ResponseError for Refusal {
    fn status_code(&self) -> StatusCode {
        self.error.status()
    }

    fn error_response(&self) -> HttpResponse {
        tracing::debug!(reason = self.error.reason(), "management request refused");
        self.error.response(&self.request_id)
    }
}

/// A request whose credentials were checked, with its query's parameters.
pub struct Authorized {
    pub params: Params,
    pub state: web::Data<ManagementState>,
    request_id: String,
}

impl Authorized {
    /// The handler's answer: its error, if any, as a refusal of this request.
    pub fn answer(&self, outcome: Result<HttpResponse, ApiError>) -> Result<HttpResponse, Refusal> {
        outcome.map_err(|error| Refusal {
            error,
            request_id: self.request_id.clone(),
        })
    }
}

/// Like [`Authorized`], with the body's parameters (form or JSON, bounded) added.
pub struct AuthorizedBody(pub Authorized);

/// The management state and a refusal maker for `request`.
fn prepare(request: &HttpRequest) -> Result<(web::Data<ManagementState>, String), Refusal> {
    let request_id = request_id(request);
    match request.app_data::<web::Data<ManagementState>>() {
        Some(state) => Ok((state.clone(), request_id)),
        None => Err(Refusal {
            error: ApiError::Unavailable("the management API is not set up".into()),
            request_id,
        }),
    }
}

impl FromRequest for Authorized {
    type Error = Refusal;
    type Future = Ready<Result<Authorized, Refusal>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(prepare(request).and_then(|(state, request_id)| {
            match authorized_query(request, &state) {
                Ok(params) => Ok(Authorized {
                    params,
                    state,
                    request_id,
                }),
                Err(error) => Err(Refusal { error, request_id }),
            }
        }))
    }
}

impl FromRequest for AuthorizedBody {
    type Error = Refusal;
    type Future = LocalBoxFuture<'static, Result<AuthorizedBody, Refusal>>;

    fn from_request(request: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let request = request.clone();
        let body = web::Payload::from_request(&request, payload);
        Box::pin(async move {
            let (state, request_id) = prepare(&request)?;
            let refuse = |error| Refusal {
                error,
                request_id: request_id.clone(),
            };
            let body = body.await.map_err(|e| {
                refuse(ApiError::parameter("body", format!("unreadable body: {e}")))
            })?;
            let params = authorized_body(&request, &state, body)
                .await
                .map_err(refuse)?;
            Ok(AuthorizedBody(Authorized {
                params,
                state,
                request_id,
            }))
        })
    }
}
