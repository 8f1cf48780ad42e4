//! `herald-gateway`: the WebSocket gateway and its publish API, and `token`
//! to mint a development client token.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use herald_core::config::{Config, GatewayConfig};
use herald_core::keys::TenantId;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(version, about = "Herald's WebSocket gateway: team channels with auth, history, recovery and a publish API")]
struct Cli {
    /// TOML configuration file (environment overrides apply on top).
    #[arg(long, env = "HERALD_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve WebSocket clients and the publish API (the default).
    Run,
    /// Print a client token (JWT) signed with a configured HS256 key, for
    /// development and tests; production tokens come from your auth service.
    Token {
        /// The tenant the token is bound to.
        #[arg(long)]
        tenant: String,
        /// The subject (user id) it names.
        #[arg(long)]
        sub: String,
        /// Channel patterns it may subscribe to, comma-separated: `team:42`,
        /// `team:*` (a namespace), `*` (every channel of the tenant).
        #[arg(long, value_delimiter = ',', required = true)]
        channels: Vec<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// The key to sign with (default: the first HS256 key of `gateway.jwt_keys`).
        #[arg(long)]
        kid: Option<String>,
    },
}

/// What `herald-gateway token` signs.
struct TokenRequest {
    tenant: String,
    sub: String,
    channels: Vec<String>,
    ttl: u64,
    kid: Option<String>,
}

/// A client JWT for `request`, signed with the first configured HS256 key
/// (or the one named by `kid`); secrets named by `*_env` are read from `env`.
fn mint(
    config: &GatewayConfig,
    request: &TokenRequest,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<String> {
    TenantId::new(&request.tenant).map_err(|e| anyhow::anyhow!("--tenant {:?}: {e}", request.tenant))?;
    if let Some(bad) = request.channels.iter().find(|c| c.is_empty() || c.contains(char::is_whitespace)) {
        anyhow::bail!("--channels: {bad:?} is not a channel pattern (team:42, team:*, *)");
    }
    let mut reasons = Vec::new();
    let mut signing = None;
    for key in config.jwt_keys.iter().filter(|k| request.kid.as_ref().is_none_or(|kid| *kid == k.kid)) {
        match key.material(&env) {
            Ok(("HS256", secret)) if secret.len() >= 32 => {
                signing = Some((key.kid.clone(), secret));
                break;
            }
            Ok(("HS256", _)) => reasons.push(format!("kid {}: the secret is shorter than 32 bytes", key.kid)),
            Ok(_) => reasons.push(format!("kid {}: RS256 (the gateway holds only the public key)", key.kid)),
            Err(e) => reasons.push(format!("kid {}: {e}", key.kid)),
        }
    }
    let Some((kid, secret)) = signing else {
        let which = request.kid.as_ref().map_or("an HS256 key".to_string(), |k| format!("key {k}"));
        let reasons = if reasons.is_empty() { "no matching key".to_string() } else { reasons.join("; ") };
        anyhow::bail!("cannot sign with {which} of gateway.jwt_keys: {reasons}");
    };
    let now = jsonwebtoken::get_current_timestamp();
    let claims = serde_json::json!({
        "tenant": request.tenant,
        "sub": request.sub,
        "channels": request.channels,
        "iat": now,
        "exp": now + request.ttl,
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(kid);
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&header, &claims, &key).context("failed to sign the token")
}

async fn bind(what: &str, addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("failed to bind {what} {addr}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::from_file(cli.config.as_deref()).context("failed to load configuration")?;
    if let Some(Command::Token { tenant, sub, channels, ttl, kid }) = cli.command {
        let request = TokenRequest { tenant, sub, channels, ttl, kid };
        println!("{}", mint(&config.gateway, &request, |name| std::env::var(name).ok())?);
        return Ok(());
    }
    herald_core::telemetry::announce("herald-gateway run", &config);
    let _telemetry = herald_core::telemetry::init("herald-gateway")?;
    let g = &config.gateway;
    let listeners = herald_gateway::Listeners {
        http: bind("gateway.listen_addr", &g.listen_addr).await?,
        grpc: Some(bind("gateway.grpc_addr", &g.grpc_addr).await?),
        ops: bind("gateway.ops_addr", &g.ops_addr).await?,
    };
    herald_gateway::run(config, listeners, herald_core::shutdown::on_signal()).await
}
