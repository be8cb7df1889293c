//! The JSON API (`/api/v1/`): sessions (listed with filters and pages, kicked), bans (listed, lifted),
//! backends, reload, and the console's overview. Every answer is JSON; errors are `{"error": "..."}`.
//! Mutations need the operator role and each is an `admin_action` audit event naming the token's name.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Response, StatusCode};
use serde_json::{Value, json};

use super::AdminState;
use super::auth::{Caller, Role};
use crate::registry::Filter;
use crate::telemetry::audit::{AuditEvent, rfc3339};

/// Most entries one page holds.
pub const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;

/// One API request.
pub struct Call<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: &'a str,
    pub body: &'a [u8],
}

fn json_response(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    let mut response = super::text(status, "application/json", body);
    response.headers_mut().insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-store"));
    response
}

pub fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json_response(status, &json!({ "error": message }))
}

pub fn unauthorized() -> Response<Full<Bytes>> {
    let mut response = error(StatusCode::UNAUTHORIZED, "a valid token is required: Authorization: Bearer <token>");
    response.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, hyper::header::HeaderValue::from_static("Bearer"));
    response
}

/// `key=value&...`, percent-decoded.
fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit));
        match (bytes[i], hex) {
            (b'%', Some(h)) => {
                let digit = |d: u8| (d as char).to_digit(16).unwrap_or(0) as u8;
                out.push(digit(h[0]) * 16 + digit(h[1]));
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `offset` and `limit` of a listing.
fn page(pairs: &[(String, String)]) -> Result<(usize, usize), String> {
    let get = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let offset = get("offset").map_or(Ok(0), |v| v.parse::<usize>().map_err(|_| "offset: not a number".to_owned()))?;
    let limit =
        get("limit").map_or(Ok(DEFAULT_PAGE), |v| v.parse::<usize>().map_err(|_| "limit: not a number".to_owned()))?;
    if limit == 0 || limit > MAX_PAGE {
        return Err(format!("limit: 1 to {MAX_PAGE}"));
    }
    Ok((offset, limit))
}

pub async fn handle(state: &AdminState, caller: &Caller, call: Call<'_>) -> Response<Full<Bytes>> {
    let mutation = *call.method != Method::GET;
    if mutation && caller.role != Role::Operator {
        return error(StatusCode::FORBIDDEN, "this token is read-only");
    }
    let result = match (call.method, call.path) {
        (&Method::GET, "/api/v1/whoami") => Ok(json!({ "name": caller.name, "role": caller.role.as_str() })),
        (&Method::GET, "/api/v1/sessions") => sessions(state, call.query),
        (&Method::POST, "/api/v1/sessions/kick") => kick(state, caller, call.body),
        (&Method::GET, "/api/v1/bans") => bans(state, call.query),
        (&Method::DELETE, p) if p.starts_with("/api/v1/bans/") => {
            unban(state, caller, &p["/api/v1/bans/".len()..]).await
        }
        (&Method::GET, "/api/v1/backends") => Ok(backends(state)),
        (&Method::POST, "/api/v1/reload") => reload(state, caller),
        (&Method::GET, "/api/v1/overview") => Ok(super::console::overview(state)),
        (&Method::GET, "/api/v1/attention") => Ok(attention(state)),
        (&Method::GET, "/api/v1/standing") => standing(state, call.query),
        (_, p) if KNOWN.contains(&p) || p.starts_with("/api/v1/bans/") => {
            Err((StatusCode::METHOD_NOT_ALLOWED, "method not allowed".to_owned()))
        }
        _ => Err((StatusCode::NOT_FOUND, "no such endpoint".to_owned())),
    };
    match result {
        Ok(value) => json_response(StatusCode::OK, &value),
        Err((status, message)) => error(status, &message),
    }
}

const KNOWN: &[&str] = &[
    "/api/v1/whoami",
    "/api/v1/sessions",
    "/api/v1/sessions/kick",
    "/api/v1/bans",
    "/api/v1/backends",
    "/api/v1/reload",
    "/api/v1/overview",
    "/api/v1/attention",
    "/api/v1/standing",
];

type ApiResult = Result<Value, (StatusCode, String)>;

fn bad(message: impl Into<String>) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, message.into())
}

