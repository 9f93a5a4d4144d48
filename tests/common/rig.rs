//! Private infrastructure for the fault-injection scenarios: a throwaway PostgreSQL cluster
//! that can be crashed (`-m immediate`), a Redis that can be stopped and started, and the real
//! `loyalty` binary as a process that can be SIGKILLed. Nothing here touches the shared
//! instances.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scratch_dir(kind: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "loyalty-{kind}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

/// The PostgreSQL server binaries (the newest installed version).
fn pg_bindir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    dirs.retain(|d| d.join("initdb").exists());
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
        .expect("PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
}

/// A PostgreSQL cluster of our own on a free port.
pub struct PrivatePostgres {
    bindir: PathBuf,
    data: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

impl PrivatePostgres {
    pub fn start() -> PrivatePostgres {
        let as_postgres = is_root();
        let data = scratch_dir("pg");
        if as_postgres {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&data));
        }
        let pg = PrivatePostgres {
            bindir: pg_bindir(),
            data,
            port: free_port(),
            as_postgres,
        };
        run(pg
            .command(
                "initdb",
                &["-U", "postgres", "--auth=trust", "-E", "UTF8", "-D"],
            )
            .arg(&pg.data));
        pg.start_again();
        pg
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let binary = self.bindir.join(program);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(binary);
            c
        } else {
            Command::new(binary)
        };
        command
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    /// The URL of `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn start_again(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c max_connections=200",
            self.port,
            self.data.display()
        );
        let log = self.data.join("server.log");
        run(self
            .command("pg_ctl", &["-w", "-t", "60", "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(log)
            .args(["-o", &options, "start"]));
    }

    /// Crashes the server: no shutdown checkpoint, clients cut off; the next start recovers
    /// from the WAL.
    pub fn stop_immediate(&self) {
        run(self
            .command("pg_ctl", &["-w", "-m", "immediate", "-D"])
            .arg(&self.data)
            .arg("stop"));
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl", &["-m", "immediate", "-D"])
            .arg(&self.data)
            .arg("stop")
            .output();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

fn run(command: &mut Command) {
    let output = command.output().expect("run a PostgreSQL tool");
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A Redis of our own, stoppable and restartable on the same port (empty after a restart, as
/// a Redis without persistence is).
pub struct PrivateRedis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        let mut redis = PrivateRedis {
            port: free_port(),
            dir: scratch_dir("redis"),
            child: None,
        };
        redis.start_again();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn start_again(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10));
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn wait_for_port(port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The real `loyalty serve`, as a process that can be killed and started again on the same
/// port.
pub struct ServerProcess {
    pub port: u16,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl ServerProcess {
    pub fn start(database_url: &str, redis_url: &str, key_prefix: &str) -> ServerProcess {
        let port = free_port();
        let env = [
            ("DATABASE_URL", database_url),
            ("REDIS_URL", redis_url),
            ("LOYALTY_REDIS_PREFIX", key_prefix),
            ("LOYALTY_LISTEN", &format!("127.0.0.1:{port}")),
            ("LOYALTY_METRICS_LISTEN", ""),
            ("LOYALTY_RATE_LIMIT_RPS", "0"),
            ("LOYALTY_HEALTH_INTERVAL_MS", "200"),
            ("LOYALTY_REDIS_TIMEOUT_MS", "100"),
            ("LOYALTY_REDIS_COOL_DOWN_MS", "200"),
            ("LOYALTY_DB_ACQUIRE_TIMEOUT_MS", "500"),
            ("LOYALTY_LOG_FORMAT", "json"),
            ("RUST_LOG", "warn"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut server = ServerProcess {
            port,
            env,
            log: scratch_dir("server").join("server.log"),
            child: None,
            starts: 0,
        };
        server.start_again();
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn start_again(&mut self) {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_loyalty"))
            .arg("serve")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start loyalty serve");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(30));
    }

    /// SIGKILL: no graceful shutdown, in-flight requests are cut off.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
