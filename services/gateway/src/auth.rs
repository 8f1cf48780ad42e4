//! Client tokens (JWT, HS256 or RS256, key chosen by `kid`) and service
//! tokens for the publish API.

use std::collections::HashMap;

use herald_core::channel::Channel;
use herald_core::config::GatewayConfig;
use herald_core::keys::TenantId;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;

use crate::protocol::CloseCode;

/// Why a token was refused, with the close code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("token expired")]
    Expired,
    #[error("forbidden: {0}")]
    Forbidden(String),
}

impl AuthError {
    pub fn close_code(&self) -> CloseCode {
        match self {
            AuthError::Unauthorized(_) => CloseCode::Unauthorized,
            AuthError::Expired => CloseCode::TokenExpired,
            AuthError::Forbidden(_) => CloseCode::Forbidden,
        }
    }
}

/// One string or a list of them (`"team:*"` or `["team:1", "repo:*"]`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct RawClaims {
    tenant: String,
    sub: String,
    exp: u64,
    #[serde(default)]
    channels: Option<OneOrMany>,
}

/// What a verified token grants.
#[derive(Debug, Clone)]
pub struct Claims {
    pub tenant: TenantId,
    pub subject: String,
    /// Patterns: `*` (every channel), `ns:*` (every channel of a
    /// namespace), or an exact `ns:id`.
    pub channels: Vec<String>,
    /// When the socket must close (`exp` plus the leeway), Unix seconds.
    pub valid_until: u64,
}

impl Claims {
    /// Whether the token allows subscribing to `channel` (of its tenant).
    pub fn allows(&self, channel: &Channel) -> bool {
        self.channels.iter().any(|p| {
            p == "*" || p == channel.as_str() || p.strip_suffix(":*").is_some_and(|ns| ns == channel.namespace())
        })
    }
}

/// Verifies client tokens with the configured keys.
pub struct Verifier {
    keys: HashMap<String, (DecodingKey, Algorithm)>,
    leeway: u64,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Verifier {
    /// Reads the keys (and the environment variables they name); a bad key
    /// fails with a message that names it.
    pub fn new(config: &GatewayConfig, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let mut keys = HashMap::new();
        for (i, key) in config.jwt_keys.iter().enumerate() {
            let at = format!("gateway.jwt_keys[{i}] (kid {})", key.kid);
            let material = key.material(&env).map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
            let decoding = match material {
                ("HS256", secret) => {
                    if secret.len() < 32 {
                        anyhow::bail!("{at}: an HS256 secret must be at least 32 bytes");
                    }
                    (DecodingKey::from_secret(secret.as_bytes()), Algorithm::HS256)
                }
                (_, pem) => (
                    DecodingKey::from_rsa_pem(pem.as_bytes())
                        .map_err(|e| anyhow::anyhow!("{at}: not an RSA public key in PEM: {e}"))?,
                    Algorithm::RS256,
                ),
            };
            keys.insert(key.kid.clone(), decoding);
        }
        Ok(Self {
            keys,
            leeway: config.jwt_leeway_s,
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
        })
    }

    /// The claims of a valid token. The key is chosen by the token's `kid`
    /// (or is the only key), and the token's `alg` must be that key's.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let unauthorized = |m: &str| AuthError::Unauthorized(m.to_string());
        let header = decode_header(token).map_err(|_| unauthorized("malformed or unsigned token"))?;
        let (key, alg) = match &header.kid {
            Some(kid) => self.keys.get(kid).ok_or_else(|| unauthorized("unknown kid"))?,
            None if self.keys.len() == 1 => self.keys.values().next().expect("one key"),
            None => return Err(unauthorized("token has no kid")),
        };
        if header.alg != *alg {
            return Err(unauthorized("algorithm does not match the key"));
        }
        let mut validation = Validation::new(*alg);
        validation.leeway = self.leeway;
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        if let Some(audience) = &self.audience {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        validation.validate_nbf = true;
        let data = decode::<RawClaims>(token, key, &validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::InvalidSignature => unauthorized("invalid signature"),
            ErrorKind::ImmatureSignature => unauthorized("token not valid yet"),
            ErrorKind::InvalidIssuer => unauthorized("wrong issuer"),
            ErrorKind::InvalidAudience => unauthorized("wrong audience"),
            ErrorKind::Json(_) | ErrorKind::MissingRequiredClaim(_) => unauthorized("missing or malformed claims"),
            _ => unauthorized("invalid token"),
        })?;
        let tenant = TenantId::new(&data.claims.tenant)
            .map_err(|e| AuthError::Forbidden(format!("the token's tenant is not valid: {e}")))?;
        let channels = match data.claims.channels {
            None => Vec::new(),
            Some(OneOrMany::One(c)) => vec![c],
            Some(OneOrMany::Many(c)) => c,
        };
        let valid_until = data.claims.exp.saturating_add(self.leeway);
        Ok(Claims { tenant, subject: data.claims.sub, channels, valid_until })
    }
}