fn sessions(state: &AdminState, query: &str) -> ApiResult {
    let pairs = query_pairs(query);
    let (offset, limit) = page(&pairs).map_err(bad)?;
    let mut filter = Filter::default();
    for (key, value) in &pairs {
        match key.as_str() {
            "user" => filter.user = Some(value.clone()),
            "backend" => filter.backend = Some(value.clone()),
            "client" => filter.client_ip = Some(value.parse().map_err(|_| bad("client: not an IP address"))?),
            "offset" | "limit" => {}
            other => return Err(bad(format!("unknown parameter {other:?}"))),
        }
    }
    let shared = (state.current)();
    let found = shared.sessions.list(&filter);
    let listed: Vec<Value> = found
        .iter()
        .skip(offset)
        .take(limit)
        .map(|s| {
            let info = &s.info;
            let snap = s.snapshot();
            json!({
                "id": info.id,
                "user": info.user,
                "client_ip": info.client.ip().to_string(),
                "client_port": info.client.port(),
                "listener": info.listener.to_string(),
                "sni": info.sni,
                "tls_version": info.tls_version,
                "backend": info.backend,
                "started": rfc3339(info.started),
                "bytes_from_client": snap.bytes_from_client,
                "bytes_to_client": snap.bytes_to_client,
                "commands": snap.commands,
                "last_command": snap.last_command.map(|(c, _)| c),
                "last_command_at": snap.last_command.map(|(_, at)| rfc3339(at)),
                "idle": snap.idling,
                "client_name": info.client_name,
                "client_version": info.client_version,
            })
        })
        .collect();
    Ok(json!({ "total": found.len(), "offset": offset, "limit": limit, "sessions": listed }))
}

fn admin_event(caller: &Caller, action: &'static str, target: String, result: &'static str) -> AuditEvent {
    AuditEvent {
        admin: Some(caller.name.clone()),
        action: Some(action),
        target: Some(target),
        result: Some(result),
        event: "admin_action",
        ..AuditEvent::default()
    }
}

fn kick(state: &AdminState, caller: &Caller, body: &[u8]) -> ApiResult {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Kick {
        session: Option<String>,
        user: Option<String>,
    }
    let request: Kick = serde_json::from_slice(body)
        .map_err(|e| bad(format!("expected {{\"session\": \"<id>\"}} or {{\"user\": \"<name>\"}}: {e}")))?;
    let (filter, target) = match (request.session, request.user) {
        (Some(id), None) => (Filter { id: Some(id.clone()), ..Filter::default() }, format!("session:{id}")),
        (None, Some(user)) => (Filter { user: Some(user.clone()), ..Filter::default() }, format!("user:{user}")),
        _ => return Err(bad("give either \"session\" or \"user\"")),
    };
    let shared = (state.current)();
    let kicked = shared.sessions.kick(&filter);
    let result = if kicked > 0 { "success" } else { "not_found" };
    tracing::info!(event = "admin_action", admin = %caller.name, action = "kick", target = %target, kicked, "sessions kicked");
    shared.audit(&admin_event(caller, "kick", target, result));
    Ok(json!({ "kicked": kicked }))
}

fn bans(state: &AdminState, query: &str) -> ApiResult {
    let pairs = query_pairs(query);
    let (offset, limit) = page(&pairs).map_err(bad)?;
    let shared = (state.current)();
    let all = shared.defence.bans();
    let listed: Vec<Value> = all
        .iter()
        .skip(offset)
        .take(limit)
        .map(|(prefix, left, count)| json!({ "prefix": prefix.to_string(), "remaining_secs": left.as_secs(), "count": count }))
        .collect();
    Ok(json!({ "total": all.len(), "offset": offset, "limit": limit, "bans": listed }))
}

async fn unban(state: &AdminState, caller: &Caller, raw: &str) -> ApiResult {
    let shared = (state.current)();
    let text = percent_decode(raw);
    let prefix = match (text.parse::<ipnet::IpNet>(), text.parse::<std::net::IpAddr>()) {
        (Ok(net), _) => net.trunc(),
        (_, Ok(ip)) => shared.defence.prefix_of(ip),
        _ => return Err(bad(format!("{text:?} is neither a prefix (203.0.113.7/32) nor an address"))),
    };
    let lifted = shared.defence.unban(prefix).await;
    let result = if lifted { "success" } else { "not_found" };
    shared.audit(&admin_event(caller, "unban", prefix.to_string(), result));
    tracing::info!(event = "admin_action", admin = %caller.name, action = "unban", target = %prefix, lifted, "unban");
    if lifted {
        Ok(json!({ "unbanned": prefix.to_string() }))
    } else {
        Err((StatusCode::NOT_FOUND, format!("no ban in force on {prefix}")))
    }
}

/// `?ip=`: what the defence holds on the address's prefix: failures against its budget (which recent
/// successes raise: the crowd behind a NAT or a webmail server), successes, connections, a ban.
fn standing(state: &AdminState, query: &str) -> ApiResult {
    let pairs = query_pairs(query);
    let ip = pairs
        .iter()
        .find(|(k, _)| k == "ip")
        .and_then(|(_, v)| v.parse::<std::net::IpAddr>().ok())
        .ok_or_else(|| bad("give ip=<address>"))?;
    let (prefix, standing, banned) = (state.current)().defence.standing(ip);
    Ok(json!({
        "prefix": prefix.to_string(),
        "tracked": standing.is_some(),
        "failures": standing.as_ref().map(|s| (s.failures * 100.0).round() / 100.0),
        "budget": standing.as_ref().map(|s| s.tolerated),
        "successes": standing.as_ref().map(|s| (s.successes * 100.0).round() / 100.0),
        "unauthenticated": standing.as_ref().map(|s| s.unauthenticated),
        "logins_in_flight": standing.as_ref().map(|s| s.in_flight),
        "banned_secs": banned.map(|d| d.as_secs()),
    }))
}

