//! The simulator's HTTP surface: Refiner's `/v1` routes behind fault injection and the call
//! log, and the `/_sim` control routes (never faulted, never logged).
//!
//! Order of work for every request outside `/_sim`: read and parse the body, check the key,
//! log the call and decide its fault (one step, so counted faults hit calls in log order),
//! wait the configured latency, then answer the fault or handle the call. A faulted call
//! (other than drop-after) is answered before authentication and changes nothing.

use std::time::Duration;

use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use chrono::Utc;
use serde_json::{json, Map, Value};

use super::calls::{CallFilter, CallRecord};
use super::error::SimError;
use super::faults::{Decision, Fault, Faults};
use super::params::{self, authenticate, text_param, AuthMethod, AuthOutcome, BodyFormat, Params};
use super::segments::SegmentSpec;
use super::store::{iso, IdentifyInput, ListQuery, Lookup, TrackInput};
use super::{lock, SimState};

pub(super) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/_sim")
            .route("/calls", web::get().to(sim_calls))
            .route("/stats", web::get().to(sim_stats))
            .route("/state", web::get().to(sim_state))
            .route("/reset", web::post().to(sim_reset))
            .route("/faults", web::get().to(sim_get_faults))
            .route("/faults", web::post().to(sim_set_faults))
            .route("/segments", web::post().to(sim_define_segment)),
    )
    .default_service(web::to(api_call));
}

/// The Refiner routes the simulator implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Root,
    IdentifyUser,
    TrackEvent,
    Contacts,
    Contact,
    Account,
    Segments,
    SyncSegment,
    /// Under `/v1` but not implemented.
    UnknownV1,
    /// Outside `/v1` (and `/_sim`): logged, never faulted, always 404.
    Outside,
}

impl Route {
    fn of(path: &str) -> Route {
        let Some(rest) = path.strip_prefix("/v1") else {
            return Route::Outside;
        };
        match rest.trim_end_matches('/') {
            "" => Route::Root,
            "/identify-user" => Route::IdentifyUser,
            "/track-event" => Route::TrackEvent,
            "/contacts" => Route::Contacts,
            "/contact" => Route::Contact,
            "/account" => Route::Account,
            "/segments" => Route::Segments,
            "/sync-segment" => Route::SyncSegment,
            _ if rest.starts_with('/') => Route::UnknownV1,
            _ => Route::Outside,
        }
    }
}

async fn api_call(req: HttpRequest, body: web::Bytes, sim: web::Data<SimState>) -> HttpResponse {
    let route = Route::of(req.path());
    let (mut params, parse_error) = match params::parse(req.query_string(), req.headers(), &body) {
        Ok(params) => (params, None),
        Err(e) => (
            Params {
                map: Map::new(),
                format: BodyFormat::None,
            },
            Some(e),
        ),
    };
    let auth = authenticate(req.headers(), &mut params, &sim.keys);
    let record = CallRecord {
        seq: 0,
        at_ms: 0,
        answered_ms: None,
        method: req.method().to_string(),
        path: req.path().to_owned(),
        params: match parse_error {
            Some(_) => Value::Null,
            None => Value::Object(params.map.clone()),
        },
        user: text_param(&params.map, "id").or_else(|| text_param(&params.map, "email")),
        auth: auth.method,
        auth_ok: auth.ok,
        key_index: auth.key_index,
        fault: None,
        status: None,
        dropped: false,
    };
    let (seq, at_ms, decision) = {
        let mut calls = lock(&sim.calls);
        let decision = match route {
            Route::Outside => Decision {
                latency_ms: 0,
                fault: None,
                retry_after: None,
            },
            _ => lock(&sim.faults).decide(),
        };
        let mut record = record;
        record.fault = decision.fault;
        let (seq, at_ms) = calls.begin(record);
        (seq, at_ms, decision)
    };
    if decision.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(decision.latency_ms)).await;
    }
    let response = match decision.fault {
        Some(Fault::Drop) => None,
        Some(Fault::TooManyRequests) => Some(injected(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many requests; slow down",
            decision.retry_after,
        )),
        Some(Fault::ServerError) => Some(injected(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal server error",
            None,
        )),
        Some(Fault::Unavailable) => Some(injected(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service temporarily unavailable",
            decision.retry_after,
        )),
        Some(Fault::Unauthorized) => Some(injected(
            StatusCode::UNAUTHORIZED,
            "Unauthenticated: the API key was refused",
            None,
        )),
        Some(Fault::BadRequest) => Some(injected(
            StatusCode::BAD_REQUEST,
            "The call was refused",
            None,
        )),
        Some(Fault::DropAfter) | None => {
            let call = Call {
                route,
                method: req.method(),
                auth,
                parse_error,
                params: &params.map,
                seq,
                at_ms,
            };
            let answer = handle(&call, &sim).unwrap_or_else(|e| e.error_response());
            (decision.fault != Some(Fault::DropAfter)).then_some(answer)
        }
    };
    let status = response.as_ref().map(|r| r.status().as_u16());
    lock(&sim.calls).finish(seq, status);
    response.unwrap_or_else(dropped_connection)
}

