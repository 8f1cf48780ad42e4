//! The HTTP/JSON API on axum: the same operations as gRPC, with
//! `Authorization: Bearer` and the OpenAPI document at `/openapi.json`
//! (built from the config by `openapi.rs`: keep the two in step). Every
//! error has the body `{"error": {"code", "message"}}`; a value or body over
//! `cache.max_value_bytes` is 413.
//!
//! | route | operation |
//! |---|---|
//! | `GET /v1/t/{tenant}/r/{resource}?<param>=…` | Get a resource (named parameters, or `p=` repeated in order) |
//! | `DELETE /v1/t/{tenant}/r/{resource}?…` | Delete a resource entry |
//! | `GET /v1/t/{tenant}/k/{key}` | Get an explicit key (raw bytes; 404 with `x-herald-fill-token` on a miss) |
//! | `PUT /v1/t/{tenant}/k/{key}?ttl_ms=&tag=…` | Set an explicit key (body: the value) |
//! | `DELETE /v1/t/{tenant}/k/{key}` | Delete an explicit key |
//! | `POST /v1/t/{tenant}/k/{key}/add?ttl_ms=&tag=…` | Add: Set only when nothing is cached (409 when something is) |
//! | `POST /v1/t/{tenant}/k/{key}/incr` | Incr (body `{"delta": n}`; 404 when nothing is cached) |
//! | `POST /v1/t/{tenant}/get` | GetMany |
//! | `POST /v1/t/{tenant}/invalidate` | InvalidateTags or InvalidatePrefix |
//! | `POST /v1/t/{tenant}/w/{command}` | Write: a configured command (`write.rs`) |

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use herald_core::keys::TenantId;
use herald_proto::v1::Layer;
use serde::Deserialize;

use crate::api::{self, Target};
use crate::auth::{Auth, Caller, bearer};
use crate::cache::{Answer, Cache};
use crate::error::{Error, Result};

#[derive(Clone)]
pub struct HttpState {
    pub cache: Arc<Cache>,
    pub auth: Arc<Auth>,
    pub writer: Arc<crate::write::Writer>,
}

/// The HTTP routes; `max_value_bytes` bounds request bodies (413 past it).
pub fn router(state: HttpState, max_value_bytes: usize) -> Router {
    let cache = &state.cache;
    let param_schema = |name: &str, i: usize| {
        cache.resource(name).map_or_else(|_| serde_json::json!({ "type": "string" }), |r| r.param_schema(i))
    };
    let document = Bytes::from(crate::openapi::document(cache.config(), &param_schema).to_string());
    Router::new()
        .route(
            "/openapi.json",
            get(move || std::future::ready(([(header::CONTENT_TYPE, "application/json")], document.clone()))),
        )
        .route("/v1/t/{tenant}/r/{resource}", get(get_resource).delete(delete_resource))
        .route("/v1/t/{tenant}/k/{key}", get(get_key).put(put_key).delete(delete_key))
        .route("/v1/t/{tenant}/k/{key}/add", post(add_key))
        .route("/v1/t/{tenant}/k/{key}/incr", post(incr_key))
        .route("/v1/t/{tenant}/get", post(get_many))
        .route("/v1/t/{tenant}/invalidate", post(invalidate))
        .route("/v1/t/{tenant}/w/{command}", post(crate::write::http_write))
        .layer(DefaultBodyLimit::max(max_value_bytes + 64 * 1024))
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::middleware::from_fn(trace))
        .with_state(state)
}

/// One span per request, with its method, path and status.
async fn trace(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use tracing::Instrument as _;
    let span = tracing::info_span!("http", method = %request.method(), path = %request.uri().path(), status = tracing::field::Empty);
    let response = next.run(request).instrument(span.clone()).await;
    span.record("status", response.status().as_u16());
    response
}

/// Every error in the documented `{"error": {"code", "message"}}` form,
/// axum's own too (an unknown route, a path that is not UTF-8, a body over
/// the limit), which come as plain text.
async fn json_errors(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json =
        response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let code = match status {
        StatusCode::BAD_REQUEST => "invalid_argument",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => TOO_LARGE,
        _ => "http_error",
    };
    let mut message = String::from_utf8_lossy(&text).trim().to_string();
    if message.is_empty() {
        message = status.canonical_reason().unwrap_or("error").to_ascii_lowercase();
    }
    let mut response = error_body(status, code, &message);
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            response.headers_mut().append(name, value.clone());
        }
    }
    response
}

/// The error code of a 413: a value or request body over the size limit.
const TOO_LARGE: &str = "too_large";