/// One app server's publish credential.
struct Service {
    name: String,
    token: Vec<u8>,
    /// `None`: every tenant.
    tenants: Option<Vec<String>>,
}

/// Checks service tokens of the publish API.
pub struct ServiceAuth {
    services: Vec<Service>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ServiceAuthError {
    #[error("missing or unknown service token")]
    Unauthenticated,
    #[error("service {0} may not publish to tenant {1}")]
    Forbidden(String, String),
}

impl ServiceAuth {
    pub fn new(config: &GatewayConfig, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let mut services = Vec::new();
        for (i, s) in config.service_tokens.iter().enumerate() {
            let token = s.secret(&env).map_err(|e| anyhow::anyhow!("gateway.service_tokens[{i}]: {e}"))?;
            if token.len() < 16 {
                anyhow::bail!("gateway.service_tokens[{i}]: the token must be at least 16 bytes");
            }
            let tenants = (!s.tenants.iter().any(|t| t == "*")).then(|| s.tenants.clone());
            services.push(Service { name: s.name.clone(), token: token.into_bytes(), tenants });
        }
        Ok(Self { services })
    }

    /// The name of the service holding `bearer`, if it may publish to `tenant`.
    pub fn check(&self, bearer: Option<&str>, tenant: &TenantId) -> Result<&str, ServiceAuthError> {
        let bearer = bearer.ok_or(ServiceAuthError::Unauthenticated)?.as_bytes();
        // Compare with every token, in constant time per token.
        let mut found = None;
        for s in &self.services {
            if constant_time_eq(&s.token, bearer) {
                found = Some(s);
            }
        }
        let s = found.ok_or(ServiceAuthError::Unauthenticated)?;
        match &s.tenants {
            Some(tenants) if !tenants.iter().any(|t| t == tenant.as_str()) => {
                Err(ServiceAuthError::Forbidden(s.name.clone(), tenant.to_string()))
            }
            _ => Ok(&s.name),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an `Authorization: Bearer …` value.
pub fn bearer(value: Option<&str>) -> Option<&str> {
    value?.strip_prefix("Bearer ").map(str::trim).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use herald_core::config::Config;
    use jsonwebtoken::{EncodingKey, Header, encode};

    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn config() -> GatewayConfig {
        let text = format!(
            "[[gateway.jwt_keys]]\nkid = \"k1\"\nhs256_secret = \"{SECRET}\"\n\
             [[gateway.jwt_keys]]\nkid = \"k2\"\nhs256_secret = \"{}\"\n\
             [[gateway.service_tokens]]\nname = \"app\"\ntoken = \"service-token-0123\"\ntenants = [\"acme\"]\n",
            SECRET.replace('0', "x")
        );
        Config::load(&text, &Default::default()).unwrap().gateway
    }

    fn token(kid: Option<&str>, secret: &str, exp_offset: i64, claims: serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(String::from);
        let mut claims = claims;
        claims["exp"] = serde_json::json!(jsonwebtoken::get_current_timestamp() as i64 + exp_offset);
        encode(&header, &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    #[test]
    fn tokens_are_checked() {
        let v = Verifier::new(&config(), |_| None).unwrap();
        let claims = serde_json::json!({"tenant": "acme", "sub": "u1", "channels": ["team:*", "repo:7"]});
        let c = v.verify(&token(Some("k1"), SECRET, 60, claims.clone())).unwrap();
        assert_eq!(c.tenant.as_str(), "acme");
        assert!(c.allows(&Channel::parse("team:9").unwrap()));
        assert!(c.allows(&Channel::parse("repo:7").unwrap()));
        assert!(!c.allows(&Channel::parse("repo:8").unwrap()));
        assert!(matches!(v.verify(&token(Some("k1"), SECRET, -60, claims.clone())), Err(AuthError::Expired)));
        assert!(matches!(v.verify(&token(Some("k2"), SECRET, 60, claims.clone())), Err(AuthError::Unauthorized(_))));
        assert!(matches!(v.verify(&token(Some("k9"), SECRET, 60, claims.clone())), Err(AuthError::Unauthorized(_))));
        assert!(matches!(v.verify(&token(None, SECRET, 60, claims.clone())), Err(AuthError::Unauthorized(_))));
        assert!(matches!(v.verify("not a token"), Err(AuthError::Unauthorized(_))));
        // alg "none": header {"alg":"none"}, no signature.
        let none = "eyJhbGciOiJub25lIn0.eyJ0ZW5hbnQiOiJhY21lIiwic3ViIjoidSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(matches!(v.verify(none), Err(AuthError::Unauthorized(_))));
        let bad_tenant = serde_json::json!({"tenant": "a:b", "sub": "u1"});
        assert!(matches!(v.verify(&token(Some("k1"), SECRET, 60, bad_tenant)), Err(AuthError::Forbidden(_))));
    }

    #[test]
    fn issuer_and_audience_are_required_when_configured() {
        let mut config = config();
        config.jwt_issuer = Some("https://auth.example".into());
        config.jwt_audience = Some("herald".into());
        let v = Verifier::new(&config, |_| None).unwrap();
        let with = |extra: serde_json::Value| {
            let mut claims = serde_json::json!({"tenant": "acme", "sub": "u1"});
            claims.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            v.verify(&token(Some("k1"), SECRET, 60, claims))
        };
        assert!(with(serde_json::json!({"iss": "https://auth.example", "aud": "herald"})).is_ok());
        for bad in [
            serde_json::json!({}),
            serde_json::json!({"iss": "https://auth.example"}),
            serde_json::json!({"aud": "herald"}),
            serde_json::json!({"iss": "https://evil.example", "aud": "herald"}),
            serde_json::json!({"iss": "https://auth.example", "aud": "other"}),
        ] {
            assert!(matches!(with(bad.clone()), Err(AuthError::Unauthorized(_))), "{bad}");
        }
        // The socket closes at exp plus the leeway.
        let c = with(serde_json::json!({"iss": "https://auth.example", "aud": "herald"})).unwrap();
        let expected = jsonwebtoken::get_current_timestamp() + 60 + config.jwt_leeway_s;
        assert!(c.valid_until.abs_diff(expected) <= 1, "{} vs {expected}", c.valid_until);
    }

    #[test]
    fn service_tokens_are_scoped_to_tenants() {
        let s = ServiceAuth::new(&config(), |_| None).unwrap();
        let acme = TenantId::new("acme").unwrap();
        let globex = TenantId::new("globex").unwrap();
        assert_eq!(s.check(Some("service-token-0123"), &acme), Ok("app"));
        assert!(matches!(s.check(Some("service-token-0123"), &globex), Err(ServiceAuthError::Forbidden(..))));
        assert_eq!(s.check(Some("service-token-0124"), &acme), Err(ServiceAuthError::Unauthenticated));
        assert_eq!(s.check(None, &acme), Err(ServiceAuthError::Unauthenticated));
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
    }
}