/// An injected 429/500/503, with `Retry-After` when asked for.
fn injected(status: StatusCode, message: &str, retry_after: Option<u64>) -> HttpResponse {
    let mut builder = HttpResponse::build(status);
    if let Some(secs) = retry_after {
        builder.insert_header((header::RETRY_AFTER, secs.to_string()));
    }
    builder.json(json!({ "error": message }))
}

/// A response whose body fails before anything is written: the server closes the
/// connection without sending the status line, so the client sees the connection end
/// before a response, as when a proxy or a crashed process drops it.
fn dropped_connection() -> HttpResponse {
    HttpResponse::Ok().streaming(futures_util::stream::once(async {
        Err::<web::Bytes, std::io::Error>(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "connection dropped by fault injection",
        ))
    }))
}

/// One authenticated-or-not call, ready to handle.
struct Call<'a> {
    route: Route,
    method: &'a Method,
    auth: AuthOutcome,
    parse_error: Option<SimError>,
    params: &'a Map<String, Value>,
    seq: u64,
    at_ms: u64,
}

fn handle(call: &Call<'_>, sim: &SimState) -> Result<HttpResponse, SimError> {
    if call.route == Route::Outside {
        return Err(SimError::NotFound("not found"));
    }
    if !call.auth.ok {
        return Err(SimError::Unauthorized(match call.auth.method {
            AuthMethod::None => "an API key is required",
            _ => "the API key is wrong",
        }));
    }
    if let Some(e) = &call.parse_error {
        return Err(e.clone());
    }
    let method = call.method;
    match call.route {
        Route::Root => Ok(HttpResponse::Ok().json(json!({ "message": "ok" }))),
        Route::IdentifyUser if method == Method::POST => {
            let input = IdentifyInput::from_params(call.params, sim.options.long_strings)?;
            let uuid = lock(&sim.store).identify(input, Utc::now());
            Ok(HttpResponse::Ok().json(json!({ "message": "ok", "contact_uuid": uuid })))
        }
        Route::TrackEvent if method == Method::POST => {
            let input = TrackInput::from_params(call.params)?;
            lock(&sim.store).track(input, Utc::now(), call.at_ms, call.seq);
            Ok(HttpResponse::Ok().json(json!({ "message": "ok" })))
        }
        Route::Contacts if method == Method::GET => {
            let query = ListQuery::from_params(call.params)?;
            let page = lock(&sim.store).list(&query);
            Ok(HttpResponse::Ok().json(page))
        }
        Route::Contact if method == Method::GET => {
            let lookup = Lookup::from_params(call.params)?;
            let store = lock(&sim.store);
            store
                .find(&lookup)
                .and_then(|seq| store.contact_json(seq))
                .map(|contact| HttpResponse::Ok().json(contact))
                .ok_or(SimError::NotFound("contact not found"))
        }
        Route::Contact if method == Method::DELETE => {
            let lookup = Lookup::from_params(call.params)?;
            let mut store = lock(&sim.store);
            match store.find(&lookup) {
                Some(seq) if store.delete(seq) => {
                    Ok(HttpResponse::Ok().json(json!({ "message": "ok" })))
                }
                _ => Err(SimError::NotFound("contact not found")),
            }
        }
        Route::Account if method == Method::GET => Ok(HttpResponse::Ok().json(account_info(sim))),
        Route::Segments if method == Method::GET => {
            let page = positive_param(call.params, "page", 1)?;
            let length = positive_param(call.params, "page_length", 50)?;
            Ok(HttpResponse::Ok().json(lock(&sim.store).segments_page(page, length)))
        }
        Route::SyncSegment if method == Method::POST || method == Method::DELETE => {
            let lookup = Lookup::from_params(call.params)?;
            let segment = text_param(call.params, "segment_uuid")
                .ok_or_else(|| SimError::bad_request("a `segment_uuid` is required"))?;
            let member = method == Method::POST;
            let contact = lock(&sim.store).sync_segment(&lookup, &segment, member, Utc::now())?;
            Ok(HttpResponse::Ok().json(json!({
                "message": "ok",
                "contact_uuid": contact,
                "segment_uid": segment,
            })))
        }
        Route::UnknownV1 => Err(SimError::NotFound("not found")),
        _ => Err(SimError::MethodNotAllowed),
    }
}

