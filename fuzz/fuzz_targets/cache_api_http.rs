//! The cache API's hand-written HTTP decoders (services/cache-api/src/http.rs,
//! auth.rs): the query string, the `x-herald-min-lsn` header, the bearer
//! header and the API token check, the base64 of answers. Each is also held
//! to a reference: a decoded query only ever came from well-formed
//! percent-encoding, a `hi/lo` LSN prints back to the same value, base64
//! matches the `base64` crate, a token is accepted only when it is the
//! configured one.
#![no_main]

use axum::http::{HeaderMap, HeaderValue};
use base64::Engine as _;
use herald_cache_api::auth::{Auth, bearer};
use herald_cache_api::http::{base64, min_lsn, query_pairs};
use herald_core::config::TokenConfig;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

const TOKEN: &str = "aaaaaaaaaaaaaaaa-secret";

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    query: &'a str,
    lsn: &'a [u8],
    authorization: &'a str,
    tenant: &'a str,
    bytes: &'a [u8],
}

/// Whether every `%` is followed by two hex digits.
fn well_formed(query: &str) -> bool {
    let b = query.as_bytes();
    b.iter().enumerate().filter(|(_, c)| **c == b'%').all(|(i, _)| {
        b.get(i + 1).is_some_and(u8::is_ascii_hexdigit) && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
    })
}

fuzz_target!(|input: Input<'_>| {
    if let Ok(pairs) = query_pairs(Some(input.query)) {
        assert!(well_formed(input.query), "{:?} decoded to {pairs:?}", input.query);
        let reference: Vec<(String, String)> = form_urlencoded::parse(input.query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .filter(|(k, v)| !(k.is_empty() && v.is_empty()))
            .collect();
        let ours: Vec<(String, String)> = pairs.into_iter().filter(|(k, v)| !(k.is_empty() && v.is_empty())).collect();
        assert_eq!(ours, reference, "query {:?}", input.query);
    }

    if let Ok(value) = HeaderValue::from_bytes(input.lsn) {
        let mut headers = HeaderMap::new();
        headers.insert("x-herald-min-lsn", value);
        if let Ok(lsn) = min_lsn(&headers)
            && input.lsn.contains(&b'/')
        {
            let printed = format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF);
            headers.insert("x-herald-min-lsn", HeaderValue::from_str(&printed).unwrap());
            assert_eq!(min_lsn(&headers).ok(), Some(lsn));
        }
    }

    assert_eq!(base64(input.bytes), base64::engine::general_purpose::STANDARD.encode(input.bytes));

    let tokens = [TokenConfig {
        name: "app".into(),
        token: Some(TOKEN.into()),
        token_env: None,
        tenants: vec!["acme".into(), "beta".into()],
    }];
    let auth = Auth::new(&tokens, |_| None).expect("fixed token config");
    let secret = bearer(Some(input.authorization));
    if let Some(secret) = secret {
        assert!(input.authorization.contains(secret));
    }
    if let Ok(caller) = auth.authenticate(secret) {
        assert_eq!(secret, Some(TOKEN));
        if let Ok(tenant) = caller.tenant(input.tenant) {
            assert!(tenant.as_str() == "acme" || tenant.as_str() == "beta");
        }
    }
    let _ = herald_gateway::auth::bearer(Some(input.authorization));
});