fn error_body(status: StatusCode, code: &str, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": { "code": code, "message": message } }))).into_response()
}

fn layer_name(layer: Layer) -> &'static str {
    match layer {
        Layer::L1 => "l1",
        Layer::L2 => "l2",
        Layer::Database => "database",
        Layer::None | Layer::Unspecified => "none",
    }
}

impl HttpState {
    pub(crate) fn tenant(&self, headers: &HeaderMap, tenant: &str) -> Result<(Caller, TenantId)> {
        let header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let caller = self.auth.authenticate(bearer(header))?;
        let tenant = caller.tenant(tenant)?;
        Ok((caller, tenant))
    }
}

/// Decodes `application/x-www-form-urlencoded` pairs, keeping repeats.
pub fn query_pairs(raw: Option<&str>) -> Result<Vec<(String, String)>> {
    let Some(raw) = raw else { return Ok(Vec::new()) };
    raw.split('&')
        .filter(|s| !s.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

fn percent_decode(s: &str) -> Result<String> {
    let bad = || Error::InvalidArgument(format!("bad percent-encoding in query: {s:?}"));
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s.get(i + 1..i + 3).filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit())).ok_or_else(bad)?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// `x-herald-min-lsn`: a Postgres LSN (`16/B374D848`) or its 64-bit value,
/// exactly as `openapi::LSN_PATTERN` states.
pub fn min_lsn(headers: &HeaderMap) -> Result<u64> {
    let Some(value) = headers.get("x-herald-min-lsn") else { return Ok(0) };
    let bad = || Error::InvalidArgument("x-herald-min-lsn: expected an LSN like 16/B374D848".into());
    let s = value.to_str().map_err(|_| bad())?.trim();
    let hex = |h: &str| (1..=8).contains(&h.len()) && h.bytes().all(|b| b.is_ascii_hexdigit());
    match s.split_once('/') {
        Some((hi, lo)) if hex(hi) && hex(lo) => {
            let hi = u64::from_str_radix(hi, 16).map_err(|_| bad())?;
            let lo = u64::from_str_radix(lo, 16).map_err(|_| bad())?;
            Ok(hi << 32 | lo)
        }
        None if !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().map_err(|_| bad()),
        _ => Err(bad()),
    }
}

/// The resource's parameters from the query: by name, or `p` in order.
fn resource_params(cache: &Cache, resource: &str, pairs: Vec<(String, String)>) -> Result<Vec<String>> {
    let res = cache.resource(resource)?;
    if pairs.iter().all(|(k, _)| k == "p") {
        return Ok(pairs.into_iter().map(|(_, v)| v).collect());
    }
    let mut params = Vec::with_capacity(res.params.len());
    for name in &res.params {
        let mut values = pairs.iter().filter(|(k, _)| k == name);
        let value = values.next().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "resource {resource:?} takes parameters {}; {name:?} is missing",
                res.params.join(", ")
            ))
        })?;
        if values.next().is_some() {
            return Err(Error::InvalidArgument(format!("parameter {name:?} given twice")));
        }
        params.push(value.1.clone());
    }
    if let Some((k, _)) = pairs.iter().find(|(k, _)| !res.params.contains(k)) {
        return Err(Error::InvalidArgument(format!(
            "resource {resource:?} has no parameter {k:?} (it takes {})",
            res.params.join(", ")
        )));
    }
    Ok(params)
}

