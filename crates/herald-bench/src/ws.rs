//! `herald-bench ws`: WebSocket fan-out through the gateway.
//!
//! A process here may hold at most 20,000 open files, so the benchmark runs
//! as a real deployment would: `--gateways` gateway processes and
//! `--clients` client processes (this program re-executed with the hidden
//! `ws-node` subcommand), each client bound to its own 127.0.0.x source
//! address. Sockets go round-robin over the gateways; the first `--big`
//! sockets subscribe to one channel, the next `--small` to another, the rest
//! spread over `--channels` channels.
//!
//! Measured:
//! 1. sockets held (the gateways' own `herald_gateway_sockets`), and the
//!    gateways' resident memory per idle socket (VmRSS after connect and
//!    subscribe minus VmRSS before, over the sockets);
//! 2. delivery latency (publish call started → frame parsed by the client,
//!    one clock) of `--rounds` broadcasts to the big and the small channel;
//! 3. deliveries per second: `--burst` back-to-back publications to the big
//!    channel, deliveries over the time from the first publish to the last
//!    frame received.
//!
//! Publications go through `herald_core::channel::publish`, the function the
//! publish API and broadcast use.
//!
//! With `--client ts`, `--small` more sockets are opened by the TypeScript
//! client (`clients/typescript/bench/ws-subscriber.mjs`, one `Herald` client
//! per socket, in one Node process) on a channel of their own, published to
//! in every round right after the small channel: the p99 of the Node client
//! is reported beside the Rust clients' of the same run, with the
//! publications it lost or saw twice.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::{SinkExt as _, StreamExt as _};
use herald_core::channel::{self, Channel, HistoryOptions};
use herald_core::config::Config;
use herald_core::keys::{KeySpace, TenantId};
use herald_core::time::now_us;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::report::{JsonLine, Latencies, Table, cores};

#[derive(clap::Args)]
pub struct Args {
    /// Sockets in all.
    #[arg(long, default_value_t = 20_000)]
    sockets: usize,
    /// Gateway processes.
    #[arg(long, default_value_t = 2)]
    gateways: usize,
    /// Client processes (each with its own 127.0.0.x source address).
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Subscribers of the big broadcast channel.
    #[arg(long, default_value_t = 10_000)]
    big: usize,
    /// Subscribers of the small broadcast channel.
    #[arg(long, default_value_t = 1_000)]
    small: usize,
    /// Channels the other sockets spread over.
    #[arg(long, default_value_t = 100)]
    channels: usize,
    /// Latency broadcasts to each of the big and the small channel.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Back-to-back publications to the big channel for throughput.
    #[arg(long, default_value_t = 50)]
    burst: usize,
    /// `ts`: also `--small` subscribers using the TypeScript client (Node).
    #[arg(long, value_enum, default_value_t = ClientKind::Rust)]
    client: ClientKind,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientKind {
    /// Rust sockets only.
    Rust,
    /// Rust sockets, plus the TypeScript client on a channel of its own.
    Ts,
}

/// What the re-executed benchmark process is.
#[derive(clap::Args)]
pub struct NodeArgs {
    #[command(subcommand)]
    role: Role,
}

#[derive(clap::Subcommand)]
enum Role {
    /// A gateway on 127.0.0.1:0 listeners; prints `READY <ws addr> <ops addr>`.
    Gateway {
        #[arg(long)]
        config: PathBuf,
    },
    /// Client sockets `first..first+count`; prints `READY` when all are
    /// subscribed, then `RESULT <json>` after `DONE <rounds> <burst>`.
    Client {
        #[arg(long, value_delimiter = ',')]
        gateways: Vec<SocketAddr>,
        #[arg(long)]
        token: String,
        #[arg(long)]
        source: Ipv4Addr,
        #[arg(long)]
        first: usize,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        big: usize,
        #[arg(long)]
        small: usize,
        #[arg(long)]
        channels: usize,
    },
}

const SECRET: &str = "bench-secret-0123456789abcdefghijklmn";
const TENANT: &str = "bench";
const BIG: &str = "team:big";
const SMALL: &str = "team:small";
const SMALL_TS: &str = "team:small-ts";

fn config_text(env: &str, redis_url: &str, per_gateway: usize) -> String {
    format!(
        r#"
env = "{env}"
[redis]
url = "{redis_url}"
[gateway]
ops_addr = "127.0.0.1:0"
listen_addr = "127.0.0.1:0"
shutdown_grace_ms = 2000
[gateway.limits]
max_connections = {max}
connections_per_s = 20000
tenant_ops_per_s = 1000000
connection_commands_per_s = 50
ping_interval_ms = 25000
ping_timeout_ms = 60000
[[gateway.jwt_keys]]
kid = "bench"
hs256_secret = "{SECRET}"
[[gateway.namespaces]]
name = "team"
history_size = 100
history_ttl_s = 300
presence = false
"#,
        max = per_gateway + 1000
    )
}

fn token() -> anyhow::Result<String> {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("bench".into());
    let claims = json!({"tenant": TENANT, "sub": "bench", "channels": ["team:*"], "exp": jsonwebtoken::get_current_timestamp() + 86_400});
    Ok(jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()))?)
}

