//! A throwaway local Redis Cluster: 3 masters and 3 replicas, `redis-server`
//! processes on free ports with `--cluster-enabled yes`, joined with
//! `redis-cli --cluster create --cluster-replicas 1`.
//!
//! The servers are children of a small shell *supervisor* whose stdin is a
//! pipe from this process: when the test process exits, however it exits,
//! the pipe closes and the supervisor SIGKILLs every server and removes
//! their directory. So a cluster lives exactly as long as the test process
//! ([`RedisCluster::shared`] starts one per process), or as long as its
//! value ([`RedisCluster::start`], for tests that kill masters).

use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A running cluster.
pub struct RedisCluster {
    /// Every node's port (masters first, as created).
    pub ports: Vec<u16>,
    dir: std::path::PathBuf,
    supervisor: Child,
    /// Nodes started again after a kill ([`RedisCluster::restart`]).
    restarted: std::sync::Mutex<Vec<Child>>,
}

/// A port `p` with `p` and its cluster bus port `p + 10000` both free.
fn free_cluster_port() -> u16 {
    loop {
        let port = crate::free_port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().expect("redis-cli on PATH");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl RedisCluster {
    /// The cluster of this test process, started on first use.
    pub fn shared() -> &'static RedisCluster {
        static SHARED: OnceLock<RedisCluster> = OnceLock::new();
        SHARED.get_or_init(|| RedisCluster::start(3))
    }

    /// Starts `masters` masters with one replica each and waits until the
    /// cluster is healthy (every slot served, every replica in sync).
    pub fn start(masters: usize) -> Self {
        let ports: Vec<u16> = (0..masters * 2).map(|_| free_cluster_port()).collect();
        let dir = std::env::temp_dir().join(crate::unique("herald-cluster-"));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let script = r#"
dir="$1"; shift
pids=""
for p in "$@"; do
  redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file "nodes-$p.conf" \
    --cluster-node-timeout 1000 --save "" --appendonly no --dir "$dir" --logfile "$dir/$p.log" &
  pids="$pids $!"
done
cat >/dev/null
kill -9 $pids 2>/dev/null
rm -rf "$dir"
"#;
        let supervisor = Command::new("bash")
            .arg("-c")
            .arg(script)
            .arg("herald-cluster")
            .arg(&dir)
            .args(ports.iter().map(u16::to_string))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("bash");
        let cluster = Self { ports, dir, supervisor, restarted: Default::default() };
        cluster.wait_for(|p| cli(p, &["ping"]).contains("PONG"), "redis-server did not start");
        let nodes: Vec<String> = cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(created.status.success(), "cluster create failed: {}", String::from_utf8_lossy(&created.stdout));
        cluster.wait_healthy();
        cluster
    }

    fn wait_for(&self, ok: impl Fn(u16) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(180);
        while !self.live_ports().into_iter().all(&ok) {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Nodes that answer.
    pub fn live_ports(&self) -> Vec<u16> {
        self.ports.iter().copied().filter(|p| cli(*p, &["ping"]).contains("PONG")).collect()
    }

    /// Waits until every live node says `cluster_state:ok`, and every live
    /// master has a replica in sync (what `WAIT 1` needs).
    pub fn wait_healthy(&self) {
        self.wait_for(|p| cli(p, &["cluster", "info"]).contains("cluster_state:ok"), "cluster never became ok");
        self.wait_for(
            |p| {
                let info = cli(p, &["info", "replication"]);
                info.contains("role:slave") && info.contains("master_link_status:up")
                    || info.contains("role:master") && info.contains("state=online")
            },
            "replicas never caught up",
        );
    }

    /// `redis-cluster://` url with every node as a seed.
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.ports[0]);
        for (i, p) in self.ports.iter().enumerate().skip(1) {
            url.push_str(if i == 1 { "?" } else { "&" });
            url.push_str(&format!("node=127.0.0.1:{p}"));
        }
        url
    }

    /// The port of the master that serves `slot` now.
    pub fn master_of(&self, slot: u16) -> u16 {
        self.slot_map()
            .into_iter()
            .find(|(lo, hi, _)| (*lo..=*hi).contains(&slot))
            .map(|(_, _, port)| port)
            .unwrap_or_else(|| panic!("no live master serves slot {slot}"))
    }

    /// `(first slot, last slot, master port)` of every range, as a live
    /// master sees the cluster.
    pub fn slot_map(&self) -> Vec<(u16, u16, u16)> {
        let port = self
            .live_ports()
            .into_iter()
            .find(|p| cli(*p, &["info", "replication"]).contains("role:master"))
            .expect("a live master");
        let mut map = Vec::new();
        for line in cli(port, &["cluster", "nodes"]).lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let Some(node_port) = fields[1].split(['@', ':']).nth(1).and_then(|p| p.parse().ok()) else { continue };
            for range in &fields[8..] {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(lo), Ok(hi)) = (lo.parse(), hi.parse()) {
                    map.push((lo, hi, node_port));
                }
            }
        }
        map
    }

    /// The replica of the master on `master`.
    pub fn replica_of(&self, master: u16) -> u16 {
        self.live_ports()
            .into_iter()
            .find(|p| {
                let info = cli(*p, &["info", "replication"]);
                info.contains("role:slave") && info.contains(&format!("master_port:{master}"))
            })
            .unwrap_or_else(|| panic!("no replica of {master}"))
    }

    /// SIGKILLs the node on `port` (its replica is promoted within about the
    /// node timeout, 1 s).
    pub fn kill(&self, port: u16) {
        let info = cli(port, &["info", "server"]);
        let pid =
            info.lines().find_map(|l| l.strip_prefix("process_id:")).map(|p| p.trim().to_string()).expect("process_id");
        let status = Command::new("kill").args(["-9", &pid]).status().expect("kill");
        assert!(status.success());
    }

    /// Starts the killed node on `port` again, as a restarted pod would: it
    /// rejoins from its nodes file as a replica of the promoted master, so
    /// the shard has a replica for `WAIT` again.
    pub fn restart(&self, port: u16) {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--cluster-enabled", "yes"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf"), "--cluster-node-timeout", "1000"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir)
            .args(["--logfile", &format!("{}/{port}.log", self.dir.display())])
            .spawn()
            .expect("redis-server");
        self.restarted.lock().unwrap_or_else(|p| p.into_inner()).push(child);
        self.wait_healthy();
    }

    /// `CLUSTER FAILOVER` on the replica on `replica`: it takes over its
    /// master's slots without losing writes.
    pub fn failover(&self, replica: u16) {
        let reply = cli(replica, &["cluster", "failover"]);
        assert!(reply.contains("OK"), "cluster failover: {reply}");
    }

    /// Waits until the node on `port` is a master.
    pub fn wait_master(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cli(port, &["info", "replication"]).contains("role:master") {
            assert!(Instant::now() < deadline, "{port} was never promoted");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in self.restarted.lock().unwrap_or_else(|p| p.into_inner()).iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Closing stdin tells the supervisor to kill the servers.
        drop(self.supervisor.stdin.take());
        let _ = self.supervisor.wait();
    }
}