fn json_answer(answer: &Answer) -> String {
    let value = if answer.value.is_empty() { "null" } else { std::str::from_utf8(&answer.value).unwrap_or("null") };
    let pending = if answer.pending { r#","pending":true"# } else { "" };
    format!(r#"{{"found":{},"layer":"{}","value":{value}{pending}}}"#, answer.found, layer_name(answer.layer))
}

async fn get_resource(
    State(state): State<HttpState>,
    Path((tenant, resource)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response> {
    let (_, tenant) = state.tenant(&headers, &tenant)?;
    let params = resource_params(&state.cache, &resource, query_pairs(query.as_deref())?)?;
    let answer = state.cache.get_resource(&tenant, &resource, &params, min_lsn(&headers)?).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], json_answer(&answer)).into_response())
}

async fn delete_resource(
    State(state): State<HttpState>,
    Path((tenant, resource)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response> {
    let (caller, tenant) = state.tenant(&headers, &tenant)?;
    let params = resource_params(&state.cache, &resource, query_pairs(query.as_deref())?)?;
    let deleted = state.cache.delete_resource(&tenant, &resource, &params, caller.trusted()).await?;
    Ok(axum::Json(serde_json::json!({ "deleted": deleted })).into_response())
}

async fn get_key(
    State(state): State<HttpState>,
    Path((tenant, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response> {
    let (_, tenant) = state.tenant(&headers, &tenant)?;
    let answer = state.cache.get_key(&tenant, &key, min_lsn(&headers)?).await?;
    let layer = HeaderValue::from_static(layer_name(answer.layer));
    if !answer.found {
        let mut response = (StatusCode::NOT_FOUND, axum::Json(serde_json::json!({ "found": false }))).into_response();
        if let Ok(token) = HeaderValue::from_str(&answer.fill_token) {
            response.headers_mut().insert("x-herald-fill-token", token);
        }
        response.headers_mut().insert("x-herald-layer", layer);
        return Ok(response);
    }
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")),
            (header::HeaderName::from_static("x-herald-layer"), layer),
        ],
        answer.value,
    )
        .into_response())
}

async fn put_key(
    State(state): State<HttpState>,
    Path((tenant, key)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    let (_, tenant) = state.tenant(&headers, &tenant)?;
    if let Some(response) = too_large(&state, &body) {
        return Ok(response);
    }
    let header_token = headers.get("x-herald-fill-token").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let KeyQuery { ttl_ms, tags, fill_token } = key_query(query.as_deref(), header_token, true)?;
    let stored = state.cache.set_key(&tenant, &key, body, ttl_ms, tags, &fill_token).await?;
    let status = if stored { StatusCode::OK } else { StatusCode::CONFLICT };
    Ok((status, axum::Json(serde_json::json!({ "stored": stored }))).into_response())
}

/// The query of PUT and of Add: `ttl_ms`, `tag` (repeated) and, where a
/// fill token is allowed, `fill_token` (over the header's).
struct KeyQuery {
    ttl_ms: u64,
    tags: Vec<String>,
    fill_token: String,
}

fn key_query(query: Option<&str>, header_token: &str, token_allowed: bool) -> Result<KeyQuery> {
    let mut q = KeyQuery { ttl_ms: 0, tags: Vec::new(), fill_token: header_token.to_string() };
    for (k, v) in query_pairs(query)? {
        match k.as_str() {
            "ttl_ms" => {
                q.ttl_ms = v.parse().map_err(|_| Error::InvalidArgument(format!("ttl_ms: {v:?} is not a number")))?
            }
            "tag" => q.tags.push(v),
            "fill_token" if token_allowed => q.fill_token = v,
            other => {
                let known = if token_allowed { "ttl_ms, tag, fill_token" } else { "ttl_ms, tag" };
                return Err(Error::InvalidArgument(format!("unknown query parameter {other:?} ({known})")));
            }
        }
    }
    Ok(q)
}

fn too_large(state: &HttpState, body: &Bytes) -> Option<Response> {
    let max = state.cache.config().max_value_bytes;
    (body.len() > max).then(|| {
        let message = format!("value of {} bytes is over the limit of {max} (cache.max_value_bytes)", body.len());
        error_body(StatusCode::PAYLOAD_TOO_LARGE, TOO_LARGE, &message)
    })
}

async fn add_key(
    State(state): State<HttpState>,
    Path((tenant, key)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    let (_, tenant) = state.tenant(&headers, &tenant)?;
    if let Some(response) = too_large(&state, &body) {
        return Ok(response);
    }
    let KeyQuery { ttl_ms, tags, .. } = key_query(query.as_deref(), "", false)?;
    let stored = state.cache.add_key(&tenant, &key, body, ttl_ms, tags).await?;
    let status = if stored { StatusCode::OK } else { StatusCode::CONFLICT };
    Ok((status, axum::Json(serde_json::json!({ "stored": stored }))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IncrBody {
    delta: i64,
}

async fn incr_key(
    State(state): State<HttpState>,
    Path((tenant, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    let (_, tenant) = state.tenant(&headers, &tenant)?;
    let body: IncrBody = json_body(&body)?;
    Ok(match state.cache.incr_key(&tenant, &key, body.delta).await? {
        Some(value) => axum::Json(serde_json::json!({ "found": true, "value": value })).into_response(),
        None => (StatusCode::NOT_FOUND, axum::Json(serde_json::json!({ "found": false }))).into_response(),
    })
}

async fn delete_key(
    State(state): State<HttpState>,
    Path((tenant, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response> {
    let (_, tenant) = state.tenant(&headers, &tenant)?;
    let deleted = state.cache.delete_key(&tenant, &key).await?;
    Ok(axum::Json(serde_json::json!({ "deleted": deleted })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetManyBody {
    items: Vec<GetItemBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetItemBody {
    #[serde(default)]
    resource: Option<String>,
    #[serde(default)]
    params: Vec<String>,
    #[serde(default)]
    key: Option<String>,
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::InvalidArgument(format!("request body: {e}")))
}

async fn get_many(
    State(state): State<HttpState>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    let (_, tenant) = state.tenant(&headers, &tenant)?;
    let body: GetManyBody = json_body(&body)?;
    let lsn = min_lsn(&headers)?;
    let items = body
        .items
        .into_iter()
        .map(|item| match (item.resource, item.key) {
            (Some(name), None) => Ok(Target::Resource { name, params: item.params }),
            (None, Some(k)) => Ok(Target::Key(k)),
            _ => Err(Error::InvalidArgument("each item names a resource or a key".into())),
        })
        .collect();
    // Each item as JSON, with the comma that separates it from the next.
    let results = api::get_many(&state.cache, &tenant, items, lsn, json_item, |s| s.len() + 1).await?;
    let mut out = String::with_capacity(results.iter().map(|s| s.len() + 1).sum::<usize>() + 16);
    out.push_str(r#"{"results":["#);
    for (i, item) in results.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(item);
    }
    out.push_str("]}");
    Ok(([(header::CONTENT_TYPE, "application/json")], out).into_response())
}

/// One GetMany item: JSON values inline, anything else as base64.
fn json_item(r: Result<Answer>) -> String {
    match r {
        Ok(a) if a.layer == Layer::None || a.layer == Layer::Unspecified || !is_json(&a) => serde_json::json!({
            "found": a.found, "layer": layer_name(a.layer), "value_base64": base64(&a.value), "fill_token": a.fill_token
        })
        .to_string(),
        Ok(a) => json_answer(&a),
        Err(e) => serde_json::json!({ "error": { "code": e.kind(), "message": e.to_string() } }).to_string(),
    }
}

fn is_json(a: &Answer) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(&a.value).is_ok()
}

pub fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InvalidateBody {
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    resource: String,
    #[serde(default)]
    key_prefix: String,
    #[serde(default)]
    all: bool,
}

async fn invalidate(
    State(state): State<HttpState>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    let (caller, tenant) = state.tenant(&headers, &tenant)?;
    let body: InvalidateBody = json_body(&body)?;
    let deleted = if !body.tags.is_empty() {
        if !body.resource.is_empty() || !body.key_prefix.is_empty() || body.all {
            return Err(Error::InvalidArgument("give tags, or one of resource, key_prefix and all".into()));
        }
        state.cache.invalidate_tags(&tenant, body.tags).await?
    } else {
        let target = api::prefix_target(&body.resource, &body.key_prefix, body.all)?;
        state.cache.invalidate_prefix(&tenant, target, caller.trusted()).await?
    };
    Ok(axum::Json(serde_json::json!({ "deleted": deleted })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_queries_and_lsns() {
        let pairs = query_pairs(Some("slug=a%20b&p=x+y&t=%E2%9C%93")).unwrap();
        assert_eq!(pairs[0], ("slug".into(), "a b".into()));
        assert_eq!(pairs[1], ("p".into(), "x y".into()));
        assert_eq!(pairs[2].1, "✓");
        assert!(query_pairs(Some("a=%zz")).is_err());
        let mut h = HeaderMap::new();
        h.insert("x-herald-min-lsn", HeaderValue::from_static("16/B374D848"));
        assert_eq!(min_lsn(&h).unwrap(), 0x16_B374_D848);
        h.insert("x-herald-min-lsn", HeaderValue::from_static("12345"));
        assert_eq!(min_lsn(&h).unwrap(), 12345);
        for bad in ["nope", "+1", "16/", "/1", "123456789/1", "1/+2", "99999999999999999999"] {
            h.insert("x-herald-min-lsn", HeaderValue::from_static(bad));
            assert!(min_lsn(&h).is_err(), "{bad}");
        }
    }

    #[test]
    fn percent_needs_two_hex_digits() {
        // Found by `make fuzz` (cache_api_http): `%+0` decoded to a NUL byte.
        assert!(query_pairs(Some("\u{6}&%+0+++000000000")).is_err());
        assert!(query_pairs(Some("a=%+1")).is_err());
        assert!(query_pairs(Some("a=%-1")).is_err());
        assert_eq!(query_pairs(Some("a=%2B1")).unwrap(), vec![("a".into(), "+1".into())]);
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
