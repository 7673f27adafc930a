//! The web console under `/console` (see `docs/console.md`): a single page of plain
//! JavaScript, embedded in the binary, that signs in with the admin token and then uses the
//! management API with a session cookie.
//!
//! Invariants:
//! - Open without a session: the page itself (`/console`, which is the sign-in form until a
//!   session exists), its two assets, `POST /console/session` (sign-in) and `GET
//!   /console/session` (`{"signed_in": false}` without one). Every other console route
//!   answers 401 without a live session.
//! - Every console answer carries a strict Content-Security-Policy (no inline script or
//!   style, nothing from another origin, no framing), `X-Content-Type-Options: nosniff` and
//!   `Referrer-Policy: no-referrer`; session answers are `Cache-Control: no-store`.
//! - The page renders data only through DOM text (never markup), so an event's contents
//!   cannot run in the console.

pub mod session;

use std::net::IpAddr;

use actix_web::http::header::{self, ContentType};
use actix_web::middleware::DefaultHeaders;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde_json::json;

use crate::api::management::error::ApiError;
use crate::request_id::RequestId;
use session::SessionStore;

/// The console's Content-Security-Policy.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// Largest sign-in body.
const MAX_SIGN_IN_BYTES: usize = 4096;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// Registers the console's routes. A `web::Data<SessionStore>` must be in the app data.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/console")
            .wrap(
                DefaultHeaders::new()
                    .add((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
                    .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
                    .add((header::REFERRER_POLICY, "no-referrer"))
                    .add((header::X_FRAME_OPTIONS, "DENY")),
            )
            .route("", web::get().to(index))
            .route("/", web::get().to(index))
            .route("/app.js", web::get().to(app_js))
            .route("/app.css", web::get().to(app_css))
            .service(
                web::resource("/session")
                    .route(web::post().to(sign_in))
                    .route(web::get().to(current))
                    .route(web::delete().to(sign_out)),
            )
            .route("/sign-out", web::post().to(sign_out))
            .default_service(web::to(not_found)),
    );
}

/// The store the app data holds.
pub fn store(admin: Option<[u8; 32]>, trusted_proxies: Vec<IpAddr>) -> web::Data<SessionStore> {
    web::Data::new(SessionStore::new(admin, trusted_proxies))
}

fn request_id(request: &HttpRequest) -> String {
    request
        .extensions()
        .get::<RequestId>()
        .map(|id| id.0.clone())
        .unwrap_or_default()
}

fn refuse(request: &HttpRequest, error: ApiError) -> HttpResponse {
    let mut response = error.response(&request_id(request));
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

async fn index() -> HttpResponse {
    HttpResponse::Ok()
        .content_type(ContentType::html())
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(INDEX_HTML)
}

async fn app_js() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(APP_JS)
}

async fn app_css() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(APP_CSS)
}

/// The live session of the request, with its CSRF token; checks CSRF on unsafe methods.
fn session_of(request: &HttpRequest, store: &SessionStore) -> Result<(String, String), ApiError> {
    let id = session::cookie(request.headers()).ok_or(ApiError::InvalidSession)?;
    let csrf = store.authorize(request, &id)?;
    Ok((id, csrf))
}

/// `POST /console/session` with `{"token": "<admin token>"}`: a session cookie and
/// `{"csrf_token", "expires_in_secs"}`.
async fn sign_in(
    request: HttpRequest,
    store: web::Data<SessionStore>,
    mut payload: web::Payload,
) -> HttpResponse {
    if !session::same_origin(request.headers()) {
        return refuse(
            &request,
            ApiError::CrossSite("sign-in must come from the console's own page"),
        );
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let Ok(chunk) = chunk else {
            return refuse(&request, ApiError::parameter("body", "unreadable body"));
        };
        if body.len() + chunk.len() > MAX_SIGN_IN_BYTES {
            return refuse(&request, ApiError::BodyTooLarge(MAX_SIGN_IN_BYTES));
        }
        body.extend_from_slice(&chunk);
    }
    let token = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("token")?.as_str().map(str::to_string));
    let Some(token) = token else {
        return refuse(
            &request,
            ApiError::parameter("token", "the body must be {\"token\": \"<admin token>\"}"),
        );
    };
    let peer = request.peer_addr().map(|addr| addr.ip());
    match store.sign_in(peer, token.trim()) {
        Ok(new) => HttpResponse::Ok()
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .insert_header((
                header::SET_COOKIE,
                session::set_cookie(&new, store.secure(&request)),
            ))
            .json(json!({"csrf_token": new.csrf, "expires_in_secs": new.ttl.as_secs()})),
        Err(e) => {
            tracing::info!(reason = e.reason(), "console sign-in refused");
            refuse(&request, e)
        }
    }
}

/// `GET /console/session`: whether the request has a live session and, if so, its CSRF
/// token (the page reads it after a reload). Part of sign-in, so it answers 200 either way
/// (`{"signed_in": false}` reveals nothing) and the sign-in page loads without an error.
async fn current(request: HttpRequest, store: web::Data<SessionStore>) -> HttpResponse {
    let body = match session_of(&request, &store) {
        Ok((_, csrf)) => json!({ "signed_in": true, "csrf_token": csrf }),
        Err(_) => json!({ "signed_in": false }),
    };
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(body)
}

/// `DELETE /console/session` (or `POST /console/sign-out`): ends the session.
async fn sign_out(request: HttpRequest, store: web::Data<SessionStore>) -> HttpResponse {
    match session_of(&request, &store) {
        Ok((id, _)) => {
            store.sign_out(&id);
            HttpResponse::Ok()
                .insert_header((header::CACHE_CONTROL, "no-store"))
                .insert_header((
                    header::SET_COOKIE,
                    session::clear_cookie(store.secure(&request)),
                ))
                .json(json!({ "signed_out": true }))
        }
        Err(e) => refuse(&request, e),
    }
}

async fn not_found(request: HttpRequest, store: web::Data<SessionStore>) -> HttpResponse {
    let error = match session_of(&request, &store) {
        Ok(_) => ApiError::NotFound(format!("no route {}", request.path())),
        Err(e) => e,
    };
    refuse(&request, error)
}