/// A child process speaking lines on stdin/stdout.
struct Node {
    child: Child,
    stdin: ChildStdin,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl Node {
    fn spawn(args: &[String]) -> anyhow::Result<Self> {
        let mut command = Command::new(std::env::current_exe()?);
        command.arg("ws-node").args(args);
        Self::spawn_command(command)
    }

    /// The TypeScript subscriber: `node ws-subscriber.mjs …`.
    fn spawn_ts(args: &[String]) -> anyhow::Result<Self> {
        let package = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../clients/typescript");
        if !package.join("dist/esm/index.js").exists() || !package.join("node_modules/ws").exists() {
            bail!("--client ts needs the built client: cd clients/typescript && npm ci && npm run build");
        }
        let mut command = Command::new("node");
        command.arg(package.join("bench/ws-subscriber.mjs")).args(args);
        Self::spawn_command(command)
    }

    fn spawn_command(mut command: Command) -> anyhow::Result<Self> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("failed to start a benchmark node")?;
        let stdin = child.stdin.take().context("stdin")?;
        let lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        Ok(Self { child, stdin, lines })
    }

    /// The next line that starts with `prefix`, within `timeout`.
    async fn expect(&mut self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        let read = async {
            while let Some(line) = self.lines.next_line().await? {
                if let Some(rest) = line.strip_prefix(prefix) {
                    return Ok(rest.trim().to_string());
                }
            }
            bail!("node exited before printing {prefix}")
        };
        tokio::time::timeout(timeout, read).await.with_context(|| format!("no {prefix} within {timeout:?}"))?
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }
}

/// Resident memory of process `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(String::from))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