/// A positive integer parameter (a number or its decimal string), or `default`.
fn positive_param(map: &Map<String, Value>, key: &str, default: u64) -> Result<u64, SimError> {
    match text_param(map, key) {
        None => Ok(default),
        Some(text) => text
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| SimError::bad_request(format!("`{key}` must be a positive integer"))),
    }
}

/// `GET /account`, shaped like Refiner's: one subscription and one "Production" environment
/// whose counters are the simulator's (mtu: contacts created, mte: events tracked, since
/// start or reset; page views and survey responses are always 0).
fn account_info(sim: &SimState) -> Value {
    let usage = lock(&sim.store).usage();
    let now = iso(&Utc::now());
    json!({
        "subscription": {
            "plan": "Simulator",
            "mtu_count_updated_at": now,
            "mtu_count": usage.contacts_created,
            "mtu_limit": 1_000_000,
            "mte_count_updated_at": now,
            "mte_count": usage.events_total,
            "mpv_count_updated_at": now,
            "mpv_count": 0,
            "mpv_limit": 1_000_000,
            "msr_count_updated_at": now,
            "msr_count": 0,
            "msr_limit": 1_000_000,
        },
        "environments": [{
            "uuid": sim.environment_uuid,
            "name": "Production",
            "mtu": usage.contacts_created,
            "mte": usage.events_total,
            "mpv": 0,
            "msr": 0,
        }]
    })
}

async fn sim_calls(filter: web::Query<CallFilter>, sim: web::Data<SimState>) -> HttpResponse {
    let calls = lock(&sim.calls);
    HttpResponse::Ok().json(json!({
        "stats": calls.stats(),
        "calls": calls.select(&filter),
    }))
}

async fn sim_stats(sim: web::Data<SimState>) -> HttpResponse {
    HttpResponse::Ok().json(sim.stats())
}

async fn sim_state(sim: web::Data<SimState>) -> HttpResponse {
    HttpResponse::Ok().json(sim.snapshot())
}

async fn sim_reset(sim: web::Data<SimState>) -> HttpResponse {
    sim.reset();
    HttpResponse::Ok().json(json!({ "message": "ok" }))
}

/// Defines a segment: `{"name", "uuid"?, "is_manual"?}`; answers `{"uuid", "name", "is_manual"}`.
async fn sim_define_segment(body: web::Bytes, sim: web::Data<SimState>) -> HttpResponse {
    match serde_json::from_slice::<SegmentSpec>(&body) {
        Ok(spec) if !spec.name.trim().is_empty() => {
            let (name, is_manual) = (spec.name.clone(), spec.is_manual);
            let uuid = sim.define_segment(spec);
            HttpResponse::Ok().json(json!({ "uuid": uuid, "name": name, "is_manual": is_manual }))
        }
        Ok(_) => HttpResponse::BadRequest().json(json!({ "error": "`name` must not be empty" })),
        Err(e) => HttpResponse::BadRequest().json(json!({ "error": e.to_string() })),
    }
}

async fn sim_get_faults(sim: web::Data<SimState>) -> HttpResponse {
    HttpResponse::Ok().json(sim.faults())
}

/// Replaces the fault configuration (an empty body clears every fault).
async fn sim_set_faults(body: web::Bytes, sim: web::Data<SimState>) -> HttpResponse {
    let faults = if body.trim_ascii().is_empty() {
        Ok(Faults::none())
    } else {
        serde_json::from_slice::<Faults>(&body).map_err(|e| e.to_string())
    };
    match faults.and_then(|f| sim.set_faults(f).map_err(|e| e.to_string())) {
        Ok(()) => HttpResponse::Ok().json(sim.faults()),
        Err(message) => HttpResponse::BadRequest().json(json!({ "error": message })),
    }
}
