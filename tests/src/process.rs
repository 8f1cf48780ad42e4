//! Services as real OS processes, for fault tests that kill them (SIGKILL).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;

use herald_core::config::Config;
use tokio::process::{Child, Command};

static BUILD: Mutex<()> = Mutex::new(());

/// Path of workspace binary `name` (e.g. `herald-capture`) in the target
/// directory of the running executable (a test in `target/<profile>/deps`,
/// or a program in `target/<profile>`), building it first if it is not
/// there yet.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("executable directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    let _guard = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    if !path.exists() {
        let mut build = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build.args(["build", "-p", name, "--bin", name]);
        if dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "cargo build -p {name} failed");
    }
    assert!(path.exists(), "{} not found after building", path.display());
    path
}

/// A service running as a child process.
pub struct ChildService {
    child: Child,
    config_path: PathBuf,
}

impl ChildService {
    /// Starts `binary run` with `config` written to a temporary file.
    pub fn spawn(binary_name: &str, config: &Config) -> Self {
        let config_path = std::env::temp_dir().join(format!("{}-{}.toml", config.env, crate::unique("c")));
        std::fs::write(&config_path, toml::to_string(config).expect("serialize config")).expect("write config");
        let child = Command::new(binary(binary_name))
            .arg("--config")
            .arg(&config_path)
            .arg("run")
            .env("HERALD_LOG", std::env::var("HERALD_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn service process");
        Self { child, config_path }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().expect("the service is running");
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// How the process ended, if it has (a bad configuration ends it at once).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then waits for the process to end (SIGKILL after 10 s): its
    /// shutdown code runs, as when a deployment stops it.
    pub async fn stop(mut self) {
        if self.pid().is_some() {
            self.signal("TERM");
            if tokio::time::timeout(std::time::Duration::from_secs(10), self.child.wait()).await.is_err() {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
            }
        }
        let _ = std::fs::remove_file(&self.config_path);
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let _ = std::fs::remove_file(&self.config_path);
    }
}