fn backends(state: &AdminState) -> Value {
    let shared = (state.current)();
    let sessions = shared.sessions.per_backend();
    let listed: Vec<Value> = shared
        .config
        .backends
        .iter()
        .map(|b| {
            json!({
                "name": b.name,
                "address": format!("{}:{}", b.host, b.port),
                "tls_name": b.tls_name,
                "circuit": shared.circuits.state(b).as_str(),
                "up": shared.circuits.healthy(b),
                "sessions": sessions.get(&b.name).copied().unwrap_or(0),
            })
        })
        .collect();
    json!({ "backends": listed })
}

fn reload(state: &AdminState, caller: &Caller) -> ApiResult {
    let Some(reload) = &state.reload else {
        return Err((StatusCode::CONFLICT, "the configuration did not come from a file".to_owned()));
    };
    let outcome = reload(state);
    let shared = (state.current)();
    let result = if outcome.is_ok() { "success" } else { "failure" };
    shared.audit(&admin_event(caller, "reload", "configuration".to_owned(), result));
    match outcome {
        Ok(notes) => Ok(json!({ "result": "success", "unchanged_until_restart": notes })),
        Err(e) => Err((StatusCode::UNPROCESSABLE_ENTITY, format!("reload failed, the old configuration stays: {e}"))),
    }
}

/// The attention lists in full: accounts with a device retrying an old password, accounts over quota,
/// mailboxes a client keeps re-downloading, the slowest mailboxes to open.
pub fn attention(state: &AdminState) -> Value {
    let a = (state.current)().signals.attention();
    let stale: Vec<Value> = a
        .stale_passwords
        .iter()
        .map(|s| {
            json!({
                "user": s.user, "client_ip": s.address.to_string(), "client": s.client, "count": s.count,
                "first_seen": rfc3339(s.first), "last_seen": rfc3339(s.last),
                "summary": format!("{}: a device{} at {} retried an old password {} times (last {})",
                    s.user, s.client.as_deref().map(|c| format!(" ({c})")).unwrap_or_default(), s.address, s.count,
                    rfc3339(s.last)),
            })
        })
        .collect();
    let quota: Vec<Value> = a
        .over_quota
        .iter()
        .map(|q| {
            json!({
                "user": q.user, "command": q.command, "count": q.count,
                "first_seen": rfc3339(q.first), "last_seen": rfc3339(q.last),
                "summary": format!("{}: {} refused for quota {} times (last {})", q.user, q.command, q.count, rfc3339(q.last)),
            })
        })
        .collect();
    let resyncs: Vec<Value> = a
        .resyncs
        .iter()
        .map(|r| {
            json!({
                "user": r.user, "mailbox": r.mailbox, "client": r.client, "fetches": r.fetches, "bytes": r.bytes,
                "exists": r.exists, "first_seen": rfc3339(r.first), "last_seen": rfc3339(r.last),
                "summary": format!("{} / {}: fetched whole {} times in the last hour ({} bytes){}", r.user, r.mailbox,
                    r.fetches, r.bytes, r.client.as_deref().map(|c| format!(", {c}")).unwrap_or_default()),
            })
        })
        .collect();
    let slow: Vec<Value> = a
        .slow_mailboxes
        .iter()
        .map(|m| {
            json!({
                "user": m.user, "mailbox": m.mailbox, "exists": m.exists,
                "millis": m.elapsed.as_secs_f64() * 1000.0, "at": rfc3339(m.at),
                "summary": format!("{} / {}: opened in {:.0} ms ({} messages)", m.user, m.mailbox,
                    m.elapsed.as_secs_f64() * 1000.0, m.exists.map_or("?".to_owned(), |e| e.to_string())),
            })
        })
        .collect();
    json!({ "stale_passwords": stale, "over_quota": quota, "resyncs": resyncs, "slow_mailboxes": slow })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_pages() {
        let pairs = query_pairs("user=alice%40example.org&limit=5&offset=10&x=a+b");
        assert_eq!(pairs[0], ("user".into(), "alice@example.org".into()));
        assert_eq!(pairs[3], ("x".into(), "a b".into()));
        assert_eq!(page(&pairs), Ok((10, 5)));
        assert_eq!(page(&[]), Ok((0, DEFAULT_PAGE)));
        assert!(page(&query_pairs("limit=0")).is_err());
        assert!(page(&query_pairs("limit=1001")).is_err());
        assert!(page(&query_pairs("offset=-1")).is_err());
        assert_eq!(percent_decode("203.0.113.0%2F24"), "203.0.113.0/24");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
