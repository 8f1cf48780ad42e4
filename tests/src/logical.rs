//! A throwaway Postgres cluster with `wal_level = logical`, for the WAL
//! source: the shared server runs `wal_level = replica` and must not be
//! reconfigured. Started once per test process (nextest runs one test per
//! process) from the machine's binaries (`pg_config --bindir`, as
//! `scripts/dev.sh` does), from a data directory copied from a template
//! made once per machine, and stopped by a watchdog when the test process
//! exits, however it exits.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// A running throwaway cluster.
pub struct LogicalCluster {
    pub port: u16,
    fsync: bool,
    data: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    /// Outlives this process on purpose; never waited on.
    _watchdog: Option<std::process::Child>,
}

static CLUSTER: OnceLock<LogicalCluster> = OnceLock::new();
static DURABLE: OnceLock<LogicalCluster> = OnceLock::new();

/// The process's cluster for tests (`fsync = off`), started on first use.
pub fn cluster() -> &'static LogicalCluster {
    CLUSTER.get_or_init(|| LogicalCluster::start(false))
}

/// A cluster that flushes its WAL like a production server (`fsync = on`),
/// for benchmarks, started on first use.
pub fn durable_cluster() -> &'static LogicalCluster {
    DURABLE.get_or_init(|| LogicalCluster::start(true))
}

fn run(cmd: &mut Command, what: &str) {
    let output = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(output.status.success(), "{what} failed: {}", String::from_utf8_lossy(&output.stderr));
}

impl LogicalCluster {
    fn start(fsync: bool) -> Self {
        let bin = Command::new("pg_config").arg("--bindir").output().expect("pg_config on PATH");
        let bin = PathBuf::from(String::from_utf8_lossy(&bin.stdout).trim());
        // initdb refuses root: then the server runs as `postgres`.
        let uid = Command::new("id").arg("-u").output().expect("id");
        let as_postgres = String::from_utf8_lossy(&uid.stdout).trim() == "0";
        let version = bin.parent().and_then(Path::file_name).map(|v| v.to_string_lossy().into_owned());
        let template = std::env::temp_dir().join(format!("herald-pg-logical-{}", version.unwrap_or_default()));
        let cluster = Self { port: crate::free_port(), fsync, data: PathBuf::new(), bin, as_postgres, _watchdog: None };
        if !template.join("PG_VERSION").exists() {
            let fresh = PathBuf::from(format!("{}.{}", template.display(), crate::unique("")));
            std::fs::create_dir_all(&fresh).expect("template dir");
            cluster.chown(&fresh);
            run(
                cluster
                    .pg_command("initdb")
                    .args(["-D"])
                    .arg(&fresh)
                    .args(["-U", "postgres", "-A", "trust", "-E", "UTF8"]),
                "initdb",
            );
            // Another process may have won the race: then ours goes.
            if std::fs::rename(&fresh, &template).is_err() {
                let _ = std::fs::remove_dir_all(&fresh);
            }
        }
        let data = std::env::temp_dir().join(crate::unique("herald-pg-"));
        run(Command::new("cp").arg("-a").arg(&template).arg(&data), "copy the template cluster");
        let cluster = Self { data, ..cluster };
        cluster.pg_ctl_start();
        // The watchdog: stops the cluster and removes its data once this
        // process is gone.
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf '{data}'",
            pid = std::process::id(),
            stop = cluster.shell_stop(),
            data = cluster.data.display()
        );
        let watchdog = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("watchdog");
        Self { _watchdog: Some(watchdog), ..cluster }
    }

    fn chown(&self, path: &Path) {
        if self.as_postgres {
            run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(path), "chown");
        }
    }

    fn pg_command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(path);
            cmd
        } else {
            Command::new(path)
        }
    }

    fn pg_ctl_start(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{}' -c wal_level=logical \
             -c max_replication_slots=64 -c max_wal_senders=64 -c fsync={} -c max_connections=300 \
             -c shared_buffers=128MB",
            self.port,
            self.data.display(),
            if self.fsync { "on" } else { "off" },
        );
        run(
            self.pg_command("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-w", "-l"])
                .arg(self.data.join("server.log"))
                .args(["-o", &options, "start"]),
            "pg_ctl start",
        );
    }

    fn shell_stop(&self) -> String {
        let prefix = if self.as_postgres { "runuser -u postgres -- " } else { "" };
        format!("{prefix}'{}' -D '{}' -m immediate stop", self.bin.join("pg_ctl").display(), self.data.display())
    }

    /// The cluster's `postgres` database, superuser.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server at once (`-m immediate`: like a crash) and starts it
    /// again on the same port.
    pub fn restart(&self) {
        self.stop();
        self.start_again();
    }

    /// Stops the server at once (`-m immediate`: like a crash). Every test
    /// of this process on the cluster sees it down until [`Self::start_again`].
    pub fn stop(&self) {
        run(self.pg_command("pg_ctl").arg("-D").arg(&self.data).args(["-m", "immediate", "-w", "stop"]), "pg_ctl stop");
    }

    /// Starts a stopped server again on the same port.
    pub fn start_again(&self) {
        self.pg_ctl_start();
    }
}
