//! Client tokens (services/gateway/src/auth.rs `Verifier`) with one fixed
//! HS256 key. Three shapes of input: any bytes as the token; any claims
//! JSON signed with the right key; any header JSON signed with the right
//! key. A token is only ever accepted when its signature is the key's
//! HMAC-SHA256 of its first two parts, its header names HS256 and the key,
//! and its claims carry a valid tenant and subject.
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald_core::config::Config;
use herald_gateway::auth::Verifier;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;
use std::sync::OnceLock;

const SECRET: &str = "0123456789abcdef0123456789abcdef-fuzz";

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let text = format!("[[gateway.jwt_keys]]\nkid = \"k1\"\nhs256_secret = \"{SECRET}\"\n");
        let config = Config::load(&text, &Default::default()).expect("fixed config");
        Verifier::new(&config.gateway, |_| None).expect("fixed key")
    })
}

fn sign(header: &[u8], claims: &[u8]) -> String {
    let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

fn check(token: &str) {
    let Ok(claims) = verifier().verify(token) else { return };
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "accepted {token:?}");
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
    let signature = URL_SAFE_NO_PAD.decode(parts[2]).expect("accepted signature is base64url");
    assert!(mac.verify_slice(&signature).is_ok(), "accepted a token not signed with the key: {token:?}");
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).expect("accepted header is JSON");
    assert_eq!(header["alg"], "HS256", "accepted {header}");
    assert!(header.get("kid").is_none_or(|k| k == "k1"), "accepted {header}");
    assert!(herald_core::keys::TenantId::new(claims.tenant.as_str()).is_ok());
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 3 {
        0 => {
            if let Ok(token) = std::str::from_utf8(rest) {
                check(token);
            }
        }
        1 => check(&sign(br#"{"alg":"HS256","typ":"JWT","kid":"k1"}"#, rest)),
        _ => {
            let claims = br#"{"tenant":"acme","sub":"u1","exp":4102444800,"channels":"team:*"}"#;
            check(&sign(rest, claims));
        }
    }
});