async fn gateway_sockets(ops: SocketAddr) -> f64 {
    let body = herald_tests::http_get(ops, "/metrics").await;
    body.lines()
        .find(|l| l.starts_with("herald_gateway_sockets "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.big + args.small > args.sockets {
        bail!("--big plus --small must not exceed --sockets");
    }
    let env = herald_tests::unique("bench");
    let redis_url = herald_tests::redis_url();
    let ts_sockets = if args.client == ClientKind::Ts { args.small } else { 0 };
    let per_gateway = (args.sockets + ts_sockets).div_ceil(args.gateways);
    let config = Config::load(&config_text(&env, &redis_url, per_gateway), &Default::default())?;
    let config_path = std::env::temp_dir().join(format!("{env}-gateway.toml"));
    std::fs::write(&config_path, toml::to_string(&config)?)?;
    let redis = herald_core::redis::connect_pool(&config.redis).await?;
    let keys = KeySpace::new(&env)?;
    let result = measure(&args, &config_path, &redis, &keys).await;
    // Remove the benchmark's keys whatever happened.
    let pattern = format!("{}:*", keys.prefix());
    let mut cursor = "0".to_string();
    loop {
        use fred::prelude::*;
        let page: Result<(String, Vec<String>), _> =
            redis.next().scan_page(cursor.as_str(), pattern.as_str(), Some(1000), None).await;
        let Ok((next, found)) = page else { break };
        if !found.is_empty() {
            let _: Result<i64, _> = redis.next().del(found).await;
        }
        if next == "0" {
            break;
        }
        cursor = next;
    }
    let _ = std::fs::remove_file(&config_path);
    result
}

async fn measure(
    args: &Args,
    config_path: &std::path::Path,
    redis: &fred::prelude::Pool,
    keys: &KeySpace,
) -> anyhow::Result<()> {
    // Gateways.
    let mut gateways = Vec::new();
    for _ in 0..args.gateways {
        let mut node = Node::spawn(&["gateway".into(), "--config".into(), config_path.display().to_string()])?;
        let ready = node.expect("READY", Duration::from_secs(30)).await?;
        let mut parts = ready.split_whitespace();
        let ws: SocketAddr = parts.next().context("ws addr")?.parse()?;
        let ops: SocketAddr = parts.next().context("ops addr")?.parse()?;
        gateways.push((node, ws, ops));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before: Vec<u64> = gateways.iter().map(|(n, ..)| rss_kib(n.pid())).collect();

    // Clients.
    let token = token()?;
    let addrs: Vec<String> = gateways.iter().map(|(_, ws, _)| ws.to_string()).collect();
    let per_client = args.sockets.div_ceil(args.clients);
    let started = Instant::now();
    let mut clients = Vec::new();
    for k in 0..args.clients {
        let first = k * per_client;
        let count = per_client.min(args.sockets.saturating_sub(first));
        if count == 0 {
            break;
        }
        clients.push(Node::spawn(&[
            "client".into(),
            "--gateways".into(),
            addrs.join(","),
            "--token".into(),
            token.clone(),
            "--source".into(),
            format!("127.0.0.{}", 10 + k),
            "--first".into(),
            first.to_string(),
            "--count".into(),
            count.to_string(),
            "--big".into(),
            args.big.to_string(),
            "--small".into(),
            args.small.to_string(),
            "--channels".into(),
            args.channels.max(1).to_string(),
        ])?);
    }
    for client in &mut clients {
        client.expect("READY", Duration::from_secs(600)).await?;
    }
    let mut ts = match args.client {
        ClientKind::Rust => None,
        ClientKind::Ts => {
            let mut node = Node::spawn_ts(&[
                "--gateways".into(),
                addrs.join(","),
                "--token".into(),
                token.clone(),
                "--channel".into(),
                SMALL_TS.into(),
                "--count".into(),
                args.small.to_string(),
                "--source".into(),
                format!("127.0.0.{}", 10 + args.clients),
            ])?;
            node.expect("READY", Duration::from_secs(600)).await?;
            Some(node)
        }
    };
    let connect_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after: Vec<u64> = gateways.iter().map(|(n, ..)| rss_kib(n.pid())).collect();
    let mut held = 0.0;
    for (_, _, ops) in &gateways {
        held += gateway_sockets(*ops).await;
    }
    let grown: u64 = rss_after.iter().zip(&rss_before).map(|(a, b)| a.saturating_sub(*b)).sum();
    let kb_per_socket = grown as f64 / held.max(1.0);

    // Latency rounds, then the burst.
    let tenant = TenantId::new(TENANT)?;
    let history = HistoryOptions { size: 100, ttl_s: 300 };
    let big = Channel::parse(BIG)?;
    let small = Channel::parse(SMALL)?;
    let small_ts = Channel::parse(SMALL_TS)?;
    let publish = |channel: &Channel, phase: u8| {
        let data = format!(r#"{{"t":{},"p":{phase}}}"#, now_us());
        let (redis, keys, tenant, channel) = (redis.clone(), keys.clone(), tenant.clone(), channel.clone());
        async move { channel::publish(&redis, &keys, &tenant, &channel, history, data.as_bytes(), None).await }
    };
    for _ in 0..args.rounds {
        publish(&big, 0).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        publish(&small, 1).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if ts.is_some() {
            publish(&small_ts, 3).await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let burst_start = now_us();
    for _ in 0..args.burst {
        publish(&big, 2).await?;
    }
    for client in &mut clients {
        client.stdin.write_all(format!("DONE {} {}\n", args.rounds, args.burst).as_bytes()).await?;
        client.stdin.flush().await?;
    }
    let (mut lat_big, mut lat_small) = (Latencies::new(), Latencies::new());
    let (mut burst_deliveries, mut burst_last, mut received, mut expected, mut failed) = (0u64, 0i64, 0u64, 0u64, 0u64);
    for client in &mut clients {
        let line = client.expect("RESULT", Duration::from_secs(120)).await?;
        let v: Value = serde_json::from_str(&line)?;
        for (key, into) in [("lat_big", &mut lat_big), ("lat_small", &mut lat_small)] {
            for pair in v[key].as_array().into_iter().flatten() {
                let (value, count) = (pair[0].as_u64().unwrap_or(0), pair[1].as_u64().unwrap_or(0));
                for _ in 0..count {
                    into.record_us(value);
                }
            }
        }
        burst_deliveries += v["burst"].as_u64().unwrap_or(0);
        burst_last = burst_last.max(v["burst_last_us"].as_i64().unwrap_or(0));
        received += v["received"].as_u64().unwrap_or(0);
        expected += v["expected"].as_u64().unwrap_or(0);
        failed += v["failed"].as_u64().unwrap_or(0);
    }
    let ts_result = match ts.as_mut() {
        Some(node) => {
            node.stdin.write_all(format!("DONE {}\n", args.rounds).as_bytes()).await?;
            node.stdin.flush().await?;
            let v: Value = serde_json::from_str(&node.expect("RESULT", Duration::from_secs(120)).await?)?;
            let mut lat = Latencies::new();
            for pair in v["lat"].as_array().into_iter().flatten() {
                for _ in 0..pair[1].as_u64().unwrap_or(0) {
                    lat.record_us(pair[0].as_u64().unwrap_or(0));
                }
            }
            Some((lat, v))
        }
        None => None,
    };
    let burst_s = (burst_last - burst_start).max(1) as f64 / 1e6;
    let deliveries_per_s = burst_deliveries as f64 / burst_s;
    for (node, ..) in &mut gateways {
        let _ = node.child.start_kill();
    }
    for client in clients.iter_mut().chain(ts.as_mut()) {
        let _ = client.child.start_kill();
    }

    let mut table = Table::new("herald-bench ws (gateway fan-out)");
    table
        .row("machine", format!("{} cores; gateways {}, client processes {}", cores(), args.gateways, clients.len()))
        .row(
            "sockets held (gateway metric)",
            format!("{held} of {} ({connect_s:.1} s to connect and subscribe)", args.sockets),
        )
        .row(
            "gateway RSS before → after",
            format!(
                "{} → {} MiB ({:.2} KiB per idle socket)",
                rss_before.iter().sum::<u64>() / 1024,
                rss_after.iter().sum::<u64>() / 1024,
                kb_per_socket
            ),
        )
        .row(format!("broadcast to {} subscribers", args.big), lat_big.summary())
        .row(format!("broadcast to {} subscribers", args.small), lat_small.summary());
    if let Some((lat, v)) = &ts_result {
        table.row(
            format!("broadcast to {} subscribers, TypeScript client (Node)", args.small),
            format!(
                "{}; received {} / {}, lost {}, duplicates {}",
                lat.summary(),
                v["received"],
                v["expected"],
                v["lost"],
                v["duplicates"]
            ),
        );
    }
    table
        .row(
            "burst deliveries",
            format!(
                "{burst_deliveries} in {burst_s:.2} s = {deliveries_per_s:.0}/s ({} publications × {})",
                args.burst, args.big
            ),
        )
        .row("received / expected", format!("{received} / {expected}; sockets failed: {failed}"));
    print!("{}", table.render());
    let mut json = JsonLine::default();
    json.set("bench", "ws")
        .set("sockets", held as u64)
        .set_f64("kb_per_socket", kb_per_socket, 2)
        .set_f64("deliveries_per_s", deliveries_per_s, 0)
        .set_f64("p50_ms_10k", lat_big.quantile_ms(0.50), 2)
        .set_f64("p99_ms_10k", lat_big.quantile_ms(0.99), 2)
        .set_f64("p50_ms_1k", lat_small.quantile_ms(0.50), 2)
        .set_f64("p99_ms_1k", lat_small.quantile_ms(0.99), 2)
        .set("big_subscribers", args.big as u64)
        .set("small_subscribers", args.small as u64)
        .set("received", received)
        .set("expected", expected)
        .set("gateways", args.gateways as u64)
        .set("cores", cores() as u64);
    if let Some((lat, v)) = &ts_result {
        json.set_f64("p50_ms_1k_ts", lat.quantile_ms(0.50), 2)
            .set_f64("p99_ms_1k_ts", lat.quantile_ms(0.99), 2)
            .set("lost_ts", v["lost"].as_u64().unwrap_or(u64::MAX))
            .set("duplicates_ts", v["duplicates"].as_u64().unwrap_or(u64::MAX));
    }
    println!("{}", json.render());
    if received < expected {
        eprintln!("warning: {} deliveries missing", expected - received);
    }
    Ok(())
}

/// Runs a benchmark node (a gateway or a client process).
pub async fn node(args: NodeArgs) -> anyhow::Result<()> {
    match args.role {
        Role::Gateway { config } => {
            let config = Config::from_file(Some(&config))?;
            let bind = || async { tokio::net::TcpListener::bind("127.0.0.1:0").await };
            let (http, ops) = (bind().await?, bind().await?);
            println!("READY {} {}", http.local_addr()?, ops.local_addr()?);
            std::io::stdout().flush()?;
            let listeners = herald_gateway::Listeners { http, grpc: None, ops };
            herald_gateway::run(config, listeners, herald_core::shutdown::on_signal()).await
        }
        Role::Client { gateways, token, source, first, count, big, small, channels } => {
            // One thread per client process: several of them share the
            // machine with the gateways, and cross-thread wake-ups cost.
            let c = Client { gateways, token, source, first, count, big, small, channels };
            tokio::task::spawn_blocking(move || {
                tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(client(c))
            })
            .await?
        }
    }
}

struct Client {
    gateways: Vec<SocketAddr>,
    token: String,
    source: Ipv4Addr,
    first: usize,
    count: usize,
    big: usize,
    small: usize,
    channels: usize,
}

/// Latencies in µs, rounded to 10 µs, with their counts (compact to send
/// to the parent, exact enough for millisecond quantiles).
type Counts = std::collections::BTreeMap<u64, u64>;

#[derive(Default)]
struct Stats {
    lat_big: Counts,
    lat_small: Counts,
    burst: u64,
    burst_last_us: i64,
}

fn pairs(counts: &Counts) -> Vec<[u64; 2]> {
    counts.iter().map(|(v, c)| [*v, *c]).collect()
}

/// Sockets connecting at once per client process.
const CONNECTING: usize = 256;

/// Connects and subscribes the process's sockets (tokio and tungstenite),
/// then reads publications on a plain `mio` loop: the client processes
/// share the two cores with the gateways, and a task wake-up plus a
/// tungstenite read per delivery would take a noticeable part of them.
async fn client(c: Client) -> anyhow::Result<()> {
    let failed = Arc::new(AtomicUsize::new(0));
    let connecting = Arc::new(Semaphore::new(CONNECTING));
    let mut on_channel = [0u64; 2];
    let mut opening = tokio::task::JoinSet::new();
    for i in c.first..c.first + c.count {
        let channel = if i < c.big {
            on_channel[0] += 1;
            BIG.to_string()
        } else if i < c.big + c.small {
            on_channel[1] += 1;
            SMALL.to_string()
        } else {
            format!("team:c{}", i % c.channels)
        };
        let gateway = c.gateways[i % c.gateways.len()];
        let (token, failed, connecting, source) = (c.token.clone(), failed.clone(), connecting.clone(), c.source);
        opening.spawn(async move {
            let _permit = connecting.acquire_owned().await;
            match open(gateway, source, &token, &channel).await {
                Ok(socket) => socket.into_inner().into_std().ok(),
                Err(error) => {
                    eprintln!("socket {i}: {error:#}");
                    failed.fetch_add(1, Ordering::Relaxed);
                    None
                }
            }
        });
    }
    let mut sockets = Vec::with_capacity(c.count);
    while let Some(opened) = opening.join_next().await {
        sockets.extend(opened?);
    }
    println!("READY {}", sockets.len());
    std::io::stdout().flush()?;

    let stats = Arc::new(Mutex::new(Stats::default()));
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (stats, received, stop) = (stats.clone(), received.clone(), stop.clone());
        std::thread::spawn(move || read_loop(sockets, &stats, &received, &stop))
    };

    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let done = stdin.next_line().await?.context("no DONE line")?;
    let mut parts = done.split_whitespace().skip(1).map(|n| n.parse::<u64>().unwrap_or(0));
    let (rounds, burst) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    let expected = on_channel[0] * (rounds + burst) + on_channel[1] * rounds;
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().map_err(|_| anyhow::anyhow!("the reader thread panicked"))??;
    let stats = stats.lock().unwrap_or_else(|p| p.into_inner());
    let result = json!({
        "lat_big": pairs(&stats.lat_big),
        "lat_small": pairs(&stats.lat_small),
        "burst": stats.burst,
        "burst_last_us": stats.burst_last_us,
        "received": received.load(Ordering::Relaxed),
        "expected": expected,
        "failed": failed.load(Ordering::Relaxed),
    });
    println!("RESULT {result}");
    std::io::stdout().flush()?;
    Ok(())
}

type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Connects from `source`, sends `connect`, subscribes to `channel`.
async fn open(gateway: SocketAddr, source: Ipv4Addr, token: &str, channel: &str) -> anyhow::Result<Socket> {
    let tcp = tokio::net::TcpSocket::new_v4()?;
    tcp.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    let stream = tcp.connect(gateway).await.context("tcp connect")?;
    stream.set_nodelay(true)?;
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("ws://{gateway}/v1/ws"), stream).await.context("websocket upgrade")?;
    ws.send(Message::text(json!({"type": "connect", "token": token}).to_string())).await?;
    expect_frame(&mut ws, "connected").await?;
    ws.send(Message::text(json!({"type": "subscribe", "id": 1, "channel": channel}).to_string())).await?;
    expect_frame(&mut ws, "subscribed").await?;
    Ok(ws)
}

async fn expect_frame(ws: &mut Socket, kind: &str) -> anyhow::Result<()> {
    let wanted = format!(r#""type":"{kind}""#);
    let read = async {
        while let Some(message) = ws.next().await {
            if let Message::Text(text) = message? {
                if text.contains(&wanted) {
                    return Ok(());
                }
                if text.contains(r#""type":"error""#) || text.contains(r#""type":"disconnect""#) {
                    bail!("{text}");
                }
            }
        }
        bail!("socket closed before {kind}")
    };
    tokio::time::timeout(Duration::from_secs(60), read).await.with_context(|| format!("no {kind} frame"))?
}

/// A pong with an empty, zero-masked payload (client frames are masked).
const PONG: [u8; 6] = [0x8A, 0x80, 0, 0, 0, 0];

/// Reads every socket until `stop`, recording the latency of each
/// publication; answers pings.
fn read_loop(
    sockets: Vec<std::net::TcpStream>,
    stats: &Mutex<Stats>,
    received: &AtomicU64,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<()> {
    use std::io::Read as _;
    let mut poll = mio::Poll::new()?;
    let mut streams = Vec::with_capacity(sockets.len());
    for (i, socket) in sockets.into_iter().enumerate() {
        let mut stream = mio::net::TcpStream::from_std(socket);
        poll.registry().register(&mut stream, mio::Token(i), mio::Interest::READABLE)?;
        streams.push((stream, Vec::<u8>::new(), true));
    }
    let mut events = mio::Events::with_capacity(1024);
    let mut chunk = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        poll.poll(&mut events, Some(Duration::from_millis(50)))?;
        for event in &events {
            let (stream, pending, open) = &mut streams[event.token().0];
            while *open {
                match stream.read(&mut chunk) {
                    Ok(0) => *open = false,
                    Ok(n) => {
                        pending.extend_from_slice(&chunk[..n]);
                        let now = now_us();
                        let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
                        let (used, pings) = frames(pending, |text| {
                            let Some((sent, phase)) = parse_pub(text) else { return };
                            let latency = (now - sent).max(0) as u64;
                            match phase {
                                0 => *s.lat_big.entry(latency / 10 * 10).or_default() += 1,
                                1 => *s.lat_small.entry(latency / 10 * 10).or_default() += 1,
                                _ => {
                                    s.burst += 1;
                                    s.burst_last_us = s.burst_last_us.max(now);
                                }
                            }
                            received.fetch_add(1, Ordering::Relaxed);
                        });
                        drop(s);
                        pending.drain(..used);
                        for _ in 0..pings {
                            let _ = std::io::Write::write_all(stream, &PONG);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => *open = false,
                }
            }
        }
    }
    Ok(())
}

/// Calls `text` with each whole text frame (server frames are unmasked) at
/// the start of `buf`; returns the bytes used and how many pings were seen.
fn frames(buf: &[u8], mut text: impl FnMut(&str)) -> (usize, usize) {
    let (mut at, mut pings) = (0, 0);
    loop {
        let rest = &buf[at..];
        if rest.len() < 2 {
            break;
        }
        let (opcode, short) = (rest[0] & 0x0F, usize::from(rest[1] & 0x7F));
        let (header, len) = match short {
            126 if rest.len() >= 4 => (4, usize::from(u16::from_be_bytes([rest[2], rest[3]]))),
            127 if rest.len() >= 10 => (10, u64::from_be_bytes(rest[2..10].try_into().expect("eight bytes")) as usize),
            126 | 127 => break,
            n => (2, n),
        };
        if rest.len() < header + len {
            break;
        }
        let payload = &rest[header..header + len];
        match opcode {
            0x1 => text(std::str::from_utf8(payload).unwrap_or_default()),
            0x9 => pings += 1,
            _ => {}
        }
        at += header + len;
    }
    (at, pings)
}

/// `(t, p)` of a publication frame whose data is `{"t":…,"p":…}`.
fn parse_pub(text: &str) -> Option<(i64, u8)> {
    let rest = &text[text.find(r#""data":{"t":"#)? + 12..];
    let end = rest.find(',')?;
    let sent = rest[..end].parse().ok()?;
    let phase = rest[end..].strip_prefix(r#","p":"#)?.chars().next()?.to_digit(10)? as u8;
    Some((sent, phase))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_publication_frames() {
        let frame =
            r#"{"type":"pub","channel":"team:big","offset":3,"epoch":"ab","data":{"t":1700000000123456,"p":2}}"#;
        assert_eq!(super::parse_pub(frame), Some((1_700_000_000_123_456, 2)));
        assert_eq!(super::parse_pub(r#"{"type":"subscribed"}"#), None);
    }

    #[test]
    fn splits_server_frames() {
        let mut buf = Vec::new();
        for body in ["a".repeat(5), "b".repeat(300)] {
            use tokio_tungstenite::tungstenite::protocol::frame::Frame;
            use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
            Frame::message(body.into_bytes(), OpCode::Data(Data::Text), true).format(&mut buf).unwrap();
        }
        let mut seen = Vec::new();
        let whole = buf.len();
        buf.extend_from_slice(&[0x81, 126, 1]);
        assert_eq!(super::frames(&buf, |t| seen.push(t.len())), (whole, 0));
        assert_eq!(seen, [5, 300]);
    }
}
