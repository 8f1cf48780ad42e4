//! Runs the shared near-cache vectors (`clients/vectors/near-cache.json`)
//! against the client's protocol state, on a virtual clock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_client::state::{Answer, Coherence, Ticket};
use herald_proto::v1::{InvalidationEvent, Operation};
use serde_json::Value;

fn event(v: &Value) -> InvalidationEvent {
    let strings = |k: &str| -> Vec<String> {
        v[k].as_array().map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect()).unwrap_or_default()
    };
    let operation = match v["operation"].as_str().unwrap_or("") {
        "insert" => Operation::Insert,
        "update" => Operation::Update,
        "delete" => Operation::Delete,
        "truncate" => Operation::Truncate,
        _ => Operation::Unspecified,
    };
    InvalidationEvent {
        tenant: v["tenant"].as_str().unwrap_or("").into(),
        table: v["table"].as_str().unwrap_or("").into(),
        operation: operation as i32,
        tags: strings("tags"),
        widened: v["widened"].as_bool().unwrap_or(false),
        all_tenants: v["all_tenants"].as_bool().unwrap_or(false),
        key_prefixes: strings("key_prefixes"),
        ..Default::default()
    }
}

fn run_case(case: &Value, timeout: Duration) -> Result<(), String> {
    let bound = case["max_staleness_ms"].as_u64().map(Duration::from_millis);
    let state = Coherence::new(1 << 20, Duration::from_secs(300), timeout).with_max_staleness(bound);
    let start = Instant::now();
    let mut now = start;
    let mut tickets: HashMap<String, Ticket> = HashMap::new();
    for (i, step) in case["steps"].as_array().unwrap().iter().enumerate() {
        let fail = |what: String| Err(format!("step {i} {step}: {what}"));
        let u = |k: &str| step[k].as_u64().unwrap();
        match step["op"].as_str().unwrap() {
            "ready" => {
                state.ready(step["node_id"].as_str().unwrap(), u("generation"), 0, now);
                state.freshness(step["staleness_ms"].as_u64(), now);
            }
            "events" => {
                let events: Vec<_> = step["events"].as_array().unwrap().iter().map(event).collect();
                let _ = state.events(u("seq"), &events, now);
            }
            "heartbeat" => {
                if state.heartbeat(u("generation"), u("seq"), 0, now).is_ok() {
                    state.freshness(step["staleness_ms"].as_u64(), now);
                }
            }
            "end" => state.doubt(),
            "advance" => {
                now += Duration::from_millis(u("ms"));
                state.check_silence(now);
            }
            "ticket" => {
                tickets.insert(step["id"].as_str().unwrap().into(), state.ticket());
            }
            "answer" => {
                let ticket = tickets.remove(step["ticket"].as_str().unwrap()).expect("ticket taken");
                let tags: Vec<String> =
                    step["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().into()).collect();
                let answer = Answer {
                    tenant: step["tenant"].as_str().unwrap(),
                    global: step["global"].as_bool().unwrap_or(false),
                    value: Bytes::from(step["value"].as_str().unwrap().to_string()),
                    tags: &tags,
                    expires_at_ms: 0,
                    node_id: step["node_id"].as_str().unwrap(),
                    generation: u("generation"),
                };
                let stored = state.fill(ticket, step["key"].as_str().unwrap(), answer);
                let want = step["expect"] == "stored";
                if stored != want {
                    return fail(format!("stored: {stored}"));
                }
            }
            "get" => {
                let got = match state.lookup(step["key"].as_str().unwrap(), now) {
                    Some(v) => format!("hit {}", String::from_utf8_lossy(&v)),
                    None if !state.is_live() => "bypass".into(),
                    None if state.stale_cause(now).is_some() => "stale".into(),
                    None => "miss".into(),
                };
                let want = match step["expect"].as_str().unwrap() {
                    "hit" => format!("hit {}", step["value"].as_str().unwrap()),
                    other => other.to_string(),
                };
                if got != want {
                    return fail(got);
                }
            }
            "expect" => {
                if let Some(live) = step["live"].as_bool()
                    && state.is_live() != live
                {
                    return fail(format!("live: {}", state.is_live()));
                }
                if let Some(entries) = step["entries"].as_u64()
                    && state.l1().entry_count() != entries
                {
                    return fail(format!("entries: {}", state.l1().entry_count()));
                }
            }
            other => return fail(format!("unknown op {other}")),
        }
    }
    Ok(())
}

#[test]
fn every_shared_vector_passes() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../clients/vectors/near-cache.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(doc["format"], 1);
    let timeout = Duration::from_millis(doc["heartbeat_timeout_ms"].as_u64().unwrap());
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| run_case(case, timeout).err().map(|e| format!("{}: {e}", case["name"])))
        .collect();
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}
