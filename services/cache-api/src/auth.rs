//! API tokens: each bound to a set of tenants, or to all of them for trusted
//! backends. Secrets are compared in constant time and never logged.

use std::collections::BTreeSet;

use herald_core::config::TokenConfig;
use herald_core::keys::TenantId;

use crate::error::{Error, Result};

/// What a token may touch.
#[derive(Debug, Clone)]
enum Tenants {
    All,
    Only(BTreeSet<String>),
}

#[derive(Debug, Clone)]
struct Token {
    name: String,
    secret: Vec<u8>,
    tenants: Tenants,
}

/// The configured tokens.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    tokens: Vec<Token>,
}

/// Who is calling: the name of the token that matched.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token: String,
    tenants: Tenants,
}

impl Auth {
    /// Reads the tokens; `env` resolves `token_env`.
    pub fn new(tokens: &[TokenConfig], env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let mut out = Vec::new();
        for t in tokens {
            let secret = match (&t.token, &t.token_env) {
                (Some(s), _) => s.clone(),
                (None, Some(var)) => env(var).ok_or_else(|| {
                    anyhow::anyhow!("cache.tokens ({}).token_env: environment variable {var} is not set", t.name)
                })?,
                (None, None) => anyhow::bail!("cache.tokens ({}): no secret", t.name),
            };
            if secret.len() < 16 {
                anyhow::bail!("cache.tokens ({}): the secret must be at least 16 characters", t.name);
            }
            if let Some(other) = out.iter().find(|o: &&Token| o.secret == secret.as_bytes()) {
                anyhow::bail!(
                    "cache.tokens ({}): has the same secret as {}; each token needs its own",
                    t.name,
                    other.name
                );
            }
            let tenants = if t.tenants.iter().any(|t| t == "*") {
                Tenants::All
            } else {
                Tenants::Only(t.tenants.iter().cloned().collect())
            };
            out.push(Token { name: t.name.clone(), secret: secret.into_bytes(), tenants });
        }
        Ok(Self { tokens: out })
    }

    /// The caller presenting `secret` (`None`: no credentials).
    pub fn authenticate(&self, secret: Option<&str>) -> Result<Caller> {
        let secret = secret.ok_or(Error::Unauthenticated)?.as_bytes();
        // Compare against every token, so timing says nothing about which
        // (or whether one) matched.
        let mut found = None;
        for t in &self.tokens {
            if constant_time_eq(&t.secret, secret) {
                found = Some(t);
            }
        }
        let t = found.ok_or(Error::Unauthenticated)?;
        Ok(Caller { token: t.name.clone(), tenants: t.tenants.clone() })
    }
}

impl Caller {
    /// Whether the token serves every tenant (a trusted backend).
    pub fn trusted(&self) -> bool {
        matches!(self.tenants, Tenants::All)
    }

    /// The tenant id, validated, if this caller may use it.
    pub fn tenant(&self, tenant: &str) -> Result<TenantId> {
        let id = TenantId::new(tenant).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        match &self.tenants {
            Tenants::All => Ok(id),
            Tenants::Only(set) if set.contains(tenant) => Ok(id),
            Tenants::Only(_) => Err(Error::PermissionDenied { token: self.token.clone(), tenant: tenant.into() }),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

/// The bearer token of an `authorization` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        let tokens = vec![
            TokenConfig {
                name: "a".into(),
                token: Some("aaaaaaaaaaaaaaaa".into()),
                token_env: None,
                tenants: vec!["acme".into()],
            },
            TokenConfig { name: "b".into(), token: None, token_env: Some("T".into()), tenants: vec!["*".into()] },
        ];
        Auth::new(&tokens, |v| (v == "T").then(|| "bbbbbbbbbbbbbbbb".to_string())).unwrap()
    }

    #[test]
    fn tokens_bind_tenants() {
        let auth = auth();
        let a = auth.authenticate(Some("aaaaaaaaaaaaaaaa")).unwrap();
        assert!(a.tenant("acme").is_ok());
        assert!(matches!(a.tenant("globex"), Err(Error::PermissionDenied { .. })));
        assert!(matches!(a.tenant("a b"), Err(Error::InvalidArgument(_))));
        let b = auth.authenticate(Some("bbbbbbbbbbbbbbbb")).unwrap();
        assert!(b.tenant("globex").is_ok());
        assert!(matches!(auth.authenticate(Some("aaaaaaaaaaaaaaab")), Err(Error::Unauthenticated)));
        assert!(matches!(auth.authenticate(Some("aaaaaaaaaaaaaaaaa")), Err(Error::Unauthenticated)));
        assert!(matches!(auth.authenticate(None), Err(Error::Unauthenticated)));
    }

    #[test]
    fn two_tokens_with_one_secret_are_refused() {
        let token = |name: &str, env: &str, tenants: &str| TokenConfig {
            name: name.into(),
            token: None,
            token_env: Some(env.into()),
            tenants: vec![tenants.into()],
        };
        let tokens = vec![token("acme-app", "A", "acme"), token("globex-app", "G", "globex")];
        let err = Auth::new(&tokens, |_| Some("the-same-secret-0123".to_string())).unwrap_err().to_string();
        assert!(err.contains("globex-app") && err.contains("acme-app") && err.contains("same secret"), "{err}");
    }

    #[test]
    fn bearer_header() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(None), None);
    }
}
